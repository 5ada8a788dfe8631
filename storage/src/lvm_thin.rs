//! `lvm_thin`: volumes are thin LVs of an existing LVM thin pool, in Qubes' own layout
//! (`qubes/storage/lvm.py`), so a Qubes pool is usable as it is. LVM is driven in-process
//! through liblvm2cmd (`lvm2-sys`), never by running the `lvm` tool.
//!
//! ```text
//!   DIR/lock           flock()ed by the one process that owns the pool
//!   DIR/lvm.json       VG, thin pool, thresholds, generation, the meta store, volume
//!                      attributes and logical sizes; replaced atomically at commit
//!   DIR/lvm.journal    undo records of the LVM steps of the open transaction (fsynced
//!                      before each step)
//!   VG/vm-Q-V          head of Q/V             VG/vm-Q-V-snap   Q/V@run
//!   VG/vm-Q-V-S-back   Q/V@S.000000 (Qubes)    VG/vm-Q-V-SUUUUUU-back  Q/V@S.UUUUUU
//!   VG/vm-Q-V-import   Q/V@import              VG/qc-<escaped key>     any other key
//!   VG/qctrash-G-N     removed in transaction G, lvremoved after its commit
//! ```
//!
//! Atomicity. Every LVM command commits LVM metadata on its own, so a transaction of the
//! volume model (a start: three lvcreates; a stop: two lvrenames and lvremoves) is not
//! atomic in LVM. The driver makes it so: before each step, the step's undo is appended
//! to the journal and fsynced. A removal changes nothing in LVM: the LV is only hidden
//! until the commit, which writes `lvm.json` with the next generation and the names of
//! the hidden LVs (the commit point), then lvremoves them in one command (discarding
//! them first, as Qubes does) and empties the journal. Only when a hidden LV's name is
//! taken again in the same transaction is it renamed to a `qctrash-` name first (a
//! journaled step). At open, journal records of a generation newer than `lvm.json`'s are
//! undone in reverse order (each undo checks what exists, so a crash before or after the
//! step, or during an earlier recovery, is fine); then what the last commit removed and
//! any committed trash are lvremoved. Each LVM command costs 0.3-1 s under TCG (tens of
//! ms on hardware; qubes-issues #3869): a stop is two renames and one lvremove.
//!
//! Not atomic even so: an undone shrink does not bring back the bytes past the shrink
//! point (thin LVs drop them), and `lvm.json` and LVM metadata are two files: a commit
//! that wrote `lvm.json` but died before emptying the journal is recognised by the
//! generation and only finishes the removals.
//!
//! I/O goes to `/dev/VG/LV` with O_DIRECT (unaligned requests through an aligned bounce
//! buffer); `flush` is fdatasync, which makes dm-thin commit its mappings. dm-thin has no
//! mapping query short of thin_dump on a metadata snapshot, so `block_status` reports
//! all-zero chunks as holes (reading them), and `mapped` is LVM's data_percent.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::pool::{
    validate_volume_key, BlockDevice, BlockError, BlockErrorKind, Extent, ImportOptions,
    ImportStats, Pool, PoolError, PoolInfo, VerifyReport, VolumeInfo,
};

const CATALOG: &str = "lvm.json";
const CATALOG_TMP: &str = "lvm.json.tmp";
const JOURNAL: &str = "lvm.journal";
const TRASH: &str = "qctrash-";
/// O_DIRECT alignment (buffer address, offset, length); covers 512 and 4K sectors.
const ALIGN: u64 = 4096;
/// Bytes `block_status` reads per call at most (NBD lets a reply stop early).
const STATUS_SCAN: u64 = 8 << 20;
pub const DEFAULT_DATA_THRESHOLD_PCT: u32 = 90;
pub const DEFAULT_METADATA_THRESHOLD_PCT: u32 = 80;

// ------------------------------------------------------------------ names

fn lv_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '+')
}

fn qube_ok(q: &str) -> bool {
    !q.is_empty()
        && !q.starts_with('-')
        && !q.ends_with('-')
        && q.chars().all(|c| lv_char(c) || c == '-')
}

fn vol_ok(v: &str) -> bool {
    !v.is_empty()
        && v.chars().all(lv_char)
        && !matches!(v, "snap" | "back" | "import")
        && !v.bytes().all(|b| b.is_ascii_digit())
}

/// `SECS.MICROS` -> LV revision digits (seconds alone when the micros are zero, as Qubes
/// writes them; else 16 digits, which Qubes' `int()` still parses and orders right).
fn rev_digits(id: &str) -> Option<String> {
    let (s, us) = id.split_once('.')?;
    if s.is_empty()
        || s.len() > 10
        || us.len() != 6
        || !s.bytes().chain(us.bytes()).all(|b| b.is_ascii_digit())
        || s.starts_with('0')
    {
        return None;
    }
    Some(if us == "000000" {
        s.to_string()
    } else {
        format!("{s}{us}")
    })
}

fn digits_rev(d: &str) -> Option<String> {
    if d.is_empty() || !d.bytes().all(|b| b.is_ascii_digit()) || d.starts_with('0') {
        return None;
    }
    match d.len() {
        1..=10 => Some(format!("{d}.000000")),
        16 => Some(format!("{}.{}", &d[..10], &d[10..])),
        _ => None,
    }
}

/// The LV name of a pool key (see the module docs).
pub fn lv_name(key: &str) -> Result<String, PoolError> {
    validate_volume_key(key)?;
    if let Some((q, rest)) = key.split_once('/') {
        let (v, suffix) = match rest.split_once('@') {
            Some((v, s)) => (v, Some(s)),
            None => (rest, None),
        };
        if qube_ok(q) && vol_ok(v) {
            let base = format!("vm-{q}-{v}");
            let name = match suffix {
                None => Some(base),
                Some("run") => Some(format!("{base}-snap")),
                Some("import") => Some(format!("{base}-import")),
                Some(id) => rev_digits(id).map(|d| format!("{base}-{d}-back")),
            };
            if let Some(n) = name {
                return check_len(key, n);
            }
        }
    }
    let mut n = String::from("qc-");
    for b in key.bytes() {
        if lv_char(b as char) {
            n.push(b as char);
        } else {
            n.push_str(&format!("-{b:02x}"));
        }
    }
    check_len(key, n)
}

fn check_len(key: &str, n: String) -> Result<String, PoolError> {
    // LVM refuses names longer than 127 bytes; its device-mapper name adds the VG's.
    if n.len() > 100 {
        return Err(PoolError::BadVolumeKey {
            key: key.into(),
            reason: format!("its LVM name {n} is longer than 100 bytes"),
        });
    }
    Ok(n)
}

/// The pool key of an LV name, if the LV is one of ours (round trip checked).
pub fn key_of(name: &str) -> Option<String> {
    let key = if let Some(esc) = name.strip_prefix("qc-") {
        let mut out = Vec::new();
        let b = esc.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'-' {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).ok()?
    } else {
        let rest = name.strip_prefix("vm-")?;
        let (rest, suffix) = if let Some(r) = rest.strip_suffix("-snap") {
            (r, Some("run".to_string()))
        } else if let Some(r) = rest.strip_suffix("-import") {
            (r, Some("import".to_string()))
        } else if let Some(r) = rest.strip_suffix("-back") {
            let (r, d) = r.rsplit_once('-')?;
            (r, Some(digits_rev(d)?))
        } else {
            (rest, None)
        };
        let (q, v) = rest.rsplit_once('-')?;
        match suffix {
            Some(s) => format!("{q}/{v}@{s}"),
            None => format!("{q}/{v}"),
        }
    };
    (lv_name(&key).ok()? == name).then_some(key)
}

