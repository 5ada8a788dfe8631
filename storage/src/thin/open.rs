//! Creating and opening a pool: the lock, the files, choosing a superblock slot,
//! refusing older formats, `needs_check`, and what recovery does before first use.

use super::*;

pub(super) fn open_file(path: &Path, create: bool) -> Result<Arc<dyn BlockFile>, PoolError> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if create {
        o.create_new(true);
    }
    let f = o.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            PoolError::NotAPool {
                path: path.display().to_string(),
                reason: "no such file".into(),
            }
        } else {
            PoolError::io(format!("opening {}", path.display()), e)
        }
    })?;
    Ok(Arc::new(RealFile::new(f)))
}

impl ThinPool {
    /// Creates a pool in `dir` (created if missing); refuses a directory holding a pool.
    pub fn create(dir: &Path, opts: ThinOptions) -> Result<Arc<ThinPool>, PoolError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| PoolError::io(format!("creating {}", dir.display()), e))?;
        let lock = crate::dirlock::lock_pool_dir(dir)?;
        if dir.join(META_FILE).exists() {
            return Err(PoolError::Invalid(format!(
                "a pool already exists at {}",
                dir.display()
            )));
        }
        let meta = open_file(&dir.join(META_FILE), true)?;
        let data = open_file(&dir.join(DATA_FILE), true)?;
        Self::create_locked(dir, lock, opts, meta, data)
    }

    /// Opens the pool in `dir`.
    pub fn open(dir: &Path) -> Result<Arc<ThinPool>, PoolError> {
        if !dir.join(META_FILE).exists() {
            return Err(PoolError::NotAPool {
                path: dir.display().to_string(),
                reason: format!("no {META_FILE}"),
            });
        }
        let lock = crate::dirlock::lock_pool_dir(dir)?;
        let meta = open_file(&dir.join(META_FILE), false)?;
        let data = open_file(&dir.join(DATA_FILE), false)?;
        Self::open_locked(dir, lock, meta, data)
    }

    /// [`ThinPool::create`] on caller-supplied files (tests inject faults this way); `dir`
    /// only holds the lock.
    pub fn create_with_io(
        dir: &Path,
        opts: ThinOptions,
        meta: Box<dyn BlockFile>,
        data: Box<dyn BlockFile>,
    ) -> Result<Arc<ThinPool>, PoolError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| PoolError::io(format!("creating {}", dir.display()), e))?;
        let lock = crate::dirlock::lock_pool_dir(dir)?;
        Self::create_locked(dir, lock, opts, Arc::from(meta), Arc::from(data))
    }

    /// [`ThinPool::open`] on caller-supplied files.
    pub fn open_with_io(
        dir: &Path,
        meta: Box<dyn BlockFile>,
        data: Box<dyn BlockFile>,
    ) -> Result<Arc<ThinPool>, PoolError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| PoolError::io(format!("creating {}", dir.display()), e))?;
        let lock = crate::dirlock::lock_pool_dir(dir)?;
        Self::open_locked(dir, lock, Arc::from(meta), Arc::from(data))
    }

    pub(super) fn create_locked(
        dir: &Path,
        lock: File,
        opts: ThinOptions,
        meta_file: Arc<dyn BlockFile>,
        data: Arc<dyn BlockFile>,
    ) -> Result<Arc<ThinPool>, PoolError> {
        let cs = opts.chunk_size;
        if !cs.is_power_of_two() || !(4096..=1 << 20).contains(&cs) {
            return Err(PoolError::Invalid(format!(
                "chunk size {cs} is not a power of two from 4 KiB to 1 MiB"
            )));
        }
        let chunks = opts.capacity / cs;
        if chunks == 0 {
            return Err(PoolError::Invalid(format!(
                "capacity {} is less than one chunk",
                opts.capacity
            )));
        }
        if !meta_file
            .is_empty()
            .map_err(|e| PoolError::io("sizing pool.meta", e))?
        {
            return Err(PoolError::Invalid(format!(
                "a pool already exists at {}",
                dir.display()
            )));
        }
        let len = units::data_file_len(cs, chunks).ok_or_else(|| {
            PoolError::Invalid(format!(
                "capacity {} is more than a file can hold; give a smaller --capacity",
                opts.capacity
            ))
        })?;
        data.set_len(len)
            .map_err(|e| PoolError::io("sizing pool.data", e))?;
        let empty = TreeRoot {
            page: PageRef::NULL,
            height: 1,
        };
        let sb = Superblock {
            generation: 0,
            chunk_size: cs,
            data_chunks: chunks,
            meta_hw: 2,
            data_hw: 0,
            data_used: 0,
            meta_used: 0,
            meta_rc: empty,
            data_rc: empty,
            roots: empty,
            catalogue: PageRef::NULL,
            catalogue_len: 0,
            needs_check: false,
        };
        let mut m = Meta::new(
            meta_file.clone(),
            sb,
            CatalogueDoc {
                next_id: 1,
                ..Default::default()
            },
            Vec::new(),
        );
        m.init_superblock_pages().map_err(|e| e.into_pool(cs))?;
        data.sync()
            .map_err(|e| PoolError::io("syncing pool.data", e))?;
        // Two commits: both superblock slots hold a valid pool from the start.
        m.commit().map_err(|e| e.into_pool(cs))?;
        m.commit().map_err(|e| e.into_pool(cs))?;
        Ok(Self::assemble(dir, lock, meta_file, data, m, None))
    }

    pub(super) fn open_locked(
        dir: &Path,
        lock: File,
        meta_file: Arc<dyn BlockFile>,
        data: Arc<dyn BlockFile>,
    ) -> Result<Arc<ThinPool>, PoolError> {
        let not_a_pool = |reason: String| PoolError::NotAPool {
            path: dir.display().to_string(),
            reason,
        };
        let len = meta_file
            .len()
            .map_err(|e| PoolError::io("sizing pool.meta", e))?;
        if len < 2 * PAGE_SIZE as u64 {
            return Err(not_a_pool(format!(
                "{META_FILE} is {len} bytes, too short for the superblocks"
            )));
        }
        let mut valid: Vec<Superblock> = Vec::new();
        let mut problems = Vec::new();
        let mut old_format = None;
        for slot in [PageNo(0), PageNo(1)] {
            let buf = meta::read_page(&*meta_file, slot).map_err(|e| e.into_pool(4096))?;
            match Superblock::unpack(slot, &buf[..]) {
                Ok(sb) => valid.push(sb),
                Err(FormatError::OldFormat { found }) => old_format = Some(found),
                Err(e) => problems.push(e.to_string()),
            }
        }
        if let (Some(found), true) = (old_format, valid.is_empty()) {
            // No in-place conversion: every pointer in the pool grows (generation and
            // checksum), so every page would be rewritten; the old build still reads it.
            return Err(PoolError::OldFormat {
                path: dir.display().to_string(),
                reason: format!(
                    "has metadata format {found}; this build reads format {} (lost-write \
                     detection) and does not convert pools. With the qubes-ctl that wrote the pool, \
                     `qubes-ctl volume export VOLUME FILE` each volume (templates: `template export`), \
                     then move the pool directory away, `qubes-ctl pool init` a new one and import them",
                    format::FORMAT_VERSION
                ),
            });
        }
        valid.sort_by_key(|sb| sb.generation);
        let best = valid.pop();
        // The previous commit, kept readable (its pages are not reused) until our first commit.
        let older = valid
            .pop()
            .filter(|o| best.is_some_and(|b| o.generation < b.generation));
        let Some(sb) = best else {
            // `pool verify` cannot open such a pool either: say what can be done.
            return Err(PoolError::Corrupt(format!(
                "no valid superblock: {}; the pool at {} cannot be opened (nor verified). \
                 Restore {META_FILE} from a backup, or move the pool directory away and create a \
                 new pool with `qubes-ctl pool init` (its data cannot be reached without a superblock)",
                problems.join("; "),
                dir.display()
            )));
        };
        let fallback = (!problems.is_empty()).then(|| {
            format!(
                "a superblock slot of {META_FILE} is damaged ({}); opened the other one, generation {} \
                 (the commit after it may be lost); the next commit rewrites the damaged slot",
                problems.join("; "),
                sb.generation
            )
        });
        if let Some(f) = &fallback {
            tracing::warn!(pool = %dir.display(), "{f}");
        }
        let cs = sb.chunk_size;
        if sb.needs_check {
            // The pool stopped after a failed metadata update: check before trusting it.
            let (report, _) = verify::verify(&*meta_file, &sb);
            if !report.errors.is_empty() {
                return Err(PoolError::Corrupt(format!(
                    "the pool stopped after a failed metadata update (needs_check is set) and its metadata is damaged: {}",
                    report.errors.join("; ")
                )));
            }
            tracing::warn!(pool = %dir.display(), leaks = report.leaks.len(), "the pool stopped after a failed metadata update; its metadata verified clean, the flag is cleared at the next commit");
        }
        let (cat, pages) = verify::read_catalogue(&*meta_file, &sb).map_err(|e| e.into_pool(cs))?;
        // Chunks past the committed high-water mark may hold data of a transaction that
        // never committed: hole-punch them so they read zeros when allocated.
        // The superblock's decoder checked that these fit in a file.
        let file_len = |chunks| {
            units::data_file_len(cs, chunks).ok_or_else(|| {
                PoolError::Corrupt(format!(
                    "{chunks} data chunks of {cs} bytes are more than a file can hold"
                ))
            })
        };
        let want = file_len(sb.data_chunks)?;
        let dlen = data
            .len()
            .map_err(|e| PoolError::io("sizing pool.data", e))?;
        if dlen < want {
            data.set_len(want)
                .map_err(|e| PoolError::io("sizing pool.data", e))?;
        }
        let tail = file_len(sb.data_hw)?;
        data.punch_hole(tail, dlen.max(want) - tail)
            .map_err(|e| PoolError::io("punching unused chunks", e))?;
        data.sync()
            .map_err(|e| PoolError::io("syncing pool.data", e))?;
        let mut m = Meta::new(meta_file.clone(), sb, cat, pages);
        m.keep_older(older);
        Ok(Self::assemble(dir, lock, meta_file, data, m, fallback))
    }

    pub(super) fn assemble(
        dir: &Path,
        lock: File,
        meta_file: Arc<dyn BlockFile>,
        data: Arc<dyn BlockFile>,
        m: Meta,
        fallback: Option<String>,
    ) -> Arc<ThinPool> {
        let data_dirty = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let data_raw = data.clone();
        let data: Arc<dyn BlockFile> = Arc::new(DirtyTracking {
            inner: data,
            dirty: data_dirty.clone(),
        });
        // Its own open file description: waiting on writeback consumes the waiting
        // description's error cursor (errseq), and the commit's sync of `data` must still
        // see any writeback error.
        let data_wb = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("pool.data"))
            .ok();
        Arc::new_cyclic(|me| ThinPool {
            me: me.clone(),
            data_wb,
            path: dir.to_path_buf(),
            _lock: lock,
            fallback,
            data,
            data_raw,
            data_dirty,
            meta_file,
            geo: m.geo,
            gate: RwLock::new(()),
            batch: parking_lot::ReentrantMutex::new(()),
            state: Mutex::new(m),
            cv: Condvar::new(),
        })
    }
}
