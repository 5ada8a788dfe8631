//! Making and opening the pool, and what `pool info` reports of it.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use storage::{Pool, PoolInfo};

use super::Controller;
use crate::paths::Paths;
use crate::results::PoolReport;

/// Which pool driver a directory holds.
pub(super) fn detect_driver(dir: &Path) -> Option<&'static str> {
    if dir.join("pool.meta").exists() {
        Some("thin")
    } else if dir.join("lvm.json").exists() {
        Some("lvm_thin")
    } else if dir.join("pool.json").exists() {
        Some("reflink")
    } else if dir.join("rbd.json").exists() {
        Some("rbd")
    } else {
        None
    }
}

/// Free bytes of the filesystem holding `dir` (the default pool capacity).
pub(super) fn fs_free_bytes(dir: &Path) -> Result<u64> {
    let st = rustix::fs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// `pool info` warns when the filesystem holding the (sparse) pool has less free.
pub const HOST_FREE_WARN: u64 = 1 << 30;

/// `qube start` is refused below this: a guest writing into a full host filesystem
/// would only get I/O errors (Qubes users hit this: qubes-issues #6451, #8707).
pub const HOST_FREE_START_MARGIN: u64 = 128 << 20;

pub struct InitOptions {
    pub driver: String,
    pub chunk_size: u64,
    pub capacity: Option<u64>,
    /// `rbd` only: which cluster and pool (the other drivers ignore it).
    pub rbd: Option<storage::RbdOptions>,
    /// lvm_thin: the VG and thin pool it uses.
    pub volume_group: Option<String>,
    pub thin_pool: Option<String>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            driver: "thin".into(),
            chunk_size: 64 << 10,
            capacity: None,
            rbd: None,
            volume_group: None,
            thin_pool: None,
        }
    }
}

/// Creates a pool under `paths`. Refuses if one exists.
pub fn init_pool(paths: &Paths, opts: &InitOptions) -> Result<PoolInfo> {
    let dir = paths.pool_dir();
    if let Some(d) = detect_driver(&dir) {
        bail!("a {d} pool already exists at {}; remove that directory first if you really want a new one", dir.display());
    }
    paths.secure()?;
    if opts.driver == "rbd" {
        let rbd = opts
            .rbd
            .as_ref()
            .ok_or_else(|| anyhow!("the rbd driver needs --ceph-pool NAME"))?;
        drop(
            storage::RbdPool::create(&dir, rbd)
                .with_context(|| format!("creating an rbd pool on Ceph pool {}", rbd.ceph_pool))?,
        );
        paths.secure()?;
        let pool = open_pool(paths)?;
        return Ok(pool.info()?);
    }
    if opts.driver == "lvm_thin" {
        let (Some(vg), Some(tp)) = (&opts.volume_group, &opts.thin_pool) else {
            bail!("the lvm_thin driver uses an existing LVM thin pool: give --volume-group VG --thin-pool POOL (Qubes' are qubes_dom0 and vm-pool)");
        };
        storage::LvmThinPool::create(&dir, &storage::LvmThinOptions::new(vg, tp))
            .with_context(|| format!("making an lvm_thin pool over {vg}/{tp}"))?;
        paths.secure()?;
        return Ok(open_pool(paths)?.info()?);
    }
    if opts.volume_group.is_some() || opts.thin_pool.is_some() {
        bail!("--volume-group and --thin-pool are for --driver lvm_thin");
    }
    // Leave a little room on the filesystem for metadata and the rest of the system.
    let free = fs_free_bytes(&dir)?;
    let capacity = match opts.capacity {
        Some(c) => {
            if c > free {
                eprintln!(
                    "qubes-ctl: warning: the pool's capacity ({}) is more than the {} free on the filesystem holding {}; \
                     guests get write errors once that fills (`qubes-ctl pool info` shows the free space)",
                    crate::units::human_size(c),
                    crate::units::human_size(free),
                    dir.display()
                );
            }
            c
        }
        None => free / 100 * 95,
    };
    let pool: Arc<dyn Pool> = match opts.driver.as_str() {
        "thin" => storage::thin::ThinPool::create(
            &dir,
            storage::thin::ThinOptions {
                chunk_size: opts.chunk_size,
                capacity,
            },
        )?,
        "reflink" => Arc::new(storage::reflink::ReflinkPool::create(&dir)?),
        other => {
            bail!("unknown pool driver {other:?}; use thin (default), reflink, rbd or lvm_thin")
        }
    };
    drop(pool);
    // The files were made inside the 0700 directory; make them 0600 themselves.
    paths.secure()?;
    let pool = open_pool(paths)?;
    Ok(pool.info()?)
}

pub(super) fn open_pool(paths: &Paths) -> Result<Arc<dyn Pool>> {
    let dir = paths.pool_dir();
    match detect_driver(&dir) {
        Some("thin") => Ok(storage::thin::ThinPool::open(&dir)?),
        Some("reflink") => Ok(Arc::new(storage::reflink::ReflinkPool::open(&dir)?)),
        Some("rbd") => Ok(Arc::new(storage::RbdPool::open(&dir)?)),
        Some("lvm_thin") => Ok(Arc::new(storage::LvmThinPool::open(&dir)?)),
        _ => bail!(
            "no pool at {}; create one with `qubes-ctl pool init`",
            dir.display()
        ),
    }
}

impl Controller {
    /// The pool's figures, with the free space of the filesystem holding it: the pool
    /// file is sparse, so a host filesystem that fills up stops guests' writes.
    pub(super) fn pool_info(&self) -> Result<PoolReport> {
        let mut info = self.pool().info()?;
        let pct = |used: u64, cap: u64| (used as f64 * 1000.0 / cap as f64).round() / 10.0;
        let data_used_percent = (info.capacity > 0).then(|| pct(info.data_used, info.capacity));
        let metadata_used_percent = info
            .metadata_capacity
            .filter(|&c| c > 0)
            .map(|mc| pct(info.metadata_used, mc));
        let free = fs_free_bytes(&self.paths.pool_dir())?;
        info.host_free = Some(free);
        let warning = (free < HOST_FREE_WARN).then(|| {
            format!(
                "the filesystem holding the pool has only {} free (qube start is refused below {}); free space there",
                crate::units::human_size(free),
                crate::units::human_size(HOST_FREE_START_MARGIN)
            )
        });
        Ok(PoolReport {
            info,
            data_used_percent,
            metadata_used_percent,
            warning,
        })
    }
}