// ------------------------------------------------------------------ LVM calls

fn lvm(args: &[&str]) -> Result<lvm2_sys::Output, PoolError> {
    tracing::debug!(cmd = %args.join(" "), "lvm");
    lvm2_sys::run(args).map_err(|e| PoolError::io("lvm", std::io::Error::other(e.to_string())))
}

fn num(v: &Value, field: &str) -> u64 {
    v.get(field)
        .and_then(Value::as_str)
        .and_then(|s| s.trim().parse::<f64>().ok())
        .map_or(0, |f| f as u64)
}

fn pct(v: &Value, field: &str) -> f64 {
    v.get(field)
        .and_then(Value::as_str)
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
}

fn text(v: &Value, field: &str) -> String {
    v.get(field)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

#[derive(Debug, Clone)]
struct Lv {
    name: String,
    size: u64,
    data_pct: f64,
    active: bool,
}

#[derive(Debug, Clone, Default)]
struct PoolStats {
    size: u64,
    data_pct: f64,
    meta_size: u64,
    meta_pct: f64,
    chunk: u64,
    zeroing: bool,
    health: String,
    /// The VG's extent size: LV sizes are whole extents.
    extent: u64,
    /// LVs of the VG whose device-mapper device is suspended (the thin pool for its
    /// hidden layers).
    suspended: Vec<String>,
}

/// One `lvs` of the whole VG: the thin pool's figures and its thin LVs (ours or not).
fn report(vg: &str, pool: &str) -> Result<(PoolStats, Vec<Lv>), PoolError> {
    let args = [
        "lvs",
        "--reportformat",
        "json",
        "--units",
        "b",
        "--nosuffix",
        "-a",
        "-o",
        "lv_name,lv_size,data_percent,metadata_percent,lv_metadata_size,chunk_size,pool_lv,lv_active,segtype,zero,lv_health_status,vg_extent_size,lv_suspended",
        vg,
    ];
    let out = lvm(&args)?;
    let json = out
        .json("lvs")
        .map_err(|e| PoolError::io("reading the lvs report", std::io::Error::other(e)))?;
    let rows = json["report"][0]["lv"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut stats = None;
    let mut lvs = Vec::new();
    let mut suspended = Vec::new();
    for r in rows {
        let name = text(&r, "lv_name");
        if text(&r, "lv_suspended") == "suspended" {
            // Only this pool's devices: the pool, its hidden layers ([pool_tdata],
            // [pool_tmeta]) and its thin LVs; other LVs of the VG are not ours to touch.
            let lv = if name == pool || name.starts_with(&format!("[{pool}_")) {
                Some(pool.to_string())
            } else {
                (text(&r, "pool_lv") == pool).then(|| name.clone())
            };
            if let Some(lv) = lv.filter(|lv| !suspended.contains(lv)) {
                suspended.push(lv);
            }
        }
        if name == pool {
            stats = Some(PoolStats {
                size: num(&r, "lv_size"),
                data_pct: pct(&r, "data_percent"),
                meta_size: num(&r, "lv_metadata_size"),
                meta_pct: pct(&r, "metadata_percent"),
                chunk: num(&r, "chunk_size"),
                zeroing: matches!(text(&r, "zero").as_str(), "zero" | "1"),
                health: text(&r, "lv_health_status"),
                extent: num(&r, "vg_extent_size").max(512),
                suspended: Vec::new(),
            });
        } else if text(&r, "pool_lv") == pool && text(&r, "segtype") == "thin" {
            lvs.push(Lv {
                name,
                size: num(&r, "lv_size"),
                data_pct: pct(&r, "data_percent"),
                active: text(&r, "lv_active") == "active",
            });
        }
    }
    let mut stats = stats.ok_or_else(|| PoolError::NotAPool {
        path: format!("{vg}/{pool}"),
        reason: "LVM reports no such thin pool".into(),
    })?;
    suspended.sort_by_key(|lv| lv != pool);
    stats.suspended = suspended;
    Ok((stats, lvs))
}

// ------------------------------------------------------------------ on-disk state

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Catalog {
    driver: String,
    volume_group: String,
    thin_pool: String,
    data_threshold_pct: u32,
    metadata_threshold_pct: u32,
    generation: u64,
    meta: BTreeMap<String, String>,
    attrs: BTreeMap<String, BTreeMap<String, String>>,
    /// Sizes asked for that LVM rounded up (to its extent size), by key.
    sizes: BTreeMap<String, u64>,
    /// LVs the transaction of `generation` removed: lvremoved right after the commit, and
    /// at open if a crash came first.
    #[serde(default)]
    removed: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Step {
    Created { lv: String },
    Renamed { from: String, to: String },
    Resized { lv: String, size: u64 },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    generation: u64,
    step: Step,
}

fn write_catalog(dir: &Path, cat: &Catalog) -> Result<(), PoolError> {
    let tmp = dir.join(CATALOG_TMP);
    let json = serde_json::to_vec_pretty(cat).expect("catalog serialises");
    let mut f =
        File::create(&tmp).map_err(|e| PoolError::io(format!("creating {}", tmp.display()), e))?;
    f.write_all(&json)
        .and_then(|()| f.sync_all())
        .map_err(|e| PoolError::io(format!("writing {}", tmp.display()), e))?;
    fs::rename(&tmp, dir.join(CATALOG))
        .and_then(|()| File::open(dir)?.sync_all())
        .map_err(|e| PoolError::io(format!("replacing {}", dir.join(CATALOG).display()), e))
}

// ------------------------------------------------------------------ the pool

/// Per-LV state shared by its open handles (found by LV name; our renames move it).
struct Shared {
    size: AtomicU64,
    users: AtomicUsize,
}

struct State {
    cat: Catalog,
    /// LV name -> LV, of the thin pool: one report, then kept up to date by our own
    /// creates, renames, resizes and removals (each LVM command costs 0.25-0.7 s under
    /// TCG and tens of ms on hardware; qubes-issues #3869). `None` after a failed command,
    /// whose effect is unknown: the next lookup reports again.
    lvs: Option<BTreeMap<String, Lv>>,
    stats: PoolStats,
    journal: File,
    trash_seq: u64,
    /// LVs removed by the open transaction, by name (still so named in LVM): left out of
    /// every report until the commit removes them or a crash brings them back.
    hidden: BTreeMap<String, Lv>,
    shared: HashMap<String, Arc<Shared>>,
}

struct Inner {
    dir: PathBuf,
    vg: String,
    pool: String,
    state: Mutex<State>,
    /// Data was written or discarded since the last report: usage figures are stale.
    io_stale: AtomicBool,
    _lock: File,
}

pub struct LvmThinPool {
    inner: Arc<Inner>,
}

#[derive(Debug, Clone)]
pub struct LvmThinOptions {
    pub volume_group: String,
    pub thin_pool: String,
    pub data_threshold_pct: u32,
    pub metadata_threshold_pct: u32,
}

impl LvmThinOptions {
    pub fn new(volume_group: &str, thin_pool: &str) -> Self {
        LvmThinOptions {
            volume_group: volume_group.into(),
            thin_pool: thin_pool.into(),
            data_threshold_pct: DEFAULT_DATA_THRESHOLD_PCT,
            metadata_threshold_pct: DEFAULT_METADATA_THRESHOLD_PCT,
        }
    }
}

fn lv_arg(vg: &str, lv: &str) -> String {
    format!("{vg}/{lv}")
}

impl LvmThinPool {
    /// A pool over the existing thin pool `VG/POOL`. Qubes' volumes found there
    /// (`vm-Q-V`, revisions, `-snap`) are registered as qubes (own volumes, saved at stop),
    /// so `volume list` shows them.
    pub fn create(dir: &Path, opts: &LvmThinOptions) -> Result<LvmThinPool, PoolError> {
        for (what, v) in [
            ("volume group", &opts.volume_group),
            ("thin pool", &opts.thin_pool),
        ] {
            if v.is_empty() || !v.chars().all(|c| lv_char(c) || c == '-') || v.starts_with('-') {
                return Err(PoolError::Invalid(format!(
                    "{what} name {v:?}: use LVM's characters (A-Z a-z 0-9 + _ . -)"
                )));
            }
        }
        if dir.join(CATALOG).exists() {
            return Err(PoolError::Invalid(format!(
                "an lvm_thin pool already exists at {}",
                dir.display()
            )));
        }
        let (stats, lvs) = report(&opts.volume_group, &opts.thin_pool)?;
        let mut cat = Catalog {
            driver: "lvm_thin".into(),
            volume_group: opts.volume_group.clone(),
            thin_pool: opts.thin_pool.clone(),
            data_threshold_pct: opts.data_threshold_pct,
            metadata_threshold_pct: opts.metadata_threshold_pct,
            generation: 1,
            meta: BTreeMap::new(),
            attrs: BTreeMap::new(),
            sizes: BTreeMap::new(),
            removed: Vec::new(),
        };
        adopt_qubes(&mut cat, &lvs);
        if stats.chunk == 0 {
            return Err(PoolError::NotAPool {
                path: format!("{}/{}", opts.volume_group, opts.thin_pool),
                reason: "LVM reports no chunk size: is it a thin pool?".into(),
            });
        }
        fs::create_dir_all(dir)
            .map_err(|e| PoolError::io(format!("creating {}", dir.display()), e))?;
        let _lock = crate::dirlock::lock_pool_dir(dir)?;
        write_catalog(dir, &cat)?;
        drop(_lock);
        Self::open(dir)
    }

    pub fn open(dir: &Path) -> Result<LvmThinPool, PoolError> {
        let lock = crate::dirlock::lock_pool_dir(dir)?;
        let path = dir.join(CATALOG);
        let bytes = fs::read(&path).map_err(|e| PoolError::NotAPool {
            path: dir.display().to_string(),
            reason: format!("reading {}: {e}", path.display()),
        })?;
        let cat: Catalog = serde_json::from_slice(&bytes)
            .map_err(|e| PoolError::Corrupt(format!("{} cannot be opened: {e}", path.display())))?;
        let (vg, pool) = (cat.volume_group.clone(), cat.thin_pool.clone());
        recover(dir, &cat)?;
        let journal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(JOURNAL))
            .map_err(|e| PoolError::io("opening the journal", e))?;
        let (stats, _) = report(&vg, &pool)?;
        let inner = Inner {
            dir: dir.to_path_buf(),
            vg,
            pool,
            state: Mutex::new(State {
                cat,
                lvs: None,
                stats,
                journal,
                trash_seq: 0,
                hidden: BTreeMap::new(),
                shared: HashMap::new(),
            }),
            io_stale: AtomicBool::new(true),
            _lock: lock,
        };
        Ok(LvmThinPool {
            inner: Arc::new(inner),
        })
    }

    /// The VG and thin pool a pool directory points at.
    pub fn target(dir: &Path) -> Option<(String, String)> {
        let cat: Catalog = serde_json::from_slice(&fs::read(dir.join(CATALOG)).ok()?).ok()?;
        Some((cat.volume_group, cat.thin_pool))
    }
}

/// Registers the qubes found in a Qubes-made pool: each `vm-Q-V` head (and `-snap`) as an
/// own volume saved at stop, keeping at least as many revisions as it has.
fn adopt_qubes(cat: &mut Catalog, lvs: &[Lv]) {
    use crate::qubes::{QubeClass, QubeVolumes, VolumeConfig, DEFAULT_REVISIONS_TO_KEEP};
    let mut found: BTreeMap<String, BTreeMap<String, (u64, u32)>> = BTreeMap::new();
    for lv in lvs {
        let Some(key) = key_of(&lv.name) else {
            continue;
        };
        if !lv.name.starts_with("vm-") {
            continue;
        }
        let (q, rest) = key.split_once('/').expect("vm- keys have a qube");
        let (v, suffix) = rest
            .split_once('@')
            .map_or((rest, None), |(v, s)| (v, Some(s)));
        if crate::names::validate_name("qube", q).is_err() {
            continue;
        }
        let e = found
            .entry(q.into())
            .or_default()
            .entry(v.into())
            .or_insert((0, 0));
        match suffix {
            None | Some("run") => e.0 = e.0.max(lv.size),
            Some("import") => {}
            Some(_) => {
                e.1 += 1;
                e.0 = e.0.max(lv.size);
            }
        }
    }
    for (q, vols) in found {
        let class = if vols.contains_key("root") {
            QubeClass::TemplateVM
        } else {
            QubeClass::StandaloneVM
        };
        let volumes = vols
            .into_iter()
            .map(|(name, (size, revs))| {
                let volatile = name == "volatile";
                VolumeConfig {
                    name,
                    size,
                    rw: true,
                    snap_on_start: false,
                    save_on_stop: !volatile,
                    source: None,
                    revisions_to_keep: revs.max(DEFAULT_REVISIONS_TO_KEEP),
                    ephemeral: volatile,
                }
            })
            .collect();
        let qv = QubeVolumes {
            qube: q.clone(),
            class,
            template: None,
            volumes,
        };
        cat.meta.insert(
            format!("qube-volumes/{q}"),
            serde_json::to_string(&qv).expect("serialises"),
        );
    }
}

/// Undoes the LVM steps of a transaction that never committed, finishes the removals of
/// committed ones, and empties the journal.
/// The device-mapper name of `vg/lv` (each `-` inside a name doubled).
fn dm_name(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

/// Refuses to open a pool whose devices a killed LVM command left suspended (a worker
/// SIGKILLed between its suspend and its resume): the first I/O to them, ours or a
/// guest's, would wait forever, so the user gets the devices and the fix instead of a
/// hang. LVM holds the VG's lock for each command, so a device still suspended when
/// the report was read belongs to no running command. Resuming them here would need
/// device-mapper's own resume: `lvchange --refresh` suspends a thin LV with a flush
/// first, which waits on the suspended pool.
fn refuse_suspended(vg: &str, pool: &str, suspended: &[String]) -> Result<(), PoolError> {
    if suspended.is_empty() {
        return Ok(());
    }
    let mut devices: Vec<String> = Vec::new();
    for lv in suspended {
        if lv == pool {
            devices.push(format!("{}-tpool", dm_name(vg, pool)));
        }
        devices.push(dm_name(vg, lv));
    }
    Err(PoolError::Suspended {
        pool: format!("{vg}/{pool}"),
        devices,
    })
}

fn recover(dir: &Path, cat: &Catalog) -> Result<(), PoolError> {
    let jpath = dir.join(JOURNAL);
    let text = fs::read_to_string(&jpath).unwrap_or_default();
    let (vg, pool) = (&cat.volume_group, &cat.thin_pool);
    let mut undo: Vec<Step> = Vec::new();
    for line in text.lines() {
        // A torn last line is a step that was never taken (the record is written first).
        let Ok(r) = serde_json::from_str::<Record>(line) else {
            continue;
        };
        if r.generation > cat.generation {
            undo.push(r.step);
        }
    }
    let (stats, mut lvs) = report(vg, pool)?;
    refuse_suspended(vg, pool, &stats.suspended)?;
    if !undo.is_empty() {
        tracing::warn!(
            steps = undo.len(),
            "lvm_thin: undoing the LVM steps of a transaction cut off by a crash"
        );
    }
    for step in undo.iter().rev() {
        let has = |lvs: &[Lv], n: &str| lvs.iter().any(|l| l.name == n);
        match step {
            Step::Created { lv } => {
                if has(&lvs, lv) {
                    lvm(&["lvremove", "--force", "--", &lv_arg(vg, lv)])?;
                }
            }
            Step::Renamed { from, to } => {
                if has(&lvs, to) && !has(&lvs, from) {
                    lvm(&["lvrename", "--", vg, to, from])?;
                }
            }
            Step::Resized { lv, size } => {
                if lvs.iter().any(|l| &l.name == lv && l.size != *size) {
                    let s = format!("--size={size}b");
                    lvm(&["lvresize", "--force", &s, "--", &lv_arg(vg, lv)])?;
                }
            }
        }
        lvs = report(vg, pool)?.1;
    }
    let trash: Vec<String> = lvs
        .iter()
        .filter(|l| l.name.starts_with(TRASH) || cat.removed.contains(&l.name))
        .map(|l| l.name.clone())
        .collect();
    remove_lvs(vg, &trash)?;
    File::create(&jpath)
        .and_then(|f| f.sync_all())
        .map_err(|e| PoolError::io("emptying the journal", e))
}

/// Discards (Qubes does, so the space goes back to an SSD under the pool), then removes
/// the LVs in one lvremove.
fn remove_lvs(vg: &str, names: &[String]) -> Result<(), PoolError> {
    if names.is_empty() {
        return Ok(());
    }
    for n in names {
        if let Ok(f) = OpenOptions::new().write(true).open(dev_path(vg, n)) {
            let size = f.metadata().map(|m| m.len()).unwrap_or(0);
            let len = blk_size(&f).unwrap_or(size);
            let _ = sys::discard(&f, 0, len);
        }
    }
    let args: Vec<String> = names.iter().map(|n| lv_arg(vg, n)).collect();
    let mut cmd = vec!["lvremove", "--force", "--"];
    cmd.extend(args.iter().map(String::as_str));
    lvm(&cmd).map(drop)
}

fn dev_path(vg: &str, lv: &str) -> PathBuf {
    let p = PathBuf::from(format!("/dev/{vg}/{lv}"));
    if p.exists() {
        return p;
    }
    PathBuf::from(format!(
        "/dev/mapper/{}-{}",
        vg.replace('-', "--"),
        lv.replace('-', "--")
    ))
}

fn blk_size(f: &File) -> std::io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, a live local.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), sys::BLKGETSIZE64, &mut size as *mut u64) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

mod sys {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    pub const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    const BLKDISCARD: libc::c_ulong = 0x1277;

    /// Unmaps `[offset, offset+len)` of a block device (dm-thin frees whole chunks).
    pub fn discard(f: &File, offset: u64, len: u64) -> io::Result<()> {
        let range = [offset, len];
        // SAFETY: BLKDISCARD reads two u64 (start, length) from the pointer, a live local.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKDISCARD, range.as_ptr()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Inner {
    /// The pool's figures from the cached report (see [`Inner::lvs`]).
    fn figures(&self, st: &State) -> PoolInfo {
        let volumes =
            st.lvs
                .as_ref()
                .map_or(0, |m| m.keys().filter(|n| key_of(n).is_some()).count()) as u64;
        let s = &st.stats;
        let mut warnings = Vec::new();
        if !s.zeroing {
            warnings.push(format!("thin pool {}/{} does not zero new blocks: a partial first write into a block can show what a removed volume left there; `lvchange --zero y {}/{}` fixes it", self.vg, self.pool, self.vg, self.pool));
        }
        if !s.health.is_empty() {
            warnings.push(format!(
                "thin pool {}/{} health: {}",
                self.vg, self.pool, s.health
            ));
        }
        PoolInfo {
            driver: "lvm_thin".into(),
            path: format!("{}/{}", self.vg, self.pool),
            chunk_size: s.chunk.max(512),
            capacity: s.size,
            data_used: (s.size as f64 * s.data_pct / 100.0) as u64,
            metadata_used: (s.meta_size as f64 * s.meta_pct / 100.0) as u64,
            metadata_capacity: Some(s.meta_size),
            volumes,
            generation: st.cat.generation,
            host_free: None,
            warnings,
        }
    }

    fn lvs<'a>(&self, st: &'a mut State) -> Result<&'a BTreeMap<String, Lv>, PoolError> {
        if st.lvs.is_none() || self.io_stale.swap(false, Ordering::AcqRel) {
            let (stats, lvs) = report(&self.vg, &self.pool)?;
            st.stats = stats;
            let mut all: BTreeMap<String, Lv> =
                lvs.into_iter().map(|l| (l.name.clone(), l)).collect();
            for name in st.hidden.keys() {
                all.remove(name);
            }
            st.lvs = Some(all);
        }
        Ok(st.lvs.as_ref().expect("loaded above"))
    }

    /// The LV of a key, from the cached report (no refresh for usage figures).
    fn find(&self, st: &mut State, key: &str) -> Result<Option<Lv>, PoolError> {
        let name = lv_name(key)?;
        if st.lvs.is_none() {
            self.lvs(st)?;
        }
        Ok(st.lvs.as_ref().and_then(|m| m.get(&name)).cloned())
    }

    fn need(&self, st: &mut State, key: &str) -> Result<Lv, PoolError> {
        self.find(st, key)?
            .ok_or_else(|| PoolError::NoSuchVolume(key.into()))
    }

    fn need_absent(&self, st: &mut State, key: &str) -> Result<String, PoolError> {
        if self.find(st, key)?.is_some() {
            return Err(PoolError::VolumeExists(key.into()));
        }
        let name = lv_name(key)?;
        if st.hidden.contains_key(&name) {
            // Removed earlier in this transaction and named again: out of the way first.
            st.trash_seq += 1;
            let trash = format!("{TRASH}{}-{}", st.cat.generation + 1, st.trash_seq);
            self.rename_lv(st, &name, &trash)?;
            let mut lv = st.hidden.remove(&name).expect("checked above");
            lv.name = trash.clone();
            st.hidden.insert(trash, lv);
        }
        Ok(name)
    }

    /// Appends the undo of the step about to be taken, durably, before it is taken.
    fn journal(&self, st: &mut State, step: Step) -> Result<(), PoolError> {
        let rec = Record {
            generation: st.cat.generation + 1,
            step,
        };
        let mut line = serde_json::to_vec(&rec).expect("serialises");
        line.push(b'\n');
        st.journal
            .write_all(&line)
            .and_then(|()| st.journal.sync_data())
            .map_err(|e| PoolError::io("writing the lvm_thin journal", e))
    }

    /// Refuses new volumes while the thin pool's data or metadata is fuller than the
    /// thresholds: a dm-thin pool that fills stops every writer, and a full metadata
    /// area needs thin_repair (qubes-issues #3243, #6451).
    fn check_space(&self, st: &mut State) -> Result<(), PoolError> {
        self.lvs(st)?;
        let s = &st.stats;
        let (vg, pool) = (&self.vg, &self.pool);
        let checks = [
            (
                "data",
                s.data_pct,
                st.cat.data_threshold_pct,
                format!("remove qubes or revisions (`qubes-ctl qube remove`, fewer revisions_to_keep), or grow the pool: `lvextend -L +10G {vg}/{pool}`"),
            ),
            (
                "metadata",
                s.meta_pct,
                st.cat.metadata_threshold_pct,
                format!("grow its metadata: `lvextend --poolmetadatasize +256M {vg}/{pool}` (the VG needs that much free), or remove revisions and qubes"),
            ),
        ];
        for (space, used, threshold, fix) in checks {
            if used >= f64::from(threshold) {
                return Err(PoolError::SpaceLow {
                    pool: format!("{vg}/{pool}"),
                    space,
                    used: format!("{used:.1}%"),
                    threshold_pct: threshold,
                    fix,
                });
            }
        }
        Ok(())
    }

    fn rename_lv(&self, st: &mut State, from: &str, to: &str) -> Result<(), PoolError> {
        self.journal(
            st,
            Step::Renamed {
                from: from.into(),
                to: to.into(),
            },
        )?;
        let r = lvm(&["lvrename", "--", &self.vg, from, to]);
        if let Some(m) = st.lvs.as_mut() {
            if r.is_ok() {
                if let Some(mut lv) = m.remove(from) {
                    lv.name = to.into();
                    m.insert(to.into(), lv);
                }
            }
        }
        if r.is_ok() {
            if let Some(sh) = st.shared.remove(from) {
                st.shared.insert(to.into(), sh);
            }
        } else {
            st.lvs = None;
        }
        r.map(drop)
    }

    fn logical_size(st: &State, key: &str, lv: &Lv) -> u64 {
        st.cat.sizes.get(key).copied().unwrap_or(lv.size)
    }

    fn set_logical_size(st: &mut State, key: &str, size: u64, lv_size: u64) {
        if size == lv_size {
            st.cat.sizes.remove(key);
        } else {
            st.cat.sizes.insert(key.into(), size);
        }
    }

    fn activate(&self, st: &mut State, lv: &Lv) -> Result<(), PoolError> {
        if !lv.active {
            let r = lvm(&[
                "lvchange",
                "--activate=y",
                "--ignoreactivationskip",
                "--",
                &lv_arg(&self.vg, &lv.name),
            ]);
            match (&r, st.lvs.as_mut().and_then(|m| m.get_mut(&lv.name))) {
                (Ok(_), Some(cached)) => cached.active = true,
                _ => st.lvs = None,
            }
            r?;
        }
        Ok(())
    }

    fn create_lv(&self, st: &mut State, key: &str, size: u64) -> Result<(), PoolError> {
        let name = self.need_absent(st, key)?;
        if size == 0 {
            return Err(PoolError::Invalid(format!("volume {key}: size 0")));
        }
        self.check_space(st)?;
        self.journal(st, Step::Created { lv: name.clone() })?;
        let vsize = format!("--virtualsize={}b", size.div_ceil(512) * 512);
        let name_arg = format!("--name={name}");
        let pool = lv_arg(&self.vg, &self.pool);
        let r = lvm(&[
            "lvcreate",
            "--thin",
            "--setactivationskip=n",
            "--activate=y",
            &name_arg,
            &vsize,
            "--",
            &pool,
        ]);
        if let Err(e) = r {
            st.lvs = None;
            return Err(e);
        }
        // LVM rounds a thin LV up to whole extents.
        let extent = st.stats.extent.max(512);
        let lv = Lv {
            name: name.clone(),
            size: size.div_ceil(extent) * extent,
            data_pct: 0.0,
            active: true,
        };
        let lv_size = lv.size;
        if let Some(m) = st.lvs.as_mut() {
            m.insert(name, lv);
        }
        st.cat.attrs.remove(key);
        Self::set_logical_size(st, key, size, lv_size);
        Ok(())
    }
}

