//! Persistent grants (`feature-persistent` in blkif.h): a frontend that negotiates them
//! keeps one pool of granted pages for the whole connection and bounces every transfer
//! through it, so the backend can map each page once and afterwards move data with plain
//! copies, instead of one grant-copy hypercall per request. In a dom0 every hypercall and
//! syscall is a trip through Xen; for 4 KiB requests that trip is most of the cost.
//!
//! A transfer whose pages are all mapped moves between them and a volume that can do
//! it in place ([`storage::BlockDevice::writes_in_place`] / `reads_in_place`: the thin
//! pool) with no copy of ours ([`GuestPages`]: the kernel reads or fills them in
//! `pwritev` / `preadv`); see `vbd` for why the guest changing a page meanwhile is
//! harmless. Otherwise data moves by copy through the device thread's own buffer.
//!
//! Only used when both ends offered it: a frontend that did not promise to keep its
//! grants may end a grant and reuse the ref for another page, and a mapping kept past
//! that would read the old page. The number of mapped pages is capped ([`MAX_MAPPED`],
//! Linux blkback's default): a segment whose grant is not mapped when the cap is reached,
//! or cannot be mapped (a bad or read-only grant), goes through the wrapped
//! [`GuestMemory`]'s grant copy, which gives the same answer a non-persistent backend
//! would. The mappings go away with the connection (the device thread's `Vbd`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use storage::{ReadTarget, WriteSource};
use xen_sys::{GrantSeg, SharedMem, PAGE_SIZE};

use super::vbd::GuestMemory;

/// Mapped grants kept per device (Linux blkback's `max_persistent_grants` default).
pub const MAX_MAPPED: usize = 1056;

/// Whether backends offer persistent grants: yes unless `QUBES_BLKIF_PERSISTENT=0` (for
/// comparing against grant copy, as `benches/blkif_xen` does).
pub fn offered() -> bool {
    std::env::var("QUBES_BLKIF_PERSISTENT").map_or(true, |v| v.trim() != "0")
}

/// One granted page mapped into the backend: the page at byte `base` of `mem`.
#[derive(Clone)]
pub struct MappedPage {
    pub mem: Arc<SharedMem>,
    pub base: usize,
}

/// Counters, for tests and `blkif` figures.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PersistentStats {
    /// Grants mapped (each once per connection).
    pub mapped: u64,
    /// Calls that mapped them (several grants of one transfer go in one).
    pub map_calls: u64,
    /// Segments moved by plain copy through a kept mapping.
    pub hits: u64,
    /// Segments that went through grant copy (cap reached, or the grant would not map).
    pub copied: u64,
    /// Segments moved between the volume and their mapping with no copy of ours
    /// (written from it or read into it).
    pub direct: u64,
}

/// A transfer's bytes where they are: in the guest's pages, kept mapped. The kernel
/// reads or fills them (`pwritev`, `preadv`) through the iovecs; we touch them only
/// through [`SharedMem::read`] / [`SharedMem::write`] (atomics), never as a slice,
/// since the guest may use them at any moment.
pub struct GuestPages {
    /// (mapping, byte offset in it, length) in transfer order; neighbours that follow each
    /// other in one mapping (pages mapped in one call) are one piece.
    pieces: Vec<(Arc<SharedMem>, usize, usize)>,
    /// Where each piece starts in the transfer.
    starts: Vec<usize>,
    len: usize,
}

impl GuestPages {
    fn new() -> Self {
        GuestPages {
            pieces: Vec::new(),
            starts: Vec::new(),
            len: 0,
        }
    }

    fn push(&mut self, mem: &Arc<SharedMem>, at: usize, n: usize) {
        if let Some((m, a, l)) = self.pieces.last_mut() {
            if Arc::ptr_eq(m, mem) && *a + *l == at {
                *l += n;
                self.len += n;
                return;
            }
        }
        self.pieces.push((mem.clone(), at, n));
        self.starts.push(self.len);
        self.len += n;
    }

    /// Calls `f(mapping, offset in it, length, offset in the range)` for each part of
    /// the transfer's bytes `[off, off + len)`. Panics if the range passes the end.
    fn walk(&self, off: usize, len: usize, mut f: impl FnMut(&SharedMem, usize, usize, usize)) {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.len),
            "bytes {off}+{len} of a {}-byte transfer",
            self.len
        );
        if len == 0 {
            return;
        }
        let mut i = self.starts.partition_point(|&s| s <= off) - 1;
        let (mut pos, mut done) = (off, 0);
        while done < len {
            let (mem, at, n) = &self.pieces[i];
            let within = pos - self.starts[i];
            let k = (n - within).min(len - done);
            f(mem, at + within, k, done);
            done += k;
            pos += k;
            i += 1;
        }
    }
}

// SAFETY: every address `iovecs` gives comes from `SharedMem::addr`, which checks the
// range against the mapping; each piece holds an `Arc` of its mapping, so the memory
// stays mapped for as long as `self` is borrowed. The pieces cover exactly the range
// (`walk`).
unsafe impl WriteSource for GuestPages {
    fn len(&self) -> usize {
        self.len
    }

