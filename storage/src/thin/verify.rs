//! `verify` (as thin_check): walks every structure of the last commit straight from
//! `pool.meta` (no cache), checks every page's checksum, kind and ranges, recomputes the
//! metadata-page and data-chunk refcounts and each volume's mapped count, and reports
//! leaks (allocated, unreferenced), mismatches and dangling pointers by page, chunk and
//! volume key. Also reads the catalogue chain at open.

use std::collections::{BTreeMap, HashMap};

use super::format::*;
use super::meta::{read_page, CatalogueDoc, Geometry};
use super::Error;
use crate::io::BlockFile;
use crate::pool::VerifyReport;

/// Reads and parses the catalogue chain of `sb`; returns it with its pages.
pub(crate) fn read_catalogue(
    file: &dyn BlockFile,
    sb: &Superblock,
) -> Result<(CatalogueDoc, Vec<u64>), Error> {
    let mut bytes = Vec::new();
    let mut pages = Vec::new();
    let mut p = sb.catalogue;
    while !p.is_null() {
        if pages.len() as u64 > sb.meta_hw {
            return Err(Error::Inconsistent(format!(
                "catalogue chain loops at page {}",
                p.page
            )));
        }
        let buf = read_page(file, p.page)?;
        let (next, chunk) = unpack_catalogue(p, &buf[..], sb.meta_hw)?;
        pages.push(p.page.0);
        bytes.extend_from_slice(&chunk);
        p = next;
    }
    if bytes.len() as u64 != sb.catalogue_len {
        return Err(Error::Inconsistent(format!(
            "catalogue is {} bytes in pages {pages:?}, the superblock says {}",
            bytes.len(),
            sb.catalogue_len
        )));
    }
    let doc: CatalogueDoc = serde_json::from_slice(&bytes).map_err(|e| {
        Error::Inconsistent(format!("catalogue (pages {pages:?}) does not parse: {e}"))
    })?;
    Ok((doc, pages))
}

const MAX_MESSAGES: usize = 200;

/// Called with (pointer, first index, page bytes) for each leaf of an array tree.
type LeafFn<'a, 'b> = dyn FnMut(&mut Walk<'b>, PageRef, u64, &[u8]) + 'a;

/// What to do about a page that failed to decode, for the report: a stale page (lost
/// write) is not damage a re-read fixes, say so.
fn with_fix(e: &FormatError, scope: Scope) -> String {
    match (e, scope) {
        (FormatError::Stale { .. }, Scope::Volume) => format!(
            "{e}. The volume's map (and that of every volume this error names) cannot be \
             trusted: check the disk under pool.meta (dmesg, SMART), then remove the volume \
             and restore it from a backup or recreate it"
        ),
        (FormatError::Stale { .. }, Scope::Pool) => format!(
            "{e}. The pool's bookkeeping cannot be trusted: check the disk under pool.meta \
             (dmesg, SMART), then restore pool.meta and pool.data from a backup"
        ),
        _ => e.to_string(),
    }
}

#[derive(Clone, Copy)]
enum Scope {
    Volume,
    Pool,
}

struct Walk<'a> {
    file: &'a dyn BlockFile,
    sb: &'a Superblock,
    geo: Geometry,
    meta_refs: Vec<u32>,
    data_refs: Vec<u32>,
    kinds: BTreeMap<u64, PageKind>,
    /// Mapped entries below each block-map node already walked.
    mapped_below: HashMap<u64, u64>,
    errors: Vec<String>,
    suppressed: usize,
}

impl<'f> Walk<'f> {
    fn error(&mut self, msg: String) {
        if self.errors.len() < MAX_MESSAGES {
            self.errors.push(msg);
        } else {
            self.suppressed += 1;
        }
    }

    /// Counts one reference to `p`; true if this is the first one (walk below it).
    fn reference(&mut self, p: u64, kind: PageKind, from: &str) -> bool {
        if p < 2 || p >= self.sb.meta_hw {
            self.error(format!(
                "{from}: dangling pointer to metadata page {p} (high-water mark {})",
                self.sb.meta_hw
            ));
            return false;
        }
        self.meta_refs[p as usize] += 1;
        match self.kinds.get(&p) {
            Some(k) if *k != kind => {
                self.error(format!(
                    "{from}: metadata page {p} is referenced as {kind:?} and as {k:?}"
                ));
                false
            }
            Some(_) => false,
            None => {
                self.kinds.insert(p, kind);
                true
            }
        }
    }

