//! The blkif wire format (x86_64 ABI of `xen/io/blkif.h`, pinned by the layout tests of
//! `xen-sys`): pure parsers and encoders, fuzzed. The guest writes these bytes, so every
//! field is checked here before anything acts on it.

use xen_sys::GrantSeg;

pub const SECTOR_SIZE: u64 = 512;
pub const PAGE_SIZE: usize = xen_sys::PAGE_SIZE;
pub const SECTORS_PER_PAGE: u8 = (PAGE_SIZE as u64 / SECTOR_SIZE) as u8;

/// `sizeof(union blkif_sring_entry)` and `sizeof(struct blkif_response)`.
pub const REQUEST_SIZE: usize = 112;
pub const RESPONSE_SIZE: usize = 16;
/// `offsetof(struct blkif_sring, ring)`: the four indices and padding.
pub const RING_HEADER: usize = 64;
pub const SEGMENT_SIZE: usize = 8;
pub const SEGMENTS_PER_INDIRECT_PAGE: usize = PAGE_SIZE / SEGMENT_SIZE;

pub const OP_READ: u8 = 0;
pub const OP_WRITE: u8 = 1;
pub const OP_WRITE_BARRIER: u8 = 2;
pub const OP_FLUSH_DISKCACHE: u8 = 3;
pub const OP_DISCARD: u8 = 5;
pub const OP_INDIRECT: u8 = 6;
pub const MAX_SEGMENTS_PER_REQUEST: usize = 11;
pub const MAX_INDIRECT_PAGES: usize = 8;
pub const DISCARD_SECURE: u8 = 1;

pub const RSP_OKAY: i16 = 0;
pub const RSP_ERROR: i16 = -1;
pub const RSP_EOPNOTSUPP: i16 = -2;

pub const VDISK_READONLY: u32 = 4;

/// Segments per indirect request we advertise (`feature-max-indirect-segments`): 1 MiB
/// per request, one indirect page (Linux blkback's default is the same 256).
pub const MAX_INDIRECT_SEGMENTS: u16 = 256;
/// `max-ring-page-order` we advertise: up to 16 ring pages (Linux blkback's default).
pub const MAX_RING_PAGE_ORDER: u32 = 4;

