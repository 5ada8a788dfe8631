//! Volume-model latency on each pool driver, printed side by side:
//! * start+stop of one AppVM's volumes (root snapshot of the template, private running
//!   snapshot, fresh volatile; then commit the private as a new head): median and p90;
//!   target on `thin` < 5 ms;
//! * 100 AppVMs started one after another, then stopped (target on `thin` < 1 s to start).
//!
//! Drivers: `thin` (pool files in a temporary directory), `reflink` on a loop-mounted XFS
//! (`mkfs.xfs -m reflink=1`; needs root), and `mem` as the floor. Every start and stop is a
//! durable commit (fsync) on the real drivers.
//!
//! Run: `cargo bench -p storage --bench model_bench` (ROUNDS=N to change the repetitions).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use storage::qubes::{QubeClass, Volumes};
use storage::thin::{ThinOptions, ThinPool};
use storage::{MemPool, Pool, ReflinkPool};

const APPVMS: usize = 100;

struct Figures {
    driver: &'static str,
    median: Duration,
    p90: Duration,
    start_all: Duration,
    stop_all: Duration,
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn measure(driver: &'static str, pool: Arc<dyn Pool>, rounds: usize) -> Figures {
    let v = Volumes::new(pool.clone());
    v.create_qube("deb", QubeClass::TemplateVM, None).unwrap();
    // A template root with some content, so snapshots share real extents/chunks.
    let image: Vec<u8> = (0..32usize << 20).map(|i| (i / 4096) as u8).collect();
    v.import("deb", "root", &mut &image[..], 64 << 20).unwrap();
    for i in 0..APPVMS {
        v.create_qube(&format!("app{i}"), QubeClass::AppVM, Some("deb"))
            .unwrap();
    }
    // Warm-up, and a write so the private has something to commit.
    let st = v.start("app0").unwrap();
    pool.open_volume(&st[1].key, false)
        .unwrap()
        .write_at(&[1u8; 4096], 0)
        .unwrap();
    v.stop("app0").unwrap();

    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        v.start("app0").unwrap();
        v.stop("app0").unwrap();
        samples.push(t.elapsed());
    }
    samples.sort();
    let median = samples[samples.len() / 2];
    let p90 = samples[samples.len() * 9 / 10];

    let t = Instant::now();
    for i in 0..APPVMS {
        v.start(&format!("app{i}")).unwrap();
    }
    let start_all = t.elapsed();
    let t = Instant::now();
    for i in 0..APPVMS {
        v.stop(&format!("app{i}")).unwrap();
    }
    let stop_all = t.elapsed();
    Figures {
        driver,
        median,
        p90,
        start_all,
        stop_all,
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// XFS with reflink in an image file, loop-mounted; unmounted on drop.
struct Xfs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Xfs {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("xfs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(2 << 30)
            .unwrap();
        run(Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&img));
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        Xfs { _dir: dir, mnt }
    }

    fn path(&self) -> &Path {
        &self.mnt
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        if !Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success())
        {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let mut all = Vec::new();

    let opts = || ThinOptions {
        chunk_size: 64 * 1024,
        capacity: 8 << 30,
    };
    let tmp = tempfile::tempdir().unwrap();
    let thin = ThinPool::create(&tmp.path().join("thin"), opts()).unwrap();
    all.push(measure("thin", thin, rounds));
    // The same on tmpfs, where fsync is free: what is left is CPU in the model and driver.
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let thin = ThinPool::create(&shm.path().join("thin"), opts()).unwrap();
    all.push(measure("thin (tmpfs)", thin, rounds));

    let xfs = Xfs::new();
    let reflink = Arc::new(ReflinkPool::create(&xfs.path().join("pool")).unwrap());
    all.push(measure("reflink (XFS loop)", reflink, rounds));

    all.push(measure("mem", Arc::new(MemPool::new()), rounds));

    println!("\nvolume model, {rounds} rounds of AppVM start+stop, then {APPVMS} AppVMs started and stopped");
    println!(
        "{:<20} {:>16} {:>16} {:>22} {:>22}",
        "driver", "start+stop p50", "start+stop p90", "start 100 AppVMs", "stop 100 AppVMs"
    );
    for f in &all {
        println!(
            "{:<20} {:>16} {:>16} {:>22} {:>22}",
            f.driver,
            ms(f.median),
            ms(f.p90),
            ms(f.start_all),
            ms(f.stop_all)
        );
    }
    println!("targets (thin): start+stop < 5 ms median, 100 starts < 1 s");
}
