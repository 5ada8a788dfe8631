//! Byte offsets that cannot be mixed, and the only conversions between them and chunk,
//! sub-block and page numbers, all checked (as rust-vmm's `GuestAddress`).
//!
//! A volume offset, a `pool.data` offset and a `pool.meta` offset are all `u64` to the
//! kernel; mixing them up reads another volume's bytes, and a product that wraps does
//! the same silently in a release build. So each space has its own type
//! ([`VolOffset`], [`DataOffset`], [`MetaOffset`]), a number becomes an offset only
//! here, and every product or sum is checked: an overflow is an error (metadata that
//! names an impossible chunk or page is `Inconsistent`), never a wrapped offset.
//!
//! ```text
//!  VolOffset ──Geometry::locate──► (virtual chunk, byte in chunk) ──Geometry::vol_offset──► VolOffset
//!  (Chunk, byte in chunk, len) ──Geometry::data_offset──► DataOffset   (inside one chunk of the pool)
//!  PageNo ──PageNo::byte_offset──► MetaOffset
//! ```

use super::format::{Chunk, PageNo, PAGE_SIZE};
use super::meta::Geometry;
use super::Error;

/// The largest offset a file can have (`off_t` is signed).
pub const MAX_FILE_OFFSET: u64 = i64::MAX as u64;

