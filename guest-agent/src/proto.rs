//! The agent protocol, version 1: what `qubes-ctl qube run` and the guest agent say to
//! each other over one byte stream (a virtio-serial port on QEMU).
//!
//! ```text
//! session   = SYNC Hello Exec ...           host -> guest
//!             SYNC Hello Started (Stdout|Stderr)* Exit     guest -> host
//!                               (or Error Exit)
//! frame     = len:u32le kind:u8 payload[len]     len <= MAX_PAYLOAD
//! Hello     = version:u32le nonce:u64le          the guest echoes the host's nonce
//! Exec      = flags:u8 user:(u16le len, bytes) argc:u16le (u32le len, bytes)*
//! Stdin     = bytes (empty: end of input)        Stdout, Stderr = bytes
//! Exit      = code:i32le (128+N for a signal)    Started = pid:u32le
//! Error     = UTF-8 text
//! ```
//!
//! The stream outlives a session (the port stays open in the guest while `qube run`
//! processes come and go), so each side starts a session with [`SYNC`] and skips whatever
//! precedes it: bytes a previous, interrupted session left in flight. The host also
//! checks that the Hello it gets back carries its own nonce.
//!
//! The guest is untrusted input for the host, as in Qubes' qrexec: a frame longer than
//! [`MAX_PAYLOAD`] is refused as soon as its header is read, so a reader never holds more
//! than one frame plus one read; a host accepts only the guest-to-host kinds and never
//! runs anything a guest asks for (there is no guest-to-host request at all).

use thiserror::Error;

pub const VERSION: u32 = 1;
/// Starts every session, in both directions.
pub const SYNC: [u8; 8] = *b"\xffQCagent";
/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Length and kind.
pub const HEADER: usize = 5;
/// Data frames (stdin/stdout/stderr) carry at most this much, well below the limit.
pub const DATA_CHUNK: usize = 32 * 1024;

const K_HELLO: u8 = 1;
const K_EXEC: u8 = 2;
const K_STDIN: u8 = 3;
const K_STDOUT: u8 = 4;
const K_STDERR: u8 = 5;
const K_EXIT: u8 = 6;
const K_STARTED: u8 = 7;
const K_ERROR: u8 = 8;

const F_PASS_IO: u8 = 1;
const F_NO_WAIT: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exec {
    /// The user the command runs as (looked up in the guest's passwd).
    pub user: String,
    /// Executed directly (no shell); `argv[0]` is looked up on PATH.
    pub argv: Vec<Vec<u8>>,
    /// Stdin is the host's; otherwise /dev/null.
    pub pass_io: bool,
    /// Start the command detached, answer Started and Exit(0) at once.
    pub no_wait: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Hello { version: u32, nonce: u64 },
    Exec(Exec),
    Stdin(Vec<u8>),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(i32),
    Started(u32),
    Error(String),
}

impl Msg {
    /// Whether a guest may send this kind (the host accepts nothing else).
    pub fn from_guest(&self) -> bool {
        matches!(
            self,
            Msg::Hello { .. }
                | Msg::Stdout(_)
                | Msg::Stderr(_)
                | Msg::Exit(_)
                | Msg::Started(_)
                | Msg::Error(_)
        )
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("frame of {0} bytes is larger than the limit of {MAX_PAYLOAD}")]
    TooLarge(usize),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed {kind} frame: {why}")]
    Malformed {
        kind: &'static str,
        why: &'static str,
    },
}

fn malformed(kind: &'static str, why: &'static str) -> ProtoError {
    ProtoError::Malformed { kind, why }
}

