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
