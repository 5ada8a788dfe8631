//! On-disk format of the thin pool's metadata file: 4 KiB pages with a checksummed
//! header, and one pack/unpack pair per page kind. Everything little endian. Decoding
//! checks the checksum (blake3 keyed by page kind and page number, so a page written to
//! the wrong place or read as the wrong kind fails), the version, the page number, the
//! payload length and the value ranges it can check without context.
//!
//! ```text
//! page: | header (64) | payload (4032) |
//! header: 0..32 checksum | 32..36 kind u32 | 36..40 version u32 | 40..48 page u64
//!         48..52 payload length u32 | 52..64 zero
//! ```

use thiserror::Error;

pub const PAGE_SIZE: usize = 4096;
pub const HEADER_SIZE: usize = 64;
pub const PAYLOAD_SIZE: usize = PAGE_SIZE - HEADER_SIZE;
pub const FORMAT_VERSION: u32 = 1;

/// Entries in a block-map leaf (24 bytes each).
pub const MAP_LEAF_ENTRIES: usize = PAYLOAD_SIZE / 24; // 168
/// Children in any interior node (u64 page numbers).
pub const INTERIOR_FANOUT: usize = PAYLOAD_SIZE / 8; // 504
/// Refcounts in a refcount leaf (u32 each).
pub const RC_LEAF_ENTRIES: usize = PAYLOAD_SIZE / 4; // 1008
/// Roots in a roots leaf (24 bytes each).
pub const ROOTS_LEAF_ENTRIES: usize = PAYLOAD_SIZE / 24; // 168
/// Catalogue bytes per catalogue page (payload minus next pointer and length).
pub const CATALOGUE_BYTES: usize = PAYLOAD_SIZE - 16;

pub const SUPER_MAGIC: [u8; 8] = *b"QTHINPL\x01";

/// Metadata page number (offset = page * 4096 in `pool.meta`). 0 and 1 are the superblock
/// slots, so 0 doubles as the null pointer in trees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PageNo(pub u64);

impl PageNo {
    pub const NULL: PageNo = PageNo(0);
    pub fn is_null(self) -> bool {
        self.0 == 0
    }
    pub fn offset(self) -> u64 {
        self.0 * PAGE_SIZE as u64
    }
}

impl std::fmt::Display for PageNo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Data chunk number (offset = chunk * chunk_size in `pool.data`). 0 means "unmapped".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Chunk(pub u64);

impl Chunk {
    pub const NONE: Chunk = Chunk(0);
    pub fn is_none(self) -> bool {
        self.0 == 0
    }
    pub fn offset(self, chunk_size: u64) -> u64 {
        self.0 * chunk_size
    }
}

impl std::fmt::Display for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Kind of a metadata page; part of the checksum key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum PageKind {
    Superblock = 1,
    MapInterior = 2,
    MapLeaf = 3,
    MetaRcInterior = 4,
    MetaRcLeaf = 5,
    DataRcInterior = 6,
    DataRcLeaf = 7,
    RootsInterior = 8,
    RootsLeaf = 9,
    Catalogue = 10,
}

impl PageKind {
    pub const ALL: [PageKind; 10] = [
        PageKind::Superblock,
        PageKind::MapInterior,
        PageKind::MapLeaf,
        PageKind::MetaRcInterior,
        PageKind::MetaRcLeaf,
        PageKind::DataRcInterior,
        PageKind::DataRcLeaf,
        PageKind::RootsInterior,
        PageKind::RootsLeaf,
        PageKind::Catalogue,
    ];

