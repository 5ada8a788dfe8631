//! Helpers shared by the end-to-end tests: run the real `qubes-ctl` binary against a
//! private root directory and read its JSON output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

pub mod ceph_micro;

/// The `qubes-ctl` binary of the same build profile as the running test
/// (`target/<profile>/qubes-ctl`), or `$QUBES_CTL_BIN`.
pub fn qubes_ctl_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("QUBES_CTL_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/qubes-ctl
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("qubes-ctl");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p qubes-ctl -p guest-agent` with the same profile) or set QUBES_CTL_BIN",
        bin.display()
    );
    bin
}

/// Runs `cmd`, which must succeed (its stderr in the panic otherwise).
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One isolated qubes-ctl installation (its own root: pool, run dir, kernels).
pub struct Ctl {
    pub root: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Ctl {
    /// A new root in a temporary directory (short path: unix socket paths are limited).
    pub fn new() -> Ctl {
        let tmp = tempfile::Builder::new()
            .prefix("qc")
            .tempdir_in("/tmp")
            .expect("tempdir");
        Ctl {
            root: tmp.path().to_path_buf(),
            _tmp: Some(tmp),
        }
    }

    pub fn at(root: &Path) -> Ctl {
        Ctl {
            root: root.to_path_buf(),
            _tmp: None,
        }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(qubes_ctl_bin());
        c.arg("--root").arg(&self.root).args(args);
        c.env_remove("QUBES_CTL_ROOT");
        c
    }

    pub fn output(&self, args: &[&str]) -> Output {
        self.cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("running qubes-ctl")
    }

    /// Runs a command that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "qubes-ctl {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command with `--format json` that must succeed; returns the parsed output.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--format", "json"];
        a.extend_from_slice(args);
        let s = self.ok(&a);
        serde_json::from_str(&s)
            .unwrap_or_else(|e| panic!("qubes-ctl {args:?}: bad JSON ({e}): {s}"))
    }

    /// Runs a command that must fail; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            !out.status.success(),
            "qubes-ctl {args:?} succeeded but should have failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Stops a daemon if one runs for this root (best effort).
    /// The pid the running daemon wrote to `ROOT/run/daemon.pid`.
    pub fn daemon_pid(&self) -> i32 {
        let path = self.root.join("run/daemon.pid");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    pub fn stop_daemon(&self) {
        let _ = self.output(&["daemon", "stop"]);
    }

    /// The daemon's admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.root.join("run/admin.sock")
    }

    /// One request to this root's daemon (see [`admin_call`]).
    pub fn call(&self, req: Value) -> Value {
        admin_call(&self.admin_socket(), req)
    }
}

/// The NBD URI a `qube start` reply gives for volume `vol`.
pub fn uri_of(started: &Value, vol: &str) -> String {
    started["volumes"]
        .as_array()
        .unwrap_or_else(|| panic!("no volumes in {started}"))
        .iter()
        .find(|v| v["volume"] == vol)
        .unwrap_or_else(|| panic!("no volume {vol} in {started}"))["nbd_uri"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The socket path of an `nbd+unix://` URI.
pub fn socket_of(uri: &str) -> String {
    uri.split("socket=").nth(1).unwrap().to_string()
}

/// Sends one raw request line to an admin socket; returns the reply.
pub fn raw_call(sock: &Path, line: &str) -> Value {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", sock.display()));
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    std::io::BufReader::new(&s).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{e}: {reply}"))
}

/// One request on an admin socket, in the protocol version the daemon's ping names;
/// returns the reply's `ok` value (an error reply panics).
pub fn admin_call(sock: &Path, mut req: Value) -> Value {
    static PROTOCOL: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    if req["op"] != "ping" {
        req["v"] = PROTOCOL
            .get_or_init(|| admin_call(sock, serde_json::json!({"op": "ping"}))["protocol"].clone())
            .clone();
    }
    let v = raw_call(sock, &req.to_string());
    if let Some(e) = v.get("error") {
        panic!("{req}: {e}");
    }
    v["ok"].clone()
}

/// A field of `/proc/PID/status` (`Uid`, `Threads`, `CapEff`...), its value trimmed.
pub fn proc_status(pid: i32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// Daemon processes serving `root` (their command line names it).
pub fn daemons_of(root: &Path) -> usize {
    let root = root.to_string_lossy();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&*root) && c.contains("daemon run"))
        .count()
}

