//! NBD wire format: constants, frame layouts and pure parsers/encoders.
//!
//! Everything here works on byte slices only (no I/O), so the fuzz targets and the corpus
//! replay test drive exactly the code the server runs. Facts come from the NBD protocol
//! description (NetworkBlockDevice/nbd `doc/proto.md`); all integers are big endian.
//!
//! ```text
//! option     C: IHAVEOPT(8) opt(4) len(4) data(len)
//! opt reply  S: REPLY_MAGIC(8) opt(4) type(4) len(4) data(len)
//! request    C: REQ_MAGIC(4) flags(2) type(2) handle(8) offset(8) length(4) [payload]
//! simple     S: SIMPLE_MAGIC(4) error(4) handle(8) [data]
//! chunk      S: STRUCT_MAGIC(4) flags(2) type(2) handle(8) length(4) payload(length)
//! ```

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

// Structured reply chunk types and flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

// base:allocation states.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// Error values on the wire (fixed by the protocol, not the host's errno numbering).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest READ/WRITE payload the server accepts (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Advertised minimum block size: the devices are byte-addressable.
pub const MIN_BLOCK: u32 = 1;
pub const PREFERRED_BLOCK: u32 = 4096;
/// Longest option payload read during the handshake; longer ones end the session, since
/// draining gigabytes of option data would let one client stall a server thread.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest string (export name, query) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Context id of `base:allocation` when selected.
pub const BASE_ALLOCATION_ID: u32 = 1;
pub const BASE_ALLOCATION: &str = "base:allocation";

pub const OPTION_HEADER_LEN: usize = 16;
pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const CHUNK_HEADER_LEN: usize = 20;

/// The wire error code for a device error (the host errno is only a convenient carrier).
pub fn wire_errno(e: &storage::BlockError) -> u32 {
    match e.errno() {
        libc::EPERM => EPERM,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EINVAL => EINVAL,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOMEM => ENOMEM,
        _ => EIO,
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Why a frame could not be decoded; every variant ends the session (framing is lost).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("frame truncated")]
    Truncated,
}

/// The server's opening: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn server_greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// Client flags; unknown bits are a protocol violation (the server must drop the session).
pub fn parse_client_flags(b: &[u8]) -> Result<ClientFlags, u32> {
    if b.len() < 4 {
        return Err(0);
    }
    let f = be32(b, 0);
    if f & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(f);
    }
    Ok(ClientFlags {
        fixed_newstyle: f & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: f & FLAG_C_NO_ZEROES != 0,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

pub fn parse_option_header(b: &[u8]) -> Result<OptionHeader, FrameError> {
    if b.len() < OPTION_HEADER_LEN {
        return Err(FrameError::Truncated);
    }
    let magic = be64(b, 0);
    if magic != IHAVEOPT {
        return Err(FrameError::BadMagic(magic));
    }
    Ok(OptionHeader {
        option: be32(b, 8),
        length: be32(b, 12),
    })
}

/// Appends one option reply to `out`.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[&[u8]]) {
    let len: usize = data.iter().map(|d| d.len()).sum();
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    for d in data {
        out.extend_from_slice(d);
    }
}

/// One transmission request header, as sent (not yet checked against the session).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

pub fn parse_request(b: &[u8]) -> Result<Request, FrameError> {
    if b.len() < REQUEST_LEN {
        return Err(FrameError::Truncated);
    }
    let magic = be32(b, 0);
    if magic != REQUEST_MAGIC {
        return Err(FrameError::BadMagic(u64::from(magic)));
    }
    Ok(Request {
        flags: be16(b, 4),
        command: be16(b, 6),
        handle: be64(b, 8),
        offset: be64(b, 16),
        length: be32(b, 24),
    })
}

pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.command.to_be_bytes());
    b[8..16].copy_from_slice(&r.handle.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.length.to_be_bytes());
    b
}

/// A request that passed [`check_request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
}

/// What the transmission phase knows about the negotiated session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionParams {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    pub base_allocation: bool,
}

/// What to do with the bytes that follow a rejected request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// Nothing follows.
    None,
    /// `n` payload bytes follow: read and drop them, then carry on.
    Skip(u32),
    /// The payload is too long to drain safely: reply, then end the session.
    Disconnect,
}

/// A request refused before it reaches the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub errno: u32,
    pub message: &'static str,
    pub payload: Payload,
}

