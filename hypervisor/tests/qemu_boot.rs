//! Real QEMU boots (TCG, or KVM when forced): the host kernel with a busybox
//! initramfs, disks served by `qemu-nbd` over unix sockets, as the controller's NBD
//! server would. Every wait has a deadline so a broken host fails, never hangs.

mod common;

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use hypervisor::initramfs::{POWER_BUTTON_MODULES, VIRTIO_BLK_MODULES};
use hypervisor::qemu::probe_kvm;
use hypervisor::{Accel, DiskSpec, DomainState, Hypervisor, Qemu};

#[test]
fn guest_reads_root_writes_private_and_powers_off() {
    require("qemu-system-x86_64");
    require("qemu-nbd");
    let tmp = tempfile::Builder::new()
        .prefix("hvq")
        .tempdir_in("/tmp")
        .unwrap();
    let root_img = tmp.path().join("root.img");
    let private_img = tmp.path().join("private.img");
    let volatile_img = tmp.path().join("volatile.img");
    let mut root = vec![0u8; 1 << 20];
    root[..17].copy_from_slice(b"ROOT-MARKER-7f3a\n");
    fs::write(&root_img, &root).unwrap();
    fs::write(&private_img, vec![0u8; 1 << 20]).unwrap();
    fs::write(&volatile_img, vec![0u8; 1 << 20]).unwrap();

    let sock = |n: &str| tmp.path().join(format!("{n}.sock"));
    let _servers = [
        NbdServer::start(&root_img, &sock("root"), "bootq/root", true),
        NbdServer::start(&private_img, &sock("private"), "bootq/private", false),
        NbdServer::start(&volatile_img, &sock("volatile"), "bootq/volatile", false),
    ];
    let disks = ["root", "private", "volatile"]
        .iter()
        .enumerate()
        .map(|(i, v)| DiskSpec {
            vdev: format!("xvd{}", (b'a' + i as u8) as char),
            nbd_socket: sock(v),
            export: format!("bootq/{v}"),
            read_only: i == 0,
            block_device: None,
        })
        .collect();

    let script = "\
i=0; while [ ! -b /dev/vdc ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
echo \"ROOT-READ: $(head -c 16 /dev/vda)\"
echo \"VDA-RO: $(cat /sys/block/vda/ro) VDB-RO: $(cat /sys/block/vdb/ro)\"
echo \"SERIAL: $(cat /sys/block/vdb/serial)\"
echo GUEST-WROTE-PRIVATE > /dev/vdb
sync
echo BOOT-TEST-DONE
poweroff -f
";
    let initrd = initramfs(tmp.path(), script, VIRTIO_BLK_MODULES);
    let spec = boot_spec("bootq", tmp.path(), initrd, disks);
    let hv = Qemu::new().with_accel(Accel::Tcg);
    let _guard = DomainGuard {
        hv: &hv,
        name: spec.name.clone(),
        run_dir: spec.run_dir.clone(),
    };
    hv.start(&spec).expect("start");
    let state = hv.state("bootq", &spec.run_dir).unwrap();
    assert!(
        state == DomainState::Running || state == DomainState::Halted,
        "{state}"
    );
    assert!(matches!(
        hv.start(&spec),
        Err(hypervisor::HvError::AlreadyRunning { .. }) | Ok(())
    ));

    let console = hv.console_log(&spec.run_dir);
    wait_for("the guest to power off", BOOT_DEADLINE, || {
        hv.state("bootq", &spec.run_dir).unwrap() == DomainState::Halted
    });
    let log = fs::read_to_string(&console).unwrap();
    assert!(
        log.contains("ROOT-READ: ROOT-MARKER-7f3a"),
        "console:\n{log}"
    );
    assert!(log.contains("VDA-RO: 1 VDB-RO: 0"), "console:\n{log}");
    assert!(log.contains("SERIAL: xvdb"), "console:\n{log}");
    assert!(log.contains("BOOT-TEST-DONE"), "console:\n{log}");
    let private = fs::read(&private_img).unwrap();
    assert_eq!(&private[..20], b"GUEST-WROTE-PRIVATE\n");
    assert_eq!(fs::read(&root_img).unwrap(), root, "read-only root changed");
    // Halted domains shut down and kill cleanly (idempotent).
    hv.shutdown("bootq", &spec.run_dir, Duration::from_secs(1))
        .unwrap();
    hv.kill("bootq", &spec.run_dir).unwrap();
    assert!(!spec.run_dir.join("qemu.pid").exists());
}

