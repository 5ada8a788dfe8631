//! In-memory metadata state of an open thin pool and every mutation of it: the page
//! cache, the copy-on-write radix trees (block maps, refcount arrays, roots array), the
//! page and chunk allocators and the commit.
//!
//! Rules this module keeps (the crash-safety argument of the pool rests on them):
//! * A committed page is never written again: the first change in a transaction shadows
//!   it to a page allocated in this transaction ("fresh"); fresh pages change in memory
//!   and are written once, at commit.
//! * A page freed in transaction `g` is reused only after commit `g + 1` is durable, so
//!   the older superblock slot stays readable; a data chunk freed in transaction `g` is
//!   reused only after commit `g` is durable (space must come back at one commit).
//! * Block-map nodes are shared between volumes with lazy refcounts (Rodeh): the count of
//!   a node is the number of parents (volume roots or interior nodes) pointing at it, the
//!   count of a data chunk is the number of leaf entries (as chunk or as backing) naming
//!   it. Shadowing a shared node increments its children.
//! * A chunk (or node) whose count dropped in this transaction may still be shared in the
//!   last commit; `dropped_*` remember them and shadowing a dropped node taints its
//!   children, so data is written in place only into chunks exclusive now and at the last
//!   commit.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::format::*;
use super::Error;
use crate::io::BlockFile;

pub(crate) const ROOTS: usize = 0;
pub(crate) const DATA_RC: usize = 1;
pub(crate) const META_RC: usize = 2;

/// Map nodes kept in the cache before clean ones are dropped.
const NODE_CACHE_LIMIT: usize = 65536;

fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { op, source }
}

pub(crate) fn read_page(file: &dyn BlockFile, page: PageNo) -> Result<Box<[u8; PAGE_SIZE]>, Error> {
    let mut buf = Box::new([0u8; PAGE_SIZE]);
    file.read_at(&mut buf[..], page.offset()).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::Inconsistent(format!("metadata page {page} is past the end of pool.meta"))
        } else {
            Error::Io {
                op: "reading a metadata page",
                source: e,
            }
        }
    })?;
    Ok(buf)
}

/// Levels needed for a block map of `chunks` virtual chunks.
pub(crate) fn map_height(chunks: u64) -> u32 {
    let mut h = 1;
    let mut cap = MAP_LEAF_ENTRIES as u64;
    while cap < chunks {
        cap = cap.saturating_mul(INTERIOR_FANOUT as u64);
        h += 1;
    }
    h
}

/// Virtual chunks covered by one child of a node at `level` (0 = leaf).
fn span(level: u32) -> u64 {
    let mut s = MAP_LEAF_ENTRIES as u64;
    for _ in 1..level {
        s = s.saturating_mul(INTERIOR_FANOUT as u64);
    }
    if level == 0 {
        1
    } else {
        s
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Body {
    Interior(Vec<PageRef>),
    Rc(Vec<u32>),
    Roots(Vec<RootEntry>),
}

pub(crate) struct ANode {
    page: u64,
    fresh: bool,
    dirty: bool,
    body: Body,
}

/// A copy-on-write radix tree of fixed-size records (refcounts or volume roots), owned
/// by the superblock alone (never shared), so its pages always have refcount 1.
pub(crate) struct ArrayTree {
    pub interior: PageKind,
    pub leaf: PageKind,
    pub per_leaf: u64,
    pub root: PageRef,
    pub height: u32,
    nodes: HashMap<(u32, u64), ANode>,
}

impl ArrayTree {
    pub fn new(interior: PageKind, leaf: PageKind, root: TreeRoot) -> Self {
        let per_leaf = if leaf == PageKind::RootsLeaf {
            ROOTS_LEAF_ENTRIES
        } else {
            RC_LEAF_ENTRIES
        } as u64;
        ArrayTree {
            interior,
            leaf,
            per_leaf,
            root: root.page,
            height: root.height.max(1),
            nodes: HashMap::new(),
        }
    }

    pub fn tree_root(&self) -> TreeRoot {
        TreeRoot {
            page: self.root,
            height: self.height,
        }
    }

    fn cap(&self, height: u32) -> u64 {
        let mut c = self.per_leaf;
        for _ in 1..height {
            c = c.saturating_mul(INTERIOR_FANOUT as u64);
        }
        c
    }

    fn zero_body(&self, level: u32) -> Body {
        if level > 0 {
            Body::Interior(vec![PageRef::NULL; INTERIOR_FANOUT])
        } else if self.leaf == PageKind::RootsLeaf {
            Body::Roots(vec![RootEntry::default(); ROOTS_LEAF_ENTRIES])
        } else {
            Body::Rc(vec![0; RC_LEAF_ENTRIES])
        }
    }

    fn grow_to(&mut self, idx: u64) {
        while idx >= self.cap(self.height) {
            let mut children = vec![PageRef::NULL; INTERIOR_FANOUT];
            children[0] = self.root;
            // The old root keeps its key (height-1, 0): it is child 0 of the new root.
            self.nodes.insert(
                (self.height, 0),
                ANode {
                    page: 0,
                    fresh: false,
                    dirty: true,
                    body: Body::Interior(children),
                },
            );
            self.root = PageRef::NULL;
            self.height += 1;
        }
    }

    fn load(
        &mut self,
        file: &dyn BlockFile,
        hw: u64,
        level: u32,
        idx: u64,
    ) -> Result<&mut ANode, Error> {
        if !self.nodes.contains_key(&(level, idx)) {
            let r = if level + 1 >= self.height {
                self.root
            } else {
                let parent = self.load(file, hw, level + 1, idx / INTERIOR_FANOUT as u64)?;
                match &parent.body {
                    Body::Interior(c) => c[(idx % INTERIOR_FANOUT as u64) as usize],
                    _ => {
                        return Err(Error::Inconsistent(
                            "array tree interior holds a leaf".into(),
                        ))
                    }
                }
            };
            let body = if r.is_null() {
                self.zero_body(level)
            } else {
                let buf = read_page(file, r.page)?;
                if level > 0 {
                    Body::Interior(unpack_interior(self.interior, r, &buf[..], hw)?)
                } else if self.leaf == PageKind::RootsLeaf {
                    Body::Roots(unpack_roots_leaf(r, &buf[..], hw)?)
                } else {
                    Body::Rc(unpack_rc_leaf(self.leaf, r, &buf[..])?)
                }
            };
            self.nodes.insert(
                (level, idx),
                ANode {
                    page: r.page.0,
                    fresh: false,
                    dirty: false,
                    body,
                },
            );
        }
        Ok(self.nodes.get_mut(&(level, idx)).expect("just inserted"))
    }

    pub fn get_rc(&mut self, file: &dyn BlockFile, hw: u64, i: u64) -> Result<u32, Error> {
        if i >= self.cap(self.height) {
            return Ok(0);
        }
        let per = self.per_leaf;
        match &self.load(file, hw, 0, i / per)?.body {
            Body::Rc(v) => Ok(v[(i % per) as usize]),
            _ => Err(Error::Inconsistent(
                "refcount tree leaf of the wrong kind".into(),
            )),
        }
    }

    pub fn set_rc(&mut self, file: &dyn BlockFile, hw: u64, i: u64, val: u32) -> Result<(), Error> {
        self.grow_to(i);
        let per = self.per_leaf;
        let n = self.load(file, hw, 0, i / per)?;
        match &mut n.body {
            Body::Rc(v) => {
                let slot = &mut v[(i % per) as usize];
                if *slot != val {
                    *slot = val;
                    n.dirty = true;
                }
                Ok(())
            }
            _ => Err(Error::Inconsistent(
                "refcount tree leaf of the wrong kind".into(),
            )),
        }
    }

    /// The refcounts of leaf `leaf` (for allocator scans).
    pub fn rc_leaf(&mut self, file: &dyn BlockFile, hw: u64, leaf: u64) -> Result<Vec<u32>, Error> {
        if leaf * self.per_leaf >= self.cap(self.height) {
            return Ok(vec![0; RC_LEAF_ENTRIES]);
        }
        match &self.load(file, hw, 0, leaf)?.body {
            Body::Rc(v) => Ok(v.clone()),
            _ => Err(Error::Inconsistent(
                "refcount tree leaf of the wrong kind".into(),
            )),
        }
    }

    pub fn get_root(&mut self, file: &dyn BlockFile, hw: u64, i: u64) -> Result<RootEntry, Error> {
        if i >= self.cap(self.height) {
            return Ok(RootEntry::default());
        }
        let per = self.per_leaf;
        match &self.load(file, hw, 0, i / per)?.body {
            Body::Roots(v) => Ok(v[(i % per) as usize]),
            _ => Err(Error::Inconsistent(
                "roots tree leaf of the wrong kind".into(),
            )),
        }
    }

    pub fn set_root(
        &mut self,
        file: &dyn BlockFile,
        hw: u64,
        i: u64,
        val: RootEntry,
    ) -> Result<(), Error> {
        self.grow_to(i);
        let per = self.per_leaf;
        let n = self.load(file, hw, 0, i / per)?;
        match &mut n.body {
            Body::Roots(v) => {
                let slot = &mut v[(i % per) as usize];
                if *slot != val {
                    *slot = val;
                    n.dirty = true;
                }
                Ok(())
            }
            _ => Err(Error::Inconsistent(
                "roots tree leaf of the wrong kind".into(),
            )),
        }
    }

    /// Dirty nodes that still need a page of their own in this transaction, leaves first.
    fn needing_pages(&self) -> Vec<(u32, u64)> {
        let mut v: Vec<(u32, u64)> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.dirty && !n.fresh)
            .map(|(k, _)| *k)
            .collect();
        v.sort_unstable();
        v
    }

    /// Writes the dirty nodes (each has a page of this transaction by now) leaves first,
    /// so each parent records its children's final pointers; the root's goes to
    /// [`ArrayTree::tree_root`].
    fn write_dirty(&mut self, file: &dyn BlockFile, gen: u64) -> Result<(), Error> {
        let mut keys: Vec<(u32, u64)> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.dirty)
            .map(|(k, _)| *k)
            .collect();
        keys.sort_unstable();
        let fan = INTERIOR_FANOUT as u64;
        for (level, idx) in keys {
            let n = &self.nodes[&(level, idx)];
            let page = PageNo(n.page);
            let buf = match &n.body {
                Body::Interior(c) => pack_interior(self.interior, page, gen, c),
                Body::Rc(v) => pack_rc_leaf(self.leaf, page, gen, v),
                Body::Roots(v) => pack_roots_leaf(page, gen, v),
            };
            file.write_at(&buf[..], page.offset())
                .map_err(io_err("writing a refcount or roots page"))?;
            let r = PageRef::of(&buf);
            if level + 1 >= self.height {
                self.root = r;
                continue;
            }
            match self.nodes.get_mut(&(level + 1, idx / fan)) {
                Some(ANode {
                    body: Body::Interior(c),
                    dirty: true,
                    ..
                }) => c[(idx % fan) as usize] = r,
                _ => {
                    return Err(Error::Inconsistent(format!(
                        "{:?} page {page} has no parent in this commit",
                        self.leaf
                    )))
                }
            }
        }
        Ok(())
    }

    fn finish_commit(&mut self) {
        for n in self.nodes.values_mut() {
            n.dirty = false;
            n.fresh = false;
        }
    }
}

