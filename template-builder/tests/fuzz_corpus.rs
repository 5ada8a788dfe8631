//! Replays every committed fuzz corpus file through the same entry points the fuzz
//! targets use, plus a few thousand cheap deterministic mutations of each, so parser
//! regressions show up in a plain `cargo test` (no nightly, no libFuzzer).

use std::path::{Path, PathBuf};

/// A small valid package (two data chunks, a duplicate, zeros, a kernel): the seed that
/// gets mutations past the header and manifest checks. `WRITE_FUZZ_SEED=1` stores it
/// in the corpus (for cargo fuzz).
fn valid_package() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut img = vec![0u8; 6 * 4096 + 100];
    for (i, b) in img[..8192].iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    let (a, b) = img.split_at_mut(16384);
    b[..4096].copy_from_slice(&a[..4096]);
    std::fs::write(d.join("root.img"), &img).unwrap();
    std::fs::write(d.join("vmlinuz"), b"not really a kernel").unwrap();
    let dev = template_builder::package::RawImageFile::open(&d.join("root.img")).unwrap();
    template_builder::package::export_package_with(
        "t",
        &dev,
        &template_builder::package::TemplateMeta::default(),
        Some(&d.join("vmlinuz")),
        None,
        &d.join("t.qtpkg"),
        4096,
    )
    .unwrap();
    std::fs::read(d.join("t.qtpkg")).unwrap()
}

#[test]
fn package_corpus() {
    let seed = valid_package();
    if std::env::var_os("WRITE_FUZZ_SEED").is_some() {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/package/valid_small");
        std::fs::write(p, &seed).unwrap();
    }
    corpus_replay::replay(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        "package",
        vec![("(built in this test)".into(), seed)],
        300,
        template_builder::package::fuzz_package,
    );
}