/// Waits until process `pid` (a daemon: reparented, not ours to reap) has exited.
pub fn wait_for_exit(pid: i32) {
    for _ in 0..200 {
        // SAFETY: kill(pid, 0) only checks that the process exists.
        if unsafe { libc::kill(pid, 0) } != 0 {
            return;
        }
        if std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        }) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("process {pid} did not exit");
}

/// A command's stderr as text.
pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

impl Default for Ctl {
    fn default() -> Self {
        Ctl::new()
    }
}

impl Drop for Ctl {
    fn drop(&mut self) {
        if self._tmp.is_some() {
            self.stop_daemon();
            // Kill any QEMU left behind by a failed test: by its command line, or by its
            // working directory (a qube's QEMU works in its run dir and names its files
            // relative to it).
            let _ = Command::new("pkill")
                .arg("-f")
                .arg(self.root.to_string_lossy().as_ref())
                .status();
            let run = std::fs::canonicalize(self.root.join("run")).ok();
            for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let in_root = std::fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| {
                    cwd.starts_with(&self.root) || run.as_ref().is_some_and(|r| cwd.starts_with(r))
                });
                if in_root && pid != std::process::id() as i32 {
                    // SAFETY: plain kill(2) on a pid read from /proc.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so tests can regenerate expected data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The first Debian mirror URI in this machine's apt sources (tests never hard-code one).
pub fn apt_mirror() -> Option<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(rd.flatten().map(|e| e.path()));
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        for line in text.lines() {
            let line = line.trim();
            let uri = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().next()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace().find(|w| w.contains("://"))
            } else {
                None
            };
            if let Some(u) = uri {
                if u.trim_end_matches('/').ends_with("/debian") {
                    return Some(u.trim_end_matches('/').to_string());
                }
            }
        }
    }
    None
}

