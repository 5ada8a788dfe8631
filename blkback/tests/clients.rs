//! The server against real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh, fio),
//! once per backend.

mod common;

use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn qemu_img_convert_in_and_out_byte_equal() {
    for &b in BACKENDS {
        let fx = Fixture::new(b, &[VolSpec::rw("work/private", 8 * MIB)]);
        let src = fx.path("src.img");
        std::fs::write(&src, pattern(8 * MIB as usize, 1)).unwrap();
        let uri = fx.uri("work/private");
        run(Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri));
        run(Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri));
        let out = fx.path("out.img");
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&out));
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(&src).unwrap(),
            "{b:?}: image differs after round trip"
        );
    }
}

#[test]
fn qemu_io_patterns_discard_and_zeroes() {
    for &b in BACKENDS {
        let fx = Fixture::new(b, &[VolSpec::rw("work/private", 4 * MIB)]);
        let uri = fx.uri("work/private");
        let out = run(Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0xab 0 2M",
                "-c",
                "write -P 0xcd -f 1M 64k",
                "-c",
                "read -P 0xab 0 1M",
                "-c",
                "read -P 0xcd 1M 64k",
                "-c",
                "write -z 2M 1M",
                "-c",
                "read -P 0 2M 1M",
                "-c",
                "write -z -u 64k 64k",
                "-c",
                "read -P 0 64k 64k",
                "-c",
                "discard 512k 256k",
                "-c",
                "flush",
                "-c",
                "read -P 0xab 0 64k",
            ])
            .arg(&uri));
        let text = stdout(&out);
        assert!(
            !text.contains("fail") && !text.contains("error"),
            "{b:?}: qemu-io reported:\n{text}"
        );
        assert_eq!(text.matches("read ").count(), 5, "{b:?}: {text}");
    }
}

#[test]
fn nbdinfo_lists_exports_and_maps_holes() {
    for &b in BACKENDS {
        let fx = Fixture::new(
            b,
            &[
                VolSpec::rw("work/private", 4 * MIB),
                VolSpec::rw("work/volatile", 2 * MIB),
            ],
        );
        let list = stdout(&run(Command::new("nbdinfo").arg("--list").arg(fx.uri(""))));
        assert!(
            list.contains("work/private") && list.contains("work/volatile"),
            "{b:?}: {list}"
        );
        assert!(
            list.contains("volume work/private"),
            "description missing: {list}"
        );
        let uri = fx.uri("work/private");
        run(Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 1 0 4M",
                "-c",
                "discard 1M 1M",
                "-c",
                "flush",
            ])
            .arg(&uri));
        let map = stdout(&run(Command::new("nbdinfo").arg("--map").arg(&uri)));
        // "offset length type description" lines; the trimmed MiB must show up as a hole.
        let hole = map.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 3 && f[0] == "1048576" && f[1] == "1048576" && f[2] == "3"
        });
        assert!(hole, "{b:?}: no hole at 1 MiB in map:\n{map}");
        let info = stdout(&run(Command::new("nbdinfo").arg(&uri)));
        assert!(
            info.contains("can_multi_conn: true") && info.contains("base:allocation"),
            "{info}"
        );
    }
}

#[test]
fn nbdcopy_round_trip() {
    for &b in BACKENDS {
        let fx = Fixture::new(b, &[VolSpec::rw("a", 8 * MIB), VolSpec::rw("b", 8 * MIB)]);
        let src = fx.path("src.img");
        let data = pattern(8 * MIB as usize, 2);
        std::fs::write(&src, &data).unwrap();
        run(Command::new("nbdcopy").arg(&src).arg(fx.uri("a")));
        run(Command::new("nbdcopy")
            .args(["--connections=4"])
            .arg(fx.uri("a"))
            .arg(fx.uri("b")));
        let out = fx.path("out.img");
        run(Command::new("nbdcopy").arg(fx.uri("b")).arg(&out));
        assert!(
            std::fs::read(&out).unwrap() == data,
            "{b:?}: nbdcopy round trip differs"
        );
    }
}