macro_rules! offset_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(u64);

        // The same API in every space, though not every space uses all of it yet.
        #[allow(dead_code)]
        impl $name {
            pub const fn new(v: u64) -> Self {
                $name(v)
            }
            /// The offset as the file or device API takes it.
            pub const fn raw(self) -> u64 {
                self.0
            }
            /// `len` bytes further; `None` past `u64::MAX`.
            pub fn checked_add(self, len: u64) -> Option<Self> {
                self.0.checked_add(len).map($name)
            }
            /// Bytes from `base` to `self`; `None` if `self` is below `base`.
            pub fn checked_offset_from(self, base: Self) -> Option<u64> {
                self.0.checked_sub(base.0)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

offset_type!(
    /// A byte of a volume, as the guest addresses it.
    VolOffset
);
offset_type!(
    /// A byte of `pool.data`.
    DataOffset
);
offset_type!(
    /// A byte of `pool.meta`.
    MetaOffset
);

impl PageNo {
    /// Where the page starts in `pool.meta`; `None` if that is past the largest file
    /// offset (a page number no pool can have).
    pub fn byte_offset(self) -> Option<MetaOffset> {
        self.0
            .checked_mul(PAGE_SIZE as u64)
            .filter(|o| *o <= MAX_FILE_OFFSET - PAGE_SIZE as u64)
            .map(MetaOffset)
    }

    /// [`PageNo::byte_offset`] for file I/O, an impossible page being `Inconsistent`.
    pub(crate) fn file_offset(self) -> Result<u64, Error> {
        self.byte_offset().map(MetaOffset::raw).ok_or_else(|| {
            Error::Inconsistent(format!(
                "metadata page {self} is past the largest offset of pool.meta"
            ))
        })
    }
}

/// Metadata pages a pool can address: the high-water mark must not pass this.
pub const MAX_META_PAGES: u64 = MAX_FILE_OFFSET / PAGE_SIZE as u64;

/// Length of `pool.data` for `data_chunks` chunks of `chunk_size` (chunk 0 is never
/// used, chunks are numbered from 1); `None` if no file can be that long.
pub fn data_file_len(chunk_size: u64, data_chunks: u64) -> Option<u64> {
    data_chunks
        .checked_add(1)?
        .checked_mul(chunk_size)
        .filter(|l| *l <= MAX_FILE_OFFSET)
}

impl Geometry {
    /// The virtual chunk holding `off` and the byte of that chunk.
    pub fn locate(&self, off: VolOffset) -> (u64, u64) {
        (off.0 / self.chunk_size, off.0 % self.chunk_size)
    }

    /// Byte `within` of virtual chunk `vc`; `None` past `u64::MAX`.
    pub fn vol_offset(&self, vc: u64, within: u64) -> Option<VolOffset> {
        vc.checked_mul(self.chunk_size)?
            .checked_add(within)
            .map(VolOffset)
    }

    /// The `pool.data` offset of `len` bytes from byte `within` of chunk `c`. The range
    /// must lie inside one allocated-able chunk (1..=data_chunks): anything else is a
    /// bad plan or bad metadata, and would touch another chunk's bytes.
    pub fn data_offset(&self, c: Chunk, within: u64, len: u64) -> Result<DataOffset, Error> {
        if c.is_none() || c.0 > self.data_chunks {
            return Err(Error::Inconsistent(format!(
                "data chunk {c} is outside the pool's chunks 1..={}",
                self.data_chunks
            )));
        }
        if within.checked_add(len).is_none_or(|e| e > self.chunk_size) {
            return Err(Error::Inconsistent(format!(
                "bytes {within}+{len} of data chunk {c} cross the end of a {}-byte chunk",
                self.chunk_size
            )));
        }
        self.chunk_run(c, 1).map(|(o, _)| DataOffset(o.0 + within))
    }

    /// Start and length in `pool.data` of the `n` chunks from `first` (hole punching,
    /// imports); checked like [`Geometry::data_offset`].
    pub fn chunk_run(&self, first: Chunk, n: u64) -> Result<(DataOffset, u64), Error> {
        let bad = || {
            Error::Inconsistent(format!(
                "data chunks {first}+{n} are outside the pool's chunks 1..={}",
                self.data_chunks
            ))
        };
        let last = first.0.checked_add(n).ok_or_else(bad)?;
        if first.is_none() || n == 0 || last - 1 > self.data_chunks {
            return Err(bad());
        }
        let start = first.0.checked_mul(self.chunk_size).ok_or_else(bad)?;
        let len = n.checked_mul(self.chunk_size).ok_or_else(bad)?;
        start.checked_add(len).ok_or_else(bad)?;
        Ok((DataOffset(start), len))
    }

    /// The sub-block holding byte `within` of a chunk.
    pub fn sub_of(&self, within: u64) -> u32 {
        (within / self.sub_size) as u32
    }

    /// Bytes `[start, end)` of sub-block `s` in its chunk.
    pub fn sub_bounds(&self, s: u32) -> (u64, u64) {
        let start = u64::from(s) * self.sub_size;
        (start, start + self.sub_size)
    }

    /// Bit of sub-block `s` in a map entry's valid bitmap. Sub-blocks past the chunk
    /// have none: a shift that wrapped would mark another sub-block.
    pub fn sub_bit(&self, s: u32) -> Result<u64, Error> {
        if s >= self.subs {
            return Err(Error::Inconsistent(format!(
                "sub-block {s} past the {} of a chunk",
                self.subs
            )));
        }
        Ok(1u64 << s)
    }

    /// The sub-blocks touched by bytes `[a, b)` of a chunk (`a < b <= chunk_size`).
    pub fn subs_touched(&self, a: u64, b: u64) -> std::ops::Range<u32> {
        self.sub_of(a)..b.div_ceil(self.sub_size) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn geo(cs: u64, chunks: u64) -> Geometry {
        Geometry::new(cs, chunks)
    }

    #[test]
    fn offsets_do_not_wrap() {
        let top = VolOffset::new(u64::MAX - 1);
        assert_eq!(top.checked_add(1), Some(VolOffset::new(u64::MAX)));
        assert_eq!(top.checked_add(2), None);
        assert_eq!(
            DataOffset::new(10).checked_offset_from(DataOffset::new(4)),
            Some(6)
        );
        assert_eq!(
            DataOffset::new(4).checked_offset_from(DataOffset::new(10)),
            None
        );
    }

    #[test]
    fn page_offsets_stop_at_the_largest_file_offset() {
        assert_eq!(PageNo(3).byte_offset(), Some(MetaOffset::new(3 * 4096)));
        // 2^52 * 4096 wraps to 0: the superblock slot. It must not be read as page 0.
        assert_eq!(PageNo(1 << 52).byte_offset(), None);
        assert_eq!(PageNo(u64::MAX).byte_offset(), None);
        assert_eq!(PageNo(MAX_META_PAGES).byte_offset(), None);
        assert!(PageNo(MAX_META_PAGES - 1).byte_offset().is_some());
        assert!(matches!(
            PageNo(1 << 52).file_offset(),
            Err(Error::Inconsistent(_))
        ));
    }

    #[test]
    fn data_file_len_rejects_overflow() {
        assert_eq!(data_file_len(4096, 1), Some(8192));
        // capacity u64::MAX at 4 KiB: (2^52 - 1 + 1) * 4096 wraps to 0.
        assert_eq!(data_file_len(4096, u64::MAX / 4096), None);
        assert_eq!(data_file_len(4096, u64::MAX), None);
        assert_eq!(data_file_len(1 << 20, MAX_FILE_OFFSET >> 20), None);
        assert!(data_file_len(1 << 20, (MAX_FILE_OFFSET >> 20) - 1).is_some());
    }

    #[test]
    fn data_offsets_stay_inside_one_chunk_of_the_pool() {
        let g = geo(65536, 10);
        assert_eq!(
            g.data_offset(Chunk(2), 4096, 4096).unwrap(),
            DataOffset::new(2 * 65536 + 4096)
        );
        assert_eq!(
            g.data_offset(Chunk(10), 0, 65536).unwrap(),
            DataOffset::new(10 * 65536)
        );
        for (c, w, l) in [
            (0, 0, 1),
            (11, 0, 1),
            (u64::MAX, 0, 1),
            (1, 65535, 2),
            (1, u64::MAX, 1),
            (1, 1, u64::MAX),
        ] {
            assert!(
                matches!(g.data_offset(Chunk(c), w, l), Err(Error::Inconsistent(_))),
                "chunk {c} byte {w} len {l}"
            );
        }
        // A pool so large that chunk * chunk_size wraps: refused, not wrapped.
        let g = geo(1 << 20, u64::MAX);
        assert!(g.data_offset(Chunk(1 << 44), 0, 1).is_err());
        assert!(g.chunk_run(Chunk(u64::MAX), 1).is_err());
        assert!(g.chunk_run(Chunk(1), u64::MAX).is_err());
        assert!(g.chunk_run(Chunk(1), 0).is_err());
        assert_eq!(
            geo(4096, 8).chunk_run(Chunk(3), 6).unwrap(),
            (DataOffset::new(3 * 4096), 6 * 4096)
        );
        assert!(geo(4096, 8).chunk_run(Chunk(3), 7).is_err());
    }

    #[test]
    fn volume_offsets_near_the_top() {
        let g = geo(65536, 10);
        let (vc, w) = g.locate(VolOffset::new(u64::MAX));
        assert_eq!((vc, w), (u64::MAX / 65536, 65535));
        assert_eq!(g.vol_offset(vc, w), Some(VolOffset::new(u64::MAX)));
        assert_eq!(g.vol_offset(vc + 1, 0), None);
        assert_eq!(g.vol_offset(vc, w + 1), None);
    }

    #[test]
    fn sub_blocks() {
        let g = geo(1 << 20, 4); // 64 sub-blocks of 16 KiB
        assert_eq!(g.subs, 64);
        assert_eq!(g.sub_bit(63).unwrap(), 1 << 63);
        assert!(g.sub_bit(64).is_err());
        assert_eq!(g.subs_touched(16383, 16385), 0..2);
        assert_eq!(g.subs_touched(0, 1 << 20), 0..64);
        let g = geo(4096, 4); // one sub-block
        assert!(g.sub_bit(1).is_err());
        assert_eq!(g.sub_bounds(0), (0, 4096));
    }

    proptest! {
        /// locate and vol_offset are inverse, and vol_offset is None exactly when the
        /// exact product overflows u64.
        #[test]
        fn locate_round_trips(cs_log in 12u32..=20, off in any::<u64>(), vc in any::<u64>(), w in any::<u64>()) {
            let g = geo(1 << cs_log, 1);
            let (c, b) = g.locate(VolOffset::new(off));
            prop_assert_eq!(g.vol_offset(c, b), Some(VolOffset::new(off)));
            let w = w % g.chunk_size;
            let exact = u128::from(vc) * u128::from(g.chunk_size) + u128::from(w);
            prop_assert_eq!(g.vol_offset(vc, w).map(|o| u128::from(o.raw())),
                (exact <= u128::from(u64::MAX)).then_some(exact));
        }

        /// data_offset agrees with exact (u128) arithmetic whenever it succeeds, and
        /// succeeds for every range inside a chunk of the pool.
        #[test]
        fn data_offset_is_exact(cs_log in 12u32..=20,
                                chunks in prop_oneof![0u64..64, any::<u64>()],
                                c in prop_oneof![0u64..64, any::<u64>()],
                                w in prop_oneof![0u64..1 << 21, any::<u64>()],
                                len in prop_oneof![0u64..1 << 21, any::<u64>()]) {
            let g = geo(1 << cs_log, chunks);
            let exact = u128::from(c) * u128::from(g.chunk_size) + u128::from(w);
            let inside = c >= 1 && c <= chunks
                && u128::from(w) + u128::from(len) <= u128::from(g.chunk_size)
                && (u128::from(c) + 1) * u128::from(g.chunk_size) <= u128::from(u64::MAX);
            match g.data_offset(Chunk(c), w, len) {
                Ok(o) => { prop_assert!(inside); prop_assert_eq!(u128::from(o.raw()), exact) }
                Err(_) => prop_assert!(!inside),
            }
        }
    }
}
