//! The whole data path the controller builds, with its real peers: the project's own
//! NBD server (blkback) serving a qube's three volumes on one unix socket, QEMU's NBD
//! client attached by this backend, a Linux guest doing I/O on vda/vdb/vdc.
//! Reads, writes, flush and TRIM (guest `blkdiscard` -> virtio discard -> NBD TRIM)
//! all cross the wire.

mod common;

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use blkback::testing::FileDevice;
use blkback::{Export, NbdServer};
use common::*;
use hypervisor::initramfs::VIRTIO_BLK_MODULES;
use hypervisor::{Accel, DiskSpec, DomainState, Hypervisor, Qemu};

const MIB: u64 = 1 << 20;

#[test]
fn guest_does_io_through_the_projects_nbd_server() {
    require("qemu-system-x86_64");
    let tmp = tempfile::Builder::new()
        .prefix("hvk")
        .tempdir_in("/tmp")
        .unwrap();
    let img = |v: &str| tmp.path().join(format!("{v}.img"));
    let root = FileDevice::create(&img("root"), 4 * MIB).unwrap();
    drop(root);
    let mut content = fs::read(img("root")).unwrap();
    content[..18].copy_from_slice(b"BLKBACK-ROOT-9c1e\n");
    fs::write(img("root"), &content).unwrap();

    let exports = ["root", "private", "volatile"]
        .iter()
        .map(|v| {
            let dev = FileDevice::create(&img(v), 4 * MIB)
                .unwrap()
                .read_only(*v == "root");
            Export {
                name: format!("bq/{v}"),
                description: format!("bq {v}"),
                device: Arc::new(dev),
            }
        })
        .collect();
    let socket = tmp.path().join("bq.sock");
    let server = NbdServer::bind_unix(&socket, exports).expect("blkback server");

    let disks = ["root", "private", "volatile"]
        .iter()
        .enumerate()
        .map(|(i, v)| DiskSpec {
            vdev: format!("xvd{}", (b'a' + i as u8) as char),
            nbd_socket: socket.clone(),
            export: format!("bq/{v}"),
            read_only: i == 0,
        })
        .collect();
    let script = "\
i=0; while [ ! -b /dev/vdc ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
echo \"ROOT-READ: $(head -c 17 /dev/vda)\"
echo BLKBACK-PRIVATE-WRITE > /dev/vdb
echo VOLATILE-DATA > /dev/vdc
sync
echo 3 > /proc/sys/vm/drop_caches
echo \"VDC-BEFORE: $(head -c 13 /dev/vdc)\"
echo \"VDC-DISCARD-MAX: $(cat /sys/block/vdc/queue/discard_max_bytes)\"
blkdiscard /dev/vdc && echo DISCARD-OK
echo 3 > /proc/sys/vm/drop_caches
echo \"VDC-AFTER: $(head -c 13 /dev/vdc | od -An -c | tr -d ' ')\"
echo BOOT-TEST-DONE
poweroff -f
";
    let initrd = initramfs(tmp.path(), script, VIRTIO_BLK_MODULES);
    let spec = boot_spec("bq", tmp.path(), initrd, disks);
    let hv = Qemu::new().with_accel(Accel::Tcg);
    let _guard = DomainGuard {
        hv: &hv,
        name: spec.name.clone(),
        run_dir: spec.run_dir.clone(),
    };
    hv.start(&spec).expect("start");
    wait_for("the guest to power off", BOOT_DEADLINE, || {
        hv.state("bq", &spec.run_dir).unwrap() == DomainState::Halted
    });
    server.shutdown(Duration::from_secs(5)).unwrap();

    let log = fs::read_to_string(hv.console_log(&spec.run_dir)).unwrap();
    assert!(
        log.contains("ROOT-READ: BLKBACK-ROOT-9c1e"),
        "console:\n{log}"
    );
    assert!(log.contains("VDC-BEFORE: VOLATILE-DATA"), "console:\n{log}");
    assert!(log.contains("DISCARD-OK"), "console:\n{log}");
    assert!(
        log.contains("VDC-AFTER: \\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0"),
        "console:\n{log}"
    );
    assert!(log.contains("BOOT-TEST-DONE"), "console:\n{log}");
    let private = fs::read(img("private")).unwrap();
    assert_eq!(&private[..22], b"BLKBACK-PRIVATE-WRITE\n");
    let volatile = fs::read(img("volatile")).unwrap();
    assert!(volatile.iter().all(|&b| b == 0), "TRIM left data behind");
    assert_eq!(
        fs::read(img("root")).unwrap(),
        content,
        "read-only root changed"
    );
}