/// Request slots in a ring of `pages` pages (`__CONST_RING_SIZE`: rounded down to a
/// power of two). One page holds 32.
pub fn ring_entries(pages: usize) -> u32 {
    let n = ((pages * PAGE_SIZE).saturating_sub(RING_HEADER) / REQUEST_SIZE) as u32;
    if n == 0 {
        0
    } else {
        1 << (31 - n.leading_zeros())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub gref: u32,
    pub first_sect: u8,
    pub last_sect: u8,
}

impl Segment {
    pub fn encode(&self) -> [u8; SEGMENT_SIZE] {
        let mut b = [0; SEGMENT_SIZE];
        b[..4].copy_from_slice(&self.gref.to_le_bytes());
        b[4] = self.first_sect;
        b[5] = self.last_sect;
        b
    }
    pub fn decode(b: &[u8]) -> Segment {
        Segment {
            gref: u32::from_le_bytes(b[..4].try_into().expect("4 bytes")),
            first_sect: b[4],
            last_sect: b[5],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Up to 11 segments inline.
    Rw {
        id: u64,
        dir: Direction,
        sector: u64,
        segs: Vec<Segment>,
    },
    /// `nr_segments` segments in the first `ceil(nr_segments / 512)` of `pages`.
    Indirect {
        id: u64,
        dir: Direction,
        sector: u64,
        nr_segments: u16,
        pages: Vec<u32>,
    },
    Flush {
        id: u64,
    },
    Barrier {
        id: u64,
    },
    Discard {
        id: u64,
        secure: bool,
        sector: u64,
        nr_sectors: u64,
    },
}

/// A request that gets an error response (the ring goes on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest {
    pub id: u64,
    /// Echoed in the response (the raw operation byte for unknown operations).
    pub operation: u8,
    pub status: i16,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub id: u64,
    pub operation: u8,
    pub status: i16,
}

impl Response {
    pub fn encode(&self) -> [u8; RESPONSE_SIZE] {
        let mut b = [0; RESPONSE_SIZE];
        b[..8].copy_from_slice(&self.id.to_le_bytes());
        b[8] = self.operation;
        b[10..12].copy_from_slice(&self.status.to_le_bytes());
        b
    }
    pub fn decode(b: &[u8; RESPONSE_SIZE]) -> Response {
        Response {
            id: u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            operation: b[8],
            status: i16::from_le_bytes([b[10], b[11]]),
        }
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// What this backend accepts, from what it advertised.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_indirect_segments: u16,
    pub discard: bool,
}

/// Parses one ring slot (copied out of shared memory first, so it cannot change under
/// the checks). Only the shape is checked here; ranges are checked by [`plan_io`] and
/// [`check_discard`] against the device.
pub fn parse_request(b: &[u8; REQUEST_SIZE], limits: &Limits) -> Result<Request, BadRequest> {
    let op = b[0];
    let id = u64_at(b, 8);
    let bad = |operation, status, reason| BadRequest {
        id,
        operation,
        status,
        reason,
    };
    match op {
        OP_READ | OP_WRITE => {
            let n = b[1] as usize;
            if n == 0 || n > MAX_SEGMENTS_PER_REQUEST {
                return Err(bad(op, RSP_ERROR, "segment count not in 1..=11"));
            }
            let segs = (0..n)
                .map(|i| Segment::decode(&b[24 + i * SEGMENT_SIZE..]))
                .collect();
            Ok(Request::Rw {
                id,
                dir: if op == OP_READ {
                    Direction::Read
                } else {
                    Direction::Write
                },
                sector: u64_at(b, 16),
                segs,
            })
        }
        OP_INDIRECT => {
            let inner = b[1];
            let dir = match inner {
                OP_READ => Direction::Read,
                OP_WRITE => Direction::Write,
                _ => {
                    return Err(bad(
                        inner,
                        RSP_ERROR,
                        "indirect operation is not read/write",
                    ))
                }
            };
            if limits.max_indirect_segments == 0 {
                return Err(bad(op, RSP_EOPNOTSUPP, "indirect requests not offered"));
            }
            let nr_segments = u16_at(b, 2);
            if nr_segments == 0 || nr_segments > limits.max_indirect_segments {
                return Err(bad(inner, RSP_ERROR, "indirect segment count out of range"));
            }
            let npages = (nr_segments as usize).div_ceil(SEGMENTS_PER_INDIRECT_PAGE);
            if npages > MAX_INDIRECT_PAGES {
                return Err(bad(inner, RSP_ERROR, "too many indirect pages"));
            }
            Ok(Request::Indirect {
                id,
                dir,
                sector: u64_at(b, 16),
                nr_segments,
                pages: (0..npages).map(|i| u32_at(b, 28 + 4 * i)).collect(),
            })
        }
        OP_FLUSH_DISKCACHE => Ok(Request::Flush { id }),
        OP_WRITE_BARRIER => Ok(Request::Barrier { id }),
        OP_DISCARD => {
            if !limits.discard {
                return Err(bad(op, RSP_EOPNOTSUPP, "discard not offered"));
            }
            Ok(Request::Discard {
                id,
                secure: b[1] & DISCARD_SECURE != 0,
                sector: u64_at(b, 16),
                nr_sectors: u64_at(b, 24),
            })
        }
        _ => Err(bad(op, RSP_EOPNOTSUPP, "unknown operation")),
    }
}

/// Parses `n` segments out of the copied indirect pages (512 per page, in order).
pub fn parse_indirect_segments(pages: &[u8], n: usize) -> Vec<Segment> {
    (0..n)
        .map(|i| Segment::decode(&pages[i * SEGMENT_SIZE..]))
        .collect()
}

/// A checked transfer: `len` bytes at byte `offset` of the device, gathered from or
/// scattered to `segs` in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoPlan {
    pub offset: u64,
    pub len: usize,
    pub segs: Vec<GrantSeg>,
}

/// Checks segments against the page (first <= last <= 7) and the whole transfer
/// against the device's `sectors`.
pub fn plan_io(sector: u64, segs: &[Segment], sectors: u64) -> Result<IoPlan, &'static str> {
    let mut total: u64 = 0;
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        if s.first_sect > s.last_sect || s.last_sect >= SECTORS_PER_PAGE {
            return Err("segment sectors outside their page");
        }
        let n = u64::from(s.last_sect - s.first_sect) + 1;
        total += n;
        out.push(GrantSeg {
            gref: s.gref,
            offset: u16::from(s.first_sect) * SECTOR_SIZE as u16,
            len: (n * SECTOR_SIZE) as u16,
        });
    }
    match sector.checked_add(total) {
        Some(end) if end <= sectors => Ok(IoPlan {
            offset: sector * SECTOR_SIZE,
            len: (total * SECTOR_SIZE) as usize,
            segs: out,
        }),
        _ => Err("sectors past the end of the device"),
    }
}