    fn read(&mut self, p: u64, from: &str) -> Option<Box<[u8; PAGE_SIZE]>> {
        match read_page(self.file, PageNo(p)) {
            Ok(b) => Some(b),
            Err(e) => {
                self.error(format!("{from}: metadata page {p} unreadable: {e}"));
                None
            }
        }
    }

    /// Walks an array tree; calls `leaf` with (first index, page buffer) for each leaf.
    fn array(
        self: &mut Walk<'f>,
        root: TreeRoot,
        interior: PageKind,
        leaf_kind: PageKind,
        per_leaf: u64,
        name: &str,
        leaf: &mut LeafFn<'_, 'f>,
    ) {
        if root.page.is_null() {
            return;
        }
        let mut stack = vec![(root.page, root.height - 1, 0u64)];
        while let Some((r, level, base)) = stack.pop() {
            let kind = if level == 0 { leaf_kind } else { interior };
            if !self.reference(r.page.0, kind, name) {
                continue;
            }
            let Some(buf) = self.read(r.page.0, name) else {
                continue;
            };
            if level == 0 {
                leaf(self, r, base, &buf[..]);
                continue;
            }
            match unpack_interior(interior, r, &buf[..], self.sb.meta_hw) {
                Ok(children) => {
                    let span = per_leaf * (INTERIOR_FANOUT as u64).pow(level - 1);
                    for (i, c) in children.into_iter().enumerate() {
                        if !c.is_null() {
                            stack.push((c, level - 1, base + i as u64 * span));
                        }
                    }
                }
                Err(e) => self.error(format!("{name}: {}", with_fix(&e, Scope::Pool))),
            }
        }
    }

    /// Walks a block map node; returns the mapped entries below it.
    fn map(&mut self, r: PageRef, level: u32, key: &str) -> u64 {
        let p = r.page.0;
        let kind = if level == 0 {
            PageKind::MapLeaf
        } else {
            PageKind::MapInterior
        };
        let from = format!("volume {key}");
        if !self.reference(p, kind, &from) {
            return self.mapped_below.get(&p).copied().unwrap_or(0);
        }
        let Some(buf) = self.read(p, &from) else {
            return 0;
        };
        let mut mapped = 0;
        if level == 0 {
            match unpack_map_leaf(r, &buf[..], self.geo.data_chunks, self.geo.subs) {
                Ok(entries) => {
                    for e in entries {
                        for c in [e.chunk, e.backing] {
                            if !c.is_none() {
                                self.data_refs[c.0 as usize] += 1;
                            }
                        }
                        mapped += e.is_mapped() as u64;
                    }
                }
                Err(e) => self.error(format!("volume {key}: {}", with_fix(&e, Scope::Volume))),
            }
        } else {
            match unpack_interior(PageKind::MapInterior, r, &buf[..], self.sb.meta_hw) {
                Ok(children) => {
                    for c in children.into_iter().filter(|c| !c.is_null()) {
                        mapped += self.map(c, level - 1, key);
                    }
                }
                Err(e) => self.error(format!("volume {key}: {}", with_fix(&e, Scope::Volume))),
            }
        }
        self.mapped_below.insert(p, mapped);
        mapped
    }
}

