//! The data path: reads and writes planned under the metadata lock (shadowing,
//! allocation, chunks marked in flight), executed without it, mappings installed once
//! the data is on disk (dm-thin's order). Offsets are typed ([`VolOffset`] in, and
//! [`DataOffset`] out, through the checked conversions of `units`): a plan cannot
//! address bytes outside the chunk it means, whatever the metadata says.

use super::*;

impl ThinPool {
    /// Plans under the metadata lock, waiting while a chunk the request touches has I/O
    /// in flight.
    pub(super) fn plan<T>(
        &self,
        mut f: impl FnMut(&mut Meta) -> Result<Option<T>, Error>,
    ) -> Result<T, Error> {
        let mut m = self.state.lock();
        loop {
            m.check_poison()?;
            if let Some(t) = f(&mut m)? {
                return Ok(t);
            }
            self.cv.wait(&mut m);
        }
    }

    pub(super) fn read_locked(&self, id: u64, buf: &mut [u8], off: VolOffset) -> Result<(), Error> {
        let geo = self.geo;
        let segs = self.plan(|m| plan_read(m, geo, id, off, buf.len()))?;
        for s in segs {
            match s {
                ReadSeg::Zero { buf_off, len } => buf[buf_off..buf_off + len].fill(0),
                ReadSeg::File { off, buf_off, len } => self
                    .data
                    .read_at(&mut buf[buf_off..buf_off + len], off.raw())
                    .map_err(|source| Error::Io {
                        op: "reading pool.data",
                        source,
                    })?,
            }
        }
        Ok(())
    }

    /// [`Self::read_locked`] straight into memory another party may use meanwhile (see
    /// [`ReadTarget`]): holes from a zero buffer, data by `preadv`.
    pub(super) fn read_locked_into(
        &self,
        id: u64,
        dst: &dyn ReadTarget,
        off: VolOffset,
    ) -> Result<(), Error> {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let geo = self.geo;
        let segs = self.plan(|m| plan_read(m, geo, id, off, dst.len()))?;
        for s in segs {
            match s {
                ReadSeg::Zero { buf_off, len } => {
                    let mut at = 0;
                    while at < len {
                        let n = (len - at).min(ZEROS.len());
                        dst.fill_from(buf_off + at, &ZEROS[..n]);
                        at += n;
                    }
                }
                ReadSeg::File { off, buf_off, len } => self
                    .data
                    .read_into(dst, buf_off, len, off.raw())
                    .map_err(|source| Error::Io {
                        op: "reading pool.data",
                        source,
                    })?,
            }
        }
        Ok(())
    }

    /// Writes as dm-thin does: data first, then the mapping. The plan allocates fresh
    /// chunks and marks the virtual chunks busy; the mapping changes only after every
    /// data write succeeded, so a failed write leaves the volume's mapped bytes as they
    /// were (its fresh chunks are freed) and the next commit cannot make zeros durable
    /// over bytes the guest never wrote.
    pub(super) fn write_locked(&self, id: u64, buf: &[u8], off: VolOffset) -> Result<(), Error> {
        self.write_locked_from(id, &buf, off)
    }

