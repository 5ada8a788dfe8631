//! Damage tests: flip bytes in every kind of metadata page and in the superblocks of a
//! real pool. Opening or `verify` must detect it and name the page; reads must never
//! return damaged metadata as data (they fail, or return the right bytes); one damaged
//! superblock falls back to the other.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use storage::thin::{PageKind, ThinOptions, ThinPool};
use storage::{Pool, PoolError};

const PAGE: u64 = 4096;

fn pat(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(seed | 1) >> 3) as u8 | 1)
        .collect()
}

const LEAF_SPAN: u64 = 168 * 4096;

/// Offsets sampled in every volume: one 4 KiB block under each block-map leaf, so every
/// map page of every volume is read.
fn samples(size: u64) -> Vec<u64> {
    (0..size.div_ceil(LEAF_SPAN))
        .map(|l| l * LEAF_SPAN + 4096 * (l % 7))
        .filter(|&o| o + 4096 <= size)
        .collect()
}

/// A pool with every kind of page: deep block maps, >1008 data chunks and metadata
/// pages (refcount interiors), >168 volumes (roots interior), a multi-page catalogue.
/// Returns the expected bytes at the sampled offsets.
fn build(dir: &Path) -> BTreeMap<(String, u64), Vec<u8>> {
    let pool = ThinPool::create(
        dir,
        ThinOptions {
            chunk_size: 4096,
            capacity: 16 << 20,
        },
    )
    .unwrap();
    let size = 9 * LEAF_SPAN;
    pool.create_volume("big", size).unwrap();
    let big = pool.open_volume("big", false).unwrap();
    big.write_at(&pat(1, (7 * LEAF_SPAN) as usize), 0).unwrap();
    drop(big);
    for i in 0..250u64 {
        let key = format!("snap/with-a-long-name-to-fill-the-catalogue-{i:04}");
        pool.snapshot("big", &key).unwrap();
        let v = pool.open_volume(&key, false).unwrap();
        for l in 0..6 {
            v.write_at(
                &pat(i * 8 + l + 2, 4096),
                ((i + l) % 9) * LEAF_SPAN + 4096 * ((i + l) % 7),
            )
            .unwrap();
        }
    }
    pool.set_meta("qube/x", Some("y")).unwrap();
    pool.commit().unwrap();
    let mut contents = BTreeMap::new();
    for v in pool.list_volumes().unwrap() {
        let h = pool.open_volume(&v.key, true).unwrap();
        for off in samples(v.size) {
            let mut buf = vec![0u8; 4096];
            h.read_at(&mut buf, off).unwrap();
            contents.insert((v.key.clone(), off), buf);
        }
    }
    let r = pool.verify().unwrap();
    assert!(r.is_clean(), "{r:?}");
    contents
}

fn copy_pool(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(from.join("pool.meta"), to.join("pool.meta")).unwrap();
    std::fs::copy(from.join("pool.data"), to.join("pool.data")).unwrap();
}

fn flip(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, offset).unwrap();
}

/// Opens the damaged pool and reads everything: the damage must be reported naming
/// `page`, and no read may return wrong bytes.
fn check_detected(dir: &Path, page: u64, contents: &BTreeMap<(String, u64), Vec<u8>>) {
    let needle = format!("page {page}");
    let pool: Arc<ThinPool> = match ThinPool::open(dir) {
        Err(e) => {
            assert!(
                e.to_string().contains(&needle),
                "open error does not name {needle}: {e}"
            );
            return;
        }
        Ok(p) => p,
    };
    let r = pool.verify().unwrap();
    assert!(
        r.errors.iter().any(|e| e.contains(&needle)),
        "verify does not name {needle}: {r:?}"
    );
    for ((key, off), want) in contents {
        let Ok(h) = pool.open_volume(key, true) else {
            continue;
        };
        let mut buf = vec![0u8; want.len()];
        match h.read_at(&mut buf, *off) {
            Ok(()) => assert!(
                buf == *want,
                "{key}@{off}: read returned wrong bytes with page {page} damaged"
            ),
            Err(e) => assert!(
                e.to_string().contains(&needle),
                "{key}: read error does not name {needle}: {e}"
            ),
        }
    }
}