#[test]
fn fio_verify_crc32c() {
    for &b in BACKENDS {
        let fx = Fixture::new(b, &[VolSpec::rw("work/private", 32 * MIB)]);
        let out = run(Command::new("fio")
            .args([
                "--name=verify",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=16M",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--do_verify=1",
                "--numjobs=1",
                "--verify_state_save=0",
            ])
            .arg(format!("--uri={}", fx.uri("work/private")))
            .current_dir(fx.dir.path()));
        let text = stdout(&out);
        assert!(text.contains("err= 0"), "{b:?}: fio output:\n{text}");
    }
}

/// Writes acknowledged before shutdown survive it: shutdown flushes (commits) the thin
/// pool, and a reopened pool reads them back.
#[test]
fn thin_writes_survive_shutdown_and_reopen() {
    use std::sync::Arc;
    use storage::{BlockDevice, Pool};
    let dir = tempfile::tempdir().unwrap();
    let pdir = dir.path().join("pool");
    std::fs::create_dir(&pdir).unwrap();
    let sock = dir.path().join("q.sock");
    {
        let pool = storage::ThinPool::create(
            &pdir,
            storage::ThinOptions {
                chunk_size: 64 << 10,
                capacity: 64 * MIB,
            },
        )
        .unwrap();
        pool.create_volume("work/private", 16 * MIB).unwrap();
        pool.commit().unwrap();
        let dev: Arc<dyn BlockDevice> = pool.open_volume("work/private", false).unwrap();
        drop(pool);
        let server = blkback::NbdServer::bind_unix(
            &sock,
            vec![blkback::Export {
                name: "work/private".into(),
                description: String::new(),
                device: dev,
            }],
        )
        .unwrap();
        // No explicit flush from the client: shutdown must commit.
        run(Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x5a 1M 3M",
                "-c",
                "write -z 2M 64k",
            ])
            .arg(blkback::nbd_uri(&sock, "work/private")));
        server.shutdown(std::time::Duration::from_secs(5)).unwrap();
    }
    let pool = storage::ThinPool::open(&pdir).unwrap();
    let dev = pool.open_volume("work/private", true).unwrap();
    let mut buf = vec![0u8; 4 * MIB as usize];
    dev.read_at(&mut buf, 0).unwrap();
    assert!(buf[..MIB as usize].iter().all(|&b| b == 0));
    assert!(buf[MIB as usize..2 * MIB as usize]
        .iter()
        .all(|&b| b == 0x5a));
    assert!(buf[2 * MIB as usize..(2 * MIB + 65536) as usize]
        .iter()
        .all(|&b| b == 0));
    assert!(buf[(2 * MIB + 65536) as usize..].iter().all(|&b| b == 0x5a));
}

/// When `shutdown` returns, the server holds no device any more: the daemon reopens,
/// reverts or removes a volume right after a qube stops, and the pool refuses a volume
/// that is still open. A worker used to drop its last clone of a connection (and with
/// it the device) a moment after the connection had ended.
#[test]
fn shutdown_releases_every_device_before_it_returns() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let dev: Arc<dyn storage::BlockDevice> = Arc::new(
        blkback::testing::FileDevice::create(&dir.path().join("disk.img"), 8 * MIB).unwrap(),
    );
    for round in 0..40 {
        let sock = dir.path().join(format!("s{round}.sock"));
        let server = blkback::NbdServer::bind_unix(
            &sock,
            vec![blkback::Export {
                name: "work/private".into(),
                description: String::new(),
                device: dev.clone(),
            }],
        )
        .unwrap();
        // Requests above the inline size run on the worker pool.
        run(Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "aio_write -P 0x11 0 1M",
                "-c",
                "aio_write -P 0x22 1M 1M",
                "-c",
                "aio_flush",
            ])
            .arg(blkback::nbd_uri(&sock, "work/private")));
        server.shutdown(std::time::Duration::from_secs(5)).unwrap();
        assert_eq!(
            Arc::strong_count(&dev),
            1,
            "round {round}: the server still holds the device after shutdown returned"
        );
    }
}
