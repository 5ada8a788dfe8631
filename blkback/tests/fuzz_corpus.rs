//! Replays the committed fuzz corpora of the NBD handshake, NBD requests and the blkif
//! ring (and mutations of each) through the fuzz targets' entry points in a plain
//! `cargo test`.

use std::path::Path;

use corpus_replay::replay;

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn handshake_corpus() {
    replay(
        crate_dir(),
        "handshake",
        Vec::new(),
        3000,
        blkback::fuzzing::handshake,
    );
}

#[test]
fn request_corpus() {
    replay(
        crate_dir(),
        "request",
        Vec::new(),
        3000,
        blkback::fuzzing::requests,
    );
}

#[test]
fn blkif_corpus() {
    replay(
        crate_dir(),
        "blkif",
        Vec::new(),
        1000,
        blkback::fuzzing::blkif,
    );
}