/// Validates a request against the session: command, flags, payload limit, read-only,
/// range. Pure, so the fuzzer covers it.
pub fn check_request(r: &Request, s: &SessionParams) -> Result<Command, Rejection> {
    let cmd = match r.command {
        CMD_READ => Command::Read,
        CMD_WRITE => Command::Write,
        CMD_DISC => Command::Disc,
        CMD_FLUSH => Command::Flush,
        CMD_TRIM => Command::Trim,
        CMD_CACHE => Command::Cache,
        CMD_WRITE_ZEROES => Command::WriteZeroes,
        CMD_BLOCK_STATUS => Command::BlockStatus,
        _ => {
            return Err(Rejection {
                errno: EINVAL,
                message: "unknown command",
                payload: Payload::None,
            })
        }
    };
    if cmd == Command::Disc {
        return Ok(cmd);
    }
    let payload = if cmd == Command::Write {
        if r.length > MAX_PAYLOAD {
            Payload::Disconnect
        } else {
            Payload::Skip(r.length)
        }
    } else {
        Payload::None
    };
    let reject = |errno, message| {
        Err(Rejection {
            errno,
            message,
            payload,
        })
    };
    let allowed = CMD_FLAG_FUA
        | match cmd {
            Command::Read if s.structured => CMD_FLAG_DF,
            Command::WriteZeroes => CMD_FLAG_NO_HOLE,
            Command::BlockStatus => CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    if r.flags & !allowed != 0 {
        return reject(EINVAL, "command flag not valid for this command");
    }
    if matches!(cmd, Command::Read | Command::Write) && r.length > MAX_PAYLOAD {
        return reject(
            EOVERFLOW,
            "request length exceeds the maximum block size (32 MiB)",
        );
    }
    if s.read_only && matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes) {
        return reject(EPERM, "export is read-only");
    }
    if cmd == Command::BlockStatus {
        if !(s.structured && s.base_allocation) {
            return reject(
                EINVAL,
                "block status needs structured replies and a metadata context",
            );
        }
        if r.length == 0 {
            return reject(EINVAL, "block status of an empty range");
        }
    }
    if cmd == Command::Flush {
        return Ok(cmd);
    }
    let Some(end) = r.offset.checked_add(u64::from(r.length)) else {
        return reject(EOVERFLOW, "offset + length overflows");
    };
    if end > s.size {
        // The spec asks for ENOSPC on writes past the end (as qemu-nbd and nbdkit do).
        let errno = if matches!(cmd, Command::Write | Command::WriteZeroes) {
            ENOSPC
        } else {
            EINVAL
        };
        return reject(errno, "request past the end of the export");
    }
    Ok(cmd)
}

pub fn put_simple_reply(out: &mut [u8], error: u32, handle: u64) {
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
}

pub fn simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    put_simple_reply(&mut b, error, handle);
    b
}

pub fn put_chunk_header(out: &mut [u8], flags: u16, kind: u16, handle: u64, length: u32) {
    out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
}

/// Appends a final error chunk (`ERROR`, or `ERROR_OFFSET` when `offset` is given).
pub fn push_error_chunk(
    out: &mut Vec<u8>,
    handle: u64,
    errno: u32,
    message: &str,
    offset: Option<u64>,
) {
    let msg = truncate_utf8(message, 1024).as_bytes();
    let extra = if offset.is_some() { 8 } else { 0 };
    let len = 6 + msg.len() + extra;
    let kind = if offset.is_some() {
        REPLY_TYPE_ERROR_OFFSET
    } else {
        REPLY_TYPE_ERROR
    };
    let start = out.len();
    out.resize(start + CHUNK_HEADER_LEN, 0);
    put_chunk_header(&mut out[start..], REPLY_FLAG_DONE, kind, handle, len as u32);
    out.extend_from_slice(&errno.max(1).to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    if let Some(o) = offset {
        out.extend_from_slice(&o.to_be_bytes());
    }
}

pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One block status descriptor on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub length: u32,
    pub flags: u32,
}