    pub fn from_u32(v: u32) -> Option<PageKind> {
        Self::ALL.into_iter().find(|k| *k as u32 == v)
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    #[error("metadata page {page} ({kind:?}): checksum mismatch")]
    Checksum { page: u64, kind: PageKind },
    #[error("metadata page {page}: expected a {expected:?} page, found kind {found}")]
    WrongKind {
        page: u64,
        expected: PageKind,
        found: u32,
    },
    #[error("metadata page {page} ({kind:?}): {reason}")]
    Invalid {
        page: u64,
        kind: PageKind,
        reason: String,
    },
}

fn checksum(kind: PageKind, page: PageNo, body: &[u8]) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(b"qubes-thin-page1");
    key[16..20].copy_from_slice(&(kind as u32).to_le_bytes());
    key[20..28].copy_from_slice(&page.0.to_le_bytes());
    *blake3::keyed_hash(&key, body).as_bytes()
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}
fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Wraps `payload` (at most 4032 bytes) into a full page with header and checksum.
pub fn seal(kind: PageKind, page: PageNo, payload: &[u8]) -> Box<[u8; PAGE_SIZE]> {
    assert!(payload.len() <= PAYLOAD_SIZE, "payload too large");
    let mut buf = Box::new([0u8; PAGE_SIZE]);
    put_u32(&mut buf[..], 32, kind as u32);
    put_u32(&mut buf[..], 36, FORMAT_VERSION);
    put_u64(&mut buf[..], 40, page.0);
    put_u32(&mut buf[..], 48, payload.len() as u32);
    buf[HEADER_SIZE..HEADER_SIZE + payload.len()].copy_from_slice(payload);
    let sum = checksum(kind, page, &buf[32..]);
    buf[..32].copy_from_slice(&sum);
    buf
}

/// Checks header and checksum of a page read from slot `page`; returns the payload.
pub fn open(kind: PageKind, page: PageNo, buf: &[u8]) -> Result<&[u8], FormatError> {
    if buf.len() != PAGE_SIZE {
        return Err(FormatError::Invalid {
            page: page.0,
            kind,
            reason: "short page".into(),
        });
    }
    let found = u32_at(buf, 32);
    if found != kind as u32 {
        // A page of another kind (or garbage) is reported as such only if its own
        // checksum holds; otherwise it is plain damage.
        if let Some(k) = PageKind::from_u32(found) {
            if checksum(k, page, &buf[32..])[..] == buf[..32] {
                return Err(FormatError::WrongKind {
                    page: page.0,
                    expected: kind,
                    found,
                });
            }
        }
        return Err(FormatError::Checksum { page: page.0, kind });
    }
    if checksum(kind, page, &buf[32..])[..] != buf[..32] {
        return Err(FormatError::Checksum { page: page.0, kind });
    }
    let invalid = |reason: String| FormatError::Invalid {
        page: page.0,
        kind,
        reason,
    };
    let version = u32_at(buf, 36);
    if version != FORMAT_VERSION {
        return Err(invalid(format!("unsupported format version {version}")));
    }
    if u64_at(buf, 40) != page.0 {
        return Err(invalid(format!("header says page {}", u64_at(buf, 40))));
    }
    let len = u32_at(buf, 48) as usize;
    if len > PAYLOAD_SIZE {
        return Err(invalid(format!("payload length {len}")));
    }
    Ok(&buf[HEADER_SIZE..HEADER_SIZE + len])
}

/// Superblock (pages 0 and 1), payload layout:
/// ```text
///  0..8   magic "QTHINPL\x01"      8..16  generation u64
/// 16..24  chunk_size u64          24..32  data chunks (capacity / chunk_size) u64
/// 32..40  meta high-water mark (pages in pool.meta) u64
/// 40..48  data high-water mark (highest chunk ever allocated) u64
/// 48..56  data chunks in use u64  56..64  meta pages in use u64
/// 64..72  meta-refcount root u64  72..76  its height u32
/// 76..84  data-refcount root u64  84..88  its height u32
/// 88..96  roots-array root u64    96..100 its height u32
/// 100..108 catalogue first page u64  108..116 catalogue length in bytes u64
/// 116..124 flags u64 (bit 0: NEEDS_CHECK)
/// ```
/// The payload length versions the superblock: 116 bytes (the first pools, no flags)
/// is still read; 124 is written. A reader that only knows 116 refuses the newer
/// superblock (it would ignore NEEDS_CHECK).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Superblock {
    pub generation: u64,
    pub chunk_size: u64,
    pub data_chunks: u64,
    pub meta_hw: u64,
    pub data_hw: u64,
    pub data_used: u64,
    pub meta_used: u64,
    pub meta_rc: TreeRoot,
    pub data_rc: TreeRoot,
    pub roots: TreeRoot,
    pub catalogue: PageNo,
    pub catalogue_len: u64,
    /// The pool stopped after a failed metadata update (dm-thin's `needs_check`): the
    /// next open verifies the metadata before using it.
    pub needs_check: bool,
}