impl Pool for LvmThinPool {
    fn driver(&self) -> &'static str {
        "lvm_thin"
    }

    fn info(&self) -> Result<PoolInfo, PoolError> {
        let inner = &self.inner;
        let mut st = inner.state.lock();
        inner.io_stale.store(true, Ordering::Release);
        inner.lvs(&mut st)?;
        Ok(inner.figures(&st))
    }

    /// The figures of the last report, if no operation holds the pool: a daemon's ping
    /// must not wait on an `lvs` (seconds under a loaded nested VM) or on a start's LVM
    /// commands.
    fn info_cached(&self) -> Option<PoolInfo> {
        let st = self.inner.state.try_lock()?;
        st.lvs.is_some().then(|| self.inner.figures(&st))
    }

    fn list_volumes(&self) -> Result<Vec<VolumeInfo>, PoolError> {
        let mut st = self.inner.state.lock();
        let lvs: Vec<Lv> = self.inner.lvs(&mut st)?.values().cloned().collect();
        Ok(lvs
            .iter()
            .filter_map(|lv| {
                let key = key_of(&lv.name)?;
                Some(volume_info(&st, key, lv))
            })
            .collect())
    }

    fn volume(&self, key: &str) -> Result<VolumeInfo, PoolError> {
        let mut st = self.inner.state.lock();
        let name = lv_name(key)?;
        let lv = self
            .inner
            .lvs(&mut st)?
            .get(&name)
            .cloned()
            .ok_or_else(|| PoolError::NoSuchVolume(key.into()))?;
        Ok(volume_info(&st, key.into(), &lv))
    }

    fn exists(&self, key: &str) -> Result<bool, PoolError> {
        let mut st = self.inner.state.lock();
        Ok(self.inner.find(&mut st, key)?.is_some())
    }

    fn create_volume(&self, key: &str, size: u64) -> Result<(), PoolError> {
        let mut st = self.inner.state.lock();
        self.inner.create_lv(&mut st, key, size)
    }

    fn snapshot(&self, source: &str, target: &str) -> Result<(), PoolError> {
        let inner = &self.inner;
        let mut st = inner.state.lock();
        let src = inner.need(&mut st, source)?;
        let name = inner.need_absent(&mut st, target)?;
        inner.check_space(&mut st)?;
        inner.journal(&mut st, Step::Created { lv: name.clone() })?;
        let name_arg = format!("--name={name}");
        let r = lvm(&[
            "lvcreate",
            "--snapshot",
            "--setactivationskip=n",
            "--activate=y",
            &name_arg,
            "--",
            &lv_arg(&inner.vg, &src.name),
        ]);
        if let Err(e) = r {
            st.lvs = None;
            return Err(e);
        }
        // A thin snapshot has its origin's size and, until written, its blocks.
        if let Some(m) = st.lvs.as_mut() {
            m.insert(
                name.clone(),
                Lv {
                    name,
                    active: true,
                    ..src.clone()
                },
            );
        }
        let size = Inner::logical_size(&st, source, &src);
        st.cat.attrs.remove(target);
        Inner::set_logical_size(&mut st, target, size, src.size);
        Ok(())
    }

    fn remove_volume(&self, key: &str) -> Result<(), PoolError> {
        let inner = &self.inner;
        let mut st = inner.state.lock();
        let lv = inner.need(&mut st, key)?;
        if let Some(sh) = st.shared.get(&lv.name) {
            let users = sh.users.load(Ordering::Acquire);
            if users > 0 {
                return Err(PoolError::Busy {
                    volume: key.into(),
                    users,
                });
            }
        }
        if let Some(m) = st.lvs.as_mut() {
            m.remove(&lv.name);
        }
        st.shared.remove(&lv.name);
        st.hidden.insert(lv.name.clone(), lv);
        st.cat.attrs.remove(key);
        st.cat.sizes.remove(key);
        Ok(())
    }

    fn rename_volume(&self, from: &str, to: &str) -> Result<(), PoolError> {
        let inner = &self.inner;
        let mut st = inner.state.lock();
        let lv = inner.need(&mut st, from)?;
        let to_name = inner.need_absent(&mut st, to)?;
        inner.rename_lv(&mut st, &lv.name, &to_name)?;
        if let Some(a) = st.cat.attrs.remove(from) {
            st.cat.attrs.insert(to.into(), a);
        }
        if let Some(s) = st.cat.sizes.remove(from) {
            st.cat.sizes.insert(to.into(), s);
        }
        Ok(())
    }

    fn resize_volume(&self, key: &str, size: u64, allow_shrink: bool) -> Result<(), PoolError> {
        let inner = &self.inner;
        let mut st = inner.state.lock();
        let lv = inner.need(&mut st, key)?;
        let old = Inner::logical_size(&st, key, &lv);
        if size < old && !allow_shrink {
            return Err(PoolError::ShrinkRefused {
                volume: key.into(),
                from: old,
                to: size,
            });
        }
        if size == 0 {
            return Err(PoolError::Invalid(format!("volume {key}: size 0")));
        }
        let extent = st.stats.extent.max(512);
        let want = size.div_ceil(extent) * extent;
        if want != lv.size {
            inner.journal(
                &mut st,
                Step::Resized {
                    lv: lv.name.clone(),
                    size: lv.size,
                },
            )?;
            let s = format!("--size={want}b");
            let r = lvm(&[
                "lvresize",
                "--force",
                &s,
                "--",
                &lv_arg(&inner.vg, &lv.name),
            ]);
            match (&r, st.lvs.as_mut().and_then(|m| m.get_mut(&lv.name))) {
                (Ok(_), Some(cached)) => cached.size = want,
                _ => st.lvs = None,
            }
            r?;
        }
        let lv = inner.need(&mut st, key)?;
        // What lay past the new end must read as zeros if the volume grows again; LVM
        // rounds the LV up to whole extents, so the tail inside the LV is zeroed here.
        if size < old && size < lv.size {
            // Read too: unaligned edges are read-modify-written.
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(dev_path(&inner.vg, &lv.name))
                .map_err(|e| PoolError::io(format!("opening {}", lv.name), e))?;
            let end = old.min(lv.size);
            zero_range(&f, size, end, st.stats.chunk.max(ALIGN))
                .map_err(|e| PoolError::io(format!("zeroing the tail of {key}"), e))?;
        }
        Inner::set_logical_size(&mut st, key, size, lv.size);
        if let Some(sh) = st.shared.get(&lv.name) {
            sh.size.store(size, Ordering::Release);
        }
        Ok(())
    }

    fn set_volume_attr(&self, key: &str, attr: &str, value: Option<&str>) -> Result<(), PoolError> {
        let mut st = self.inner.state.lock();
        self.inner.need(&mut st, key)?;
        let a = st.cat.attrs.entry(key.into()).or_default();
        match value {
            Some(v) => a.insert(attr.into(), v.into()),
            None => a.remove(attr),
        };
        if a.is_empty() {
            st.cat.attrs.remove(key);
        }
        Ok(())
    }

    fn open_volume(&self, key: &str, read_only: bool) -> Result<Arc<dyn BlockDevice>, PoolError> {
        let inner = &self.inner;
        let mut st = inner.state.lock();
        let lv = inner.need(&mut st, key)?;
        inner.activate(&mut st, &lv)?;
        let path = dev_path(&inner.vg, &lv.name);
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .map_err(|e| PoolError::io(format!("opening {}", path.display()), e))?;
        let size = Inner::logical_size(&st, key, &lv);
        let shared = st
            .shared
            .entry(lv.name.clone())
            .or_insert_with(|| {
                Arc::new(Shared {
                    size: AtomicU64::new(size),
                    users: AtomicUsize::new(0),
                })
            })
            .clone();
        shared.size.store(size, Ordering::Release);
        shared.users.fetch_add(1, Ordering::AcqRel);
        Ok(Arc::new(LvVolume {
            inner: inner.clone(),
            shared,
            file,
            name: key.into(),
            read_only,
            chunk: st.stats.chunk.max(ALIGN),
            rmw: Mutex::new(()),
        }))
    }

    fn kernel_block_device(&self, key: &str) -> Result<Option<PathBuf>, PoolError> {
        let inner = &self.inner;
        let mut st = inner.state.lock();
        let lv = inner.need(&mut st, key)?;
        inner.activate(&mut st, &lv)?;
        Ok(Some(dev_path(&inner.vg, &lv.name)))
    }

    fn get_meta(&self, key: &str) -> Result<Option<String>, PoolError> {
        Ok(self.inner.state.lock().cat.meta.get(key).cloned())
    }

    fn set_meta(&self, key: &str, value: Option<&str>) -> Result<(), PoolError> {
        crate::pool::bookkeeping::set_meta(&mut self.inner.state.lock().cat.meta, key, value);
        Ok(())
    }

    fn meta_keys(&self, prefix: &str) -> Result<Vec<String>, PoolError> {
        Ok(crate::pool::bookkeeping::meta_keys(
            &self.inner.state.lock().cat.meta,
            prefix,
        ))
    }

    fn commit(&self) -> Result<(), PoolError> {
        let inner = &self.inner;
        let mut st = inner.state.lock();
        if st.lvs.is_none() {
            inner.lvs(&mut st)?;
        }
        // Hidden LVs, and trash a failed removal left (whose names stay hidden).
        let mut removed: Vec<String> = st.hidden.keys().cloned().collect();
        removed.extend(
            st.lvs
                .as_ref()
                .expect("loaded above")
                .keys()
                .filter(|n| n.starts_with(TRASH))
                .cloned(),
        );
        let mut next = st.cat.clone();
        next.generation += 1;
        next.removed = removed.clone();
        // The commit point: from here on the transaction's steps are kept.
        write_catalog(&inner.dir, &next)?;
        st.cat.generation = next.generation;
        st.trash_seq = 0;
        let r = remove_lvs(&inner.vg, &removed);
        if r.is_ok() {
            st.hidden.clear();
            if let Some(m) = st.lvs.as_mut() {
                for n in &removed {
                    m.remove(n);
                }
            }
        } else {
            // What is left stays hidden and goes at the next commit (or open); what is
            // gone must not be named to lvremove again.
            for n in &removed {
                if let Some(lv) = st.lvs.as_mut().and_then(|m| m.remove(n)) {
                    st.hidden.insert(n.clone(), lv);
                }
            }
            if let Ok((_, now)) = report(&inner.vg, &inner.pool) {
                st.hidden.retain(|n, _| now.iter().any(|l| &l.name == n));
            }
            st.lvs = None;
        }
        for n in &removed {
            st.shared.remove(n);
        }
        if let Err(e) = r {
            // Committed all the same; the next open removes what is left.
            tracing::warn!("lvm_thin: removing committed trash: {e}");
        }
        st.journal
            .set_len(0)
            .and_then(|()| st.journal.sync_data())
            .map_err(|e| PoolError::io("emptying the lvm_thin journal", e))
    }

    fn verify(&self) -> Result<VerifyReport, PoolError> {
        let inner = &self.inner;
        let mut st = inner.state.lock();
        inner.io_stale.store(true, Ordering::Release);
        let names: Vec<String> = inner.lvs(&mut st)?.keys().cloned().collect();
        let mut report = VerifyReport::default();
        // Removals of the open transaction are staged, not leaked.
        let staged_trash = format!("{TRASH}{}-", st.cat.generation + 1);
        for n in &names {
            if key_of(n).is_some() {
                report.volumes += 1;
            } else if n.starts_with(&staged_trash) {
            } else if n.starts_with(TRASH) {
                report.leaks.push(format!(
                    "LV {n}: removed, not yet lvremoved (the next commit or open does it)"
                ));
            } else {
                report.warnings.push(format!(
                    "thin LV {n} is not named as this driver names volumes; left alone"
                ));
            }
        }
        if !st.stats.health.is_empty() {
            report.errors.push(format!(
                "thin pool {}/{}: {}",
                inner.vg, inner.pool, st.stats.health
            ));
        }
        for key in st.cat.attrs.keys().chain(st.cat.sizes.keys()) {
            if !names.contains(&lv_name(key)?) {
                report
                    .errors
                    .push(format!("attributes or size of {key}, which has no LV"));
            }
        }
        Ok(report)
    }

    fn import_volume(
        &self,
        key: &str,
        image: &mut dyn Read,
        size: u64,
        opts: &ImportOptions,
    ) -> Result<ImportStats, PoolError> {
        // Against an older version: a snapshot of it, where only differing chunks are
        // written (the others stay shared). dm-thin cannot share equal chunks inside one
        // image, so `dedup` alone changes nothing.
        let against = opts
            .dedup_against
            .as_deref()
            .filter(|_| opts.dedup)
            .filter(|k| self.exists(k).unwrap_or(false));
        match against {
            Some(a) => {
                self.snapshot(a, key)?;
                if self.volume(key)?.size != size {
                    self.resize_volume(key, size, true).inspect_err(|_| {
                        let _ = self.remove_volume(key);
                    })?;
                }
            }
            None => self.create_volume(key, size)?,
        }
        let dev = self.open_volume(key, false)?;
        let chunk = self.inner.state.lock().stats.chunk.max(ALIGN) as usize;
        let r = import_into(&*dev, image, size, chunk, against.is_some());
        drop(dev);
        if r.is_err() {
            let _ = self.remove_volume(key);
        }
        r
    }

    fn fingerprint(&self, key: &str) -> Result<String, PoolError> {
        let dev = self.open_volume(key, true)?;
        let size = dev.size();
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0;
        while pos < size {
            let n = (size - pos).min(buf.len() as u64) as usize;
            dev.read_at(&mut buf[..n], pos)?;
            hasher.update(&buf[..n]);
            pos += n as u64;
        }
        Ok(hasher.finalize().to_hex().to_string())
    }
}

