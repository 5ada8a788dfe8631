//! The Qubes volume model: which pool volumes a qube has, and what start, stop, revert,
//! import and the rest do to them (Qubes' `snap_on_start` / `save_on_stop` semantics).
//!
//! Pool keys (see ARCHITECTURE.md):
//!
//! ```text
//!   Q/V          head: committed state of a save_on_stop volume; for a snap_on_start or
//!                volatile volume, the snapshot / fresh volume that exists only while Q runs
//!   Q/V@run      running snapshot of a save_on_stop volume (the dirty marker)
//!   Q/V@<id>     revision; id = unix time with microseconds of when it was superseded
//!   Q/V@import   an import in progress (a guest's flush may commit it part-way; a
//!                stale one is dropped by the next import or removal of the qube)
//! ```
//!
//! ```text
//!   start:  T/root --snapshot--> A/root        (snap_on_start: source as committed now)
//!           A/private --snapshot--> A/private@run   (save_on_stop; resumed if it exists)
//!           (create) A/volatile                (fresh; leftovers of a crash dropped first)
//!   stop:   A/private -> A/private@<now>; A/private@run -> A/private; prune revisions
//!           A/root, A/volatile removed
//! ```
//!
//! Contract:
//! * Each public method that changes anything is one pool transaction ending in
//!   [`Pool::commit`]: a crash leaves either all of it or none of it. The qube configs live
//!   in the pool's key/value store (`qube-volumes/<qube>`) and the running marker in
//!   `qube-running/<qube>`, committed with the volumes.
//! * A method checks everything it can before changing the pool; if a pool operation still
//!   fails half-way, what it staged is undone (creations, snapshots and renames are
//!   reverted; only leftovers and revisions that were being dropped anyway stay dropped).
//! * Methods of one [`Volumes`] (and its clones) are serialised, because a commit makes
//!   everything staged in the pool durable. Use one `Volumes` per pool.
//! * A crash while a qube runs leaves it marked running with its `@run` snapshots (and
//!   every write flushed into them). `start` then resumes from them and `stop` commits
//!   them; `discard` drops them.

mod error;
mod types;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::sync::{Arc, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

pub use error::ModelError;
pub use types::*;

use crate::names::validate_name;
use crate::pool::{ImportOptions, ImportStats, Pool, PoolError};

const META_VOLUMES: &str = "qube-volumes/";
const META_RUNNING: &str = "qube-running/";
const RUN: &str = "run";
const IMPORT: &str = "import";

pub fn head_key(qube: &str, vol: &str) -> String {
    format!("{qube}/{vol}")
}

pub fn run_key(qube: &str, vol: &str) -> String {
    format!("{qube}/{vol}@{RUN}")
}

pub fn revision_key(qube: &str, vol: &str, id: &str) -> String {
    format!("{qube}/{vol}@{id}")
}

/// Microseconds since the epoch from a revision id `SECS.MICROS` (exactly 6 digits).
fn parse_revision_id(id: &str) -> Option<u64> {
    let (s, us) = id.split_once('.')?;
    if s.is_empty() || us.len() != 6 || !s.bytes().chain(us.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u64>()
        .ok()?
        .checked_mul(1_000_000)?
        .checked_add(us.parse().ok()?)
}

fn format_revision_id(micros: u64) -> String {
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

fn now_micros() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Start order as Qubes attaches them (xvda, xvdb, xvdc), then anything else.
fn volume_rank(name: &str) -> usize {
    ["root", "private", "volatile"]
        .iter()
        .position(|n| *n == name)
        .unwrap_or(3)
}

/// What a transaction staged and how to take it back if a later step fails.
enum Undo {
    Remove(String),
    Rename { from: String, to: String },
    Meta { key: String, old: Option<String> },
    Resize { key: String, size: u64 },
}

/// Stages pool operations and, unless committed, reverts them when dropped.
struct Txn<'a> {
    pool: &'a dyn Pool,
    undo: Vec<Undo>,
    committed: bool,
    /// Keeps a guest's FLUSH (a pool commit from another thread) from making half of
    /// this transaction durable. Declared last: released after the undo in `Drop`.
    _batch: crate::pool::BatchGuard<'a>,
}

impl<'a> Txn<'a> {
    fn new(pool: &'a dyn Pool) -> Self {
        Txn {
            pool,
            undo: Vec::new(),
            committed: false,
            _batch: pool.batch(),
        }
    }

    fn create(&mut self, key: &str, size: u64) -> Result<(), ModelError> {
        self.pool
            .create_volume(key, size)
            .map_err(ModelError::pool("creating volume", key))?;
        self.undo.push(Undo::Remove(key.into()));
        Ok(())
    }

    fn snapshot(&mut self, source: &str, target: &str) -> Result<(), ModelError> {
        self.pool
            .snapshot(source, target)
            .map_err(ModelError::pool(
                "snapshotting",
                format!("{source} -> {target}"),
            ))?;
        self.undo.push(Undo::Remove(target.into()));
        Ok(())
    }

    fn rename(&mut self, from: &str, to: &str) -> Result<(), ModelError> {
        self.pool
            .rename_volume(from, to)
            .map_err(ModelError::pool("renaming", format!("{from} -> {to}")))?;
        self.undo.push(Undo::Rename {
            from: from.into(),
            to: to.into(),
        });
        Ok(())
    }

    fn resize(&mut self, key: &str, size: u64, allow_shrink: bool) -> Result<(), ModelError> {
        let old = self
            .pool
            .volume(key)
            .map_err(ModelError::pool("resizing", key))?
            .size;
        self.pool
            .resize_volume(key, size, allow_shrink)
            .map_err(ModelError::pool("resizing", key))?;
        self.undo.push(Undo::Resize {
            key: key.into(),
            size: old,
        });
        Ok(())
    }

    /// Removal cannot be taken back: only call it for volumes being dropped anyway
    /// (leftovers, discarded snapshots, pruned revisions), before anything else if it may
    /// fail with `Busy`.
    fn remove(&mut self, key: &str) -> Result<(), ModelError> {
        self.pool
            .remove_volume(key)
            .map_err(ModelError::pool("removing volume", key))
    }

    fn set_meta(&mut self, key: &str, value: Option<&str>) -> Result<(), ModelError> {
        let old = self
            .pool
            .get_meta(key)
            .map_err(ModelError::pool("reading pool metadata", key))?;
        self.pool
            .set_meta(key, value)
            .map_err(ModelError::pool("writing pool metadata", key))?;
        self.undo.push(Undo::Meta {
            key: key.into(),
            old,
        });
        Ok(())
    }

    fn commit(mut self, what: &str) -> Result<(), ModelError> {
        self.pool
            .commit()
            .map_err(ModelError::pool("committing", what))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Txn<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // Best effort: an undo failing means the pool itself is failing, and the commit
        // that would make the half-done state durable is not going to happen here.
        for u in self.undo.drain(..).rev() {
            let r = match &u {
                Undo::Remove(k) => self.pool.remove_volume(k),
                Undo::Rename { from, to } => self.pool.rename_volume(to, from),
                Undo::Meta { key, old } => self.pool.set_meta(key, old.as_deref()),
                Undo::Resize { key, size } => self.pool.resize_volume(key, *size, true),
            };
            if let Err(e) = r {
                tracing::warn!("undoing a failed volume transaction: {e}");
            }
        }
    }
}

/// What every `Volumes` over one pool shares: the model lock (one transaction at a
/// time) and the volumes whose import is copying outside it.
#[derive(Default)]
struct Shared {
    lock: Mutex<()>,
    importing: Mutex<BTreeSet<String>>,
}

/// The volume model over one pool. Cheap to clone; clones share the serialising lock.
#[derive(Clone)]
pub struct Volumes {
    pool: Arc<dyn Pool>,
    shared: Arc<Shared>,
}

/// Marks `qube:vol` as importing until dropped.
struct Importing<'a>(&'a Shared, String);

impl Drop for Importing<'_> {
    fn drop(&mut self) {
        self.0.importing.lock().remove(&self.1);
    }
}

