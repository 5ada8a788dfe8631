//! On-disk format of the thin pool's metadata file: 4 KiB pages with a checksummed
//! header, and one pack/unpack pair per page kind. Everything little endian. Decoding
//! checks the checksum (blake3 keyed by page kind and page number, so a page written to
//! the wrong place or read as the wrong kind fails), the version, the page number, the
//! payload length and the value ranges it can check without context.
//!
//! ```text
//! page: | header (64) | payload (4032) |
//! header: 0..32 checksum | 32..36 kind u32 | 36..40 version u32 | 40..48 page u64
//!         48..52 payload length u32 | 52..60 generation u64 | 60..64 zero
//! ```
//!
//! Lost writes (format version 2): a checksum keyed by kind and page number cannot tell
//! a page's current image from an older image of the same page, which is what the page
//! holds when the disk acknowledged a write and never made it (the page was freed and
//! reused). So every pointer to a page is a [`PageRef`]: the page number, the generation
//! of the commit that wrote the page (also in the page's header) and the first 8 bytes
//! of its checksum, as btrfs (generation) and ZFS (checksum) keep them in the parent.
//! A page that checks out on its own but not against its parent's record is
//! [`FormatError::Stale`]. Pages are sealed children first, so a parent always records
//! its children's final checksums; the superblock records the roots.
//!
//! Version 1 (bare u64 page numbers, 504 children per interior node) is not read: a
//! version-1 pool is refused at open with [`FormatError::OldFormat`].

use thiserror::Error;

pub const PAGE_SIZE: usize = 4096;
pub const HEADER_SIZE: usize = 64;
pub const PAYLOAD_SIZE: usize = PAGE_SIZE - HEADER_SIZE;
/// 2: pointers carry the child's generation and checksum ([`PageRef`]).
pub const FORMAT_VERSION: u32 = 2;
/// The first format: bare page numbers; refused at open (no migration).
pub const FORMAT_VERSION_V1: u32 = 1;

/// Bytes of a [`PageRef`] on disk: `page u64 | generation u64 | checksum prefix u64`.
pub const REF_SIZE: usize = 24;
/// Entries in a block-map leaf (24 bytes each).
pub const MAP_LEAF_ENTRIES: usize = PAYLOAD_SIZE / 24; // 168
/// Children in any interior node ([`PageRef`]s).
pub const INTERIOR_FANOUT: usize = PAYLOAD_SIZE / REF_SIZE; // 168
/// Refcounts in a refcount leaf (u32 each).
pub const RC_LEAF_ENTRIES: usize = PAYLOAD_SIZE / 4; // 1008
/// Roots in a roots leaf (40 bytes each).
pub const ROOTS_LEAF_ENTRIES: usize = PAYLOAD_SIZE / ROOT_ENTRY_SIZE; // 100
const ROOT_ENTRY_SIZE: usize = REF_SIZE + 16;
/// Catalogue bytes per catalogue page (payload minus next pointer and length).
pub const CATALOGUE_BYTES: usize = PAYLOAD_SIZE - REF_SIZE - 8;

pub const SUPER_MAGIC: [u8; 8] = *b"QTHINPL\x02";

/// Metadata page number (offset = page * 4096 in `pool.meta`, see [`PageNo::byte_offset`]). 0 and 1 are the superblock
/// slots, so 0 doubles as the null pointer in trees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PageNo(pub u64);

impl PageNo {
    pub const NULL: PageNo = PageNo(0);
    pub fn is_null(self) -> bool {
        self.0 == 0
    }
}

impl std::fmt::Display for PageNo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A pointer to a metadata page with what the pointer's holder knows of the page: the
/// generation of the commit that wrote it and the first 8 bytes of its checksum. A
/// pointer to a page of this transaction, not sealed yet, has generation 0 (no commit
/// has generation 0) until the commit seals the page and fills it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PageRef {
    pub page: PageNo,
    pub gen: u64,
    pub sum: u64,
}

