// The body of storage/tests/conformance.rs (shared with tests/lvm_thin.rs, which runs it inside a VM):
// the checks, written once against `&dyn Pool`; the test modules are in storage/tests/conformance.rs.

use super::backends;

use backends::Backend;
use storage::{BlockDevice, BlockErrorKind, Extent, ImportOptions, Pool, PoolError};

pub fn cs(pool: &dyn Pool) -> u64 {
    pool.info().unwrap().chunk_size
}

pub fn read(dev: &dyn BlockDevice, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xeeu8; len];
    dev.read_at(&mut buf, offset).unwrap();
    buf
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).rotate_left(seed as u32) as u8 ^ seed)
        .collect()
}

/// The extents cover `[offset, ...)` in order without gaps, starting at `offset`.
pub fn check_extents(ext: &[Extent], offset: u64, length: u64) {
    assert!(
        !ext.is_empty(),
        "block_status must cover at least the first byte"
    );
    assert_eq!(ext[0].offset, offset);
    for w in ext.windows(2) {
        assert_eq!(w[0].offset + w[0].length, w[1].offset, "{ext:?}");
    }
    let last = ext.last().unwrap();
    assert!(last.offset + last.length <= offset + length, "{ext:?}");
    for e in ext {
        assert!(e.length > 0);
        assert!(!e.hole || e.zero, "a hole reads as zeros: {e:?}");
    }
}

pub fn hole_at(dev: &dyn BlockDevice, offset: u64, length: u64) -> bool {
    let ext = dev.block_status(offset, length).unwrap();
    check_extents(&ext, offset, length);
    ext[0].hole && ext[0].length >= length.min(ext[0].length)
}

pub fn new_volume_reads_zeros_and_maps_nothing(b: &mut dyn Backend) {
    let p = b.pool();
    p.create_volume("q/v", 64 << 20).unwrap();
    assert!(p.exists("q/v").unwrap());
    assert!(!p.exists("q/w").unwrap());
    let info = p.volume("q/v").unwrap();
    assert_eq!(
        (info.key.as_str(), info.size, info.mapped),
        ("q/v", 64 << 20, 0)
    );
    assert!(info.attrs.is_empty());
    let dev = p.open_volume("q/v", false).unwrap();
    assert_eq!(dev.size(), 64 << 20);
    assert_eq!(dev.name(), "q/v");
    assert!(read(&*dev, 12345, 100_000).iter().all(|&b| b == 0));
    let ext = dev.block_status(0, 64 << 20).unwrap();
    check_extents(&ext, 0, 64 << 20);
    assert!(ext.iter().all(|e| e.hole && e.zero), "{ext:?}");
    assert!(matches!(
        p.create_volume("q/v", 1),
        Err(PoolError::VolumeExists(_))
    ));
    for bad in ["/abs", "a//b", "a/../b", "a b"] {
        assert!(
            matches!(
                p.create_volume(bad, 4096),
                Err(PoolError::BadVolumeKey { .. })
            ),
            "{bad}"
        );
    }
    assert!(matches!(p.volume("nope"), Err(PoolError::NoSuchVolume(_))));
    assert!(
        matches!(p.open_volume("nope", true), Err(PoolError::NoSuchVolume(_)))
            .then_some(())
            .is_some()
    );
}

pub fn unaligned_writes_round_trip(b: &mut dyn Backend) {
    let p = b.pool();
    let c = cs(&*p);
    p.create_volume("v", 16 * c).unwrap();
    let dev = p.open_volume("v", false).unwrap();
    let data = pattern((3 * c + 777) as usize, 3);
    dev.write_at(&data, c / 2 + 13).unwrap();
    assert_eq!(read(&*dev, c / 2 + 13, data.len()), data);
    // Bytes around the write are still zero.
    assert_eq!(
        read(&*dev, 0, (c / 2 + 13) as usize),
        vec![0; (c / 2 + 13) as usize]
    );
    assert_eq!(
        read(&*dev, c / 2 + 13 + data.len() as u64, 100),
        vec![0; 100]
    );
    // An overwrite in the middle of a chunk keeps the rest of it.
    dev.write_at(b"XY", c).unwrap();
    let mut expect = data.clone();
    let at = (c - (c / 2 + 13)) as usize;
    expect[at..at + 2].copy_from_slice(b"XY");
    assert_eq!(read(&*dev, c / 2 + 13, data.len()), expect);
    assert!(p.volume("v").unwrap().mapped >= 3 * c);
    // The last byte of the volume is writable; one past it is not.
    dev.write_at(&[9], 16 * c - 1).unwrap();
    let e = dev.write_at(&[9, 9], 16 * c - 1).unwrap_err();
    assert_eq!(e.kind, BlockErrorKind::OutOfRange);
    let mut buf = [0u8; 2];
    assert_eq!(
        dev.read_at(&mut buf, 16 * c - 1).unwrap_err().kind,
        BlockErrorKind::OutOfRange
    );
    assert_eq!(
        dev.read_at(&mut buf, u64::MAX - 1).unwrap_err().kind,
        BlockErrorKind::OutOfRange
    );
}