fn volume_info(st: &State, key: String, lv: &Lv) -> VolumeInfo {
    let size = Inner::logical_size(st, &key, lv);
    VolumeInfo {
        mapped: ((lv.size as f64 * lv.data_pct / 100.0) as u64).min(size),
        size,
        attrs: st.cat.attrs.get(&key).cloned().unwrap_or_default(),
        key,
    }
}

fn import_into(
    dev: &dyn BlockDevice,
    image: &mut dyn Read,
    size: u64,
    chunk: usize,
    over_old: bool,
) -> Result<ImportStats, PoolError> {
    let mut stats = ImportStats::default();
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; chunk];
    let mut old = vec![0u8; chunk];
    let mut pos = 0u64;
    let mut eof = false;
    while pos < size {
        let n = (size - pos).min(chunk as u64) as usize;
        let mut got = 0;
        while !eof && got < n {
            match image.read(&mut buf[got..n]) {
                Ok(0) => eof = true,
                Ok(k) => got += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(PoolError::io("reading the image", e)),
            }
        }
        buf[got..n].fill(0);
        hasher.update(&buf[..n]);
        stats.bytes += got as u64;
        let zero = buf[..n].iter().all(|&b| b == 0);
        if over_old {
            dev.read_at(&mut old[..n], pos)?;
            if old[..n] == buf[..n] {
                stats.dedup_chunks += 1;
            } else if zero && n == chunk {
                dev.discard(pos, n as u64)?;
                stats.zero_chunks += 1;
            } else {
                dev.write_at(&buf[..n], pos)?;
                stats.written_chunks += 1;
            }
        } else if zero {
            stats.zero_chunks += 1;
        } else {
            dev.write_at(&buf[..n], pos)?;
            stats.written_chunks += 1;
        }
        pos += n as u64;
    }
    dev.flush()?;
    stats.fingerprint = hasher.finalize().to_hex().to_string();
    Ok(stats)
}