/// A qube being made (see [`Volumes::create_pending`]): removed with its records when
/// dropped, unless kept.
#[must_use = "dropping a PendingQube removes the qube it made"]
pub struct PendingQube<'v> {
    vols: &'v Volumes,
    name: String,
    records: Vec<String>,
    armed: bool,
}

impl PendingQube<'_> {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The qube is complete: it stays.
    pub fn keep(mut self) {
        self.armed = false;
    }

    /// Removes the qube now, saying whether that worked (dropping does the same, and
    /// can only log a failure).
    pub fn undo(mut self) -> Result<(), ModelError> {
        self.armed = false;
        self.vols.undo_pending(&self.name, &self.records)
    }
}

impl Drop for PendingQube<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = self.vols.undo_pending(&self.name, &self.records) {
                tracing::error!(qube = %self.name, "removing the unfinished qube failed: {e}");
            }
        }
    }
}

impl Volumes {
    /// Every `Volumes` over the same pool object shares one lock, so a caller that makes a
    /// new `Volumes` per request still gets one transaction at a time.
    pub fn new(pool: Arc<dyn Pool>) -> Self {
        static LOCKS: Mutex<Vec<(usize, Weak<Shared>)>> = Mutex::new(Vec::new());
        let addr = Arc::as_ptr(&pool) as *const () as usize;
        let mut locks = LOCKS.lock();
        locks.retain(|(_, w)| w.strong_count() > 0);
        let shared = match locks
            .iter()
            .find(|(a, _)| *a == addr)
            .and_then(|(_, w)| w.upgrade())
        {
            Some(l) => l,
            None => {
                let l = Arc::new(Shared::default());
                locks.push((addr, Arc::downgrade(&l)));
                l
            }
        };
        Volumes { pool, shared }
    }

    pub fn pool(&self) -> &Arc<dyn Pool> {
        &self.pool
    }

    fn p(&self) -> &dyn Pool {
        &*self.pool
    }

    fn exists(&self, key: &str) -> Result<bool, ModelError> {
        self.p()
            .exists(key)
            .map_err(ModelError::pool("looking up volume", key))
    }

    fn load(&self, qube: &str) -> Result<QubeVolumes, ModelError> {
        validate_name("qube", qube)?;
        let key = format!("{META_VOLUMES}{qube}");
        let raw = self
            .p()
            .get_meta(&key)
            .map_err(ModelError::pool("reading qube config", qube))?;
        let raw = raw.ok_or_else(|| ModelError::NoSuchQube { qube: qube.into() })?;
        serde_json::from_str(&raw).map_err(|e| ModelError::BadConfig {
            qube: qube.into(),
            reason: e.to_string(),
        })
    }

    fn save(&self, txn: &mut Txn<'_>, q: &QubeVolumes) -> Result<(), ModelError> {
        let json = serde_json::to_string(q).map_err(|e| ModelError::BadConfig {
            qube: q.qube.clone(),
            reason: e.to_string(),
        })?;
        txn.set_meta(&format!("{META_VOLUMES}{}", q.qube), Some(&json))
    }

    fn marked_running(&self, qube: &str) -> Result<bool, ModelError> {
        let key = format!("{META_RUNNING}{qube}");
        Ok(self
            .p()
            .get_meta(&key)
            .map_err(ModelError::pool("reading running marker", qube))?
            .is_some())
    }