/// One frame as bytes. Fails only for a payload over [`MAX_PAYLOAD`] (an Exec with huge
/// arguments or user name); data frames are chunked by the callers.
pub fn encode(msg: &Msg) -> Result<Vec<u8>, ProtoError> {
    let (kind, payload): (u8, Vec<u8>) = match msg {
        Msg::Hello { version, nonce } => {
            let mut p = version.to_le_bytes().to_vec();
            p.extend_from_slice(&nonce.to_le_bytes());
            (K_HELLO, p)
        }
        Msg::Exec(e) => (K_EXEC, encode_exec(e)?),
        Msg::Stdin(d) => (K_STDIN, d.clone()),
        Msg::Stdout(d) => (K_STDOUT, d.clone()),
        Msg::Stderr(d) => (K_STDERR, d.clone()),
        Msg::Exit(c) => (K_EXIT, c.to_le_bytes().to_vec()),
        Msg::Started(p) => (K_STARTED, p.to_le_bytes().to_vec()),
        Msg::Error(s) => (K_ERROR, s.as_bytes().to_vec()),
    };
    if payload.len() > MAX_PAYLOAD {
        return Err(ProtoError::TooLarge(payload.len()));
    }
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(&payload);
    Ok(out)
}

fn encode_exec(e: &Exec) -> Result<Vec<u8>, ProtoError> {
    let too_large = || ProtoError::TooLarge(usize::MAX);
    let mut p = vec![((e.pass_io as u8) * F_PASS_IO) | ((e.no_wait as u8) * F_NO_WAIT)];
    let ulen = u16::try_from(e.user.len()).map_err(|_| too_large())?;
    p.extend_from_slice(&ulen.to_le_bytes());
    p.extend_from_slice(e.user.as_bytes());
    let argc = u16::try_from(e.argv.len()).map_err(|_| too_large())?;
    p.extend_from_slice(&argc.to_le_bytes());
    for a in &e.argv {
        let len = u32::try_from(a.len()).map_err(|_| too_large())?;
        p.extend_from_slice(&len.to_le_bytes());
        p.extend_from_slice(a);
        if p.len() > MAX_PAYLOAD {
            return Err(ProtoError::TooLarge(p.len()));
        }
    }
    Ok(p)
}

/// A bounds-checked cursor over a payload.
struct Cur<'a> {
    b: &'a [u8],
    kind: &'static str,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.b.len() < n {
            return Err(malformed(self.kind, "truncated"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn end(&self) -> Result<(), ProtoError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(malformed(self.kind, "trailing bytes"))
        }
    }
}

/// Parses one payload of `kind`.
pub fn decode(kind: u8, payload: &[u8]) -> Result<Msg, ProtoError> {
    match kind {
        K_HELLO => {
            let mut c = Cur {
                b: payload,
                kind: "Hello",
            };
            let version = c.u32()?;
            let nonce = u64::from_le_bytes(c.take(8)?.try_into().unwrap());
            c.end()?;
            Ok(Msg::Hello { version, nonce })
        }
        K_EXEC => {
            let mut c = Cur {
                b: payload,
                kind: "Exec",
            };
            let flags = c.take(1)?[0];
            if flags & !(F_PASS_IO | F_NO_WAIT) != 0 {
                return Err(malformed("Exec", "unknown flags"));
            }
            let ulen = c.u16()? as usize;
            let user = std::str::from_utf8(c.take(ulen)?)
                .map_err(|_| malformed("Exec", "user is not UTF-8"))?
                .to_string();
            let argc = c.u16()? as usize;
            if argc == 0 {
                return Err(malformed("Exec", "no command"));
            }
            let mut argv = Vec::with_capacity(argc.min(1024));
            for _ in 0..argc {
                let len = c.u32()? as usize;
                let a = c.take(len)?;
                if a.contains(&0) {
                    return Err(malformed("Exec", "NUL in an argument"));
                }
                argv.push(a.to_vec());
            }
            c.end()?;
            if argv[0].is_empty() {
                return Err(malformed("Exec", "empty command name"));
            }
            Ok(Msg::Exec(Exec {
                user,
                argv,
                pass_io: flags & F_PASS_IO != 0,
                no_wait: flags & F_NO_WAIT != 0,
            }))
        }
        K_STDIN => Ok(Msg::Stdin(payload.to_vec())),
        K_STDOUT => Ok(Msg::Stdout(payload.to_vec())),
        K_STDERR => Ok(Msg::Stderr(payload.to_vec())),
        K_EXIT | K_STARTED => {
            let mut c = Cur {
                b: payload,
                kind: if kind == K_EXIT { "Exit" } else { "Started" },
            };
            let v = c.u32()?;
            c.end()?;
            Ok(if kind == K_EXIT {
                Msg::Exit(v as i32)
            } else {
                Msg::Started(v)
            })
        }
        K_ERROR => Ok(Msg::Error(String::from_utf8_lossy(payload).into_owned())),
        other => Err(ProtoError::UnknownKind(other)),
    }
}