/// Zeroes `[from, to)`: whole chunks discarded, the edges written.
fn zero_range(f: &File, from: u64, to: u64, chunk: u64) -> std::io::Result<()> {
    let a = from.div_ceil(chunk) * chunk;
    let b = to / chunk * chunk;
    let write_zeros = |s: u64, e: u64| -> std::io::Result<()> {
        let mut pos = s;
        while pos < e {
            let n = (e - pos).min(1 << 20);
            rmw_write(f, &vec![0u8; n as usize], pos)?;
            pos += n;
        }
        Ok(())
    };
    if a < b {
        write_zeros(from, a)?;
        sys::discard(f, a, b - a)?;
        write_zeros(b, to)
    } else {
        write_zeros(from, to)
    }
}

fn aligned(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + ALIGN as usize];
    let off = v.as_ptr().align_offset(ALIGN as usize);
    (v, off)
}

fn is_aligned(ptr: *const u8, offset: u64, len: usize) -> bool {
    (ptr as usize as u64 | offset | len as u64) & (ALIGN - 1) == 0
}

fn direct_read(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    if is_aligned(buf.as_ptr(), offset, buf.len()) {
        return f.read_exact_at(buf, offset);
    }
    let a0 = offset / ALIGN * ALIGN;
    let a1 = (offset + buf.len() as u64).div_ceil(ALIGN) * ALIGN;
    let (mut v, o) = aligned((a1 - a0) as usize);
    let b = &mut v[o..o + (a1 - a0) as usize];
    f.read_exact_at(b, a0)?;
    let s = (offset - a0) as usize;
    buf.copy_from_slice(&b[s..s + buf.len()]);
    Ok(())
}

