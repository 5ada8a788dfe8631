//! An open volume as a [`BlockDevice`].

use super::plan::vcs_busy;
use super::*;

// ---- volumes ---------------------------------------------------------------------------

/// An open volume: a [`BlockDevice`] that follows renames (it names the volume by id).
pub struct ThinVolume {
    pub(super) pool: Arc<ThinPool>,
    pub(super) id: u64,
    pub(super) name: String,
    pub(super) read_only: bool,
}

impl Drop for ThinVolume {
    fn drop(&mut self) {
        crate::pool::bookkeeping::release_handle(&mut self.pool.state.lock().handles, self.id);
    }
}

impl ThinVolume {
    pub(super) fn err(
        &self,
        kind: BlockErrorKind,
        op: &'static str,
        offset: u64,
        length: u64,
        detail: impl Into<String>,
    ) -> BlockError {
        BlockError::new(kind, op, &self.name, offset, length, detail)
    }

    pub(super) fn check(
        &self,
        op: &'static str,
        offset: u64,
        length: u64,
        write: bool,
    ) -> Result<u64, BlockError> {
        if write && self.read_only {
            return Err(self.err(
                BlockErrorKind::ReadOnly,
                op,
                offset,
                length,
                "read-only handle",
            ));
        }
        let size = self
            .pool
            .volume_size(self.id)
            .map_err(|k| self.err(k, op, offset, length, "volume is gone"))?;
        if offset.checked_add(length).is_none_or(|e| e > size) {
            return Err(self.err(
                BlockErrorKind::OutOfRange,
                op,
                offset,
                length,
                format!("volume size is {size}"),
            ));
        }
        Ok(size)
    }

    pub(super) fn map_err(
        &self,
        op: &'static str,
        offset: u64,
        length: u64,
    ) -> impl Fn(Error) -> BlockError + '_ {
        move |e| {
            let hint = match &e {
                Error::Format(FormatError::Stale { .. }) => {
                    "; `qubes-ctl pool verify` lists every volume the lost write damaged"
                }
                _ => "",
            };
            self.err(e.kind(), op, offset, length, format!("{e}{hint}"))
        }
    }

    /// Whole chunks inside `[off, off+len)`; the volume's last partial chunk counts as
    /// whole when the range reaches the end.
    pub(super) fn whole_chunks(&self, off: u64, len: u64, size: u64) -> (u64, u64) {
        let cs = self.pool.geo.chunk_size;
        let end = off + len;
        let hi = if end == size {
            end.div_ceil(cs)
        } else {
            end / cs
        };
        (off.div_ceil(cs), hi)
    }

    /// Runs a data operation under the shared gate. Chunks freed since the last commit
    /// become reusable only at the next one, so a guest that overwrites and discards
    /// without flushing can find the pool "full" while half of it waits for a commit:
    /// then commit (whole-pool, after any staged volume-model transaction, as a guest
    /// FLUSH would) and try once more, as dm-thin's `alloc_data_block` does.
    pub(super) fn reclaiming_on_nospace<T>(
        &self,
        op: &'static str,
        offset: u64,
        length: u64,
        f: impl Fn() -> Result<T, BlockError>,
    ) -> Result<T, BlockError> {
        let first = {
            let _g = self.pool.gate.read();
            f()
        };
        match first {
            Err(e) if e.kind == BlockErrorKind::NoSpace && self.pool.has_deferred_chunks() => {
                self.pool.commit().map_err(|c| {
                    self.err(commit_err_kind(&c), op, offset, length, c.to_string())
                })?;
                let _g = self.pool.gate.read();
                f()
            }
            r => r,
        }
    }

    pub(super) fn write_zeroes_gated(
        &self,
        offset: u64,
        length: u64,
        may_unmap: bool,
    ) -> Result<(), BlockError> {
        let size = self.check("write_zeroes", offset, length, true)?;
        if !may_unmap {
            return self.zero_fill("write_zeroes", offset, length, false);
        }
        let cs = self.pool.geo.chunk_size;
        let (lo, hi) = self.unmap("write_zeroes", offset, length, size)?;
        let end = offset + length;
        if lo >= hi {
            return self.zero_fill("write_zeroes", offset, length, true);
        }
        if offset < lo * cs {
            self.zero_fill("write_zeroes", offset, lo * cs - offset, true)?;
        }
        if hi * cs < end {
            self.zero_fill("write_zeroes", hi * cs, end - hi * cs, true)?;
        }
        Ok(())
    }

    pub(super) fn unmap(
        &self,
        op: &'static str,
        off: u64,
        len: u64,
        size: u64,
    ) -> Result<(u64, u64), BlockError> {
        let (lo, hi) = self.whole_chunks(off, len, size);
        if lo < hi {
            let id = self.id;
            // A write in flight installs its mapping when its data is on disk: let it
            // finish first, or its install would resurrect what this unmaps.
            self.pool
                .plan(|m| {
                    if vcs_busy(m, id, lo, hi) {
                        return Ok(None);
                    }
                    let n = self.pool.mutate(m, |m| m.unmap_range(id, lo, hi))?;
                    if n > 0 {
                        m.touch(id);
                    }
                    Ok(Some(()))
                })
                .map_err(self.map_err(op, off, len))?;
        }
        Ok((lo, hi))
    }

    pub(super) fn zero_fill(
        &self,
        op: &'static str,
        off: u64,
        len: u64,
        only_mapped: bool,
    ) -> Result<(), BlockError> {
        let cs = self.pool.geo.chunk_size;
        let piece = (4 << 20).max(cs);
        let zeros = vec![0u8; piece.min(len) as usize];
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(piece);
            if only_mapped {
                let mut m = self
                    .pool
                    .lock()
                    .map_err(|e| self.err(BlockErrorKind::Io, op, off, len, e.to_string()))?;
                let mapped = m
                    .mapped_in(self.id, pos / cs, (pos + n).div_ceil(cs))
                    .map_err(self.map_err(op, off, len))?;
                if mapped.is_empty() {
                    pos += n;
                    continue;
                }
            }
            self.pool
                .write_locked(self.id, &zeros[..n as usize], pos)
                .map_err(self.map_err(op, off, len))?;
            pos += n;
        }
        Ok(())
    }
}