/// Checks the committed state `sb`; returns the report and every referenced page's kind.
pub(crate) fn verify(
    file: &dyn BlockFile,
    sb: &Superblock,
) -> (VerifyReport, BTreeMap<u64, PageKind>) {
    let geo = Geometry::new(sb.chunk_size, sb.data_chunks);
    let mut w = Walk {
        file,
        sb,
        geo,
        meta_refs: vec![0; sb.meta_hw as usize],
        data_refs: vec![0; sb.data_chunks as usize + 1],
        kinds: BTreeMap::new(),
        mapped_below: HashMap::new(),
        errors: Vec::new(),
        suppressed: 0,
    };
    w.meta_refs[0] = 1;
    w.meta_refs[1] = 1;
    w.kinds.insert(0, PageKind::Superblock);
    w.kinds.insert(1, PageKind::Superblock);

    // Catalogue.
    let mut doc = None;
    let mut p = sb.catalogue;
    let mut bytes = Vec::new();
    loop {
        if !w.reference(p.page.0, PageKind::Catalogue, "catalogue") {
            break;
        }
        let Some(buf) = w.read(p.page.0, "catalogue") else {
            break;
        };
        match unpack_catalogue(p, &buf[..], sb.meta_hw) {
            Ok((next, b)) => {
                bytes.extend_from_slice(&b);
                if next.is_null() {
                    match serde_json::from_slice::<CatalogueDoc>(&bytes) {
                        Ok(d) if bytes.len() as u64 == sb.catalogue_len => doc = Some(d),
                        Ok(_) => w.error(format!(
                            "catalogue: {} bytes, superblock says {}",
                            bytes.len(),
                            sb.catalogue_len
                        )),
                        Err(e) => w.error(format!("catalogue: does not parse: {e}")),
                    }
                    break;
                }
                p = next;
            }
            Err(e) => {
                w.error(format!("catalogue: {}", with_fix(&e, Scope::Pool)));
                break;
            }
        }
    }

    // Refcount arrays and roots.
    let mut meta_rc: Vec<u32> = vec![0; sb.meta_hw as usize];
    let mut data_rc: Vec<u32> = vec![0; sb.data_chunks as usize + 1];
    let mut roots: BTreeMap<u64, RootEntry> = BTreeMap::new();
    let per = RC_LEAF_ENTRIES as u64;
    w.array(sb.meta_rc, PageKind::MetaRcInterior, PageKind::MetaRcLeaf, per, "metadata refcounts", &mut |w, p, base, buf| {
        match unpack_rc_leaf(PageKind::MetaRcLeaf, p, buf) {
            Ok(v) => {
                for (i, c) in v.into_iter().enumerate() {
                    let idx = base + i as u64;
                    if idx < sb.meta_hw {
                        meta_rc[idx as usize] = c;
                    } else if c != 0 {
                        w.error(format!("metadata refcounts: page {idx} past the high-water mark has refcount {c}"));
                    }
                }
            }
            Err(e) => w.error(format!("metadata refcounts: {}", with_fix(&e, Scope::Pool))),
        }
    });
    w.array(
        sb.data_rc,
        PageKind::DataRcInterior,
        PageKind::DataRcLeaf,
        per,
        "data refcounts",
        &mut |w, p, base, buf| match unpack_rc_leaf(PageKind::DataRcLeaf, p, buf) {
            Ok(v) => {
                for (i, c) in v.into_iter().enumerate() {
                    let idx = base + i as u64;
                    if idx >= 1 && idx <= sb.data_hw {
                        data_rc[idx as usize] = c;
                    } else if c != 0 {
                        w.error(format!(
                            "data refcounts: chunk {idx} outside 1..={} has refcount {c}",
                            sb.data_hw
                        ));
                    }
                }
            }
            Err(e) => w.error(format!("data refcounts: {}", with_fix(&e, Scope::Pool))),
        },
    );
    let rper = ROOTS_LEAF_ENTRIES as u64;
    w.array(
        sb.roots,
        PageKind::RootsInterior,
        PageKind::RootsLeaf,
        rper,
        "volume roots",
        &mut |w, p, base, buf| match unpack_roots_leaf(p, buf, sb.meta_hw) {
            Ok(v) => {
                for (i, e) in v.into_iter().enumerate() {
                    if e.present {
                        roots.insert(base + i as u64, e);
                    }
                }
            }
            Err(e) => w.error(format!("volume roots: {}", with_fix(&e, Scope::Pool))),
        },
    );

    // Block maps.
    let mut volumes = 0;
    if let Some(doc) = &doc {
        let mut seen = std::collections::HashSet::new();
        for v in &doc.volumes {
            volumes += 1;
            if !seen.insert(v.id) {
                w.error(format!(
                    "volume {}: id {} used twice in the catalogue",
                    v.key, v.id
                ));
                continue;
            }
            let Some(r) = roots.get(&v.id).copied() else {
                w.error(format!("volume {}: no root for id {}", v.key, v.id));
                continue;
            };
            let mapped = if r.root.is_null() {
                0
            } else {
                w.map(r.root, r.height - 1, &v.key)
            };
            if mapped != r.mapped {
                w.error(format!(
                    "volume {}: root says {} chunks mapped, the map holds {mapped}",
                    v.key, r.mapped
                ));
            }
        }
        for id in roots.keys() {
            if !seen.contains(id) {
                w.error(format!(
                    "volume roots: id {id} has a root but no catalogue entry"
                ));
            }
        }
    }

    // Refcounts.
    let mut report = VerifyReport {
        volumes,
        ..Default::default()
    };
    let (mut meta_used, mut data_used) = (0u64, 0u64);
    for (p, (&stored, found)) in meta_rc
        .iter()
        .zip(std::mem::take(&mut w.meta_refs))
        .enumerate()
    {
        meta_used += (stored > 0) as u64;
        report.metadata_pages += (found > 0) as u64;
        if stored == found {
            continue;
        }
        if found == 0 {
            report.leaks.push(format!(
                "leaked metadata page {p} (refcount {stored}, no references)"
            ));
        } else {
            let kind = w
                .kinds
                .get(&(p as u64))
                .map(|k| format!("{k:?}"))
                .unwrap_or_default();
            w.error(format!(
                "metadata page {p} ({kind}): refcount {stored}, {found} references"
            ));
        }
    }
    for (c, (&stored, found)) in data_rc
        .iter()
        .zip(std::mem::take(&mut w.data_refs))
        .enumerate()
        .skip(1)
    {
        data_used += (stored > 0) as u64;
        report.data_chunks += (found > 0) as u64;
        if stored == found {
            continue;
        }
        if found == 0 {
            report.leaks.push(format!(
                "leaked data chunk {c} (refcount {stored}, no references)"
            ));
        } else if c as u64 > sb.data_hw {
            w.error(format!(
                "data chunk {c} is referenced {found} times but lies past the high-water mark {}",
                sb.data_hw
            ));
        } else {
            w.error(format!(
                "data chunk {c}: refcount {stored}, {found} references"
            ));
        }
    }
    if meta_used != sb.meta_used {
        w.error(format!(
            "superblock counts {} metadata pages in use, refcounts say {meta_used}",
            sb.meta_used
        ));
    }
    if data_used != sb.data_used {
        w.error(format!(
            "superblock counts {} data chunks in use, refcounts say {data_used}",
            sb.data_used
        ));
    }
    if w.suppressed > 0 {
        let n = w.suppressed;
        w.errors.push(format!("... and {n} more errors"));
    }
    report.leaks.truncate(MAX_MESSAGES);
    report.errors = w.errors;
    (report, w.kinds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::FaultyFile;
    use crate::thin::{ThinOptions, ThinPool};
    use crate::Pool;

    /// A committed pool on in-memory files: volume `v` maps chunks 1..=3, snapshot `s`
    /// shares them.
    fn pool() -> (tempfile::TempDir, std::sync::Arc<ThinPool>, FaultyFile) {
        let dir = tempfile::tempdir().unwrap();
        let meta = FaultyFile::new();
        let opts = ThinOptions {
            chunk_size: 4096,
            capacity: 64 * 4096,
        };
        let p = ThinPool::create_with_io(
            dir.path(),
            opts,
            Box::new(meta.clone()),
            Box::new(FaultyFile::new()),
        )
        .unwrap();
        p.create_volume("v", 1 << 20).unwrap();
        p.open_volume("v", false)
            .unwrap()
            .write_at(&[1u8; 3 * 4096], 0)
            .unwrap();
        p.snapshot("v", "s").unwrap();
        p.commit().unwrap();
        assert!(p.verify().unwrap().is_clean());
        (dir, p, meta)
    }

    fn page_of(p: &ThinPool, kind: PageKind) -> u64 {
        p.metadata_pages()
            .unwrap()
            .into_iter()
            .find(|(_, k)| *k == kind)
            .unwrap()
            .0
             .0
    }

    /// The generation in a page's header.
    fn gen_of(buf: &[u8; PAGE_SIZE]) -> u64 {
        PageRef::of(buf).gen
    }

    /// Rewrites page `page` as `new` and re-seals every page pointing to it, up to the
    /// superblocks, so the pool stays self-consistent page by page: damage a buggy
    /// writer could do, which only the cross-checks of `verify` find.
    fn forge(meta: &FaultyFile, page: u64, new: &[u8; PAGE_SIZE]) {
        let old = read_page(meta, PageNo(page)).unwrap();
        meta.corrupt(PageNo(page).file_offset().unwrap(), &new[..]);
        let bytes = |r: PageRef| {
            let mut b = [0u8; REF_SIZE];
            b[..8].copy_from_slice(&r.page.0.to_le_bytes());
            b[8..16].copy_from_slice(&r.gen.to_le_bytes());
            b[16..].copy_from_slice(&r.sum.to_le_bytes());
            b
        };
        let (from, to) = (bytes(PageRef::of(&old)), bytes(PageRef::of(new)));
        let pages = meta.image().len() / PAGE_SIZE as u64;
        for q in (0..pages).filter(|&q| q != page) {
            let buf = read_page(meta, PageNo(q)).unwrap();
            let hits: Vec<usize> = buf[HEADER_SIZE..]
                .windows(REF_SIZE)
                .enumerate()
                .filter(|(_, w)| *w == from)
                .map(|(i, _)| HEADER_SIZE + i)
                .collect();
            if hits.is_empty() {
                continue;
            }
            let mut body = *buf;
            for i in hits {
                body[i..i + REF_SIZE].copy_from_slice(&to);
            }
            let kind = PageKind::from_u32(u32::from_le_bytes(body[32..36].try_into().unwrap()));
            let len = u32::from_le_bytes(body[48..52].try_into().unwrap()) as usize;
            let resealed = seal(
                kind.unwrap(),
                PageNo(q),
                gen_of(&buf),
                &body[HEADER_SIZE..HEADER_SIZE + len],
            );
            forge(meta, q, &resealed);
        }
    }

    /// Points the open pool at the superblock [`forge`] rewrote (`verify` checks the
    /// committed state the pool holds in memory).
    fn resync(p: &ThinPool, meta: &FaultyFile) {
        let mut m = p.state.lock();
        let slot = PageNo(m.sb.generation % 2);
        m.sb = Superblock::unpack(slot, &read_page(meta, slot).unwrap()[..]).unwrap();
    }

    fn rewrite_rc(meta: &FaultyFile, page: u64, kind: PageKind, f: impl FnOnce(&mut Vec<u32>)) {
        let buf = read_page(meta, PageNo(page)).unwrap();
        let mut counts = unpack_rc_leaf(kind, PageRef::of(&buf), &buf[..]).unwrap();
        f(&mut counts);
        forge(
            meta,
            page,
            &pack_rc_leaf(kind, PageNo(page), gen_of(&buf), &counts),
        );
    }

    #[test]
    fn reports_refcount_mismatch_and_leaks_by_number() {
        let (_d, p, meta) = pool();
        let leaf = page_of(&p, PageKind::DataRcLeaf);
        rewrite_rc(&meta, leaf, PageKind::DataRcLeaf, |c| {
            c[2] = 7; // referenced once (by the shared leaf)
        });
        resync(&p, &meta);
        let r = p.verify().unwrap();
        assert!(
            r.errors
                .iter()
                .any(|e| e.contains("data chunk 2: refcount 7, 1 references")),
            "{r:?}"
        );

        let (_d, p, meta) = pool();
        let leaf = page_of(&p, PageKind::MetaRcLeaf);
        let hw = p.state.lock().sb.meta_hw;
        // A leaked metadata page: count a page nothing points to (an old catalogue page).
        let used = p.metadata_pages().unwrap();
        let free = (2..hw)
            .find(|q| !used.iter().any(|(x, _)| x.0 == *q))
            .expect("a freed page");
        rewrite_rc(&meta, leaf, PageKind::MetaRcLeaf, |c| c[free as usize] = 1);
        resync(&p, &meta);
        let r = p.verify().unwrap();
        assert!(
            r.leaks
                .iter()
                .any(|e| e.contains(&format!("leaked metadata page {free}"))),
            "{r:?}"
        );
    }

    #[test]
    fn reports_leaked_chunks_and_dangling_pointers_with_volume_keys() {
        let (_d, p, meta) = pool();
        // Chunk 3 loses its reference: the leaf entry is cleared behind the pool's back.
        let leaf = page_of(&p, PageKind::MapLeaf);
        let buf = read_page(&meta, PageNo(leaf)).unwrap();
        let mut es = unpack_map_leaf(PageRef::of(&buf), &buf[..], 64, 1).unwrap();
        es[2] = MapEntry::UNMAPPED;
        forge(&meta, leaf, &pack_map_leaf(PageNo(leaf), gen_of(&buf), &es));
        resync(&p, &meta);
        let r = p.verify().unwrap();
        assert!(
            r.leaks.iter().any(|e| e.contains("leaked data chunk 3")),
            "{r:?}"
        );
        assert!(
            r.errors
                .iter()
                .any(|e| e.contains("volume s: root says 3 chunks mapped, the map holds 2")),
            "{r:?}"
        );

        // A child pointer past the metadata high-water mark, in a sealed (valid) page.
        let (_d, p, meta) = pool();
        let root = page_of(&p, PageKind::MapInterior);
        let hw = p.state.lock().sb.meta_hw;
        let buf = read_page(&meta, PageNo(root)).unwrap();
        let mut children =
            unpack_interior(PageKind::MapInterior, PageRef::of(&buf), &buf[..], hw).unwrap();
        children[7] = PageRef {
            page: PageNo(hw + 10),
            gen: 1,
            sum: 0,
        };
        forge(
            &meta,
            root,
            &pack_interior(PageKind::MapInterior, PageNo(root), gen_of(&buf), &children),
        );
        resync(&p, &meta);
        let r = p.verify().unwrap();
        let want = format!("child 7 points to page {}", hw + 10);
        assert!(
            r.errors
                .iter()
                .any(|e| e.starts_with("volume ") && e.contains(&want)),
            "{r:?}"
        );
    }
}