/// A write through an aligned bounce buffer (read-modify-write of the edge blocks).
fn rmw_write(f: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
    if is_aligned(data.as_ptr(), offset, data.len()) {
        return f.write_all_at(data, offset);
    }
    let a0 = offset / ALIGN * ALIGN;
    let a1 = (offset + data.len() as u64).div_ceil(ALIGN) * ALIGN;
    let (mut v, o) = aligned((a1 - a0) as usize);
    let b = &mut v[o..o + (a1 - a0) as usize];
    let s = (offset - a0) as usize;
    if s != 0 || (data.len() as u64) & (ALIGN - 1) != 0 {
        f.read_exact_at(b, a0)?;
    }
    b[s..s + data.len()].copy_from_slice(data);
    f.write_all_at(b, a0)
}

// ------------------------------------------------------------------ open volumes

struct LvVolume {
    inner: Arc<Inner>,
    shared: Arc<Shared>,
    file: File,
    name: String,
    read_only: bool,
    chunk: u64,
    /// Serialises unaligned writes, whose read-modify-write of edge blocks would
    /// otherwise lose a neighbour's bytes.
    rmw: Mutex<()>,
}

impl Drop for LvVolume {
    fn drop(&mut self) {
        self.shared.users.fetch_sub(1, Ordering::AcqRel);
    }
}