/// Checks a discard range; returns (byte offset, byte length).
pub fn check_discard(
    sector: u64,
    nr_sectors: u64,
    sectors: u64,
) -> Result<(u64, u64), &'static str> {
    match sector.checked_add(nr_sectors) {
        Some(end) if end <= sectors => Ok((sector * SECTOR_SIZE, nr_sectors * SECTOR_SIZE)),
        _ => Err("discard past the end of the device"),
    }
}

/// Encoders for frontends (the in-process test frontend and the fuzz corpus).
pub mod encode {
    use super::*;

    fn header(op: u8, b1: u8, id: u64, sector: u64) -> [u8; REQUEST_SIZE] {
        let mut b = [0; REQUEST_SIZE];
        b[0] = op;
        b[1] = b1;
        b[8..16].copy_from_slice(&id.to_le_bytes());
        b[16..24].copy_from_slice(&sector.to_le_bytes());
        b
    }

    pub fn rw(op: u8, id: u64, sector: u64, segs: &[Segment]) -> [u8; REQUEST_SIZE] {
        let mut b = header(op, segs.len() as u8, id, sector);
        for (i, s) in segs.iter().take(MAX_SEGMENTS_PER_REQUEST).enumerate() {
            b[24 + i * SEGMENT_SIZE..32 + i * SEGMENT_SIZE].copy_from_slice(&s.encode());
        }
        b
    }

    pub fn indirect(
        inner: u8,
        id: u64,
        sector: u64,
        nr_segments: u16,
        pages: &[u32],
    ) -> [u8; REQUEST_SIZE] {
        let mut b = header(OP_INDIRECT, inner, id, sector);
        b[2..4].copy_from_slice(&nr_segments.to_le_bytes());
        for (i, g) in pages.iter().take(MAX_INDIRECT_PAGES).enumerate() {
            b[28 + 4 * i..32 + 4 * i].copy_from_slice(&g.to_le_bytes());
        }
        b
    }

    pub fn simple(op: u8, id: u64) -> [u8; REQUEST_SIZE] {
        header(op, 0, id, 0)
    }