    fn volume_of<'q>(q: &'q QubeVolumes, vol: &str) -> Result<&'q VolumeConfig, ModelError> {
        validate_name("volume", vol)?;
        q.volume(vol).ok_or_else(|| ModelError::NoSuchVolume {
            qube: q.qube.clone(),
            volume: vol.into(),
            available: q
                .volumes
                .iter()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Pool key of the committed head a `snap_on_start` volume starts from.
    fn source_head(&self, q: &QubeVolumes, v: &VolumeConfig) -> Result<String, ModelError> {
        let src = v.source.clone().unwrap_or_default();
        let missing = || ModelError::SourceMissing {
            qube: q.qube.clone(),
            volume: v.name.clone(),
            from: src.clone(),
        };
        let (sq, sv) = src.split_once(':').ok_or_else(missing)?;
        let sq_cfg = match self.load(sq) {
            Ok(c) => c,
            Err(ModelError::NoSuchQube { .. }) | Err(ModelError::Name(_)) => return Err(missing()),
            Err(e) => return Err(e),
        };
        match sq_cfg.volume(sv) {
            Some(svc) if svc.save_on_stop => {}
            _ => return Err(missing()),
        }
        let key = head_key(sq, sv);
        if !self.exists(&key)? {
            return Err(missing());
        }
        Ok(key)
    }

    /// Revisions of `Q/V`, oldest first.
    fn revisions(&self, qube: &str, vol: &str) -> Result<Vec<Revision>, ModelError> {
        let prefix = format!("{qube}/{vol}@");
        let mut revs: Vec<(u64, Revision)> = self
            .p()
            .list_volumes()
            .map_err(ModelError::pool("listing volumes", format!("{qube}:{vol}")))?
            .into_iter()
            .filter_map(|info| {
                let id = info.key.strip_prefix(&prefix)?.to_string();
                let micros = parse_revision_id(&id)?;
                Some((
                    micros,
                    Revision {
                        timestamp: micros as f64 / 1e6,
                        id,
                        key: info.key,
                    },
                ))
            })
            .collect();
        revs.sort_by_key(|(m, _)| *m);
        Ok(revs.into_iter().map(|(_, r)| r).collect())
    }

    /// A fresh revision id: now, but always after the newest existing one so ids stay
    /// unique and ordered even if the clock steps back.
    fn new_revision_id(revs: &[Revision]) -> String {
        let newest = revs
            .last()
            .and_then(|r| parse_revision_id(&r.id))
            .map_or(0, |m| m + 1);
        format_revision_id(now_micros().max(newest))
    }

    /// `new_state` (a running snapshot or an import) becomes the head of `Q/V`; the old
    /// head becomes a revision; revisions beyond `revisions_to_keep` are dropped.
    fn commit_volume(
        &self,
        txn: &mut Txn<'_>,
        qube: &str,
        v: &VolumeConfig,
        new_state: &str,
    ) -> Result<(), ModelError> {
        let head = head_key(qube, &v.name);
        let mut revs = self.revisions(qube, &v.name)?;
        if self.exists(&head)? {
            let id = Self::new_revision_id(&revs);
            let key = revision_key(qube, &v.name, &id);
            txn.rename(&head, &key)?;
            revs.push(Revision {
                timestamp: parse_revision_id(&id).unwrap_or(0) as f64 / 1e6,
                id,
                key,
            });
        }
        txn.rename(new_state, &head)?;
        self.prune(txn, &revs, v.revisions_to_keep)
    }

    fn prune(&self, txn: &mut Txn<'_>, revs: &[Revision], keep: u32) -> Result<(), ModelError> {
        let excess = revs.len().saturating_sub(keep as usize);
        for r in &revs[..excess] {
            txn.remove(&r.key)?;
        }
        Ok(())
    }

    fn default_volume(name: &str, size: u64) -> VolumeConfig {
        VolumeConfig {
            name: name.into(),
            size,
            rw: true,
            snap_on_start: false,
            save_on_stop: false,
            source: None,
            revisions_to_keep: 0,
            ephemeral: false,
        }
    }

    fn own(name: &str, size: u64) -> VolumeConfig {
        VolumeConfig {
            save_on_stop: true,
            revisions_to_keep: DEFAULT_REVISIONS_TO_KEEP,
            ..Self::default_volume(name, size)
        }
    }

    fn snap(name: &str, size: u64, source: String) -> VolumeConfig {
        VolumeConfig {
            snap_on_start: true,
            source: Some(source),
            ..Self::default_volume(name, size)
        }
    }

    fn load_template(
        &self,
        qube: &str,
        class: QubeClass,
        template: Option<&str>,
        expected: QubeClass,
    ) -> Result<QubeVolumes, ModelError> {
        let expected_s = match expected {
            QubeClass::TemplateVM => "TemplateVM",
            _ => "disposable template (an AppVM)",
        };
        let t = template.ok_or(ModelError::TemplateRequired {
            qube: qube.into(),
            class,
            expected: expected_s,
        })?;
        let tq = self.load(t)?;
        if tq.class != expected {
            return Err(ModelError::WrongTemplateClass {
                qube: qube.into(),
                class,
                template: t.into(),
                actual: tq.class,
                expected: expected_s,
            });
        }
        Ok(tq)
    }

    fn size_of(q: &QubeVolumes, vol: &str, default: u64) -> u64 {
        q.volume(vol).map_or(default, |v| v.size)
    }

    /// Pool keys under `Q/` when no qube `Q` is configured: what a crash (or a driver that
    /// commits early) left of a create or a remove. Dropped before the name is reused.
    fn drop_orphans(&self, txn: &mut Txn<'_>, qube: &str) -> Result<(), ModelError> {
        for key in self.pool_keys(qube)? {
            txn.remove(&key)?;
        }
        Ok(())
    }

    pub fn create_qube(
        &self,
        name: &str,
        class: QubeClass,
        template: Option<&str>,
    ) -> Result<QubeVolumes, ModelError> {
        self.create_qube_with(name, class, template, &[])
    }

    /// [`Self::create_qube`], writing `records` (pool metadata the caller keeps with the
    /// qube: its preferences, a creation marker) in the same commit: if the creation
    /// fails, none of them is left staged.
    pub fn create_qube_with(
        &self,
        name: &str,
        class: QubeClass,
        template: Option<&str>,
        records: &[(&str, &str)],
    ) -> Result<QubeVolumes, ModelError> {
        validate_name("qube", name)?;
        if let Some(t) = template {
            validate_name("template", t)?;
        }
        let _g = self.shared.lock.lock();
        match self.load(name) {
            Ok(_) => return Err(ModelError::QubeExists { qube: name.into() }),
            Err(ModelError::NoSuchQube { .. }) => {}
            Err(e) => return Err(e),
        }
        let mut txn = Txn::new(self.p());
        self.drop_orphans(&mut txn, name)?;
        let volatile = Self::default_volume("volatile", DEFAULT_VOLATILE_SIZE);
        let (tmpl, volumes) = match class {
            QubeClass::TemplateVM => {
                if let Some(t) = template {
                    return Err(ModelError::TemplateNotAllowed {
                        qube: name.into(),
                        class,
                        template: t.into(),
                    });
                }
                let root = Self::own("root", DEFAULT_ROOT_SIZE);
                let private = Self::own("private", DEFAULT_PRIVATE_SIZE);
                txn.create(&head_key(name, "root"), root.size)?;
                txn.create(&head_key(name, "private"), private.size)?;
                (None, vec![root, private, volatile])
            }
            QubeClass::AppVM => {
                let t = self.load_template(name, class, template, QubeClass::TemplateVM)?;
                let root = Self::snap(
                    "root",
                    Self::size_of(&t, "root", DEFAULT_ROOT_SIZE),
                    format!("{}:root", t.qube),
                );
                let private = Self::own("private", DEFAULT_PRIVATE_SIZE);
                txn.create(&head_key(name, "private"), private.size)?;
                (Some(t.qube), vec![root, private, volatile])
            }
            QubeClass::DispVM => {
                let dvm = self.load_template(name, class, template, QubeClass::AppVM)?;
                let t = dvm.template.clone().ok_or_else(|| ModelError::BadConfig {
                    qube: dvm.qube.clone(),
                    reason: "an AppVM without a template".into(),
                })?;
                let t_root = self
                    .load(&t)
                    .map(|tq| Self::size_of(&tq, "root", DEFAULT_ROOT_SIZE))
                    .unwrap_or(DEFAULT_ROOT_SIZE);
                let root = Self::snap("root", t_root, format!("{t}:root"));
                let private = Self::snap(
                    "private",
                    Self::size_of(&dvm, "private", DEFAULT_PRIVATE_SIZE),
                    format!("{}:private", dvm.qube),
                );
                (Some(dvm.qube), vec![root, private, volatile])
            }
            QubeClass::StandaloneVM => match template {
                None => {
                    let root = Self::own("root", DEFAULT_ROOT_SIZE);
                    let private = Self::own("private", DEFAULT_PRIVATE_SIZE);
                    txn.create(&head_key(name, "root"), root.size)?;
                    txn.create(&head_key(name, "private"), private.size)?;
                    (None, vec![root, private, volatile])
                }
                Some(_) => {
                    let t = self.load_template(name, class, template, QubeClass::TemplateVM)?;
                    let mut vols = Vec::new();
                    for vol in ["root", "private"] {
                        let src = head_key(&t.qube, vol);
                        let own = Self::own(vol, Self::size_of(&t, vol, DEFAULT_PRIVATE_SIZE));
                        if t.volume(vol).is_some_and(|v| v.save_on_stop) && self.exists(&src)? {
                            txn.snapshot(&src, &head_key(name, vol))?;
                        } else {
                            txn.create(&head_key(name, vol), own.size)?;
                        }
                        vols.push(own);
                    }
                    vols.push(volatile);
                    (Some(t.qube), vols)
                }
            },
        };
        let q = QubeVolumes {
            qube: name.into(),
            class,
            template: tmpl,
            volumes,
        };
        self.save(&mut txn, &q)?;
        for (key, value) in records {
            txn.set_meta(key, Some(value))?;
        }
        txn.commit(&format!("creating qube {name}"))?;
        Ok(q)
    }

    /// Makes a qube whose contents come next (a template's root image): it is created
    /// with `records` as by [`Self::create_qube_with`], and the returned
    /// [`PendingQube`] removes it again (volumes, config and records, in one commit)
    /// unless [`PendingQube::keep`] is called once the contents are in. So a failed
    /// import leaves no half-made qube behind, and the caller undoes nothing by hand.
    pub fn create_pending(
        &self,
        name: &str,
        class: QubeClass,
        template: Option<&str>,
        records: &[(&str, &str)],
    ) -> Result<PendingQube<'_>, ModelError> {
        self.create_qube_with(name, class, template, records)?;
        Ok(PendingQube {
            vols: self,
            name: name.to_string(),
            records: records.iter().map(|(k, _)| k.to_string()).collect(),
            armed: true,
        })
    }

    /// Removes a qube made by [`Self::create_pending`] and its records, in one commit.
    fn undo_pending(&self, name: &str, records: &[String]) -> Result<(), ModelError> {
        let _g = self.shared.lock.lock();
        self.remove_unlocked(
            name,
            records.iter().map(String::as_str),
            &format!("removing the unfinished qube {name}"),
        )
    }

    /// Removes every volume of `name`, its record and the caller's `records`, in one
    /// commit. The caller holds the model lock.
    fn remove_unlocked<'a>(
        &self,
        name: &str,
        records: impl IntoIterator<Item = &'a str>,
        what: &str,
    ) -> Result<(), ModelError> {
        let prefix = format!("{name}/");
        let keys: Vec<String> = self
            .p()
            .list_volumes()
            .map_err(ModelError::pool("listing volumes", name))?
            .into_iter()
            .filter(|v| v.key.starts_with(&prefix))
            .map(|v| v.key)
            .collect();
        let mut txn = Txn::new(self.p());
        for k in &keys {
            txn.remove(k)?;
        }
        txn.set_meta(&format!("{META_VOLUMES}{name}"), None)?;
        for key in records {
            txn.set_meta(key, None)?;
        }
        txn.commit(what)
    }

    pub fn clone_qube(&self, src: &str, dst: &str) -> Result<QubeVolumes, ModelError> {
        self.clone_qube_with(src, dst, &[])
    }

    /// [`Self::clone_qube`], writing `records` in the same commit (as
    /// [`Self::create_qube_with`] does).
    pub fn clone_qube_with(
        &self,
        src: &str,
        dst: &str,
        records: &[(&str, &str)],
    ) -> Result<QubeVolumes, ModelError> {
        validate_name("qube", src)?;
        validate_name("qube", dst)?;
        let _g = self.shared.lock.lock();
        let s = self.load(src)?;
        match self.load(dst) {
            Ok(_) => return Err(ModelError::QubeExists { qube: dst.into() }),
            Err(ModelError::NoSuchQube { .. }) => {}
            Err(e) => return Err(e),
        }
        let mut txn = Txn::new(self.p());
        self.drop_orphans(&mut txn, dst)?;
        for v in s.volumes.iter().filter(|v| v.save_on_stop) {
            let from = head_key(src, &v.name);
            if !self.exists(&from)? {
                return Err(ModelError::HeadMissing {
                    qube: src.into(),
                    volume: v.name.clone(),
                    key: from,
                });
            }
            txn.snapshot(&from, &head_key(dst, &v.name))?;
        }
        let q = QubeVolumes {
            qube: dst.into(),
            ..s
        };
        self.save(&mut txn, &q)?;
        for (key, value) in records {
            txn.set_meta(key, Some(value))?;
        }
        txn.commit(&format!("cloning qube {src} to {dst}"))?;
        Ok(q)
    }

    pub fn remove_qube(&self, name: &str) -> Result<(), ModelError> {
        self.remove_qube_with(name, &[])
    }

    /// [`Self::remove_qube`], removing the caller's `records` of the qube in the same
    /// commit; a refused removal leaves them as they were.
    pub fn remove_qube_with(&self, name: &str, records: &[&str]) -> Result<(), ModelError> {
        let _g = self.shared.lock.lock();
        self.load(name)?;
        if self.marked_running(name)? {
            return Err(ModelError::Running {
                qube: name.into(),
                action: "remove it",
            });
        }
        let users: Vec<String> = self
            .list_qubes_unlocked()?
            .into_iter()
            .filter(|q| q.qube != name && q.depends_on(name))
            .map(|q| q.qube)
            .collect();
        if !users.is_empty() {
            return Err(ModelError::InUse {
                qube: name.into(),
                users: users.join(", "),
            });
        }
        self.remove_unlocked(
            name,
            records.iter().copied(),
            &format!("removing qube {name}"),
        )
    }

    pub fn qube(&self, name: &str) -> Result<QubeVolumes, ModelError> {
        let _g = self.shared.lock.lock();
        self.load(name)
    }

    fn list_qubes_unlocked(&self) -> Result<Vec<QubeVolumes>, ModelError> {
        let keys = self
            .p()
            .meta_keys(META_VOLUMES)
            .map_err(ModelError::pool("listing qubes", "pool"))?;
        keys.iter()
            .filter_map(|k| k.strip_prefix(META_VOLUMES))
            .map(|n| self.load(n))
            .collect()
    }

    pub fn list_qubes(&self) -> Result<Vec<QubeVolumes>, ModelError> {
        let _g = self.shared.lock.lock();
        self.list_qubes_unlocked()
    }

    pub fn start(&self, name: &str) -> Result<Vec<StartedVolume>, ModelError> {
        let _g = self.shared.lock.lock();
        let q = self.load(name)?;
        let mut vols: Vec<&VolumeConfig> = q.volumes.iter().collect();
        vols.sort_by_key(|v| volume_rank(&v.name));
        // Resolve sources first: a missing template must not leave anything half-made.
        let mut sources = Vec::new();
        for v in &vols {
            sources.push(if v.snap_on_start {
                Some(self.source_head(&q, v)?)
            } else {
                None
            });
        }
        for v in vols.iter().filter(|v| v.save_on_stop && !v.snap_on_start) {
            let head = head_key(name, &v.name);
            if !self.exists(&run_key(name, &v.name))? && !self.exists(&head)? {
                return Err(ModelError::HeadMissing {
                    qube: name.into(),
                    volume: v.name.clone(),
                    key: head,
                });
            }
        }
        let mut txn = Txn::new(self.p());
        // Leftovers of a run that did not stop cleanly are dropped first (they may be open,
        // and then nothing else has been staged yet).
        // A running snapshot of a volume that is not saved at stop holds nothing anyone
        // keeps: Qubes' lvm_thin leaves `vm-Q-root-snap` behind after a crash, and its
        // next start then failed on it (qubes-issues #3964, #7573).
        for v in vols.iter().filter(|v| !v.save_on_stop) {
            for key in [head_key(name, &v.name), run_key(name, &v.name)] {
                if self.exists(&key)? {
                    txn.remove(&key)?;
                }
            }
        }
        let mut started = Vec::new();
        for (v, source) in vols.iter().zip(&sources) {
            let key = if v.save_on_stop {
                let run = run_key(name, &v.name);
                // An existing running snapshot holds the flushed writes of a run the
                // controller lost track of: resume from it.
                if !self.exists(&run)? {
                    let from = source.clone().unwrap_or_else(|| head_key(name, &v.name));
                    txn.snapshot(&from, &run)?;
                }
                run
            } else {
                let head = head_key(name, &v.name);
                match source {
                    Some(src) => txn.snapshot(src, &head)?,
                    None => txn.create(&head, v.size)?,
                }
                head
            };
            let size = self
                .p()
                .volume(&key)
                .map_err(ModelError::pool("looking up volume", &key))?
                .size;
            started.push(StartedVolume {
                name: v.name.clone(),
                key,
                read_only: !v.rw,
                size,
            });
        }
        let stamp = format_revision_id(now_micros());
        txn.set_meta(&format!("{META_RUNNING}{name}"), Some(&stamp))?;
        txn.commit(&format!("starting qube {name}"))?;
        Ok(started)
    }

    pub fn stop(&self, name: &str) -> Result<(), ModelError> {
        let _g = self.shared.lock.lock();
        let q = self.load(name)?;
        if !self.marked_running(name)? {
            return Err(ModelError::NotRunning { qube: name.into() });
        }
        let mut txn = Txn::new(self.p());
        for v in q.volumes.iter().filter(|v| !v.save_on_stop) {
            let head = head_key(name, &v.name);
            if self.exists(&head)? {
                txn.remove(&head)?;
            }
        }
        for v in q.volumes.iter().filter(|v| v.save_on_stop) {
            let run = run_key(name, &v.name);
            if self.exists(&run)? {
                self.commit_volume(&mut txn, name, v, &run)?;
            }
        }
        txn.set_meta(&format!("{META_RUNNING}{name}"), None)?;
        txn.commit(&format!("stopping qube {name}"))
    }

    pub fn is_running(&self, name: &str) -> Result<bool, ModelError> {
        let _g = self.shared.lock.lock();
        self.load(name)?;
        self.marked_running(name)
    }

    pub fn running_qubes(&self) -> Result<Vec<String>, ModelError> {
        let _g = self.shared.lock.lock();
        let keys = self
            .p()
            .meta_keys(META_RUNNING)
            .map_err(ModelError::pool("listing running qubes", "pool"))?;
        Ok(keys
            .iter()
            .filter_map(|k| k.strip_prefix(META_RUNNING))
            .map(str::to_string)
            .collect())
    }

    pub fn volume_status(&self, qube: &str, vol: &str) -> Result<VolumeStatus, ModelError> {
        let _g = self.shared.lock.lock();
        let q = self.load(qube)?;
        let v = Self::volume_of(&q, vol)?;
        let head = head_key(qube, vol);
        let run = run_key(qube, vol);
        let head_exists = self.exists(&head)?;
        let dirty = v.save_on_stop && self.exists(&run)?;
        let live = if dirty {
            Some(run)
        } else if head_exists {
            Some(head.clone())
        } else {
            None
        };
        let (size, usage) = match live {
            Some(k) => {
                let info = self
                    .p()
                    .volume(&k)
                    .map_err(ModelError::pool("looking up volume", &k))?;
                (info.size, info.mapped)
            }
            None => (v.size, 0),
        };
        Ok(VolumeStatus {
            qube: qube.into(),
            name: vol.into(),
            config: v.clone(),
            head_key: head_exists.then_some(head),
            size,
            usage,
            dirty,
            running: self.marked_running(qube)?,
            revisions: if v.save_on_stop {
                self.revisions(qube, vol)?
            } else {
                Vec::new()
            },
        })
    }

    /// Checks shared by revert and import: a persistent, clean volume of a stopped qube.
    fn check_replaceable<'q>(
        &self,
        q: &'q QubeVolumes,
        vol: &str,
        op: &'static str,
        action: &'static str,
    ) -> Result<&'q VolumeConfig, ModelError> {
        let v = Self::volume_of(q, vol)?;
        if !v.save_on_stop {
            let hint = v
                .source
                .as_ref()
                .map(|s| format!("; {op} {s} instead"))
                .unwrap_or_default();
            return Err(ModelError::NotPersistent {
                qube: q.qube.clone(),
                volume: vol.into(),
                op,
                hint,
            });
        }
        if self.exists(&run_key(&q.qube, vol))? {
            return Err(ModelError::Dirty {
                qube: q.qube.clone(),
                volume: vol.into(),
            });
        }
        if self.marked_running(&q.qube)? {
            return Err(ModelError::Running {
                qube: q.qube.clone(),
                action,
            });
        }
        Ok(v)
    }

    pub fn revert(&self, qube: &str, vol: &str, revision: Option<&str>) -> Result<(), ModelError> {
        let _g = self.shared.lock.lock();
        let q = self.load(qube)?;
        let v = self.check_replaceable(&q, vol, "revert", "revert its volumes")?;
        if let Some(id) = revision {
            validate_name("revision", id)?;
        }
        let revs = self.revisions(qube, vol)?;
        let chosen = match revision {
            None => revs.last().ok_or(ModelError::NoRevisions {
                qube: qube.into(),
                volume: vol.into(),
                keep: v.revisions_to_keep,
            })?,
            Some(id) => {
                revs.iter()
                    .find(|r| r.id == id)
                    .ok_or_else(|| ModelError::NoSuchRevision {
                        qube: qube.into(),
                        volume: vol.into(),
                        revision: id.escape_debug().to_string(),
                        available: if revs.is_empty() {
                            "none".into()
                        } else {
                            revs.iter()
                                .map(|r| r.id.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        },
                    })?
            }
        };
        let head = head_key(qube, vol);
        let mut txn = Txn::new(self.p());
        // The head being replaced becomes the newest revision, so the revert can itself
        // be reverted; nothing is pruned here (pruning would drop that way back).
        if self.exists(&head)? {
            let id = Self::new_revision_id(&revs);
            txn.rename(&head, &revision_key(qube, vol, &id))?;
        }
        txn.rename(&chosen.key, &head)?;
        txn.commit(&format!("reverting {qube}:{vol} to revision {}", chosen.id))
    }

    pub fn discard(&self, qube: &str, vol: &str) -> Result<(), ModelError> {
        let _g = self.shared.lock.lock();
        let q = self.load(qube)?;
        let v = Self::volume_of(&q, vol)?;
        if !v.save_on_stop {
            return Err(ModelError::NotPersistent {
                qube: qube.into(),
                volume: vol.into(),
                op: "discard",
                hint: "; it is dropped at stop anyway".into(),
            });
        }
        let run = run_key(qube, vol);
        if !self.exists(&run)? {
            return Ok(());
        }
        let mut txn = Txn::new(self.p());
        txn.remove(&run)?;
        txn.commit(&format!("discarding uncommitted writes of {qube}:{vol}"))
    }

    pub fn resize(
        &self,
        qube: &str,
        vol: &str,
        size: u64,
        allow_shrink: bool,
    ) -> Result<(), ModelError> {
        let _g = self.shared.lock.lock();
        let mut q = self.load(qube)?;
        let v = Self::volume_of(&q, vol)?.clone();
        if v.snap_on_start {
            return Err(ModelError::FollowsSource {
                qube: qube.into(),
                volume: vol.into(),
                from: v.source.clone().unwrap_or_default(),
            });
        }
        if size < v.size && !allow_shrink {
            return Err(ModelError::Pool {
                op: "resizing",
                target: format!("{qube}:{vol}"),
                source: Box::new(PoolError::ShrinkRefused {
                    volume: format!("{qube}:{vol}"),
                    from: v.size,
                    to: size,
                }),
            });
        }
        let mut txn = Txn::new(self.p());
        // The running snapshot is what the qube sees; the head is resized too so the size
        // holds whichever of them ends up as the head (stop, or discard).
        for key in [head_key(qube, vol), run_key(qube, vol)] {
            if self.exists(&key)? {
                txn.resize(&key, size, allow_shrink)?;
            }
        }
        for c in q.volumes.iter_mut().filter(|c| c.name == vol) {
            c.size = size;
        }
        self.save(&mut txn, &q)?;
        txn.commit(&format!("resizing {qube}:{vol}"))
    }

    /// The model lock is held only to check and to commit, not while the image is
    /// copied: a long import does not hold back the starts, stops and listings of other
    /// qubes. The checks are made again before the commit (the qube may have started or
    /// gone meanwhile), and a second import into the same volume is refused while one
    /// copies.
    pub fn import(
        &self,
        qube: &str,
        vol: &str,
        image: &mut dyn Read,
        size: u64,
    ) -> Result<ImportStats, ModelError> {
        let head = head_key(qube, vol);
        let staging = revision_key(qube, vol, IMPORT);
        let (_importing, opts) = {
            let _g = self.shared.lock.lock();
            let q = self.load(qube)?;
            self.check_replaceable(&q, vol, "import into", "import into its volumes")?;
            let mark = format!("{qube}:{vol}");
            if !self.shared.importing.lock().insert(mark.clone()) {
                return Err(ModelError::Busy {
                    qube: qube.into(),
                    volume: vol.into(),
                });
            }
            let importing = Importing(&self.shared, mark);
            // The image goes into the staging volume outside the transaction (no
            // `Pool::batch`): guests' FLUSHes may commit it part-way, which is harmless
            // for a staging key and keeps their I/O flowing during a long import.
            if self.exists(&staging)? {
                self.p()
                    .remove_volume(&staging)
                    .map_err(ModelError::pool("removing a stale import", &staging))?;
            }
            let opts = ImportOptions {
                dedup: true,
                dedup_against: self.exists(&head)?.then(|| head.clone()),
            };
            (importing, opts)
        };
        let copied = self.p().import_volume(&staging, image, size, &opts);
        let _g = self.shared.lock.lock();
        let drop_staging = || {
            // A driver may have staged part of the volume before the reader failed.
            if self.p().exists(&staging).unwrap_or(false) {
                let _ = self.p().remove_volume(&staging);
            }
        };
        let stats = match copied {
            Ok(s) => s,
            Err(e) => {
                drop_staging();
                return Err(ModelError::pool("importing", format!("{qube}:{vol}"))(e));
            }
        };
        let checked = self.load(qube).and_then(|q| {
            let v = self
                .check_replaceable(&q, vol, "import into", "import into its volumes")?
                .clone();
            Ok((q, v))
        });
        let (mut q, v) = match checked {
            Ok(qv) => qv,
            Err(e) => {
                drop_staging();
                return Err(e);
            }
        };
        let mut txn = Txn::new(self.p());
        txn.undo.push(Undo::Remove(staging.clone()));
        self.commit_volume(&mut txn, qube, &v, &staging)?;
        for c in q.volumes.iter_mut().filter(|c| c.name == vol) {
            c.size = size;
        }
        self.save(&mut txn, &q)?;
        txn.commit(&format!("importing into {qube}:{vol}"))?;
        Ok(stats)
    }

    /// Writes the committed head of a volume saved at stop; returns the bytes written.
    pub fn export(&self, qube: &str, vol: &str, out: &mut dyn Write) -> Result<u64, ModelError> {
        let q = self.load(qube)?;
        let v = Self::volume_of(&q, vol)?;
        if !v.save_on_stop {
            let hint = v
                .source
                .as_ref()
                .map(|s| format!("; export {s} instead"))
                .unwrap_or_default();
            return Err(ModelError::NotPersistent {
                qube: qube.into(),
                volume: vol.into(),
                op: "export",
                hint,
            });
        }
        let head = head_key(qube, vol);
        let dev = self
            .p()
            .open_volume(&head, true)
            .map_err(ModelError::pool("opening volume", &head))?;
        let size = dev.size();
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0u64;
        while pos < size {
            let n = (size - pos).min(buf.len() as u64) as usize;
            dev.read_at(&mut buf[..n], pos)
                .map_err(|e| ModelError::pool("reading volume", &head)(PoolError::Block(e)))?;
            out.write_all(&buf[..n]).map_err(|source| ModelError::Io {
                op: "exporting",
                qube: qube.into(),
                volume: vol.into(),
                source,
            })?;
            pos += n as u64;
        }
        out.flush().map_err(|source| ModelError::Io {
            op: "exporting",
            qube: qube.into(),
            volume: vol.into(),
            source,
        })?;
        Ok(size)
    }

    pub fn set_revisions_to_keep(&self, qube: &str, vol: &str, n: u32) -> Result<(), ModelError> {
        let _g = self.shared.lock.lock();
        let mut q = self.load(qube)?;
        Self::volume_of(&q, vol)?;
        let mut txn = Txn::new(self.p());
        for c in q.volumes.iter_mut().filter(|c| c.name == vol) {
            c.revisions_to_keep = n;
        }
        let revs = self.revisions(qube, vol)?;
        self.prune(&mut txn, &revs, n)?;
        self.save(&mut txn, &q)?;
        txn.commit(&format!("setting revisions_to_keep of {qube}:{vol}"))
    }

    /// Every pool key under a qube (heads, running snapshots, revisions, leftovers).
    pub fn pool_keys(&self, qube: &str) -> Result<BTreeSet<String>, ModelError> {
        validate_name("qube", qube)?;
        let prefix = format!("{qube}/");
        Ok(self
            .p()
            .list_volumes()
            .map_err(ModelError::pool("listing volumes", qube))?
            .into_iter()
            .filter(|v| v.key.starts_with(&prefix))
            .map(|v| v.key)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_ids_round_trip_and_reject_other_suffixes() {
        assert_eq!(
            parse_revision_id("1764160000.123456"),
            Some(1_764_160_000_123_456)
        );
        assert_eq!(
            format_revision_id(1_764_160_000_000_001),
            "1764160000.000001"
        );
        for bad in [
            "run",
            "import",
            "1.2",
            "a.123456",
            ".123456",
            "1764160000.1234567",
        ] {
            assert_eq!(parse_revision_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn new_revision_ids_are_after_the_newest() {
        let far = format_revision_id(now_micros() + 10_000_000_000);
        let revs = vec![Revision {
            id: far.clone(),
            key: String::new(),
            timestamp: 0.0,
        }];
        let id = Volumes::new_revision_id(&revs);
        assert!(parse_revision_id(&id).unwrap() > parse_revision_id(&far).unwrap());
    }

    /// Gives `left` bytes, then fails: a client that goes away mid-import.
    struct Cut {
        left: usize,
    }

    impl Read for Cut {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.left == 0 {
                return Err(std::io::Error::other("the client went away"));
            }
            let n = buf.len().min(self.left);
            buf[..n].fill(0xa5);
            self.left -= n;
            Ok(n)
        }
    }

    /// Every volume key and metadata entry of a pool.
    fn contents(pool: &dyn Pool) -> (Vec<String>, Vec<(String, Option<String>)>) {
        let mut keys: Vec<String> = pool
            .list_volumes()
            .unwrap()
            .into_iter()
            .map(|v| v.key)
            .collect();
        keys.sort();
        let meta = pool
            .meta_keys("")
            .unwrap()
            .into_iter()
            .map(|k| {
                let v = pool.get_meta(&k).unwrap();
                (k, v)
            })
            .collect();
        (keys, meta)
    }

    const RECORDS: [(&str, &str); 2] = [("creating/t", "template"), ("qube-prefs/t", "{}")];

    #[test]
    fn a_pending_qube_whose_import_fails_is_removed_with_its_records() {
        let mem = Arc::new(crate::MemPool::new());
        let pool: Arc<dyn Pool> = mem.clone();
        let vols = Volumes::new(pool.clone());
        vols.create_qube("other", QubeClass::TemplateVM, None)
            .unwrap();
        let before = contents(&*pool);
        {
            let pending = vols
                .create_pending("t", QubeClass::TemplateVM, None, &RECORDS)
                .unwrap();
            assert_eq!(pending.name(), "t");
            // The records are durable with the creation (a caller killed during the
            // import finds its marker at the next open).
            let crashed = mem.crash();
            assert_eq!(
                crashed.get_meta("creating/t").unwrap().as_deref(),
                Some("template")
            );
            assert!(crashed.exists("t/root").unwrap());
            let err = vols
                .import("t", "root", &mut Cut { left: 1 << 20 }, 4 << 20)
                .unwrap_err();
            assert!(err.to_string().contains("went away"), "{err}");
            // Dropped here, as by the caller's early return on that error.
        }
        assert_eq!(
            contents(&*pool),
            before,
            "the unfinished qube was left behind"
        );
        assert_eq!(
            contents(&mem.crash()),
            before,
            "its removal was not committed"
        );
        assert!(matches!(vols.qube("t"), Err(ModelError::NoSuchQube { .. })));
        // The name is free again.
        vols.create_qube("t", QubeClass::TemplateVM, None).unwrap();
    }

    #[test]
    fn records_go_with_their_qube_and_stay_when_its_removal_is_refused() {
        let mem = Arc::new(crate::MemPool::new());
        let pool: Arc<dyn Pool> = mem.clone();
        let vols = Volumes::new(pool.clone());
        vols.create_qube_with("t", QubeClass::TemplateVM, None, &RECORDS)
            .unwrap();
        vols.create_qube("a", QubeClass::AppVM, Some("t")).unwrap();
        let keys = RECORDS.map(|(k, _)| k);
        let err = vols.remove_qube_with("t", &keys).unwrap_err();
        assert!(matches!(err, ModelError::InUse { .. }), "{err}");
        // Another qube's commit makes nothing of the refused removal durable.
        vols.create_qube("b", QubeClass::TemplateVM, None).unwrap();
        let crashed = mem.crash();
        for (k, v) in RECORDS {
            assert_eq!(crashed.get_meta(k).unwrap().as_deref(), Some(v), "{k}");
        }
        vols.remove_qube("a").unwrap();
        vols.remove_qube_with("t", &keys).unwrap();
        let crashed = mem.crash();
        for k in keys {
            assert_eq!(crashed.get_meta(k).unwrap(), None, "{k} outlived its qube");
        }
        assert!(!crashed.exists("t/root").unwrap());
    }

    #[test]
    fn a_kept_pending_qube_stays_and_an_undone_one_goes() {
        let mem = Arc::new(crate::MemPool::new());
        let pool: Arc<dyn Pool> = mem.clone();
        let vols = Volumes::new(pool.clone());
        let before = contents(&*pool);
        let pending = vols
            .create_pending("t", QubeClass::TemplateVM, None, &RECORDS)
            .unwrap();
        pending.undo().unwrap();
        assert_eq!(contents(&mem.crash()), before);

        let pending = vols
            .create_pending("t", QubeClass::TemplateVM, None, &RECORDS)
            .unwrap();
        let image = vec![7u8; 1 << 20];
        vols.import("t", "root", &mut image.as_slice(), 1 << 20)
            .unwrap();
        pending.keep();
        let crashed = mem.crash();
        assert_eq!(
            crashed.get_meta("qube-prefs/t").unwrap().as_deref(),
            Some("{}")
        );
        assert_eq!(crashed.volume("t/root").unwrap().size, 1 << 20);
        assert!(vols.qube("t").is_ok());
    }
}