    fn copy_to(&self, off: usize, dst: &mut [u8]) {
        self.walk(off, dst.len(), |mem, at, n, d| {
            mem.read(at, &mut dst[d..d + n])
        });
    }

    fn iovecs(&self, off: usize, len: usize, out: &mut Vec<libc::iovec>) {
        self.walk(off, len, |mem, at, n, _| {
            out.push(libc::iovec {
                iov_base: mem.addr(at, n).cast(),
                iov_len: n,
            })
        });
    }
}

/// A guest's memory with the grants it keeps mapped once (see the module doc).
pub struct PersistentGrants<G: GuestMemory> {
    guest: G,
    enabled: bool,
    limit: usize,
    pages: RefCell<HashMap<u32, MappedPage>>,
    /// The per-transfer list of mappings, kept between transfers so that the hot path
    /// does not allocate.
    plan_buf: RefCell<Vec<Option<MappedPage>>>,
    stats: RefCell<PersistentStats>,
}

// SAFETY: as for `WriteSource`: the mappings are read-write (`GuestMemory::map_page`
// maps them so), checked by `SharedMem::addr`, kept alive by the pieces' `Arc`s, and
// the pieces cover exactly the range.
unsafe impl ReadTarget for GuestPages {
    fn len(&self) -> usize {
        self.len
    }

    fn fill_from(&self, off: usize, src: &[u8]) {
        self.walk(off, src.len(), |mem, at, n, d| {
            mem.write(at, &src[d..d + n])
        });
    }

    fn iovecs(&self, off: usize, len: usize, out: &mut Vec<libc::iovec>) {
        WriteSource::iovecs(self, off, len, out)
    }
}

impl<G: GuestMemory> PersistentGrants<G> {
    /// `enabled`: both ends offered `feature-persistent`. When false every segment goes
    /// through `guest`'s grant copy and nothing is mapped.
    pub fn new(guest: G, enabled: bool) -> Self {
        Self::with_limit(guest, enabled, MAX_MAPPED)
    }

