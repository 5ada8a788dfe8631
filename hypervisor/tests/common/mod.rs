//! Helpers shared by the integration tests: host tool checks, a qemu-nbd server,
//! busybox initramfs images, a stand-in `xl`, and the lifecycle contract every
//! backend must keep (run once per backend, as a conformance suite).
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use hypervisor::initramfs::{busybox_initramfs_with_modules, host_kernel};
use hypervisor::{DiskSpec, DomainSpec, DomainState, HvError, Hypervisor, VirtMode};

pub const BOOT_DEADLINE: Duration = Duration::from_secs(100);

pub fn require(tool: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "{tool} not found: run scripts/install-deps.sh");
}

/// A `qemu-nbd` serving one raw file on a unix socket; killed on drop.
pub struct NbdServer {
    child: Child,
}

impl NbdServer {
    pub fn start(image: &Path, socket: &Path, export: &str, read_only: bool) -> Self {
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
pub struct DomainGuard<'a> {
    pub hv: &'a dyn Hypervisor,
    pub name: String,
    pub run_dir: PathBuf,
}

impl Drop for DomainGuard<'_> {
    fn drop(&mut self) {
        let _ = self.hv.kill(&self.name, &self.run_dir);
    }
}

pub fn kernel_and_modules() -> (PathBuf, PathBuf) {
    let kernel = host_kernel().expect("no /boot/vmlinuz-*: run scripts/install-deps.sh");
    let release = kernel
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();
    (kernel, PathBuf::from("/lib/modules").join(release))
}

/// A busybox initramfs for the host kernel that loads `modules` then runs `script`.
pub fn initramfs(dir: &Path, script: &str, modules: &[&str]) -> PathBuf {
    let (kernel, _) = kernel_and_modules();
    let img = busybox_initramfs_with_modules(&kernel, modules, script).expect("building initramfs");
    let path = dir.join("initramfs.cpio");
    fs::write(&path, img).unwrap();
    path
}

pub fn boot_spec(name: &str, root: &Path, initrd: PathBuf, disks: Vec<DiskSpec>) -> DomainSpec {
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
        net: Default::default(),
        label: "red".into(),
        run_dir: root.join("run").join(name),
        user: None,
    }
}

pub fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// A stand-in `xl`: records each call, and lists the domain while a marker exists.
/// `xl create` fails while `xl.running.fail` exists.
pub fn fake_xl(dir: &Path) -> PathBuf {
    let script = dir.join("xl");
    let log = dir.join("xl.calls");
    let marker = dir.join("xl.running");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             echo \"$*\" >> '{log}'\n\
             case \"$1\" in\n\
             create) if [ -e '{marker}.fail' ]; then echo 'libxl: error: boom' >&2; exit 1; fi\n\
                     touch '{marker}' ;;\n\
             destroy) rm -f '{marker}' ;;\n\
             shutdown) rm -f '{marker}' ;;\n\
             domid) if [ -e '{marker}' ]; then echo 7; else echo \"$2 is an invalid domain identifier\" >&2; exit 1; fi ;;\n\
             list)\n\
               if [ -e '{marker}' ]; then\n\
                 echo 'Name                                        ID   Mem VCPUs\tState\tTime(s)'\n\
                 echo \"$2                                     7   400     2     -b----       0.3\"\n\
               else\n\
                 echo \"$2 is an invalid domain identifier (rc=-6)\" >&2; exit 1\n\
               fi ;;\n\
             esac\n",
            log = log.display(),
            marker = marker.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// The lifecycle contract of [`Hypervisor`], for any backend. `spec` must describe a
/// guest that keeps running until it is told to stop.
pub fn lifecycle_contract(hv: &dyn Hypervisor, spec: &DomainSpec, shutdown_timeout: Duration) {
    let (n, rd) = (spec.name.as_str(), spec.run_dir.as_path());
    let who = hv.name();
    assert_eq!(
        hv.state(n, rd).unwrap(),
        DomainState::Halted,
        "{who}: before start"
    );
    // Stopping a halted domain succeeds: a controller may retry after a crash.
    hv.shutdown(n, rd, Duration::from_secs(1)).unwrap();
    hv.kill(n, rd).unwrap();

    hv.start(spec)
        .unwrap_or_else(|e| panic!("{who}: start: {e}"));
    assert_eq!(
        hv.state(n, rd).unwrap(),
        DomainState::Running,
        "{who}: after start"
    );
    match hv.start(spec) {
        Err(HvError::AlreadyRunning { name, .. }) => assert_eq!(name, n),
        other => panic!("{who}: second start gave {other:?}"),
    }
    hv.shutdown(n, rd, shutdown_timeout)
        .unwrap_or_else(|e| panic!("{who}: shutdown: {e}"));
    assert_eq!(
        hv.state(n, rd).unwrap(),
        DomainState::Halted,
        "{who}: after shutdown"
    );
    hv.shutdown(n, rd, Duration::from_secs(1)).unwrap();

    // The same run dir starts again, and kill ends it at once.
    hv.start(spec)
        .unwrap_or_else(|e| panic!("{who}: restart: {e}"));
    assert_ne!(
        hv.state(n, rd).unwrap(),
        DomainState::Halted,
        "{who}: after restart"
    );
    hv.kill(n, rd)
        .unwrap_or_else(|e| panic!("{who}: kill: {e}"));
    assert_eq!(
        hv.state(n, rd).unwrap(),
        DomainState::Halted,
        "{who}: after kill"
    );
    hv.kill(n, rd).unwrap();
}