#[test]
fn damage_to_every_page_kind_is_detected() {
    let base = tempfile::tempdir().unwrap();
    let contents = build(base.path());
    let pages = {
        let pool = ThinPool::open(base.path()).unwrap();
        pool.metadata_pages().unwrap()
    };
    let mut by_kind: BTreeMap<PageKind, Vec<u64>> = BTreeMap::new();
    for (p, k) in &pages {
        by_kind.entry(*k).or_default().push(p.0);
    }
    for kind in PageKind::ALL {
        assert!(
            by_kind.contains_key(&kind),
            "the test pool has no {kind:?} page: {:?}",
            by_kind.keys()
        );
    }
    let work = tempfile::tempdir().unwrap();
    let mut n = 0;
    for (kind, list) in &by_kind {
        if *kind == PageKind::Superblock {
            continue;
        }
        // First, middle and last page of the kind; payload, header and checksum bytes.
        let picks = [list[0], list[list.len() / 2], list[list.len() - 1]];
        for (i, page) in picks.into_iter().enumerate() {
            let at = [100, 33, 5][i];
            let dir = work.path().join(format!("{n}"));
            n += 1;
            copy_pool(base.path(), &dir);
            flip(&dir.join("pool.meta"), page * PAGE + at);
            check_detected(&dir, page, &contents);
        }
    }
}

#[test]
fn one_bad_superblock_falls_back_to_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let pool = ThinPool::create(
        dir.path(),
        ThinOptions {
            chunk_size: 4096,
            capacity: 8 << 20,
        },
    )
    .unwrap();
    pool.create_volume("a", 1 << 20).unwrap();
    pool.open_volume("a", false)
        .unwrap()
        .write_at(&[7u8; 8192], 0)
        .unwrap();
    pool.commit().unwrap();
    pool.create_volume("b", 1 << 20).unwrap();
    pool.commit().unwrap();
    let generation = pool.info().unwrap().generation;
    drop(pool);
    let newest = generation % 2;

    flip(&dir.path().join("pool.meta"), newest * PAGE + 200);
    let pool = ThinPool::open(dir.path()).unwrap();
    let info = pool.info().unwrap();
    assert_eq!(
        info.generation,
        generation - 1,
        "falls back to the previous commit"
    );
    assert!(pool.exists("a").unwrap() && !pool.exists("b").unwrap());
    // Nothing is wrong with the commit in use; the damaged slot is reported.
    let r = pool.verify().unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert!(r.warnings[0].contains("superblock slot"), "{r:?}");
    assert!(pool.info().unwrap().warnings[0].contains("superblock"));
    let mut buf = [0u8; 8192];
    pool.open_volume("a", true)
        .unwrap()
        .read_at(&mut buf, 0)
        .unwrap();
    assert!(buf.iter().all(|&b| b == 7));
    drop(pool);

    flip(&dir.path().join("pool.meta"), (1 - newest) * PAGE + 40);
    match ThinPool::open(dir.path()) {
        Err(PoolError::Corrupt(msg)) => {
            assert!(msg.contains("page 0") && msg.contains("page 1"), "{msg}");
        }
        Err(e) => panic!("wrong error with both superblocks damaged: {e}"),
        Ok(_) => panic!("opened a pool with both superblocks damaged"),
    }
}

#[test]
fn garbage_is_not_a_pool() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pool.meta"), vec![0xAB; 3 * PAGE as usize]).unwrap();
    std::fs::write(dir.path().join("pool.data"), b"").unwrap();
    assert!(matches!(
        ThinPool::open(dir.path()),
        Err(PoolError::Corrupt(_))
    ));
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        ThinPool::open(empty.path()),
        Err(PoolError::NotAPool { .. })
    ));
}
