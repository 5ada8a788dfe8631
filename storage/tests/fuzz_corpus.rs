//! Replays the committed fuzz corpus of the thin pool's metadata pages (and mutations of
//! each) through the fuzz target's entry point in a plain `cargo test`.

use std::path::Path;

#[test]
fn meta_page_corpus() {
    corpus_replay::replay(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        "meta_page",
        Vec::new(),
        3000,
        storage::thin::fuzzing::meta_page,
    );
}
