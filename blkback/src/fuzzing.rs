//! Entry points for the fuzz targets (and the corpus replay test): they feed arbitrary
//! bytes through exactly the parsers and checks the server runs, as a client would send
//! them. Neither may panic, loop forever, or allocate more than the caps allow.

use crate::negotiate::{ExportInfo, Negotiation, Outcome};
use crate::proto::*;

/// Client side of a handshake: 4 bytes of client flags, then options (header + data).
pub fn handshake(data: &[u8]) {
    let exports = [
        ExportInfo {
            name: "work/private".into(),
            description: "private".into(),
            size: 1 << 30,
            read_only: false,
        },
        ExportInfo {
            name: "work/root".into(),
            description: String::new(),
            size: 10 << 30,
            read_only: true,
        },
    ];
    let Some(flags) = data.get(..4) else { return };
    let Ok(flags) = parse_client_flags(flags) else {
        return;
    };
    let mut neg = Negotiation::new(&exports, flags);
    let mut rest = &data[4..];
    let mut out = Vec::new();
    while rest.len() >= OPTION_HEADER_LEN {
        let Ok(h) = parse_option_header(rest) else {
            return;
        };
        rest = &rest[OPTION_HEADER_LEN..];
        if h.length > MAX_OPTION_LEN {
            neg.oversized_option(h.option, &mut out);
            return;
        }
        let Some(body) = rest.get(..h.length as usize) else {
            return;
        };
        rest = &rest[h.length as usize..];
        out.clear();
        match neg.handle_option(h.option, body, &mut out) {
            Outcome::Continue => {}
            Outcome::Transmit(a) => {
                // Whatever follows is transmission traffic for the agreed session.
                requests_with(rest, a.params);
                return;
            }
            Outcome::Abort | Outcome::Disconnect(_) => return,
        }
    }
}

/// Transmission traffic: the first byte picks the session shape, the rest is requests.
pub fn requests(data: &[u8]) {
    let Some((&shape, rest)) = data.split_first() else {
        return;
    };
    let params = SessionParams {
        size: if shape & 8 != 0 { u64::MAX } else { 1 << 30 },
        read_only: shape & 1 != 0,
        structured: shape & 2 != 0,
        base_allocation: shape & 4 != 0,
    };
    requests_with(rest, params);
}

fn requests_with(mut data: &[u8], params: SessionParams) {
    while data.len() >= REQUEST_LEN {
        let Ok(req) = parse_request(data) else { return };
        data = &data[REQUEST_LEN..];
        let skip = match check_request(&req, &params) {
            Ok(Command::Disc) => return,
            Ok(Command::Write) => req.length as usize,
            Ok(cmd) => {
                if cmd == Command::BlockStatus {
                    let ext = [storage::Extent {
                        offset: req.offset,
                        length: u64::from(req.length),
                        hole: true,
                        zero: true,
                    }];
                    let d = extents_to_descriptors(
                        &ext,
                        req.offset,
                        req.length,
                        req.flags & CMD_FLAG_REQ_ONE != 0,
                    );
                    assert!(!d.is_empty());
                }
                0
            }
            Err(rej) => {
                let mut out = Vec::new();
                push_error_chunk(
                    &mut out,
                    req.handle,
                    rej.errno,
                    rej.message,
                    Some(req.offset),
                );
                match rej.payload {
                    Payload::None => 0,
                    Payload::Skip(n) => n as usize,
                    Payload::Disconnect => return,
                }
            }
        };
        if skip > data.len() {
            return;
        }
        data = &data[skip..];
    }
}

/// blkif traffic from a hostile guest: byte 0 picks the ring order (low 2 bits), whether
/// the volume is read-only (bit 2) and whether the producer index is taken from the
/// input (bit 3); then 112-byte ring slots. Guest pages granted as refs 8.. hold the
/// input's bytes too (indirect segment pages included), so some grant refs resolve.
/// Checks: no panic, every response echoes its request's id, statuses are blkif's, and
/// a second volume in the same pool is never touched.
pub fn blkif(data: &[u8]) {
    use crate::blkif::abi::*;
    use crate::blkif::ring::BackRing;
    use crate::blkif::testing::Frontend;
    use crate::blkif::{Vbd, VbdParams};
    use storage::Pool;
    use xen_sys::PAGE_SIZE;

    let Some((&shape, rest)) = data.split_first() else {
        return;
    };
    let pool = storage::MemPool::with_options(64 << 10, None);
    for v in ["a", "b"] {
        if pool.create_volume(v, 1 << 20).is_err() {
            return;
        }
    }
    let (Ok(dev), Ok(other)) = (
        pool.open_volume("a", shape & 4 != 0),
        pool.open_volume("b", false),
    ) else {
        return;
    };
    let canary = [0x5au8; 512];
    if other.write_at(&canary, (1 << 20) - 512).is_err() {
        return;
    }
    let mut front = Frontend::new(u32::from(shape & 3));
    let mut page = vec![0u8; PAGE_SIZE];
    let n = rest.len().min(PAGE_SIZE);
    page[..n].copy_from_slice(&rest[..n]);
    let _bufs: Vec<_> = (0..4).map(|_| front.alloc(1, Some(&page))).collect();
    let Ok(mem) = front.grants.map_ring(&front.ring_refs) else {
        return;
    };
    let Ok(ring) = BackRing::attach(mem) else {
        return;
    };
    // Bit 4 of the shape byte: the frontend keeps persistent grants (the default on
    // Xen) or every transfer goes by grant copy.
    let guest =
        crate::blkif::persistent::PersistentGrants::new(front.grants.clone(), shape & 16 != 0);
    let mut vbd = Vbd::new(ring, guest, dev, VbdParams::default());
    let mut ids = Vec::new();
    for chunk in rest.chunks_exact(REQUEST_SIZE) {
        if front.ring.free_slots() == 0 {
            break;
        }
        let raw: [u8; REQUEST_SIZE] = chunk.try_into().expect("exact chunk");
        ids.push(u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes")));
        front.ring.put_request(&raw);
    }
    if shape & 8 != 0 {
        let prod = rest
            .get(..4)
            .map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
        front.ring.set_req_prod(prod);
    } else {
        front.push();
    }
    if vbd.process().is_err() {
        // A broken ring closes the device; nothing else to check.
        return;
    }
    let mut got = 0;
    while let Some(r) = front.ring.next_response() {
        if shape & 8 == 0 {
            assert_eq!(r.id, ids[got], "response {got} answers another request");
        }
        assert!(
            [RSP_OKAY, RSP_ERROR, RSP_EOPNOTSUPP].contains(&r.status),
            "status {}",
            r.status
        );
        got += 1;
    }
    if shape & 8 == 0 {
        assert_eq!(got, ids.len(), "every request answered");
    }
    let mut back = [0u8; 512];
    other
        .read_at(&mut back, (1 << 20) - 512)
        .expect("reading the canary");
    assert_eq!(back, canary, "another volume was written");
}
