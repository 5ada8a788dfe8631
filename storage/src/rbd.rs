//! `rbd`: volumes as Ceph RBD images, so that several machines (roots) share one pool of
//! templates and qubes, as Proxmox's `RBDPlugin` and OpenStack Cinder use RBD.
//!
//! ```text
//!   DIR/rbd.json     which cluster: Ceph pool, ceph.conf, user, this machine's name
//!   DIR/lock         flock()ed by the one process that owns this root
//!   Ceph pool        image `qubes_<key>` per volume ('/' -> '~', '@' -> '=' in the key),
//!                    attributes as image metadata `qubes.attr.<name>`, the pool key/value
//!                    store as RBD pool metadata `qubes.<key>`
//! ```
//!
//! Mapping of the [`Pool`] contract onto RBD:
//! * `snapshot(src, dst)`: an RBD snapshot of `src`, a clone v2 of it as `dst`, then the
//!   snapshot is removed: with clone v2, RBD keeps it (in its trash namespace) for as long
//!   as the clone lives. So an AppVM root is a clone of its template's current snapshot, a
//!   revision is a clone of a snapshot of the volume, and none of it copies data. A clone
//!   whose parent chain is deeper than [`RbdOptions::max_clone_depth`] (Cinder's
//!   `rbd_max_clone_depth`, 5) is flattened in the background.
//! * Removing an image that still has clones moves it to the RBD trash; RBD frees it once
//!   its last clone is gone (purged after each removal).
//! * Catalogue operations are durable when they return; the cluster has no multi-image
//!   transaction, so [`Pool::commit`] is a flush of every open image. A crash between the
//!   steps of a qube start leaves those steps done, which the volume model repairs at the
//!   next start (as after a crash of the `reflink` driver between two files).
//! * A writable open takes the image's exclusive lock and keeps it (`rbd_lock_acquire`):
//!   another machine's writable open is refused with [`PoolError::HeldElsewhere`], which
//!   names the machine recorded in the image's `qubes.holder` metadata. If the holder is
//!   this very machine and root (a daemon that was killed: this process holds `DIR/lock`
//!   now, so the old one is gone), its lock is broken and the image resumes dirty.
//! * A cluster that does not answer fails I/O after [`RbdOptions::op_timeout`] seconds
//!   instead of hanging the guest forever (librados waits indefinitely by default).
//! * `chunk_size` is the RBD object size; `block_status` is `rbd_diff_iterate2` (object map
//!   with fast-diff: cheap).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use rbd_sys::{Cluster, CreateOptions, Image, IoCtx};
use serde::{Deserialize, Serialize};

use crate::pool::{
    validate_volume_key, BlockDevice, BlockError, BlockErrorKind, Extent, ImportOptions,
    ImportStats, Pool, PoolError, PoolInfo, VerifyReport, VolumeInfo,
};

const CONFIG: &str = "rbd.json";
const IMAGE_PREFIX: &str = "qubes_";
const ATTR_PREFIX: &str = "qubes.attr.";
const META_PREFIX: &str = "qubes.";
const HOLDER: &str = "qubes.holder";

/// Where the pool lives; stored in `DIR/rbd.json` by [`RbdPool::create`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RbdOptions {
    /// Ceph pool (created and `rbd pool init`ed by the cluster's administrator).
    pub ceph_pool: String,
    /// RBD namespace inside the pool (created if missing); None: the default one.
    #[serde(default)]
    pub ceph_namespace: Option<String>,
    /// ceph.conf; None: librados' default search (`$CEPH_CONF`, /etc/ceph/ceph.conf).
    #[serde(default)]
    pub ceph_conf: Option<PathBuf>,
    /// Ceph user without `client.` (default `admin`); its keyring comes from the conf.
    #[serde(default)]
    pub ceph_id: Option<String>,
    /// How other machines see this one in lock errors (default: `hostname:DIR`).
    #[serde(default)]
    pub machine: Option<String>,
    /// log2 of the object size of new images (22: 4 MiB).
    #[serde(default = "default_order")]
    pub order: u8,
    /// Clones deeper than this are flattened in the background.
    #[serde(default = "default_depth")]
    pub max_clone_depth: u32,
    /// Seconds before an OSD or mon request fails instead of waiting for the cluster.
    #[serde(default = "default_timeout")]
    pub op_timeout: u32,
}

