//! The controller: carries out [`Request`]s against the pool, the qube catalogue, the NBD
//! exports and the hypervisor. The daemon shares one `Controller` between the threads
//! answering requests; without a daemon the CLI builds one for a single request. The
//! controller owns no storage logic: volume semantics are `storage::qubes`, serving is
//! `blkback`, domains are `hypervisor`.
//!
//! Concurrency: requests on different qubes run in parallel; requests naming the same
//! qube are ordered by that qube's lock ([`QubeLocks`]). Catalogue edits are staged in the
//! pool and made durable by the next commit, so every stage-then-commit sequence holds
//! [`Controller::txn`] (short: never while an image copies, a guest boots or exports
//! drain), so that no request commits another's half-staged edit.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use storage::qubes::{QubeClass, QubeVolumes, StartedVolume, Volumes};
use storage::Pool;

use crate::api::Request;
use crate::catalogue::{Catalogue, QubePrefs, RuntimeRecord, TemplateRecord};
use crate::paths::Paths;

mod repo;
mod status;

/// The guest's disk names, in volume order (root, private, volatile, kernel).
const XEN_VDEVS: [&str; 4] = ["xvda", "xvdb", "xvdc", "xvdd"];

/// Default kernel command line for templates whose build did not record one.
pub const DEFAULT_CMDLINE: &str = "root=/dev/vda rw console=ttyS0";

/// A qube whose volumes this process serves.
struct Served {
    server: blkback::NbdServer,
    hypervisor: String,
    /// The disks our blkif backend serves (Xen, unless `QUBES_XEN_DISKS=nbd`).
    xen_disks: Option<crate::xen_disks::RealXenDisks>,
}

pub struct Controller {
    paths: Paths,
    vols: Volumes,
    served: Mutex<BTreeMap<String, Served>>,
    /// True inside the daemon: only the daemon may leave exports behind a request.
    in_daemon: bool,
    qube_locks: QubeLocks,
    txn: Mutex<()>,
}

/// Per-qube locks: a request takes the locks of every qube it names, all at once (so two
/// requests naming the same qubes in another order cannot deadlock), and a request for
/// another qube goes on meanwhile.
#[derive(Default)]
struct QubeLocks {
    held: Mutex<BTreeSet<String>>,
    freed: Condvar,
}

/// The locks of some qubes, released when dropped.
pub(crate) struct QubeGuard<'a> {
    locks: &'a QubeLocks,
    names: Vec<String>,
}

impl QubeLocks {
    fn lock(&self, names: &[&str]) -> QubeGuard<'_> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        while names.iter().any(|n| held.contains(*n)) {
            held = self.freed.wait(held).unwrap_or_else(|p| p.into_inner());
        }
        self.take(&mut held, names)
    }

    /// `None` if one of `names` is held by a request under way.
    fn try_lock(&self, names: &[&str]) -> Option<QubeGuard<'_>> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if names.iter().any(|n| held.contains(*n)) {
            return None;
        }
        Some(self.take(&mut held, names))
    }

    /// A request is working on `name`.
    fn is_held(&self, name: &str) -> bool {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }

    fn take(&self, held: &mut BTreeSet<String>, names: &[&str]) -> QubeGuard<'_> {
        let mut mine = Vec::new();
        for n in names {
            if held.insert(n.to_string()) {
                mine.push(n.to_string());
            }
        }
        QubeGuard {
            locks: self,
            names: mine,
        }
    }
}

impl Drop for QubeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|p| p.into_inner());
        for n in &self.names {
            held.remove(n);
        }
        self.locks.freed.notify_all();
    }
}

/// The qubes a request acts on, whose locks it holds while it runs. Requests that make
/// a template take its lock themselves (the name may be known only once it is built),
/// and a start takes its netvm's when it starts it.
fn locked_qubes(req: &Request) -> Vec<&str> {
    match req {
        Request::TemplateRemove { name }
        | Request::TemplateExport { name, .. }
        | Request::QubeCreate { name, .. }
        | Request::QubeRemove { name }
        | Request::QubePrefs { name, .. }
        | Request::QubeStart { name, .. }
        | Request::QubeShutdown { name, .. }
        | Request::QubePause { name }
        | Request::QubeUnpause { name } => vec![name],
        Request::QubeClone { src, dst } => vec![src, dst],
        Request::VolumeRevert { qube, .. }
        | Request::VolumeResize { qube, .. }
        | Request::VolumeImport { qube, .. }
        | Request::VolumeExport { qube, .. }
        | Request::VolumeConfig { qube, .. }
        | Request::VolumeDiscard { qube, .. } => vec![qube],
        Request::Ping
        | Request::PoolInfo
        | Request::PoolVerify
        | Request::TemplateCreate { .. }
        | Request::TemplateBuild { .. }
        | Request::TemplateList
        | Request::TemplateInfo { .. }
        | Request::TemplateImport { .. }
        | Request::TemplateRepo { .. }
        | Request::QubeList
        | Request::QubeConsole { .. }
        | Request::VolumeList { .. }
        | Request::VolumeInfo { .. }
        | Request::DaemonStop => Vec::new(),
    }
}

/// Which pool driver a directory holds.
fn detect_driver(dir: &Path) -> Option<&'static str> {
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

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Free bytes of the filesystem holding `dir` (the default pool capacity).
fn fs_free_bytes(dir: &Path) -> Result<u64> {
    let st = rustix::fs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// `pool info` warns when the filesystem holding the (sparse) pool has less free.
pub const HOST_FREE_WARN: u64 = 1 << 30;
/// `qube start` is refused below this: a guest writing into a full host filesystem
/// would only get I/O errors (Qubes users hit this: qubes-issues #6451, #8707).
pub const HOST_FREE_START_MARGIN: u64 = 128 << 20;

/// Catalogue key marking an object being made: set in the first commit that creates it,
/// cleared in the commit that completes it. One left behind is a killed creation, undone
/// at the next open, so an object is either absent or complete.
const CREATING: &str = "creating/";

/// Qubes' rules for qube names (templates are qubes too): at most 31 bytes, `dom0`
/// reserved, plus the characters the pool accepts.
pub fn validate_qube_name(what: &'static str, name: &str) -> Result<()> {
    storage::validate_name(what, name)?;
    if name.len() > crate::paths::MAX_QUBE_NAME {
        bail!(
            "{what} name {name:?} is too long ({} bytes, at most {} as in Qubes)",
            name.len(),
            crate::paths::MAX_QUBE_NAME
        );
    }
    if name == "dom0" {
        bail!("{what} name \"dom0\" is reserved for the administration domain; pick another");
    }
    Ok(())
}

/// Size of an image descriptor: a regular file's length or a block device's size; `None`
/// for streams (pipes, FIFOs, terminals), whose size is not known in advance.
pub fn image_size(f: &fs::File) -> Result<Option<u64>> {
    use std::io::Seek;
    use std::os::unix::fs::FileTypeExt;
    let md = f.metadata()?;
    let ft = md.file_type();
    if ft.is_file() {
        Ok(Some(md.len()))
    } else if ft.is_block_device() {
        let mut f = f;
        let end = f.seek(std::io::SeekFrom::End(0))?;
        f.seek(std::io::SeekFrom::Start(0))?;
        Ok(Some(end))
    } else {
        Ok(None)
    }
}

/// Reads exactly `size` bytes: a stream that ends early, or goes on past `size`, is an
/// error, so a cut-off import fails before anything is committed.
struct ExactReader<R> {
    inner: R,
    left: u64,
    size: u64,
    what: String,
}

impl<R: std::io::Read> std::io::Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = loop {
            match self.inner.read(&mut buf[..want]) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "{} ended after {} of {} bytes; nothing was imported",
                    self.what,
                    self.size - self.left,
                    self.size
                ),
            ));
        }
        self.left -= n as u64;
        if self.left == 0 {
            let mut probe = [0u8; 1];
            let more = loop {
                match self.inner.read(&mut probe) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => break r?,
                }
            };
            if more != 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} holds more than the {} bytes announced; nothing was imported (give the right --size)",
                        self.what, self.size
                    ),
                ));
            }
        }
        Ok(n)
    }
}

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
pub fn init_pool(paths: &Paths, opts: &InitOptions) -> Result<Value> {
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
        return Ok(serde_json::to_value(pool.info()?)?);
    }
    if opts.driver == "lvm_thin" {
        let (Some(vg), Some(tp)) = (&opts.volume_group, &opts.thin_pool) else {
            bail!("the lvm_thin driver uses an existing LVM thin pool: give --volume-group VG --thin-pool POOL (Qubes' are qubes_dom0 and vm-pool)");
        };
        storage::LvmThinPool::create(&dir, &storage::LvmThinOptions::new(vg, tp))
            .with_context(|| format!("making an lvm_thin pool over {vg}/{tp}"))?;
        paths.secure()?;
        let info = open_pool(paths)?.info()?;
        return Ok(serde_json::to_value(info)?);
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
    let info = pool.info()?;
    Ok(serde_json::to_value(info)?)
}

