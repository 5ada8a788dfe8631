//! A thin pool whose capacity is larger than the filesystem holding it (root: a 48 MiB
//! ext4 loop mount): when the host fills, writes fail with ENOSPC (not EIO), nothing
//! already written changes, and once space is freed the same pool (not reopened) works
//! again. Freed chunks give their space back to the host.

#[path = "model_backends.rs"]
mod backends;

use std::io::Write;

use backends::LoopFs;
use storage::thin::{ThinOptions, ThinPool};
use storage::{BlockDevice, BlockErrorKind, Pool};

const MIB: u64 = 1 << 20;
const CS: u64 = 64 << 10;

fn pat(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(seed | 1).wrapping_add(seed) >> 3) as u8 | 1)
        .collect()
}

fn read(v: &dyn BlockDevice, off: u64, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    v.read_at(&mut b, off).unwrap();
    b
}

#[test]
fn full_host_filesystem_is_enospc_and_recovers() {
    let fs = LoopFs::new("ext4", 48 * MIB);
    // Something else on the host filesystem that the user can delete later.
    let filler = fs.path().join("build-cache");
    let mut f = std::fs::File::create(&filler).unwrap();
    f.write_all(&vec![0x5a; 8 * MIB as usize]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let dir = fs.path().join("pool");
    let pool = ThinPool::create(
        &dir,
        ThinOptions {
            chunk_size: CS,
            capacity: 256 * MIB,
        },
    )
    .unwrap();
    pool.create_volume("a", 200 * MIB).unwrap();
    let a = pool.open_volume("a", false).unwrap();
    let base = pat(1, 4 * MIB as usize);
    a.write_at(&base, 0).unwrap();
    a.flush().unwrap();
    pool.snapshot("a", "s").unwrap();
    assert!(pool.info().unwrap().host_free.unwrap() < 48 * MIB);

    // Fill the host: 1 MiB writes after the base until one fails.
    let mut written = Vec::new();
    let mut failed_at = None;
    for i in 4..200u64 {
        match a.write_at(&pat(i as u32, MIB as usize), i * MIB) {
            Ok(()) => written.push(i),
            Err(e) => {
                assert_eq!(e.kind, BlockErrorKind::NoSpace, "{e}");
                assert_eq!(e.errno(), libc::ENOSPC);
                failed_at = Some(i);
                break;
            }
        }
    }
    let failed_at = failed_at.expect("the 48 MiB host filesystem never filled");
    assert!(written.len() >= 8, "only {} MiB written", written.len());
    // Copy-on-write of a shared chunk needs a fresh chunk too: ENOSPC, base unchanged.
    let e = a.write_at(&[0xee; 512], 100).unwrap_err();
    assert_eq!(e.kind, BlockErrorKind::NoSpace, "{e}");
    // A FLUSH may fail (ENOSPC, never EIO) or succeed; either way nothing changes.
    if let Err(e) = a.flush() {
        assert_eq!(e.kind, BlockErrorKind::NoSpace, "{e}");
    }
    let check = |a: &dyn BlockDevice, extra: &[u64]| {
        assert!(read(a, 0, 4 * MIB) == base, "base bytes changed");
        for &i in written.iter().chain(extra) {
            assert!(
                read(a, i * MIB, MIB) == pat(i as u32, MIB as usize),
                "MiB {i} changed"
            );
        }
    };
    check(&*a, &[]);
    let s = pool.open_volume("s", true).unwrap();
    assert!(read(&*s, 0, 4 * MIB) == base);

    // Space freed on the host: the same pool works again.
    std::fs::remove_file(&filler).unwrap();
    a.write_at(&pat(failed_at as u32, MIB as usize), failed_at * MIB)
        .unwrap();
    a.write_at(&[0xee; 512], 100).unwrap();
    a.flush().unwrap();
    let mut base2 = base.clone();
    base2[100..612].fill(0xee);
    assert!(read(&*a, 0, 4 * MIB) == base2);
    for &i in written.iter().chain([failed_at].iter()) {
        assert!(read(&*a, i * MIB, MIB) == pat(i as u32, MIB as usize));
    }
    let rep = pool.verify().unwrap();
    assert!(rep.is_clean(), "{rep:?}");

    // TRIM reaches the host: discarded chunks are hole-punched once the commit is durable.
    let before = pool.info().unwrap().host_free.unwrap();
    a.discard(4 * MIB, 196 * MIB).unwrap();
    a.flush().unwrap();
    let after = pool.info().unwrap().host_free.unwrap();
    let freed = (written.len() as u64 + 1) * MIB;
    assert!(
        after >= before + freed * 3 / 4,
        "discarding {freed} bytes freed only {} on the host",
        after.saturating_sub(before)
    );
    drop((a, s));
    drop(pool);
    let pool = ThinPool::open(&dir).unwrap();
    let a = pool.open_volume("a", true).unwrap();
    assert!(read(&*a, 0, 4 * MIB) == base2);
    assert!(pool.verify().unwrap().is_clean());
}