/// Splits a byte stream into frames. Holds at most one partial frame plus the bytes of
/// one `feed`: a length over the limit is an error as soon as the header is in.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    synced: bool,
}

impl Decoder {
    /// A decoder that skips everything up to and including the next [`SYNC`].
    pub fn new() -> Self {
        Decoder::default()
    }

    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Back to skipping up to the next [`SYNC`] (a new session; stale bytes before it).
    pub fn resync(&mut self) {
        self.synced = false;
    }

    pub fn synced(&self) -> bool {
        self.synced
    }

    /// Bytes held (for tests of the bound).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed.
    pub fn next_msg(&mut self) -> Result<Option<Msg>, ProtoError> {
        if !self.synced {
            match find(&self.buf, &SYNC) {
                Some(i) => {
                    self.buf.drain(..i + SYNC.len());
                    self.synced = true;
                }
                None => {
                    // Keep only what could be the start of a SYNC split across reads.
                    let keep = (SYNC.len() - 1).min(self.buf.len());
                    let cut = self.buf.len() - keep;
                    self.buf.drain(..cut);
                    return Ok(None);
                }
            }
        }
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        let len = u32::from_le_bytes(self.buf[..4].try_into().unwrap()) as usize;
        if len > MAX_PAYLOAD {
            return Err(ProtoError::TooLarge(len));
        }
        if self.buf.len() < HEADER + len {
            return Ok(None);
        }
        let kind = self.buf[4];
        let msg = decode(kind, &self.buf[HEADER..HEADER + len]);
        self.buf.drain(..HEADER + len);
        msg.map(Some)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// An exit code as a shell reports it: the code, or 128 + the signal number.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn exec() -> Msg {
        Msg::Exec(Exec {
            user: "root".into(),
            argv: vec![b"sh".to_vec(), b"-c".to_vec(), b"exit 3".to_vec()],
            pass_io: true,
            no_wait: false,
        })
    }