fn open_pool(paths: &Paths) -> Result<Arc<dyn Pool>> {
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

/// Splits `QUBE:VOL`.
pub fn parse_volume_ref(s: &str) -> Result<(String, String)> {
    let (q, v) = s
        .split_once(':')
        .ok_or_else(|| anyhow!("volume {s:?} must be written QUBE:VOLUME, e.g. work:private"))?;
    storage::validate_name("qube", q)?;
    if !matches!(v, "root" | "private" | "volatile") {
        bail!("volume {v:?} of {q} does not exist: a qube has root, private and volatile");
    }
    Ok((q.to_string(), v.to_string()))
}

fn class_name(c: &QubeClass) -> String {
    c.to_string()
}

impl Controller {
    /// Opens the pool under `paths`. With `create`, a missing pool is created with the
    /// defaults first (the embedded default pool of a fresh machine).
    pub fn open(paths: &Paths, create: bool, in_daemon: bool) -> Result<Controller> {
        if create && detect_driver(&paths.pool_dir()).is_none() {
            init_pool(paths, &InitOptions::default())?;
            eprintln!("created a new thin pool at {}", paths.pool_dir().display());
        }
        paths.secure()?;
        let pool = open_pool(paths)?;
        // What the driver worked around at open (an older superblock slot) is said here,
        // on every open, and by `pool info` and `pool verify`.
        for w in pool.info().map(|i| i.warnings).unwrap_or_default() {
            eprintln!("qubes-ctl: warning: {w}");
        }
        let ctl = Controller {
            paths: paths.clone(),
            vols: Volumes::new(pool),
            served: Mutex::new(BTreeMap::new()),
            in_daemon,
            qube_locks: QubeLocks::default(),
            txn: Mutex::new(()),
        };
        // We hold the pool lock: a creation marker left is from a process that died.
        ctl.undo_killed_creations()?;
        Ok(ctl)
    }

    /// Removes what a killed create / import / clone / build left (see [`CREATING`]).
    fn undo_killed_creations(&self) -> Result<()> {
        let _txn = self.txn();
        let keys = self.pool().meta_keys(CREATING)?;
        if keys.is_empty() {
            return Ok(());
        }
        for key in keys {
            let Some(name) = key.strip_prefix(CREATING).map(str::to_string) else {
                continue;
            };
            if self.vols.qube(&name).is_ok() {
                self.remove_with_catalogue(&name)
                    .with_context(|| format!("removing {name}, whose creation was cut off"))?;
            } else {
                self.catalogue().set_prefs(&name, None)?;
                self.catalogue().set_template(&name, None)?;
            }
            let _ = fs::remove_dir_all(self.paths.kernels_dir(&name));
            self.pool().set_meta(&key, None)?;
            eprintln!("qubes-ctl: removed {name}: its creation was cut off before it completed");
        }
        self.pool().commit()?;
        Ok(())
    }

    /// Stages the marker of an object being made (committed with its first commit).
    fn mark_creating(&self, name: &str, what: &str) -> Result<()> {
        self.pool()
            .set_meta(&format!("{CREATING}{name}"), Some(what))?;
        Ok(())
    }

    /// Clears the marker and commits: the object is complete.
    fn mark_created(&self, name: &str) -> Result<()> {
        self.pool().set_meta(&format!("{CREATING}{name}"), None)?;
        self.pool().commit()?;
        Ok(())
    }

    pub fn pool(&self) -> &Arc<dyn Pool> {
        self.vols.pool()
    }

    /// The qubes this process serves (poisoning ignored: the map stays consistent, each
    /// edit is one insert or remove).
    fn served(&self) -> MutexGuard<'_, BTreeMap<String, Served>> {
        self.served.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_served(&self, name: &str) -> bool {
        self.served().contains_key(name)
    }

    /// The hypervisor a served qube runs on.
    fn served_hypervisor(&self, name: &str) -> Option<String> {
        self.served().get(name).map(|s| s.hypervisor.clone())
    }

    /// Held while catalogue edits are staged and committed (see the module's notes).
    fn txn(&self) -> MutexGuard<'_, ()> {
        self.txn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks these qubes for one request (see [`QubeLocks`]).
    pub(crate) fn lock_qubes(&self, names: &[&str]) -> QubeGuard<'_> {
        self.qube_locks.lock(names)
    }

    fn catalogue(&self) -> Catalogue<'_> {
        Catalogue::new(self.vols.pool().as_ref())
    }

    pub fn handle(&self, req: Request) -> Result<Value> {
        self.handle_with(req, Vec::new())
    }

    /// Carries out `req` with the files the client opened for it (see [`crate::api`]),
    /// holding the locks of the qubes it names.
    pub fn handle_with(&self, req: Request, files: Vec<fs::File>) -> Result<Value> {
        let names: Vec<String> = locked_qubes(&req).into_iter().map(String::from).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let _locked = self.lock_qubes(&names);
        self.dispatch(req, files)
    }

    fn dispatch(&self, req: Request, files: Vec<fs::File>) -> Result<Value> {
        let mut files = files.into_iter();
        let mut file = |what: &Path| {
            files.next().ok_or_else(|| {
                anyhow!(
                    "no open file came with the request for {}; the client must open it",
                    what.display()
                )
            })
        };
        match req {
            Request::Ping => {
                let mut v = json!({
                    "pong": true,
                    "protocol": crate::api::PROTOCOL,
                    "pid": std::process::id(),
                    "build": crate::api::build_id(),
                    "served": self.served().len(),
                });
                if self.in_daemon {
                    v["stats"] = self.serving_stats();
                }
                Ok(v)
            }
            Request::PoolInfo => self.pool_info(),
            Request::PoolVerify => {
                let report = self.pool().verify()?;
                Ok(json!({"clean": report.is_clean(), "report": report}))
            }
            Request::TemplateCreate {
                name,
                image,
                replace,
            } => {
                let f = file(&image)?;
                self.template_create(&name, &image, f, replace)
            }
            Request::TemplateBuild {
                recipe,
                resolved,
                name,
                mirror,
            } => {
                let local_keys = resolved.gpg_keys.iter().filter(|k| !k.contains("://"));
                let inputs = (0..resolved.files.len() + local_keys.count())
                    .map(|_| file(&recipe))
                    .collect::<Result<Vec<_>>>()?;
                self.template_build(&recipe, *resolved, inputs, name, mirror)
            }
            Request::TemplateList => self.template_list(),
            Request::TemplateInfo { name } => self.template_info(&name),
            Request::TemplateRemove { name } => self.template_remove(&name),
            Request::TemplateExport { name, file: path } => {
                let f = file(&path)?;
                self.template_export(&name, &path, f)
            }
            Request::TemplateImport {
                file: path,
                name,
                replace,
            } => {
                let f = file(&path)?;
                self.template_import(&path, f, name, replace)
            }
            Request::TemplateRepo { action } => self.template_repo(action),
            Request::QubeCreate {
                name,
                class,
                template,
                label,
            } => self.qube_create(&name, &class, template.as_deref(), label.as_deref()),
            Request::QubeList => self.qube_list(),
            Request::QubeRemove { name } => self.qube_remove(&name),
            Request::QubeClone { src, dst } => self.qube_clone(&src, &dst),
            Request::QubePrefs { name, key, value } => self.qube_prefs(&name, key, value),
            Request::QubeStart { name, hypervisor } => self.qube_start(&name, hypervisor),
            Request::QubeShutdown {
                name,
                timeout_secs,
                kill,
            } => self.qube_shutdown(&name, timeout_secs, kill),
            Request::QubeConsole { name } => self.qube_console(&name),
            Request::QubePause { name } => self.qube_pause(&name, true),
            Request::QubeUnpause { name } => self.qube_pause(&name, false),
            Request::VolumeList { qube } => self.volume_list(qube.as_deref()),
            Request::VolumeInfo { qube, vol } => self.volume_info(&qube, &vol),
            Request::VolumeRevert {
                qube,
                vol,
                revision,
            } => {
                self.refuse_if_served(&qube, "revert a volume of")?;
                {
                    let _txn = self.txn();
                    self.vols.revert(&qube, &vol, revision.as_deref())?;
                }
                self.volume_info(&qube, &vol)
            }
            Request::VolumeResize {
                qube,
                vol,
                size,
                allow_shrink,
            } => {
                // A running qube's client would get EINVAL past the new end, and what it
                // flushed there would be lost.
                if size < self.vols.volume_status(&qube, &vol)?.size {
                    self.refuse_if_served(&qube, "shrink a volume of")?;
                }
                {
                    let _txn = self.txn();
                    self.vols.resize(&qube, &vol, size, allow_shrink)?;
                }
                self.volume_info(&qube, &vol)
            }
            Request::VolumeImport {
                qube,
                vol,
                file: path,
                size,
            } => {
                let f = file(&path)?;
                self.volume_import(&qube, &vol, &path, f, size)
            }
            Request::VolumeExport {
                qube,
                vol,
                file: path,
            } => {
                let mut out = file(&path)?;
                let n = self.vols.export(&qube, &vol, &mut out)?;
                // Only a regular file has anything to sync (/dev/null, a FIFO: EINVAL).
                if out.metadata().is_ok_and(|m| m.is_file()) {
                    out.sync_all()
                        .with_context(|| format!("syncing {}", path.display()))?;
                }
                Ok(json!({"volume": format!("{qube}:{vol}"), "file": path, "bytes": n}))
            }
            Request::VolumeConfig {
                qube,
                vol,
                key,
                value,
            } => {
                match key.as_str() {
                    "revisions_to_keep" => {
                        let n: u32 = value
                            .parse()
                            .map_err(|_| anyhow!("revisions_to_keep must be a whole number (0 keeps none), not {value:?}"))?;
                        let _txn = self.txn();
                        self.vols.set_revisions_to_keep(&qube, &vol, n)?;
                    }
                    other => bail!(
                        "volume property {other:?} cannot be set; settable: revisions_to_keep"
                    ),
                }
                self.volume_info(&qube, &vol)
            }
            Request::VolumeDiscard { qube, vol } => {
                // The running snapshot is what the qube's client sees; dropping it under
                // a running qube leaves that qube unservable.
                self.refuse_if_served(&qube, "discard the writes of")?;
                {
                    let _txn = self.txn();
                    self.vols.discard(&qube, &vol)?;
                }
                self.volume_info(&qube, &vol)
            }
            Request::DaemonStop => Ok(json!({"stopping": true})),
        }
    }

    /// The pool's figures, with the free space of the filesystem holding it: the pool
    /// file is sparse, so a host filesystem that fills up stops guests' writes.
    fn pool_info(&self) -> Result<Value> {
        let info = self.pool().info()?;
        let mut v = serde_json::to_value(&info)?;
        let pct = |used: u64, cap: u64| (used as f64 * 1000.0 / cap as f64).round() / 10.0;
        if info.capacity > 0 {
            v["data_used_percent"] = json!(pct(info.data_used, info.capacity));
        }
        if let Some(mc) = info.metadata_capacity.filter(|&c| c > 0) {
            v["metadata_used_percent"] = json!(pct(info.metadata_used, mc));
        }
        let free = fs_free_bytes(&self.paths.pool_dir())?;
        v["host_free"] = json!(free);
        if free < HOST_FREE_WARN {
            v["warning"] = json!(format!(
                "the filesystem holding the pool has only {} free (qube start is refused below {}); free space there",
                crate::units::human_size(free),
                crate::units::human_size(HOST_FREE_START_MARGIN)
            ));
        }
        Ok(v)
    }

    // ---------------------------------------------------------------- templates

    fn require_template(&self, name: &str) -> Result<QubeVolumes> {
        let q = self.vols.qube(name).with_context(|| {
            format!("template {name} does not exist; see `qubes-ctl template list`")
        })?;
        if q.class != QubeClass::TemplateVM {
            bail!("{name} is a {}, not a template", class_name(&q.class));
        }
        Ok(q)
    }

    fn template_create(
        &self,
        name: &str,
        image: &Path,
        file: fs::File,
        replace: bool,
    ) -> Result<Value> {
        validate_qube_name("template", name)?;
        let size = image_size(&file)
            .with_context(|| format!("reading image {}", image.display()))?
            .ok_or_else(|| {
                anyhow!(
                    "{} is not a regular file or a block device; give a raw disk image",
                    image.display()
                )
            })?;
        if size == 0 {
            bail!(
                "{} is empty (0 bytes); give a raw disk image",
                image.display()
            );
        }
        let rec = TemplateRecord {
            origin: "image".into(),
            ..Default::default()
        };
        let source = ImageSource::Stream {
            what: image.display().to_string(),
            size,
            reader: Box::new(ExactReader {
                inner: file,
                left: size,
                size,
                what: format!("image {}", image.display()),
            }),
        };
        self.install_root(name, source, rec, None, None, replace)?;
        self.template_info(name)
    }

    /// Creates the TemplateVM if needed and imports `image` as its root (the old root, if
    /// any, becomes a revision). Kernel files are put in place before the record that
    /// points at them is committed.
    fn install_root(
        &self,
        name: &str,
        image: ImageSource<'_>,
        mut rec: TemplateRecord,
        kernel: Option<&Path>,
        initrd: Option<&Path>,
        replace: bool,
    ) -> Result<()> {
        let _locked = self.lock_qubes(&[name]);
        let exists = self.vols.qube(name).is_ok();
        if exists {
            self.require_template(name)?;
            self.refuse_if_served(name, "replace the root of")?;
            if !replace {
                let users = self.template_users(name)?;
                let used = if users.is_empty() {
                    String::new()
                } else {
                    format!(" (used by {})", users.join(", "))
                };
                bail!(
                    "template {name} already exists{used}; pass --replace to replace its root \
                     (the current one is kept as a revision: `qubes-ctl volume revert {name}:root` brings it back), \
                     or pick another --name"
                );
            }
        }
        let kdir = self.paths.kernels_dir(name);
        if let Some(k) = kernel {
            fs::create_dir_all(&kdir)?;
            copy_atomic(k, &kdir.join("vmlinuz"))?;
            if let Some(i) = initrd {
                copy_atomic(i, &kdir.join("initrd.img"))?;
            }
            rec.has_kernel = true;
        }
        if !exists {
            let _txn = self.txn();
            self.mark_creating(name, "template")?;
            let mut prefs = QubePrefs {
                label: crate::catalogue::Label::Black,
                ..Default::default()
            };
            if !rec.has_kernel {
                prefs.kernel = "none".into();
                prefs.virt_mode = "hvm".into();
            }
            self.catalogue().set_prefs(name, Some(&prefs))?;
            if let Err(e) = self.vols.create_qube(name, QubeClass::TemplateVM, None) {
                self.catalogue().set_prefs(name, None)?;
                self.pool().set_meta(&format!("{CREATING}{name}"), None)?;
                return Err(e.into());
            }
        }
        let ImageSource::Stream {
            what,
            size,
            mut reader,
        } = image;
        // The copy runs outside the catalogue transaction (other requests go on); the
        // record is committed with the creation's end. A new template killed before that
        // is undone at the next open (its creation marker); a replaced root killed before
        // it keeps the old record, whose fingerprint `pool verify`'s caller can compare.
        let stats_fp = match self.vols.import(name, "root", &mut reader, size) {
            Ok(stats) => stats.fingerprint,
            Err(e) => {
                // Leave no half-made template behind.
                if !exists {
                    let _txn = self.txn();
                    self.remove_with_catalogue(name)?;
                    self.mark_created(name)?;
                }
                return Err(anyhow!(e).context(format!("importing {what} into {name}:root")));
            }
        };
        if rec.fingerprint.is_empty() {
            rec.fingerprint = stats_fp;
        }
        let _txn = self.txn();
        self.catalogue().set_template(name, Some(&rec))?;
        self.mark_created(name)?;
        // The root volume is exactly the image (its fingerprint is the image's); a user
        // who wants more room runs `volume resize TEMPLATE:root SIZE`.
        Ok(())
    }

    /// Builds from a recipe the client resolved; `inputs` are its files then its local GPG
    /// keys, opened by the client (see [`Request::TemplateBuild`]).
    fn template_build(
        &self,
        recipe: &Path,
        mut recipe_obj: template_builder::Recipe,
        inputs: Vec<fs::File>,
        name: Option<String>,
        mirror: Option<String>,
    ) -> Result<Value> {
        recipe_obj.path = recipe.to_path_buf();
        // The builder reads files by path: give it copies of what the client sent, in a
        // directory of ours that goes when the build ends.
        let work = self.paths.cache_dir().join("work");
        fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let copies = tempfile::Builder::new()
            .prefix("recipe-inputs.")
            .tempdir_in(&work)
            .with_context(|| format!("creating a directory in {}", work.display()))?;
        let mut inputs = inputs.into_iter();
        let mut copy = |what: &str, expect: Option<&str>| -> Result<PathBuf> {
            let mut f = inputs
                .next()
                .ok_or_else(|| anyhow!("no open file came with the request for {what}"))?;
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes)
                .with_context(|| format!("reading {what} (sent by the client)"))?;
            let hash = blake3::hash(&bytes).to_hex().to_string();
            if expect.is_some_and(|e| e != hash) {
                bail!("{what} changed while the build was being requested; run the build again");
            }
            let dst = copies.path().join(&hash);
            fs::write(&dst, &bytes).with_context(|| format!("writing {}", dst.display()))?;
            Ok(dst)
        };
        for f in &mut recipe_obj.files {
            f.src = copy(&f.src.display().to_string(), Some(&f.content_hash))?;
        }
        for k in recipe_obj
            .gpg_keys
            .iter_mut()
            .filter(|k| !k.contains("://"))
        {
            *k = copy(k, None)?.to_string_lossy().into_owned();
        }
        crate::guest_tools::add_agent(&mut recipe_obj)?;
        let opts = template_builder::BuildOptions {
            name: name.clone(),
            mirror,
            cache_dir: self.paths.cache_dir(),
            work_dir: self.paths.cache_dir().join("work"),
            progress: !self.in_daemon,
        };
        let built = template_builder::build(&recipe_obj, &opts)?;
        let tname = name.unwrap_or_else(|| built.name.clone());
        validate_qube_name("template", &tname)?;
        // A rebuild that produced the same image changes nothing (no new revision).
        if let Ok(Some(old)) = self.catalogue().template(&tname) {
            if old.fingerprint == built.fingerprint && self.vols.qube(&tname).is_ok() {
                let mut v = self.template_info(&tname)?;
                v["unchanged"] = json!(true);
                v["cache_hit"] = json!(built.cache_hit);
                return Ok(v);
            }
        }
        let rec = TemplateRecord {
            origin: "recipe".into(),
            recipe: Some(recipe.display().to_string()),
            recipe_hash: Some(built.recipe_hash.clone()),
            packages: built.packages.clone(),
            build_date: Some(built.build_date.clone()),
            fingerprint: built.fingerprint.clone(),
            has_kernel: false,
            kernel_cmdline: built.kernel_cmdline.clone(),
        };
        let f = fs::File::open(&built.image)
            .with_context(|| format!("opening {}", built.image.display()))?;
        let size = f.metadata()?.len();
        let source = ImageSource::Stream {
            what: built.image.display().to_string(),
            size,
            reader: Box::new(f),
        };
        // A rebuild is the upgrade path of a recipe template: its old root is kept as a
        // revision.
        self.install_root(
            &tname,
            source,
            rec,
            built.kernel.as_deref(),
            built.initrd.as_deref(),
            true,
        )?;
        let mut v = self.template_info(&tname)?;
        v["cache_hit"] = json!(built.cache_hit);
        Ok(v)
    }

    fn template_list(&self) -> Result<Value> {
        let mut out = Vec::new();
        for q in self.vols.list_qubes()? {
            if q.class != QubeClass::TemplateVM {
                continue;
            }
            let rec = self.catalogue().template(&q.qube)?.unwrap_or_default();
            let root = self.vols.volume_status(&q.qube, "root")?;
            out.push(json!({
                "name": q.qube,
                "origin": rec.origin,
                "size": root.size,
                "usage": root.usage,
                "fingerprint": rec.fingerprint,
                "running": self.vols.is_running(&q.qube)?,
            }));
        }
        Ok(Value::Array(out))
    }

    fn template_info(&self, name: &str) -> Result<Value> {
        let q = self.require_template(name)?;
        let rec = self.catalogue().template(name)?.unwrap_or_default();
        let root = self.vols.volume_status(name, "root")?;
        let users = self.template_users(name)?;
        Ok(json!({
            "name": q.qube,
            "class": class_name(&q.class),
            "origin": rec.origin,
            "recipe": rec.recipe,
            "recipe_hash": rec.recipe_hash,
            "build_date": rec.build_date,
            "fingerprint": rec.fingerprint,
            "packages": rec.packages,
            "kernel": rec.has_kernel.then(|| self.paths.kernels_dir(name).join("vmlinuz")),
            "kernel_cmdline": if rec.kernel_cmdline.is_empty() { DEFAULT_CMDLINE.to_string() } else { rec.kernel_cmdline.clone() },
            "root_size": root.size,
            "root_usage": root.usage,
            "revisions": root.revisions.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
            "used_by": users,
        }))
    }

    fn template_users(&self, name: &str) -> Result<Vec<String>> {
        Ok(self
            .vols
            .list_qubes()?
            .into_iter()
            .filter(|o| o.template.as_deref() == Some(name))
            .map(|o| o.qube)
            .collect())
    }

    fn template_remove(&self, name: &str) -> Result<Value> {
        self.require_template(name)?;
        self.refuse_if_served(name, "remove")?;
        self.txn_remove(name)?;
        let _ = fs::remove_dir_all(self.paths.kernels_dir(name));
        Ok(json!({"removed": name}))
    }

    /// The package is made in a staging directory of ours and copied into `out`, which
    /// the client opened (the CLI writes `FILE.partial` and renames it on success).
    fn template_export(&self, name: &str, file: &Path, mut out: fs::File) -> Result<Value> {
        self.require_template(name)?;
        let rec = self.catalogue().template(name)?.unwrap_or_default();
        let root = self.vols.volume_status(name, "root")?;
        let head = root
            .head_key
            .clone()
            .ok_or_else(|| anyhow!("template {name} has no root head to export"))?;
        let dev = self.pool().open_volume(&head, true)?;
        let kdir = self.paths.kernels_dir(name);
        let kernel = kdir.join("vmlinuz");
        let initrd = kdir.join("initrd.img");
        let staging =
            tempfile::tempdir_in(self.paths.root()).context("creating a staging directory")?;
        let staged = staging.path().join("template.qtpl");
        let meta = template_builder::TemplateMeta {
            recipe_hash: rec.recipe_hash.clone().unwrap_or_default(),
            packages: rec.packages.clone(),
            build_date: rec.build_date.clone().unwrap_or_default(),
            kernel_cmdline: rec.kernel_cmdline.clone(),
        };
        let stats = template_builder::export_package(
            name,
            dev.as_ref(),
            &meta,
            rec.has_kernel.then_some(kernel.as_path()),
            (rec.has_kernel && initrd.exists()).then_some(initrd.as_path()),
            &staged,
        )?;
        let mut src =
            fs::File::open(&staged).with_context(|| format!("opening {}", staged.display()))?;
        std::io::copy(&mut src, &mut out).with_context(|| format!("writing {}", file.display()))?;
        if out.metadata().is_ok_and(|m| m.is_file()) {
            out.sync_all()
                .with_context(|| format!("syncing {}", file.display()))?;
        }
        Ok(json!({"template": name, "file": file, "stats": serde_json::to_value(&stats)?}))
    }

    fn template_import(
        &self,
        file: &Path,
        opened: fs::File,
        name: Option<String>,
        replace: bool,
    ) -> Result<Value> {
        use std::os::fd::AsRawFd;
        // Everything is verified before the pool is touched. The package is read through
        // the descriptor the client opened (our own /proc/self/fd entry), never by path.
        let via = PathBuf::from(format!("/proc/self/fd/{}", opened.as_raw_fd()));
        let pkg = template_builder::read_package(&via).map_err(|e| {
            anyhow!(
                "{}",
                e.to_string()
                    .replace(&*via.to_string_lossy(), &file.display().to_string())
            )
        })?;
        let manifest = pkg.manifest().clone();
        let tname = name.unwrap_or_else(|| manifest.name.clone());
        validate_qube_name("template", &tname)?;
        let staging =
            tempfile::tempdir_in(self.paths.root()).context("creating a staging directory")?;
        let kernel = pkg.write_kernel(staging.path())?;
        let initrd = pkg.write_initrd(staging.path())?;
        let rec = TemplateRecord {
            origin: "package".into(),
            recipe: None,
            recipe_hash: Some(manifest.recipe_hash.clone()).filter(|s| !s.is_empty()),
            packages: manifest.packages.clone(),
            build_date: Some(manifest.build_date.clone()).filter(|s| !s.is_empty()),
            fingerprint: manifest.fingerprint.clone(),
            has_kernel: false,
            kernel_cmdline: manifest.kernel_cmdline.clone(),
        };
        let source = ImageSource::Stream {
            what: format!("package {}", file.display()),
            size: manifest.size,
            // The manifest's fingerprint is a claim: the bytes must prove it before the
            // import commits (a forged package could name an official build's).
            reader: Box::new(template_builder::FingerprintReader::new(
                pkg.image_reader(),
                manifest.size,
                &manifest.fingerprint,
                &format!("package {}", file.display()),
            )),
        };
        self.install_root(
            &tname,
            source,
            rec,
            kernel.as_deref(),
            initrd.as_deref(),
            replace,
        )?;
        drop(opened);
        self.template_info(&tname)
    }

    // ---------------------------------------------------------------- qubes

    fn qube_create(
        &self,
        name: &str,
        class: &str,
        template: Option<&str>,
        label: Option<&str>,
    ) -> Result<Value> {
        validate_qube_name("qube", name)?;
        let class: QubeClass = class.parse().map_err(|_| {
            anyhow!("class {class:?} is not one of AppVM, DispVM, StandaloneVM, TemplateVM")
        })?;
        let txn = self.txn();
        if self.vols.qube(name).is_ok() {
            bail!("qube {name} already exists; pick another name or remove it first");
        }
        let mut prefs = QubePrefs::default();
        if let Some(l) = label {
            prefs.set("label", l)?;
        }
        if let Some(t) = template {
            if let Ok(tp) = self.catalogue().prefs(t) {
                prefs.kernel = tp.kernel.clone();
                prefs.virt_mode = tp.virt_mode.clone();
            }
        }
        self.mark_creating(name, "qube")?;
        self.catalogue().set_prefs(name, Some(&prefs))?;
        if let Err(e) = self.vols.create_qube(name, class, template) {
            self.catalogue().set_prefs(name, None)?;
            self.pool().set_meta(&format!("{CREATING}{name}"), None)?;
            return Err(e.into());
        }
        if class == QubeClass::StandaloneVM {
            // A standalone qube keeps its own copy of the kernel it was created with.
            if let Some(t) = template {
                let src = self.paths.kernels_dir(t);
                if src.exists() {
                    let dst = self.paths.kernels_dir(name);
                    fs::create_dir_all(&dst)?;
                    for f in ["vmlinuz", "initrd.img"] {
                        if src.join(f).exists() {
                            copy_atomic(&src.join(f), &dst.join(f))?;
                        }
                    }
                }
                if let Some(mut rec) = self.catalogue().template(t)? {
                    rec.origin = format!("standalone copy of {t}");
                    self.catalogue().set_template(name, Some(&rec))?;
                }
            }
        }
        self.mark_created(name)?;
        drop(txn);
        self.qube_show(name)
    }

    fn qube_state(&self, name: &str) -> Result<&'static str> {
        if !self.vols.is_running(name)? {
            return Ok("halted");
        }
        if self.in_daemon && !self.is_served(name) {
            // A start or a shutdown under way passes through this state for a moment
            // (Qubes calls it Transient).
            if self.qube_locks.is_held(name) {
                return Ok("transient");
            }
            // Marked running, but the daemon could not serve it (see its log).
            return Ok("broken");
        }
        // Volumes started; the hypervisor knows whether the guest is paused.
        let rt = self.catalogue().runtime(name)?.unwrap_or_default();
        if rt.hypervisor.is_empty() || rt.hypervisor == "none" {
            return Ok("running");
        }
        let hv = hypervisor::by_name(&rt.hypervisor)?;
        Ok(match hv.state(name, &self.paths.qube_run_dir(name)) {
            Ok(hypervisor::DomainState::Paused) => "paused",
            _ => "running",
        })
    }

    /// `qube pause` / `qube unpause`: the guest stops or resumes; storage is untouched.
    fn qube_pause(&self, name: &str, pause: bool) -> Result<Value> {
        self.vols.qube(name)?;
        let rt = self.catalogue().runtime(name)?.unwrap_or_default();
        let hv_name = self.served_hypervisor(name).unwrap_or(rt.hypervisor);
        if !self.vols.is_running(name)? {
            bail!("{name} is not running; start it first");
        }
        if hv_name.is_empty() || hv_name == "none" {
            bail!("{name} runs no guest (hypervisor none): there is nothing to pause");
        }
        let hv = hypervisor::by_name(&hv_name)?;
        let run_dir = self.paths.qube_run_dir(name);
        if pause {
            hv.pause(name, &run_dir)?;
        } else {
            hv.unpause(name, &run_dir)?;
        }
        self.qube_show(name)
    }

    fn qube_show(&self, name: &str) -> Result<Value> {
        let q = self.vols.qube(name)?;
        let prefs = self.catalogue().prefs(name)?;
        let rt = self.catalogue().runtime(name)?;
        Ok(json!({
            "name": q.qube,
            "class": class_name(&q.class),
            "template": q.template,
            "state": self.qube_state(name)?,
            "label": prefs.label.to_string(),
            "hypervisor": rt.map(|r| r.hypervisor),
            "prefs": prefs,
        }))
    }

    fn qube_list(&self) -> Result<Value> {
        let mut out = Vec::new();
        for q in self.vols.list_qubes()? {
            out.push(self.qube_show(&q.qube)?);
        }
        Ok(Value::Array(out))
    }

    fn qube_remove(&self, name: &str) -> Result<Value> {
        let q = self.vols.qube(name)?;
        if q.class == QubeClass::TemplateVM {
            return self.template_remove(name);
        }
        self.refuse_if_served(name, "remove")?;
        let mut users = Vec::new();
        for other in self.vols.list_qubes()? {
            if self.catalogue().prefs(&other.qube)?.netvm.as_deref() == Some(name) {
                users.push(other.qube);
            }
        }
        if !users.is_empty() {
            bail!(
                "{name} is the netvm of {}; give them another netvm first",
                users.join(", ")
            );
        }
        self.txn_remove(name)?;
        let _ = fs::remove_dir_all(self.paths.kernels_dir(name));
        let _ = fs::remove_dir_all(self.paths.qube_run_dir(name));
        Ok(json!({"removed": name}))
    }

    fn qube_clone(&self, src: &str, dst: &str) -> Result<Value> {
        validate_qube_name("qube", dst)?;
        let txn = self.txn();
        self.vols.qube(src)?;
        if self.vols.qube(dst).is_ok() {
            bail!("qube {dst} already exists; pick another name for the clone");
        }
        let mut prefs = self.catalogue().prefs(src)?;
        // Addresses are per qube: the clone gets its own at its first start.
        prefs.ip = None;
        let rec = self.catalogue().template(src)?;
        self.mark_creating(dst, "clone")?;
        self.catalogue().set_prefs(dst, Some(&prefs))?;
        self.catalogue().set_template(dst, rec.as_ref())?;
        if let Err(e) = self.vols.clone_qube(src, dst) {
            self.catalogue().set_prefs(dst, None)?;
            self.catalogue().set_template(dst, None)?;
            self.pool().set_meta(&format!("{CREATING}{dst}"), None)?;
            return Err(e.into());
        }
        let k = self.paths.kernels_dir(src);
        if k.exists() {
            let d = self.paths.kernels_dir(dst);
            fs::create_dir_all(&d)?;
            for f in ["vmlinuz", "initrd.img"] {
                if k.join(f).exists() {
                    copy_atomic(&k.join(f), &d.join(f))?;
                }
            }
        }
        self.mark_created(dst)?;
        drop(txn);
        self.qube_show(dst)
    }

    fn qube_prefs(&self, name: &str, key: Option<String>, value: Option<String>) -> Result<Value> {
        self.vols.qube(name)?;
        let mut prefs = self.catalogue().prefs(name)?;
        match (key, value) {
            (None, _) => Ok(serde_json::to_value(&prefs)?),
            (Some(k), None) => Ok(json!({ k.clone(): prefs.get(&k)? })),
            (Some(k), Some(v)) => {
                prefs.set(&k, &v)?;
                let _txn = self.txn();
                self.check_network_prefs(name, &prefs)?;
                self.catalogue().set_prefs(name, Some(&prefs))?;
                self.pool().commit()?;
                Ok(json!({ k.clone(): prefs.get(&k)? }))
            }
        }
    }

    /// Qubes' rules: a netvm exists and provides network, chains have no loop, and a
    /// qube others use as their netvm keeps providing it.
    fn check_network_prefs(&self, name: &str, prefs: &QubePrefs) -> Result<()> {
        let mut seen = vec![name.to_string()];
        let mut next = prefs.netvm.clone();
        while let Some(n) = next {
            if seen.contains(&n) {
                bail!(
                    "netvm {n} would make a loop ({} -> {n}); pick another netvm",
                    seen.join(" -> ")
                );
            }
            if self.vols.qube(&n).is_err() {
                bail!(
                    "netvm {n} does not exist; create it or pick another (`qubes-ctl qube list`)"
                );
            }
            let p = self.catalogue().prefs(&n)?;
            if !p.provides_network {
                bail!("{n} does not provide network; set `qubes-ctl qube prefs {n} provides_network true` first");
            }
            seen.push(n);
            next = p.netvm;
        }
        if !prefs.provides_network {
            let users: Vec<String> = self
                .vols
                .list_qubes()?
                .into_iter()
                .map(|q| q.qube)
                .filter(|q| q != name)
                .filter(|q| {
                    self.catalogue()
                        .prefs(q)
                        .is_ok_and(|p| p.netvm.as_deref() == Some(name))
                })
                .collect();
            if !users.is_empty() {
                bail!(
                    "{name} is the netvm of {}; give them another netvm first",
                    users.join(", ")
                );
            }
        }
        Ok(())
    }

    /// The qube's address on the qubes network (10.137.0.N), assigned on first use.
    fn network_ip(&self, name: &str) -> Result<String> {
        let _txn = self.txn();
        let mut prefs = self.catalogue().prefs(name)?;
        if let Some(ip) = &prefs.ip {
            return Ok(ip.clone());
        }
        let mut used = std::collections::BTreeSet::new();
        for q in self.vols.list_qubes()? {
            if let Some(ip) = self.catalogue().prefs(&q.qube)?.ip {
                used.insert(ip);
            }
        }
        let ip = (2..=254)
            .map(|n| format!("10.137.0.{n}"))
            .find(|ip| !used.contains(ip))
            .ok_or_else(|| anyhow!("the qubes network 10.137.0.0/24 is full"))?;
        prefs.ip = Some(ip.clone());
        self.catalogue().set_prefs(name, Some(&prefs))?;
        self.pool().commit()?;
        Ok(ip)
    }

    /// Removes a qube's volumes and its catalogue records in one commit; if the volume
    /// model refuses (running, in use), the staged catalogue edits are put back so the
    /// next commit does not carry half an operation.
    fn txn_remove(&self, name: &str) -> Result<()> {
        let _txn = self.txn();
        self.remove_with_catalogue(name)
    }

    fn remove_with_catalogue(&self, name: &str) -> Result<()> {
        let prefs = self.catalogue().prefs(name)?;
        let rec = self.catalogue().template(name)?;
        self.catalogue().set_prefs(name, None)?;
        self.catalogue().set_template(name, None)?;
        if let Err(e) = self.vols.remove_qube(name) {
            self.catalogue().set_prefs(name, Some(&prefs))?;
            self.catalogue().set_template(name, rec.as_ref())?;
            return Err(e.into());
        }
        Ok(())
    }

    fn refuse_if_served(&self, name: &str, what: &str) -> Result<()> {
        if self.is_served(name) || self.vols.is_running(name)? {
            bail!("cannot {what} {name} while it is running; shut it down first (`qubes-ctl qube shutdown {name}`)");
        }
        Ok(())
    }

    /// The qube whose kernel boots `q` (itself, its template, or its root's source).
    fn kernel_owner(&self, q: &QubeVolumes) -> String {
        if let Some(src) = q
            .volumes
            .iter()
            .find(|v| v.name == "root")
            .and_then(|v| v.source.clone())
        {
            if let Some((owner, _)) = src.split_once(':') {
                return owner.to_string();
            }
        }
        q.qube.clone()
    }

    fn qube_start(&self, name: &str, hypervisor: Option<String>) -> Result<Value> {
        let r = self.start_qube(name, hypervisor);
        if let Err(e) = &r {
            // A failed start leaves nothing behind in run/qubes/NAME (sockets, pid files,
            // a half-written qemu.args), unless the qube runs after all (it was running
            // before, or a domain answers) or QEMU timed out: its log there is the
            // diagnosis the error points to.
            let keep = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<hypervisor::HvError>(),
                    Some(
                        hypervisor::HvError::CommandTimeout { .. }
                            | hypervisor::HvError::AlreadyRunning { .. }
                    )
                )
            });
            if !keep && !self.is_served(name) && matches!(self.vols.is_running(name), Ok(false)) {
                let _ = fs::remove_dir_all(self.paths.qube_run_dir(name));
            }
        }
        r
    }

    fn start_qube(&self, name: &str, hypervisor: Option<String>) -> Result<Value> {
        let q = self.vols.qube(name)?;
        if self.is_served(name) {
            bail!("{name} is already running");
        }
        if self.vols.is_running(name)? && !self.in_daemon {
            bail!("{name} is marked running; start the daemon (`qubes-ctl daemon`) to pick it up");
        }
        let free = fs_free_bytes(&self.paths.pool_dir())?;
        if free < HOST_FREE_START_MARGIN {
            bail!(
                "cannot start {name}: the filesystem holding the pool ({}) has only {} free, less than the {} safety margin; \
                 its guest would get write errors. Free space there (remove files, or qubes/revisions with \
                 `qubes-ctl qube remove` / `qubes-ctl volume config Q:private revisions_to_keep 0`), then start it again",
                self.paths.pool_dir().display(),
                crate::units::human_size(free),
                crate::units::human_size(HOST_FREE_START_MARGIN)
            );
        }
        let prefs = self.catalogue().prefs(name)?;
        let hv_name = hypervisor
            .or_else(|| Some(prefs.hypervisor.clone()).filter(|s| !s.is_empty()))
            .unwrap_or_else(|| hypervisor::default_hypervisor().name().to_string());
        let hv = hypervisor::by_name(&hv_name)?;
        let run_dir = self.paths.qube_run_dir(name);
        {
            use std::os::unix::fs::DirBuilderExt;
            // The qube's sockets and logs: ours alone, whatever the umask.
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&run_dir)
                .with_context(|| format!("creating {}", run_dir.display()))?;
        }
        // As in Qubes, a qube's netvm is started first (with the same hypervisor).
        if let (Some(n), true) = (&prefs.netvm, hv_name != "none") {
            self.check_network_prefs(name, &prefs)?;
            {
                let _netvm = self.lock_qubes(&[n]);
                if !self.vols.is_running(n)? {
                    self.qube_start(n, Some(hv_name.clone()))
                        .with_context(|| format!("starting {name}'s netvm {n}"))?;
                }
            }
            let nhv = self.served_hypervisor(n).unwrap_or_default();
            if nhv != hv_name {
                bail!("{name}'s netvm {n} runs on {nhv:?}, not {hv_name}: both must use the same hypervisor");
            }
        }

        let (started, qemu_user) = {
            let _txn = self.txn();
            // Under the catalogue lock, so two qubes starting at once get distinct ids.
            // Only root can hand QEMU another uid; a user's own qubes run as that user.
            let qemu_uid = match hv_name.as_str() {
                "qemu" if rustix::process::geteuid().is_root() => Some(self.free_qemu_uid()?),
                _ => None,
            };
            self.catalogue().set_runtime(
                name,
                Some(&RuntimeRecord {
                    hypervisor: hv_name.clone(),
                    started_at: now_secs(),
                    qemu_uid,
                }),
            )?;
            match self.vols.start(name) {
                Ok(s) => (
                    s,
                    qemu_uid.map(|id| hypervisor::DomainUser { uid: id, gid: id }),
                ),
                Err(e) => {
                    self.catalogue().set_runtime(name, None)?;
                    return Err(e.into());
                }
            }
        };
        if let Some(u) = qemu_user {
            if let Err(e) = self.open_run_dir_to(name, &run_dir, &prefs) {
                let _txn = self.txn();
                let _ = self.catalogue().set_runtime(name, None);
                let _ = self.vols.stop(name);
                return Err(e);
            }
            tracing::debug!(qube = %name, uid = u.uid, "qemu user");
        }
        let served = match self
            .serve(name, &started)
            .and_then(|s| give_socket(s.path(), qemu_user).map(|()| s))
        {
            Ok(s) => s,
            Err(e) => {
                let _txn = self.txn();
                let _ = self.catalogue().set_runtime(name, None);
                let _ = self.vols.stop(name);
                return Err(e);
            }
        };
        let socket = served.path().to_path_buf();
        let mut xen_disks = None;
        if hv_name != "none" {
            let undo = |ctl: &Self, served: blkback::NbdServer| {
                let _ = served.shutdown(Duration::from_secs(1));
                let _txn = ctl.txn();
                let _ = ctl.catalogue().set_runtime(name, None);
                let _ = ctl.vols.stop(name);
            };
            let spec = self
                .domain_spec(&q, &prefs, &started, &socket, &run_dir)
                .map(|spec| hypervisor::DomainSpec {
                    user: qemu_user,
                    ..spec
                })
                .and_then(|spec| self.wire_network(name, &prefs, hv.as_ref(), spec));
            let mut spec = match spec {
                Ok(s) => s,
                Err(e) => {
                    undo(self, served);
                    return Err(e);
                }
            };
            if hv_name == "xen" {
                spec.cmdline = xen_cmdline(&spec.cmdline);
            }
            let started_hv = hv
                .start(&spec)
                .map_err(|e| anyhow!(e).context(format!("starting {name} on {hv_name}")))
                .and_then(|()| self.xen_blkif_disks(name, &hv_name, &spec, &started));
            match started_hv {
                Ok(d) => xen_disks = d,
                Err(e) => {
                    if let Some(n) = &prefs.netvm {
                        let _ = hv.detach_client(n, &self.paths.qube_run_dir(n), name);
                    }
                    undo(self, served);
                    return Err(e);
                }
            }
        }
        self.served().insert(
            name.to_string(),
            Served {
                server: served,
                hypervisor: hv_name.clone(),
                xen_disks,
            },
        );
        tracing::info!(qube = %name, hypervisor = %hv_name, socket = %socket.display(), "qube started");
        let vols: Vec<Value> = started
            .iter()
            .map(|s| {
                json!({
                    "volume": s.name,
                    "key": s.key,
                    "read_only": s.read_only,
                    "size": s.size,
                    "nbd_uri": blkback::nbd_uri(&socket, &export_name(name, &s.name)),
                })
            })
            .collect();
        Ok(json!({
            "name": name,
            "state": "running",
            "hypervisor": hv_name,
            "console": hv.console_log(&run_dir),
            "volumes": vols,
        }))
    }

    /// Under Xen with [`hypervisor::XenDiskMode::Blkif`] the domain was created paused
    /// without disks: serve its volumes over blkif, then unpause it. On failure the
    /// domain is destroyed (the caller undoes the storage).
    fn xen_blkif_disks(
        &self,
        name: &str,
        hv_name: &str,
        spec: &hypervisor::DomainSpec,
        started: &[StartedVolume],
    ) -> Result<Option<crate::xen_disks::RealXenDisks>> {
        if hv_name != "xen" {
            return Ok(None);
        }
        let xen = hypervisor::Xen::new();
        if xen.disk_mode() != hypervisor::XenDiskMode::Blkif {
            return Ok(None);
        }
        let r = (|| {
            let domid = xen.domid(name)?;
            let chunk = self.pool().info()?.chunk_size;
            let vols = self.blkif_volumes(name, started)?;
            let disks = crate::xen_disks::attach_real(domid, chunk, vols, &spec.run_dir)?;
            if let Err(e) = hypervisor::Hypervisor::unpause(&xen, name, &spec.run_dir) {
                let _ = disks.detach();
                return Err(e.into());
            }
            anyhow::Ok(disks)
        })();
        match r {
            Ok(d) => Ok(Some(d)),
            Err(e) => {
                let _ = hypervisor::Hypervisor::kill(&xen, name, &spec.run_dir);
                Err(e.context(format!("serving {name}'s disks over blkif")))
            }
        }
    }

    /// The volumes of a Xen qube as its blkif disks, in the order (and so with the
    /// vdevs) of [`Self::domain_spec`].
    fn blkif_volumes(
        &self,
        name: &str,
        started: &[StartedVolume],
    ) -> Result<Vec<crate::xen_disks::RealVolume>> {
        let mut vols = Vec::new();
        for (s, vdev) in started.iter().zip(XEN_VDEVS) {
            let device = self.pool().open_volume(&s.key, s.read_only)?;
            vols.push((
                vdev.to_string(),
                s.read_only,
                format!("{name}:{} ({})", s.name, s.key),
                device,
            ));
        }
        Ok(vols)
    }

    /// After a daemon restart: a running Xen domain whose disks an earlier daemon served
    /// over blkif gets them served again from the same rings (its backend nodes are
    /// still in xenstore); `None` for other domains (kernel NBD disks reconnect to the
    /// NBD socket by themselves).
    fn xen_blkif_resume(
        &self,
        name: &str,
        started: &[StartedVolume],
    ) -> Result<Option<crate::xen_disks::RealXenDisks>> {
        let xen = hypervisor::Xen::new();
        let run_dir = self.paths.qube_run_dir(name);
        if hypervisor::Hypervisor::state(&xen, name, &run_dir)? == hypervisor::DomainState::Halted {
            return Ok(None);
        }
        let domid = xen.domid(name)?;
        if !crate::xen_disks::has_blkif_disks(domid)? {
            return Ok(None);
        }
        let chunk = self.pool().info()?.chunk_size;
        let vols = self.blkif_volumes(name, started)?;
        let disks = crate::xen_disks::reattach_real(domid, chunk, vols, &run_dir)
            .with_context(|| format!("serving {name}'s blkif disks again (domain {domid})"))?;
        Ok(Some(disks))
    }

    /// Qubes' network for the domain: its address, gateway and MAC on the kernel command
    /// line (`qubes.ip=`, `qubes.gateway=`, `qubes.netvm=1` for a netvm; the guest
    /// integration configures the interfaces from them), and its NIC linked to the netvm.
    fn wire_network(
        &self,
        name: &str,
        prefs: &QubePrefs,
        hv: &dyn hypervisor::Hypervisor,
        mut spec: hypervisor::DomainSpec,
    ) -> Result<hypervisor::DomainSpec> {
        if prefs.netvm.is_none() && !prefs.provides_network {
            return Ok(spec);
        }
        let ip = self.network_ip(name)?;
        let last: u8 = ip
            .rsplit('.')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        spec.net.mac = format!("00:16:3e:5e:6c:{last:02x}");
        spec.net.provides_network = prefs.provides_network;
        let mut opts = format!(" qubes.ip={ip} qubes.mac={}", spec.net.mac);
        if prefs.provides_network {
            opts.push_str(" qubes.netvm=1");
        }
        if let Some(n) = &prefs.netvm {
            let gateway = self.network_ip(n)?;
            opts.push_str(&format!(" qubes.gateway={gateway}"));
            let nrun = self.paths.qube_run_dir(n);
            let sock = nrun.join(format!("vif-{name}.sock"));
            if sock.as_os_str().len() > 107 {
                bail!(
                    "the link socket {} is too long for a unix socket; use a shorter --root or qube name",
                    sock.display()
                );
            }
            // The netvm's end: the same number, locally administered (`fe:`), which the
            // guest integration's udev rule recognises as a client link.
            let backend_mac = format!("fe:16:3e:5e:6c:{last:02x}");
            hv.attach_client(n, &nrun, name, &sock, &backend_mac)
                .with_context(|| format!("connecting {name} to its netvm {n}"))?;
            // The netvm's QEMU made the link's listening end; only this qube's QEMU
            // may connect to it.
            give_socket(&sock, spec.user)?;
            spec.net.netvm_socket = Some(sock);
        }
        spec.cmdline.push_str(&opts);
        Ok(spec)
    }

    /// The lowest QEMU uid no running qube holds (see [`QEMU_UID_BASE`]). The caller
    /// holds the catalogue lock and records the uid before releasing it.
    fn free_qemu_uid(&self) -> Result<u32> {
        let mut taken = std::collections::BTreeSet::new();
        for q in self.vols.running_qubes()? {
            if let Some(id) = self.catalogue().runtime(&q)?.and_then(|r| r.qemu_uid) {
                taken.insert(id);
            }
        }
        // Another root's daemon on this host allocates from the same range: an id some
        // process runs as (its /proc directory is that uid's) is taken too.
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            use std::os::unix::fs::MetadataExt;
            if let Ok(md) = e.metadata() {
                if (QEMU_UID_BASE..QEMU_UID_BASE + QEMU_UIDS).contains(&md.uid()) {
                    taken.insert(md.uid());
                }
            }
        }
        (QEMU_UID_BASE..QEMU_UID_BASE + QEMU_UIDS)
            .find(|id| !taken.contains(id))
            .ok_or_else(|| anyhow!("{QEMU_UIDS} qubes already run under QEMU; shut one down first"))
    }

    /// A QEMU qube's run dir becomes its QEMU's working directory (the backend gives it
    /// to the qube's user). A client's QEMU reaches its netvm's link socket through
    /// `../NETVM/`, so `qubes/` and a netvm's run dir let others through (0711, no
    /// listing); what lies in them is the owner's alone (0600).
    fn open_run_dir_to(&self, name: &str, run_dir: &Path, prefs: &QubePrefs) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let set = |p: &Path, mode: u32| {
            fs::set_permissions(p, fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting {} to mode {mode:o} for {name}", p.display()))
        };
        if let Some(qubes) = run_dir.parent() {
            set(qubes, 0o711)?;
        }
        set(run_dir, if prefs.provides_network { 0o711 } else { 0o700 })
    }

    fn serve(&self, name: &str, started: &[StartedVolume]) -> Result<blkback::NbdServer> {
        let mut exports = Vec::new();
        for s in started {
            let device = self.pool().open_volume(&s.key, s.read_only)?;
            exports.push(blkback::Export {
                name: export_name(name, &s.name),
                description: format!("{name}:{} ({})", s.name, s.key),
                device,
            });
        }
        let socket = self.paths.nbd_socket(name);
        blkback::NbdServer::bind_unix(&socket, exports)
            .with_context(|| format!("serving {name}'s volumes on {}", socket.display()))
    }

    fn domain_spec(
        &self,
        q: &QubeVolumes,
        prefs: &QubePrefs,
        started: &[StartedVolume],
        socket: &Path,
        run_dir: &Path,
    ) -> Result<hypervisor::DomainSpec> {
        let (kernel, initrd, cmdline) = if prefs.kernel == "template" {
            let owner = self.kernel_owner(q);
            let kdir = self.paths.kernels_dir(&owner);
            let kernel = kdir.join("vmlinuz");
            if !kernel.exists() {
                bail!(
                    "{} boots the kernel of {owner}, which has none ({} missing); set `qubes-ctl qube prefs {} kernel none` for images that boot themselves",
                    q.qube,
                    kernel.display(),
                    q.qube
                );
            }
            let rec = self.catalogue().template(&owner)?.unwrap_or_default();
            let base = if rec.kernel_cmdline.is_empty() {
                DEFAULT_CMDLINE.to_string()
            } else {
                rec.kernel_cmdline
            };
            let initrd = Some(kdir.join("initrd.img")).filter(|p| p.exists());
            (
                Some(kernel),
                initrd,
                format!("{base} qubes.hostname={}", q.qube),
            )
        } else {
            (None, None, String::new())
        };
        let cmdline = if prefs.kernelopts.is_empty() {
            cmdline
        } else {
            format!("{cmdline} {}", prefs.kernelopts)
        };
        let disks = started
            .iter()
            .zip(XEN_VDEVS)
            .map(|(s, vdev)| hypervisor::DiskSpec {
                vdev: vdev.to_string(),
                nbd_socket: socket.to_path_buf(),
                export: export_name(&q.qube, &s.name),
                read_only: s.read_only,
            })
            .collect();
        Ok(hypervisor::DomainSpec {
            name: q.qube.clone(),
            memory_mib: prefs.memory,
            maxmem_mib: prefs.maxmem.max(prefs.memory),
            vcpus: prefs.vcpus,
            virt_mode: prefs.virt_mode.parse().map_err(|e| anyhow!("{e}"))?,
            kernel,
            initrd,
            cmdline: cmdline.trim().to_string(),
            disks,
            netvm: prefs.netvm.clone(),
            net: Default::default(),
            label: prefs.label.to_string(),
            run_dir: run_dir.to_path_buf(),
            user: None,
        })
    }

    fn qube_shutdown(&self, name: &str, timeout_secs: u64, kill: bool) -> Result<Value> {
        self.vols.qube(name)?;
        let timeout = Duration::from_secs(timeout_secs);
        let run_dir = self.paths.qube_run_dir(name);
        let rt = self.catalogue().runtime(name)?.unwrap_or_default();
        let hv_name = self.served_hypervisor(name).unwrap_or(rt.hypervisor);
        if !self.vols.is_running(name)? && !self.is_served(name) {
            bail!("{name} is not running");
        }
        if !kill && self.catalogue().prefs(name)?.provides_network {
            let mut clients = Vec::new();
            for q in self.vols.list_qubes()? {
                if q.qube != name
                    && self.vols.is_running(&q.qube)?
                    && self.catalogue().prefs(&q.qube)?.netvm.as_deref() == Some(name)
                {
                    clients.push(q.qube);
                }
            }
            if !clients.is_empty() {
                bail!(
                    "{name} provides network to running qubes {}; shut them down first (or --kill)",
                    clients.join(", ")
                );
            }
        }
        if !hv_name.is_empty() && hv_name != "none" {
            let hv = hypervisor::by_name(&hv_name)?;
            if kill {
                hv.kill(name, &run_dir)?;
            } else {
                hv.shutdown(name, &run_dir, timeout)
                    .with_context(|| format!("shutting down {name}"))?;
            }
        }
        self.stop_storage(name, timeout)?;
        Ok(json!({"name": name, "state": "halted"}))
    }

    /// Waits for the NBD clients to flush and go, then commits the volumes (stop).
    fn stop_storage(&self, name: &str, grace: Duration) -> Result<()> {
        let hv_name = match self.served_hypervisor(name) {
            Some(h) => h,
            None => {
                self.catalogue()
                    .runtime(name)?
                    .unwrap_or_default()
                    .hypervisor
            }
        };
        let netvm = self.catalogue().prefs(name)?.netvm;
        if let (Some(n), false) = (netvm, hv_name.is_empty() || hv_name == "none") {
            let nrun = self.paths.qube_run_dir(&n);
            if let Err(e) =
                hypervisor::by_name(&hv_name).and_then(|hv| hv.detach_client(&n, &nrun, name))
            {
                tracing::warn!(qube = name, netvm = %n, "unplugging the link from the netvm: {e}");
            }
            let _ = fs::remove_file(nrun.join(format!("vif-{name}.sock")));
        }
        let removed = self.served().remove(name);
        if let Some(s) = removed {
            if let Some(d) = s.xen_disks {
                if let Err(e) = d.detach() {
                    tracing::warn!(qube = name, "closing the blkif disks: {e:#}");
                }
            }
            s.server
                .shutdown(grace)
                .with_context(|| format!("closing {name}'s exports"))?;
        }
        let _txn = self.txn();
        self.catalogue().set_runtime(name, None)?;
        self.vols.stop(name)?;
        // A DispVM leaves nothing behind: not its domain config, console or sockets
        // either (its volumes went with the stop).
        if self.vols.qube(name)?.class == QubeClass::DispVM {
            let run_dir = self.paths.qube_run_dir(name);
            if let Err(e) = fs::remove_dir_all(&run_dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(qube = name, "removing {}: {e}", run_dir.display());
                }
            }
        }
        tracing::info!(qube = %name, "qube stopped: private committed, snapshots dropped");
        Ok(())
    }

    fn qube_console(&self, name: &str) -> Result<Value> {
        self.vols.qube(name)?;
        let run_dir = self.paths.qube_run_dir(name);
        let rt = self.catalogue().runtime(name)?.unwrap_or_default();
        let hv = hypervisor::by_name(if rt.hypervisor.is_empty() {
            "qemu"
        } else {
            &rt.hypervisor
        })?;
        let log = hv.console_log(&run_dir);
        let text = fs::read(&log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        Ok(json!({"name": name, "log": log, "text": text}))
    }

    // ---------------------------------------------------------------- volumes

    fn volume_json(&self, qube: &str, vol: &str) -> Result<Value> {
        let st = self.vols.volume_status(qube, vol)?;
        let mut v = serde_json::to_value(&st)?;
        let uri = self
            .is_served(qube)
            .then(|| blkback::nbd_uri(&self.paths.nbd_socket(qube), &export_name(qube, vol)));
        v["nbd_uri"] = json!(uri);
        Ok(v)
    }

    fn volume_info(&self, qube: &str, vol: &str) -> Result<Value> {
        self.volume_json(qube, vol)
    }

    fn volume_list(&self, qube: Option<&str>) -> Result<Value> {
        let qubes: Vec<QubeVolumes> = match qube {
            Some(q) => vec![self.vols.qube(q)?],
            None => self.vols.list_qubes()?,
        };
        let mut out = Vec::new();
        for q in qubes {
            for v in &q.volumes {
                out.push(self.volume_json(&q.qube, &v.name)?);
            }
        }
        Ok(Value::Array(out))
    }

    fn volume_import(
        &self,
        qube: &str,
        vol: &str,
        file: &Path,
        f: fs::File,
        size: u64,
    ) -> Result<Value> {
        self.refuse_if_served(qube, "import into")?;
        let mut reader = ExactReader {
            inner: std::io::BufReader::with_capacity(1 << 20, f),
            left: size,
            size,
            what: format!("the input {}", file.display()),
        };
        let stats = self.vols.import(qube, vol, &mut reader, size)?;
        let mut v = self.volume_info(qube, vol)?;
        v["import"] = serde_json::to_value(stats)?;
        Ok(v)
    }

    // ---------------------------------------------------------------- daemon support

    /// Serves again the qubes the pool still marks running (after a daemon crash), at the
    /// same socket paths, so clients that reconnect carry on.
    /// A qube that cannot be served is returned with the reason, and the others are
    /// served all the same.
    pub fn resume_running(&self) -> (Vec<String>, Vec<(String, anyhow::Error)>) {
        let mut resumed = Vec::new();
        let mut broken = Vec::new();
        let names = match self.vols.running_qubes() {
            Ok(n) => n,
            Err(e) => {
                broken.push(("(pool)".to_string(), anyhow!(e)));
                return (resumed, broken);
            }
        };
        for name in names {
            let started = match self.running_volumes(&name) {
                Ok(s) => s,
                Err(e) => {
                    broken.push((name, e));
                    continue;
                }
            };
            let server = match self.serve(&name, &started) {
                Ok(s) => s,
                Err(e) => {
                    broken.push((name, e));
                    continue;
                }
            };
            let rt = self
                .catalogue()
                .runtime(&name)
                .ok()
                .flatten()
                .unwrap_or_default();
            let user = rt
                .qemu_uid
                .map(|id| hypervisor::DomainUser { uid: id, gid: id });
            if let Err(e) = give_socket(server.path(), user) {
                broken.push((name, e));
                continue;
            }
            let hv = if rt.hypervisor.is_empty() {
                "none".to_string()
            } else {
                rt.hypervisor
            };
            let xen_disks = if hv == "xen" {
                match self.xen_blkif_resume(&name, &started) {
                    Ok(d) => d,
                    Err(e) => {
                        // Served over NBD all the same, so `qube shutdown` can stop it.
                        tracing::warn!(qube = %name, "{e:#}");
                        None
                    }
                }
            } else {
                None
            };
            self.served().insert(
                name.clone(),
                Served {
                    server,
                    hypervisor: hv,
                    xen_disks,
                },
            );
            resumed.push(name);
        }
        (resumed, broken)
    }

    /// The volumes a qube marked running has in the pool now (after a daemon crash), in
    /// start order, without changing anything: save_on_stop volumes are served from their
    /// running snapshot, the others from the snapshot / fresh volume made at start.
    fn running_volumes(&self, name: &str) -> Result<Vec<StartedVolume>> {
        let q = self.vols.qube(name)?;
        let mut out = Vec::new();
        for v in &q.volumes {
            let key = if v.save_on_stop {
                storage::qubes::run_key(name, &v.name)
            } else {
                storage::qubes::head_key(name, &v.name)
            };
            let info = self.pool().volume(&key).with_context(|| {
                format!("{name} is marked running but its volume {key} is missing; stop it with `qubes-ctl qube shutdown {name} --kill`")
            })?;
            out.push(StartedVolume {
                name: v.name.clone(),
                key,
                read_only: !v.rw,
                size: info.size,
            });
        }
        Ok(out)
    }

    /// Stops the storage of qubes whose domain has gone away (the guest powered off).
    /// A qube a request is working on is left for the next round (that request may be
    /// its shutdown, or a start still bringing its guest up).
    pub fn reap_halted(&self) -> Vec<(String, Result<()>)> {
        let served: Vec<(String, String)> = self
            .served()
            .iter()
            .filter(|(_, s)| s.hypervisor != "none")
            .map(|(n, s)| (n.clone(), s.hypervisor.clone()))
            .collect();
        let mut out = Vec::new();
        for (name, hv_name) in served {
            let Some(_locked) = self.qube_locks.try_lock(&[&name]) else {
                continue;
            };
            let Ok(hv) = hypervisor::by_name(&hv_name) else {
                continue;
            };
            if !self.is_served(&name) {
                continue;
            }
            if let Ok(hypervisor::DomainState::Halted) =
                hv.state(&name, &self.paths.qube_run_dir(&name))
            {
                // What `qube shutdown` does once the domain is gone: the backend releases
                // what it holds for it in dom0 (Xen: the /dev/nbdN of the kernel-NBD
                // fallback, whose clients must leave before the exports close; the blkif
                // disks close in stop_storage) before the volumes stop.
                if let Err(e) = hv.kill(&name, &self.paths.qube_run_dir(&name)) {
                    tracing::warn!(qube = %name, "releasing its devices after it halted: {e}");
                }
                let r = self.stop_storage(&name, Duration::from_secs(10));
                out.push((name, r));
            }
        }
        out
    }

    pub fn served_qubes(&self) -> Vec<String> {
        self.served().keys().cloned().collect()
    }

    /// Closes exports without stopping the qubes (daemon exit): they stay marked
    /// running and a restarted daemon serves them again.
    pub fn detach_all(&self) {
        let served = std::mem::take(&mut *self.served());
        for (_, s) in served {
            let _ = s.server.shutdown(Duration::from_secs(2));
        }
        let _ = self.pool().commit();
    }
}

