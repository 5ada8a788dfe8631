//! `reflink`: a pool of sparse files on a filesystem with shared extents (XFS with
//! `reflink=1`, btrfs), as Qubes' `file-reflink` driver. A snapshot is `FICLONE`: the
//! filesystem shares every extent and copies on write, so it is O(extents), not O(bytes).
//!
//! ```text
//!   DIR/lock            flock()ed by the one process that owns the pool
//!   DIR/pool.json       catalogue: key -> {id, file, size, attrs}, the meta store,
//!                       generation; replaced atomically (tmp, fsync, rename, fsync DIR)
//!   DIR/vols/<file>.img one sparse file per volume; names are numbers, so a volume key
//!                       never becomes a path and a rename is a catalogue change only
//! ```
//!
//! Contract (the [`Pool`] trait):
//! * Catalogue changes (create, snapshot, remove, rename, resize, attrs, meta) are staged
//!   in memory and made durable by [`Pool::commit`]: files first (fsync each touched file,
//!   then the directory), the catalogue last. Files of removed volumes are unlinked only
//!   after the catalogue that forgets them is durable; files no committed catalogue knows
//!   (a crash after a snapshot, before its commit) are removed at open.
//! * Data is written in place into the volume's own file (the filesystem copies shared
//!   extents), so a committed head changes only if someone writes to it; the volume model
//!   writes to snapshots only. `flush` is `fdatasync` of the file.
//! * Shrinking clones into a new file first, so the committed file keeps its bytes until
//!   the commit; growing extends in place and open() trims a file back to the committed
//!   size after a crash.
//! * Creating a pool on a filesystem without reflink support is refused (Qubes' driver
//!   would silently copy whole images instead).
//! * `block_status` is `SEEK_DATA`/`SEEK_HOLE`; the chunk size is the filesystem block size.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::pool::{
    validate_volume_key, BlockDevice, BlockError, BlockErrorKind, Extent, ImportOptions,
    ImportStats, Pool, PoolError, PoolInfo, VerifyReport, VolumeInfo,
};

const CATALOG: &str = "pool.json";
const CATALOG_TMP: &str = "pool.json.tmp";
const VOLS: &str = "vols";
const FORMAT_VERSION: u32 = 1;
/// Import granularity: zero runs of this size become holes, equal ones are cloned.
const IMPORT_CHUNK: u64 = 64 * 1024;

