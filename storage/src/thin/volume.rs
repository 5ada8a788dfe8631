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

    /// Checks a request at the `BlockDevice` boundary, where offsets are plain `u64`:
    /// returns the request's start and end, typed, and the volume's size. A range that
    /// passes the end (or `u64::MAX`) is `OutOfRange`.
    pub(super) fn check(
        &self,
        op: &'static str,
        offset: u64,
        length: u64,
        write: bool,
    ) -> Result<(VolOffset, VolOffset, u64), BlockError> {
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
        let off = VolOffset::new(offset);
        match off.checked_add(length) {
            Some(end) if end.raw() <= size => Ok((off, end, size)),
            _ => Err(self.err(
                BlockErrorKind::OutOfRange,
                op,
                offset,
                length,
                format!("volume size is {size}"),
            )),
        }
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
    /// whole when the range reaches the end. The range is one `check` accepted.
    pub(super) fn whole_chunks(&self, off: VolOffset, len: u64, size: u64) -> (u64, u64) {
        let geo = self.pool.geo;
        let (first, within) = geo.locate(off);
        let lo = first + u64::from(within != 0);
        let Some(end) = off.checked_add(len) else {
            return (lo, lo);
        };
        let (last, within) = geo.locate(end);
        let hi = last + u64::from(end.raw() == size && within != 0);
        (lo, hi)
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
        let (off, end, size) = self.check("write_zeroes", offset, length, true)?;
        if !may_unmap {
            return self.zero_fill("write_zeroes", off, length, false);
        }
        let geo = self.pool.geo;
        let (lo, hi) = self.unmap("write_zeroes", off, length, size)?;
        if lo >= hi {
            return self.zero_fill("write_zeroes", off, length, true);
        }
        // The first whole chunk starts inside the range.
        let head_end = geo.vol_offset(lo, 0).unwrap_or(end).min(end);
        if let Some(n) = head_end.checked_offset_from(off).filter(|n| *n > 0) {
            self.zero_fill("write_zeroes", off, n, true)?;
        }
        // The last unmapped chunk may end past u64::MAX (the volume's partial last
        // chunk): then nothing follows it.
        if let Some(tail) = geo.vol_offset(hi, 0).filter(|t| *t < end) {
            let n = end.checked_offset_from(tail).unwrap_or(0);
            self.zero_fill("write_zeroes", tail, n, true)?;
        }
        Ok(())
    }

    pub(super) fn unmap(
        &self,
        op: &'static str,
        off: VolOffset,
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
                    if vcs_busy(m, id, lo..hi) {
                        return Ok(None);
                    }
                    let n = self.pool.mutate(m, |m| m.unmap_range(id, lo, hi))?;
                    if n > 0 {
                        m.touch(id);
                    }
                    Ok(Some(()))
                })
                .map_err(self.map_err(op, off.raw(), len))?;
        }
        Ok((lo, hi))
    }

    pub(super) fn zero_fill(
        &self,
        op: &'static str,
        off: VolOffset,
        len: u64,
        only_mapped: bool,
    ) -> Result<(), BlockError> {
        let geo = self.pool.geo;
        let piece = (4 << 20).max(geo.chunk_size);
        let zeros = vec![0u8; piece.min(len) as usize];
        let out_of_range = || {
            self.err(
                BlockErrorKind::OutOfRange,
                op,
                off.raw(),
                len,
                "range passes the largest offset",
            )
        };
        let end = off.checked_add(len).ok_or_else(out_of_range)?;
        let mut pos = off;
        while let Some(left) = end.checked_offset_from(pos).filter(|n| *n > 0) {
            let n = left.min(piece);
            let next = pos.checked_add(n).ok_or_else(out_of_range)?;
            if only_mapped {
                let mut m = self
                    .pool
                    .lock()
                    .map_err(|e| self.err(BlockErrorKind::Io, op, off.raw(), len, e.to_string()))?;
                let (lo, _) = geo.locate(pos);
                let (last, within) = geo.locate(next);
                let hi = last + u64::from(within != 0);
                let mapped =
                    m.mapped_in(self.id, lo, hi)
                        .map_err(self.map_err(op, off.raw(), len))?;
                if mapped.is_empty() {
                    pos = next;
                    continue;
                }
            }
            self.pool
                .write_locked(self.id, &zeros[..n as usize], pos)
                .map_err(self.map_err(op, off.raw(), len))?;
            pos = next;
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
        let (off, _, _) = self.check("read", offset, buf.len() as u64, false)?;
        let len = buf.len() as u64;
        self.pool
            .read_locked(self.id, buf, off)
            .map_err(self.map_err("read", offset, len))
    }

    fn read_into(&self, dst: &dyn ReadTarget, offset: u64) -> Result<(), BlockError> {
        let _g = self.pool.gate.read();
        let len = dst.len() as u64;
        let (off, _, _) = self.check("read", offset, len, false)?;
        self.pool
            .read_locked_into(self.id, dst, off)
            .map_err(self.map_err("read", offset, len))
    }

    fn reads_in_place(&self) -> bool {
        true
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        self.reclaiming_on_nospace("write", offset, buf.len() as u64, || {
            let (off, _, _) = self.check("write", offset, buf.len() as u64, true)?;
            self.pool
                .write_locked(self.id, buf, off)
                .map_err(self.map_err("write", offset, buf.len() as u64))
        })
    }

    fn write_from(&self, src: &dyn WriteSource, offset: u64) -> Result<(), BlockError> {
        let len = src.len() as u64;
        self.reclaiming_on_nospace("write", offset, len, || {
            let (off, _, _) = self.check("write", offset, len, true)?;
            self.pool
                .write_locked_from(self.id, src, off)
                .map_err(self.map_err("write", offset, len))
        })
    }

    fn writes_in_place(&self) -> bool {
        true
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.pool
            .commit()
            .map_err(|e| self.err(commit_err_kind(&e), "flush", 0, 0, e.to_string()))
    }

    fn discard(&self, offset: u64, length: u64) -> Result<(), BlockError> {
        let _g = self.pool.gate.read();
        let (off, _, size) = self.check("discard", offset, length, true)?;
        self.unmap("discard", off, length, size).map(|_| ())
    }

    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.reclaiming_on_nospace("write_zeroes", offset, length, || {
            self.write_zeroes_gated(offset, length, may_unmap)
        })
    }

    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>, BlockError> {
        let _g = self.pool.gate.read();
        let (off, end, _) = self.check("block_status", offset, length, false)?;
        if length == 0 {
            return Ok(Vec::new());
        }
        let geo = self.pool.geo;
        // Look at no more than 64 Ki chunks per call; NBD lets replies stop early.
        let lo = geo.locate(off).0;
        let end = geo
            .vol_offset(lo.saturating_add(65536), 0)
            .map_or(end, |cap| cap.min(end));
        let (last, within) = geo.locate(end);
        let hi = last + u64::from(within != 0);
        // A chunk's start, or `end` if that is further (or past u64::MAX).
        let start_of = |vc: u64| {
            geo.vol_offset(vc, 0)
                .map_or(end.raw(), |o| o.raw().min(end.raw()))
        };
        let end = end.raw();
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
            push(start_of(vc), start_of(c), true);
            push(start_of(c), start_of(c + 1), false);
            vc = c + 1;
        }
        push(start_of(vc), start_of(hi), true);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(dir: &Path) -> Arc<ThinPool> {
        ThinPool::create(
            dir,
            ThinOptions {
                chunk_size: 64 << 10,
                capacity: 4 << 20,
            },
        )
        .unwrap()
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(13) ^ seed | 1)
            .collect()
    }

    /// A volume as large as a `u64` can say: its last chunk ends past `u64::MAX`, so
    /// every `chunk * chunk_size` and `div_ceil * chunk_size` on its tail wraps. Each
    /// operation at its end panicked with overflow checks on the old code (and computed
    /// a wrapped offset without them).
    #[test]
    fn volume_ending_at_u64_max() {
        let dir = tempfile::tempdir().unwrap();
        let p = pool(dir.path());
        p.create_volume("top", u64::MAX).unwrap();
        let v = p.open_volume("top", false).unwrap();
        let cs = 64u64 << 10;
        let last = u64::MAX / cs * cs; // start of the partial last chunk
        let at = u64::MAX - 8191;
        let d1 = pattern(1, 8191);
        v.write_at(&d1, at).unwrap();
        let mut buf = vec![0u8; 8191];
        v.read_at(&mut buf, at).unwrap();
        assert!(buf == d1);

        // Copy-on-write of a sub-block with an overlay, at the top.
        p.snapshot("top", "snap").unwrap();
        let d2 = pattern(2, 100);
        v.write_at(&d2, at + 10).unwrap();
        let s = p.open_volume("snap", false).unwrap();
        s.read_at(&mut buf, at).unwrap();
        assert!(buf == d1, "the snapshot keeps the old bytes");
        v.read_at(&mut buf, at).unwrap();
        let mut want = d1.clone();
        want[10..110].copy_from_slice(&d2);
        assert!(buf == want);

        let ext = v.block_status(at, 8191).unwrap();
        assert_eq!(ext.len(), 1, "{ext:?}");
        assert_eq!(
            (ext[0].offset, ext[0].length, ext[0].hole),
            (at, 8191, false)
        );
        let ext = v.block_status(last - 3 * cs, 3 * cs + 4096).unwrap();
        assert_eq!(ext.len(), 2, "{ext:?}");
        assert_eq!(
            (ext[0].offset, ext[0].length, ext[0].hole),
            (last - 3 * cs, 3 * cs, true)
        );
        assert_eq!(
            (ext[1].offset, ext[1].length, ext[1].hole),
            (last, 4096, false)
        );

        // Past the end: refused at the boundary, not wrapped.
        for (off, len) in [(u64::MAX - 1, 2), (u64::MAX, 1), (at, u64::MAX)] {
            let mut b = vec![0u8; len.min(4) as usize];
            if len <= 4 {
                let e = v.read_at(&mut b, off).unwrap_err();
                assert_eq!(e.kind, BlockErrorKind::OutOfRange, "{e}");
            }
            let e = v.discard(off, len).unwrap_err();
            assert_eq!(e.kind, BlockErrorKind::OutOfRange, "{e}");
            let e = v.block_status(off, len).unwrap_err();
            assert_eq!(e.kind, BlockErrorKind::OutOfRange, "{e}");
        }

        // Shrinking by one byte zeroes the rest of the (partial) last chunk.
        p.resize_volume("top", u64::MAX - 1, true).unwrap();
        p.resize_volume("top", u64::MAX, false).unwrap();
        let mut one = [7u8; 1];
        v.read_at(&mut one, u64::MAX - 1).unwrap();
        assert_eq!(one, [0]);
        v.read_at(&mut buf[..8190], at).unwrap();
        assert!(buf[..8190] == want[..8190]);

        // Zeroing the whole last chunk unmaps it.
        v.write_zeroes(last, u64::MAX - last, true).unwrap();
        v.read_at(&mut buf, at).unwrap();
        assert!(buf.iter().all(|b| *b == 0));
        let ext = v.block_status(last, u64::MAX - last).unwrap();
        assert!(ext.iter().all(|e| e.hole), "{ext:?}");
        assert_eq!(p.volume("top").unwrap().mapped, 0);

        v.write_at(&d1, at).unwrap();
        v.discard(last, u64::MAX - last).unwrap();
        v.read_at(&mut buf, at).unwrap();
        assert!(buf.iter().all(|b| *b == 0));

        v.write_at(&d2, u64::MAX - 100).unwrap();
        v.flush().unwrap();
        let r = p.verify().unwrap();
        assert!(r.is_clean(), "{r:?}");
        drop((v, s, p));
        let p = ThinPool::open(dir.path()).unwrap();
        let v = p.open_volume("top", true).unwrap();
        let mut b = vec![0u8; 100];
        v.read_at(&mut b, u64::MAX - 100).unwrap();
        assert!(b == d2);
        let s = p.open_volume("snap", true).unwrap();
        s.read_at(&mut buf, at).unwrap();
        assert!(buf == d1);
    }

    /// A write source in pieces, as a guest's scattered pages are.
    struct Pieces(Vec<Vec<u8>>);

    // SAFETY: every piece given lies inside one of the vectors, which live as long as
    // `self`; the pieces for a range cover exactly its bytes.
    unsafe impl WriteSource for Pieces {
        fn len(&self) -> usize {
            self.0.iter().map(Vec::len).sum()
        }
        fn copy_to(&self, off: usize, dst: &mut [u8]) {
            let all: Vec<u8> = self.0.concat();
            dst.copy_from_slice(&all[off..off + dst.len()]);
        }
        fn iovecs(&self, mut off: usize, mut len: usize, out: &mut Vec<libc::iovec>) {
            for p in &self.0 {
                if len == 0 {
                    break;
                }
                if off >= p.len() {
                    off -= p.len();
                    continue;
                }
                let n = (p.len() - off).min(len);
                (&p[off..off + n]).iovecs(0, n, out);
                off = 0;
                len -= n;
            }
            assert_eq!(len, 0, "range past the source");
        }
    }

    /// A read target in pieces, filled through raw pointers only (as a guest's pages).
    struct Scatter {
        bufs: Vec<Vec<u8>>,
        ptrs: Vec<(*mut u8, usize)>,
    }

    // SAFETY: a test fills it from one thread at a time (`read_into` runs on the caller's
    // thread); nothing reads `bufs` until `into_bytes` takes it back.
    unsafe impl Sync for Scatter {}

    impl Scatter {
        fn new(sizes: &[usize]) -> Self {
            let mut bufs: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0xa5; n]).collect();
            let ptrs = bufs.iter_mut().map(|b| (b.as_mut_ptr(), b.len())).collect();
            Scatter { bufs, ptrs }
        }

        fn walk(&self, mut off: usize, mut len: usize, mut f: impl FnMut(*mut u8, usize, usize)) {
            let mut done = 0;
            for &(p, n) in &self.ptrs {
                if len == 0 {
                    break;
                }
                if off >= n {
                    off -= n;
                    continue;
                }
                let k = (n - off).min(len);
                f(p.wrapping_add(off), k, done);
                done += k;
                off = 0;
                len -= k;
            }
            assert_eq!(len, 0, "range past the target");
        }

        fn into_bytes(self) -> Vec<u8> {
            self.bufs.concat()
        }
    }

    // SAFETY: every piece lies inside one of the buffers, which live (and are not moved:
    // their heap blocks stay put) as long as `self`.
    unsafe impl ReadTarget for Scatter {
        fn len(&self) -> usize {
            self.ptrs.iter().map(|p| p.1).sum()
        }
        fn fill_from(&self, off: usize, src: &[u8]) {
            self.walk(off, src.len(), |p, n, d| {
                // SAFETY: `p..p+n` is inside a buffer (walk), `src[d..d+n]` in bounds;
                // no reference to the buffers exists meanwhile.
                unsafe { std::ptr::copy_nonoverlapping(src[d..d + n].as_ptr(), p, n) }
            });
        }
        fn iovecs(&self, off: usize, len: usize, out: &mut Vec<libc::iovec>) {
            self.walk(off, len, |p, n, _| {
                out.push(libc::iovec {
                    iov_base: p.cast(),
                    iov_len: n,
                })
            });
        }
    }

    /// Writes from a source in pieces (a `pwritev` per data-file run, pieces split
    /// anywhere, more than IOV_MAX of them once) at random unaligned places, across chunk
    /// and sub-block boundaries, with snapshots taken and dropped so that every CoW case
    /// (unmapped, exclusive in place, shared chunk, overlay sub-block copy, shared
    /// overlay) runs, and reads into pieces (`preadv`, holes, overlays) between them: the
    /// volume and every snapshot match a model, before and after a reopen.
    #[test]
    fn writes_from_pieces_match_a_model_through_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let p = ThinPool::create(
            dir.path(),
            ThinOptions {
                chunk_size: 64 << 10,
                capacity: 32 << 20,
            },
        )
        .unwrap();
        const SIZE: usize = 1 << 20;
        p.create_volume("v", SIZE as u64).unwrap();
        let v = p.open_volume("v", false).unwrap();
        assert!(v.writes_in_place() && v.reads_in_place());
        let mut model = vec![0u8; SIZE];
        let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let check = |name: &str, want: &[u8]| {
            let d = p.open_volume(name, true).unwrap();
            let mut got = vec![0u8; SIZE];
            d.read_at(&mut got, 0).unwrap();
            assert!(got == want, "{name} differs from its model");
        };
        // 1500 pieces, across a chunk boundary: more than one pwritev (IOV_MAX).
        let data = pattern(99, 1500 * 7);
        let pieces = data.chunks(7).map(<[u8]>::to_vec).collect();
        v.write_from(&Pieces(pieces), 60_000).unwrap();
        model[60_000..60_000 + data.len()].copy_from_slice(&data);
        for i in 0..400u64 {
            match next(20) {
                0 if snaps.len() < 4 => {
                    let name = format!("s{i}");
                    p.snapshot("v", &name).unwrap();
                    snaps.push((name, model.clone()));
                }
                1 if !snaps.is_empty() => {
                    let (name, want) = snaps.remove(next(snaps.len() as u64) as usize);
                    check(&name, &want);
                    p.remove_volume(&name).unwrap();
                }
                2 => p.commit().unwrap(),
                3 | 4 => {
                    // A read into pieces (`preadv`; holes filled from zeros), anywhere.
                    let len = 1 + next(150_000) as usize;
                    let off = next((SIZE - len) as u64) as usize;
                    let mut sizes = Vec::new();
                    let mut at = 0;
                    while at < len {
                        let n = (1 + next(9000) as usize).min(len - at);
                        sizes.push(n);
                        at += n;
                    }
                    let dst = Scatter::new(&sizes);
                    v.read_into(&dst, off as u64).unwrap();
                    assert!(
                        dst.into_bytes() == model[off..off + len],
                        "read_into at {off}+{len}"
                    );
                }
                _ => {
                    let len = 1 + next(if i % 5 == 0 { 200_000 } else { 20_000 }) as usize;
                    let off = next((SIZE - len) as u64) as usize;
                    let data = pattern(i as u8, len);
                    let mut pieces = Vec::new();
                    let mut at = 0;
                    while at < len {
                        let n = (1 + next(9000) as usize).min(len - at);
                        pieces.push(data[at..at + n].to_vec());
                        at += n;
                    }
                    v.write_from(&Pieces(pieces), off as u64).unwrap();
                    model[off..off + len].copy_from_slice(&data);
                }
            }
        }
        check("v", &model);
        for (name, want) in &snaps {
            check(name, want);
        }
        v.flush().unwrap();
        let r = p.verify().unwrap();
        assert!(r.is_clean(), "{r:?}");
        drop((v, p));
        let p = ThinPool::open(dir.path()).unwrap();
        for (name, want) in snaps.iter().chain([&("v".to_string(), model)]) {
            let d = p.open_volume(name, true).unwrap();
            let mut got = vec![0u8; SIZE];
            d.read_at(&mut got, 0).unwrap();
            assert!(got == *want, "{name} differs from its model after a reopen");
        }
    }

    /// A capacity whose data file length wraps is refused (old code: `(chunks + 1) *
    /// chunk_size` overflowed; wrapped, it sized pool.data to 0 bytes).
    #[test]
    fn capacity_past_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let r = ThinPool::create(
            dir.path(),
            ThinOptions {
                chunk_size: 4096,
                capacity: u64::MAX,
            },
        );
        assert!(matches!(r, Err(PoolError::Invalid(_))), "{:?}", r.err());
    }
}