/// The catalogue document (JSON in the catalogue pages).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct CatalogueDoc {
    pub next_id: u64,
    pub volumes: Vec<CatVolume>,
    pub meta: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CatVolume {
    pub id: u64,
    pub key: String,
    pub size: u64,
    #[serde(default)]
    pub attrs: BTreeMap<String, String>,
    #[serde(default)]
    pub fingerprint: Option<String>,
}

#[derive(Clone, Debug)]
pub(crate) enum MapNode {
    Interior(Vec<PageRef>),
    Leaf(Vec<MapEntry>),
}

/// Geometry of the data area.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    pub chunk_size: u64,
    pub data_chunks: u64,
    /// Sub-blocks per chunk (1..=64) and their size.
    pub subs: u32,
    pub sub_size: u64,
}

impl Geometry {
    pub fn new(chunk_size: u64, data_chunks: u64) -> Geometry {
        let sub_size = (chunk_size / 64).max(4096);
        Geometry {
            chunk_size,
            data_chunks,
            subs: (chunk_size / sub_size) as u32,
            sub_size,
        }
    }
    pub fn full_mask(&self) -> u64 {
        if self.subs >= 64 {
            u64::MAX
        } else {
            (1u64 << self.subs) - 1
        }
    }
}

fn index_by_id(volumes: &[CatVolume]) -> HashMap<u64, usize> {
    volumes.iter().enumerate().map(|(i, v)| (v.id, i)).collect()
}

pub(crate) struct Meta {
    pub file: Arc<dyn BlockFile>,
    pub geo: Geometry,
    /// The last committed superblock.
    pub sb: Superblock,
    pub meta_hw: u64,
    pub data_hw: u64,
    pub data_used: u64,
    pub meta_used: u64,
    pub trees: [ArrayTree; 3],
    nodes: HashMap<u64, MapNode>,
    /// Map nodes cached before clean ones are evicted ([`NODE_CACHE_LIMIT`]).
    node_cache_limit: usize,
    fresh: HashSet<u64>,
    /// Volumes whose root may point to a fresh node: the commit seals their maps.
    fresh_roots: HashSet<u64>,
    pub cat: CatalogueDoc,
    /// Volume id -> index in `cat.volumes`, and key -> id.
    pub by_key: BTreeMap<String, u64>,
    /// Volume id -> index in `cat.volumes`: every guest read and write looks its volume
    /// up, and a pool holds thousands.
    by_id: HashMap<u64, usize>,
    pub cat_dirty: bool,
    cat_pages: Vec<u64>,
    // Metadata page allocator.
    free_meta: BTreeSet<u64>,
    meta_deferred: HashSet<u64>,
    freed_meta_txn: Vec<u64>,
    freed_meta_prev: Vec<u64>,
    meta_scan: u64,
    meta_hw_open: u64,
    // Data chunk allocator.
    free_chunks: BTreeSet<u64>,
    chunks_deferred: HashSet<u64>,
    data_scan: u64,
    data_hw_open: u64,
    pub dropped_pages: HashSet<u64>,
    pub dropped_chunks: HashSet<u64>,
    /// Chunks with data I/O in flight that readers and writers must not touch yet.
    pub inflight: HashSet<u64>,
    /// (volume id, virtual chunk) with a write in flight whose mapping is installed only
    /// once its data is on disk: other writers and unmaps of the same chunk wait.
    pub inflight_vcs: HashSet<(u64, u64)>,
    /// Chunks the last commit made free: the pool hole-punches them to give their
    /// space back to the host filesystem.
    pub freed_chunks_committed: Vec<u64>,
    /// Live handles per volume id.
    pub handles: HashMap<u64, usize>,
    /// Bumped on every change of a volume's content (fingerprint cache validity).
    epochs: HashMap<u64, u64>,
    /// Metadata refcounts of the older superblock slot (and its high-water mark) until
    /// the first commit overwrites it: pages it uses are not reused before then.
    older_rc: Option<(ArrayTree, u64)>,
    pub poisoned: Option<String>,
    /// Readers of a pinned commit ([`Meta::pin`]) and the pages they keep from reuse.
    pins: usize,
    held_meta: Vec<u64>,
}