/// Templates record a QEMU command line (virtio disks, serial console); under Xen the
/// same disks are xvd* and the PV console is hvc0.
fn xen_cmdline(cmdline: &str) -> String {
    cmdline
        .split_whitespace()
        .map(|w| match w {
            "root=/dev/vda" => "root=/dev/xvda",
            "console=ttyS0" => "console=hvc0",
            other => other,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where a template's root image comes from: an image or a verified package's chunk
/// stream (no temporary copy of the image).
enum ImageSource<'a> {
    Stream {
        what: String,
        size: u64,
        reader: Box<dyn std::io::Read + 'a>,
    },
}

/// NBD export name of a qube's volume: `QUBE/VOLUME`.
pub fn export_name(qube: &str, vol: &str) -> String {
    format!("{qube}/{vol}")
}

/// Gives a socket to a qube's QEMU user (its mode stays 0600: that user's alone).
/// `lchown`: the socket lies in a directory that user owns, so never follow a link.
fn give_socket(socket: &Path, user: Option<hypervisor::DomainUser>) -> Result<()> {
    let Some(u) = user else { return Ok(()) };
    std::os::unix::fs::lchown(socket, Some(u.uid), Some(u.gid)).with_context(|| {
        format!(
            "giving {} to the qube's QEMU user (uid {})",
            socket.display(),
            u.uid
        )
    })
}

/// The first uid (and gid) of the range each running QEMU gets one of.
///
/// Each running qube's QEMU runs as a user of its own, so a compromised QEMU cannot
/// reach another qube's disks (its NBD socket is 0600, owned by that user), files or
/// processes. The ids are allocated when the qube starts (the lowest one no running
/// qube holds, kept in its runtime record until it stops) rather than fixed per qube:
/// two running qubes can never share one, and nothing is left to reclaim when a qube
/// is removed. They need no /etc/passwd entry, as the kernel only knows numbers; the
/// range, 0x70000000 up, lies above the ranges systemd hands out (regular and dynamic
/// users below 65536, containers' up to 0x6FFFFFFF) and below 2^31, so no login user,
/// DynamicUser= service or container shares one.
pub const QEMU_UID_BASE: u32 = 0x7000_0000;
/// How many qubes may run under QEMU at once.
const QEMU_UIDS: u32 = 1 << 16;

fn copy_atomic(src: &Path, dst: &Path) -> Result<()> {
    let tmp: PathBuf = dst.with_extension("tmp");
    fs::copy(src, &tmp)
        .with_context(|| format!("copying {} to {}", src.display(), tmp.display()))?;
    fs::File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, dst)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xen_command_line_uses_xen_devices() {
        assert_eq!(
            xen_cmdline("root=/dev/vda rw console=ttyS0 qubes.hostname=work"),
            "root=/dev/xvda rw console=hvc0 qubes.hostname=work"
        );
    }

    #[test]
    fn volume_refs() {
        assert_eq!(
            parse_volume_ref("work:private").unwrap(),
            ("work".into(), "private".into())
        );
        assert!(parse_volume_ref("work").is_err());
        assert!(parse_volume_ref("work:swap").is_err());
        assert!(parse_volume_ref("../x:root").is_err());
    }
}