impl PageRef {
    pub const NULL: PageRef = PageRef {
        page: PageNo(0),
        gen: 0,
        sum: 0,
    };
    /// A pointer to a page this transaction has not sealed yet.
    pub fn unsealed(page: u64) -> PageRef {
        PageRef {
            page: PageNo(page),
            gen: 0,
            sum: 0,
        }
    }
    pub fn is_null(self) -> bool {
        self.page.is_null()
    }
    /// The pointer to a page sealed by [`seal`].
    pub fn of(buf: &[u8; PAGE_SIZE]) -> PageRef {
        PageRef {
            page: PageNo(u64_at(buf, 40)),
            gen: u64_at(buf, 52),
            sum: u64_at(buf, 0),
        }
    }
}

/// Data chunk number (offset = chunk * chunk_size in `pool.data`, see
/// `Geometry::data_offset`). 0 means "unmapped".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Chunk(pub u64);

impl Chunk {
    pub const NONE: Chunk = Chunk(0);
    pub fn is_none(self) -> bool {
        self.0 == 0
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
    #[error(
        "metadata page {page} ({kind:?}) is stale: its parent records the image written at \
         generation {expected_gen} (checksum {expected_sum:016x}), the page holds {} \
         (checksum {found_sum:016x}); a write to pool.meta was acknowledged but never reached \
         the disk (a lost write)",
        if found_gen == expected_gen { format!("another image of generation {found_gen}") } else { format!("the image of generation {found_gen}") }
    )]
    Stale {
        page: u64,
        kind: PageKind,
        expected_gen: u64,
        expected_sum: u64,
        found_gen: u64,
        found_sum: u64,
    },
    #[error(
        "metadata format version {found} (this build reads version {FORMAT_VERSION}, which \
         records each page's generation and checksum in its parent to detect lost writes)"
    )]
    OldFormat { found: u32 },
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
fn ref_at(b: &[u8], off: usize) -> PageRef {
    PageRef {
        page: PageNo(u64_at(b, off)),
        gen: u64_at(b, off + 8),
        sum: u64_at(b, off + 16),
    }
}
fn put_ref(b: &mut [u8], off: usize, r: PageRef) {
    put_u64(b, off, r.page.0);
    put_u64(b, off + 8, r.gen);
    put_u64(b, off + 16, r.sum);
}

/// Wraps `payload` (at most 4032 bytes) into a full page with header and checksum;
/// `gen` is the generation of the commit that writes it. [`PageRef::of`] the result is
/// what a parent records.
pub fn seal(kind: PageKind, page: PageNo, gen: u64, payload: &[u8]) -> Box<[u8; PAGE_SIZE]> {
    assert!(payload.len() <= PAYLOAD_SIZE, "payload too large");
    let mut buf = Box::new([0u8; PAGE_SIZE]);
    put_u32(&mut buf[..], 32, kind as u32);
    put_u32(&mut buf[..], 36, FORMAT_VERSION);
    put_u64(&mut buf[..], 40, page.0);
    put_u32(&mut buf[..], 48, payload.len() as u32);
    put_u64(&mut buf[..], 52, gen);
    buf[HEADER_SIZE..HEADER_SIZE + payload.len()].copy_from_slice(payload);
    let sum = checksum(kind, page, &buf[32..]);
    buf[..32].copy_from_slice(&sum);
    buf
}

/// Checks header and checksum of a page read through pointer `r`, and that it is the
/// image `r` records (generation and checksum); returns the payload.
pub fn open(kind: PageKind, r: PageRef, buf: &[u8]) -> Result<&[u8], FormatError> {
    let (payload, gen) = open_unrooted(kind, r.page, buf)?;
    let sum = u64_at(buf, 0);
    if gen != r.gen || sum != r.sum {
        return Err(FormatError::Stale {
            page: r.page.0,
            kind,
            expected_gen: r.gen,
            expected_sum: r.sum,
            found_gen: gen,
            found_sum: sum,
        });
    }
    Ok(payload)
}

