//! A one-node Ceph cluster (scripts/ceph-micro.sh) shared by the tests of one test
//! binary: started at first use, stopped when the process exits (or dies: the script
//! watches our pid). Its Ceph pool `qubes` holds one RBD namespace per fixture.
//!
//! Used by the e2e tests (`e2e_tests::ceph_micro`) and, through `#[path]`, by the storage
//! crate's rbd tests (storage/tests/model_backends.rs): one starter for both.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct Ceph {
    /// The cluster's directory (ceph-micro.sh's DIR).
    pub dir: PathBuf,
    /// Its ceph.conf (keyring with users client.admin and client.qubes).
    pub conf: PathBuf,
    /// The RBD-initialised Ceph pool the tests use.
    pub pool: String,
}

/// The Ceph user the tests connect as (`profile rbd`, as a real deployment's).
pub const CEPH_ID: &str = "qubes";

pub fn ceph_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph-micro.sh")
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (is the tool installed? see scripts/install-deps.sh)")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

extern "C" fn stop_ceph() {
    if let Some(c) = CEPH.get() {
        let _ = Command::new(ceph_script()).arg("stop").arg(&c.dir).output();
    }
}

static CEPH: std::sync::OnceLock<Ceph> = std::sync::OnceLock::new();

pub fn ceph() -> &'static Ceph {
    CEPH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ceph-micro-{}", std::process::id()));
        let t = std::time::Instant::now();
        run(Command::new(ceph_script())
            .arg("start")
            .arg(&dir)
            .env("CEPH_MICRO_WATCH_PID", std::process::id().to_string())
            .env("CEPH_MICRO_NO_MGR", "1"));
        // SAFETY: registers a plain extern "C" function with no captured state.
        unsafe { libc::atexit(stop_ceph) };
        let conf = dir.join("ceph.conf");
        run(Command::new("ceph")
            .args(["-c"])
            .arg(&conf)
            .args(["osd", "pool", "create", "qubes", "8"]));
        run(Command::new("rbd")
            .arg("-c")
            .arg(&conf)
            .args(["pool", "init", "qubes"]));
        eprintln!(
            "ceph-micro cluster up in {:?} at {}",
            t.elapsed(),
            dir.display()
        );
        Ceph {
            dir,
            conf,
            pool: "qubes".into(),
        }
    })
}

static NS: AtomicU64 = AtomicU64::new(0);

/// A namespace name no other fixture of this cluster uses.
pub fn fresh_namespace() -> String {
    format!(
        "t{}-{}",
        std::process::id(),
        NS.fetch_add(1, Ordering::Relaxed)
    )
}