/// One QMP command from the test side, independent of the backend's client.
fn qmp(socket: &std::path::Path, cmd: &str) {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("QMP connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap(); // greeting
    for c in ["qmp_capabilities", cmd] {
        writeln!(s, "{{\"execute\": \"{c}\"}}").unwrap();
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(!line.contains("\"error\""), "QMP {c}: {line}");
            if line.contains("\"return\"") {
                break;
            }
        }
    }
}

#[test]
fn shutdown_of_a_guest_that_ignores_powerdown_ends_in_kill() {
    require("qemu-system-x86_64");
    let tmp = tempfile::Builder::new()
        .prefix("hvq")
        .tempdir_in("/tmp")
        .unwrap();
    // busybox sh as PID 1 ignores the ACPI power button: nothing runs acpid.
    let script = "echo LOOPING\nwhile true; do sleep 1; done\n";
    let initrd = initramfs(tmp.path(), script, &[]);
    let spec = boot_spec("loopq", tmp.path(), initrd, vec![]);
    let hv = Qemu::new().with_accel(Accel::Tcg);
    let _guard = DomainGuard {
        hv: &hv,
        name: spec.name.clone(),
        run_dir: spec.run_dir.clone(),
    };
    hv.start(&spec).expect("start");
    let console = hv.console_log(&spec.run_dir);
    wait_for("the guest's init to run", BOOT_DEADLINE, || {
        fs::read_to_string(&console)
            .map(|s| s.contains("LOOPING"))
            .unwrap_or(false)
    });
    assert_eq!(
        hv.state("loopq", &spec.run_dir).unwrap(),
        DomainState::Running
    );
    // Paused vCPUs (QMP stop, as a debugger or a save would do) read as Paused.
    qmp(&spec.run_dir.join("qmp.sock"), "stop");
    assert_eq!(
        hv.state("loopq", &spec.run_dir).unwrap(),
        DomainState::Paused
    );
    qmp(&spec.run_dir.join("qmp.sock"), "cont");
    assert_eq!(
        hv.state("loopq", &spec.run_dir).unwrap(),
        DomainState::Running
    );
    hv.shutdown("loopq", &spec.run_dir, Duration::from_secs(3))
        .expect("shutdown");
    assert_eq!(
        hv.state("loopq", &spec.run_dir).unwrap(),
        DomainState::Halted
    );
    assert!(!spec.run_dir.join("qemu.pid").exists());
}

