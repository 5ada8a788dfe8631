//! Lost writes: the disk acknowledged a metadata write and never made it, so the page
//! still holds an older image of itself (the page was freed and reused). Such a page is
//! self-consistent (its checksum is keyed by kind and page number only); the pool must
//! see it against its parent's record of the page (generation and checksum), on read
//! and in `verify`, and say which volume and page, and what to do.
//!
//! On the format before lost-write detection, every case here opened and read the old
//! data (or old refcounts) without an error.

use std::collections::BTreeMap;
use std::sync::Arc;

use storage::io::{DiskImage, FaultyFile};
use storage::thin::{PageKind, ThinOptions, ThinPool};
use storage::{Pool, PoolError};

const PAGE: usize = 4096;
const CS: u64 = 4096;

fn kind_of(page: &[u8]) -> u32 {
    u32::from_le_bytes(page[32..36].try_into().unwrap())
}

fn open(
    dir: &std::path::Path,
    meta: Vec<u8>,
    data: &FaultyFile,
) -> Result<Arc<ThinPool>, PoolError> {
    ThinPool::open_with_io(
        dir,
        Box::new(FaultyFile::from_image(DiskImage::from_bytes(&meta))),
        Box::new(FaultyFile::from_image(data.image())),
    )
}

/// A pool whose commits shadow block-map and refcount pages again and again (each
/// commit maps a new chunk into `v` and rewrites one in `w`), so freed pages are
/// reused; returns the metadata image after every commit and the final page kinds.
#[allow(clippy::type_complexity)]
fn history(dir: &std::path::Path) -> (FaultyFile, Vec<Vec<u8>>, Vec<(u64, PageKind)>) {
    let meta = FaultyFile::new();
    let data = FaultyFile::new();
    let pool = ThinPool::create_with_io(
        dir,
        ThinOptions {
            chunk_size: CS,
            capacity: 4096 * CS,
        },
        Box::new(meta.clone()),
        Box::new(data.clone()),
    )
    .unwrap();
    pool.create_volume("v", 4096 * CS).unwrap();
    pool.create_volume("w", 1024 * CS).unwrap();
    let v = pool.open_volume("v", false).unwrap();
    let w = pool.open_volume("w", false).unwrap();
    let mut images = Vec::new();
    for i in 0..24u64 {
        v.write_at(&[i as u8 + 1; PAGE], i * 170 * CS).unwrap();
        w.write_at(&[i as u8 + 1; PAGE], (i % 3) * CS).unwrap();
        pool.snapshot("w", &format!("w@{i}")).unwrap();
        if i >= 2 {
            pool.remove_volume(&format!("w@{}", i - 2)).unwrap();
        }
        pool.commit().unwrap();
        images.push(meta.image().to_bytes());
    }
    // Commits that change refcounts and the catalogue only: their pages take each
    // other's places.
    for i in 24..40u64 {
        pool.snapshot("w", &format!("w@{i}")).unwrap();
        pool.remove_volume(&format!("w@{}", i - 2)).unwrap();
        pool.commit().unwrap();
        images.push(meta.image().to_bytes());
    }
    let pages = pool
        .metadata_pages()
        .unwrap()
        .into_iter()
        .map(|(p, k)| (p.0, k))
        .collect();
    drop((v, w));
    drop(pool);
    (data, images, pages)
}

#[test]
fn a_lost_metadata_write_is_found_on_read_and_by_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (data, images, pages) = history(dir.path());
    let now = images.last().unwrap().clone();
    assert!(open(dir.path(), now.clone(), &data)
        .unwrap()
        .verify()
        .unwrap()
        .is_clean());

    // Every page in use now that an earlier commit wrote with other content of the same
    // kind: putting that image back is the lost write of its latest image.
    let mut tried: BTreeMap<PageKind, usize> = BTreeMap::new();
    for &(p, kind) in &pages {
        let at = p as usize * PAGE;
        let cur = &now[at..at + PAGE];
        let Some(old) = images
            .iter()
            .rev()
            .filter_map(|img| img.get(at..at + PAGE))
            .find(|old| *old != cur && kind_of(old) == kind_of(cur) && old.iter().any(|&b| b != 0))
        else {
            continue;
        };
        if kind == PageKind::Superblock {
            continue; // an older superblock is an older commit, not damage
        }
        *tried.entry(kind).or_default() += 1;
        let mut stale = now.clone();
        stale[at..at + PAGE].copy_from_slice(old);
        let what = format!("metadata page {p} ({kind:?}) is stale");
        let pool = match open(dir.path(), stale, &data) {
            Err(e) => {
                // The catalogue is read at open.
                let e = e.to_string();
                assert!(
                    e.contains(&what) && e.contains("lost write"),
                    "page {p}: {e}"
                );
                continue;
            }
            Ok(pool) => pool,
        };
        let report = pool.verify().unwrap();
        let found = report
            .errors
            .iter()
            .find(|e| e.contains(&what))
            .unwrap_or_else(|| panic!("page {p} ({kind:?}) not reported: {report:?}"));
        assert!(found.contains("lost write"), "{found}");
        assert!(found.contains("restore"), "no way out given: {found}");
        if matches!(kind, PageKind::MapLeaf | PageKind::MapInterior) {
            // The report names the volume, and reading it fails where the map is stale
            // instead of returning the old mapping's bytes.
            assert!(
                found.starts_with("volume v:") || found.starts_with("volume w"),
                "{found}"
            );
            let key = found[7..].split(':').next().unwrap();
            let vol = pool.open_volume(key, true).unwrap();
            let mut buf = vec![0u8; vol.size() as usize];
            let e = vol.read_at(&mut buf, 0).unwrap_err().to_string();
            assert!(
                e.contains(key) && e.contains(&what) && e.contains("pool verify"),
                "{e}"
            );
        }
    }
    eprintln!("stale pages tried: {tried:?}");
    for kind in [PageKind::MapLeaf, PageKind::DataRcLeaf, PageKind::Catalogue] {
        assert!(
            tried.get(&kind).copied().unwrap_or(0) > 0,
            "no reused {kind:?} page to test: {tried:?}"
        );
    }
}

/// A pool written before lost-write detection (format 1) is refused at open with the
/// way out, not reported as damage or as "no pool".
#[test]
fn a_format_1_pool_is_refused_with_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let (data, images, _) = history(dir.path());
    let mut meta = images.last().unwrap().clone();
    for slot in 0..2u64 {
        let page = &mut meta[slot as usize * PAGE..(slot as usize + 1) * PAGE];
        page[36..40].copy_from_slice(&1u32.to_le_bytes());
        page[52..60].fill(0);
        // The checksum as format 1 keyed it (kind and page number).
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(b"qubes-thin-page1");
        key[16..20].copy_from_slice(&(PageKind::Superblock as u32).to_le_bytes());
        key[20..28].copy_from_slice(&slot.to_le_bytes());
        let sum = *blake3::keyed_hash(&key, &page[32..]).as_bytes();
        page[..32].copy_from_slice(&sum);
    }
    let Err(e) = open(dir.path(), meta, &data) else {
        panic!("a format-1 pool opened");
    };
    assert!(matches!(e, PoolError::OldFormat { .. }), "{e:?}");
    let e = e.to_string();
    assert!(
        e.contains("format 1") && e.contains("volume export") && e.contains("pool init"),
        "{e}"
    );
}