    pub fn with_limit(guest: G, enabled: bool, limit: usize) -> Self {
        PersistentGrants {
            guest,
            enabled,
            limit,
            pages: RefCell::default(),
            plan_buf: RefCell::default(),
            stats: RefCell::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn stats(&self) -> PersistentStats {
        *self.stats.borrow()
    }

    /// The kept mapping of `gref`, mapping it now if there is room.
    fn page(&self, gref: u32) -> Option<MappedPage> {
        if let Some(p) = self.pages.borrow().get(&gref) {
            return Some(p.clone());
        }
        if self.pages.borrow().len() >= self.limit {
            return None;
        }
        let p = self.guest.map_page(gref).ok()?;
        self.pages.borrow_mut().insert(gref, p.clone());
        let mut st = self.stats.borrow_mut();
        st.mapped += 1;
        st.map_calls += 1;
        Some(p)
    }

    /// Walks `segs` over a buffer of `len` bytes: each segment with its byte range in
    /// the buffer and its kept mapping, if any. Checks the segments first, so that no
    /// copy through a mapping can leave its page or the buffer.
    fn plan(&self, segs: &[GrantSeg], len: usize) -> Result<Vec<Option<MappedPage>>, String> {
        let mut total = 0usize;
        for s in segs {
            if s.len == 0 || s.offset as usize + s.len as usize > PAGE_SIZE {
                return Err(format!(
                    "segment {}+{} crosses its page (gref {})",
                    s.offset, s.len, s.gref
                ));
            }
            total += s.len as usize;
        }
        if total != len {
            return Err(format!(
                "segments cover {total} bytes, the buffer {len} bytes"
            ));
        }
        let mut pages = std::mem::take(&mut *self.plan_buf.borrow_mut());
        pages.clear();
        let mut missing = false;
        {
            let kept = self.pages.borrow();
            pages.extend(segs.iter().map(|s| {
                let p = kept.get(&s.gref).cloned();
                missing |= p.is_none();
                p
            }));
        }
        if missing {
            self.map_batch(segs, &pages);
            for (s, p) in segs.iter().zip(pages.iter_mut()) {
                if p.is_none() {
                    *p = self.page(s.gref);
                }
            }
        }
        Ok(pages)
    }

    /// Maps the transfer's grants that have no mapping yet in one call (as many as the
    /// cap leaves room for): a frontend's first 128 KiB request then costs one gntdev
    /// call and one mmap, not 32 of each. If the call fails (one bad or read-only grant
    /// fails the lot), [`Self::page`] tries each grant alone, so only the bad one goes
    /// to grant copy.
    fn map_batch(&self, segs: &[GrantSeg], pages: &[Option<MappedPage>]) {
        let room = self.limit.saturating_sub(self.pages.borrow().len());
        let mut new: Vec<u32> = Vec::new();
        for (s, p) in segs.iter().zip(pages) {
            if new.len() >= room {
                break;
            }
            if p.is_none() && !new.contains(&s.gref) {
                new.push(s.gref);
            }
        }
        if new.len() < 2 {
            return;
        }
        let Ok(mapped) = self.guest.map_pages(&new) else {
            return;
        };
        if mapped.len() != new.len() {
            return;
        }
        self.pages
            .borrow_mut()
            .extend(new.iter().copied().zip(mapped));
        let mut st = self.stats.borrow_mut();
        st.mapped += new.len() as u64;
        st.map_calls += 1;
    }

    /// Gives a plan's list back for the next transfer.
    fn recycle(&self, mut pages: Vec<Option<MappedPage>>) {
        pages.clear();
        *self.plan_buf.borrow_mut() = pages;
    }

    /// The transfer's bytes in its kept mappings, if every segment has one (mapping new
    /// grants now, as a copy would); `None` otherwise: then the transfer goes by copy.
    pub fn direct(&self, segs: &[GrantSeg]) -> Option<GuestPages> {
        if !self.enabled {
            return None;
        }
        let len = segs.iter().map(|s| s.len as usize).sum();
        let pages = self.plan(segs, len).ok()?;
        let mut out = None;
        if pages.iter().all(Option::is_some) {
            let mut g = GuestPages::new();
            for (s, p) in segs.iter().zip(pages.iter().flatten()) {
                g.push(&p.mem, p.base + s.offset as usize, s.len as usize);
            }
            self.stats.borrow_mut().direct += segs.len() as u64;
            out = Some(g);
        }
        self.recycle(pages);
        out
    }

    fn count(&self, hits: usize, copied: usize) {
        let mut st = self.stats.borrow_mut();
        st.hits += hits as u64;
        st.copied += copied as u64;
    }
}

/// The segments without a kept mapping, and where each one's bytes sit in the buffer.
fn unmapped(
    segs: &[GrantSeg],
    pages: &[Option<MappedPage>],
) -> (Vec<GrantSeg>, Vec<std::ops::Range<usize>>) {
    let mut rest = Vec::new();
    let mut places = Vec::new();
    let mut pos = 0;
    for (s, page) in segs.iter().zip(pages) {
        let end = pos + s.len as usize;
        if page.is_none() {
            rest.push(*s);
            places.push(pos..end);
        }
        pos = end;
    }
    (rest, places)
}

impl<G: GuestMemory> GuestMemory for PersistentGrants<G> {
    fn copy_from_guest(&self, segs: &[GrantSeg], buf: &mut [u8]) -> Result<(), String> {
        if !self.enabled {
            return self.guest.copy_from_guest(segs, buf);
        }
        let pages = self.plan(segs, buf.len())?;
        let copied = pages.iter().filter(|p| p.is_none()).count();
        self.count(segs.len() - copied, copied);
        if copied == segs.len() {
            self.recycle(pages);
            return self.guest.copy_from_guest(segs, buf);
        }
        // The unmapped segments go in one grant copy (one hypercall), through a scratch
        // buffer scattered afterwards.
        let (rest, places) = unmapped(segs, &pages);
        if !rest.is_empty() {
            let mut scratch = vec![0u8; places.iter().map(|r| r.len()).sum()];
            self.guest.copy_from_guest(&rest, &mut scratch)?;
            let mut at = 0;
            for r in places {
                let n = r.len();
                buf[r].copy_from_slice(&scratch[at..at + n]);
                at += n;
            }
        }
        let mut pos = 0;
        for (s, page) in segs.iter().zip(&pages) {
            let end = pos + s.len as usize;
            if let Some(p) = page {
                p.mem.read(p.base + s.offset as usize, &mut buf[pos..end]);
            }
            pos = end;
        }
        self.recycle(pages);
        Ok(())
    }

    fn copy_to_guest(&self, segs: &[GrantSeg], buf: &[u8]) -> Result<(), String> {
        if !self.enabled {
            return self.guest.copy_to_guest(segs, buf);
        }
        let pages = self.plan(segs, buf.len())?;
        let copied = pages.iter().filter(|p| p.is_none()).count();
        self.count(segs.len() - copied, copied);
        if copied == segs.len() {
            self.recycle(pages);
            return self.guest.copy_to_guest(segs, buf);
        }
        let (rest, places) = unmapped(segs, &pages);
        if !rest.is_empty() {
            let scratch: Vec<u8> = places.into_iter().flat_map(|r| &buf[r]).copied().collect();
            self.guest.copy_to_guest(&rest, &scratch)?;
        }
        let mut pos = 0;
        for (s, page) in segs.iter().zip(&pages) {
            let end = pos + s.len as usize;
            if let Some(p) = page {
                p.mem.write(p.base + s.offset as usize, &buf[pos..end]);
            }
            pos = end;
        }
        self.recycle(pages);
        Ok(())
    }

    fn map_page(&self, gref: u32) -> Result<MappedPage, String> {
        self.guest.map_page(gref)
    }

    fn map_pages(&self, grefs: &[u32]) -> Result<Vec<MappedPage>, String> {
        self.guest.map_pages(grefs)
    }

    fn direct(&self, segs: &[GrantSeg]) -> Option<GuestPages> {
        PersistentGrants::direct(self, segs)
    }
}
