//! The commit: space reservation, sealing every dirty page children first, the
//! superblock, and what becomes reusable once it is durable.

use super::*;

impl Meta {
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
        let to = PageNo(self.meta_hw.saturating_add(extra));
        // `to` past the largest file offset fails here, before anything is written.
        let (start, end) = (PageNo(from).file_offset()?, to.file_offset()?);
        self.file
            .reserve(start, end - start)
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
            file.write_at(&buf[..], PageNo(*p).file_offset()?)
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
        file.write_at(&sb.pack(slot)[..], slot.file_offset()?)
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
