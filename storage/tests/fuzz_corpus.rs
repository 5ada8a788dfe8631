//! Replays every committed fuzz corpus file through the same entry points the fuzz
//! targets use, plus a few thousand cheap deterministic mutations of each, so parser
//! regressions show up in a plain `cargo test` (no nightly, no libFuzzer).

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let d = std::fs::read(&p).unwrap();
            (p, d)
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "empty corpus for {target}");
    v
}

fn mutate(seed: &[u8], rounds: u32, mut f: impl FnMut(&[u8])) {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d ^ seed.len() as u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..rounds {
        let mut d = seed.to_vec();
        for _ in 0..(next() % 4 + 1) {
            if d.is_empty() {
                break;
            }
            let i = (next() % d.len() as u64) as usize;
            match next() % 4 {
                0 => d[i] ^= 1 << (next() % 8),
                1 => d[i] = next() as u8,
                2 => d.truncate(i),
                _ => d.insert(i, next() as u8),
            }
        }
        f(&d);
    }
}

#[test]
fn meta_page_corpus() {
    for (p, d) in corpus("meta_page") {
        eprintln!("{}", p.display());
        storage::thin::fuzzing::meta_page(&d);
        mutate(&d, 3000, storage::thin::fuzzing::meta_page);
    }
}