    fn decode_all(bytes: &[u8]) -> Vec<Result<Msg, ProtoError>> {
        let mut d = Decoder::new();
        d.feed(bytes);
        let mut out = Vec::new();
        loop {
            match d.next_msg() {
                Ok(Some(m)) => out.push(Ok(m)),
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(e));
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn frames_round_trip_after_sync_and_garbage_before_it_is_skipped() {
        let msgs = vec![
            Msg::Hello {
                version: VERSION,
                nonce: 0xdead_beef_1234,
            },
            exec(),
            Msg::Stdin(b"hi\n".to_vec()),
            Msg::Stdin(Vec::new()),
            Msg::Stdout(vec![0; DATA_CHUNK]),
            Msg::Stderr(b"oops".to_vec()),
            Msg::Started(42),
            Msg::Exit(-1),
            Msg::Error("no such user".into()),
        ];
        // Stale bytes of an earlier session, including a whole frame, come first.
        let mut bytes = b"\x05\x00\x00\x00\x06junk".to_vec();
        bytes.extend_from_slice(&encode(&Msg::Exit(3)).unwrap());
        bytes.extend_from_slice(&SYNC);
        for m in &msgs {
            bytes.extend_from_slice(&encode(m).unwrap());
        }
        let got: Vec<Msg> = decode_all(&bytes).into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(got, msgs);
        // The same, fed one byte at a time (a SYNC split across reads).
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in &bytes {
            d.feed(std::slice::from_ref(b));
            while let Some(m) = d.next_msg().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
    }

    #[test]
    fn nothing_is_decoded_without_sync() {
        let bytes = encode(&exec()).unwrap();
        assert!(decode_all(&bytes).is_empty());
        let mut d = Decoder::new();
        d.feed(&vec![0u8; 1 << 20]);
        assert_eq!(d.next_msg(), Ok(None));
        assert!(d.buffered() < SYNC.len(), "unsynced junk is not kept");
    }

    #[test]
    fn an_oversized_length_is_refused_from_its_header() {
        let mut bytes = SYNC.to_vec();
        bytes.extend_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        bytes.push(K_STDOUT);
        // No payload follows: the decoder does not wait for (or buffer) 64 KiB + 1.
        assert_eq!(
            decode_all(&bytes),
            vec![Err(ProtoError::TooLarge(MAX_PAYLOAD + 1))]
        );
        let mut bytes = SYNC.to_vec();
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.push(K_STDOUT);
        assert_eq!(
            decode_all(&bytes),
            vec![Err(ProtoError::TooLarge(u32::MAX as usize))]
        );
        // Exactly the limit is fine.
        let mut bytes = SYNC.to_vec();
        bytes.extend_from_slice(&encode(&Msg::Stdout(vec![7; MAX_PAYLOAD])).unwrap());
        assert_eq!(
            decode_all(&bytes),
            vec![Ok(Msg::Stdout(vec![7; MAX_PAYLOAD]))]
        );
        assert!(encode(&Msg::Stdout(vec![7; MAX_PAYLOAD + 1])).is_err());
    }

    #[test]
    fn malformed_payloads_are_errors() {
        let frame = |kind: u8, payload: &[u8]| {
            let mut b = SYNC.to_vec();
            b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            b.push(kind);
            b.extend_from_slice(payload);
            decode_all(&b).pop().unwrap()
        };
        assert_eq!(frame(99, b""), Err(ProtoError::UnknownKind(99)));
        assert!(frame(K_HELLO, &[1, 0, 0]).is_err(), "truncated Hello");
        assert!(
            frame(K_HELLO, &[0; 13]).is_err(),
            "Hello with trailing bytes"
        );
        assert!(frame(K_EXIT, &[0; 3]).is_err());
        // Exec: argc 0; an argument longer than the payload; a NUL; unknown flags.
        assert!(frame(K_EXEC, &[0, 0, 0, 0, 0]).is_err());
        assert!(frame(K_EXEC, &[0, 0, 0, 1, 0, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(frame(K_EXEC, &[0, 0, 0, 1, 0, 2, 0, 0, 0, b'a', 0]).is_err());
        assert!(frame(K_EXEC, &[0x80, 0, 0, 1, 0, 1, 0, 0, 0, b'a']).is_err());
        assert!(
            frame(K_EXEC, &[0, 0, 0, 1, 0, 0, 0, 0, 0]).is_err(),
            "empty argv[0]"
        );
        assert_eq!(
            frame(K_EXEC, &[0, 0, 0, 1, 0, 1, 0, 0, 0, b'a']),
            Ok(Msg::Exec(Exec {
                user: String::new(),
                argv: vec![b"a".to_vec()],
                pass_io: false,
                no_wait: false
            }))
        );
    }

    #[test]
    fn the_host_accepts_only_guest_kinds() {
        assert!(!exec().from_guest());
        assert!(!Msg::Stdin(vec![]).from_guest());
        assert!(Msg::Exit(0).from_guest());
    }

    proptest! {
        /// Any bytes after a SYNC: the decoder never panics, never holds more than one
        /// frame plus what was fed, and stops at the first error.
        #[test]
        fn arbitrary_streams_are_safe(chunks in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..300), 0..40)) {
            let mut d = Decoder::new();
            d.feed(&SYNC);
            for c in &chunks {
                d.feed(c);
                loop {
                    match d.next_msg() {
                        Ok(Some(_)) => continue,
                        Ok(None) => break,
                        Err(_) => return Ok(()),
                    }
                }
                prop_assert!(d.buffered() <= HEADER + MAX_PAYLOAD + c.len());
            }
        }

        #[test]
        fn exec_round_trips(user in "[a-z]{0,12}",
                            argv in proptest::collection::vec(
                                proptest::collection::vec(1u8..=255, 1..40), 1..8),
                            pass_io: bool, no_wait: bool) {
            let m = Msg::Exec(Exec { user, argv, pass_io, no_wait });
            let mut b = SYNC.to_vec();
            b.extend_from_slice(&encode(&m).unwrap());
            prop_assert_eq!(decode_all(&b), vec![Ok(m)]);
        }
    }
}