/// Turns device extents into `base:allocation` descriptors for `[offset, offset+length)`:
/// clipped to the request, adjacent equal states merged, at least one descriptor (a device
/// that reports nothing gets status 0, "allocated, unknown content", for the whole range).
pub fn extents_to_descriptors(
    extents: &[storage::Extent],
    offset: u64,
    length: u32,
    req_one: bool,
) -> Vec<Descriptor> {
    let end = offset + u64::from(length);
    let mut out: Vec<Descriptor> = Vec::new();
    let mut pos = offset;
    for e in extents {
        let e_end = e.offset.saturating_add(e.length);
        if e.length == 0 || e.offset > pos || e_end <= pos {
            // A gap or a non-contiguous extent: stop where the information stops.
            if e.offset > pos {
                break;
            }
            continue;
        }
        let stop = e_end.min(end);
        let flags = if e.hole {
            STATE_HOLE | STATE_ZERO
        } else if e.zero {
            STATE_ZERO
        } else {
            0
        };
        let len = (stop - pos) as u32;
        match out.last_mut() {
            Some(last) if last.flags == flags => last.length += len,
            _ => out.push(Descriptor { length: len, flags }),
        }
        pos = stop;
        if pos >= end {
            break;
        }
    }
    if out.is_empty() {
        out.push(Descriptor { length, flags: 0 });
    }
    if req_one {
        out.truncate(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SessionParams {
        SessionParams {
            size: 1 << 20,
            read_only: false,
            structured: true,
            base_allocation: true,
        }
    }

    fn req(command: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            command,
            handle: 7,
            offset,
            length,
        }
    }

    #[test]
    fn request_round_trip() {
        let r = req(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        assert_eq!(parse_request(&encode_request(&r)), Ok(r));
        let mut b = encode_request(&r);
        b[0] ^= 1;
        assert!(matches!(parse_request(&b), Err(FrameError::BadMagic(_))));
        assert_eq!(parse_request(&b[..27]), Err(FrameError::Truncated));
    }

    #[test]
    fn checks() {
        let p = params();
        assert_eq!(
            check_request(&req(CMD_READ, 0, 0, 4096), &p),
            Ok(Command::Read)
        );
        assert_eq!(
            check_request(&req(99, 0, 0, 0), &p).unwrap_err().errno,
            EINVAL
        );
        assert_eq!(
            check_request(&req(CMD_READ, 0, 1 << 20, 1), &p)
                .unwrap_err()
                .errno,
            EINVAL
        );
        assert_eq!(
            check_request(&req(CMD_WRITE, 0, 1 << 20, 1), &p)
                .unwrap_err()
                .errno,
            ENOSPC
        );
        assert_eq!(
            check_request(&req(CMD_READ, 0, u64::MAX, 2), &p)
                .unwrap_err()
                .errno,
            EOVERFLOW
        );
        let big = check_request(&req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1), &p).unwrap_err();
        assert_eq!((big.errno, big.payload), (EOVERFLOW, Payload::Disconnect));
        let ro = SessionParams {
            read_only: true,
            ..p
        };
        let e = check_request(&req(CMD_WRITE, 0, 0, 10), &ro).unwrap_err();
        assert_eq!((e.errno, e.payload), (EPERM, Payload::Skip(10)));
        assert_eq!(
            check_request(&req(CMD_TRIM, 0, 0, 10), &ro)
                .unwrap_err()
                .errno,
            EPERM
        );
        assert_eq!(
            check_request(&req(CMD_READ, CMD_FLAG_NO_HOLE, 0, 1), &p)
                .unwrap_err()
                .errno,
            EINVAL
        );
        let nometa = SessionParams {
            base_allocation: false,
            ..p
        };
        assert_eq!(
            check_request(&req(CMD_BLOCK_STATUS, 0, 0, 1), &nometa)
                .unwrap_err()
                .errno,
            EINVAL
        );
    }

    #[test]
    fn descriptors_merge_and_clip() {
        use storage::Extent;
        let ex = [
            Extent {
                offset: 0,
                length: 4096,
                hole: false,
                zero: false,
            },
            Extent {
                offset: 4096,
                length: 4096,
                hole: true,
                zero: true,
            },
            Extent {
                offset: 8192,
                length: 4096,
                hole: true,
                zero: true,
            },
            Extent {
                offset: 12288,
                length: 4096,
                hole: false,
                zero: false,
            },
        ];
        let d = extents_to_descriptors(&ex, 1000, 12000, false);
        assert_eq!(
            d,
            vec![
                Descriptor {
                    length: 3096,
                    flags: 0
                },
                Descriptor {
                    length: 8192,
                    flags: STATE_HOLE | STATE_ZERO
                },
                Descriptor {
                    length: 712,
                    flags: 0
                },
            ]
        );
        assert_eq!(extents_to_descriptors(&ex, 1000, 12000, true).len(), 1);
        assert_eq!(
            extents_to_descriptors(&[], 0, 5, false),
            vec![Descriptor {
                length: 5,
                flags: 0
            }]
        );
    }
}
