//! Replays every committed fuzz corpus file through the same entry point the fuzz target
//! uses, plus cheap deterministic mutations of each, so parser regressions show up in a
//! plain `cargo test` (no nightly, no libFuzzer). Shared by the crates that have a
//! `fuzz/` directory (blkback, storage, template-builder) as a dev-dependency.

use std::path::{Path, PathBuf};

/// The files of `CRATE/fuzz/corpus/TARGET`, sorted, with their contents. Panics (this is
/// test support) when the directory is missing or empty: a corpus that silently vanished
/// would make the replay pass without testing anything.
pub fn corpus(crate_dir: &Path, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = crate_dir.join("fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "empty corpus for {target} in {}",
        dir.display()
    );
    files
}

/// Calls `f` on `rounds` mutations of `seed` (bit flips, byte overwrites, truncations,
/// insertions; one to four per round). The generator is seeded from the input's length,
/// so a failure reproduces on every run.
pub fn mutate(seed: &[u8], rounds: u32, mut f: impl FnMut(&[u8])) {
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

/// Every input of `corpus` (plus `extra` seeds built by the test) through `f`, then
/// `rounds` mutations of each. The file being replayed is printed first so a panic
/// names it.
pub fn replay(
    crate_dir: &Path,
    target: &str,
    extra: Vec<(PathBuf, Vec<u8>)>,
    rounds: u32,
    mut f: impl FnMut(&[u8]),
) {
    let mut all = corpus(crate_dir, target);
    all.extend(extra);
    for (path, data) in all {
        eprintln!("{}", path.display());
        f(&data);
        mutate(&data, rounds, &mut f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_deterministic_and_differ_from_the_seed() {
        let seed = b"0123456789abcdef".to_vec();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        mutate(&seed, 50, |d| a.push(d.to_vec()));
        mutate(&seed, 50, |d| b.push(d.to_vec()));
        assert_eq!(a, b);
        assert_eq!(a.len(), 50);
        assert!(a.iter().filter(|d| **d != seed).count() > 40);
    }

    #[test]
    fn a_missing_corpus_is_an_error() {
        let dir = std::env::temp_dir().join("corpus-replay-none");
        let r = std::panic::catch_unwind(|| corpus(&dir, "nothing"));
        assert!(r.is_err());
    }
}