pub fn snapshots_are_independent(b: &mut dyn Backend) {
    let p = b.pool();
    let c = cs(&*p);
    p.create_volume("a", 8 * c).unwrap();
    p.set_volume_attr("a", "k", Some("v")).unwrap();
    let a = p.open_volume("a", false).unwrap();
    let base = pattern((4 * c) as usize, 1);
    a.write_at(&base, 0).unwrap();
    // Not flushed nor committed: the snapshot still sees it.
    p.snapshot("a", "b").unwrap();
    let bdev = p.open_volume("b", false).unwrap();
    assert_eq!(read(&*bdev, 0, base.len()), base);
    assert!(
        p.volume("b").unwrap().attrs.is_empty(),
        "attributes are not copied"
    );
    assert_eq!(p.volume("b").unwrap().size, 8 * c);
    a.write_at(b"after-a", 10).unwrap();
    bdev.write_at(b"after-b", c + 10).unwrap();
    assert_eq!(read(&*bdev, 10, 7), base[10..17]);
    assert_eq!(
        read(&*a, c + 10, 7),
        base[(c + 10) as usize..(c + 17) as usize]
    );
    assert_eq!(read(&*a, 10, 7), b"after-a");
    assert_eq!(read(&*bdev, c + 10, 7), b"after-b");
    // A snapshot of a snapshot, and removing the origin keeps the copies.
    p.snapshot("b", "c").unwrap();
    drop(a);
    p.remove_volume("a").unwrap();
    let cdev = p.open_volume("c", true).unwrap();
    assert_eq!(read(&*cdev, c + 10, 7), b"after-b");
    assert_eq!(
        read(&*cdev, 2 * c, 100),
        base[(2 * c) as usize..(2 * c + 100) as usize]
    );
    assert!(matches!(
        p.snapshot("nope", "x"),
        Err(PoolError::NoSuchVolume(_))
    ));
    assert!(matches!(
        p.snapshot("b", "c"),
        Err(PoolError::VolumeExists(_))
    ));
}

pub fn remove_is_refused_while_open(b: &mut dyn Backend) {
    let p = b.pool();
    p.create_volume("v", 1 << 20).unwrap();
    let d1 = p.open_volume("v", false).unwrap();
    let d2 = p.open_volume("v", true).unwrap();
    assert!(matches!(
        p.remove_volume("v"),
        Err(PoolError::Busy { users: 2, .. })
    ));
    drop(d1);
    assert!(matches!(
        p.remove_volume("v"),
        Err(PoolError::Busy { users: 1, .. })
    ));
    drop(d2);
    p.remove_volume("v").unwrap();
    assert!(!p.exists("v").unwrap());
    assert!(matches!(
        p.remove_volume("v"),
        Err(PoolError::NoSuchVolume(_))
    ));
    // The key can be reused and the new volume is empty.
    p.create_volume("v", 1 << 20).unwrap();
    assert_eq!(p.volume("v").unwrap().mapped, 0);
}

