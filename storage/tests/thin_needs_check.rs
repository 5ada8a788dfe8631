//! A pool stopped by a failed metadata update records it in its superblock (dm-thin's
//! `needs_check`): the next open verifies the metadata before trusting it, refuses damaged
//! metadata, and clears the flag at its first commit when the metadata is sound.

use std::sync::Arc;

use storage::io::{DiskImage, Faults, FaultyFile};
use storage::thin::PageKind;
use storage::thin::{ThinOptions, ThinPool};
use storage::{Pool, PoolError};

fn create(dir: &std::path::Path) -> (Arc<ThinPool>, FaultyFile, FaultyFile) {
    let meta = FaultyFile::with_faults(DiskImage::default(), Faults::new());
    let data = FaultyFile::with_faults(DiskImage::default(), Faults::new());
    let pool = ThinPool::create_with_io(
        dir,
        ThinOptions {
            chunk_size: 64 << 10,
            capacity: 64 << 20,
        },
        Box::new(meta.clone()),
        Box::new(data.clone()),
    )
    .unwrap();
    (pool, meta, data)
}

/// Reopens what a power cut now leaves; returns the new files too.
fn reopen(
    dir: &std::path::Path,
    meta: &FaultyFile,
    data: &FaultyFile,
) -> (Result<Arc<ThinPool>, PoolError>, FaultyFile, FaultyFile) {
    let m = FaultyFile::from_image(meta.power_cut());
    let d = FaultyFile::from_image(data.power_cut());
    let r = ThinPool::open_with_io(dir, Box::new(m.clone()), Box::new(d.clone()));
    (r, m, d)
}

#[test]
fn damaged_metadata_found_by_a_write_is_remembered_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, meta, data) = create(dir.path());
    pool.create_volume("a", 4 << 20).unwrap();
    pool.open_volume("a", false)
        .unwrap()
        .write_at(&[7u8; 4096], 0)
        .unwrap();
    pool.commit().unwrap();
    let leaf = pool
        .metadata_pages()
        .unwrap()
        .into_iter()
        .find(|(_, k)| *k == PageKind::MapLeaf)
        .expect("a map leaf")
        .0;
    drop(pool);
    let (pool, meta, data) = reopen(dir.path(), &meta, &data);
    let pool = pool.unwrap();
    // Bit rot in the leaf: the write that reads it stops the pool.
    meta.corrupt(leaf.0 * 4096 + 200, b"rot");
    let a = pool.open_volume("a", false).unwrap();
    assert!(a.write_at(&[8u8; 4096], 0).is_err());
    assert!(
        a.write_at(&[8u8; 4096], 0).is_err(),
        "the pool must stay stopped"
    );
    drop((a, pool));
    // A restart does not forget: the open verifies and refuses the damaged metadata.
    match reopen(dir.path(), &meta, &data).0 {
        Err(PoolError::Corrupt(why)) => assert!(why.contains("needs_check"), "{why}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a pool stopped on damaged metadata opened without a check"),
    }
}

#[test]
fn transient_metadata_failure_sets_then_clears_needs_check() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, meta, data) = create(dir.path());
    pool.create_volume("a", 4 << 20).unwrap();
    let a = pool.open_volume("a", false).unwrap();
    a.write_at(&[7u8; 4096], 0).unwrap();
    pool.commit().unwrap();
    assert!(!pool.needs_check());
    a.write_at(&[9u8; 4096], 1 << 20).unwrap();
    // The commit's first metadata write fails once; the device works again after.
    meta.faults().fail_only(0);
    assert!(pool.commit().is_err());
    assert!(pool.needs_check());
    drop((a, pool));
    let (pool, meta, data) = reopen(dir.path(), &meta, &data);
    let pool = pool.expect("sound metadata opens after the check");
    assert!(pool.needs_check(), "the flag must survive the restart");
    assert!(pool.verify().unwrap().is_clean());
    let a = pool.open_volume("a", true).unwrap();
    let mut b = vec![0u8; 4096];
    a.read_at(&mut b, 0).unwrap();
    assert_eq!(b, vec![7u8; 4096]);
    drop(a);
    pool.commit().unwrap();
    assert!(!pool.needs_check());
    drop(pool);
    let pool = reopen(dir.path(), &meta, &data).0.unwrap();
    assert!(!pool.needs_check());
}
