//! Pool backends the model and conformance tests run against, behind one fixture: a pool,
//! and a simulated crash that reopens it at its last commit. Included by the test crates
//! with `#[path]`; compiled on its own it checks that each fixture works.
//!
//! The reflink backends need root: they make XFS (`mkfs.xfs -m reflink=1`) and btrfs
//! filesystems in image files and loop-mount them under a temporary directory; the mount
//! is shared by the tests that run at the same time and unmounted when the last drops it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use storage::thin::{ThinOptions, ThinPool};
use storage::{MemPool, Pool, ReflinkPool};

pub trait Backend {
    fn name(&self) -> &'static str;
    fn pool(&self) -> Arc<dyn Pool>;
    /// Drops the pool without committing and returns it as reopened after a power cut.
    /// Every handle to the old pool must have been dropped.
    fn crash(&mut self) -> Arc<dyn Pool>;
    /// Staged operations vanish at a crash before the commit. False for `rbd`: a Ceph
    /// pool has no multi-image transaction, so each operation is durable when it returns.
    fn transactional(&self) -> bool {
        true
    }
    /// Import shares identical chunks inside one image (false for `rbd`: RBD objects
    /// cannot share data).
    fn dedups_within_image(&self) -> bool {
        true
    }
    /// Import with `dedup_against` shares the chunks an older version already holds
    /// (false for `rbd`, which copies every chunk).
    fn dedups_against_older(&self) -> bool {
        true
    }
}

#[derive(Default)]
pub struct Mem {
    pool: MemPool,
}

impl Mem {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(chunk: u64, capacity: u64) -> Self {
        Mem {
            pool: MemPool::with_options(chunk, Some(capacity)),
        }
    }
}

impl Backend for Mem {
    fn name(&self) -> &'static str {
        "mem"
    }

    fn pool(&self) -> Arc<dyn Pool> {
        Arc::new(self.pool.clone())
    }

    fn crash(&mut self) -> Arc<dyn Pool> {
        self.pool = self.pool.crash();
        self.pool()
    }
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