pub fn rename_moves_and_handles_follow(b: &mut dyn Backend) {
    let p = b.pool();
    p.create_volume("x/a", 1 << 20).unwrap();
    p.create_volume("x/b", 1 << 20).unwrap();
    p.set_volume_attr("x/a", "role", Some("head")).unwrap();
    let dev = p.open_volume("x/a", false).unwrap();
    dev.write_at(b"hello", 0).unwrap();
    assert!(matches!(
        p.rename_volume("x/a", "x/b"),
        Err(PoolError::VolumeExists(_))
    ));
    p.rename_volume("x/a", "x/a@1764160000.000001").unwrap();
    assert!(!p.exists("x/a").unwrap());
    let info = p.volume("x/a@1764160000.000001").unwrap();
    assert_eq!(info.attrs.get("role").map(String::as_str), Some("head"));
    dev.write_at(b"world", 5).unwrap();
    let other = p.open_volume("x/a@1764160000.000001", true).unwrap();
    assert_eq!(read(&*other, 0, 10), b"helloworld");
    assert!(matches!(
        p.rename_volume("nope", "z"),
        Err(PoolError::NoSuchVolume(_))
    ));
    assert!(matches!(
        p.rename_volume("x/b", "../z"),
        Err(PoolError::BadVolumeKey { .. })
    ));
}

pub fn resize_grows_with_zeros_and_shrinks_only_when_asked(b: &mut dyn Backend) {
    let p = b.pool();
    let c = cs(&*p);
    p.create_volume("v", 4 * c).unwrap();
    let dev = p.open_volume("v", false).unwrap();
    dev.write_at(&vec![7u8; (4 * c) as usize], 0).unwrap();
    p.resize_volume("v", 8 * c, false).unwrap();
    assert_eq!(dev.size(), 8 * c);
    assert_eq!(read(&*dev, 4 * c - 1, 2), [7, 0]);
    let e = p.resize_volume("v", c + 100, false).unwrap_err();
    assert!(
        matches!(e, PoolError::ShrinkRefused { from, to, .. } if from == 8 * c && to == c + 100),
        "{e}"
    );
    assert_eq!(p.volume("v").unwrap().size, 8 * c);
    p.resize_volume("v", c + 100, true).unwrap();
    assert_eq!(p.volume("v").unwrap().size, c + 100);
    assert_eq!(dev.size(), c + 100);
    p.resize_volume("v", 4 * c, false).unwrap();
    // What lay past the shrink point is gone for good.
    assert_eq!(read(&*dev, c + 98, 4), [7, 7, 0, 0]);
    assert!(read(&*dev, c + 100, (3 * c - 100) as usize)
        .iter()
        .all(|&b| b == 0));
}

pub fn attrs_and_meta(b: &mut dyn Backend) {
    let p = b.pool();
    p.create_volume("v", 4096).unwrap();
    p.set_volume_attr("v", "a", Some("1")).unwrap();
    p.set_volume_attr("v", "b", Some("two words")).unwrap();
    p.set_volume_attr("v", "a", None).unwrap();
    let attrs = p.volume("v").unwrap().attrs;
    assert_eq!(attrs.len(), 1);
    assert_eq!(attrs["b"], "two words");
    assert!(p
        .list_volumes()
        .unwrap()
        .iter()
        .any(|i| i.key == "v" && i.attrs == attrs));
    assert!(matches!(
        p.set_volume_attr("nope", "a", Some("1")),
        Err(PoolError::NoSuchVolume(_))
    ));

    assert_eq!(p.get_meta("qube-volumes/work").unwrap(), None);
    p.set_meta("qube-volumes/work", Some("{\"x\":1}")).unwrap();
    p.set_meta("qube-volumes/web", Some("w")).unwrap();
    p.set_meta("qube-running/work", Some("r")).unwrap();
    p.set_meta("qube-volumesX", Some("not under the prefix"))
        .unwrap();
    assert_eq!(
        p.get_meta("qube-volumes/work").unwrap().as_deref(),
        Some("{\"x\":1}")
    );
    let mut keys = p.meta_keys("qube-volumes/").unwrap();
    keys.sort();
    assert_eq!(keys, ["qube-volumes/web", "qube-volumes/work"]);
    p.set_meta("qube-volumes/web", None).unwrap();
    assert_eq!(p.meta_keys("qube-volumes/").unwrap(), ["qube-volumes/work"]);
    assert_eq!(p.meta_keys("").unwrap().len(), 3);
}