impl LvVolume {
    fn err(
        &self,
        kind: BlockErrorKind,
        op: &'static str,
        offset: u64,
        length: u64,
        detail: impl Into<String>,
    ) -> BlockError {
        BlockError::new(kind, op, &self.name, offset, length, detail)
    }

    fn io_err(&self, op: &'static str, offset: u64, length: u64, e: std::io::Error) -> BlockError {
        let kind = if e.raw_os_error() == Some(libc::ENOSPC) {
            BlockErrorKind::NoSpace
        } else {
            BlockErrorKind::Io
        };
        self.err(kind, op, offset, length, e.to_string())
    }

    fn check(
        &self,
        op: &'static str,
        offset: u64,
        length: u64,
        write: bool,
    ) -> Result<(), BlockError> {
        BlockError::check_writable(&self.name, self.read_only, op, offset, length, write)?;
        BlockError::check_range(&self.name, self.size(), op, offset, length)
    }

    fn write_zero_bytes(&self, from: u64, to: u64) -> Result<(), BlockError> {
        let mut pos = from;
        while pos < to {
            let n = (to - pos).min(1 << 20);
            self.write_at(&vec![0u8; n as usize], pos)?;
            pos += n;
        }
        Ok(())
    }

    fn discard_chunks(&self, offset: u64, length: u64) -> Result<(u64, u64), BlockError> {
        let a = offset.div_ceil(self.chunk) * self.chunk;
        let b = (offset + length) / self.chunk * self.chunk;
        if a < b {
            sys::discard(&self.file, a, b - a).map_err(|e| self.io_err("discard", a, b - a, e))?;
            self.inner.io_stale.store(true, Ordering::Release);
        }
        Ok((a, b))
    }
}