    /// [`Self::write_locked`] from memory that may change meanwhile (see
    /// [`WriteSource`]): each byte of `src` is read once per place it goes (a data-file
    /// write or a sub-block copy's overlay), never checked then written, so a source that
    /// changes under the write leaves some mix of its old and new bytes in the range
    /// written, and nothing outside it: the plan (which chunks, CoW, allocation) depends
    /// on the offset and length alone.
    pub(super) fn write_locked_from(
        &self,
        id: u64,
        src: &dyn WriteSource,
        off: VolOffset,
    ) -> Result<(), Error> {
        let geo = self.geo;
        let len = src.len();
        let plan = self.plan(|m| {
            if !targets_idle(m, id, geo, off, len as u64)? {
                return Ok(None);
            }
            let mut plan = WritePlan::default();
            let r = self.mutate(m, |m| plan_write(m, geo, id, off, len, &mut plan));
            if let Err(e) = r {
                if !matches!(e, Error::NoSpace) {
                    return Err(e);
                }
                plan.err = Some(e);
            }
            for c in &plan.inflight {
                m.inflight.insert(*c);
            }
            for i in &plan.installs {
                m.inflight_vcs.insert((id, i.vc));
            }
            Ok(Some(plan))
        })?;
        let r = self.execute(&plan, src);
        if !plan.inflight.is_empty() || !plan.installs.is_empty() {
            let mut m = self.state.lock();
            for c in &plan.inflight {
                m.inflight.remove(c);
            }
            for i in &plan.installs {
                m.inflight_vcs.remove(&(id, i.vc));
            }
            let done = match &r {
                Ok(()) => self.mutate(&mut m, |m| install(m, id, &plan.installs)),
                Err(_) => self.mutate(&mut m, |m| {
                    plan.fresh.iter().try_for_each(|c| m.chunk_dec(*c))
                }),
            };
            self.cv.notify_all();
            done?;
        }
        r?;
        match plan.err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub(super) fn execute(&self, plan: &WritePlan, src: &dyn WriteSource) -> Result<(), Error> {
        let io = |op: &'static str| move |source| Error::Io { op, source };
        for op in &plan.ops {
            if let WOp::Punch { off, len } = op {
                self.data
                    .punch_hole(off.raw(), *len)
                    .map_err(io("punching a reused chunk"))?;
            }
        }
        let mut tmp = Vec::new();
        for op in &plan.ops {
            if let WOp::Copy {
                src: from,
                dst,
                len,
                overlay,
            } = op
            {
                tmp.resize(*len as usize, 0);
                self.data
                    .read_at(&mut tmp, from.raw())
                    .map_err(io("reading a shared chunk"))?;
                if let Some((bo, at, n)) = overlay {
                    src.copy_to(*bo, &mut tmp[*at..at + n]);
                }
                self.data
                    .write_at(&tmp, dst.raw())
                    .map_err(io("copying a shared sub-block"))?;
            }
        }
        for op in &plan.ops {
            if let WOp::Write { dst, buf_off, len } = op {
                self.data
                    .write_from(src, *buf_off, *len, dst.raw())
                    .map_err(io("writing pool.data"))?;
            }
        }
        Ok(())
    }

    pub(super) fn volume_size(&self, id: u64) -> Result<u64, BlockErrorKind> {
        let m = self.state.lock();
        m.vol(id).map(|v| v.size).ok_or(BlockErrorKind::Gone)
    }
}
// ---- plans -----------------------------------------------------------------------------

pub(super) enum ReadSeg {
    Zero {
        buf_off: usize,
        len: usize,
    },
    File {
        off: DataOffset,
        buf_off: usize,
        len: usize,
    },
}

pub(super) fn push_read(segs: &mut Vec<ReadSeg>, s: ReadSeg) {
    match (segs.last_mut(), &s) {
        (Some(ReadSeg::Zero { buf_off, len }), ReadSeg::Zero { buf_off: b, len: l })
            if *buf_off + *len == *b =>
        {
            *len += l;
        }
        (
            Some(ReadSeg::File { off, buf_off, len }),
            ReadSeg::File {
                off: o,
                buf_off: b,
                len: l,
            },
        ) if *buf_off + *len == *b && off.checked_add(*len as u64) == Some(*o) => {
            *len += l;
        }
        _ => segs.push(s),
    }
}

/// The bytes of a request in one chunk: `[a, b)` of virtual chunk `vc`, from byte `bo`
/// of the request.
pub(super) struct Piece {
    pub vc: u64,
    pub a: u64,
    pub b: u64,
    pub bo: usize,
}

/// Splits `len` bytes from `off` at chunk boundaries, with checked arithmetic: a
/// request that would pass `u64::MAX` is refused, not wrapped.
pub(super) fn pieces(
    geo: Geometry,
    off: VolOffset,
    len: u64,
) -> Result<impl Iterator<Item = Piece>, Error> {
    let end = off.checked_add(len).ok_or_else(|| {
        Error::Inconsistent(format!(
            "request of {len} bytes at volume offset {off} passes the largest offset"
        ))
    })?;
    let mut pos = off;
    Ok(std::iter::from_fn(move || {
        let left = end.checked_offset_from(pos).filter(|n| *n > 0)?;
        let (vc, a) = geo.locate(pos);
        let n = left.min(geo.chunk_size - a);
        let bo = pos.checked_offset_from(off)? as usize;
        pos = pos.checked_add(n)?;
        Some(Piece {
            vc,
            a,
            b: a + n,
            bo,
        })
    }))
}

pub(super) fn plan_read(
    m: &mut Meta,
    geo: Geometry,
    id: u64,
    off: VolOffset,
    len: usize,
) -> Result<Option<Vec<ReadSeg>>, Error> {
    let mut segs = Vec::new();
    for Piece { vc, a, b, bo } in pieces(geo, off, len as u64)? {
        let e = m.lookup(id, vc)?;
        if e.is_mapped() && m.inflight.contains(&e.chunk) {
            return Ok(None);
        }
        if !e.is_mapped() {
            push_read(
                &mut segs,
                ReadSeg::Zero {
                    buf_off: bo,
                    len: (b - a) as usize,
                },
            );
        } else if e.backing.is_none() {
            push_read(
                &mut segs,
                ReadSeg::File {
                    off: geo.data_offset(e.chunk, a, b - a)?,
                    buf_off: bo,
                    len: (b - a) as usize,
                },
            );
        } else {
            let mut p = a;
            while p < b {
                let s = geo.sub_of(p);
                let q = geo.sub_bounds(s).1.min(b);
                let src = if e.valid & geo.sub_bit(s)? != 0 {
                    e.chunk
                } else {
                    e.backing
                };
                push_read(
                    &mut segs,
                    ReadSeg::File {
                        off: geo.data_offset(src, p, q - p)?,
                        buf_off: bo + (p - a) as usize,
                        len: (q - p) as usize,
                    },
                );
                p = q;
            }
        }
    }
    Ok(Some(segs))
}

pub(super) enum WOp {
    /// Hole-punch a reused chunk before anything else touches it.
    Punch { off: DataOffset, len: u64 },
    /// Copy one sub-block, overlaying `(buf_off, at, len)` of the request first.
    Copy {
        src: DataOffset,
        dst: DataOffset,
        len: u64,
        overlay: Option<(usize, usize, usize)>,
    },
    Write {
        dst: DataOffset,
        buf_off: usize,
        len: usize,
    },
}

/// A mapping change made once the data of a write is on disk.
pub(super) struct Install {
    vc: u64,
    entry: MapEntry,
    /// The virtual chunk was unmapped (the volume's mapped count grows).
    newly_mapped: bool,
    /// References the old entry held and the new one drops.
    drops: Vec<Chunk>,
}

#[derive(Default)]
pub(super) struct WritePlan {
    ops: Vec<WOp>,
    /// Physical chunks readers and writers must not touch until the write completes.
    inflight: Vec<Chunk>,
    /// Chunks allocated for this write: freed again if it fails.
    fresh: Vec<Chunk>,
    installs: Vec<Install>,
    err: Option<Error>,
}

impl WritePlan {
    pub(super) fn write(&mut self, dst: DataOffset, buf_off: usize, len: usize) {
        if let Some(WOp::Write {
            dst: d,
            buf_off: b,
            len: l,
        }) = self.ops.last_mut()
        {
            if d.checked_add(*l as u64) == Some(dst) && *b + *l == buf_off {
                *l += len;
                return;
            }
        }
        self.ops.push(WOp::Write { dst, buf_off, len });
    }