/// The small set of system calls std does not wrap; every `unsafe` of the driver is here.
mod sys {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    /// `dst` shares all of `src`'s extents (and takes its length).
    pub fn ficlone(dst: &File, src: &File) -> io::Result<()> {
        // SAFETY: FICLONE takes the source descriptor as its integer argument; both
        // descriptors are open for the duration of the call (borrowed `File`s).
        let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `dst[dst_off..+len]` shares `src[src_off..+len]`; offsets and length block-aligned.
    pub fn ficlonerange(
        dst: &File,
        src: &File,
        src_off: u64,
        len: u64,
        dst_off: u64,
    ) -> io::Result<()> {
        let arg = libc::file_clone_range {
            src_fd: i64::from(src.as_raw_fd()),
            src_offset: src_off,
            src_length: len,
            dest_offset: dst_off,
        };
        // SAFETY: FICLONERANGE reads one `file_clone_range` through the pointer, which
        // points to a live, initialised local; the descriptors are open (borrowed).
        let r = unsafe {
            libc::ioctl(
                dst.as_raw_fd(),
                libc::FICLONERANGE,
                &arg as *const libc::file_clone_range,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `lseek(SEEK_DATA | SEEK_HOLE)`; `None` for ENXIO (no data at or after `pos`).
    pub fn seek(file: &File, pos: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let pos =
            libc::off_t::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: lseek on an open descriptor has no memory-safety preconditions; it moves
        // the shared file offset, which this driver never uses (all I/O is positional).
        let r = unsafe { libc::lseek(file.as_raw_fd(), pos, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(r as u64))
    }

    /// Deallocates `[off, off+len)`; it reads as zeros afterwards, the size is unchanged.
    pub fn punch_hole(file: &File, off: u64, len: u64) -> io::Result<()> {
        let off =
            libc::off_t::try_from(off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let len =
            libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: fallocate on an open descriptor with in-range integer arguments has no
        // memory-safety preconditions.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// (filesystem block size, total bytes, used bytes).
    pub fn statvfs(file: &File) -> io::Result<(u64, u64, u64)> {
        // SAFETY: an all-zero `statvfs` is a valid value of this plain C struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: the pointer is to a live local of the right type, written by the kernel.
        let r = unsafe { libc::fstatvfs(file.as_raw_fd(), &mut st) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let frsize = st.f_frsize as u64;
        Ok((
            st.f_bsize as u64,
            st.f_blocks as u64 * frsize,
            (st.f_blocks - st.f_bfree) as u64 * frsize,
        ))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    /// Stable identity: open handles follow it across renames.
    id: u64,
    /// Number of the file holding the data (changes when a shrink clones to a new file).
    file: u64,
    size: u64,
    #[serde(default)]
    attrs: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Catalog {
    version: u32,
    generation: u64,
    next_id: u64,
    volumes: BTreeMap<String, Entry>,
    #[serde(default)]
    meta: BTreeMap<String, String>,
}

impl Catalog {
    fn entry(&self, key: &str) -> Result<&Entry, PoolError> {
        self.volumes
            .get(key)
            .ok_or_else(|| PoolError::NoSuchVolume(key.to_string()))
    }
}

struct State {
    staged: Catalog,
    /// Files the last durable catalogue references (never unlinked before a commit).
    committed_files: HashSet<u64>,
    /// Volume id -> key, for handles.
    ids: HashMap<u64, String>,
    /// Open files by file number.
    files: HashMap<u64, Arc<File>>,
    /// Open handles per volume id.
    open: HashMap<u64, usize>,
    /// Files written, created or resized since the last commit.
    touched: HashSet<u64>,
    /// Files to unlink once the next catalogue is durable.
    doomed: HashSet<u64>,
}

struct Inner {
    dir: PathBuf,
    vols: PathBuf,
    block_size: u64,
    state: Mutex<State>,
    _lock: File,
}

impl Inner {
    fn file_path(&self, file: u64) -> PathBuf {
        self.vols.join(format!("{file:016x}.img"))
    }

    fn open_file(&self, st: &mut State, file: u64) -> Result<Arc<File>, PoolError> {
        if let Some(f) = st.files.get(&file) {
            return Ok(f.clone());
        }
        let path = self.file_path(file);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| PoolError::io(format!("opening {}", path.display()), e))?;
        let f = Arc::new(f);
        st.files.insert(file, f.clone());
        Ok(f)
    }

    /// A new, empty file (the number is fresh: volume ids and file numbers share a counter).
    fn new_file(&self, st: &mut State) -> Result<(u64, Arc<File>), PoolError> {
        let file = st.staged.next_id;
        st.staged.next_id += 1;
        let path = self.file_path(file);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| PoolError::io(format!("creating {}", path.display()), e))?;
        let f = Arc::new(f);
        st.files.insert(file, f.clone());
        st.touched.insert(file);
        Ok((file, f))
    }

    fn discard_file(&self, st: &mut State, file: u64) {
        st.files.remove(&file);
        st.touched.remove(&file);
        if st.committed_files.contains(&file) {
            st.doomed.insert(file);
        } else {
            let _ = fs::remove_file(self.file_path(file));
        }
    }

    fn insert(&self, st: &mut State, key: &str, file: u64, size: u64) -> u64 {
        let id = st.staged.next_id;
        st.staged.next_id += 1;
        st.staged.volumes.insert(
            key.to_string(),
            Entry {
                id,
                file,
                size,
                attrs: BTreeMap::new(),
            },
        );
        st.ids.insert(id, key.to_string());
        id
    }
}

fn fsync_dir(path: &Path) -> Result<(), PoolError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| PoolError::io(format!("syncing directory {}", path.display()), e))
}

fn write_catalog(dir: &Path, cat: &Catalog) -> Result<(), PoolError> {
    let tmp = dir.join(CATALOG_TMP);
    let json = serde_json::to_vec_pretty(cat).map_err(|e| PoolError::Corrupt(e.to_string()))?;
    let mut f =
        File::create(&tmp).map_err(|e| PoolError::io(format!("creating {}", tmp.display()), e))?;
    f.write_all(&json)
        .and_then(|()| f.sync_all())
        .map_err(|e| PoolError::io(format!("writing {}", tmp.display()), e))?;
    fs::rename(&tmp, dir.join(CATALOG))
        .map_err(|e| PoolError::io(format!("replacing {}", dir.join(CATALOG).display()), e))?;
    fsync_dir(dir)
}

/// The reflink pool. All methods are callable from several threads.
pub struct ReflinkPool {
    inner: Arc<Inner>,
}

impl ReflinkPool {
    /// Creates a pool in `dir` (created if missing, must not hold a pool already). Refused
    /// unless the filesystem can clone extents.
    pub fn create(dir: &Path) -> Result<Self, PoolError> {
        fs::create_dir_all(dir)
            .map_err(|e| PoolError::io(format!("creating {}", dir.display()), e))?;
        if dir.join(CATALOG).exists() {
            return Err(PoolError::Invalid(format!(
                "{} already holds a pool; open it, or remove it first",
                dir.display()
            )));
        }
        check_reflink(dir)?;
        let vols = dir.join(VOLS);
        fs::create_dir_all(&vols)
            .map_err(|e| PoolError::io(format!("creating {}", vols.display()), e))?;
        fsync_dir(dir)?;
        let cat = Catalog {
            version: FORMAT_VERSION,
            generation: 0,
            next_id: 1,
            volumes: BTreeMap::new(),
            meta: BTreeMap::new(),
        };
        write_catalog(dir, &cat)?;
        Self::open(dir)
    }

    /// Opens the pool in `dir` at its last commit; takes the pool's lock.
    pub fn open(dir: &Path) -> Result<Self, PoolError> {
        let not_a_pool = |reason: String| PoolError::NotAPool {
            path: dir.display().to_string(),
            reason,
        };
        let raw = match fs::read(dir.join(CATALOG)) {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(not_a_pool(format!("no {CATALOG}")))
            }
            Err(e) => {
                return Err(PoolError::io(
                    format!("reading {}", dir.join(CATALOG).display()),
                    e,
                ))
            }
        };
        let cat: Catalog = serde_json::from_slice(&raw)
            .map_err(|e| PoolError::Corrupt(format!("{CATALOG}: {e}")))?;
        if cat.version != FORMAT_VERSION {
            return Err(PoolError::Corrupt(format!(
                "{CATALOG}: format version {} (this build reads {FORMAT_VERSION})",
                cat.version
            )));
        }
        let lock = crate::dirlock::lock_pool_dir(dir)?;

        let vols = dir.join(VOLS);
        let block_size = sys::statvfs(&lock)
            .map_err(|e| PoolError::io("statvfs", e))?
            .0
            .max(512);
        let committed_files: HashSet<u64> = cat.volumes.values().map(|e| e.file).collect();
        // Files of a transaction that never committed, and growth that was never committed.
        for ent in fs::read_dir(&vols)
            .map_err(|e| PoolError::io(format!("listing {}", vols.display()), e))?
        {
            let ent = ent.map_err(|e| PoolError::io(format!("listing {}", vols.display()), e))?;
            let name = ent.file_name();
            let num = name
                .to_str()
                .and_then(|n| n.strip_suffix(".img"))
                .and_then(|n| u64::from_str_radix(n, 16).ok());
            if !num.is_some_and(|n| committed_files.contains(&n)) {
                fs::remove_file(ent.path())
                    .map_err(|e| PoolError::io(format!("removing {}", ent.path().display()), e))?;
            }
        }
        for e in cat.volumes.values() {
            let path = vols.join(format!("{:016x}.img", e.file));
            let f = OpenOptions::new().write(true).open(&path).map_err(|err| {
                PoolError::Corrupt(format!("volume file {} is missing: {err}", path.display()))
            })?;
            let len = f
                .metadata()
                .map_err(|err| PoolError::io(format!("stat {}", path.display()), err))?
                .len();
            if len != e.size {
                f.set_len(e.size)
                    .and_then(|()| f.sync_all())
                    .map_err(|err| PoolError::io(format!("trimming {}", path.display()), err))?;
            }
        }
        fsync_dir(&vols)?;
        let ids = cat.volumes.iter().map(|(k, e)| (e.id, k.clone())).collect();
        Ok(ReflinkPool {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                vols,
                block_size,
                state: Mutex::new(State {
                    staged: cat,
                    committed_files,
                    ids,
                    files: HashMap::new(),
                    open: HashMap::new(),
                    touched: HashSet::new(),
                    doomed: HashSet::new(),
                }),
                _lock: lock,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.dir
    }
}

/// Clones a small file inside `dir`; refuses the directory if that fails.
fn check_reflink(dir: &Path) -> Result<(), PoolError> {
    let a_path = dir.join(".reflink-check-src");
    let b_path = dir.join(".reflink-check-dst");
    let result = (|| -> std::io::Result<()> {
        // The source must be readable for FICLONE.
        let mut a = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&a_path)?;
        a.write_all(b"reflink check")?;
        a.sync_all()?;
        let b = File::create(&b_path)?;
        sys::ficlone(&b, &a)
    })();
    let _ = fs::remove_file(&a_path);
    let _ = fs::remove_file(&b_path);
    result.map_err(|e| {
        PoolError::Invalid(format!(
            "the filesystem holding {} cannot clone files (FICLONE: {e}); put the reflink pool on XFS \
             made with `mkfs.xfs -m reflink=1` or on btrfs, or use the thin driver (`qubes-ctl pool init --driver thin`)",
            dir.display()
        ))
    })
}

fn map_io(
    op: &'static str,
    volume: &str,
    offset: u64,
    length: u64,
    e: std::io::Error,
) -> BlockError {
    let kind = match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => BlockErrorKind::NoSpace,
        _ => BlockErrorKind::Io,
    };
    BlockError::new(kind, op, volume, offset, length, e.to_string())
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl ReflinkPool {
    fn info_of(&self, st: &mut State, key: &str) -> Result<VolumeInfo, PoolError> {
        let e = st.staged.entry(key)?.clone();
        let f = self.inner.open_file(st, e.file)?;
        let blocks = f
            .metadata()
            .map_err(|err| PoolError::io(format!("stat of volume {key}"), err))?
            .blocks();
        Ok(VolumeInfo {
            key: key.to_string(),
            size: e.size,
            mapped: (blocks * 512).min(e.size),
            attrs: e.attrs,
        })
    }

    fn do_import(
        &self,
        file: &File,
        image: &mut dyn Read,
        size: u64,
        against: Option<(Arc<File>, u64)>,
        dedup: bool,
    ) -> Result<ImportStats, PoolError> {
        let io = |op: &str, e| PoolError::io(op.to_string(), e);
        file.set_len(size).map_err(|e| io("sizing the import", e))?;
        let mut stats = ImportStats::default();
        let mut hasher = blake3::Hasher::new();
        let mut seen: HashMap<[u8; 32], u64> = HashMap::new();
        let cs = IMPORT_CHUNK;
        let mut buf = vec![0u8; cs as usize];
        let mut other = vec![0u8; cs as usize];
        let mut eof = false;
        let mut off = 0u64;
        while off < size {
            let len = (size - off).min(cs) as usize;
            buf[..len].fill(0);
            if !eof {
                let n =
                    read_full(image, &mut buf[..len]).map_err(|e| io("reading the image", e))?;
                stats.bytes += n as u64;
                eof = n < len;
            }
            let chunk = &buf[..len];
            hasher.update(chunk);
            if chunk.iter().all(|&b| b == 0) {
                stats.zero_chunks += 1;
                off += len as u64;
                continue;
            }
            let full = len as u64 == cs;
            let mut shared = false;
            if dedup && full {
                if let Some((src, src_size)) = &against {
                    if off + cs <= *src_size
                        && src.read_exact_at(&mut other, off).is_ok()
                        && other[..] == *chunk
                    {
                        shared = sys::ficlonerange(file, src, off, cs, off).is_ok();
                    }
                }
                let h = *blake3::hash(chunk).as_bytes();
                if !shared {
                    if let Some(&at) = seen.get(&h) {
                        shared = file.read_exact_at(&mut other, at).is_ok()
                            && other[..] == *chunk
                            && sys::ficlonerange(file, file, at, cs, off).is_ok();
                    }
                }
                seen.entry(h).or_insert(off);
            }
            if shared {
                stats.dedup_chunks += 1;
            } else {
                file.write_all_at(chunk, off)
                    .map_err(|e| io("writing the import", e))?;
                stats.written_chunks += 1;
            }
            off += len as u64;
        }
        stats.fingerprint = hasher.finalize().to_hex().to_string();
        Ok(stats)
    }
}

impl Pool for ReflinkPool {
    fn driver(&self) -> &'static str {
        "reflink"
    }

    fn info(&self) -> Result<PoolInfo, PoolError> {
        let st = self.inner.state.lock();
        let (_, capacity, used) =
            sys::statvfs(&self.inner._lock).map_err(|e| PoolError::io("statvfs", e))?;
        let meta = fs::metadata(self.inner.dir.join(CATALOG))
            .map(|m| m.len())
            .unwrap_or(0);
        Ok(PoolInfo {
            driver: "reflink".into(),
            path: self.inner.dir.display().to_string(),
            chunk_size: self.inner.block_size,
            capacity,
            data_used: used,
            metadata_used: meta,
            metadata_capacity: None,
            volumes: st.staged.volumes.len() as u64,
            generation: st.staged.generation,
            host_free: rustix::fs::fstatvfs(&self.inner._lock)
                .ok()
                .map(|v| v.f_bavail.saturating_mul(v.f_frsize)),
            warnings: Vec::new(),
        })
    }

    fn list_volumes(&self) -> Result<Vec<VolumeInfo>, PoolError> {
        let mut st = self.inner.state.lock();
        let keys: Vec<String> = st.staged.volumes.keys().cloned().collect();
        keys.iter().map(|k| self.info_of(&mut st, k)).collect()
    }

    fn volume(&self, key: &str) -> Result<VolumeInfo, PoolError> {
        let mut st = self.inner.state.lock();
        self.info_of(&mut st, key)
    }

    fn create_volume(&self, key: &str, size: u64) -> Result<(), PoolError> {
        validate_volume_key(key)?;
        let mut st = self.inner.state.lock();
        if st.staged.volumes.contains_key(key) {
            return Err(PoolError::VolumeExists(key.into()));
        }
        let (file, f) = self.inner.new_file(&mut st)?;
        if let Err(e) = f.set_len(size) {
            self.inner.discard_file(&mut st, file);
            return Err(PoolError::io(format!("sizing volume {key}"), e));
        }
        self.inner.insert(&mut st, key, file, size);
        Ok(())
    }

    fn snapshot(&self, source: &str, target: &str) -> Result<(), PoolError> {
        validate_volume_key(target)?;
        let mut st = self.inner.state.lock();
        let src = st.staged.entry(source)?.clone();
        if st.staged.volumes.contains_key(target) {
            return Err(PoolError::VolumeExists(target.into()));
        }
        let sf = self.inner.open_file(&mut st, src.file)?;
        let (file, f) = self.inner.new_file(&mut st)?;
        if let Err(e) = sys::ficlone(&f, &sf) {
            self.inner.discard_file(&mut st, file);
            return Err(PoolError::io(format!("cloning {source} to {target}"), e));
        }
        self.inner.insert(&mut st, target, file, src.size);
        Ok(())
    }

    fn remove_volume(&self, key: &str) -> Result<(), PoolError> {
        let mut st = self.inner.state.lock();
        let e = st.staged.entry(key)?.clone();
        if let Some(&users) = st.open.get(&e.id).filter(|&&u| u > 0) {
            return Err(PoolError::Busy {
                volume: key.into(),
                users,
            });
        }
        st.staged.volumes.remove(key);
        st.ids.remove(&e.id);
        self.inner.discard_file(&mut st, e.file);
        Ok(())
    }

    fn rename_volume(&self, from: &str, to: &str) -> Result<(), PoolError> {
        validate_volume_key(to)?;
        let mut st = self.inner.state.lock();
        st.staged.entry(from)?;
        if st.staged.volumes.contains_key(to) {
            return Err(PoolError::VolumeExists(to.into()));
        }
        let e = st.staged.volumes.remove(from).expect("checked above");
        st.ids.insert(e.id, to.to_string());
        st.staged.volumes.insert(to.to_string(), e);
        Ok(())
    }

    fn resize_volume(&self, key: &str, size: u64, allow_shrink: bool) -> Result<(), PoolError> {
        let mut st = self.inner.state.lock();
        let e = st.staged.entry(key)?.clone();
        let old = self.inner.open_file(&mut st, e.file)?;
        let io = |err| PoolError::io(format!("resizing volume {key}"), err);
        if size < e.size {
            if !allow_shrink {
                return Err(PoolError::ShrinkRefused {
                    volume: key.into(),
                    from: e.size,
                    to: size,
                });
            }
            // The committed file keeps its bytes until the commit that forgets it.
            let (file, f) = self.inner.new_file(&mut st)?;
            if let Err(err) = sys::ficlone(&f, &old).and_then(|()| f.set_len(size)) {
                self.inner.discard_file(&mut st, file);
                return Err(io(err));
            }
            self.inner.discard_file(&mut st, e.file);
            let ent = st.staged.volumes.get_mut(key).expect("checked above");
            ent.file = file;
            ent.size = size;
        } else {
            old.set_len(size).map_err(io)?;
            st.touched.insert(e.file);
            st.staged.volumes.get_mut(key).expect("checked above").size = size;
        }
        Ok(())
    }

    fn set_volume_attr(&self, key: &str, attr: &str, value: Option<&str>) -> Result<(), PoolError> {
        let mut st = self.inner.state.lock();
        let ent = st
            .staged
            .volumes
            .get_mut(key)
            .ok_or_else(|| PoolError::NoSuchVolume(key.into()))?;
        match value {
            Some(v) => ent.attrs.insert(attr.into(), v.into()),
            None => ent.attrs.remove(attr),
        };
        Ok(())
    }

    fn open_volume(&self, key: &str, read_only: bool) -> Result<Arc<dyn BlockDevice>, PoolError> {
        let mut st = self.inner.state.lock();
        let e = st.staged.entry(key)?.clone();
        self.inner.open_file(&mut st, e.file)?;
        *st.open.entry(e.id).or_insert(0) += 1;
        Ok(Arc::new(ReflinkVolume {
            inner: self.inner.clone(),
            id: e.id,
            name: key.into(),
            read_only,
        }))
    }

    fn get_meta(&self, key: &str) -> Result<Option<String>, PoolError> {
        Ok(self.inner.state.lock().staged.meta.get(key).cloned())
    }

    fn set_meta(&self, key: &str, value: Option<&str>) -> Result<(), PoolError> {
        crate::pool::bookkeeping::set_meta(&mut self.inner.state.lock().staged.meta, key, value);
        Ok(())
    }

    fn meta_keys(&self, prefix: &str) -> Result<Vec<String>, PoolError> {
        Ok(crate::pool::bookkeeping::meta_keys(
            &self.inner.state.lock().staged.meta,
            prefix,
        ))
    }

    fn commit(&self) -> Result<(), PoolError> {
        let mut st = self.inner.state.lock();
        let live: HashSet<u64> = st.staged.volumes.values().map(|e| e.file).collect();
        let touched: Vec<u64> = st
            .touched
            .iter()
            .copied()
            .filter(|f| live.contains(f))
            .collect();
        for file in touched {
            let f = self.inner.open_file(&mut st, file)?;
            f.sync_all().map_err(|e| {
                PoolError::io(
                    format!("syncing {}", self.inner.file_path(file).display()),
                    e,
                )
            })?;
        }
        fsync_dir(&self.inner.vols)?;
        let mut cat = st.staged.clone();
        cat.generation += 1;
        write_catalog(&self.inner.dir, &cat)?;
        st.staged.generation = cat.generation;
        st.committed_files = live;
        st.touched.clear();
        let doomed: Vec<u64> = st.doomed.drain().collect();
        for file in &doomed {
            st.files.remove(file);
            let path = self.inner.file_path(*file);
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != ErrorKind::NotFound {
                    // The catalogue no longer names it: open() removes it next time.
                    tracing::warn!("removing {}: {e}", path.display());
                }
            }
        }
        if !doomed.is_empty() {
            fsync_dir(&self.inner.vols)?;
        }
        Ok(())
    }

    fn verify(&self) -> Result<VerifyReport, PoolError> {
        let st = self.inner.state.lock();
        let mut report = VerifyReport {
            volumes: st.staged.volumes.len() as u64,
            ..VerifyReport::default()
        };
        let mut known: HashSet<u64> = st.staged.volumes.values().map(|e| e.file).collect();
        known.extend(st.doomed.iter().copied());
        known.extend(st.committed_files.iter().copied());
        for (key, e) in &st.staged.volumes {
            let path = self.inner.file_path(e.file);
            match fs::metadata(&path) {
                Ok(m) if m.len() != e.size => report.errors.push(format!(
                    "volume {key}: {} has {} bytes, the catalogue says {}",
                    path.display(),
                    m.len(),
                    e.size
                )),
                Ok(m) => report.data_chunks += m.blocks() * 512 / self.inner.block_size,
                Err(err) => report
                    .errors
                    .push(format!("volume {key}: {}: {err}", path.display())),
            }
        }
        let dir = fs::read_dir(&self.inner.vols)
            .map_err(|e| PoolError::io(format!("listing {}", self.inner.vols.display()), e))?;
        for ent in dir.flatten() {
            let name = ent.file_name().to_string_lossy().to_string();
            let num = name
                .strip_suffix(".img")
                .and_then(|n| u64::from_str_radix(n, 16).ok());
            if !num.is_some_and(|n| known.contains(&n)) {
                report
                    .leaks
                    .push(format!("leaked file {}", ent.path().display()));
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
        validate_volume_key(key)?;
        let (file, f, against) = {
            let mut st = self.inner.state.lock();
            if st.staged.volumes.contains_key(key) {
                return Err(PoolError::VolumeExists(key.into()));
            }
            let against = match opts.dedup_against.as_deref().filter(|_| opts.dedup) {
                Some(k) => match st.staged.entry(k).cloned() {
                    Ok(e) => Some((self.inner.open_file(&mut st, e.file)?, e.size)),
                    Err(_) => None,
                },
                None => None,
            };
            let (file, f) = self.inner.new_file(&mut st)?;
            (file, f, against)
        };
        // The image is read without the pool lock; the volume appears only when complete.
        match self.do_import(&f, image, size, against, opts.dedup) {
            Ok(stats) => {
                let mut st = self.inner.state.lock();
                if st.staged.volumes.contains_key(key) {
                    self.inner.discard_file(&mut st, file);
                    return Err(PoolError::VolumeExists(key.into()));
                }
                self.inner.insert(&mut st, key, file, size);
                Ok(stats)
            }
            Err(e) => {
                let mut st = self.inner.state.lock();
                self.inner.discard_file(&mut st, file);
                Err(e)
            }
        }
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

/// An open volume: its id, so it follows renames and shrinks (which change the file).
struct ReflinkVolume {
    inner: Arc<Inner>,
    id: u64,
    name: String,
    read_only: bool,
}

impl Drop for ReflinkVolume {
    fn drop(&mut self) {
        crate::pool::bookkeeping::release_handle(&mut self.inner.state.lock().open, self.id);
    }
}

impl ReflinkVolume {
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

    /// The volume's current file and size, after the common checks; I/O happens on the
    /// returned file outside the pool lock.
    fn target(
        &self,
        op: &'static str,
        offset: u64,
        length: u64,
        write: bool,
    ) -> Result<(Arc<File>, u64), BlockError> {
        if write && self.read_only {
            return Err(self.err(
                BlockErrorKind::ReadOnly,
                op,
                offset,
                length,
                "the volume is exported read-only",
            ));
        }
        let mut st = self.inner.state.lock();
        let gone = || {
            self.err(
                BlockErrorKind::Gone,
                op,
                offset,
                length,
                "the volume was removed",
            )
        };
        let key = st.ids.get(&self.id).cloned().ok_or_else(gone)?;
        let e = st.staged.volumes.get(&key).cloned().ok_or_else(gone)?;
        BlockError::check_range(&self.name, e.size, op, offset, length)?;
        let f = self
            .inner
            .open_file(&mut st, e.file)
            .map_err(|err| self.err(BlockErrorKind::Io, op, offset, length, err.to_string()))?;
        if write {
            st.touched.insert(e.file);
        }
        Ok((f, e.size))
    }

    /// Whole blocks inside `[offset, offset+length)`.
    fn whole_blocks(&self, offset: u64, length: u64) -> Option<(u64, u64)> {
        let bs = self.inner.block_size;
        let start = offset.div_ceil(bs) * bs;
        let end = (offset + length) / bs * bs;
        (end > start).then_some((start, end - start))
    }

    fn zero(&self, f: &File, offset: u64, length: u64) -> Result<(), BlockError> {
        let zeros = vec![0u8; length.min(1 << 20) as usize];
        let mut pos = offset;
        while pos < offset + length {
            let n = (offset + length - pos).min(zeros.len() as u64) as usize;
            f.write_all_at(&zeros[..n], pos)
                .map_err(|e| map_io("write_zeroes", &self.name, offset, length, e))?;
            pos += n as u64;
        }
        Ok(())
    }
}

impl BlockDevice for ReflinkVolume {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        let st = self.inner.state.lock();
        st.ids
            .get(&self.id)
            .and_then(|k| st.staged.volumes.get(k))
            .map_or(0, |e| e.size)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        let (f, _) = self.target("read", offset, buf.len() as u64, false)?;
        f.read_exact_at(buf, offset)
            .map_err(|e| map_io("read", &self.name, offset, buf.len() as u64, e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        let (f, _) = self.target("write", offset, buf.len() as u64, true)?;
        f.write_all_at(buf, offset)
            .map_err(|e| map_io("write", &self.name, offset, buf.len() as u64, e))
    }

    fn flush(&self) -> Result<(), BlockError> {
        let (f, _) = self.target("flush", 0, 0, false)?;
        f.sync_data()
            .map_err(|e| map_io("flush", &self.name, 0, 0, e))
    }

    fn discard(&self, offset: u64, length: u64) -> Result<(), BlockError> {
        let (f, _) = self.target("discard", offset, length, true)?;
        if let Some((start, len)) = self.whole_blocks(offset, length) {
            sys::punch_hole(&f, start, len)
                .map_err(|e| map_io("discard", &self.name, offset, length, e))?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> Result<(), BlockError> {
        let (f, _) = self.target("write_zeroes", offset, length, true)?;
        match self.whole_blocks(offset, length).filter(|_| may_unmap) {
            Some((start, len)) => {
                sys::punch_hole(&f, start, len)
                    .map_err(|e| map_io("write_zeroes", &self.name, offset, length, e))?;
                self.zero(&f, offset, start - offset)?;
                self.zero(&f, start + len, offset + length - (start + len))
            }
            None => self.zero(&f, offset, length),
        }
    }

    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>, BlockError> {
        let (f, _) = self.target("block_status", offset, length, false)?;
        let io = |e| map_io("block_status", &self.name, offset, length, e);
        let end = offset + length;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = sys::seek(&f, pos, libc::SEEK_DATA)
                .map_err(io)?
                .unwrap_or(end)
                .min(end);
            if data > pos {
                out.push(Extent {
                    offset: pos,
                    length: data - pos,
                    hole: true,
                    zero: true,
                });
                pos = data;
                continue;
            }
            let hole = sys::seek(&f, pos, libc::SEEK_HOLE)
                .map_err(io)?
                .unwrap_or(end)
                .min(end);
            let stop = hole.max(pos + 1).min(end);
            out.push(Extent {
                offset: pos,
                length: stop - pos,
                hole: false,
                zero: false,
            });
            pos = stop;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_filesystem_without_reflink() {
        // /dev/shm is tmpfs, which cannot clone extents.
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let err = ReflinkPool::create(&dir.path().join("pool"))
            .err()
            .expect("tmpfs has no reflink");
        let msg = err.to_string();
        assert!(
            msg.contains(&dir.path().display().to_string()) && msg.contains("reflink=1"),
            "{msg}"
        );
    }
}
