//! A data write that fails (EIO from the data file) must leave every byte the guest did
//! not ask to overwrite as it was, even after the next FLUSH commits: dm-thin's order,
//! data first and the mapping after it succeeded.

use std::sync::Arc;

use storage::io::{DiskImage, Faults, FaultyFile};
use storage::thin::{ThinOptions, ThinPool};
use storage::{BlockDevice, Pool};

const CS: u64 = 64 << 10;
const SUB: u64 = 4096;

fn pat(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(seed | 1).wrapping_add(seed) | 1)
        .collect()
}

struct Rig {
    _dir: tempfile::TempDir,
    pool: Arc<ThinPool>,
    meta: FaultyFile,
    data: FaultyFile,
}

/// A pool whose data file fails on demand; the metadata file never fails.
fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let meta = FaultyFile::with_faults(DiskImage::default(), Faults::new());
    let data = FaultyFile::with_faults(DiskImage::default(), Faults::new());
    let pool = ThinPool::create_with_io(
        dir.path(),
        ThinOptions {
            chunk_size: CS,
            capacity: 64 * CS,
        },
        Box::new(meta.clone()),
        Box::new(data.clone()),
    )
    .unwrap();
    Rig {
        _dir: dir,
        pool,
        meta,
        data,
    }
}

fn read_all(v: &dyn BlockDevice) -> Vec<u8> {
    let mut b = vec![0u8; v.size() as usize];
    v.read_at(&mut b, 0).unwrap();
    b
}

/// Flushes, checks `want` in the live pool and after a power cut and reopen.
fn check_after_flush(r: Rig, vols: &[(&str, &[u8])]) {
    let a = r.pool.open_volume(vols[0].0, false).unwrap();
    a.flush().unwrap();
    drop(a);
    for (k, want) in vols {
        let v = r.pool.open_volume(k, true).unwrap();
        let got = read_all(&*v);
        let bad = got.iter().zip(want.iter()).position(|(x, y)| x != y);
        assert!(
            bad.is_none(),
            "{k}: bytes changed by a failed write from {bad:?}"
        );
    }
    let rep = r.pool.verify().unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    let (mimg, dimg) = (r.meta.power_cut(), r.data.power_cut());
    drop(r.pool);
    let dir = tempfile::tempdir().unwrap();
    let pool = ThinPool::open_with_io(
        dir.path(),
        Box::new(FaultyFile::from_image(mimg)),
        Box::new(FaultyFile::from_image(dimg)),
    )
    .unwrap();
    for (k, want) in vols {
        let v = pool.open_volume(k, true).unwrap();
        assert!(
            read_all(&*v) == *want,
            "{k}: bytes changed by a failed write (after reopen)"
        );
    }
    assert!(pool.verify().unwrap().is_clean());
}

#[test]
fn failed_copy_of_shared_chunk_keeps_untouched_bytes() {
    let r = rig();
    r.pool.create_volume("a", 2 * CS).unwrap();
    let a = r.pool.open_volume("a", false).unwrap();
    let old = pat(3, 2 * CS as usize);
    a.write_at(&old, 0).unwrap();
    a.flush().unwrap();
    r.pool.snapshot("a", "s").unwrap();
    // A partial sub-block write into the shared chunk: copy-on-write of sub-block 0
    // (read, overlay, write) on a fresh chunk; its data write fails.
    r.data.fail_after(0);
    assert!(a.write_at(&[0xEE; 512], 100).is_err());
    r.data.faults().clear();
    assert_eq!(read_all(&*a), old, "before FLUSH");
    drop(a);
    check_after_flush(r, &[("a", &old), ("s", &old)]);
}

#[test]
fn failed_move_of_shared_overlay_keeps_earlier_sub_blocks() {
    let r = rig();
    r.pool.create_volume("a", CS).unwrap();
    let a = r.pool.open_volume("a", false).unwrap();
    let mut want = pat(5, CS as usize);
    a.write_at(&want, 0).unwrap();
    a.flush().unwrap();
    r.pool.snapshot("a", "s").unwrap();
    // Sub-block 2 goes to an overlay chunk of `a` (backed by the shared one)...
    let sub2 = pat(9, SUB as usize);
    a.write_at(&sub2, 2 * SUB).unwrap();
    want[2 * SUB as usize..3 * SUB as usize].copy_from_slice(&sub2);
    a.flush().unwrap();
    // ...which a second snapshot shares: a partial write into sub-block 5 moves the valid
    // sub-block 2 to a new chunk and copies sub-block 5; the copies fail.
    r.pool.snapshot("a", "s2").unwrap();
    r.data.fail_after(0);
    assert!(a.write_at(&[0xEE; 100], 5 * SUB + 7).is_err());
    r.data.faults().clear();
    assert_eq!(read_all(&*a), want, "before FLUSH");
    drop(a);
    let old = pat(5, CS as usize);
    check_after_flush(r, &[("a", &want), ("s", &old), ("s2", &want)]);
}

#[test]
fn failed_write_to_a_fresh_chunk_maps_and_leaks_nothing() {
    let r = rig();
    r.pool.create_volume("a", 4 * CS).unwrap();
    let a = r.pool.open_volume("a", false).unwrap();
    a.write_at(&pat(1, CS as usize), 0).unwrap();
    a.flush().unwrap();
    let used = r.pool.info().unwrap().data_used;
    r.data.fail_after(0);
    assert!(a.write_at(&pat(2, 3 * CS as usize), CS).is_err());
    r.data.faults().clear();
    let st = a.block_status(CS, 3 * CS).unwrap();
    assert!(st.iter().all(|e| e.hole), "{st:?}");
    a.flush().unwrap();
    assert_eq!(r.pool.info().unwrap().data_used, used);
    assert_eq!(r.pool.volume("a").unwrap().mapped, CS);
    // The pool keeps working, and the freed chunks are reused.
    a.write_at(&pat(4, 3 * CS as usize), CS).unwrap();
    let mut want = pat(1, CS as usize);
    want.extend(pat(4, 3 * CS as usize));
    drop(a);
    check_after_flush(r, &[("a", &want)]);
}