/// [`open`] for a page no pointer leads to (the superblock slots): header and checksum
/// only; returns the payload and the page's generation.
pub fn open_unrooted(
    kind: PageKind,
    page: PageNo,
    buf: &[u8],
) -> Result<(&[u8], u64), FormatError> {
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
    if version == FORMAT_VERSION_V1 {
        return Err(FormatError::OldFormat { found: version });
    }
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
    if buf[60..64] != [0; 4] {
        return Err(invalid("header padding not zero".into()));
    }
    Ok((&buf[HEADER_SIZE..HEADER_SIZE + len], u64_at(buf, 52)))
}

/// Superblock (pages 0 and 1), payload layout (format version 2):
/// ```text
///  0..8   magic "QTHINPL\x02"      8..16  generation u64
/// 16..24  chunk_size u64          24..32  data chunks (capacity / chunk_size) u64
/// 32..40  meta high-water mark (pages in pool.meta) u64
/// 40..48  data high-water mark (highest chunk ever allocated) u64
/// 48..56  data chunks in use u64  56..64  meta pages in use u64
/// 64..72  flags u64 (bit 0: NEEDS_CHECK)
/// 72..104   meta-refcount root: PageRef (24) | height u32 | zero u32
/// 104..136  data-refcount root, same layout
/// 136..168  roots-array root, same layout
/// 168..192  catalogue first page: PageRef   192..200 catalogue length in bytes u64
/// ```
/// Version 1 (no generations in pointers) had a 116- or 124-byte payload; its pages
/// carry header version 1 and are refused with [`FormatError::OldFormat`].
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
    pub catalogue: PageRef,
    pub catalogue_len: u64,
    /// The pool stopped after a failed metadata update (dm-thin's `needs_check`): the
    /// next open verifies the metadata before using it.
    pub needs_check: bool,
}

/// Superblock flag bits.
pub const SB_NEEDS_CHECK: u64 = 1;

/// Root pointer and height (number of levels, >= 1) of a radix tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TreeRoot {
    pub page: PageRef,
    pub height: u32,
}

