//! The cluster's only OSD is SIGKILLed under an open volume: I/O fails within the pool's
//! op timeout with an error that names the cause, and once the OSD is back every flushed
//! write is there and the volume works on. A test binary of its own: it takes down the
//! cluster every other rbd test of its binary would use.

#[path = "model_backends.rs"]
mod backends;

use std::process::Command;

use storage::{BlockErrorKind, Pool, RbdPool};

fn micro(cmd: &str) {
    let st = Command::new(backends::ceph_script())
        .arg(cmd)
        .arg(&backends::ceph().dir)
        .status()
        .unwrap();
    assert!(st.success(), "ceph-micro.sh {cmd} failed");
}

#[test]
fn killed_osd_fails_io_clearly_and_loses_nothing_committed() {
    let mut opts = backends::rbd_options();
    opts.op_timeout = 5;
    let dir = tempfile::tempdir().unwrap();
    let p = RbdPool::create(&dir.path().join("pool"), &opts).unwrap();
    p.create_volume("work/private", 8 << 20).unwrap();
    let dev = p.open_volume("work/private", false).unwrap();
    let data: Vec<u8> = (0..1 << 20).map(|i| (i * 7 + 3) as u8).collect();
    dev.write_at(&data, 1 << 20).unwrap();
    dev.flush().unwrap();
    p.commit().unwrap();

    micro("kill-osd");
    let failed = dev
        .write_at(b"lost?", 0)
        .and_then(|()| dev.flush())
        .expect_err("a write with no OSD up succeeded");
    assert_eq!(failed.kind, BlockErrorKind::Io, "{failed}");
    assert!(
        failed.to_string().contains("did not answer"),
        "the error should say the cluster did not answer: {failed}"
    );

    micro("start-osd");
    let mut back = vec![0u8; data.len()];
    dev.read_at(&mut back, 1 << 20).unwrap();
    assert!(back == data, "flushed data changed across the OSD kill");
    dev.write_at(b"after", 0).unwrap();
    dev.flush().unwrap();
    let mut b5 = [0u8; 5];
    dev.read_at(&mut b5, 0).unwrap();
    assert_eq!(&b5, b"after");
}
