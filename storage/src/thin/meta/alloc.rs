//! Refcounts of metadata pages and data chunks, and the page and chunk allocators
//! (deferred reuse, pinned commits).

use super::*;

impl Meta {
    // ---- refcounts -------------------------------------------------------------------

    pub fn meta_rc(&mut self, p: u64) -> Result<u32, Error> {
        let hw = self.meta_hw;
        self.trees[META_RC].get_rc(&*self.file, hw, p)
    }
    pub(super) fn set_meta_rc(&mut self, p: u64, v: u32) -> Result<(), Error> {
        let hw = self.meta_hw;
        self.trees[META_RC].set_rc(&*self.file, hw, p, v)
    }
    pub fn data_rc(&mut self, c: Chunk) -> Result<u32, Error> {
        let hw = self.meta_hw;
        self.trees[DATA_RC].get_rc(&*self.file, hw, c.0)
    }
    pub(super) fn set_data_rc(&mut self, c: Chunk, v: u32) -> Result<(), Error> {
        let hw = self.meta_hw;
        self.trees[DATA_RC].set_rc(&*self.file, hw, c.0, v)
    }

    pub fn chunk_inc(&mut self, c: Chunk) -> Result<(), Error> {
        if c.is_none() {
            return Ok(());
        }
        let rc = self.data_rc(c)?;
        if rc == 0 {
            return Err(Error::Inconsistent(format!(
                "data chunk {c} is referenced but has refcount 0"
            )));
        }
        let rc = rc
            .checked_add(1)
            .ok_or_else(|| Error::Inconsistent(format!("data chunk {c}: refcount overflow")))?;
        self.set_data_rc(c, rc)
    }

    pub fn chunk_dec(&mut self, c: Chunk) -> Result<(), Error> {
        if c.is_none() {
            return Ok(());
        }
        let rc = self.data_rc(c)?;
        if rc == 0 {
            return Err(Error::Inconsistent(format!(
                "data chunk {c}: refcount underflow"
            )));
        }
        self.set_data_rc(c, rc - 1)?;
        self.dropped_chunks.insert(c);
        if rc == 1 {
            self.data_used = self.data_used.checked_sub(1).ok_or_else(|| {
                Error::Inconsistent(format!("data chunk {c} freed with no data chunk in use"))
            })?;
            self.chunks_deferred.insert(c);
        }
        Ok(())
    }

    pub(super) fn page_inc(&mut self, p: u64) -> Result<(), Error> {
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

    pub(super) fn free_meta_page(&mut self, p: u64) -> Result<(), Error> {
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

    pub(super) fn release_meta(&mut self, pages: Vec<u64>) {
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
                        && !self.chunks_deferred.contains(&Chunk(q))
                    {
                        self.free_chunks.insert(Chunk(q));
                    }
                }
                self.data_scan = end;
                continue;
            }
            if self.data_hw < self.geo.data_chunks {
                self.data_hw += 1;
                break (Chunk(self.data_hw), false);
            }
            return Err(Error::NoSpace);
        };
        self.set_data_rc(c, 1)?;
        self.data_used += 1;
        Ok((c, reused))
    }
}