impl Meta {
    /// State of a pool whose last commit is `sb` with catalogue `cat` in `cat_pages`.
    pub fn new(
        file: Arc<dyn BlockFile>,
        sb: Superblock,
        cat: CatalogueDoc,
        cat_pages: Vec<u64>,
    ) -> Meta {
        let by_key = cat.volumes.iter().map(|v| (v.key.clone(), v.id)).collect();
        let by_id = index_by_id(&cat.volumes);
        Meta {
            file,
            geo: Geometry::new(sb.chunk_size, sb.data_chunks),
            sb,
            meta_hw: sb.meta_hw,
            data_hw: sb.data_hw,
            data_used: sb.data_used,
            meta_used: sb.meta_used,
            trees: [
                ArrayTree::new(PageKind::RootsInterior, PageKind::RootsLeaf, sb.roots),
                ArrayTree::new(PageKind::DataRcInterior, PageKind::DataRcLeaf, sb.data_rc),
                ArrayTree::new(PageKind::MetaRcInterior, PageKind::MetaRcLeaf, sb.meta_rc),
            ],
            nodes: HashMap::new(),
            node_cache_limit: NODE_CACHE_LIMIT,
            fresh: HashSet::new(),
            fresh_roots: HashSet::new(),
            cat,
            by_key,
            by_id,
            cat_dirty: false,
            cat_pages,
            free_meta: BTreeSet::new(),
            meta_deferred: HashSet::new(),
            freed_meta_txn: Vec::new(),
            freed_meta_prev: Vec::new(),
            meta_scan: 2,
            meta_hw_open: sb.meta_hw,
            free_chunks: BTreeSet::new(),
            chunks_deferred: HashSet::new(),
            data_scan: 1,
            data_hw_open: sb.data_hw,
            dropped_pages: HashSet::new(),
            dropped_chunks: HashSet::new(),
            inflight: HashSet::new(),
            inflight_vcs: HashSet::new(),
            freed_chunks_committed: Vec::new(),
            handles: HashMap::new(),
            epochs: HashMap::new(),
            older_rc: None,
            poisoned: None,
            pins: 0,
            held_meta: Vec::new(),
        }
    }

    /// Protects the pages of the previous commit `older` (the fallback superblock slot)
    /// from reuse until this process's first commit replaces that slot.
    pub fn keep_older(&mut self, older: Option<Superblock>) {
        self.older_rc = older.map(|o| {
            (
                ArrayTree::new(PageKind::MetaRcInterior, PageKind::MetaRcLeaf, o.meta_rc),
                o.meta_hw,
            )
        });
    }

    /// Whether page `p` is in use in the older slot's commit. A damaged older tree
    /// protects nothing (the fallback is best effort).
    fn used_by_older(&mut self, p: u64) -> bool {
        let Some((tree, hw)) = &mut self.older_rc else {
            return false;
        };
        if p >= *hw {
            return false;
        }
        match tree.get_rc(&*self.file, *hw, p) {
            Ok(rc) => rc > 0,
            Err(_) => {
                self.older_rc = None;
                false
            }
        }
    }

    /// Stops the pool: the in-memory state is unknown after a failed metadata update.
    /// Best effort, the stop is also made durable (dm-thin's `needs_check`): the last
    /// commit's superblock, flagged, goes to the other slot with the next generation
    /// (the last commit's own slot stays intact if this write tears), so the next open
    /// verifies the metadata before it trusts it.
    pub fn poison(&mut self, why: String) {
        if self.poisoned.is_some() {
            return;
        }
        self.poisoned = Some(why);
        let sb = Superblock {
            generation: self.sb.generation + 1,
            needs_check: true,
            ..self.sb
        };
        let slot = PageNo(sb.generation % 2);
        let r = self
            .file
            .write_at(&sb.pack(slot)[..], slot.offset())
            .and_then(|_| self.file.sync());
        match r {
            Ok(()) => self.sb = sb,
            Err(e) => tracing::warn!("could not record needs_check in the superblock: {e}"),
        }
    }

