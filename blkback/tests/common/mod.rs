//! Shared fixtures for the integration tests: devices for each backend, a server on a
//! socket in a temp dir, and helpers that run real NBD clients and fail loudly when a
//! tool is missing.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use blkback::testing::FileDevice;
use blkback::{nbd_uri, Export, NbdServer};
use storage::BlockDevice;

/// Which `BlockDevice` implementation backs the exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Sparse file (test double).
    File,
    /// `storage::MemPool`, the simulation pool driver (chunked, refcounted, capacity).
    Mem,
    /// `storage::ThinPool`, the real pool driver, in a directory of the fixture.
    Thin,
}

pub const BACKENDS: &[Backend] = &[Backend::File, Backend::Mem, Backend::Thin];

const CHUNK: u64 = 64 << 10;

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub server: Option<NbdServer>,
    pub sock: PathBuf,
    pub devices: Vec<Arc<dyn BlockDevice>>,
}

pub struct VolSpec {
    pub name: &'static str,
    pub size: u64,
    pub read_only: bool,
    /// Writes beyond this many bytes fail with ENOSPC (file backend: a space limit;
    /// thin backend: the pool capacity).
    pub space: Option<u64>,
}

impl VolSpec {
    pub fn rw(name: &'static str, size: u64) -> Self {
        VolSpec {
            name,
            size,
            read_only: false,
            space: None,
        }
    }
}

pub fn device(backend: Backend, dir: &Path, spec: &VolSpec) -> Arc<dyn BlockDevice> {
    match backend {
        Backend::File => {
            let mut d =
                FileDevice::create(&dir.join(spec.name.replace('/', "_")), spec.size).unwrap();
            if let Some(s) = spec.space {
                d = d.space_limit(s);
            }
            Arc::new(d.read_only(spec.read_only))
        }
        Backend::Mem => {
            use storage::Pool;
            let pool = storage::MemPool::with_options(CHUNK, spec.space);
            pool.create_volume(spec.name, spec.size).unwrap();
            pool.commit().unwrap();
            pool.open_volume(spec.name, spec.read_only).unwrap()
        }
        Backend::Thin => {
            use storage::Pool;
            let pdir = dir.join(format!("pool-{}", spec.name.replace('/', "_")));
            std::fs::create_dir_all(&pdir).unwrap();
            // Without a space limit the pool holds the whole volume plus room for CoW.
            let capacity = spec.space.unwrap_or(spec.size * 2).max(CHUNK);
            let pool = storage::ThinPool::create(
                &pdir,
                storage::ThinOptions {
                    chunk_size: CHUNK,
                    capacity,
                },
            )
            .unwrap();
            pool.create_volume(spec.name, spec.size).unwrap();
            pool.commit().unwrap();
            pool.open_volume(spec.name, spec.read_only).unwrap()
        }
    }
}

impl Fixture {
    pub fn new(backend: Backend, vols: &[VolSpec]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut exports = Vec::new();
        let mut devices = Vec::new();
        for v in vols {
            let d = device(backend, dir.path(), v);
            devices.push(d.clone());
            exports.push(Export {
                name: v.name.into(),
                description: format!("volume {}", v.name),
                device: d,
            });
        }
        let sock = dir.path().join("qube.sock");
        let server = NbdServer::bind_unix(&sock, exports).unwrap();
        Fixture {
            dir,
            server: Some(server),
            sock,
            devices,
        }
    }

    pub fn uri(&self, export: &str) -> String {
        nbd_uri(&self.sock, export)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn server(&self) -> &NbdServer {
        self.server.as_ref().unwrap()
    }

    pub fn shutdown(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown(Duration::from_secs(5)).unwrap();
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let _ = s.shutdown(Duration::from_secs(1));
        }
    }
}

/// Runs a host tool, panicking with its output if it is missing or fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?} (is it installed? see scripts/install-deps.sh): {e}")
    });
    if !out.status.success() {
        panic!(
            "{cmd:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deterministic test data: runs of pseudo-random bytes with all-zero stretches.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = vec![0u8; len];
    for (i, chunk) in v.chunks_mut(64 << 10).enumerate() {
        if i % 3 == 1 {
            continue; // leave a zero stretch
        }
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    v
}

/// Runs a Python script under nbdsh with the URI in `$URI`.
/// The script starts with `h` unconnected (so it can set options first).
/// nbdsh runs `python3` from PATH; the libnbd module lives in the system Python, so the
/// system directories go first.
pub fn nbdsh(uri: &str, script: &str) -> Output {
    let path = format!(
        "/usr/bin:/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let script = format!("import os, errno, nbd\nURI = os.environ['URI']\n{script}");
    run(Command::new("nbdsh")
        .arg("-c")
        .arg(script)
        .env("URI", uri)
        .env("PATH", path))
}