/// Superblock flag bits.
pub const SB_NEEDS_CHECK: u64 = 1;

/// Root page and height (number of levels, >= 1) of a radix tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TreeRoot {
    pub page: PageNo,
    pub height: u32,
}

pub const SUPER_PAYLOAD: usize = 124;
/// The superblock payload of pools written before the flags word.
pub const SUPER_PAYLOAD_V1: usize = 116;
pub const MAX_HEIGHT: u32 = 8;

impl Superblock {
    pub fn pack(&self, slot: PageNo) -> Box<[u8; PAGE_SIZE]> {
        let mut p = [0u8; SUPER_PAYLOAD];
        p[..8].copy_from_slice(&SUPER_MAGIC);
        put_u64(&mut p, 8, self.generation);
        put_u64(&mut p, 16, self.chunk_size);
        put_u64(&mut p, 24, self.data_chunks);
        put_u64(&mut p, 32, self.meta_hw);
        put_u64(&mut p, 40, self.data_hw);
        put_u64(&mut p, 48, self.data_used);
        put_u64(&mut p, 56, self.meta_used);
        for (i, t) in [self.meta_rc, self.data_rc, self.roots].iter().enumerate() {
            put_u64(&mut p, 64 + 12 * i, t.page.0);
            put_u32(&mut p, 72 + 12 * i, t.height);
        }
        put_u64(&mut p, 100, self.catalogue.0);
        put_u64(&mut p, 108, self.catalogue_len);
        put_u64(
            &mut p,
            116,
            if self.needs_check { SB_NEEDS_CHECK } else { 0 },
        );
        seal(PageKind::Superblock, slot, &p)
    }

    pub fn unpack(slot: PageNo, buf: &[u8]) -> Result<Superblock, FormatError> {
        let p = open(PageKind::Superblock, slot, buf)?;
        let invalid = |reason: &str| FormatError::Invalid {
            page: slot.0,
            kind: PageKind::Superblock,
            reason: reason.into(),
        };
        if p.len() != SUPER_PAYLOAD && p.len() != SUPER_PAYLOAD_V1 {
            return Err(invalid("payload length"));
        }
        let flags = if p.len() >= SUPER_PAYLOAD {
            u64_at(p, 116)
        } else {
            0
        };
        if flags & !SB_NEEDS_CHECK != 0 {
            return Err(invalid("unknown flags"));
        }
        if p[..8] != SUPER_MAGIC {
            return Err(invalid("bad magic"));
        }
        let tree = |i: usize| TreeRoot {
            page: PageNo(u64_at(p, 64 + 12 * i)),
            height: u32_at(p, 72 + 12 * i),
        };
        let sb = Superblock {
            generation: u64_at(p, 8),
            chunk_size: u64_at(p, 16),
            data_chunks: u64_at(p, 24),
            meta_hw: u64_at(p, 32),
            data_hw: u64_at(p, 40),
            data_used: u64_at(p, 48),
            meta_used: u64_at(p, 56),
            meta_rc: tree(0),
            data_rc: tree(1),
            roots: tree(2),
            catalogue: PageNo(u64_at(p, 100)),
            catalogue_len: u64_at(p, 108),
            needs_check: flags & SB_NEEDS_CHECK != 0,
        };
        if !sb.chunk_size.is_power_of_two() || !(4096..=1 << 20).contains(&sb.chunk_size) {
            return Err(invalid("chunk size"));
        }
        if sb.meta_hw < 2
            || sb.data_hw > sb.data_chunks
            || sb.data_used > sb.data_chunks
            || sb.meta_used > sb.meta_hw
        {
            return Err(invalid("counters out of range"));
        }
        for t in [sb.meta_rc, sb.data_rc, sb.roots] {
            if t.height == 0 || t.height > MAX_HEIGHT || t.page.0 >= sb.meta_hw || t.page.0 == 1 {
                return Err(invalid("tree root out of range"));
            }
        }
        if sb.catalogue.0 < 2 || sb.catalogue.0 >= sb.meta_hw {
            return Err(invalid("catalogue page out of range"));
        }
        Ok(sb)
    }
}

