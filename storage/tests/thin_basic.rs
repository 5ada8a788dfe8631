//! Behaviour of the thin pool through the `Pool` and `BlockDevice` traits on real files.

use std::sync::Arc;

use storage::thin::{ThinOptions, ThinPool};
use storage::{BlockErrorKind, ImportOptions, Pool, PoolError};

fn pool(dir: &std::path::Path, chunk: u64, cap: u64) -> Arc<ThinPool> {
    ThinPool::create(
        dir,
        ThinOptions {
            chunk_size: chunk,
            capacity: cap,
        },
    )
    .unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

#[test]
fn write_snapshot_commit_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path(), 64 << 10, 64 << 20);
    p.create_volume("a", 4 << 20).unwrap();
    let a = p.open_volume("a", false).unwrap();
    let d1 = pattern(1, 256 << 10);
    a.write_at(&d1, 100 << 10).unwrap();
    p.snapshot("a", "s").unwrap();
    let d2 = pattern(2, 4096);
    a.write_at(&d2, 128 << 10).unwrap();
    a.write_at(&d2[..512], 300 << 10).unwrap();
    let s = p.open_volume("s", false).unwrap();
    let mut buf = vec![0u8; 256 << 10];
    s.read_at(&mut buf, 100 << 10).unwrap();
    assert!(buf == d1, "snapshot keeps the old content");
    a.read_at(&mut buf, 100 << 10).unwrap();
    let mut want = d1.clone();
    want[28 << 10..(28 << 10) + 4096].copy_from_slice(&d2);
    want[200 << 10..(200 << 10) + 512].copy_from_slice(&d2[..512]);
    assert!(buf == want);
    // A 4 KiB write into a shared 64 KiB chunk costs one new chunk, not a copy of 64 KiB.
    let info = p.info().unwrap();
    assert_eq!(info.data_used, (5 + 2) * (64 << 10), "{info:?}");
    a.flush().unwrap();
    let r = p.verify().unwrap();
    assert!(r.is_clean(), "{r:?}");
    drop((a, s));
    assert!(matches!(
        ThinPool::open(dir.path()),
        Err(PoolError::Locked { .. })
    ));
    drop(p);
    let p = ThinPool::open(dir.path()).unwrap();
    let a = p.open_volume("a", true).unwrap();
    a.read_at(&mut buf, 100 << 10).unwrap();
    assert!(buf == want);
    assert_eq!(
        a.write_at(&d2, 0).unwrap_err().kind,
        BlockErrorKind::ReadOnly
    );
    assert!(matches!(
        p.remove_volume("a"),
        Err(PoolError::Busy { users: 1, .. })
    ));
    p.rename_volume("a", "b").unwrap();
    let mut small = vec![0u8; 4096];
    a.read_at(&mut small, 128 << 10).unwrap();
    assert!(small == d2, "handles follow renames");
    drop(a);
    p.remove_volume("b").unwrap();
    p.commit().unwrap();
    let r = p.verify().unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(p.info().unwrap().data_used, 5 * (64 << 10));
    let again = ThinPool::create(
        dir.path(),
        ThinOptions {
            chunk_size: 4096,
            capacity: 1 << 20,
        },
    );
    assert!(again.is_err(), "create refuses an existing pool");
}

#[test]
fn discard_zeroes_status_resize_meta() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path(), 4096, 16 << 20);
    p.create_volume("v", 1 << 20).unwrap();
    let v = p.open_volume("v", false).unwrap();
    v.write_at(&pattern(3, 64 << 10), 0).unwrap();
    v.discard(1000, 8192 + 3096).unwrap(); // whole chunks 1 and 2
    let st = v.block_status(0, 1 << 20).unwrap();
    assert_eq!(st[0].offset, 0);
    assert_eq!((st[0].length, st[0].hole), (4096, false));
    assert_eq!((st[1].offset, st[1].length, st[1].hole), (4096, 8192, true));
    v.write_zeroes(100, 20000, true).unwrap();
    let mut buf = vec![1u8; 20000];
    v.read_at(&mut buf, 100).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let mut b = [0u8; 100];
    v.read_at(&mut b, 0).unwrap();
    assert_eq!(&b[..], &pattern(3, 100)[..]);
    assert!(matches!(
        p.resize_volume("v", 4096, false),
        Err(PoolError::ShrinkRefused { .. })
    ));
    drop(v);
    p.resize_volume("v", 6000, true).unwrap();
    p.resize_volume("v", 100 << 20, false).unwrap();
    let v = p.open_volume("v", false).unwrap();
    let mut buf = vec![1u8; 8192];
    v.read_at(&mut buf, 0).unwrap();
    assert!(buf[..100] == pattern(3, 100)[..]);
    assert!(
        buf[100..].iter().all(|&b| b == 0),
        "bytes past a shrink read zero after growing"
    );
    v.write_at(&[9u8; 4096], 99 << 20).unwrap();
    p.set_meta("qube/work", Some("{}")).unwrap();
    p.set_volume_attr("v", "k", Some("x")).unwrap();
    p.commit().unwrap();
    assert_eq!(p.meta_keys("qube/").unwrap(), vec!["qube/work".to_string()]);
    assert_eq!(p.volume("v").unwrap().attrs["k"], "x");
    let r = p.verify().unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(
        v.read_at(&mut buf, (100 << 20) - 100).unwrap_err().kind,
        BlockErrorKind::OutOfRange
    );
}

