//! Two roots (two machines' pools, two librados clients) on one RBD namespace of a
//! ceph-micro cluster: what one creates the other sees, and a volume open for writing
//! on one is refused on the other with an error naming the holder.

#[path = "model_backends.rs"]
mod backends;

use std::sync::Arc;

use storage::{Pool, PoolError, RbdPool};

#[test]
fn two_roots_share_volumes_and_the_lock_is_enforced() {
    let opts = backends::rbd_options();
    let dirs = tempfile::tempdir().unwrap();
    let mut oa = opts.clone();
    oa.machine = Some("machine-a".into());
    let mut ob = opts;
    ob.machine = Some("machine-b".into());
    let a: Arc<dyn Pool> = Arc::new(RbdPool::create(&dirs.path().join("a"), &oa).unwrap());
    let b: Arc<dyn Pool> = Arc::new(RbdPool::create(&dirs.path().join("b"), &ob).unwrap());

    a.create_volume("tpl/root", 4 << 20).unwrap();
    a.set_meta("template/tpl", Some("{}")).unwrap();
    let wa = a.open_volume("tpl/root", false).unwrap();
    wa.write_at(b"from machine a", 4096).unwrap();
    wa.flush().unwrap();

    // B sees A's volume, catalogue and bytes.
    assert_eq!(b.volume("tpl/root").unwrap().size, 4 << 20);
    assert_eq!(b.get_meta("template/tpl").unwrap().as_deref(), Some("{}"));
    let rb = b.open_volume("tpl/root", true).unwrap();
    let mut buf = [0u8; 14];
    rb.read_at(&mut buf, 4096).unwrap();
    assert_eq!(&buf, b"from machine a");

    // A holds the exclusive lock: B may not write.
    let err = b
        .open_volume("tpl/root", false)
        .err()
        .expect("a second machine opened a volume held by the first for writing");
    match &err {
        PoolError::HeldElsewhere { holder, .. } => assert_eq!(holder, "machine-a"),
        other => panic!("expected HeldElsewhere, got {other:?}"),
    }
    assert!(err.to_string().contains("machine-a"), "{err}");
    // A still writes.
    wa.write_at(b"still a", 0).unwrap();
    wa.flush().unwrap();

    // Once A lets go, B takes over.
    drop(wa);
    drop(rb);
    let wb = b.open_volume("tpl/root", false).unwrap();
    wb.write_at(b"now b", 0).unwrap();
    wb.flush().unwrap();
    let err = a
        .open_volume("tpl/root", false)
        .err()
        .expect("A opened B's volume");
    assert!(err.to_string().contains("machine-b"), "{err}");
}