    pub fn check_poison(&self) -> Result<(), Error> {
        match &self.poisoned {
            Some(why) => Err(Error::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    // ---- refcounts -------------------------------------------------------------------

    pub fn meta_rc(&mut self, p: u64) -> Result<u32, Error> {
        let hw = self.meta_hw;
        self.trees[META_RC].get_rc(&*self.file, hw, p)
    }
    fn set_meta_rc(&mut self, p: u64, v: u32) -> Result<(), Error> {
        let hw = self.meta_hw;
        self.trees[META_RC].set_rc(&*self.file, hw, p, v)
    }
    pub fn data_rc(&mut self, c: u64) -> Result<u32, Error> {
        let hw = self.meta_hw;
        self.trees[DATA_RC].get_rc(&*self.file, hw, c)
    }
    fn set_data_rc(&mut self, c: u64, v: u32) -> Result<(), Error> {
        let hw = self.meta_hw;
        self.trees[DATA_RC].set_rc(&*self.file, hw, c, v)
    }

    pub fn chunk_inc(&mut self, c: Chunk) -> Result<(), Error> {
        if c.is_none() {
            return Ok(());
        }
        let rc = self.data_rc(c.0)?;
        if rc == 0 {
            return Err(Error::Inconsistent(format!(
                "data chunk {c} is referenced but has refcount 0"
            )));
        }
        let rc = rc
            .checked_add(1)
            .ok_or_else(|| Error::Inconsistent(format!("data chunk {c}: refcount overflow")))?;
        self.set_data_rc(c.0, rc)
    }

    pub fn chunk_dec(&mut self, c: Chunk) -> Result<(), Error> {
        if c.is_none() {
            return Ok(());
        }
        let rc = self.data_rc(c.0)?;
        if rc == 0 {
            return Err(Error::Inconsistent(format!(
                "data chunk {c}: refcount underflow"
            )));
        }
        self.set_data_rc(c.0, rc - 1)?;
        self.dropped_chunks.insert(c.0);
        if rc == 1 {
            self.data_used = self.data_used.checked_sub(1).ok_or_else(|| {
                Error::Inconsistent(format!("data chunk {c} freed with no data chunk in use"))
            })?;
            self.chunks_deferred.insert(c.0);
        }
        Ok(())
    }

    fn page_inc(&mut self, p: u64) -> Result<(), Error> {
        let rc = self.meta_rc(p)?;
        if rc == 0 {
            return Err(Error::Inconsistent(format!(
                "metadata page {p} is referenced but has refcount 0"
            )));
        }
        let rc = rc
            .checked_add(1)
            .ok_or_else(|| Error::Inconsistent(format!("metadata page {p}: refcount overflow")))?;
        self.set_meta_rc(p, rc)
    }

    /// Drops one reference to map node `p` (of tree level `level`); frees it and drops
    /// its children when it was the last.
    pub fn page_dec(&mut self, r: PageRef, level: u32) -> Result<(), Error> {
        let mut stack = vec![(r, level)];
        while let Some((r, level)) = stack.pop() {
            let p = r.page.0;
            let rc = self.meta_rc(p)?;
            if rc == 0 {
                return Err(Error::Inconsistent(format!(
                    "metadata page {p}: refcount underflow"
                )));
            }
            self.dropped_pages.insert(p);
            if rc > 1 {
                self.set_meta_rc(p, rc - 1)?;
                continue;
            }
            match self.node(r, level)?.clone() {
                MapNode::Interior(children) => {
                    stack.extend(
                        children
                            .into_iter()
                            .filter(|c| !c.is_null())
                            .map(|c| (c, level - 1)),
                    );
                }
                MapNode::Leaf(entries) => {
                    for e in entries {
                        self.chunk_dec(e.chunk)?;
                        self.chunk_dec(e.backing)?;
                    }
                }
            }
            self.nodes.remove(&p);
            self.fresh.remove(&p);
            self.free_meta_page(p)?;
        }
        Ok(())
    }

    // ---- allocators ------------------------------------------------------------------

    fn free_meta_page(&mut self, p: u64) -> Result<(), Error> {
        self.set_meta_rc(p, 0)?;
        self.meta_used = self.meta_used.checked_sub(1).ok_or_else(|| {
            Error::Inconsistent(format!(
                "metadata page {p} freed with no metadata page in use"
            ))
        })?;
        self.meta_deferred.insert(p);
        self.freed_meta_txn.push(p);
        Ok(())
    }

    pub fn alloc_meta_page(&mut self) -> Result<u64, Error> {
        let p = loop {
            if let Some(p) = self.free_meta.pop_first() {
                if self.meta_rc(p)? == 0 && !self.meta_deferred.contains(&p) {
                    break p;
                }
                continue;
            }
            if self.meta_scan < self.meta_hw_open {
                let leaf = self.meta_scan / RC_LEAF_ENTRIES as u64;
                let hw = self.meta_hw;
                let counts = self.trees[META_RC].rc_leaf(&*self.file, hw, leaf)?;
                let end = ((leaf + 1) * RC_LEAF_ENTRIES as u64).min(self.meta_hw_open);
                for q in self.meta_scan.max(2)..end {
                    if counts[(q % RC_LEAF_ENTRIES as u64) as usize] == 0
                        && !self.meta_deferred.contains(&q)
                    {
                        if self.used_by_older(q) {
                            // Free after our first commit, which replaces the older slot.
                            self.meta_deferred.insert(q);
                            self.freed_meta_prev.push(q);
                        } else {
                            self.free_meta.insert(q);
                        }
                    }
                }
                self.meta_scan = end;
                continue;
            }
            let p = self.meta_hw;
            self.meta_hw += 1;
            break p;
        };
        self.set_meta_rc(p, 1)?;
        self.meta_used += 1;
        Ok(p)
    }

    fn release_meta(&mut self, pages: Vec<u64>) {
        for p in pages {
            self.meta_deferred.remove(&p);
            self.free_meta.insert(p);
        }
    }

    /// Keeps every page of the last commit unchanged until [`Meta::unpin`]: a reader
    /// walks it without the metadata lock (dm-thin's `metadata_snap`). Pages it uses
    /// are freed by later commits but not reused while pinned.
    pub fn pin(&mut self) -> Superblock {
        self.pins += 1;
        self.sb
    }

    pub fn unpin(&mut self) {
        self.pins = self.pins.saturating_sub(1);
        if self.pins == 0 {
            let held = std::mem::take(&mut self.held_meta);
            self.release_meta(held);
        }
    }

    /// Chunks freed in this transaction, reusable after the next commit.
    pub fn deferred_chunks(&self) -> usize {
        self.chunks_deferred.len()
    }

    /// A free data chunk with refcount 1, and whether it held data before (then the
    /// caller punches it before anything can read it).
    pub fn alloc_chunk(&mut self) -> Result<(Chunk, bool), Error> {
        if self.data_used + self.chunks_deferred.len() as u64 >= self.geo.data_chunks {
            return Err(Error::NoSpace);
        }
        let (c, reused) = loop {
            if let Some(c) = self.free_chunks.pop_first() {
                if self.data_rc(c)? == 0 && !self.chunks_deferred.contains(&c) {
                    break (c, true);
                }
                continue;
            }
            if self.data_scan <= self.data_hw_open {
                let leaf = self.data_scan / RC_LEAF_ENTRIES as u64;
                let hw = self.meta_hw;
                let counts = self.trees[DATA_RC].rc_leaf(&*self.file, hw, leaf)?;
                let end = ((leaf + 1) * RC_LEAF_ENTRIES as u64).min(self.data_hw_open + 1);
                for q in self.data_scan.max(1)..end {
                    if counts[(q % RC_LEAF_ENTRIES as u64) as usize] == 0
                        && !self.chunks_deferred.contains(&q)
                    {
                        self.free_chunks.insert(q);
                    }
                }
                self.data_scan = end;
                continue;
            }
            if self.data_hw < self.geo.data_chunks {
                self.data_hw += 1;
                break (self.data_hw, false);
            }
            return Err(Error::NoSpace);
        };
        self.set_data_rc(c, 1)?;
        self.data_used += 1;
        Ok((Chunk(c), reused))
    }

    // ---- block-map nodes -------------------------------------------------------------

    /// Seals fresh block-map page `p` and the fresh pages below it (children first, so
    /// each records its children's pointers), writes them, and returns the pointer to
    /// `p`. A fresh page shared by several parents is sealed once (`sealed`).
    fn seal_map(
        &mut self,
        p: u64,
        gen: u64,
        sealed: &mut HashMap<u64, PageRef>,
    ) -> Result<PageRef, Error> {
        if let Some(r) = sealed.get(&p) {
            return Ok(*r);
        }
        let mut node = self.nodes.remove(&p).ok_or_else(|| {
            Error::Inconsistent(format!(
                "block-map page {p} of this transaction is not cached"
            ))
        })?;
        if let MapNode::Interior(children) = &mut node {
            for c in children.iter_mut() {
                if !c.is_null() && self.fresh.contains(&c.page.0) {
                    *c = self.seal_map(c.page.0, gen, sealed)?;
                }
            }
        }
        let buf = match &node {
            MapNode::Interior(c) => pack_interior(PageKind::MapInterior, PageNo(p), gen, c),
            MapNode::Leaf(es) => pack_map_leaf(PageNo(p), gen, es),
        };
        self.nodes.insert(p, node);
        self.file
            .write_at(&buf[..], PageNo(p).offset())
            .map_err(io_err("writing a block-map page"))?;
        let r = PageRef::of(&buf);
        sealed.insert(p, r);
        Ok(r)
    }

    /// The node `r` points to, from the cache or read and checked against `r` (a page
    /// of this transaction is always cached).
    pub fn node(&mut self, r: PageRef, level: u32) -> Result<&MapNode, Error> {
        let p = r.page.0;
        if !self.nodes.contains_key(&p) {
            if p < 2 || p >= self.meta_hw {
                return Err(Error::Inconsistent(format!(
                    "block-map pointer to page {p} out of range"
                )));
            }
            if self.nodes.len() >= self.node_cache_limit {
                self.evict_clean_nodes();
            }
            let buf = read_page(&*self.file, PageNo(p))?;
            let n = if level == 0 {
                MapNode::Leaf(unpack_map_leaf(
                    r,
                    &buf[..],
                    self.geo.data_chunks,
                    self.geo.subs,
                )?)
            } else {
                MapNode::Interior(unpack_interior(
                    PageKind::MapInterior,
                    r,
                    &buf[..],
                    self.meta_hw,
                )?)
            };
            self.nodes.insert(p, n);
        }
        Ok(&self.nodes[&p])
    }

    /// Makes room in the node cache: drops clean leaves (in hash order, which is as good
    /// as random) down to 3/4 of the limit, keeping interior nodes, which every lookup
    /// walks and which are ~1/168 of the leaves. Fresh (dirty) nodes always stay.
    fn evict_clean_nodes(&mut self) {
        let target = self.node_cache_limit * 3 / 4;
        let excess = self.nodes.len().saturating_sub(target);
        let fresh = &self.fresh;
        let victims: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(k, n)| matches!(n, MapNode::Leaf(_)) && !fresh.contains(k))
            .map(|(k, _)| *k)
            .take(excess)
            .collect();
        for k in victims {
            self.nodes.remove(&k);
        }
        if self.nodes.len() >= self.node_cache_limit {
            // Nothing but interior and fresh nodes left: drop the clean interior ones.
            let fresh = &self.fresh;
            self.nodes.retain(|k, _| fresh.contains(k));
        }
    }

    fn new_node(&mut self, level: u32) -> Result<u64, Error> {
        let p = self.alloc_meta_page()?;
        let n = if level == 0 {
            MapNode::Leaf(vec![MapEntry::UNMAPPED; MAP_LEAF_ENTRIES])
        } else {
            MapNode::Interior(vec![PageRef::NULL; INTERIOR_FANOUT])
        };
        self.nodes.insert(p, n);
        self.fresh.insert(p);
        Ok(p)
    }

    /// A page holding node `p`'s content that this transaction may change in place.
    fn make_writable(&mut self, r: PageRef, level: u32) -> Result<u64, Error> {
        let p = r.page.0;
        let rc = self.meta_rc(p)?;
        if rc == 0 {
            return Err(Error::Inconsistent(format!(
                "block-map node {p} is referenced but has refcount 0"
            )));
        }
        if rc == 1 && self.fresh.contains(&p) {
            return Ok(p);
        }
        let node = self.node(r, level)?.clone();
        let new = self.alloc_meta_page()?;
        if rc > 1 {
            match &node {
                MapNode::Interior(c) => {
                    for c in c.iter().filter(|c| !c.is_null()) {
                        self.page_inc(c.page.0)?;
                    }
                }
                MapNode::Leaf(es) => {
                    for e in es {
                        self.chunk_inc(e.chunk)?;
                        self.chunk_inc(e.backing)?;
                    }
                }
            }
            self.set_meta_rc(p, rc - 1)?;
            self.dropped_pages.insert(p);
        } else {
            if self.dropped_pages.contains(&p) {
                // Shared at the last commit: what hangs below is too.
                match &node {
                    MapNode::Interior(c) => self
                        .dropped_pages
                        .extend(c.iter().filter(|c| !c.is_null()).map(|c| c.page.0)),
                    MapNode::Leaf(es) => self
                        .dropped_chunks
                        .extend(es.iter().filter(|e| e.is_mapped()).map(|e| e.chunk.0)),
                }
            }
            self.nodes.remove(&p);
            self.free_meta_page(p)?;
        }
        self.nodes.insert(new, node);
        self.fresh.insert(new);
        Ok(new)
    }

    pub fn root(&mut self, id: u64) -> Result<RootEntry, Error> {
        let hw = self.meta_hw;
        let r = self.trees[ROOTS].get_root(&*self.file, hw, id)?;
        if !r.present {
            return Err(Error::Inconsistent(format!("volume id {id} has no root")));
        }
        Ok(r)
    }

    pub fn set_root(&mut self, id: u64, r: RootEntry) -> Result<(), Error> {
        if r.present && self.fresh.contains(&r.root.page.0) {
            self.fresh_roots.insert(id);
        }
        let hw = self.meta_hw;
        self.trees[ROOTS].set_root(&*self.file, hw, id, r)
    }

    /// Shadows the path to the leaf holding `vc`; returns the (writable) leaf page.
    pub fn shadow_path(&mut self, id: u64, vc: u64) -> Result<u64, Error> {
        let mut r = self.root(id)?;
        let top = r.height - 1;
        let root = if r.root.is_null() {
            self.new_node(top)?
        } else {
            self.make_writable(r.root, top)?
        };
        if root != r.root.page.0 {
            r.root = PageRef::unsealed(root);
            self.set_root(id, r)?;
        }
        let mut node = root;
        for level in (1..r.height).rev() {
            let idx = ((vc / span(level)) % INTERIOR_FANOUT as u64) as usize;
            let child = match self.node(PageRef::unsealed(node), level)? {
                MapNode::Interior(c) => c[idx],
                MapNode::Leaf(_) => {
                    return Err(Error::Inconsistent(format!(
                        "page {node}: leaf at level {level}"
                    )))
                }
            };
            let new = if child.is_null() {
                self.new_node(level - 1)?
            } else {
                self.make_writable(child, level - 1)?
            };
            if new != child.page.0 {
                match self.nodes.get_mut(&node) {
                    Some(MapNode::Interior(c)) => c[idx] = PageRef::unsealed(new),
                    _ => {
                        return Err(Error::Inconsistent(format!(
                            "page {node} vanished from the cache"
                        )))
                    }
                }
            }
            node = new;
        }
        Ok(node)
    }

    pub fn leaf_mut(&mut self, p: u64) -> Result<&mut Vec<MapEntry>, Error> {
        match self.nodes.get_mut(&p) {
            Some(MapNode::Leaf(es)) => Ok(es),
            _ => Err(Error::Inconsistent(format!(
                "page {p} is not a cached leaf"
            ))),
        }
    }

    /// Current entry of `vc` without changing anything.
    pub fn lookup(&mut self, id: u64, vc: u64) -> Result<MapEntry, Error> {
        let r = self.root(id)?;
        let mut node = r.root;
        let mut level = r.height - 1;
        loop {
            if node.is_null() {
                return Ok(MapEntry::UNMAPPED);
            }
            match self.node(node, level)? {
                MapNode::Leaf(es) => return Ok(es[(vc % MAP_LEAF_ENTRIES as u64) as usize]),
                MapNode::Interior(c) => {
                    if level == 0 {
                        return Err(Error::Inconsistent(format!(
                            "page {}: interior at leaf level",
                            node.page
                        )));
                    }
                    node = c[((vc / span(level)) % INTERIOR_FANOUT as u64) as usize];
                    level -= 1;
                }
            }
        }
    }

    /// Mapped entries with virtual chunk in `[lo, hi)`, in order, skipping empty subtrees.
    pub fn mapped_in(&mut self, id: u64, lo: u64, hi: u64) -> Result<Vec<(u64, MapEntry)>, Error> {
        let r = self.root(id)?;
        let mut out = Vec::new();
        if !r.root.is_null() {
            self.collect(r.root, r.height - 1, 0, lo, hi, &mut out)?;
        }
        Ok(out)
    }

    fn collect(
        &mut self,
        p: PageRef,
        level: u32,
        base: u64,
        lo: u64,
        hi: u64,
        out: &mut Vec<(u64, MapEntry)>,
    ) -> Result<(), Error> {
        match self.node(p, level)?.clone() {
            MapNode::Leaf(es) => {
                for (i, e) in es.iter().enumerate() {
                    let vc = base + i as u64;
                    if e.is_mapped() && vc >= lo && vc < hi {
                        out.push((vc, *e));
                    }
                }
            }
            MapNode::Interior(c) => {
                let s = span(level);
                for (i, &child) in c.iter().enumerate() {
                    let b = base + i as u64 * s;
                    if !child.is_null() && b < hi && b.saturating_add(s) > lo {
                        self.collect(child, level - 1, b, lo, hi, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Unmaps every chunk in `[lo, hi)`; returns how many entries were mapped.
    pub fn unmap_range(&mut self, id: u64, lo: u64, hi: u64) -> Result<u64, Error> {
        let mapped = self.mapped_in(id, lo, hi)?;
        let mut n = 0;
        let mut i = 0;
        while i < mapped.len() {
            let leaf_base = mapped[i].0 / MAP_LEAF_ENTRIES as u64;
            let leaf = self.shadow_path(id, mapped[i].0)?;
            let mut dropped = Vec::new();
            {
                let es = self.leaf_mut(leaf)?;
                while i < mapped.len() && mapped[i].0 / MAP_LEAF_ENTRIES as u64 == leaf_base {
                    let slot = (mapped[i].0 % MAP_LEAF_ENTRIES as u64) as usize;
                    dropped.push(es[slot]);
                    es[slot] = MapEntry::UNMAPPED;
                    i += 1;
                }
            }
            for e in dropped {
                self.chunk_dec(e.chunk)?;
                self.chunk_dec(e.backing)?;
                n += 1;
            }
        }
        if n > 0 {
            let mut r = self.root(id)?;
            r.mapped = r.mapped.checked_sub(n).ok_or_else(|| {
                Error::Inconsistent(format!(
                    "volume id {id}: {n} chunks unmapped but only {} counted as mapped",
                    r.mapped
                ))
            })?;
            self.set_root(id, r)?;
        }
        Ok(n)
    }

    /// Grows the block map of `id` to cover `chunks` virtual chunks.
    pub fn grow_map(&mut self, id: u64, chunks: u64) -> Result<(), Error> {
        let mut r = self.root(id)?;
        let want = map_height(chunks);
        while r.height < want {
            if !r.root.is_null() {
                let p = self.new_node(r.height)?;
                if let Some(MapNode::Interior(c)) = self.nodes.get_mut(&p) {
                    c[0] = r.root;
                }
                r.root = PageRef::unsealed(p);
            }
            r.height += 1;
        }
        self.set_root(id, r)
    }

    // ---- volumes ---------------------------------------------------------------------

    pub fn vol_index(&self, id: u64) -> Option<usize> {
        self.by_id.get(&id).copied()
    }

    pub fn vol(&self, id: u64) -> Option<&CatVolume> {
        self.cat.volumes.get(self.vol_index(id)?)
    }

    pub fn vol_mut(&mut self, id: u64) -> Option<&mut CatVolume> {
        let i = self.vol_index(id)?;
        self.cat.volumes.get_mut(i)
    }

    pub fn id_of(&self, key: &str) -> Option<u64> {
        self.by_key.get(key).copied()
    }

    /// Adds a volume with an empty map of `height` levels.
    pub fn add_volume(&mut self, key: &str, size: u64, root: RootEntry) -> Result<u64, Error> {
        let id = self.cat.next_id.max(1);
        self.cat.next_id = id + 1;
        self.set_root(
            id,
            RootEntry {
                present: true,
                ..root
            },
        )?;
        self.by_id.insert(id, self.cat.volumes.len());
        self.cat.volumes.push(CatVolume {
            id,
            key: key.to_string(),
            size,
            attrs: BTreeMap::new(),
            fingerprint: None,
        });
        self.by_key.insert(key.to_string(), id);
        self.cat_dirty = true;
        Ok(id)
    }

    pub fn remove_volume(&mut self, id: u64) -> Result<(), Error> {
        let r = self.root(id)?;
        if !r.root.is_null() {
            self.page_dec(r.root, r.height - 1)?;
        }
        self.set_root(id, RootEntry::default())?;
        if let Some(i) = self.vol_index(id) {
            let v = self.cat.volumes.remove(i);
            self.by_key.remove(&v.key);
            // Removal is rare; later volumes moved down one place.
            self.by_id = index_by_id(&self.cat.volumes);
        }
        self.cat_dirty = true;
        Ok(())
    }

    pub fn snapshot(&mut self, src: u64, key: &str) -> Result<u64, Error> {
        let r = self.root(src)?;
        if !r.root.is_null() {
            self.page_inc(r.root.page.0)?;
        }
        let (size, fp) = match self.vol(src) {
            Some(v) => (v.size, v.fingerprint.clone()),
            None => {
                return Err(Error::Inconsistent(format!(
                    "volume id {src} not in the catalogue"
                )))
            }
        };
        let id = self.add_volume(key, size, r)?;
        if let Some(v) = self.vol_mut(id) {
            v.fingerprint = fp;
        }
        Ok(id)
    }

    /// Forgets a cached fingerprint because the volume's content changes.
    pub fn touch(&mut self, id: u64) {
        *self.epochs.entry(id).or_insert(0) += 1;
        if let Some(v) = self.vol_mut(id) {
            if v.fingerprint.is_some() {
                v.fingerprint = None;
                self.cat_dirty = true;
            }
        }
    }

    pub fn epoch(&self, id: u64) -> u64 {
        self.epochs.get(&id).copied().unwrap_or(0)
    }

    /// A new pool: the two superblock slots are in use forever.
    pub fn init_superblock_pages(&mut self) -> Result<(), Error> {
        self.set_meta_rc(0, 1)?;
        self.set_meta_rc(1, 1)?;
        self.meta_used = 2;
        self.cat_dirty = true;
        Ok(())
    }

    // ---- commit ----------------------------------------------------------------------

    /// Nothing staged since the last commit: no new or changed page, no catalogue change,
    /// no freed page or chunk waiting for a commit to become reusable. A commit would
    /// only rewrite the superblock.
    pub fn is_clean(&self) -> bool {
        self.fresh.is_empty()
            && self.chunks_deferred.is_empty()
            && self.freed_meta_prev.is_empty()
            && self.freed_meta_txn.is_empty()
            && self.dropped_pages.is_empty()
            && self.dropped_chunks.is_empty()
            && !self.cat_dirty
            && !self.cat_pages.is_empty()
            && self
                .trees
                .iter()
                .all(|t| t.nodes.values().all(|n| !n.dirty))
    }

    /// Reserves host space for every page the next [`Meta::commit`] can write, so a full
    /// host filesystem fails the commit here, before anything changed (the pool stays
    /// usable), rather than halfway (which poisons it). Fresh map nodes are already
    /// allocated; the catalogue and each dirty array-tree node (and its new parents) get
    /// pages during the commit.
    pub fn reserve_for_commit(&self) -> Result<(), Error> {
        let cat_bytes = if self.cat_dirty || self.cat_pages.is_empty() {
            serde_json::to_vec(&self.cat).map_or(0, |d| d.len())
        } else {
            0
        };
        let mut extra = cat_bytes.div_ceil(CATALOGUE_BYTES) as u64 + 1;
        for t in &self.trees {
            let dirty = t.nodes.values().filter(|n| n.dirty).count() as u64;
            extra += 2 * (dirty + u64::from(t.height)) + 2;
        }
        let from = self.sb.meta_hw.min(self.meta_hw);
        let to = self.meta_hw + extra;
        self.file
            .reserve(PageNo(from).offset(), (to - from) * PAGE_SIZE as u64)
            .map_err(io_err("reserving space in pool.meta"))
    }

    /// Writes every dirty page and the new superblock. The caller has synced the data
    /// file and holds off all data I/O. On error the caller must poison the pool.
    ///
    /// Pages are sealed children first, so every parent records the generation and
    /// checksum of what its children hold on disk ([`PageRef`]): the block maps (whose
    /// roots go into the roots array), then the array trees level by level, then the
    /// catalogue chain from its end; the superblock records the roots of all.
    pub fn commit(&mut self) -> Result<(), Error> {
        let gen = self.sb.generation + 1;
        let file = self.file.clone();
        // Catalogue: a fresh chain whenever it changed.
        let mut cat_writes: Vec<(u64, Vec<u8>)> = Vec::new();
        let (mut cat_first, mut cat_len) = (self.sb.catalogue, self.sb.catalogue_len);
        if self.cat_dirty || self.cat_pages.is_empty() {
            let doc = serde_json::to_vec(&self.cat)
                .map_err(|e| Error::Inconsistent(format!("catalogue: {e}")))?;
            let pieces: Vec<&[u8]> = if doc.is_empty() {
                vec![&[][..]]
            } else {
                doc.chunks(CATALOGUE_BYTES).collect()
            };
            let mut pages = Vec::with_capacity(pieces.len());
            for _ in 0..pieces.len() {
                pages.push(self.alloc_meta_page()?);
            }
            for old in std::mem::take(&mut self.cat_pages) {
                self.free_meta_page(old)?;
            }
            for (i, piece) in pieces.iter().enumerate() {
                cat_writes.push((pages[i], piece.to_vec()));
            }
            cat_len = doc.len() as u64;
            self.cat_pages = pages;
        }
        // Block maps: seal each fresh subtree from its volume root down, write it, and
        // record its root in the roots array (which dirties that array's leaves before
        // they get their pages below).
        let mut sealed: HashMap<u64, PageRef> = HashMap::new();
        let mut ids: Vec<u64> = self.fresh_roots.drain().collect();
        ids.sort_unstable();
        for id in ids {
            let hw = self.meta_hw;
            let mut r = self.trees[ROOTS].get_root(&*file, hw, id)?;
            if !r.present || !self.fresh.contains(&r.root.page.0) {
                continue;
            }
            r.root = self.seal_map(r.root.page.0, gen, &mut sealed)?;
            self.trees[ROOTS].set_root(&*file, hw, id, r)?;
        }
        if let Some(p) = self.fresh.iter().find(|p| !sealed.contains_key(p)) {
            return Err(Error::Inconsistent(format!(
                "block-map page {p} of this transaction is reachable from no volume"
            )));
        }
        // Array trees: give every dirty node its own page; that changes the metadata
        // refcounts, so repeat until nothing new needs a page.
        loop {
            let mut work = Vec::new();
            for t in 0..3 {
                for k in self.trees[t].needing_pages() {
                    work.push((t, k));
                }
            }
            if work.is_empty() {
                break;
            }
            for (t, (level, idx)) in work {
                let new = self.alloc_meta_page()?;
                let old = {
                    let n = self.trees[t]
                        .nodes
                        .get_mut(&(level, idx))
                        .expect("listed node");
                    let old = n.page;
                    n.page = new;
                    n.fresh = true;
                    old
                };
                if old != 0 {
                    self.free_meta_page(old)?;
                }
                let tree_height = self.trees[t].height;
                if level + 1 >= tree_height {
                    self.trees[t].root = PageRef::unsealed(new);
                } else {
                    let hw = self.meta_hw;
                    let parent = self.trees[t].load(
                        &*self.file,
                        hw,
                        level + 1,
                        idx / INTERIOR_FANOUT as u64,
                    )?;
                    if let Body::Interior(c) = &mut parent.body {
                        c[(idx % INTERIOR_FANOUT as u64) as usize] = PageRef::unsealed(new);
                    }
                    parent.dirty = true;
                }
            }
        }
        for t in 0..3 {
            self.trees[t].write_dirty(&*file, gen)?;
        }
        let mut next = PageRef::NULL;
        for (p, bytes) in cat_writes.iter().rev() {
            let buf = pack_catalogue(PageNo(*p), gen, next, bytes);
            file.write_at(&buf[..], PageNo(*p).offset())
                .map_err(io_err("writing a catalogue page"))?;
            next = PageRef::of(&buf);
        }
        if !cat_writes.is_empty() {
            cat_first = next;
        }
        file.sync().map_err(io_err("syncing pool.meta"))?;
        let sb = Superblock {
            generation: gen,
            chunk_size: self.geo.chunk_size,
            data_chunks: self.geo.data_chunks,
            meta_hw: self.meta_hw,
            data_hw: self.data_hw,
            data_used: self.data_used,
            meta_used: self.meta_used,
            meta_rc: self.trees[META_RC].tree_root(),
            data_rc: self.trees[DATA_RC].tree_root(),
            roots: self.trees[ROOTS].tree_root(),
            catalogue: cat_first,
            catalogue_len: cat_len,
            needs_check: false,
        };
        let slot = PageNo(sb.generation % 2);
        file.write_at(&sb.pack(slot)[..], slot.offset())
            .map_err(io_err("writing the superblock"))?;
        file.sync().map_err(io_err("syncing the superblock"))?;
        // Durable: release what the previous commits freed.
        self.sb = sb;
        self.older_rc = None;
        self.fresh.clear();
        self.dropped_pages.clear();
        self.dropped_chunks.clear();
        let released = std::mem::take(&mut self.freed_meta_prev);
        if self.pins > 0 {
            self.held_meta.extend(released);
        } else {
            self.release_meta(released);
        }
        self.freed_meta_prev = std::mem::take(&mut self.freed_meta_txn);
        self.freed_chunks_committed = self.chunks_deferred.iter().copied().collect();
        self.free_chunks.extend(self.chunks_deferred.drain());
        for t in &mut self.trees {
            t.finish_commit();
        }
        self.cat_dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::FaultyFile;

    fn empty_meta(chunks: u64) -> Meta {
        let file: Arc<dyn BlockFile> = Arc::new(FaultyFile::new());
        let sb = Superblock {
            generation: 0,
            chunk_size: 4096,
            data_chunks: chunks,
            meta_hw: 2,
            data_hw: 0,
            data_used: 0,
            meta_used: 0,
            meta_rc: TreeRoot {
                page: PageRef::NULL,
                height: 1,
            },
            data_rc: TreeRoot {
                page: PageRef::NULL,
                height: 1,
            },
            roots: TreeRoot {
                page: PageRef::NULL,
                height: 1,
            },
            catalogue: PageRef::NULL,
            catalogue_len: 0,
            needs_check: false,
        };
        let mut m = Meta::new(file, sb, CatalogueDoc::default(), Vec::new());
        m.init_superblock_pages().unwrap();
        m
    }

    /// A cache far smaller than the tree: lookups stay right, the cache stays bounded,
    /// and the interior nodes every lookup walks are not thrown out with the leaves.
    #[test]
    fn node_cache_evicts_leaves_and_keeps_interiors() {
        let mut m = empty_meta(100_000);
        let vcs = 168 * 40;
        let id = m
            .add_volume(
                "v",
                0,
                RootEntry {
                    height: map_height(vcs),
                    ..Default::default()
                },
            )
            .unwrap();
        let mut want = Vec::new();
        for vc in (0..vcs).step_by(7) {
            let leaf = m.shadow_path(id, vc).unwrap();
            let (c, _) = m.alloc_chunk().unwrap();
            m.leaf_mut(leaf).unwrap()[(vc % 168) as usize] = MapEntry {
                chunk: c,
                ..Default::default()
            };
            want.push((vc, c));
        }
        m.commit().unwrap();
        assert!(m.fresh.is_empty());
        m.nodes.clear();
        m.node_cache_limit = 16;
        let root = m.root(id).unwrap().root.page.0;
        for round in 0..3 {
            for &(vc, c) in want.iter().rev() {
                let e = m.lookup(id, vc).unwrap();
                assert_eq!(e.chunk, c, "round {round}, vc {vc}");
                assert!(m.nodes.len() <= 16, "cache grew to {}", m.nodes.len());
            }
            assert!(m.nodes.contains_key(&root), "the root node was evicted");
        }
    }

    /// Counters that disagree with the maps report `Inconsistent` instead of wrapping
    /// (release builds without overflow checks) or panicking (with them).
    #[test]
    fn counter_underflow_is_inconsistent() {
        let mut m = empty_meta(1000);
        let a = m
            .add_volume(
                "a",
                0,
                RootEntry {
                    height: 1,
                    ..Default::default()
                },
            )
            .unwrap();
        let leaf = m.shadow_path(a, 3).unwrap();
        let (c, _) = m.alloc_chunk().unwrap();
        m.leaf_mut(leaf).unwrap()[3] = MapEntry {
            chunk: c,
            ..Default::default()
        };
        // The root says nothing is mapped: unmapping the chunk must not wrap `mapped`.
        let r = m.unmap_range(a, 0, 10);
        assert!(matches!(r, Err(Error::Inconsistent(_))), "{r:?}");

        let (c, _) = m.alloc_chunk().unwrap();
        m.data_used = 0;
        let r = m.chunk_dec(c);
        assert!(matches!(r, Err(Error::Inconsistent(_))), "{r:?}");

        let p = m.alloc_meta_page().unwrap();
        m.meta_used = 0;
        let r = m.free_meta_page(p);
        assert!(matches!(r, Err(Error::Inconsistent(_))), "{r:?}");
    }

    #[test]
    fn heights() {
        assert_eq!(map_height(0), 1);
        assert_eq!(map_height(168), 1);
        assert_eq!(map_height(169), 2);
        assert_eq!(map_height(168 * 168), 2);
        assert_eq!(map_height(168 * 168 + 1), 3);
    }

    #[test]
    fn radix_map_set_lookup_unmap_across_commits() {
        let mut m = empty_meta(100_000);
        let id = m
            .add_volume(
                "v",
                0,
                RootEntry {
                    height: map_height(200_000),
                    ..Default::default()
                },
            )
            .unwrap();
        let vcs = [0u64, 1, 167, 168, 5000, 28_223, 28_224, 199_999];
        for (i, &vc) in vcs.iter().enumerate() {
            let leaf = m.shadow_path(id, vc).unwrap();
            let (c, _) = m.alloc_chunk().unwrap();
            m.leaf_mut(leaf).unwrap()[(vc % 168) as usize] = MapEntry {
                chunk: c,
                ..Default::default()
            };
            assert_eq!(c.0, i as u64 + 1);
        }
        let mut r = m.root(id).unwrap();
        r.mapped = vcs.len() as u64;
        m.set_root(id, r).unwrap();
        m.commit().unwrap();
        for (i, &vc) in vcs.iter().enumerate() {
            assert_eq!(m.lookup(id, vc).unwrap().chunk, Chunk(i as u64 + 1));
        }
        assert_eq!(m.lookup(id, 2).unwrap(), MapEntry::UNMAPPED);
        let got: Vec<u64> = m
            .mapped_in(id, 1, 28_224)
            .unwrap()
            .iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(got, vec![1, 167, 168, 5000, 28_223]);
        // Snapshot, then unmapping in the origin leaves the snapshot intact.
        let snap = m.snapshot(id, "s").unwrap();
        assert_eq!(m.unmap_range(id, 0, 200_000).unwrap(), vcs.len() as u64);
        assert_eq!(m.lookup(id, 5000).unwrap(), MapEntry::UNMAPPED);
        assert_eq!(m.lookup(snap, 5000).unwrap().chunk, Chunk(5));
        assert_eq!(m.root(snap).unwrap().mapped, vcs.len() as u64);
        m.commit().unwrap();
        assert_eq!(m.lookup(snap, 199_999).unwrap().chunk, Chunk(8));
    }

    #[test]
    fn refcounts_follow_sharing_and_free() {
        let mut m = empty_meta(1000);
        let a = m
            .add_volume(
                "a",
                0,
                RootEntry {
                    height: 2,
                    ..Default::default()
                },
            )
            .unwrap();
        let leaf = m.shadow_path(a, 200).unwrap();
        let (c, _) = m.alloc_chunk().unwrap();
        m.leaf_mut(leaf).unwrap()[200 % 168] = MapEntry {
            chunk: c,
            ..Default::default()
        };
        let mut r = m.root(a).unwrap();
        r.mapped = 1;
        m.set_root(a, r).unwrap();
        m.commit().unwrap();
        let b = m.snapshot(a, "b").unwrap();
        let root = m.root(a).unwrap().root.page.0;
        assert_eq!(m.meta_rc(root).unwrap(), 2);
        // Writing a's path shadows root and leaf; the chunk becomes shared by two leaves.
        let leaf_a = m.shadow_path(a, 200).unwrap();
        assert_ne!(leaf_a, leaf);
        assert_eq!(m.data_rc(c.0).unwrap(), 2);
        assert_eq!(m.lookup(b, 200).unwrap().chunk, c);
        m.remove_volume(b).unwrap();
        assert_eq!(m.data_rc(c.0).unwrap(), 1);
        assert!(
            m.dropped_chunks.contains(&c.0),
            "chunk shared at the last commit must not be written in place"
        );
        m.remove_volume(a).unwrap();
        assert_eq!(m.data_rc(c.0).unwrap(), 0);
        assert_eq!(m.data_used, 0);
        // Freed in this transaction: not reusable before the commit.
        let (c2, _) = m.alloc_chunk().unwrap();
        assert_ne!(c2, c);
        m.commit().unwrap();
        let (c3, reused) = m.alloc_chunk().unwrap();
        assert_eq!((c3, reused), (c, true));
    }

    #[test]
    fn nospace_when_all_chunks_are_taken_or_deferred() {
        let mut m = empty_meta(3);
        let cs: Vec<Chunk> = (0..3).map(|_| m.alloc_chunk().unwrap().0).collect();
        assert!(matches!(m.alloc_chunk(), Err(Error::NoSpace)));
        m.chunk_dec(cs[0]).unwrap();
        assert!(matches!(m.alloc_chunk(), Err(Error::NoSpace)));
        m.commit().unwrap();
        assert_eq!(m.alloc_chunk().unwrap().0, cs[0]);
    }
}
