//! The whole data path the controller builds, with its real peers: the project's own
//! NBD server (blkback) serving a qube's three volumes on one unix socket, QEMU's NBD
//! client attached by this backend, a Linux guest doing I/O on vda/vdb/vdc.
//! Reads, writes, flush and TRIM (guest `blkdiscard` -> virtio discard -> NBD TRIM)
//! all cross the wire. The NBD server is also restarted under a running guest, as
//! after a controller crash, and the guest's disks must come back (reconnect-delay).

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
            block_device: None,
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

fn serve(socket: &std::path::Path, img: &dyn Fn(&str) -> std::path::PathBuf) -> NbdServer {
    let exports = ["root", "private", "volatile"]
        .iter()
        .map(|v| Export {
            name: format!("rq/{v}"),
            description: format!("rq {v}"),
            device: Arc::new(
                FileDevice::create(&img(v), 4 * MIB)
                    .unwrap()
                    .read_only(*v == "root"),
            ),
        })
        .collect();
    NbdServer::bind_unix(socket, exports).expect("blkback server")
}

#[test]
fn guest_disks_survive_an_nbd_server_restart() {
    require("qemu-system-x86_64");
    let tmp = tempfile::Builder::new()
        .prefix("hvr")
        .tempdir_in("/tmp")
        .unwrap();
    let img = |v: &str| tmp.path().join(format!("{v}.img"));
    let socket = tmp.path().join("rq.sock");
    let server = serve(&socket, &img);
    let disks = ["root", "private", "volatile"]
        .iter()
        .enumerate()
        .map(|(i, v)| DiskSpec {
            vdev: format!("xvd{}", (b'a' + i as u8) as char),
            nbd_socket: socket.clone(),
            export: format!("rq/{v}"),
            read_only: i == 0,
            block_device: None,
        })
        .collect();
    // O_DIRECT reads go to the server every time, so the guest sees the host's "GO"
    // only through a live NBD connection made after the restart.
    let script = "\
i=0; while [ ! -b /dev/vdc ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
dd if=/dev/vdc of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null && echo READY
n=0
until dd if=/dev/vdc bs=4096 count=1 iflag=direct 2>/dev/null | grep -q GO-AFTER-RESTART; do
  n=$((n+1)); [ $n -gt 600 ] && echo GAVE-UP && poweroff -f
  sleep 0.2
done
echo SAW-GO
echo WRITTEN-AFTER-RESTART | dd of=/dev/vdb bs=4096 conv=sync,fsync oflag=direct 2>/dev/null && echo WRITE-OK
poweroff -f
";
    let initrd = initramfs(tmp.path(), script, VIRTIO_BLK_MODULES);
    let spec = boot_spec("rq", tmp.path(), initrd, disks);
    let hv = Qemu::new().with_accel(Accel::Tcg);
    let _guard = DomainGuard {
        hv: &hv,
        name: spec.name.clone(),
        run_dir: spec.run_dir.clone(),
    };
    hv.start(&spec).expect("start");
    let console = hv.console_log(&spec.run_dir);
    wait_for("the guest to read its disk", BOOT_DEADLINE, || {
        fs::read_to_string(&console)
            .map(|s| s.contains("READY"))
            .unwrap_or(false)
    });
    // The "crash": every connection dropped at once, nothing served for a while.
    server.shutdown(Duration::ZERO).unwrap();
    let mut volatile = fs::read(img("volatile")).unwrap();
    volatile[..17].copy_from_slice(b"GO-AFTER-RESTART\n");
    fs::write(img("volatile"), &volatile).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let server = serve(&socket, &img);
    let restarted = std::time::Instant::now();
    wait_for("the guest to power off", BOOT_DEADLINE, || {
        hv.state("rq", &spec.run_dir).unwrap() == DomainState::Halted
    });
    eprintln!(
        "guest finished {:?} after the server came back; QEMU said: {}",
        restarted.elapsed(),
        fs::read_to_string(spec.run_dir.join("qemu-runtime.log")).unwrap_or_default()
    );
    server.shutdown(Duration::from_secs(5)).unwrap();
    let log = fs::read_to_string(&console).unwrap();
    assert!(log.contains("SAW-GO"), "console:\n{log}");
    assert!(log.contains("WRITE-OK"), "console:\n{log}");
    let private = fs::read(img("private")).unwrap();
    assert_eq!(&private[..22], b"WRITTEN-AFTER-RESTART\n");
}