/// One block-map entry (24 bytes): `chunk u64 | backing u64 | valid u64`.
/// `chunk == 0`: unmapped (then backing and valid are 0). `backing != 0`: sub-block `i`
/// reads from `chunk` if bit `i` of `valid` is set, else from `backing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MapEntry {
    pub chunk: Chunk,
    pub backing: Chunk,
    pub valid: u64,
}

impl MapEntry {
    pub const UNMAPPED: MapEntry = MapEntry {
        chunk: Chunk(0),
        backing: Chunk(0),
        valid: 0,
    };
    pub fn is_mapped(&self) -> bool {
        !self.chunk.is_none()
    }
}

/// Interior node of any tree: 504 child page numbers (u64), 0 = empty subtree.
pub fn pack_interior(kind: PageKind, page: PageNo, children: &[u64]) -> Box<[u8; PAGE_SIZE]> {
    debug_assert_eq!(children.len(), INTERIOR_FANOUT);
    let mut p = vec![0u8; PAYLOAD_SIZE];
    for (i, c) in children.iter().enumerate() {
        put_u64(&mut p, i * 8, *c);
    }
    seal(kind, page, &p)
}

/// Unpacks an interior node; children must be below `meta_hw` and not a superblock slot.
pub fn unpack_interior(
    kind: PageKind,
    page: PageNo,
    buf: &[u8],
    meta_hw: u64,
) -> Result<Vec<u64>, FormatError> {
    let p = open(kind, page, buf)?;
    if p.len() != PAYLOAD_SIZE {
        return Err(FormatError::Invalid {
            page: page.0,
            kind,
            reason: "payload length".into(),
        });
    }
    let mut out = Vec::with_capacity(INTERIOR_FANOUT);
    for i in 0..INTERIOR_FANOUT {
        let c = u64_at(p, i * 8);
        if c == 1 || (c != 0 && c >= meta_hw) {
            return Err(FormatError::Invalid {
                page: page.0,
                kind,
                reason: format!(
                    "child {i} points to page {c}, past the metadata high-water mark {meta_hw}"
                ),
            });
        }
        out.push(c);
    }
    Ok(out)
}

/// Block-map leaf: 168 [`MapEntry`]s.
pub fn pack_map_leaf(page: PageNo, entries: &[MapEntry]) -> Box<[u8; PAGE_SIZE]> {
    debug_assert_eq!(entries.len(), MAP_LEAF_ENTRIES);
    let mut p = vec![0u8; PAYLOAD_SIZE];
    for (i, e) in entries.iter().enumerate() {
        put_u64(&mut p, i * 24, e.chunk.0);
        put_u64(&mut p, i * 24 + 8, e.backing.0);
        put_u64(&mut p, i * 24 + 16, e.valid);
    }
    seal(PageKind::MapLeaf, page, &p)
}