#[test]
fn shutdown_of_a_cooperative_guest_is_clean() {
    require("qemu-system-x86_64");
    let tmp = tempfile::Builder::new()
        .prefix("hvq")
        .tempdir_in("/tmp")
        .unwrap();
    // evdev queues events only for open readers, so the device is opened before the
    // marker that tells the test to press the button.
    // The guest's init waits for the ACPI power button (what system_powerdown
    // presses) and powers off: the path a real guest's systemd takes.
    let script = "\
dev=
for e in /sys/class/input/event*; do
  grep -q 'Power Button' $e/device/name 2>/dev/null && dev=/dev/input/${e##*/}
done
exec 3< $dev
echo \"WAITING-FOR-POWER-BUTTON $dev\"
head -c 1 <&3 > /dev/null
echo GOT-POWER-BUTTON
poweroff -f
";
    let initrd = initramfs(tmp.path(), script, POWER_BUTTON_MODULES);
    let spec = boot_spec("ackq", tmp.path(), initrd, vec![]);
    let hv = Qemu::new().with_accel(Accel::Tcg);
    let _guard = DomainGuard {
        hv: &hv,
        name: spec.name.clone(),
        run_dir: spec.run_dir.clone(),
    };
    hv.start(&spec).expect("start");
    let console = hv.console_log(&spec.run_dir);
    wait_for(
        "the guest to wait for the power button",
        BOOT_DEADLINE,
        || {
            fs::read_to_string(&console)
                .map(|s| s.contains("WAITING-FOR-POWER-BUTTON /dev/input/event"))
                .unwrap_or(false)
        },
    );
    hv.shutdown("ackq", &spec.run_dir, Duration::from_secs(60))
        .expect("shutdown");
    assert_eq!(
        hv.state("ackq", &spec.run_dir).unwrap(),
        DomainState::Halted
    );
    let log = fs::read_to_string(&console).unwrap();
    // The guest saw the button: it was not killed at the timeout.
    assert!(log.contains("GOT-POWER-BUTTON"), "console:\n{log}");
}

#[test]
fn kvm_probe_gives_a_verdict_within_its_timeout() {
    require("qemu-system-x86_64");
    let tmp = tempfile::Builder::new()
        .prefix("hvp")
        .tempdir_in("/tmp")
        .unwrap();
    let timeout = Duration::from_secs(10);
    let qemu = PathBuf::from("/usr/bin/qemu-system-x86_64");
    let t0 = Instant::now();
    let v = probe_kvm(&qemu, tmp.path(), timeout).expect("probe");
    let took = t0.elapsed();
    eprintln!(
        "KVM verdict: usable={} ({}) in {took:?}",
        v.usable, v.detail
    );
    // The probe's own deadline plus QEMU start/teardown; a hung KVM must not hang us.
    assert!(
        took < timeout + Duration::from_secs(15),
        "probe took {took:?}"
    );
    assert!(!v.cached);
    let again = probe_kvm(&qemu, tmp.path(), timeout).unwrap();
    assert!(again.cached, "second probe should come from the cache");
    assert_eq!(again.usable, v.usable);
    assert!(tmp.path().join("kvm-probe.json").exists());
}

#[test]
fn start_errors_name_the_qube_and_the_fix() {
    let tmp = tempfile::Builder::new()
        .prefix("hve")
        .tempdir_in("/tmp")
        .unwrap();
    let initrd = initramfs(tmp.path(), "poweroff -f\n", &[]);

    // No QEMU binary: the error says how to install it.
    let spec = boot_spec("errq", tmp.path(), initrd.clone(), vec![]);
    let missing = Qemu::new()
        .with_binary("/nonexistent/qemu-system-x86_64")
        .with_accel(Accel::Tcg);
    let e = missing.start(&spec).unwrap_err().to_string();
    assert!(e.contains("install-deps.sh"), "{e}");

    // A disk socket nobody serves: the NBD socket check names the qube and the daemon.
    let disk = DiskSpec {
        vdev: "xvda".into(),
        nbd_socket: tmp.path().join("nobody.sock"),
        export: "errq/root".into(),
        read_only: true,
        block_device: None,
    };
    let spec = boot_spec("errq", tmp.path(), initrd.clone(), vec![disk.clone()]);
    let hv = Qemu::new().with_accel(Accel::Tcg);
    let e = hv.start(&spec).unwrap_err().to_string();
    assert!(e.contains("qube errq") && e.contains("daemon"), "{e}");

    // A socket path that exists but serves nothing: QEMU itself refuses, and its
    // message reaches the caller with the qube named.
    fs::write(&disk.nbd_socket, b"").unwrap();
    let e = hv.start(&spec).unwrap_err().to_string();
    eprintln!("error for an unserved socket: {e}");
    assert!(e.contains("qube errq"), "{e}");
    assert!(
        e.to_lowercase().contains("nbd") || e.contains("connect"),
        "{e}"
    );
    assert_eq!(
        hv.state("errq", &spec.run_dir).unwrap(),
        DomainState::Halted
    );
}

/// A 512-byte MBR boot sector (16-bit real mode): prints a marker on COM1, then
/// triple-faults (empty IDT + int3), which `-no-reboot` turns into QEMU exiting.
fn boot_sector(marker: &str) -> Vec<u8> {
    let mut code: Vec<u8> = vec![
        0xFA, // cli
        0x31, 0xC0, // xor ax, ax
        0x8E, 0xD8, // mov ds, ax
        0xBE, 0x22, 0x7C, // mov si, 0x7c22 (message, offset 34)
        0xBA, 0xF8, 0x03, // mov dx, 0x3f8 (COM1)
        0xAC, // next: lodsb
        0x84, 0xC0, // test al, al
        0x74, 0x03, // jz done
        0xEE, // out dx, al
        0xEB, 0xF8, // jmp next
        0x0F, 0x01, 0x1E, 0x1C, 0x7C, // done: lidt [0x7c1c] (limit 0)
        0xCC, // int3 -> #GP -> double fault -> triple fault -> reset
        0xF4, // hlt
        0xEB, 0xFE, // jmp $
        0, 0, 0, 0, 0, 0, // offset 28: the empty IDT descriptor
    ];
    assert_eq!(code.len(), 34);
    code.extend_from_slice(marker.as_bytes());
    code.extend_from_slice(b"\r\n\0");
    code.resize(510, 0);
    code.extend_from_slice(&[0x55, 0xAA]);
    code
}

#[test]
fn a_qube_without_a_kernel_boots_its_disk_through_the_firmware() {
    require("qemu-system-x86_64");
    require("qemu-nbd");
    let tmp = tempfile::Builder::new()
        .prefix("hvf")
        .tempdir_in("/tmp")
        .unwrap();
    let image = tmp.path().join("root.img");
    let mut disk = boot_sector("BOOTSECTOR-OK-5d2b");
    disk.resize(1 << 20, 0);
    fs::write(&image, &disk).unwrap();
    let socket = tmp.path().join("root.sock");
    let _server = NbdServer::start(&image, &socket, "fw/root", true);
    let mut spec = boot_spec(
        "fwq",
        tmp.path(),
        PathBuf::new(),
        vec![DiskSpec {
            vdev: "xvda".into(),
            nbd_socket: socket.clone(),
            export: "fw/root".into(),
            read_only: true,
            block_device: None,
        }],
    );
    spec.kernel = None;
    spec.initrd = None;
    let hv = Qemu::new().with_accel(Accel::Tcg);
    let _guard = DomainGuard {
        hv: &hv,
        name: spec.name.clone(),
        run_dir: spec.run_dir.clone(),
    };
    hv.start(&spec).expect("start");
    wait_for(
        "the boot sector to reset the machine",
        BOOT_DEADLINE,
        || hv.state("fwq", &spec.run_dir).unwrap() == DomainState::Halted,
    );
    let log = fs::read_to_string(hv.console_log(&spec.run_dir)).unwrap();
    assert!(log.contains("BOOTSECTOR-OK-5d2b"), "console:\n{log}");
}

/// Qubes' memory/maxmem: the guest boots with `memory`, and `set_memory` (what a memory
/// balancer calls) plugs more, up to maxmem, which the running guest then uses.
#[test]
fn a_running_qube_grows_from_memory_towards_maxmem() {
    require("qemu-system-x86_64");
    let tmp = tempfile::Builder::new()
        .prefix("hvq")
        .tempdir_in("/tmp")
        .unwrap();
    let (_, mods) = kernel_and_modules();
    let mut chain: Vec<&str> = VIRTIO_BLK_MODULES[..VIRTIO_BLK_MODULES.len() - 1].to_vec();
    chain.push("kernel/drivers/virtio/virtio_mem.ko");
    let base = |m: &str| m.rsplit('/').next().unwrap().to_string();
    let insmods: String = chain
        .iter()
        .map(|m| format!("insmod /lib/modules/{}\n", base(m)))
        .collect();
    let script = format!(
        "total() {{ sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo; }}\n\
         b=$(total); echo \"MEM-AT-BOOT $b\"\n\
         {insmods}\
         echo READY-FOR-MEMORY\n\
         i=0; while [ $(total) -lt $((b + 200000)) ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n\
         echo \"MEM-AFTER-PLUG $(total)\"\n\
         poweroff -f\n"
    );
    let files: Vec<(String, PathBuf)> = chain
        .iter()
        .map(|m| (format!("lib/modules/{}", base(m)), mods.join(m)))
        .collect();
    let extra: Vec<(&str, &std::path::Path)> = files
        .iter()
        .map(|(d, s)| (d.as_str(), s.as_path()))
        .collect();
    let img = hypervisor::initramfs::busybox_initramfs(&script, &extra).unwrap();
    let initrd = tmp.path().join("initramfs.cpio");
    fs::write(&initrd, img).unwrap();
    let mut spec = boot_spec("memq", tmp.path(), initrd, vec![]);
    spec.memory_mib = 256;
    spec.maxmem_mib = 768;
    let hv = Qemu::new().with_accel(Accel::Tcg);
    let args = hv.command_line(&spec, Accel::Tcg).unwrap();
    assert!(
        args.windows(2).any(|w| w == ["-m", "256M,maxmem=768M"]),
        "{args:?}"
    );
    let _guard = DomainGuard {
        hv: &hv,
        name: spec.name.clone(),
        run_dir: spec.run_dir.clone(),
    };
    hv.start(&spec).expect("start");
    let console = hv.console_log(&spec.run_dir);
    let log = || fs::read_to_string(&console).unwrap_or_default();
    wait_for("the guest to load virtio-mem", BOOT_DEADLINE, || {
        log().contains("READY-FOR-MEMORY")
    });
    for bad in [128, 1024] {
        let e = hv.set_memory("memq", &spec.run_dir, bad).unwrap_err();
        assert!(
            e.to_string().contains("memory 256 MiB and maxmem 768 MiB"),
            "{e}"
        );
    }
    hv.set_memory("memq", &spec.run_dir, 512)
        .expect("set_memory");
    let deadline = Instant::now() + BOOT_DEADLINE;
    while hv.state("memq", &spec.run_dir).unwrap() != DomainState::Halted {
        assert!(
            Instant::now() < deadline,
            "the guest did not power off; console:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = log();
    let kib = |tag: &str| -> u64 {
        log.lines()
            .find_map(|l| l.trim().strip_prefix(tag))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {tag} in console:\n{log}"))
    };
    let at_boot = kib("MEM-AT-BOOT");
    let after = kib("MEM-AFTER-PLUG");
    assert!(
        at_boot < 256 * 1024,
        "booted with {at_boot} KiB, want memory (256 MiB)"
    );
    // 256 MiB plugged: MemTotal grows by that (less the new memmap), never more.
    assert!(
        after >= at_boot + 200_000 && after <= at_boot + 256 * 1024,
        "booted with {at_boot} KiB, after set_memory(512) the guest has {after} KiB"
    );
    assert!(
        hv.set_memory("memq", &spec.run_dir, 512).is_err(),
        "a halted qube takes no memory"
    );
}

/// A busybox initramfs that loads virtio-net and runs `script`.
fn net_initramfs(dir: &std::path::Path, name: &str, script: &str) -> PathBuf {
    let (_, mods) = kernel_and_modules();
    let mut chain: Vec<&str> = VIRTIO_BLK_MODULES[..VIRTIO_BLK_MODULES.len() - 1].to_vec();
    chain.extend([
        "kernel/net/core/failover.ko",
        "kernel/drivers/net/net_failover.ko",
        "kernel/drivers/net/virtio_net.ko",
    ]);
    let base = |m: &str| m.rsplit('/').next().unwrap().to_string();
    let mut full: String = chain
        .iter()
        .map(|m| format!("insmod /lib/modules/{}\n", base(m)))
        .collect();
    full.push_str(script);
    let files: Vec<(String, PathBuf)> = chain
        .iter()
        .map(|m| (format!("lib/modules/{}", base(m)), mods.join(m)))
        .collect();
    let extra: Vec<(&str, &std::path::Path)> = files
        .iter()
        .map(|(d, s)| (d.as_str(), s.as_path()))
        .collect();
    let img = hypervisor::initramfs::busybox_initramfs(&full, &extra).unwrap();
    let path = dir.join(format!("{name}.cpio"));
    fs::write(&path, img).unwrap();
    path
}

/// Qubes' netvm on QEMU: the client's only NIC is linked to a NIC hot-plugged into its
/// netvm; the client reaches the netvm over it, and the NIC goes away when detached.
#[test]
fn a_client_reaches_its_netvm_through_a_hot_plugged_link() {
    require("qemu-system-x86_64");
    let tmp = tempfile::Builder::new()
        .prefix("hvn")
        .tempdir_in("/tmp")
        .unwrap();
    let netvm_script = "\
echo NETVM-WAITING
i=0; while [ ! -e /sys/class/net/eth1 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
echo \"NETVM-VIF $(cat /sys/class/net/eth1/address)\"
ip link set eth1 up
ip addr add 10.137.0.1/32 dev eth1
ip route add 10.137.0.5/32 dev eth1
echo \"NETVM-GOT: $(nc -l -p 7000)\"
i=0; while [ -e /sys/class/net/eth1 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
[ -e /sys/class/net/eth1 ] || echo NETVM-VIF-GONE
poweroff -f
";
    let client_script = "\
echo \"CLIENT-NICS $(ls /sys/class/net | tr '\\n' ' ')\"
ip link set eth0 up
ip addr add 10.137.0.5/32 dev eth0
ip route add 10.137.0.1/32 dev eth0
i=0
while [ $i -lt 60 ]; do
  if echo HELLO-FROM-CLIENT | nc -w 2 10.137.0.1 7000; then echo CLIENT-SENT; break; fi
  sleep 1; i=$((i+1))
done
poweroff -f
";
    let mut netvm = boot_spec(
        "nvq",
        tmp.path(),
        net_initramfs(tmp.path(), "netvm", netvm_script),
        vec![],
    );
    netvm.net.provides_network = true;
    let hv = Qemu::new().with_accel(Accel::Tcg);
    let _g1 = DomainGuard {
        hv: &hv,
        name: netvm.name.clone(),
        run_dir: netvm.run_dir.clone(),
    };
    hv.start(&netvm).expect("start netvm");
    let nlog = || fs::read_to_string(hv.console_log(&netvm.run_dir)).unwrap_or_default();
    wait_for("the netvm to boot", BOOT_DEADLINE, || {
        nlog().contains("NETVM-WAITING")
    });
    let sock = netvm.run_dir.join("vif-clq.sock");
    hv.attach_client("nvq", &netvm.run_dir, "clq", &sock, "00:16:3e:5e:6c:05")
        .expect("attach");
    let mut client = boot_spec(
        "clq",
        tmp.path(),
        net_initramfs(tmp.path(), "client", client_script),
        vec![],
    );
    client.netvm = Some("nvq".into());
    client.net.netvm_socket = Some(sock.clone());
    client.net.mac = "00:16:3e:5e:6c:05".into();
    let _g2 = DomainGuard {
        hv: &hv,
        name: client.name.clone(),
        run_dir: client.run_dir.clone(),
    };
    hv.start(&client).expect("start client");
    wait_for("the client's message at the netvm", BOOT_DEADLINE, || {
        nlog().contains("NETVM-GOT: HELLO-FROM-CLIENT")
    });
    let clog = fs::read_to_string(hv.console_log(&client.run_dir)).unwrap_or_default();
    assert!(clog.contains("CLIENT-NICS eth0 lo"), "{clog}");
    assert!(nlog().contains("NETVM-VIF 00:16:3e:5e:6c:05"), "{}", nlog());
    wait_for("the client to power off", BOOT_DEADLINE, || {
        hv.state("clq", &client.run_dir).unwrap() == DomainState::Halted
    });
    hv.detach_client("nvq", &netvm.run_dir, "clq")
        .expect("detach");
    wait_for("the netvm to power off", BOOT_DEADLINE, || {
        hv.state("nvq", &netvm.run_dir).unwrap() == DomainState::Halted
    });
    assert!(nlog().contains("NETVM-VIF-GONE"), "{}", nlog());
}

/// The serial console is a 0600 socket: what a client types reaches the guest, what
/// the guest prints reaches the client, and console.log keeps all of it, with or
/// without a client attached; the guest runs on after the client leaves.
#[test]
fn the_serial_console_is_an_interactive_socket_that_still_logs() {
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    require("qemu-system-x86_64");
    let tmp = tempfile::Builder::new()
        .prefix("hvq")
        .tempdir_in("/tmp")
        .unwrap();
    let script = "\
echo CONSOLE-READY
while read -r line; do echo \"GOT:$line\"; done
";
    let initrd = initramfs(tmp.path(), script, &[]);
    let spec = boot_spec("conq", tmp.path(), initrd, vec![]);
    let hv = Qemu::new().with_accel(Accel::Tcg);
    let _guard = DomainGuard {
        hv: &hv,
        name: spec.name.clone(),
        run_dir: spec.run_dir.clone(),
    };
    hv.start(&spec).expect("start");
    let log = hv.console_log(&spec.run_dir);
    let sock = hv
        .console_socket(&spec.run_dir)
        .expect("QEMU has a console socket");
    let mode = fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "console socket mode {mode:o}");
    assert_eq!(
        fs::metadata(hv.agent_socket(&spec.run_dir).unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // Nobody attached during boot: the log has it all the same.
    wait_for("the guest's shell on the console", BOOT_DEADLINE, || {
        fs::read_to_string(&log)
            .map(|s| s.contains("CONSOLE-READY"))
            .unwrap_or(false)
    });
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut seen = Vec::new();
    let start = Instant::now();
    let mut sent = Instant::now() - Duration::from_secs(10);
    while !String::from_utf8_lossy(&seen).contains("GOT:typed-7") {
        assert!(
            start.elapsed() < BOOT_DEADLINE,
            "no echo: {}",
            String::from_utf8_lossy(&seen)
        );
        // Re-sent until seen: the first bytes may arrive before the guest reads.
        if sent.elapsed() > Duration::from_secs(5) {
            c.write_all(b"typed-7\n").unwrap();
            sent = Instant::now();
        }
        let mut buf = [0u8; 512];
        if let Ok(n) = c.read(&mut buf) {
            seen.extend_from_slice(&buf[..n]);
        }
    }
    drop(c);
    // The log is written right after the client gets the bytes.
    wait_for("the session in console.log", BOOT_DEADLINE, || {
        fs::read_to_string(&log)
            .map(|s| s.contains("GOT:typed-7"))
            .unwrap_or(false)
    });
    assert_eq!(
        hv.state("conq", &spec.run_dir).unwrap(),
        DomainState::Running,
        "detaching leaves the guest running"
    );
    // A second client after the first left works too.
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    c.write_all(b"again-8\n").unwrap();
    wait_for("the second client's line", BOOT_DEADLINE, || {
        fs::read_to_string(&log)
            .map(|s| s.contains("GOT:again-8"))
            .unwrap_or(false)
    });
    hv.kill("conq", &spec.run_dir).unwrap();
    assert!(!sock.exists(), "the socket goes with the domain");
}