/// A filesystem in an image file, loop-mounted; unmounted on drop.
pub struct LoopFs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl LoopFs {
    pub fn new(kind: &str, size: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img).unwrap().set_len(size).unwrap();
        match kind {
            "xfs" => run(Command::new("mkfs.xfs")
                .args(["-q", "-m", "reflink=1"])
                .arg(&img)),
            "btrfs" => run(Command::new("mkfs.btrfs").arg("-q").arg(&img)),
            // No blocks reserved for root: the tests run as root and fill it.
            "ext4" => run(Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0"])
                .arg(&img)),
            "tmpfs" => {}
            other => panic!("unknown filesystem {other}"),
        }
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        if kind == "tmpfs" {
            run(Command::new("mount")
                .args(["-t", "tmpfs", "none"])
                .arg(&mnt));
        } else {
            run(Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt));
        }
        LoopFs { _dir: dir, mnt }
    }

    /// One mount per filesystem kind shared by the tests running at the same time.
    pub fn shared(kind: &'static str) -> Arc<LoopFs> {
        static XFS: Mutex<Weak<LoopFs>> = Mutex::new(Weak::new());
        static BTRFS: Mutex<Weak<LoopFs>> = Mutex::new(Weak::new());
        let slot = if kind == "xfs" { &XFS } else { &BTRFS };
        let mut g = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fs) = g.upgrade() {
            return fs;
        }
        let fs = Arc::new(LoopFs::new(kind, 1 << 30));
        *g = Arc::downgrade(&fs);
        fs
    }

    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// A fresh directory on this filesystem.
    pub fn subdir(&self) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        self.mnt.join(format!(
            "t{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still holds a file open: detach now, the kernel finishes later.
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// `ReflinkPool` on a loop-mounted XFS or btrfs.
pub struct Reflink {
    kind: &'static str,
    fs: Arc<LoopFs>,
    dir: PathBuf,
    pool: Option<Arc<ReflinkPool>>,
}

impl Reflink {
    pub fn xfs() -> Self {
        Self::on("xfs")
    }

    pub fn btrfs() -> Self {
        Self::on("btrfs")
    }

    fn on(kind: &'static str) -> Self {
        let fs = LoopFs::shared(kind);
        let dir = fs.subdir();
        let pool = Arc::new(ReflinkPool::create(&dir).unwrap());
        Reflink {
            kind,
            fs,
            dir,
            pool: Some(pool),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Reflink {
    fn drop(&mut self) {
        self.pool = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Backend for Reflink {
    fn name(&self) -> &'static str {
        if self.kind == "xfs" {
            "reflink-xfs"
        } else {
            "reflink-btrfs"
        }
    }

    fn pool(&self) -> Arc<dyn Pool> {
        self.pool.clone().expect("pool is open")
    }

    fn crash(&mut self) -> Arc<dyn Pool> {
        let old = self.pool.take().expect("pool is open");
        assert_eq!(
            Arc::strong_count(&old),
            1,
            "drop every user of the pool before the crash"
        );
        drop(old);
        self.pool = Some(Arc::new(ReflinkPool::open(&self.dir).unwrap()));
        self.pool()
    }
}

/// `ThinPool`, the default driver, in a temporary directory (64 KiB chunks).
pub struct Thin {
    dir: tempfile::TempDir,
    pool: Option<Arc<ThinPool>>,
}

impl Default for Thin {
    fn default() -> Self {
        Self::with_options(64 * 1024, 8 << 30)
    }
}

impl Thin {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_options(chunk_size: u64, capacity: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pool = ThinPool::create(
            &dir.path().join("pool"),
            ThinOptions {
                chunk_size,
                capacity,
            },
        )
        .unwrap();
        Thin {
            dir,
            pool: Some(pool),
        }
    }
}

impl Backend for Thin {
    fn name(&self) -> &'static str {
        "thin"
    }

    fn pool(&self) -> Arc<dyn Pool> {
        self.pool.clone().expect("pool is open")
    }

    fn crash(&mut self) -> Arc<dyn Pool> {
        let old = self.pool.take().expect("pool is open");
        assert_eq!(
            Arc::strong_count(&old),
            1,
            "drop every user of the pool before the crash"
        );
        drop(old);
        self.pool = Some(ThinPool::open(&self.dir.path().join("pool")).unwrap());
        self.pool()
    }
}

#[test]
fn fixtures_work() {
    let mut m = Mem::new();
    m.pool().create_volume("a", 4096).unwrap();
    assert!(!m.crash().exists("a").unwrap());
    let mut t = Thin::new();
    t.pool().create_volume("a", 4096).unwrap();
    assert!(!t.crash().exists("a").unwrap());
    for mut b in [Reflink::xfs(), Reflink::btrfs()] {
        b.pool().create_volume("a", 4096).unwrap();
        assert!(!b.crash().exists("a").unwrap(), "{}", b.name());
    }
}

#[path = "../../tests/ceph_micro.rs"]
mod ceph_micro;
#[allow(unused_imports)]
pub use ceph_micro::{ceph, ceph_script, Ceph};

/// Options for a fresh, empty RBD namespace of the shared cluster (64 KiB objects, as
/// `thin`'s default chunk, so the contract's chunk-sized cases stay small).
pub fn rbd_options() -> storage::RbdOptions {
    let c = ceph();
    let mut o = storage::RbdOptions::new(&c.pool);
    o.ceph_conf = Some(c.conf.clone());
    o.ceph_id = Some(ceph_micro::CEPH_ID.into());
    o.ceph_namespace = Some(ceph_micro::fresh_namespace());
    o.order = 16;
    // The driver's default: on a loaded 2-core host (a release build beside the tests)
    // single cluster operations of the model rules took over 10 s.
    o.op_timeout = 30;
    o
}

/// `RbdPool` on a namespace of its own; its root directory holds only rbd.json + lock.
pub struct Rbd {
    dir: tempfile::TempDir,
    pool: Option<Arc<storage::RbdPool>>,
}

impl Default for Rbd {
    fn default() -> Self {
        Self::new()
    }
}

impl Rbd {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pool = storage::RbdPool::create(&dir.path().join("pool"), &rbd_options()).unwrap();
        Rbd {
            dir,
            pool: Some(Arc::new(pool)),
        }
    }
}

impl Backend for Rbd {
    fn name(&self) -> &'static str {
        "rbd"
    }

    fn transactional(&self) -> bool {
        false
    }

    fn dedups_within_image(&self) -> bool {
        false
    }

    fn dedups_against_older(&self) -> bool {
        false
    }

    fn pool(&self) -> Arc<dyn Pool> {
        self.pool.clone().expect("pool is open")
    }

    fn crash(&mut self) -> Arc<dyn Pool> {
        let old = self.pool.take().expect("pool is open");
        assert_eq!(
            Arc::strong_count(&old),
            1,
            "drop every user of the pool before the crash"
        );
        drop(old);
        self.pool = Some(Arc::new(
            storage::RbdPool::open(&self.dir.path().join("pool")).unwrap(),
        ));
        self.pool()
    }
}

/// `lvm_thin` on a thin pool of a volume group of its own (LV names are unique per VG,
/// and the tests run in parallel), on a loop device over a sparse file in
/// `$QUBES_LVM_TEST_DIR` (set by `lvm_thin.rs` inside the VM harness); removed on drop.
pub struct LvmThin {
    dir: tempfile::TempDir,
    vg: String,
    loopdev: String,
    img: PathBuf,
    pool: Option<Arc<storage::LvmThinPool>>,
}

impl Default for LvmThin {
    fn default() -> Self {
        Self::with_size("384M")
    }
}

impl LvmThin {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_size(size: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let base = std::env::var("QUBES_LVM_TEST_DIR").expect(
            "QUBES_LVM_TEST_DIR names a directory for the PV images (lvm_thin.rs sets it in the VM)",
        );
        let vg = format!(
            "qt{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let img = Path::new(&base).join(format!("{vg}.img"));
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup: {out:?}");
        let loopdev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        run(Command::new("vgcreate").args(["-q", &vg, &loopdev]));
        run(Command::new("lvcreate").args([
            "-q",
            "--type",
            "thin-pool",
            "-L",
            size,
            "-n",
            "pool",
            &vg,
        ]));
        let dir = tempfile::tempdir().unwrap();
        let pool = storage::LvmThinPool::create(
            &dir.path().join("pool"),
            &storage::LvmThinOptions::new(&vg, "pool"),
        )
        .unwrap();
        LvmThin {
            dir,
            vg,
            loopdev,
            img,
            pool: Some(Arc::new(pool)),
        }
    }
}

impl Backend for LvmThin {
    fn name(&self) -> &'static str {
        "lvm_thin"
    }

    /// dm-thin shares blocks only between snapshots: an import shares the chunks of an
    /// older version (`dedup_against`), not equal chunks inside one image.
    fn dedups_within_image(&self) -> bool {
        false
    }

    fn pool(&self) -> Arc<dyn Pool> {
        self.pool.clone().expect("pool is open")
    }

    fn crash(&mut self) -> Arc<dyn Pool> {
        let p = self.pool.take().expect("pool is open");
        assert_eq!(
            Arc::strong_count(&p),
            1,
            "a handle to the pool is still alive"
        );
        drop(p);
        self.pool = Some(Arc::new(
            storage::LvmThinPool::open(&self.dir.path().join("pool")).unwrap(),
        ));
        self.pool()
    }
}

impl Drop for LvmThin {
    fn drop(&mut self) {
        self.pool = None;
        let _ = Command::new("vgremove")
            .args(["-q", "-y", "-f", &self.vg])
            .status();
        let _ = Command::new("losetup").args(["-d", &self.loopdev]).status();
        let _ = std::fs::remove_file(&self.img);
    }
}