/// Unpacks a block-map leaf, checking chunk numbers against the pool's chunk count and
/// valid bitmaps against the number of sub-blocks.
pub fn unpack_map_leaf(
    page: PageNo,
    buf: &[u8],
    data_chunks: u64,
    subs: u32,
) -> Result<Vec<MapEntry>, FormatError> {
    let kind = PageKind::MapLeaf;
    let p = open(kind, page, buf)?;
    let invalid = |reason: String| FormatError::Invalid {
        page: page.0,
        kind,
        reason,
    };
    if p.len() != PAYLOAD_SIZE {
        return Err(invalid("payload length".into()));
    }
    let mask = if subs >= 64 {
        u64::MAX
    } else {
        (1u64 << subs) - 1
    };
    let mut out = Vec::with_capacity(MAP_LEAF_ENTRIES);
    for i in 0..MAP_LEAF_ENTRIES {
        let e = MapEntry {
            chunk: Chunk(u64_at(p, i * 24)),
            backing: Chunk(u64_at(p, i * 24 + 8)),
            valid: u64_at(p, i * 24 + 16),
        };
        if e.chunk.0 > data_chunks || e.backing.0 > data_chunks {
            return Err(invalid(format!(
                "entry {i} points to data chunk {} / {} past the pool's {data_chunks} chunks",
                e.chunk, e.backing
            )));
        }
        if e.chunk.is_none() && (!e.backing.is_none() || e.valid != 0) {
            return Err(invalid(format!(
                "entry {i}: backing or valid bits on an unmapped entry"
            )));
        }
        if e.valid & !mask != 0 || (e.backing.is_none() && e.valid != 0) {
            return Err(invalid(format!(
                "entry {i}: valid bitmap {:#x} out of range",
                e.valid
            )));
        }
        out.push(e);
    }
    Ok(out)
}

/// Refcount leaf: 1008 u32 counts.
pub fn pack_rc_leaf(kind: PageKind, page: PageNo, counts: &[u32]) -> Box<[u8; PAGE_SIZE]> {
    debug_assert_eq!(counts.len(), RC_LEAF_ENTRIES);
    let mut p = vec![0u8; PAYLOAD_SIZE];
    for (i, c) in counts.iter().enumerate() {
        put_u32(&mut p, i * 4, *c);
    }
    seal(kind, page, &p)
}

pub fn unpack_rc_leaf(kind: PageKind, page: PageNo, buf: &[u8]) -> Result<Vec<u32>, FormatError> {
    let p = open(kind, page, buf)?;
    if p.len() != PAYLOAD_SIZE {
        return Err(FormatError::Invalid {
            page: page.0,
            kind,
            reason: "payload length".into(),
        });
    }
    Ok((0..RC_LEAF_ENTRIES).map(|i| u32_at(p, i * 4)).collect())
}

/// One roots-array entry (24 bytes): `root page u64 | height u32 | flags u32 (bit 0:
/// present) | mapped chunks u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RootEntry {
    pub root: PageNo,
    pub height: u32,
    pub present: bool,
    pub mapped: u64,
}

pub fn pack_roots_leaf(page: PageNo, entries: &[RootEntry]) -> Box<[u8; PAGE_SIZE]> {
    debug_assert_eq!(entries.len(), ROOTS_LEAF_ENTRIES);
    let mut p = vec![0u8; PAYLOAD_SIZE];
    for (i, e) in entries.iter().enumerate() {
        put_u64(&mut p, i * 24, e.root.0);
        put_u32(&mut p, i * 24 + 8, e.height);
        put_u32(&mut p, i * 24 + 12, e.present as u32);
        put_u64(&mut p, i * 24 + 16, e.mapped);
    }
    seal(PageKind::RootsLeaf, page, &p)
}

pub fn unpack_roots_leaf(
    page: PageNo,
    buf: &[u8],
    meta_hw: u64,
) -> Result<Vec<RootEntry>, FormatError> {
    let kind = PageKind::RootsLeaf;
    let p = open(kind, page, buf)?;
    let invalid = |reason: String| FormatError::Invalid {
        page: page.0,
        kind,
        reason,
    };
    if p.len() != PAYLOAD_SIZE {
        return Err(invalid("payload length".into()));
    }
    let mut out = Vec::with_capacity(ROOTS_LEAF_ENTRIES);
    for i in 0..ROOTS_LEAF_ENTRIES {
        let flags = u32_at(p, i * 24 + 12);
        let e = RootEntry {
            root: PageNo(u64_at(p, i * 24)),
            height: u32_at(p, i * 24 + 8),
            present: flags & 1 != 0,
            mapped: u64_at(p, i * 24 + 16),
        };
        if flags & !1 != 0 {
            return Err(invalid(format!("entry {i}: unknown flags {flags:#x}")));
        }
        if e.present
            && (e.height == 0
                || e.height > MAX_HEIGHT
                || e.root.0 == 1
                || (e.root.0 != 0 && e.root.0 >= meta_hw))
        {
            return Err(invalid(format!(
                "entry {i}: root {} height {} out of range",
                e.root, e.height
            )));
        }
        if !e.present && e != RootEntry::default_absent() {
            return Err(invalid(format!("entry {i}: data in an absent entry")));
        }
        out.push(e);
    }
    Ok(out)
}