#[test]
fn import_dedup_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path(), 64 << 10, 64 << 20);
    let cs = 64 << 10;
    let mut img = Vec::new();
    img.extend(pattern(1, cs));
    img.extend(vec![0u8; cs]);
    img.extend(pattern(1, cs));
    img.extend(pattern(2, cs));
    img.extend(pattern(3, 1000));
    let size = img.len() as u64;
    let st = p
        .import_volume(
            "t",
            &mut &img[..],
            size,
            &ImportOptions {
                dedup: true,
                dedup_against: None,
            },
        )
        .unwrap();
    assert_eq!(
        (st.zero_chunks, st.dedup_chunks, st.written_chunks),
        (1, 1, 3)
    );
    assert_eq!(st.fingerprint, blake3::hash(&img).to_hex().to_string());
    let v = p.open_volume("t", false).unwrap();
    let mut buf = vec![0u8; img.len()];
    v.read_at(&mut buf, 0).unwrap();
    assert!(buf == img);
    v.write_at(&[5u8; 10], 7).unwrap();
    img[7..17].fill(5);
    assert_eq!(
        p.fingerprint("t").unwrap(),
        blake3::hash(&img).to_hex().to_string()
    );
    let st2 = p
        .import_volume(
            "t2",
            &mut &img[..],
            size,
            &ImportOptions {
                dedup: true,
                dedup_against: Some("t".into()),
            },
        )
        .unwrap();
    // Chunk 0 of `t` is now a sub-chunk overlay (it was shared with chunk 2): not a dedup
    // candidate; the other two are.
    assert_eq!((st2.written_chunks, st2.dedup_chunks), (1, 3), "{st2:?}");
    p.commit().unwrap();
    let r = p.verify().unwrap();
    assert!(r.is_clean(), "{r:?}");
}

struct Failing(usize);

impl std::io::Read for Failing {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0 == 0 {
            return Err(std::io::Error::other("image source broke"));
        }
        let n = buf.len().min(self.0);
        buf[..n].fill(7);
        self.0 -= n;
        Ok(n)
    }
}

#[test]
fn import_errors_leave_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let cs = 64 << 10;
    let p = pool(dir.path(), cs, 64 * cs);
    // A short image reads as zeros past its end.
    let st = p
        .import_volume(
            "short",
            &mut &[9u8; 1000][..],
            3 * cs,
            &ImportOptions::default(),
        )
        .unwrap();
    assert_eq!((st.written_chunks, st.zero_chunks), (1, 2));
    // A failing source, and a pool too small: the volume is gone, nothing leaks.
    let e = p
        .import_volume(
            "broken",
            &mut Failing(80 << 20),
            200 << 20,
            &ImportOptions {
                dedup: true,
                dedup_against: None,
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("image source broke"), "{e}");
    let e = p
        .import_volume(
            "huge",
            &mut Failing(usize::MAX),
            100 * cs,
            &ImportOptions::default(),
        )
        .unwrap_err();
    assert!(matches!(e, PoolError::NoSpace { .. }), "{e}");
    assert!(!p.exists("broken").unwrap() && !p.exists("huge").unwrap());
    p.commit().unwrap();
    let r = p.verify().unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(p.info().unwrap().data_used, cs);
    let v = p.open_volume("short", true).unwrap();
    let mut buf = vec![1u8; 3 * cs as usize];
    v.read_at(&mut buf, 0).unwrap();
    assert!(buf[..1000].iter().all(|&b| b == 9) && buf[1000..].iter().all(|&b| b == 0));
}