pub fn commit_is_atomic_across_a_crash(b: &mut dyn Backend) {
    let p = b.pool();
    let c = cs(&*p);
    let gen = p.info().unwrap().generation;
    p.create_volume("kept", 4 * c).unwrap();
    p.create_volume("renamed", 4 * c).unwrap();
    p.create_volume("removed", 4 * c).unwrap();
    p.set_volume_attr("kept", "a", Some("1")).unwrap();
    p.set_meta("m", Some("1")).unwrap();
    {
        let dev = p.open_volume("kept", false).unwrap();
        dev.write_at(b"committed", 0).unwrap();
    }
    p.commit().unwrap();
    assert!(p.info().unwrap().generation > gen);
    {
        // Flushed: survives even without a commit.
        let dev = p.open_volume("kept", false).unwrap();
        dev.write_at(b"flushed", c).unwrap();
        dev.flush().unwrap();
    }
    // Staged after the commit: lost at the crash.
    p.create_volume("staged", 4 * c).unwrap();
    p.snapshot("kept", "snap").unwrap();
    p.rename_volume("renamed", "renamed2").unwrap();
    p.remove_volume("removed").unwrap();
    p.resize_volume("kept", 8 * c, false).unwrap();
    p.set_volume_attr("kept", "a", Some("2")).unwrap();
    p.set_meta("m", Some("2")).unwrap();
    p.set_meta("n", Some("new")).unwrap();
    drop(p);
    let p = b.crash();
    let mut keys: Vec<String> = p
        .list_volumes()
        .unwrap()
        .into_iter()
        .map(|i| i.key)
        .collect();
    keys.sort();
    if !b.transactional() {
        // Every operation was durable when it returned (rbd): all of it survives.
        assert_eq!(keys, ["kept", "renamed2", "snap", "staged"]);
        let kept = p.volume("kept").unwrap();
        assert_eq!(kept.size, 8 * c);
        assert_eq!(kept.attrs.get("a").map(String::as_str), Some("2"));
        assert_eq!(p.get_meta("m").unwrap().as_deref(), Some("2"));
        assert_eq!(p.get_meta("n").unwrap().as_deref(), Some("new"));
        let dev = p.open_volume("snap", true).unwrap();
        assert_eq!(read(&*dev, 0, 9), b"committed");
        assert_eq!(read(&*dev, c, 7), b"flushed");
        drop(dev);
        assert!(p.verify().unwrap().is_clean());
        return;
    }
    assert_eq!(keys, ["kept", "removed", "renamed"]);
    let kept = p.volume("kept").unwrap();
    assert_eq!(kept.size, 4 * c);
    assert_eq!(kept.attrs.get("a").map(String::as_str), Some("1"));
    assert_eq!(p.get_meta("m").unwrap().as_deref(), Some("1"));
    assert_eq!(p.get_meta("n").unwrap(), None);
    let dev = p.open_volume("kept", true).unwrap();
    assert_eq!(read(&*dev, 0, 9), b"committed");
    assert_eq!(read(&*dev, c, 7), b"flushed");
    drop(dev);
    let report = p.verify().unwrap();
    assert!(report.is_clean(), "{report:?}");
    // The pool works on after the crash.
    p.create_volume("staged", 4 * c).unwrap();
    p.commit().unwrap();
}