    pub fn discard(id: u64, sector: u64, nr_sectors: u64, secure: bool) -> [u8; REQUEST_SIZE] {
        let mut b = header(OP_DISCARD, secure as u8, id, sector);
        b[24..32].copy_from_slice(&nr_sectors.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};
    use xen_sys::ffi;

    #[test]
    fn offsets_match_blkif_h() {
        // The hand-written offsets above, against bindgen's view of blkif.h.
        assert_eq!(size_of::<ffi::blkif_sring_entry>(), REQUEST_SIZE);
        assert_eq!(size_of::<ffi::blkif_response>(), RESPONSE_SIZE);
        assert_eq!(offset_of!(ffi::blkif_sring, ring), RING_HEADER);
        assert_eq!(offset_of!(ffi::blkif_sring, req_prod), 0);
        assert_eq!(offset_of!(ffi::blkif_sring, req_event), 4);
        assert_eq!(offset_of!(ffi::blkif_sring, rsp_prod), 8);
        assert_eq!(offset_of!(ffi::blkif_sring, rsp_event), 12);
        assert_eq!(offset_of!(ffi::blkif_request, nr_segments), 1);
        assert_eq!(offset_of!(ffi::blkif_request, id), 8);
        assert_eq!(offset_of!(ffi::blkif_request, sector_number), 16);
        assert_eq!(offset_of!(ffi::blkif_request, seg), 24);
        assert_eq!(size_of::<ffi::blkif_request_segment>(), SEGMENT_SIZE);
        assert_eq!(offset_of!(ffi::blkif_request_segment, first_sect), 4);
        assert_eq!(offset_of!(ffi::blkif_request_segment, last_sect), 5);
        assert_eq!(offset_of!(ffi::blkif_request_indirect, nr_segments), 2);
        assert_eq!(offset_of!(ffi::blkif_request_indirect, handle), 24);
        assert_eq!(offset_of!(ffi::blkif_request_indirect, indirect_grefs), 28);
        assert_eq!(offset_of!(ffi::blkif_request_discard, nr_sectors), 24);
        assert_eq!(offset_of!(ffi::blkif_response, operation), 8);
        assert_eq!(offset_of!(ffi::blkif_response, status), 10);
        assert_eq!(ffi::BLKIF_OP_INDIRECT as u8, OP_INDIRECT);
        assert_eq!(ffi::BLKIF_OP_DISCARD as u8, OP_DISCARD);
        assert_eq!(ffi::BLKIF_RSP_EOPNOTSUPP as i16, RSP_EOPNOTSUPP);
    }

    #[test]
    fn ring_sizes_match_the_c_macro() {
        assert_eq!(ring_entries(1), 32);
        assert_eq!(ring_entries(2), 64);
        assert_eq!(ring_entries(16), 512);
    }

    #[test]
    fn hostile_fields_are_rejected() {
        let l = Limits {
            max_indirect_segments: MAX_INDIRECT_SEGMENTS,
            discard: true,
        };
        let seg = Segment {
            gref: 1,
            first_sect: 0,
            last_sect: 7,
        };
        let mut b = encode::rw(OP_READ, 9, 0, &[seg]);
        b[1] = 12;
        assert_eq!(parse_request(&b, &l).unwrap_err().id, 9);
        b[1] = 0;
        assert!(parse_request(&b, &l).is_err());
        let b = encode::indirect(OP_READ, 1, 0, 257, &[1]);
        assert!(parse_request(&b, &l).is_err());
        let b = encode::indirect(OP_FLUSH_DISKCACHE, 1, 0, 1, &[1]);
        assert!(parse_request(&b, &l).is_err());
        assert_eq!(
            parse_request(&encode::simple(4, 3), &l).unwrap_err().status,
            RSP_EOPNOTSUPP
        );
        let bad = |f, l| Segment {
            gref: 1,
            first_sect: f,
            last_sect: l,
        };
        assert!(plan_io(0, &[bad(3, 2)], 100).is_err());
        assert!(plan_io(0, &[bad(0, 8)], 100).is_err());
        assert!(plan_io(93, &[bad(0, 7)], 100).is_err());
        assert!(plan_io(u64::MAX - 2, &[bad(0, 7)], u64::MAX).is_err());
        assert_eq!(plan_io(92, &[bad(1, 7)], 100).unwrap().len, 7 * 512);
        assert!(check_discard(u64::MAX, 2, u64::MAX).is_err());
        assert!(check_discard(90, 11, 100).is_err());
    }
}
