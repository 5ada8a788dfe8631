//! The controller: carries out [`Request`](crate::api::Request)s against the pool, the qube catalogue, the NBD
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
//!
//! By concern: [`dispatch`] maps a request to its method and its qube locks;
//! [`lifecycle`] is a qube's start and shutdown, read top to bottom (storage in
//! `storage::qubes`, then its NBD exports, its netvm link from [`network`], its domain
//! from [`domain`]); [`qubes`] the catalogue of qubes; [`templates`] and [`volumes`]
//! what their commands do; [`pool`] makes and opens the pool. What is left here is
//! shared by all: the locks, the catalogue transaction and creation markers.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use storage::qubes::{QubeClass, Volumes};
use storage::Pool;

use crate::catalogue::Catalogue;
use crate::paths::Paths;
use pool::{detect_driver, open_pool};

mod dispatch;
mod domain;
mod lifecycle;
mod network;
mod pool;
mod qubes;
mod repo;
mod status;
mod templates;
mod volumes;

pub use lifecycle::QEMU_UID_BASE;
pub use pool::{init_pool, InitOptions, HOST_FREE_START_MARGIN, HOST_FREE_WARN};
pub use volumes::image_size;

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

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

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

/// `(key, value)` pairs as the volume model takes them.
fn as_strs(records: &[(String, String)]) -> Vec<(&str, &str)> {
    records
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
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

    /// The records a new qube's creation commits with its volumes: its creation marker
    /// (`what` is being made) and its catalogue records.
    fn creation_records(
        name: &str,
        what: &str,
        prefs: &crate::catalogue::QubePrefs,
        template: Option<&crate::catalogue::TemplateRecord>,
    ) -> Vec<(String, String)> {
        let mut r = vec![
            (format!("{CREATING}{name}"), what.to_string()),
            crate::catalogue::prefs_entry(name, prefs),
        ];
        r.extend(template.map(|t| crate::catalogue::template_entry(name, t)));
        r
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

    // ---------------------------------------------------------------- templates

    // ---------------------------------------------------------------- qubes

    /// Removes a qube's volumes and its catalogue records in one commit; if the volume
    /// model refuses (running, in use), nothing is left staged.
    fn txn_remove(&self, name: &str) -> Result<()> {
        let _txn = self.txn();
        self.remove_with_catalogue(name)
    }

    fn remove_with_catalogue(&self, name: &str) -> Result<()> {
        let keys = crate::catalogue::record_keys(name);
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.vols.remove_qube_with(name, &keys)?;
        Ok(())
    }

    fn refuse_if_served(&self, name: &str, what: &str) -> Result<()> {
        if self.is_served(name) || self.vols.is_running(name)? {
            bail!("cannot {what} {name} while it is running; shut it down first (`qubes-ctl qube shutdown {name}`)");
        }
        Ok(())
    }

    // ---------------------------------------------------------------- volumes

    // ---------------------------------------------------------------- daemon support
}

/// NBD export name of a qube's volume: `QUBE/VOLUME`.
pub fn export_name(qube: &str, vol: &str) -> String {
    format!("{qube}/{vol}")
}

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
