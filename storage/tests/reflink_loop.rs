//! What is particular to the reflink driver, on real XFS and btrfs loop mounts (root):
//! snapshots share extents, crash recovery of its files, the pool lock, the refusal of a
//! filesystem that cannot clone.

#[path = "model_backends.rs"]
mod backends;

use std::sync::Arc;

use backends::{Backend, LoopFs, Reflink};
use storage::{Pool, PoolError, ReflinkPool};

const MIB: u64 = 1 << 20;

fn fs_used(p: &dyn Pool) -> u64 {
    p.info().unwrap().data_used
}

fn snapshots_share_extents(mut b: Reflink) {
    let p = b.pool();
    p.create_volume("t/root", 256 * MIB).unwrap();
    let dev = p.open_volume("t/root", false).unwrap();
    let data: Vec<u8> = (0..64 * MIB as usize).map(|i| (i % 251) as u8).collect();
    dev.write_at(&data, 0).unwrap();
    dev.flush().unwrap();
    drop(dev);
    p.commit().unwrap();
    let before = fs_used(&*p);
    for i in 0..8 {
        p.snapshot("t/root", &format!("a{i}/root")).unwrap();
    }
    p.commit().unwrap();
    let grown = fs_used(&*p).saturating_sub(before);
    // Eight full copies would be 512 MiB; clones cost metadata only.
    assert!(grown < 16 * MIB, "8 snapshots of 64 MiB took {grown} bytes");
    let a = p.open_volume("a3/root", false).unwrap();
    a.write_at(b"private change", 0).unwrap();
    let mut buf = [0u8; 14];
    p.open_volume("t/root", true)
        .unwrap()
        .read_at(&mut buf, 0)
        .unwrap();
    assert_eq!(&buf[..], &data[..14]);
    drop(a);
    drop(p);
    let p = b.crash();
    assert_eq!(p.list_volumes().unwrap().len(), 9);
}

#[test]
fn xfs_snapshots_share_extents() {
    snapshots_share_extents(Reflink::xfs());
}

#[test]
fn btrfs_snapshots_share_extents() {
    snapshots_share_extents(Reflink::btrfs());
}

fn files_in(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("vols")).unwrap().count()
}

#[test]
fn crash_recovery_of_files() {
    let mut b = Reflink::xfs();
    let dir = b.dir().to_path_buf();
    let p = b.pool();
    p.create_volume("head", 4 * MIB).unwrap();
    p.open_volume("head", false)
        .unwrap()
        .write_at(&[7u8; 4096], 2 * MIB)
        .unwrap();
    p.commit().unwrap();
    assert_eq!(files_in(&dir), 1);
    // Staged: a snapshot (a new file), a shrink (a new file; the committed one kept), a
    // removal (the file must outlive the crash) and a growth in place.
    p.snapshot("head", "snap").unwrap();
    p.create_volume("other", MIB).unwrap();
    p.resize_volume("head", MIB, true).unwrap();
    assert_eq!(files_in(&dir), 4);
    drop(p);
    let p = b.crash();
    assert_eq!(
        files_in(&dir),
        1,
        "files of the lost transaction are removed at open"
    );
    assert_eq!(p.volume("head").unwrap().size, 4 * MIB);
    let mut buf = [0u8; 4];
    p.open_volume("head", true)
        .unwrap()
        .read_at(&mut buf, 2 * MIB)
        .unwrap();
    assert_eq!(
        buf, [7; 4],
        "a staged shrink does not touch committed bytes"
    );

    p.resize_volume("head", 8 * MIB, false).unwrap();
    p.remove_volume("head").unwrap();
    drop(p);
    let p = b.crash();
    assert!(p.exists("head").unwrap(), "a staged removal keeps the file");
    assert_eq!(
        p.volume("head").unwrap().size,
        4 * MIB,
        "uncommitted growth is trimmed"
    );
    p.remove_volume("head").unwrap();
    p.commit().unwrap();
    assert_eq!(files_in(&dir), 0, "a committed removal unlinks the file");
    assert!(!dir.join("pool.json.tmp").exists());
    let cat: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("pool.json")).unwrap()).unwrap();
    assert_eq!(cat["version"], 1);
}

#[test]
fn one_owner_at_a_time() {
    let b = Reflink::xfs();
    let e = ReflinkPool::open(b.dir())
        .err()
        .expect("the pool is locked by the fixture");
    match e {
        PoolError::Locked { pid, .. } => assert_eq!(pid, Some(std::process::id())),
        other => panic!("expected Locked, got {other}"),
    }
    assert!(
        matches!(ReflinkPool::create(b.dir()), Err(PoolError::Invalid(_))),
        "create refuses an existing pool"
    );
    let fs = LoopFs::shared("xfs");
    assert!(matches!(
        ReflinkPool::open(&fs.subdir()),
        Err(PoolError::NotAPool { .. })
    ));
}

#[test]
fn refuses_a_filesystem_without_reflink() {
    let fs = LoopFs::new("tmpfs", 0);
    let dir = fs.path().join("pool");
    let e = ReflinkPool::create(&dir).err().expect("tmpfs cannot clone");
    let msg = e.to_string();
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
    assert!(
        msg.contains("mkfs.xfs -m reflink=1") && msg.contains("btrfs"),
        "{msg}"
    );
    assert!(!dir.join("pool.json").exists());
}

#[test]
fn volume_keys_never_become_paths() {
    let b = Reflink::xfs();
    let p: Arc<dyn Pool> = b.pool();
    p.create_volume("work/private@1764160000.000001", MIB)
        .unwrap();
    p.commit().unwrap();
    let names: Vec<String> = std::fs::read_dir(b.dir().join("vols"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 1);
    assert!(
        names[0].ends_with(".img") && !names[0].contains("work"),
        "{names:?}"
    );
}