/// A guest's FLUSH on one volume must not make the volume model's half-done transaction
/// (staged renames, catalogue edits) durable: a transaction holds `Pool::batch` while it
/// stages, and a flush from another thread either commits only its data (mem, reflink) or
/// waits for the batch (thin, whose flush commits the pool).
pub fn flush_leaves_staged_catalogue_changes_staged(b: &mut dyn Backend) {
    let p = b.pool();
    p.create_volume("a", 1 << 20).unwrap();
    p.create_volume("head", 1 << 20).unwrap();
    p.commit().unwrap();
    let dev = p.open_volume("a", false).unwrap();
    {
        let _batch = p.batch();
        // Half of a stop: the head has become a revision, the running snapshot not yet the head.
        p.rename_volume("head", "head@1764160000.000001").unwrap();
        p.set_meta("qube-running/x", Some("1")).unwrap();
        let guest = std::thread::spawn(move || {
            dev.write_at(b"guest", 0).unwrap();
            dev.flush().unwrap();
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        // The transaction fails and is undone before anything of it is committed.
        p.rename_volume("head@1764160000.000001", "head").unwrap();
        p.set_meta("qube-running/x", None).unwrap();
        drop(_batch);
        guest.join().unwrap();
    }
    drop(p);
    let p = b.crash();
    assert!(
        p.exists("head").unwrap(),
        "a flush committed a staged rename"
    );
    assert!(!p.exists("head@1764160000.000001").unwrap());
    assert_eq!(p.get_meta("qube-running/x").unwrap(), None);
    assert_eq!(read(&*p.open_volume("a", true).unwrap(), 0, 5), b"guest");
}

pub fn read_only_handles_refuse_every_write(b: &mut dyn Backend) {
    let p = b.pool();
    p.create_volume("v", 1 << 20).unwrap();
    let dev = p.open_volume("v", true).unwrap();
    assert!(dev.read_only());
    assert_eq!(
        dev.write_at(b"x", 0).unwrap_err().kind,
        BlockErrorKind::ReadOnly
    );
    assert_eq!(
        dev.discard(0, 1 << 20).unwrap_err().kind,
        BlockErrorKind::ReadOnly
    );
    assert_eq!(
        dev.write_zeroes(0, 4096, true).unwrap_err().kind,
        BlockErrorKind::ReadOnly
    );
    assert_eq!(dev.write_at(b"x", 0).unwrap_err().errno(), libc::EPERM);
    assert_eq!(p.volume("v").unwrap().mapped, 0);
    assert!(!p.open_volume("v", false).unwrap().read_only());
}

pub fn discard_unmaps_whole_chunks_only(b: &mut dyn Backend) {
    let p = b.pool();
    let c = cs(&*p);
    p.create_volume("v", 8 * c).unwrap();
    let dev = p.open_volume("v", false).unwrap();
    let data = pattern((4 * c) as usize, 5);
    dev.write_at(&data, 0).unwrap();
    let before = p.volume("v").unwrap().mapped;
    dev.discard(c / 2, 2 * c).unwrap();
    assert_eq!(
        read(&*dev, 0, c as usize),
        data[..c as usize],
        "partial chunk at the start kept"
    );
    assert!(
        read(&*dev, c, c as usize).iter().all(|&b| b == 0),
        "whole chunk discarded"
    );
    assert_eq!(
        read(&*dev, 2 * c, (2 * c) as usize),
        data[(2 * c) as usize..],
        "partial chunk at the end kept"
    );
    assert!(hole_at(&*dev, c, c));
    assert!(p.volume("v").unwrap().mapped < before);
    dev.discard(0, 8 * c).unwrap();
    assert_eq!(p.volume("v").unwrap().mapped, 0);
    assert!(read(&*dev, 0, (4 * c) as usize).iter().all(|&b| b == 0));
    assert_eq!(
        dev.discard(7 * c, 2 * c).unwrap_err().kind,
        BlockErrorKind::OutOfRange
    );
}

pub fn write_zeroes_reads_zeros(b: &mut dyn Backend) {
    let p = b.pool();
    let c = cs(&*p);
    p.create_volume("v", 8 * c).unwrap();
    let dev = p.open_volume("v", false).unwrap();
    let data = pattern((6 * c) as usize, 9);
    dev.write_at(&data, 0).unwrap();
    dev.write_zeroes(c / 2, 2 * c, true).unwrap();
    assert!(read(&*dev, c / 2, (2 * c) as usize).iter().all(|&b| b == 0));
    assert_eq!(read(&*dev, 0, (c / 2) as usize), data[..(c / 2) as usize]);
    assert_eq!(
        read(&*dev, c / 2 + 2 * c, 10),
        data[(c / 2 + 2 * c) as usize..(c / 2 + 2 * c + 10) as usize]
    );
    assert!(
        hole_at(&*dev, c, c),
        "a whole chunk zeroed with may_unmap is unmapped"
    );
    dev.write_zeroes(3 * c, 2 * c + 1, false).unwrap();
    assert!(read(&*dev, 3 * c, (2 * c + 1) as usize)
        .iter()
        .all(|&b| b == 0));
    assert_eq!(
        read(&*dev, 5 * c + 1, 10),
        data[(5 * c + 1) as usize..(5 * c + 11) as usize]
    );
    // Zeroing what was never written costs nothing and reads zeros.
    dev.write_zeroes(7 * c, c, true).unwrap();
    assert!(hole_at(&*dev, 7 * c, c));
}

pub fn block_status_reports_data_and_holes(b: &mut dyn Backend) {
    let p = b.pool();
    let c = cs(&*p);
    p.create_volume("v", 16 * c).unwrap();
    let dev = p.open_volume("v", false).unwrap();
    dev.write_at(&vec![1u8; (2 * c) as usize], 4 * c).unwrap();
    dev.write_at(&[1u8], 10 * c + 5).unwrap();
    let ext = dev.block_status(0, 16 * c).unwrap();
    check_extents(&ext, 0, 16 * c);
    let status_of = |off: u64| {
        ext.iter()
            .find(|e| e.offset <= off && off < e.offset + e.length)
            .map(|e| e.hole)
    };
    assert_eq!(status_of(0), Some(true));
    assert_eq!(status_of(4 * c), Some(false));
    assert_eq!(status_of(6 * c - 1), Some(false));
    if let Some(h) = status_of(7 * c) {
        assert!(h);
    }
    // A query starting inside data, and one for a single byte.
    let ext = dev.block_status(5 * c + 3, c).unwrap();
    check_extents(&ext, 5 * c + 3, c);
    assert!(!ext[0].hole && !ext[0].zero);
    let ext = dev.block_status(10 * c + 5, 1).unwrap();
    assert_eq!(
        ext,
        [Extent {
            offset: 10 * c + 5,
            length: 1,
            hole: false,
            zero: false
        }]
    );
    assert_eq!(
        dev.block_status(15 * c, 2 * c).unwrap_err().kind,
        BlockErrorKind::OutOfRange
    );
}

pub fn import_skips_zeros_dedups_and_fingerprints(b: &mut dyn Backend) {
    let p = b.pool();
    let block = 64 * 1024;
    // Chunks: data A, zeros, data A again, data B, then a short tail; the rest of the
    // volume beyond the image reads as zeros.
    let a = pattern(block, 1);
    let bb = pattern(block, 2);
    let mut image = Vec::new();
    image.extend_from_slice(&a);
    image.extend_from_slice(&vec![0; block]);
    image.extend_from_slice(&a);
    image.extend_from_slice(&bb);
    image.extend_from_slice(b"tail");
    let size = 2 << 20;
    let opts = ImportOptions {
        dedup: true,
        dedup_against: None,
    };
    let stats = p
        .import_volume("img", &mut &image[..], size, &opts)
        .unwrap();
    let mut full = image.clone();
    full.resize(size as usize, 0);
    let want = blake3::hash(&full).to_hex().to_string();
    assert_eq!(stats.fingerprint, want);
    assert!(stats.zero_chunks >= 1);
    if b.dedups_within_image() {
        assert!(stats.dedup_chunks >= 1, "{stats:?}");
    }
    assert_eq!(p.fingerprint("img").unwrap(), want);
    let dev = p.open_volume("img", true).unwrap();
    assert_eq!(read(&*dev, 0, full.len()), full);
    assert!(p.volume("img").unwrap().mapped < size);
    // Against an older version: unchanged chunks are shared, the bytes are the new ones.
    let mut v2 = full.clone();
    v2[3 * block + 1] ^= 0xff;
    let opts = ImportOptions {
        dedup: true,
        dedup_against: Some("img".into()),
    };
    let s2 = p.import_volume("img2", &mut &v2[..], size, &opts).unwrap();
    if b.dedups_against_older() {
        assert!(s2.dedup_chunks >= 1, "unchanged chunks are shared: {s2:?}");
    }
    assert_eq!(s2.fingerprint, blake3::hash(&v2).to_hex().to_string());
    assert_eq!(
        read(&*p.open_volume("img2", true).unwrap(), 0, v2.len()),
        v2
    );
    assert!(matches!(
        p.import_volume("img", &mut &image[..], size, &opts),
        Err(PoolError::VolumeExists(_))
    ));
    // Without dedup, a longer image is cut at the volume size.
    let s3 = p
        .import_volume("img3", &mut &full[..], 100_000, &ImportOptions::default())
        .unwrap();
    assert_eq!(
        s3.fingerprint,
        blake3::hash(&full[..100_000]).to_hex().to_string()
    );
    assert_eq!(p.volume("img3").unwrap().size, 100_000);
}

struct FailingReader(usize);

impl std::io::Read for FailingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0 == 0 {
            return Err(std::io::Error::other("disk unplugged"));
        }
        let n = buf.len().min(self.0);
        buf[..n].fill(0x5a);
        self.0 -= n;
        Ok(n)
    }
}