pub const SUPER_PAYLOAD: usize = 200;
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
        put_u64(
            &mut p,
            64,
            if self.needs_check { SB_NEEDS_CHECK } else { 0 },
        );
        for (i, t) in [self.meta_rc, self.data_rc, self.roots].iter().enumerate() {
            put_ref(&mut p, 72 + 32 * i, t.page);
            put_u32(&mut p, 72 + 32 * i + 24, t.height);
        }
        put_ref(&mut p, 168, self.catalogue);
        put_u64(&mut p, 192, self.catalogue_len);
        seal(PageKind::Superblock, slot, self.generation, &p)
    }

    pub fn unpack(slot: PageNo, buf: &[u8]) -> Result<Superblock, FormatError> {
        let (p, _) = open_unrooted(PageKind::Superblock, slot, buf)?;
        let invalid = |reason: &str| FormatError::Invalid {
            page: slot.0,
            kind: PageKind::Superblock,
            reason: reason.into(),
        };
        if p.len() != SUPER_PAYLOAD {
            return Err(invalid("payload length"));
        }
        let flags = u64_at(p, 64);
        if flags & !SB_NEEDS_CHECK != 0 {
            return Err(invalid("unknown flags"));
        }
        if p[..8] != SUPER_MAGIC {
            return Err(invalid("bad magic"));
        }
        let tree = |i: usize| TreeRoot {
            page: ref_at(p, 72 + 32 * i),
            height: u32_at(p, 72 + 32 * i + 24),
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
            catalogue: ref_at(p, 168),
            catalogue_len: u64_at(p, 192),
            needs_check: flags & SB_NEEDS_CHECK != 0,
        };
        if (0..3).any(|i| u32_at(p, 72 + 32 * i + 28) != 0) {
            return Err(invalid("tree root padding not zero"));
        }
        if !sb.chunk_size.is_power_of_two() || !(4096..=1 << 20).contains(&sb.chunk_size) {
            return Err(invalid("chunk size"));
        }
        // Offsets of every page and chunk must fit in a file: a product that wrapped
        // would read another page or chunk.
        if super::units::data_file_len(sb.chunk_size, sb.data_chunks).is_none()
            || sb.meta_hw > super::units::MAX_META_PAGES
        {
            return Err(invalid("pool larger than a file can be"));
        }
        if sb.meta_hw < 2
            || sb.data_hw > sb.data_chunks
            || sb.data_used > sb.data_chunks
            || sb.meta_used > sb.meta_hw
        {
            return Err(invalid("counters out of range"));
        }
        for t in [sb.meta_rc, sb.data_rc, sb.roots] {
            let pg = t.page.page.0;
            if t.height == 0 || t.height > MAX_HEIGHT || pg >= sb.meta_hw || pg == 1 {
                return Err(invalid("tree root out of range"));
            }
        }
        if sb.catalogue.page.0 < 2 || sb.catalogue.page.0 >= sb.meta_hw {
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

/// Interior node of any tree: 168 child [`PageRef`]s, null = empty subtree.
pub fn pack_interior(
    kind: PageKind,
    page: PageNo,
    gen: u64,
    children: &[PageRef],
) -> Box<[u8; PAGE_SIZE]> {
    debug_assert_eq!(children.len(), INTERIOR_FANOUT);
    let mut p = vec![0u8; PAYLOAD_SIZE];
    for (i, c) in children.iter().enumerate() {
        put_ref(&mut p, i * REF_SIZE, *c);
    }
    seal(kind, page, gen, &p)
}

/// Unpacks an interior node reached through `r`; children must be below `meta_hw`,
/// not a superblock slot, and (being committed) have a generation.
pub fn unpack_interior(
    kind: PageKind,
    r: PageRef,
    buf: &[u8],
    meta_hw: u64,
) -> Result<Vec<PageRef>, FormatError> {
    let p = open(kind, r, buf)?;
    let invalid = |reason: String| FormatError::Invalid {
        page: r.page.0,
        kind,
        reason,
    };
    if p.len() != PAYLOAD_SIZE {
        return Err(invalid("payload length".into()));
    }
    let mut out = Vec::with_capacity(INTERIOR_FANOUT);
    for i in 0..INTERIOR_FANOUT {
        let c = ref_at(p, i * REF_SIZE);
        check_ref(c, meta_hw).map_err(|why| invalid(format!("child {i} {why}")))?;
        out.push(c);
    }
    Ok(out)
}

/// Range checks of a committed pointer.
fn check_ref(r: PageRef, meta_hw: u64) -> Result<(), String> {
    let c = r.page.0;
    if r.is_null() {
        if r != PageRef::NULL {
            return Err("is null but has a generation or checksum".into());
        }
        return Ok(());
    }
    if c == 1 || c >= meta_hw {
        return Err(format!(
            "points to page {c}, past the metadata high-water mark {meta_hw}"
        ));
    }
    if r.gen == 0 {
        return Err(format!("points to page {c} without a generation"));
    }
    Ok(())
}

/// Block-map leaf: 168 [`MapEntry`]s.
pub fn pack_map_leaf(page: PageNo, gen: u64, entries: &[MapEntry]) -> Box<[u8; PAGE_SIZE]> {
    debug_assert_eq!(entries.len(), MAP_LEAF_ENTRIES);
    let mut p = vec![0u8; PAYLOAD_SIZE];
    for (i, e) in entries.iter().enumerate() {
        put_u64(&mut p, i * 24, e.chunk.0);
        put_u64(&mut p, i * 24 + 8, e.backing.0);
        put_u64(&mut p, i * 24 + 16, e.valid);
    }
    seal(PageKind::MapLeaf, page, gen, &p)
}

/// Unpacks a block-map leaf, checking chunk numbers against the pool's chunk count and
/// valid bitmaps against the number of sub-blocks.
pub fn unpack_map_leaf(
    r: PageRef,
    buf: &[u8],
    data_chunks: u64,
    subs: u32,
) -> Result<Vec<MapEntry>, FormatError> {
    let kind = PageKind::MapLeaf;
    let p = open(kind, r, buf)?;
    let invalid = |reason: String| FormatError::Invalid {
        page: r.page.0,
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
pub fn pack_rc_leaf(
    kind: PageKind,
    page: PageNo,
    gen: u64,
    counts: &[u32],
) -> Box<[u8; PAGE_SIZE]> {
    debug_assert_eq!(counts.len(), RC_LEAF_ENTRIES);
    let mut p = vec![0u8; PAYLOAD_SIZE];
    for (i, c) in counts.iter().enumerate() {
        put_u32(&mut p, i * 4, *c);
    }
    seal(kind, page, gen, &p)
}

pub fn unpack_rc_leaf(kind: PageKind, r: PageRef, buf: &[u8]) -> Result<Vec<u32>, FormatError> {
    let p = open(kind, r, buf)?;
    if p.len() != PAYLOAD_SIZE {
        return Err(FormatError::Invalid {
            page: r.page.0,
            kind,
            reason: "payload length".into(),
        });
    }
    Ok((0..RC_LEAF_ENTRIES).map(|i| u32_at(p, i * 4)).collect())
}

/// One roots-array entry (40 bytes): `root PageRef (24) | height u32 | flags u32 (bit 0:
/// present) | mapped chunks u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RootEntry {
    pub root: PageRef,
    pub height: u32,
    pub present: bool,
    pub mapped: u64,
}

pub fn pack_roots_leaf(page: PageNo, gen: u64, entries: &[RootEntry]) -> Box<[u8; PAGE_SIZE]> {
    debug_assert_eq!(entries.len(), ROOTS_LEAF_ENTRIES);
    let mut p = vec![0u8; PAYLOAD_SIZE];
    for (i, e) in entries.iter().enumerate() {
        let o = i * ROOT_ENTRY_SIZE;
        put_ref(&mut p, o, e.root);
        put_u32(&mut p, o + 24, e.height);
        put_u32(&mut p, o + 28, e.present as u32);
        put_u64(&mut p, o + 32, e.mapped);
    }
    seal(PageKind::RootsLeaf, page, gen, &p)
}

pub fn unpack_roots_leaf(
    r: PageRef,
    buf: &[u8],
    meta_hw: u64,
) -> Result<Vec<RootEntry>, FormatError> {
    let kind = PageKind::RootsLeaf;
    let p = open(kind, r, buf)?;
    let invalid = |reason: String| FormatError::Invalid {
        page: r.page.0,
        kind,
        reason,
    };
    if p.len() != PAYLOAD_SIZE {
        return Err(invalid("payload length".into()));
    }
    let mut out = Vec::with_capacity(ROOTS_LEAF_ENTRIES);
    for i in 0..ROOTS_LEAF_ENTRIES {
        let o = i * ROOT_ENTRY_SIZE;
        let flags = u32_at(p, o + 28);
        let e = RootEntry {
            root: ref_at(p, o),
            height: u32_at(p, o + 24),
            present: flags & 1 != 0,
            mapped: u64_at(p, o + 32),
        };
        if flags & !1 != 0 {
            return Err(invalid(format!("entry {i}: unknown flags {flags:#x}")));
        }
        if e.present {
            if e.height == 0 || e.height > MAX_HEIGHT {
                return Err(invalid(format!(
                    "entry {i}: height {} out of range",
                    e.height
                )));
            }
            check_ref(e.root, meta_hw).map_err(|why| invalid(format!("entry {i}: root {why}")))?;
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

/// Catalogue page payload: `next PageRef (24) | used bytes u32 | zero u32 | bytes[4000]`.
/// The catalogue is a chain of these holding one JSON document, sealed last page first
/// so each records the next one's generation and checksum.
pub fn pack_catalogue(page: PageNo, gen: u64, next: PageRef, bytes: &[u8]) -> Box<[u8; PAGE_SIZE]> {
    assert!(bytes.len() <= CATALOGUE_BYTES);
    let mut p = vec![0u8; REF_SIZE + 8 + bytes.len()];
    put_ref(&mut p, 0, next);
    put_u32(&mut p, REF_SIZE, bytes.len() as u32);
    p[REF_SIZE + 8..].copy_from_slice(bytes);
    seal(PageKind::Catalogue, page, gen, &p)
}

pub fn unpack_catalogue(
    r: PageRef,
    buf: &[u8],
    meta_hw: u64,
) -> Result<(PageRef, Vec<u8>), FormatError> {
    let kind = PageKind::Catalogue;
    let p = open(kind, r, buf)?;
    let invalid = |reason: String| FormatError::Invalid {
        page: r.page.0,
        kind,
        reason,
    };
    if p.len() < REF_SIZE + 8 {
        return Err(invalid("payload length".into()));
    }
    let next = ref_at(p, 0);
    let used = u32_at(p, REF_SIZE) as usize;
    if used != p.len() - REF_SIZE - 8 {
        return Err(invalid(format!(
            "used length {used} disagrees with payload"
        )));
    }
    check_ref(next, meta_hw).map_err(|why| invalid(format!("next page {why}")))?;
    Ok((next, p[REF_SIZE + 8..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_ref() -> impl Strategy<Value = PageRef> {
        (2u64..1000, 1u64..u64::MAX, any::<u64>()).prop_map(|(p, gen, sum)| PageRef {
            page: PageNo(p),
            gen,
            sum,
        })
    }

    fn arb_tree() -> impl Strategy<Value = TreeRoot> {
        (arb_ref(), 1u32..=MAX_HEIGHT).prop_map(|(page, height)| TreeRoot { page, height })
    }

    /// The pointer a parent records to `buf`.
    fn r(buf: &[u8; PAGE_SIZE]) -> PageRef {
        PageRef::of(buf)
    }

    proptest! {
        #[test]
        fn superblock_round_trip(gen in any::<u64>(), cs in 12u32..=20, chunks in 1u64..1<<40,
                                 used in 0u64..1000, mr in arb_tree(), dr in arb_tree(), rr in arb_tree(),
                                 cat in arb_ref(), len in any::<u64>(), slot in 0u64..2) {
            let sb = Superblock { generation: gen, chunk_size: 1 << cs, data_chunks: chunks + 1000, meta_hw: 1000,
                data_hw: used, data_used: used, meta_used: used, meta_rc: mr, data_rc: dr, roots: rr,
                catalogue: cat, catalogue_len: len, needs_check: gen % 3 == 0 };
            let page = sb.pack(PageNo(slot));
            prop_assert_eq!(Superblock::unpack(PageNo(slot), &page[..]).unwrap(), sb);
            // The other slot's key does not verify it.
            prop_assert!(Superblock::unpack(PageNo(1 - slot), &page[..]).is_err());
        }

        #[test]
        fn map_leaf_round_trip(raw in proptest::collection::vec((0u64..100, 0u64..100, any::<u16>()), MAP_LEAF_ENTRIES), page in 2u64..1<<30, gen in 1u64..1000) {
            let entries: Vec<MapEntry> = raw.iter().map(|&(c, b, v)| {
                if c == 0 { MapEntry::UNMAPPED }
                else if b == 0 { MapEntry { chunk: Chunk(c), backing: Chunk(0), valid: 0 } }
                else { MapEntry { chunk: Chunk(c), backing: Chunk(b), valid: v as u64 } }
            }).collect();
            let buf = pack_map_leaf(PageNo(page), gen, &entries);
            prop_assert_eq!(unpack_map_leaf(r(&buf), &buf[..], 100, 16).unwrap(), entries);
            let moved = PageRef { page: PageNo(page + 1), ..r(&buf) };
            prop_assert!(unpack_map_leaf(moved, &buf[..], 100, 16).is_err());
        }

        #[test]
        fn rc_leaf_round_trip(counts in proptest::collection::vec(any::<u32>(), RC_LEAF_ENTRIES), page in 2u64..1<<30) {
            let buf = pack_rc_leaf(PageKind::DataRcLeaf, PageNo(page), 7, &counts);
            prop_assert_eq!(unpack_rc_leaf(PageKind::DataRcLeaf, r(&buf), &buf[..]).unwrap(), counts);
            let wrong = matches!(unpack_rc_leaf(PageKind::MetaRcLeaf, r(&buf), &buf[..]), Err(FormatError::WrongKind { .. }));
            prop_assert!(wrong);
        }

        #[test]
        fn interior_round_trip(children in proptest::collection::vec(prop_oneof![Just(PageRef::NULL), arb_ref()], INTERIOR_FANOUT), page in 2u64..5000) {
            let buf = pack_interior(PageKind::MapInterior, PageNo(page), 3, &children);
            prop_assert_eq!(unpack_interior(PageKind::MapInterior, r(&buf), &buf[..], 5000).unwrap(), children);
        }

        #[test]
        fn roots_round_trip(raw in proptest::collection::vec(proptest::option::of((prop_oneof![Just(PageRef::NULL), arb_ref()], 1u32..=MAX_HEIGHT, any::<u64>())), ROOTS_LEAF_ENTRIES)) {
            let entries: Vec<RootEntry> = raw.iter().map(|e| match e {
                Some((root, h, m)) => RootEntry { root: *root, height: *h, present: true, mapped: *m },
                None => RootEntry::default(),
            }).collect();
            let buf = pack_roots_leaf(PageNo(7), 9, &entries);
            prop_assert_eq!(unpack_roots_leaf(r(&buf), &buf[..], 5000).unwrap(), entries);
        }

        #[test]
        fn catalogue_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..CATALOGUE_BYTES), next in prop_oneof![Just(PageRef::NULL), arb_ref()]) {
            let buf = pack_catalogue(PageNo(5), 4, next, &bytes);
            prop_assert_eq!(unpack_catalogue(r(&buf), &buf[..], 1000).unwrap(), (next, bytes));
        }

        #[test]
        fn any_flipped_byte_is_caught(pos in 0usize..PAGE_SIZE, bit in 0u8..8) {
            let mut buf = pack_rc_leaf(PageKind::MetaRcLeaf, PageNo(9), 5, &[3u32; RC_LEAF_ENTRIES]);
            let want = r(&buf);
            buf[pos] ^= 1 << bit;
            prop_assert!(unpack_rc_leaf(PageKind::MetaRcLeaf, want, &buf[..]).is_err());
        }
    }

    /// An older image of the same page checks out on its own (its checksum is keyed by
    /// kind and page number only) but not against the pointer to the newer image.
    #[test]
    fn an_older_image_of_the_page_is_stale() {
        let old = pack_rc_leaf(PageKind::DataRcLeaf, PageNo(9), 5, &[1u32; RC_LEAF_ENTRIES]);
        let new = pack_rc_leaf(PageKind::DataRcLeaf, PageNo(9), 8, &[2u32; RC_LEAF_ENTRIES]);
        let e = unpack_rc_leaf(PageKind::DataRcLeaf, r(&new), &old[..]).unwrap_err();
        assert!(
            matches!(
                e,
                FormatError::Stale {
                    page: 9,
                    expected_gen: 8,
                    found_gen: 5,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("lost write"), "{e}");
        // Same generation, other content (a transaction that crashed before its
        // superblock, redone): the checksum prefix tells them apart.
        let other = pack_rc_leaf(PageKind::DataRcLeaf, PageNo(9), 8, &[3u32; RC_LEAF_ENTRIES]);
        let e = unpack_rc_leaf(PageKind::DataRcLeaf, r(&new), &other[..]).unwrap_err();
        assert!(
            matches!(e, FormatError::Stale { found_gen: 8, .. }),
            "{e:?}"
        );
    }

    /// A version-1 page (the format before generations in pointers) is refused as such.
    #[test]
    fn version_1_pages_are_old_format() {
        let mut buf = pack_rc_leaf(PageKind::DataRcLeaf, PageNo(9), 5, &[1u32; RC_LEAF_ENTRIES]);
        put_u32(&mut buf[..], 36, FORMAT_VERSION_V1);
        put_u64(&mut buf[..], 52, 0);
        let sum = checksum(PageKind::DataRcLeaf, PageNo(9), &buf[32..]);
        buf[..32].copy_from_slice(&sum);
        let e = open_unrooted(PageKind::DataRcLeaf, PageNo(9), &buf[..]).unwrap_err();
        assert_eq!(e, FormatError::OldFormat { found: 1 });
    }

    #[test]
    fn decode_rejects_out_of_range_values() {
        let mut children = vec![PageRef::NULL; INTERIOR_FANOUT];
        children[3] = PageRef {
            page: PageNo(77),
            gen: 1,
            sum: 0,
        };
        let buf = pack_interior(PageKind::MapInterior, PageNo(4), 1, &children);
        assert!(unpack_interior(PageKind::MapInterior, r(&buf), &buf[..], 50).is_err());
        // A committed pointer without a generation.
        children[3] = PageRef::unsealed(20);
        let buf = pack_interior(PageKind::MapInterior, PageNo(4), 1, &children);
        assert!(unpack_interior(PageKind::MapInterior, r(&buf), &buf[..], 50).is_err());
        let mut entries = vec![MapEntry::UNMAPPED; MAP_LEAF_ENTRIES];
        entries[0] = MapEntry {
            chunk: Chunk(5),
            backing: Chunk(0),
            valid: 1,
        };
        let buf = pack_map_leaf(PageNo(4), 1, &entries);
        assert!(unpack_map_leaf(r(&buf), &buf[..], 100, 16).is_err());
    }

    /// A superblock whose chunk or page offsets would pass a file's largest offset is
    /// refused: open computed `(data_chunks + 1) * chunk_size`, which wrapped (old code
    /// accepted it and overflowed at open).
    #[test]
    fn superblock_rejects_a_pool_larger_than_a_file() {
        let t = TreeRoot {
            page: PageRef {
                page: PageNo(2),
                gen: 1,
                sum: 0,
            },
            height: 1,
        };
        let ok = Superblock {
            generation: 1,
            chunk_size: 4096,
            data_chunks: 10,
            meta_hw: 10,
            meta_rc: t,
            data_rc: t,
            roots: t,
            catalogue: PageRef {
                page: PageNo(3),
                gen: 1,
                sum: 0,
            },
            ..Default::default()
        };
        let unpack = |sb: Superblock| Superblock::unpack(PageNo(1), &sb.pack(PageNo(1))[..]);
        assert_eq!(unpack(ok).unwrap(), ok);
        for bad in [
            Superblock {
                data_chunks: u64::MAX / 4096,
                ..ok
            },
            Superblock {
                data_chunks: u64::MAX,
                ..ok
            },
            Superblock {
                meta_hw: 1 << 52,
                ..ok
            },
        ] {
            assert!(
                matches!(unpack(bad), Err(FormatError::Invalid { .. })),
                "{bad:?}"
            );
        }
    }
}
