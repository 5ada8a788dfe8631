//! Real QEMU boots (TCG, or KVM when forced): the host kernel with a busybox
//! initramfs, disks served by `qemu-nbd` over unix sockets, as the controller's NBD
//! server would. Every wait has a deadline so a broken host fails, never hangs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use hypervisor::initramfs::{busybox_initramfs, host_kernel};
use hypervisor::qemu::probe_kvm;
use hypervisor::{Accel, DiskSpec, DomainSpec, DomainState, Hypervisor, Qemu, VirtMode};

const BOOT_DEADLINE: Duration = Duration::from_secs(100);

fn require(tool: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "{tool} not found: run scripts/install-deps.sh");
}

/// A `qemu-nbd` serving one raw file on a unix socket; killed on drop.
struct NbdServer {
    child: Child,
}

impl NbdServer {
    fn start(image: &Path, socket: &Path, export: &str, read_only: bool) -> Self {
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg(format!("--socket={}", socket.display()))
            .args(["-f", "raw", "--persistent", "--shared=4"])
            .arg(format!("--export-name={export}"))
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if read_only {
            cmd.arg("--read-only");
        }
        let child = cmd.spawn().expect("spawning qemu-nbd");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "qemu-nbd did not create {socket:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
        NbdServer { child }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills the domain if a test fails half way, so no QEMU outlives the test.
struct DomainGuard<'a> {
    hv: &'a Qemu,
    name: String,
    run_dir: PathBuf,
}

impl Drop for DomainGuard<'_> {
    fn drop(&mut self) {
        let _ = self.hv.kill(&self.name, &self.run_dir);
    }
}

fn kernel_and_modules() -> (PathBuf, PathBuf) {
    let kernel = host_kernel().expect("no /boot/vmlinuz-*: run scripts/install-deps.sh");
    let release = kernel
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();
    (kernel, PathBuf::from("/lib/modules").join(release))
}

/// virtio-blk is a module in Debian's kernel: ship the chain in load order.
const VIRTIO_BLK: &[&str] = &[
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/drivers/block/virtio_blk.ko",
];

/// The ACPI power button as an input device the guest's init can read.
const POWER_BUTTON: &[&str] = &[
    "kernel/drivers/input/evdev.ko",
    "kernel/drivers/acpi/button.ko",
];

/// A busybox initramfs that loads `modules` (paths under /lib/modules/RELEASE, in
/// load order) and then runs `script`.
fn initramfs(dir: &Path, script: &str, modules: &[&str]) -> PathBuf {
    let (_, moddir) = kernel_and_modules();
    let base = |m: &str| {
        Path::new(m)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    let mods: Vec<(String, PathBuf)> = modules
        .iter()
        .map(|m| (format!("lib/modules/{}", base(m)), moddir.join(m)))
        .collect();
    let extra: Vec<(&str, &Path)> = mods
        .iter()
        .map(|(d, s)| (d.as_str(), s.as_path()))
        .collect();
    let mut full = String::new();
    for m in modules {
        full.push_str(&format!("insmod /lib/modules/{}\n", base(m)));
    }
    full.push_str(script);
    let img = busybox_initramfs(&full, &extra).expect("building initramfs");
    let path = dir.join("initramfs.cpio");
    fs::write(&path, img).unwrap();
    path
}

fn spec(name: &str, root: &Path, initrd: PathBuf, disks: Vec<DiskSpec>) -> DomainSpec {
    DomainSpec {
        name: name.into(),
        memory_mib: 256,
        maxmem_mib: 256,
        vcpus: 1,
        virt_mode: VirtMode::Hvm,
        kernel: Some(kernel_and_modules().0),
        initrd: Some(initrd),
        cmdline: "quiet panic=-1".into(),
        disks,
        netvm: None,
        label: "red".into(),
        run_dir: root.join("run").join(name),
    }
}

fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

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
    let initrd = initramfs(tmp.path(), script, VIRTIO_BLK);
    let spec = spec("bootq", tmp.path(), initrd, disks);
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
    let spec = spec("loopq", tmp.path(), initrd, vec![]);
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
    // The guest's init waits for the ACPI power button (what system_powerdown
    // presses) and powers off: the path a real guest's systemd takes.
    let script = "\
dev=
for e in /sys/class/input/event*; do
  grep -q 'Power Button' $e/device/name 2>/dev/null && dev=/dev/input/${e##*/}
done
echo \"WAITING-FOR-POWER-BUTTON $dev\"
head -c 1 $dev > /dev/null
echo GOT-POWER-BUTTON
poweroff -f
";
    let initrd = initramfs(tmp.path(), script, POWER_BUTTON);
    let spec = spec("ackq", tmp.path(), initrd, vec![]);
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