impl Ctl {
    /// A qube's state as `qube list` shows it (halted, running, paused).
    pub fn state(&self, qube: &str) -> String {
        let list = self.json(&["qube", "list"]);
        let q = list
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == qube)
            .unwrap_or_else(|| panic!("{qube} not in {list}"));
        q["state"].as_str().unwrap().to_string()
    }

    /// Where a qube's serial console is logged.
    pub fn console_path(&self, qube: &str) -> PathBuf {
        self.root.join("run/qubes").join(qube).join("console.log")
    }

    /// The qube's serial console so far ("" before its first boot).
    pub fn console(&self, qube: &str) -> String {
        std::fs::read(self.console_path(qube))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

/// Polls `f` every half second until it holds; panics after `timeout`.
pub fn wait_for<F: FnMut() -> bool>(what: &str, timeout: std::time::Duration, mut f: F) {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// An ext4 image of `size` for a private volume whose `/rw/config/rc.local` is
/// `rc_local` (the guest integration runs it at boot), with an empty /rw/home.
pub fn private_image(dir: &Path, name: &str, rc_local: &str, size: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let tree = dir.join(format!("{name}-tree"));
    std::fs::create_dir_all(tree.join("config")).unwrap();
    std::fs::create_dir_all(tree.join("home")).unwrap();
    let rc = tree.join("config/rc.local");
    std::fs::write(&rc, rc_local).unwrap();
    std::fs::set_permissions(&rc, std::fs::Permissions::from_mode(0o755)).unwrap();
    let img = dir.join(format!("{name}-private.img"));
    let st = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg(size)
        .status()
        .unwrap();
    assert!(st.success(), "mke2fs for {name}");
    img
}

/// Where the VM harness (scripts/testvm.sh) and the VM tests cache what they build:
/// `$QUBES_TESTVM_CACHE`, default /var/cache/qubes-ctl-testvm.
pub fn testvm_cache() -> PathBuf {
    std::env::var_os("QUBES_TESTVM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/qubes-ctl-testvm"))
}

/// A file's text in an ext4 image (debugfs, no mount), or None if it is not there.
pub fn ext4_cat(image: &Path, path: &str) -> Option<String> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .unwrap_or_else(|e| panic!("debugfs (e2fsprogs): {e}"));
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("File not found") || !out.status.success() {
        None
    } else {
        Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

/// The repository's top directory.
pub fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

/// A template package of recipes/debian/minimal.toml (template `debian-12-minimal`),
/// built once with this build's `template build` + `template export` and cached under
/// [`testvm_cache`], keyed by the hash of the recipe, the guest integration it
/// extends and the guest agent binary, so the VM tests and their reruns share one build (`template import` it).
/// `$QUBES_TEST_TEMPLATE_PKG` names a package to use instead.
pub fn debian_template_package() -> PathBuf {
    use std::os::unix::io::AsRawFd;
    if let Some(p) = std::env::var_os("QUBES_TEST_TEMPLATE_PKG") {
        return PathBuf::from(p);
    }
    let recipes = repo_dir().join("recipes");
    let mut h = blake3::Hasher::new();
    let mut files = vec![recipes.join("debian/minimal.toml")];
    let mut guest: Vec<PathBuf> = std::fs::read_dir(recipes.join("guest"))
        .expect("recipes/guest")
        .map(|e| e.unwrap().path())
        .collect();
    guest.sort();
    files.extend(guest);
    // The guest agent `template build` installs (next to qubes-ctl): a cached template
    // with an older agent would test that agent, not this build's.
    let agent = qubes_ctl_bin().with_file_name("qubes-guest-agent");
    if agent.is_file() {
        files.push(agent);
    }
    for f in &files {
        h.update(f.file_name().unwrap().as_encoded_bytes());
        h.update(&std::fs::read(f).unwrap());
    }
    let key = &h.finalize().to_hex()[..16];
    let dir = testvm_cache().join("templates");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let pkg = dir.join(format!("debian-12-minimal-{key}.qtpl"));
    let lock = std::fs::File::create(dir.join(".lock")).unwrap();
    // SAFETY: flock(2) on a descriptor this function owns; released when `lock` drops.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    if pkg.exists() {
        return pkg;
    }
    let ctl = Ctl::new();
    ctl.ok(&["pool", "init", "--size", "8G"]);
    let recipe = recipes.join("debian/minimal.toml");
    let mut args = vec!["template", "build", recipe.to_str().unwrap()];
    let mirror = apt_mirror();
    if let Some(m) = mirror.as_deref() {
        args.extend(["--mirror", m]);
    }
    ctl.ok(&args);
    let tmp = dir.join(format!(".{key}.tmp"));
    ctl.ok(&[
        "template",
        "export",
        "debian-12-minimal",
        tmp.to_str().unwrap(),
    ]);
    std::fs::rename(&tmp, &pkg).unwrap();
    pkg
}

/// A root whose pool is the namespace `ns` of the shared ceph-micro cluster, as machine
/// `machine` (the rbd tests and benchmarks).
pub fn rbd_root(ns: &str, machine: &str) -> Ctl {
    let c = ceph_micro::ceph();
    let ctl = Ctl::new();
    ctl.ok(&[
        "pool",
        "init",
        "--driver",
        "rbd",
        "--ceph-pool",
        &c.pool,
        "--ceph-conf",
        c.conf.to_str().unwrap(),
        "--ceph-id",
        ceph_micro::CEPH_ID,
        "--ceph-namespace",
        ns,
        "--machine-name",
        machine,
    ]);
    ctl
}