impl BlockDevice for LvVolume {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.shared.size.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        self.check("read", offset, buf.len() as u64, false)?;
        direct_read(&self.file, buf, offset)
            .map_err(|e| self.io_err("read", offset, buf.len() as u64, e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        self.check("write", offset, buf.len() as u64, true)?;
        let r = if is_aligned(buf.as_ptr(), offset, buf.len()) {
            self.file.write_all_at(buf, offset)
        } else {
            let _g = self.rmw.lock();
            rmw_write(&self.file, buf, offset)
        };
        self.inner.io_stale.store(true, Ordering::Release);
        r.map_err(|e| self.io_err("write", offset, buf.len() as u64, e))
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.file
            .sync_data()
            .map_err(|e| self.io_err("flush", 0, 0, e))
    }

    fn discard(&self, offset: u64, length: u64) -> Result<(), BlockError> {
        self.check("discard", offset, length, true)?;
        self.discard_chunks(offset, length).map(drop)
    }

    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.check("write_zeroes", offset, length, true)?;
        let end = offset + length;
        if may_unmap {
            let (a, b) = self.discard_chunks(offset, length)?;
            if a < b {
                self.write_zero_bytes(offset, a)?;
                return self.write_zero_bytes(b, end);
            }
        }
        self.write_zero_bytes(offset, end)
    }

    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>, BlockError> {
        self.check("block_status", offset, length, false)?;
        if length == 0 {
            return Err(self.err(
                BlockErrorKind::OutOfRange,
                "block_status",
                offset,
                0,
                "empty range",
            ));
        }
        let end = (offset + length).min(offset + STATUS_SCAN);
        let mut out: Vec<Extent> = Vec::new();
        let mut buf = vec![0u8; self.chunk as usize];
        let mut pos = offset;
        while pos < end {
            let next = ((pos / self.chunk + 1) * self.chunk).min(end);
            let n = (next - pos) as usize;
            self.read_at(&mut buf[..n], pos)?;
            let zero = buf[..n].iter().all(|&b| b == 0);
            match out.last_mut() {
                Some(e) if e.hole == zero => e.length += n as u64,
                _ => out.push(Extent {
                    offset: pos,
                    length: n as u64,
                    hole: zero,
                    zero,
                }),
            }
            pos = next;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspended_devices_are_refused_naming_each_dm_device_pool_first() {
        assert!(refuse_suspended("qubes_dom0", "pool00", &[]).is_ok());
        let e = refuse_suspended(
            "qubes_dom0",
            "pool00",
            &["pool00".into(), "vm-work-private-snap".into()],
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(
                "qubes_dom0-pool00-tpool, qubes_dom0-pool00, qubes_dom0-vm--work--private--snap"
            ) && text.contains("dmsetup resume"),
            "{text}"
        );
    }

    #[test]
    fn qubes_names_round_trip() {
        for (key, name) in [
            ("work/private", "vm-work-private"),
            ("sys-net/private", "vm-sys-net-private"),
            ("work/private@run", "vm-work-private-snap"),
            (
                "work/private@1700000000.000000",
                "vm-work-private-1700000000-back",
            ),
            (
                "work/private@1764160000.123456",
                "vm-work-private-1764160000123456-back",
            ),
            ("work/root@import", "vm-work-root-import"),
            ("a", "qc-a"),
            ("head@1764160000.000001", "qc-head-401764160000.000001"),
            ("q/snap", "qc-q-2fsnap"),
            ("x/a-b", "qc-x-2fa-2db"),
        ] {
            assert_eq!(lv_name(key).unwrap(), name, "{key}");
            assert_eq!(key_of(name).as_deref(), Some(key), "{name}");
        }
        // Not ours: other LVs of the VG, and names whose key would map elsewhere.
        for other in [
            "root",
            "swap",
            "pool00",
            "vm-x",
            "qc-a-zz",
            "vm-work-private-0123-back",
            "qctrash-3-1",
        ] {
            assert_eq!(key_of(other), None, "{other}");
        }
        assert!(lv_name(&format!("q/{}", "v".repeat(120))).is_err());
    }
}
