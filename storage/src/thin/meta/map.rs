//! The block maps: the node cache, shadowing (copy-on-write with lazy refcounts),
//! lookups, unmapping, growth, and sealing fresh nodes at commit.

use super::*;

impl Meta {
    // ---- block-map nodes -------------------------------------------------------------

    /// Seals fresh block-map page `p` and the fresh pages below it (children first, so
    /// each records its children's pointers), writes them, and returns the pointer to
    /// `p`. A fresh page shared by several parents is sealed once (`sealed`).
    pub(super) fn seal_map(
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
            .write_at(&buf[..], PageNo(p).file_offset()?)
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
    pub(super) fn evict_clean_nodes(&mut self) {
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

    pub(super) fn new_node(&mut self, level: u32) -> Result<u64, Error> {
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
    pub(super) fn make_writable(&mut self, r: PageRef, level: u32) -> Result<u64, Error> {
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
                        .extend(es.iter().filter(|e| e.is_mapped()).map(|e| e.chunk)),
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
    pub fn shadow_path(&mut self, id: u64, vc: u64) -> Result<PageNo, Error> {
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
        Ok(PageNo(node))
    }

    pub fn leaf_mut(&mut self, p: PageNo) -> Result<&mut Vec<MapEntry>, Error> {
        match self.nodes.get_mut(&p.0) {
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

    pub(super) fn collect(
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
}