impl BlockDevice for ThinVolume {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.pool.volume_size(self.id).unwrap_or(0)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        let _g = self.pool.gate.read();
        self.check("read", offset, buf.len() as u64, false)?;
        let len = buf.len() as u64;
        self.pool
            .read_locked(self.id, buf, offset)
            .map_err(self.map_err("read", offset, len))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        self.reclaiming_on_nospace("write", offset, buf.len() as u64, || {
            self.check("write", offset, buf.len() as u64, true)?;
            self.pool
                .write_locked(self.id, buf, offset)
                .map_err(self.map_err("write", offset, buf.len() as u64))
        })
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.pool
            .commit()
            .map_err(|e| self.err(commit_err_kind(&e), "flush", 0, 0, e.to_string()))
    }

    fn discard(&self, offset: u64, length: u64) -> Result<(), BlockError> {
        let _g = self.pool.gate.read();
        let size = self.check("discard", offset, length, true)?;
        self.unmap("discard", offset, length, size).map(|_| ())
    }

    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.reclaiming_on_nospace("write_zeroes", offset, length, || {
            self.write_zeroes_gated(offset, length, may_unmap)
        })
    }

    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>, BlockError> {
        let _g = self.pool.gate.read();
        self.check("block_status", offset, length, false)?;
        if length == 0 {
            return Ok(Vec::new());
        }
        let cs = self.pool.geo.chunk_size;
        // Look at no more than 64 Ki chunks per call; NBD lets replies stop early.
        let end = (offset + length).min((offset / cs + 65536) * cs);
        let (lo, hi) = (offset / cs, end.div_ceil(cs));
        let mapped = {
            let mut m = self.pool.lock().map_err(|e| {
                self.err(
                    BlockErrorKind::Io,
                    "block_status",
                    offset,
                    length,
                    e.to_string(),
                )
            })?;
            m.mapped_in(self.id, lo, hi)
                .map_err(self.map_err("block_status", offset, length))?
        };
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |start: u64, stop: u64, hole: bool| {
            let (s, t) = (start.max(offset), stop.min(end));
            if s >= t {
                return;
            }
            if let Some(last) = out.last_mut() {
                if last.hole == hole && last.offset + last.length == s {
                    last.length += t - s;
                    return;
                }
            }
            out.push(Extent {
                offset: s,
                length: t - s,
                hole,
                zero: hole,
            });
        };
        let mut vc = lo;
        for (c, _) in mapped {
            push(vc * cs, c * cs, true);
            push(c * cs, (c + 1) * cs, false);
            vc = c + 1;
        }
        push(vc * cs, hi * cs, true);
        Ok(out)
    }
}