    pub(super) fn new_chunk(&mut self, m: &mut Meta, geo: Geometry) -> Result<Chunk, Error> {
        let (c, reused) = m.alloc_chunk()?;
        if reused {
            let (off, len) = geo.chunk_run(c, 1)?;
            self.ops.push(WOp::Punch { off, len });
        }
        self.inflight.push(c);
        self.fresh.push(c);
        Ok(c)
    }
}

/// Installs the mappings of a write whose data is on disk.
pub(super) fn install(m: &mut Meta, id: u64, installs: &[Install]) -> Result<(), Error> {
    let mut newly = 0;
    for i in installs {
        let leaf = m.shadow_path(id, i.vc)?;
        let slot = (i.vc % format::MAP_LEAF_ENTRIES as u64) as usize;
        m.leaf_mut(leaf)?[slot] = i.entry;
        for c in &i.drops {
            m.chunk_dec(*c)?;
        }
        newly += u64::from(i.newly_mapped);
    }
    if newly > 0 {
        let mut r = m.root(id)?;
        r.mapped = r.mapped.checked_add(newly).ok_or_else(|| {
            Error::Inconsistent(format!("volume id {id}: mapped chunk count overflow"))
        })?;
        m.set_root(id, r)?;
    }
    Ok(())
}

/// False if a chunk the write would touch has I/O in flight.
pub(super) fn targets_idle(
    m: &mut Meta,
    id: u64,
    geo: Geometry,
    off: VolOffset,
    len: u64,
) -> Result<bool, Error> {
    if len == 0 || (m.inflight.is_empty() && m.inflight_vcs.is_empty()) {
        return Ok(true);
    }
    let last = off.checked_add(len - 1).ok_or_else(|| {
        Error::Inconsistent(format!(
            "write of {len} bytes at volume offset {off} passes the largest offset"
        ))
    })?;
    let (lo, hi) = (geo.locate(off).0, geo.locate(last).0);
    if vcs_busy(m, id, lo..=hi) {
        return Ok(false);
    }
    if m.inflight.is_empty() {
        return Ok(true);
    }
    for vc in lo..=hi {
        let e = m.lookup(id, vc)?;
        if e.is_mapped() && m.inflight.contains(&e.chunk) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether a write to virtual chunks `vcs` of `id` is in flight.
pub(super) fn vcs_busy(m: &Meta, id: u64, vcs: impl std::ops::RangeBounds<u64>) -> bool {
    m.inflight_vcs
        .iter()
        .any(|&(v, c)| v == id && vcs.contains(&c))
}

pub(super) fn plan_write(
    m: &mut Meta,
    geo: Geometry,
    id: u64,
    off: VolOffset,
    len: usize,
    plan: &mut WritePlan,
) -> Result<(), Error> {
    m.touch(id);
    for Piece { vc, a, b, bo } in pieces(geo, off, len as u64)? {
        plan_chunk(m, geo, id, vc, a, b, bo, plan)?;
    }
    Ok(())
}

/// Plans writing bytes `[a, b)` of virtual chunk `vc` from request offset `bo`.
#[allow(clippy::too_many_arguments)]
pub(super) fn plan_chunk(
    m: &mut Meta,
    geo: Geometry,
    id: u64,
    vc: u64,
    a: u64,
    b: u64,
    bo: usize,
    plan: &mut WritePlan,
) -> Result<(), Error> {
    let sub = geo.sub_size;
    // Shadowing the path first makes chunk refcounts count this volume's own reference
    // (a snapshot shares map pages, not chunks): only then is "exclusive" meaningful.
    // It changes no mapping, so a failed data write leaves nothing to undo.
    let leaf = m.shadow_path(id, vc)?;
    let mut e = m.leaf_mut(leaf)?[(vc % format::MAP_LEAF_ENTRIES as u64) as usize];
    let exclusive = |m: &mut Meta, c: Chunk| -> Result<bool, Error> {
        Ok(m.data_rc(c)? == 1 && !m.dropped_chunks.contains(&c))
    };
    if !e.is_mapped() {
        let c = plan.new_chunk(m, geo)?;
        plan.write(geo.data_offset(c, a, b - a)?, bo, (b - a) as usize);
        plan.installs.push(Install {
            vc,
            entry: MapEntry {
                chunk: c,
                backing: Chunk::NONE,
                valid: 0,
            },
            newly_mapped: true,
            drops: Vec::new(),
        });
        return Ok(());
    }
    let mut copied = 0u64;
    let mut drops = Vec::new();
    if e.backing.is_none() {
        if exclusive(m, e.chunk)? {
            // In place: the mapping does not change; a failed write changes only bytes
            // the guest asked to overwrite.
            plan.write(geo.data_offset(e.chunk, a, b - a)?, bo, (b - a) as usize);
            return Ok(());
        }
        let n = plan.new_chunk(m, geo)?;
        e = MapEntry {
            chunk: n,
            backing: e.chunk,
            valid: 0,
        };
    } else if !exclusive(m, e.chunk)? {
        // The overlay chunk itself is shared: its valid sub-blocks move to a new chunk.
        let n = plan.new_chunk(m, geo)?;
        for s in 0..geo.subs {
            let (ss, se) = geo.sub_bounds(s);
            let bit = geo.sub_bit(s)?;
            let covered = a <= ss && b >= se;
            if e.valid & bit != 0 && !covered {
                plan.ops.push(WOp::Copy {
                    src: geo.data_offset(e.chunk, ss, sub)?,
                    dst: geo.data_offset(n, ss, sub)?,
                    len: sub,
                    overlay: None,
                });
                copied |= bit;
            }
        }
        drops.push(e.chunk);
        e.chunk = n;
    } else {
        plan.inflight.push(e.chunk);
    }
    for s in geo.subs_touched(a, b) {
        let (ss, se) = geo.sub_bounds(s);
        let bit = geo.sub_bit(s)?;
        let (sa, sb) = (a.max(ss), b.min(se));
        let full = sa == ss && sb == se;
        if full || e.valid & bit != 0 || copied & bit != 0 {
            plan.write(
                geo.data_offset(e.chunk, sa, sb - sa)?,
                bo + (sa - a) as usize,
                (sb - sa) as usize,
            );
        } else {
            plan.ops.push(WOp::Copy {
                src: geo.data_offset(e.backing, ss, sub)?,
                dst: geo.data_offset(e.chunk, ss, sub)?,
                len: sub,
                overlay: Some((
                    bo + (sa - a) as usize,
                    (sa - ss) as usize,
                    (sb - sa) as usize,
                )),
            });
        }
        e.valid |= bit;
    }
    if e.valid == geo.full_mask() {
        drops.push(e.backing);
        e.backing = Chunk::NONE;
        e.valid = 0;
    }
    plan.installs.push(Install {
        vc,
        entry: e,
        newly_mapped: false,
        drops,
    });
    Ok(())
}