impl RootEntry {
    pub fn default_absent() -> RootEntry {
        RootEntry::default()
    }
}

/// Catalogue page payload: `next page u64 | used bytes u32 | zero u32 | bytes[4016]`.
/// The catalogue is a chain of these holding one JSON document.
pub fn pack_catalogue(page: PageNo, next: PageNo, bytes: &[u8]) -> Box<[u8; PAGE_SIZE]> {
    assert!(bytes.len() <= CATALOGUE_BYTES);
    let mut p = vec![0u8; 16 + bytes.len()];
    put_u64(&mut p, 0, next.0);
    put_u32(&mut p, 8, bytes.len() as u32);
    p[16..].copy_from_slice(bytes);
    seal(PageKind::Catalogue, page, &p)
}

pub fn unpack_catalogue(
    page: PageNo,
    buf: &[u8],
    meta_hw: u64,
) -> Result<(PageNo, Vec<u8>), FormatError> {
    let kind = PageKind::Catalogue;
    let p = open(kind, page, buf)?;
    let invalid = |reason: String| FormatError::Invalid {
        page: page.0,
        kind,
        reason,
    };
    if p.len() < 16 {
        return Err(invalid("payload length".into()));
    }
    let next = u64_at(p, 0);
    let used = u32_at(p, 8) as usize;
    if used != p.len() - 16 {
        return Err(invalid(format!(
            "used length {used} disagrees with payload"
        )));
    }
    if next == 1 || (next != 0 && next >= meta_hw) {
        return Err(invalid(format!("next page {next} out of range")));
    }
    Ok((PageNo(next), p[16..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_tree() -> impl Strategy<Value = TreeRoot> {
        (2u64..1000, 1u32..=MAX_HEIGHT).prop_map(|(p, h)| TreeRoot {
            page: PageNo(p),
            height: h,
        })
    }

    proptest! {
        #[test]
        fn superblock_round_trip(gen in any::<u64>(), cs in 12u32..=20, chunks in 1u64..1<<40,
                                 used in 0u64..1000, mr in arb_tree(), dr in arb_tree(), rr in arb_tree(),
                                 cat in 2u64..1000, len in any::<u64>(), slot in 0u64..2) {
            let sb = Superblock { generation: gen, chunk_size: 1 << cs, data_chunks: chunks + 1000, meta_hw: 1000,
                data_hw: used, data_used: used, meta_used: used, meta_rc: mr, data_rc: dr, roots: rr,
                catalogue: PageNo(cat), catalogue_len: len, needs_check: gen % 3 == 0 };
            let page = sb.pack(PageNo(slot));
            prop_assert_eq!(Superblock::unpack(PageNo(slot), &page[..]).unwrap(), sb);
            // The other slot's key does not verify it.
            prop_assert!(Superblock::unpack(PageNo(1 - slot), &page[..]).is_err());
            // A pool written before the flags word (116-byte payload) still opens.
            let v1 = seal(PageKind::Superblock, PageNo(slot), &page[HEADER_SIZE..HEADER_SIZE + SUPER_PAYLOAD_V1]);
            prop_assert_eq!(Superblock::unpack(PageNo(slot), &v1[..]).unwrap(), Superblock { needs_check: false, ..sb });
        }

        #[test]
        fn map_leaf_round_trip(raw in proptest::collection::vec((0u64..100, 0u64..100, any::<u16>()), MAP_LEAF_ENTRIES), page in 2u64..1<<30) {
            let entries: Vec<MapEntry> = raw.iter().map(|&(c, b, v)| {
                if c == 0 { MapEntry::UNMAPPED }
                else if b == 0 { MapEntry { chunk: Chunk(c), backing: Chunk(0), valid: 0 } }
                else { MapEntry { chunk: Chunk(c), backing: Chunk(b), valid: v as u64 } }
            }).collect();
            let buf = pack_map_leaf(PageNo(page), &entries);
            prop_assert_eq!(unpack_map_leaf(PageNo(page), &buf[..], 100, 16).unwrap(), entries);
            prop_assert!(unpack_map_leaf(PageNo(page + 1), &buf[..], 100, 16).is_err());
        }

        #[test]
        fn rc_leaf_round_trip(counts in proptest::collection::vec(any::<u32>(), RC_LEAF_ENTRIES), page in 2u64..1<<30) {
            let buf = pack_rc_leaf(PageKind::DataRcLeaf, PageNo(page), &counts);
            prop_assert_eq!(unpack_rc_leaf(PageKind::DataRcLeaf, PageNo(page), &buf[..]).unwrap(), counts);
            let wrong = matches!(unpack_rc_leaf(PageKind::MetaRcLeaf, PageNo(page), &buf[..]), Err(FormatError::WrongKind { .. }));
            prop_assert!(wrong);
        }

        #[test]
        fn interior_round_trip(children in proptest::collection::vec(prop_oneof![Just(0u64), 2u64..5000], INTERIOR_FANOUT), page in 2u64..5000) {
            let buf = pack_interior(PageKind::MapInterior, PageNo(page), &children);
            prop_assert_eq!(unpack_interior(PageKind::MapInterior, PageNo(page), &buf[..], 5000).unwrap(), children);
        }

        #[test]
        fn roots_round_trip(raw in proptest::collection::vec(proptest::option::of((0u64..5000, 1u32..=MAX_HEIGHT, any::<u64>())), ROOTS_LEAF_ENTRIES)) {
            let entries: Vec<RootEntry> = raw.iter().map(|e| match e {
                Some((r, h, m)) => RootEntry { root: PageNo(if *r == 1 { 0 } else { *r }), height: *h, present: true, mapped: *m },
                None => RootEntry::default(),
            }).collect();
            let buf = pack_roots_leaf(PageNo(7), &entries);
            prop_assert_eq!(unpack_roots_leaf(PageNo(7), &buf[..], 5000).unwrap(), entries);
        }

        #[test]
        fn catalogue_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..CATALOGUE_BYTES), next in prop_oneof![Just(0u64), 2u64..100]) {
            let buf = pack_catalogue(PageNo(5), PageNo(next), &bytes);
            prop_assert_eq!(unpack_catalogue(PageNo(5), &buf[..], 100).unwrap(), (PageNo(next), bytes));
        }

        #[test]
        fn any_flipped_byte_is_caught(pos in 0usize..PAGE_SIZE, bit in 0u8..8) {
            let mut buf = pack_rc_leaf(PageKind::MetaRcLeaf, PageNo(9), &[3u32; RC_LEAF_ENTRIES]);
            buf[pos] ^= 1 << bit;
            prop_assert!(unpack_rc_leaf(PageKind::MetaRcLeaf, PageNo(9), &buf[..]).is_err());
        }
    }

    #[test]
    fn decode_rejects_out_of_range_values() {
        let mut children = vec![0u64; INTERIOR_FANOUT];
        children[3] = 77;
        let buf = pack_interior(PageKind::MapInterior, PageNo(4), &children);
        assert!(unpack_interior(PageKind::MapInterior, PageNo(4), &buf[..], 50).is_err());
        let mut entries = vec![MapEntry::UNMAPPED; MAP_LEAF_ENTRIES];
        entries[0] = MapEntry {
            chunk: Chunk(5),
            backing: Chunk(0),
            valid: 1,
        };
        let buf = pack_map_leaf(PageNo(4), &entries);
        assert!(unpack_map_leaf(PageNo(4), &buf[..], 100, 16).is_err());
    }
}
