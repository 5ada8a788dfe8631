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

mod alloc;
mod array;
mod commit;
mod map;

pub(crate) use array::ArrayTree;
use array::Body;

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
    file.read_at(&mut buf[..], page.file_offset()?)
        .map_err(|e| {
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
    free_chunks: BTreeSet<Chunk>,
    chunks_deferred: HashSet<Chunk>,
    data_scan: u64,
    data_hw_open: u64,
    pub dropped_pages: HashSet<u64>,
    pub dropped_chunks: HashSet<Chunk>,
    /// Chunks with data I/O in flight that readers and writers must not touch yet.
    pub inflight: HashSet<Chunk>,
    /// (volume id, virtual chunk) with a write in flight whose mapping is installed only
    /// once its data is on disk: other writers and unmaps of the same chunk wait.
    pub inflight_vcs: HashSet<(u64, u64)>,
    /// Chunks the last commit made free: the pool hole-punches them to give their
    /// space back to the host filesystem.
    pub freed_chunks_committed: Vec<Chunk>,
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
        let r = slot
            .file_offset()
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|off| self.file.write_at(&sb.pack(slot)[..], off))
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
        assert_eq!(m.data_rc(c).unwrap(), 2);
        assert_eq!(m.lookup(b, 200).unwrap().chunk, c);
        m.remove_volume(b).unwrap();
        assert_eq!(m.data_rc(c).unwrap(), 1);
        assert!(
            m.dropped_chunks.contains(&c),
            "chunk shared at the last commit must not be written in place"
        );
        m.remove_volume(a).unwrap();
        assert_eq!(m.data_rc(c).unwrap(), 0);
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
