//! The copy-on-write radix trees of fixed-size records the superblock owns alone: the
//! metadata and data refcount arrays and the volume roots array.

use super::*;

#[derive(Clone, Debug)]
pub(crate) enum Body {
    Interior(Vec<PageRef>),
    Rc(Vec<u32>),
    Roots(Vec<RootEntry>),
}

pub(crate) struct ANode {
    pub(super) page: u64,
    pub(super) fresh: bool,
    pub(super) dirty: bool,
    pub(super) body: Body,
}

/// A copy-on-write radix tree of fixed-size records (refcounts or volume roots), owned
/// by the superblock alone (never shared), so its pages always have refcount 1.
pub(crate) struct ArrayTree {
    pub interior: PageKind,
    pub leaf: PageKind,
    pub per_leaf: u64,
    pub root: PageRef,
    pub height: u32,
    pub(super) nodes: HashMap<(u32, u64), ANode>,
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

    pub(super) fn cap(&self, height: u32) -> u64 {
        let mut c = self.per_leaf;
        for _ in 1..height {
            c = c.saturating_mul(INTERIOR_FANOUT as u64);
        }
        c
    }

    pub(super) fn zero_body(&self, level: u32) -> Body {
        if level > 0 {
            Body::Interior(vec![PageRef::NULL; INTERIOR_FANOUT])
        } else if self.leaf == PageKind::RootsLeaf {
            Body::Roots(vec![RootEntry::default(); ROOTS_LEAF_ENTRIES])
        } else {
            Body::Rc(vec![0; RC_LEAF_ENTRIES])
        }
    }

    pub(super) fn grow_to(&mut self, idx: u64) {
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

    pub(super) fn load(
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
    pub(super) fn needing_pages(&self) -> Vec<(u32, u64)> {
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
    pub(super) fn write_dirty(&mut self, file: &dyn BlockFile, gen: u64) -> Result<(), Error> {
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
            file.write_at(&buf[..], page.file_offset()?)
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

    pub(super) fn finish_commit(&mut self) {
        for n in self.nodes.values_mut() {
            n.dirty = false;
            n.fresh = false;
        }
    }
}