fn default_order() -> u8 {
    22
}
fn default_depth() -> u32 {
    5
}
fn default_timeout() -> u32 {
    30
}

impl RbdOptions {
    pub fn new(ceph_pool: &str) -> Self {
        RbdOptions {
            ceph_pool: ceph_pool.to_string(),
            ceph_namespace: None,
            ceph_conf: None,
            ceph_id: None,
            machine: None,
            order: default_order(),
            max_clone_depth: default_depth(),
            op_timeout: default_timeout(),
        }
    }
}

/// `tpl/root@1.2` -> `qubes_tpl~root=1.2`: RBD names may not hold `/` or `@` (the CLI's
/// pool and snapshot separators); `~` and `=` never occur in a volume key.
fn image_name(key: &str) -> String {
    format!("{IMAGE_PREFIX}{}", key.replace('/', "~").replace('@', "="))
}

fn volume_key(image: &str) -> Option<String> {
    image
        .strip_prefix(IMAGE_PREFIX)
        .map(|s| s.replace('~', "/").replace('=', "@"))
}

fn pool_err(e: rbd_sys::Error, key: &str) -> PoolError {
    match e.errno {
        libc::ENOENT => PoolError::NoSuchVolume(key.to_string()),
        libc::EEXIST => PoolError::VolumeExists(key.to_string()),
        libc::ENOSPC | libc::EDQUOT => PoolError::NoSpace { needed: 0, free: 0 },
        _ => PoolError::io(e.op.clone(), std::io::Error::from_raw_os_error(e.errno)),
    }
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// An image open in this process, shared by every handle on the volume (one exclusive
/// lock per machine, not per handle).
struct Open {
    image: Image,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    handles: usize,
    writers: usize,
}

struct Inner {
    io: Arc<IoCtx>,
    cluster: Arc<Cluster>,
    opts: RbdOptions,
    machine: String,
    /// Open images by volume key.
    open: Mutex<HashMap<String, Arc<Open>>>,
    /// Serializes snapshots: each needs the source's exclusive lock, and concurrent
    /// short-lived handles in one process pass it back and forth until librbd times out.
    snapshots: Mutex<()>,
    /// Commits by this process (`info().generation`): the cluster has no pool-wide
    /// commit, so this only shows that commits happen.
    commits: std::sync::atomic::AtomicU64,
    _lock: fs::File,
}

/// The `rbd` pool driver.
#[derive(Clone)]
pub struct RbdPool {
    inner: Arc<Inner>,
}

impl RbdPool {
    /// Records `opts` in `dir` (a new root's pool directory) and opens the pool; the Ceph
    /// pool must exist. Refuses a directory that already holds a pool.
    pub fn create(dir: &Path, opts: &RbdOptions) -> Result<RbdPool, PoolError> {
        fs::create_dir_all(dir)
            .map_err(|e| PoolError::io(format!("creating {}", dir.display()), e))?;
        let cfg = dir.join(CONFIG);
        if cfg.exists() {
            return Err(PoolError::Invalid(format!(
                "{} already holds an rbd pool",
                dir.display()
            )));
        }
        let json = serde_json::to_vec_pretty(opts).expect("options serialize");
        let tmp = dir.join("rbd.json.tmp");
        fs::write(&tmp, json)
            .and_then(|()| fs::File::open(&tmp)?.sync_all())
            .and_then(|()| fs::rename(&tmp, &cfg))
            .and_then(|()| fs::File::open(dir)?.sync_all())
            .map_err(|e| PoolError::io(format!("writing {}", cfg.display()), e))?;
        match Self::open(dir) {
            Ok(p) => Ok(p),
            Err(e) => {
                // A pool we cannot reach is not a pool: leave the directory reusable.
                let _ = fs::remove_file(&cfg);
                Err(e)
            }
        }
    }

    pub fn open(dir: &Path) -> Result<RbdPool, PoolError> {
        let cfg = dir.join(CONFIG);
        let raw = fs::read(&cfg).map_err(|e| PoolError::NotAPool {
            path: dir.display().to_string(),
            reason: format!("reading {}: {e}", cfg.display()),
        })?;
        let opts: RbdOptions = serde_json::from_slice(&raw)
            .map_err(|e| PoolError::Corrupt(format!("{} cannot be opened: {e}", cfg.display())))?;
        let lock = crate::dirlock::lock_pool_dir(dir)?;
        let machine = opts
            .machine
            .clone()
            .unwrap_or_else(|| format!("{}:{}", hostname(), dir.display()));
        let t = opts.op_timeout.to_string();
        let cluster = Cluster::connect(
            opts.ceph_conf.as_deref(),
            opts.ceph_id.as_deref(),
            &[
                ("rados_osd_op_timeout", &t),
                ("rados_mon_op_timeout", &t),
                ("client_mount_timeout", &t),
            ],
        )
        .map_err(|e| PoolError::NotAPool {
            path: dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let io = cluster
            .ioctx(&opts.ceph_pool, opts.ceph_namespace.as_deref())
            .map_err(|e| PoolError::NotAPool {
                path: dir.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(RbdPool {
            inner: Arc::new(Inner {
                io,
                cluster,
                opts,
                machine,
                open: Mutex::new(HashMap::new()),
                commits: Default::default(),
                snapshots: Mutex::new(()),
                _lock: lock,
            }),
        })
    }

    /// This root's name in lock errors.
    pub fn machine(&self) -> &str {
        &self.inner.machine
    }

    /// Runs `f` on the volume's image: the shared open one if any (so the lock holder
    /// does the work), else a short-lived handle.
    fn with_image<T>(
        &self,
        key: &str,
        f: impl FnOnce(&Image) -> Result<T, rbd_sys::Error>,
    ) -> Result<T, PoolError> {
        validate_volume_key(key)?;
        let shared = self.inner.open.lock().get(key).cloned();
        match shared {
            Some(o) => f(&o.image).map_err(|e| pool_err(e, key)),
            None => {
                let img = Image::open(&self.inner.io, &image_name(key), false)
                    .map_err(|e| pool_err(e, key))?;
                f(&img).map_err(|e| pool_err(e, key))
            }
        }
    }

    /// How many parents the chain of the image `img` has. By id: a parent removed since
    /// (a pruned revision) waits in the RBD trash, where its name opens nothing.
    fn depth(&self, img: &Image) -> Result<u32, rbd_sys::Error> {
        let mut next = img.parent_id()?;
        let mut depth = 0;
        while let Some(id) = next {
            depth += 1;
            next = Image::open_by_id_read_only(&self.inner.io, &id)?.parent_id()?;
        }
        Ok(depth)
    }

    /// Flattens `key` in a thread of its own; a failure is logged and retried by the
    /// next snapshot of that chain. Through the handle this process serves the volume
    /// with, if any: that one holds the exclusive lock (a qube's `@run` clone is opened
    /// for its guest right after the snapshot, and would take the lock from a handle of
    /// the flatten's own and fail it). The thread holds no reference to the pool, so a
    /// pool dropped meanwhile closes (and unlocks its root) at once.
    fn flatten_in_background(&self, key: String) {
        let pool = Arc::downgrade(&self.inner);
        let io = self.inner.io.clone();
        std::thread::spawn(move || {
            let mut last = None;
            for attempt in 0..5 {
                if attempt > 0 {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
                let Some(inner) = pool.upgrade() else { return };
                let shared = inner.open.lock().get(&key).cloned();
                drop(inner);
                let r = match shared {
                    Some(o) => o.image.flatten(),
                    None => Image::open(&io, &image_name(&key), false).and_then(|i| i.flatten()),
                };
                match r {
                    Ok(()) => {
                        tracing::info!(volume = %key, "flattened a deep RBD clone");
                        return;
                    }
                    // Removed meanwhile: nothing to flatten.
                    Err(e) if e.errno == libc::ENOENT => return,
                    Err(e) => last = Some(e),
                }
            }
            if let Some(e) = last {
                tracing::warn!(volume = %key, error = %e, "flattening failed");
            }
        });
    }

    /// Refuses a writable open of an image another machine holds.
    fn take_lock(&self, key: &str, img: &Image) -> Result<(), PoolError> {
        // Broken before asking for the lock: librbd would first ask the owner to hand it
        // over, and a killed daemon's client answers nothing until its watch times out
        // (~30 s per image).
        self.break_own_stale_lock(key, img)?;
        img.lock_acquire().map_err(|e| {
            let holder = img.meta_get(HOLDER).ok().flatten().unwrap_or_default();
            let owners = img.lock_owners().unwrap_or_default();
            PoolError::HeldElsewhere {
                volume: key.to_string(),
                holder: if holder.is_empty() {
                    "an unknown machine".into()
                } else {
                    holder
                },
                owners: owners.join(", "),
                detail: e.to_string(),
            }
        })?;
        img.meta_set(HOLDER, Some(&self.inner.machine))
            .map_err(|e| pool_err(e, key))
    }

    /// For an image not open for writing in this process: a lock held in the name of
    /// this machine is a killed daemon's of this root (this process holds `DIR/lock` now,
    /// so that client is dead): it is broken (and its client blocklisted), and the image
    /// resumes dirty. Returns the holder recorded on the image and the lock's owners.
    fn break_own_stale_lock(
        &self,
        key: &str,
        img: &Image,
    ) -> Result<(String, Vec<String>), PoolError> {
        let owners = img.lock_owners().map_err(|e| pool_err(e, key))?;
        if owners.is_empty() {
            return Ok((String::new(), owners));
        }
        let holder = img.meta_get(HOLDER).ok().flatten().unwrap_or_default();
        if holder == self.inner.machine {
            tracing::warn!(volume = %key, ?owners, "breaking the lock a killed daemon of this machine left");
            for o in &owners {
                img.lock_break(o).map_err(|e| pool_err(e, key))?;
            }
            return Ok((holder, Vec::new()));
        }
        Ok((holder, owners))
    }

    /// For an image not open in this process: another machine's lock (a qube running
    /// there) is [`PoolError::HeldElsewhere`]. A lock with no holder recorded is a
    /// short-lived one librbd takes for an operation (a snapshot, a flatten), not a
    /// running qube's.
    fn refuse_if_held_elsewhere(&self, key: &str, img: &Image) -> Result<(), PoolError> {
        let (holder, owners) = self.break_own_stale_lock(key, img)?;
        if owners.is_empty() || holder.is_empty() {
            return Ok(());
        }
        Err(PoolError::HeldElsewhere {
            volume: key.to_string(),
            holder,
            owners: owners.join(", "),
            detail: "the image is open for writing there".into(),
        })
    }

    fn purge_trash(&self) {
        if let Err(e) = self.inner.io.trash_purge() {
            tracing::warn!(error = %e, "purging the RBD trash failed; retried at the next removal");
        }
    }
}

impl Pool for RbdPool {
    fn driver(&self) -> &'static str {
        "rbd"
    }

    fn info(&self) -> Result<PoolInfo, PoolError> {
        let (total, used, _avail) = self
            .inner
            .cluster
            .stat()
            .map_err(|e| pool_err(e, &self.inner.opts.ceph_pool))?;
        let volumes = self.list_volumes()?.len() as u64;
        Ok(PoolInfo {
            driver: "rbd".into(),
            path: format!("rbd:{}", self.inner.opts.ceph_pool),
            chunk_size: 1 << self.inner.opts.order,
            capacity: total,
            data_used: used,
            metadata_used: 0,
            metadata_capacity: None,
            volumes,
            generation: self
                .inner
                .commits
                .load(std::sync::atomic::Ordering::Relaxed),
            host_free: None,
            warnings: Vec::new(),
        })
    }

    fn list_volumes(&self) -> Result<Vec<VolumeInfo>, PoolError> {
        let names = self
            .inner
            .io
            .list()
            .map_err(|e| pool_err(e, &self.inner.opts.ceph_pool))?;
        let mut out = Vec::new();
        for n in names {
            let Some(key) = volume_key(&n) else { continue };
            match self.volume(&key) {
                Ok(v) => out.push(v),
                // Removed by another machine since the listing.
                Err(PoolError::NoSuchVolume(_)) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn volume(&self, key: &str) -> Result<VolumeInfo, PoolError> {
        validate_volume_key(key)?;
        let img =
            Image::open(&self.inner.io, &image_name(key), true).map_err(|e| pool_err(e, key))?;
        let size = img.size().map_err(|e| pool_err(e, key))?;
        let mapped = img
            .allocated(0, size)
            .map_err(|e| pool_err(e, key))?
            .iter()
            .filter(|r| r.exists)
            .map(|r| r.length)
            .sum();
        let attrs = img
            .meta_list()
            .map_err(|e| pool_err(e, key))?
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(ATTR_PREFIX).map(|a| (a.to_string(), v)))
            .collect::<BTreeMap<_, _>>();
        Ok(VolumeInfo {
            key: key.to_string(),
            size,
            mapped,
            attrs,
        })
    }

    /// One listing of the namespace's directory instead of [`Pool::volume`]'s open of
    /// the image (and of its parent chain) and walk of its object map.
    fn exists(&self, key: &str) -> Result<bool, PoolError> {
        validate_volume_key(key)?;
        let name = image_name(key);
        Ok(self
            .inner
            .io
            .list()
            .map_err(|e| pool_err(e, &self.inner.opts.ceph_pool))?
            .contains(&name))
    }

    fn create_volume(&self, key: &str, size: u64) -> Result<(), PoolError> {
        validate_volume_key(key)?;
        self.inner
            .io
            .create(
                &image_name(key),
                size,
                CreateOptions {
                    order: self.inner.opts.order,
                },
            )
            .map_err(|e| pool_err(e, key))
    }

    fn snapshot(&self, source: &str, target: &str) -> Result<(), PoolError> {
        validate_volume_key(target)?;
        if self.exists(target)? {
            return Err(PoolError::VolumeExists(target.into()));
        }
        let snap = format!(
            "qs.{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let (src, dst) = (image_name(source), image_name(target));
        let _serial = self.inner.snapshots.lock();
        // One handle on the source for the whole sequence (each open of an image, and of
        // its parent chain, is a dozen round trips to the OSDs): the shared one if the
        // volume is open here (it holds the exclusive lock), else a short-lived one.
        let shared = self.inner.open.lock().get(source).cloned();
        let own;
        let img = match &shared {
            Some(o) => &o.image,
            None => {
                own = Image::open(&self.inner.io, &src, false).map_err(|e| pool_err(e, source))?;
                &own
            }
        };
        // Acknowledged writes sit in librbd's cache until a flush.
        img.flush()
            .and_then(|()| img.snap_create(&snap))
            .map_err(|e| pool_err(e, source))?;
        let cloned = self.inner.io.clone_image(&src, &snap, &dst);
        // Clone v2 keeps the snapshot alive (trash namespace) while the clone exists.
        let removed = img.snap_remove(&snap);
        cloned.map_err(|e| pool_err(e, target))?;
        if let Err(e) = removed {
            tracing::warn!(volume = %source, error = %e, "removing a snapshot after cloning failed");
        }
        // The clone is one deeper than its source.
        let depth = self.depth(img).map(|d| d + 1);
        // librbd copies the parent's image metadata into the clone; the contract (and
        // the lock holder record) want a clean one.
        Image::open(&self.inner.io, &dst, false)
            .and_then(|img| {
                for (k, _) in img.meta_list()? {
                    if k.starts_with(META_PREFIX) {
                        img.meta_set(&k, None)?;
                    }
                }
                Ok(())
            })
            .map_err(|e| pool_err(e, target))?;
        match depth {
            Ok(d) if d > self.inner.opts.max_clone_depth => {
                self.flatten_in_background(target.to_string())
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(volume = %target, error = %e, "clone depth unknown"),
        }
        Ok(())
    }

    fn remove_volume(&self, key: &str) -> Result<(), PoolError> {
        validate_volume_key(key)?;
        if let Some(o) = self.inner.open.lock().get(key) {
            return Err(PoolError::Busy {
                volume: key.to_string(),
                users: o.counts.lock().handles,
            });
        }
        let name = image_name(key);
        {
            let img = Image::open(&self.inner.io, &name, false).map_err(|e| pool_err(e, key))?;
            // Another machine's running qube (the model drops a qube's leftovers at
            // start): its image is refused here, not half-removed under its guest.
            self.refuse_if_held_elsewhere(key, &img)?;
            // Rollback points (snap_rollback) are user snapshots: they go with the image.
            let snaps = img.snap_list().map_err(|e| pool_err(e, key))?;
            for n in &snaps {
                match img.snap_remove(n) {
                    // rbd_snap_list also names the trash-namespace snapshots that
                    // clones keep, which cannot be removed by name.
                    Err(e) if e.errno == libc::ENOENT => {}
                    r => r.map_err(|e| pool_err(e, key))?,
                }
            }
            // The handle closes here: an open image is watched, and RBD refuses to
            // remove a watched image.
        }
        match self.inner.io.remove(&name) {
            Ok(()) => {}
            // Snapshots in the trash namespace still have clones: the image waits in the
            // RBD trash for them.
            Err(e) if matches!(e.errno, libc::ENOTEMPTY | libc::EBUSY) => self
                .inner
                .io
                .trash_move(&name)
                .map_err(|e| pool_err(e, key))?,
            Err(e) => return Err(pool_err(e, key)),
        }
        self.purge_trash();
        Ok(())
    }

    fn rename_volume(&self, from: &str, to: &str) -> Result<(), PoolError> {
        validate_volume_key(from)?;
        validate_volume_key(to)?;
        if self.exists(to)? {
            return Err(PoolError::VolumeExists(to.into()));
        }
        self.inner
            .io
            .rename(&image_name(from), &image_name(to))
            .map_err(|e| pool_err(e, from))?;
        let mut open = self.inner.open.lock();
        if let Some(o) = open.remove(from) {
            open.insert(to.to_string(), o);
        }
        Ok(())
    }

    fn resize_volume(&self, key: &str, size: u64, allow_shrink: bool) -> Result<(), PoolError> {
        let cur = self.with_image(key, |img| img.size())?;
        if size < cur && !allow_shrink {
            return Err(PoolError::ShrinkRefused {
                volume: key.to_string(),
                from: cur,
                to: size,
            });
        }
        self.with_image(key, |img| img.resize(size))
    }

    fn set_volume_attr(&self, key: &str, attr: &str, value: Option<&str>) -> Result<(), PoolError> {
        self.with_image(key, |img| {
            img.meta_set(&format!("{ATTR_PREFIX}{attr}"), value)
        })
    }

    fn open_volume(&self, key: &str, read_only: bool) -> Result<Arc<dyn BlockDevice>, PoolError> {
        validate_volume_key(key)?;
        let mut open = self.inner.open.lock();
        let shared = match open.get(key) {
            Some(o) => o.clone(),
            None => {
                let image = Image::open(&self.inner.io, &image_name(key), false)
                    .map_err(|e| pool_err(e, key))?;
                Arc::new(Open {
                    image,
                    counts: Mutex::new(Counts::default()),
                })
            }
        };
        {
            let mut c = shared.counts.lock();
            if !read_only && c.writers == 0 {
                self.take_lock(key, &shared.image)?;
            }
            c.handles += 1;
            if !read_only {
                c.writers += 1;
            }
        }
        open.insert(key.to_string(), shared.clone());
        let size = shared.image.size().map_err(|e| pool_err(e, key))?;
        Ok(Arc::new(RbdVolume {
            pool: self.clone(),
            key: key.to_string(),
            open: shared,
            size,
            read_only,
        }))
    }

    fn get_meta(&self, key: &str) -> Result<Option<String>, PoolError> {
        self.inner
            .io
            .pool_meta_get(&format!("{META_PREFIX}{key}"))
            .map_err(|e| pool_err(e, key))
    }

    fn set_meta(&self, key: &str, value: Option<&str>) -> Result<(), PoolError> {
        self.inner
            .io
            .pool_meta_set(&format!("{META_PREFIX}{key}"), value)
            .map_err(|e| pool_err(e, key))
    }

    fn meta_keys(&self, prefix: &str) -> Result<Vec<String>, PoolError> {
        let all = self
            .inner
            .io
            .pool_meta_list()
            .map_err(|e| pool_err(e, prefix))?;
        let mut keys: Vec<String> = all
            .into_iter()
            .filter_map(|(k, _)| k.strip_prefix(META_PREFIX).map(str::to_string))
            .filter(|k| k.starts_with(prefix))
            .collect();
        keys.sort();
        Ok(keys)
    }

    fn commit(&self) -> Result<(), PoolError> {
        let open: Vec<(String, Arc<Open>)> = self
            .inner
            .open
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, o) in open {
            o.image.flush().map_err(|e| pool_err(e, &k))?;
        }
        self.inner
            .commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn verify(&self) -> Result<VerifyReport, PoolError> {
        let mut rep = VerifyReport::default();
        let names = self
            .inner
            .io
            .list()
            .map_err(|e| pool_err(e, &self.inner.opts.ceph_pool))?;
        for n in names {
            let Some(key) = volume_key(&n) else { continue };
            rep.volumes += 1;
            match Image::open(&self.inner.io, &n, true).and_then(|img| {
                img.size()?;
                img.parent()
            }) {
                Ok(_) => {}
                Err(e) => rep.errors.push(format!("volume {key}: {e}")),
            }
        }
        Ok(rep)
    }

    fn import_volume(
        &self,
        key: &str,
        image: &mut dyn Read,
        size: u64,
        _opts: &ImportOptions,
    ) -> Result<ImportStats, PoolError> {
        self.create_volume(key, size)?;
        let res = (|| {
            let img = Image::open(&self.inner.io, &image_name(key), false)
                .map_err(|e| pool_err(e, key))?;
            let chunk = 1u64 << self.inner.opts.order;
            let mut buf = vec![0u8; chunk as usize];
            let mut hasher = blake3::Hasher::new();
            let mut stats = ImportStats::default();
            let mut pos = 0u64;
            while pos < size {
                let n = (size - pos).min(chunk) as usize;
                // An image shorter than the volume: the rest reads as zeros.
                let mut got = 0;
                while got < n {
                    match image.read(&mut buf[got..n]) {
                        Ok(0) => break,
                        Ok(k) => got += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            return Err(PoolError::io(format!("reading the image for {key}"), e))
                        }
                    }
                }
                buf[got..n].fill(0);
                hasher.update(&buf[..n]);
                if buf[..n].iter().all(|&b| b == 0) {
                    stats.zero_chunks += 1;
                } else {
                    img.write(&buf[..n], pos).map_err(|e| pool_err(e, key))?;
                    stats.written_chunks += 1;
                }
                pos += n as u64;
            }
            img.flush().map_err(|e| pool_err(e, key))?;
            stats.bytes = size;
            stats.fingerprint = hasher.finalize().to_hex().to_string();
            Ok(stats)
        })();
        if res.is_err() {
            let _ = self.inner.io.remove(&image_name(key));
        }
        res
    }

    fn fingerprint(&self, key: &str) -> Result<String, PoolError> {
        let img =
            Image::open(&self.inner.io, &image_name(key), true).map_err(|e| pool_err(e, key))?;
        let size = img.size().map_err(|e| pool_err(e, key))?;
        // Holes hash as zeros without a round trip to the OSDs.
        let runs = img.allocated(0, size).map_err(|e| pool_err(e, key))?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 4 << 20];
        let zeros = vec![0u8; 4 << 20];
        let mut pos = 0;
        let hash_zeros = |h: &mut blake3::Hasher, mut n: u64| {
            while n > 0 {
                let k = n.min(zeros.len() as u64) as usize;
                h.update(&zeros[..k]);
                n -= k as u64;
            }
        };
        for r in runs.iter().filter(|r| r.exists) {
            let (start, end) = (r.offset.max(pos), (r.offset + r.length).min(size));
            if end <= start {
                continue;
            }
            hash_zeros(&mut hasher, start - pos);
            pos = start;
            while pos < end {
                let n = (end - pos).min(buf.len() as u64) as usize;
                img.read(&mut buf[..n], pos).map_err(|e| pool_err(e, key))?;
                hasher.update(&buf[..n]);
                pos += n as u64;
            }
        }
        hash_zeros(&mut hasher, size - pos);
        Ok(hasher.finalize().to_hex().to_string())
    }
}

/// One handle on an open image.
struct RbdVolume {
    pool: RbdPool,
    key: String,
    open: Arc<Open>,
    size: u64,
    read_only: bool,
}

impl Drop for RbdVolume {
    fn drop(&mut self) {
        let mut map = self.pool.inner.open.lock();
        let mut c = self.open.counts.lock();
        c.handles -= 1;
        if !self.read_only {
            c.writers -= 1;
            if c.writers == 0 {
                let img = &self.open.image;
                let _ = img.flush();
                let _ = img.meta_set(HOLDER, None);
                let _ = img.lock_release();
            }
        }
        if c.handles == 0 {
            // The key may have changed by a rename: find our entry by identity.
            let k = map
                .iter()
                .find(|(_, v)| Arc::ptr_eq(v, &self.open))
                .map(|(k, _)| k.clone());
            if let Some(k) = k {
                map.remove(&k);
            }
        }
    }
}

impl RbdVolume {
    fn check(
        &self,
        op: &'static str,
        offset: u64,
        length: u64,
        write: bool,
    ) -> Result<(), BlockError> {
        BlockError::check_writable(&self.key, self.read_only, op, offset, length, write)?;
        BlockError::check_range(&self.key, self.size(), op, offset, length)
    }

    fn err(
        &self,
        kind: BlockErrorKind,
        op: &'static str,
        offset: u64,
        length: u64,
        detail: impl Into<String>,
    ) -> BlockError {
        BlockError::new(kind, op, &self.key, offset, length, detail)
    }

    fn io_err(&self, op: &'static str, offset: u64, length: u64, e: rbd_sys::Error) -> BlockError {
        let kind = match e.errno {
            libc::ENOSPC | libc::EDQUOT => BlockErrorKind::NoSpace,
            libc::EROFS => BlockErrorKind::ReadOnly,
            libc::ENOENT => BlockErrorKind::Gone,
            _ => BlockErrorKind::Io,
        };
        let hint = match e.errno {
            libc::ETIMEDOUT => format!(
                "; the Ceph cluster did not answer within {} s (rados_osd_op_timeout): check `ceph -s` and the OSDs",
                self.pool.inner.opts.op_timeout
            ),
            // librados' EBLOCKLISTED is ESHUTDOWN on Linux.
            libc::ESHUTDOWN => {
                "; this client was blocklisted (another machine broke its lock): stop the qube here".into()
            }
            libc::EROFS => "; another client holds the image's exclusive lock".into(),
            _ => String::new(),
        };
        self.err(kind, op, offset, length, format!("{e}{hint}"))
    }
}

impl BlockDevice for RbdVolume {
    fn name(&self) -> &str {
        &self.key
    }

    fn size(&self) -> u64 {
        self.open.image.size().unwrap_or(self.size)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        self.check("read", offset, buf.len() as u64, false)?;
        let img = self.image();
        img.read(buf, offset)
            .map_err(|e| self.io_err("read", offset, buf.len() as u64, e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        self.check("write", offset, buf.len() as u64, true)?;
        self.image()
            .write(buf, offset)
            .map_err(|e| self.io_err("write", offset, buf.len() as u64, e))
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.image()
            .flush()
            .map_err(|e| self.io_err("flush", 0, 0, e))
    }

    fn discard(&self, offset: u64, length: u64) -> Result<(), BlockError> {
        self.check("discard", offset, length, true)?;
        // TRIM is advisory: only whole objects, as the contract says of chunks.
        let obj = 1u64 << self.pool.inner.opts.order;
        let start = offset.div_ceil(obj) * obj;
        let end = (offset + length) / obj * obj;
        if end <= start {
            return Ok(());
        }
        self.image()
            .discard(start, end - start)
            .map_err(|e| self.io_err("discard", offset, length, e))
    }

    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.check("write_zeroes", offset, length, true)?;
        let img = self.image();
        if may_unmap {
            img.write_zeroes(offset, length)
                .map_err(|e| self.io_err("write_zeroes", offset, length, e))
        } else {
            // Space stays allocated: write real zeros.
            let zero = vec![0u8; (1usize << 20).min(length as usize).max(1)];
            let mut pos = offset;
            while pos < offset + length {
                let n = (offset + length - pos).min(zero.len() as u64) as usize;
                img.write(&zero[..n], pos)
                    .map_err(|e| self.io_err("write_zeroes", offset, length, e))?;
                pos += n as u64;
            }
            Ok(())
        }
    }

    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>, BlockError> {
        self.check("block_status", offset, length.max(1), false)?;
        let runs = self
            .image()
            .allocated(offset, length)
            .map_err(|e| self.io_err("block_status", offset, length, e))?;
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |e: Extent| {
            if e.length == 0 {
                return;
            }
            match out.last_mut() {
                Some(l)
                    if l.hole == e.hole && l.zero == e.zero && l.offset + l.length == e.offset =>
                {
                    l.length += e.length
                }
                _ => out.push(e),
            }
        };
        let mut pos = offset;
        let end = offset + length;
        for r in runs {
            let (s, e) = (r.offset.max(pos), (r.offset + r.length).min(end));
            if e <= s {
                continue;
            }
            push(Extent {
                offset: pos,
                length: s - pos,
                hole: true,
                zero: true,
            });
            push(Extent {
                offset: s,
                length: e - s,
                hole: !r.exists,
                zero: !r.exists,
            });
            pos = e;
        }
        push(Extent {
            offset: pos,
            length: end - pos,
            hole: true,
            zero: true,
        });
        Ok(out)
    }
}

impl RbdVolume {
    /// librbd serves concurrent requests on one image handle itself: no lock of ours
    /// around the I/O.
    fn image(&self) -> &Image {
        &self.open.image
    }
}