pub fn failed_import_creates_nothing(b: &mut dyn Backend) {
    let p = b.pool();
    let e = p
        .import_volume(
            "bad",
            &mut FailingReader(300_000),
            4 << 20,
            &ImportOptions::default(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("disk unplugged"), "{e}");
    assert!(!p.exists("bad").unwrap());
    p.commit().unwrap();
    let report = p.verify().unwrap();
    assert!(report.is_clean(), "{report:?}");
}

pub fn concurrent_writers_on_several_volumes(b: &mut dyn Backend) {
    let p = b.pool();
    let c = cs(&*p);
    p.create_volume("base", 32 * c).unwrap();
    p.open_volume("base", false)
        .unwrap()
        .write_at(&pattern((32 * c) as usize, 7), 0)
        .unwrap();
    for i in 0..4 {
        p.snapshot("base", &format!("s{i}")).unwrap();
    }
    std::thread::scope(|s| {
        for i in 0..4u8 {
            let p = p.clone();
            s.spawn(move || {
                let dev = p.open_volume(&format!("s{i}"), false).unwrap();
                for k in 0..32u64 {
                    dev.write_at(&[i; 100], k * c + u64::from(i) * 100).unwrap();
                }
                dev.flush().unwrap();
            });
        }
    });
    let base = p.open_volume("base", true).unwrap();
    let orig = pattern((32 * c) as usize, 7);
    assert_eq!(read(&*base, 0, orig.len()), orig);
    for i in 0..4u8 {
        let dev = p.open_volume(&format!("s{i}"), true).unwrap();
        for k in 0..32u64 {
            assert_eq!(read(&*dev, k * c + u64::from(i) * 100, 100), [i; 100]);
        }
    }
    p.commit().unwrap();
    let report = p.verify().unwrap();
    assert!(report.is_clean(), "{report:?}");
}

pub fn info_counts_volumes_and_commits(b: &mut dyn Backend) {
    let p = b.pool();
    let i0 = p.info().unwrap();
    assert_eq!(i0.driver, p.driver());
    assert!(i0.chunk_size.is_power_of_two());
    p.create_volume("a", 1 << 20).unwrap();
    p.create_volume("b", 1 << 20).unwrap();
    p.commit().unwrap();
    let i1 = p.info().unwrap();
    assert_eq!(i1.volumes, i0.volumes + 2);
    assert!(i1.generation > i0.generation);
    let report = p.verify().unwrap();
    assert!(
        report.is_clean() && report.volumes == i1.volumes,
        "{report:?}"
    );
}

/// ENOSPC for backends built with a small capacity.
pub fn pool_full_is_a_clean_error(b: &mut dyn Backend, capacity: u64) {
    let p = b.pool();
    let c = cs(&*p);
    p.create_volume("v", capacity * 4).unwrap();
    p.commit().unwrap();
    let dev = p.open_volume("v", false).unwrap();
    let mut err = None;
    let mut off = 0;
    while off < capacity * 4 {
        if let Err(e) = dev.write_at(&vec![1u8; c as usize], off) {
            err = Some(e);
            break;
        }
        off += c;
    }
    let e = err.expect("writing past the capacity fails");
    assert_eq!(e.kind, BlockErrorKind::NoSpace);
    assert_eq!(e.errno(), libc::ENOSPC);
    // Metadata is consistent and space comes back after a discard.
    assert!(p.verify().unwrap().errors.is_empty());
    dev.discard(0, off).unwrap();
    drop(dev);
    p.commit().unwrap();
    let dev = p.open_volume("v", false).unwrap();
    dev.write_at(&vec![2u8; c as usize], off).unwrap();
    assert_eq!(read(&*dev, off, 4), [2; 4]);
}
