//! Entry points for the fuzz targets (`storage/fuzz`) and the corpus replay test: they
//! feed arbitrary bytes through the metadata page decoders, as a damaged or hostile
//! `pool.meta` would. None may panic or allocate without bound.
//!
//! A checksum guards every page, so raw fuzz bytes would rarely get past it: the input
//! is `kind u8 | page u64 | context u64 | payload`, sealed here with a valid checksum,
//! so the decoders see arbitrary payloads. The raw bytes also go through `open` as a
//! whole page, for the header checks.

use super::format::*;

/// Decodes one sealed page of the kind the first byte picks.
pub fn meta_page(data: &[u8]) {
    if data.len() >= PAGE_SIZE {
        let page: &[u8; PAGE_SIZE] = data[..PAGE_SIZE].try_into().expect("one page");
        for k in PageKind::ALL {
            let _ = open(k, PageRef::of(page), page);
            let _ = open_unrooted(k, PageNo(2), page);
        }
    }
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let kind = PageKind::ALL[k as usize % PageKind::ALL.len()];
    let word = |i: usize| -> u64 {
        let mut b = [0u8; 8];
        if let Some(s) = rest.get(i * 8..i * 8 + 8) {
            b.copy_from_slice(s);
        }
        u64::from_le_bytes(b)
    };
    // Slot 0 or 1 for a superblock, any other page for the rest.
    let page = if kind == PageKind::Superblock {
        PageNo(word(0) & 1)
    } else {
        PageNo(word(0).max(2))
    };
    let ctx = word(1);
    let payload = rest.get(16..).unwrap_or(&[]);
    let payload = &payload[..payload.len().min(PAYLOAD_SIZE)];
    let sealed = seal(kind, page, ctx | 1, payload);
    let buf = &sealed[..];
    // The pointer a parent would record, so the decoders get past the lost-write check.
    let r = PageRef::of(&sealed);
    // Bounds the decoders check against: the metadata high-water mark, the data chunk
    // count, the sub-blocks per chunk.
    let (meta_hw, data_chunks, subs) =
        (ctx & 0xffff_ffff, ctx >> 16, ((ctx >> 56) as u32 % 64) + 1);
    match kind {
        PageKind::Superblock => {
            let _ = Superblock::unpack(page, buf);
        }
        PageKind::MapInterior
        | PageKind::MetaRcInterior
        | PageKind::DataRcInterior
        | PageKind::RootsInterior => {
            let _ = unpack_interior(kind, r, buf, meta_hw);
        }
        PageKind::MapLeaf => {
            let _ = unpack_map_leaf(r, buf, data_chunks, subs);
        }
        PageKind::MetaRcLeaf | PageKind::DataRcLeaf => {
            let _ = unpack_rc_leaf(kind, r, buf);
        }
        PageKind::RootsLeaf => {
            let _ = unpack_roots_leaf(r, buf, meta_hw);
        }
        PageKind::Catalogue => {
            if let Ok((_, bytes)) = unpack_catalogue(r, buf, meta_hw) {
                let _ = serde_json::from_slice::<super::meta::CatalogueDoc>(&bytes);
            }
        }
    }
}
