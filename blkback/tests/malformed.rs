//! A raw-socket client sending malformed and hostile input: every case must end in an
//! error reply or a clean close of that connection, and the server must go on serving.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use blkback::proto::*;
use common::*;

const MIB: u64 = 1 << 20;

struct Raw {
    s: UnixStream,
}

impl Raw {
    /// Connects and completes the greeting with `flags`.
    fn connect(fx: &Fixture, flags: u32) -> Raw {
        let mut s = UnixStream::connect(&fx.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], &NBDMAGIC.to_be_bytes());
        assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        s.write_all(&flags.to_be_bytes()).unwrap();
        Raw { s }
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[..8], &OPT_REPLY_MAGIC.to_be_bytes());
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        (opt, kind, d)
    }

    /// GO for `name`; returns the final reply type.
    fn go(&mut self, name: &str) -> u32 {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &d);
        loop {
            let (_, kind, _) = self.reply();
            if kind != REP_INFO {
                return kind;
            }
        }
    }

    fn request(&mut self, command: u16, flags: u16, handle: u64, offset: u64, length: u32) {
        let r = Request {
            flags,
            command,
            handle,
            offset,
            length,
        };
        self.s.write_all(&encode_request(&r)).unwrap();
    }

    /// A simple reply: (error, handle).
    fn simple(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    /// One structured chunk: (flags, type, handle, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        (
            u16::from_be_bytes([h[4], h[5]]),
            u16::from_be_bytes([h[6], h[7]]),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            d,
        )
    }

    /// The server closed the connection: EOF (or a reset) without further bytes.
    fn assert_closed(&mut self) {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => {}
            Ok(_) => panic!("server sent more data instead of closing"),
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ),
                "expected close, got {e}"
            ),
        }
    }
}

fn flags() -> u32 {
    FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES
}

/// A normal session on a fresh connection still works (the server survived).
fn still_serving(fx: &Fixture) {
    let mut c = Raw::connect(fx, flags());
    assert_eq!(c.go("vol"), REP_ACK);
    c.request(CMD_WRITE, 0, 1, 0, 4);
    c.s.write_all(b"abcd").unwrap();
    assert_eq!(c.simple(), (0, 1));
    c.request(CMD_READ, 0, 2, 0, 4);
    assert_eq!(c.simple(), (0, 2));
    let mut d = [0u8; 4];
    c.s.read_exact(&mut d).unwrap();
    assert_eq!(&d, b"abcd");
    c.request(CMD_DISC, 0, 3, 0, 0);
    c.assert_closed();
}

fn wait_for_no_connections(fx: &Fixture) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while fx.server().active_connections() != 0 {
        assert!(
            Instant::now() < deadline,
            "connections never went away: {}",
            fx.server().active_connections()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn fixture() -> Fixture {
    Fixture::new(
        Backend::File,
        &[
            VolSpec::rw("vol", 4 * MIB),
            VolSpec {
                name: "ro",
                size: MIB,
                read_only: true,
                space: None,
            },
        ],
    )
}

#[test]
fn handshake_abuse() {
    let fx = fixture();
    // Unknown client flags: dropped.
    let mut c = Raw::connect(&fx, 1 << 7);
    c.assert_closed();
    // Bad option magic: dropped.
    c = Raw::connect(&fx, flags());
    c.s.write_all(&[0x55; 16]).unwrap();
    c.assert_closed();
    // Unknown option and STARTTLS: ERR_UNSUP, session goes on.
    c = Raw::connect(&fx, flags());
    c.option(0x4242, b"junk");
    assert_eq!(c.reply().1, REP_ERR_UNSUP);
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.reply().1, REP_ERR_UNSUP);
    // Malformed GO (name length past the data): ERR_INVALID.
    c.option(OPT_GO, &[0, 0, 1, 0, b'x']);
    assert_eq!(c.reply().1, REP_ERR_INVALID);
    c.option(OPT_LIST, b"data");
    assert_eq!(c.reply().1, REP_ERR_INVALID);
    assert_eq!(c.go("other-qube/private"), REP_ERR_UNKNOWN);
    assert_eq!(c.go("vol"), REP_ACK);
    c.request(CMD_DISC, 0, 0, 0, 0);
    c.assert_closed();
    // Option length abuse: TOO_BIG, then the server hangs up without reading 1 GiB.
    c = Raw::connect(&fx, flags());
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&(1u32 << 30).to_be_bytes());
    c.s.write_all(&h).unwrap();
    assert_eq!(c.reply().1, REP_ERR_TOO_BIG);
    c.assert_closed();
    // EXPORT_NAME for an unknown export: hard disconnect.
    c = Raw::connect(&fx, flags());
    c.option(OPT_EXPORT_NAME, b"nope");
    c.assert_closed();
    // EXPORT_NAME that works, without NO_ZEROES: size, flags, 124 zeroes.
    c = Raw::connect(&fx, FLAG_C_FIXED_NEWSTYLE);
    c.option(OPT_EXPORT_NAME, b"ro");
    let mut r = [0u8; 8 + 2 + 124];
    c.s.read_exact(&mut r).unwrap();
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), MIB);
    assert_ne!(u16::from_be_bytes([r[8], r[9]]) & FLAG_READ_ONLY, 0);
    assert!(r[10..].iter().all(|&b| b == 0));
    // ABORT: ACK then close.
    c = Raw::connect(&fx, flags());
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.reply().1, REP_ACK);
    c.assert_closed();
    // Truncated option header, client gone.
    c = Raw::connect(&fx, flags());
    c.s.write_all(&IHAVEOPT.to_be_bytes()[..5]).unwrap();
    drop(c);
    wait_for_no_connections(&fx);
    still_serving(&fx);
}

#[test]
fn transmission_abuse() {
    let fx = fixture();
    let mut c = Raw::connect(&fx, flags());
    assert_eq!(c.go("vol"), REP_ACK);
    c.request(99, 0, 10, 0, 0);
    assert_eq!(c.simple(), (EINVAL, 10));
    c.request(CMD_READ, 0, 11, 4 * MIB, 1);
    assert_eq!(c.simple(), (EINVAL, 11));
    c.request(CMD_READ, 0, 12, u64::MAX - 1, 16);
    assert_eq!(c.simple(), (EOVERFLOW, 12));
    c.request(CMD_READ, 0, 13, 0, MAX_PAYLOAD + 1);
    assert_eq!(c.simple(), (EOVERFLOW, 13));
    c.request(CMD_READ, 1 << 9, 14, 0, 1);
    assert_eq!(c.simple(), (EINVAL, 14), "unknown command flag");
    c.request(CMD_BLOCK_STATUS, 0, 15, 0, 512);
    assert_eq!(c.simple(), (EINVAL, 15), "no meta context negotiated");
    // Write past the end: payload skipped, ENOSPC, connection fine.
    c.request(CMD_WRITE, 0, 16, 4 * MIB - 2, 4);
    c.s.write_all(b"wxyz").unwrap();
    assert_eq!(c.simple(), (ENOSPC, 16));
    // Pipelining: 32 requests in one go, all answered (in any order).
    let mut batch = Vec::new();
    for i in 0..32u64 {
        batch.extend_from_slice(&encode_request(&Request {
            flags: 0,
            command: CMD_READ,
            handle: 100 + i,
            offset: i * 4096,
            length: 4096,
        }));
    }
    c.s.write_all(&batch).unwrap();
    let mut seen = Vec::new();
    for _ in 0..32 {
        let (err, h) = c.simple();
        assert_eq!(err, 0);
        let mut d = vec![0u8; 4096];
        c.s.read_exact(&mut d).unwrap();
        seen.push(h);
    }
    seen.sort();
    assert_eq!(seen, (100..132).collect::<Vec<_>>());
    // Oversized write: EOVERFLOW, then the server hangs up (it cannot trust the framing).
    c.request(CMD_WRITE, 0, 17, 0, MAX_PAYLOAD + 1);
    assert_eq!(c.simple(), (EOVERFLOW, 17));
    c.assert_closed();

    // Bad request magic: dropped.
    c = Raw::connect(&fx, flags());
    assert_eq!(c.go("vol"), REP_ACK);
    c.s.write_all(&[0xee; 28]).unwrap();
    c.assert_closed();
    // Read-only: WRITE refused with EPERM, payload skipped, session continues.
    c = Raw::connect(&fx, flags());
    assert_eq!(c.go("ro"), REP_ACK);
    c.request(CMD_WRITE, 0, 20, 0, 8);
    c.s.write_all(&[1; 8]).unwrap();
    assert_eq!(c.simple(), (EPERM, 20));
    c.request(CMD_TRIM, 0, 21, 0, 8);
    assert_eq!(c.simple(), (EPERM, 21));
    c.request(CMD_FLUSH, 0, 22, 0, 0);
    assert_eq!(c.simple(), (0, 22));
    drop(c);
    // Truncated request header, then gone.
    c = Raw::connect(&fx, flags());
    assert_eq!(c.go("vol"), REP_ACK);
    c.s.write_all(
        &encode_request(&Request {
            flags: 0,
            command: CMD_READ,
            handle: 1,
            offset: 0,
            length: 1,
        })[..13],
    )
    .unwrap();
    drop(c);
    // Vanish in the middle of a write payload.
    c = Raw::connect(&fx, flags());
    assert_eq!(c.go("vol"), REP_ACK);
    c.request(CMD_WRITE, 0, 30, 0, MIB as u32);
    c.s.write_all(&[7u8; 1000]).unwrap();
    drop(c);
    // The same with a small (inline) write: the partial payload must never be applied.
    c = Raw::connect(&fx, flags());
    assert_eq!(c.go("vol"), REP_ACK);
    c.request(CMD_WRITE, 0, 31, 2 * MIB, 8192);
    c.s.write_all(&[7u8; 100]).unwrap();
    drop(c);
    wait_for_no_connections(&fx);
    let mut probe = vec![0xffu8; 8192];
    fx.devices[0].read_at(&mut probe, 2 * MIB).unwrap();
    assert!(
        probe.iter().all(|&b| b == 0),
        "a truncated write reached the device"
    );
    // Vanish with replies in flight (large reads nobody collects).
    c = Raw::connect(&fx, flags());
    assert_eq!(c.go("vol"), REP_ACK);
    for i in 0..16 {
        c.request(CMD_READ, 0, i, 0, 2 * MIB as u32);
    }
    drop(c);
    wait_for_no_connections(&fx);
    still_serving(&fx);
}

#[test]
fn structured_errors_and_holes_on_the_wire() {
    let fx = fixture();
    let mut c = Raw::connect(&fx, flags());
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.reply().1, REP_ACK);
    assert_eq!(c.go("vol"), REP_ACK);
    // Out of range read: one ERROR chunk with a message, DONE.
    c.request(CMD_READ, 0, 1, 4 * MIB, 512);
    let (fl, ty, h, d) = c.chunk();
    assert_eq!((fl, ty, h), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 1));
    assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), EINVAL);
    let mlen = u16::from_be_bytes([d[4], d[5]]) as usize;
    assert!(
        mlen > 0
            && std::str::from_utf8(&d[6..6 + mlen])
                .unwrap()
                .contains("end")
    );
    // Fresh sparse volume with data only in the second MiB: HOLE, DATA, HOLE.
    c.request(CMD_WRITE, 0, 2, MIB, MIB as u32);
    c.s.write_all(&vec![9u8; MIB as usize]).unwrap();
    assert_eq!(c.simple(), (0, 2));
    c.request(CMD_READ, 0, 3, 0, 3 * MIB as u32);
    let mut got = Vec::new();
    loop {
        let (fl, ty, h, d) = c.chunk();
        assert_eq!(h, 3);
        let off = u64::from_be_bytes(d[..8].try_into().unwrap());
        let len = if ty == REPLY_TYPE_OFFSET_HOLE {
            u32::from_be_bytes(d[8..12].try_into().unwrap()) as u64
        } else {
            d.len() as u64 - 8
        };
        got.push((ty, off, len));
        if fl & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(
        got,
        vec![
            (REPLY_TYPE_OFFSET_HOLE, 0, MIB),
            (REPLY_TYPE_OFFSET_DATA, MIB, MIB),
            (REPLY_TYPE_OFFSET_HOLE, 2 * MIB, MIB)
        ]
    );
    // DF: a single data chunk, zeroes included.
    c.request(CMD_READ, CMD_FLAG_DF, 4, 0, 3 * MIB as u32);
    let (fl, ty, _, d) = c.chunk();
    assert_eq!(
        (fl, ty, d.len() as u64),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 8 + 3 * MIB)
    );
}

#[test]
fn socket_file_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("q.sock");
    // A stale socket (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let dev = || -> std::sync::Arc<dyn storage::BlockDevice> {
        std::sync::Arc::new(
            blkback::testing::FileDevice::create(&dir.path().join("d"), MIB).unwrap(),
        )
    };
    let export = |d| blkback::Export {
        name: "v".into(),
        description: String::new(),
        device: d,
    };
    let server = blkback::NbdServer::bind_unix(&sock, vec![export(dev())]).unwrap();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A live one is not.
    assert!(matches!(
        blkback::NbdServer::bind_unix(&sock, vec![export(dev())]),
        Err(blkback::NbdError::SocketInUse(_))
    ));
    // An idle client does not hold shutdown past the grace period; the socket goes away.
    let mut idle = UnixStream::connect(&sock).unwrap();
    let mut g = [0u8; 18];
    idle.read_exact(&mut g).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.active_connections() != 1 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    server.shutdown(Duration::from_millis(100)).unwrap();
    assert!(!sock.exists());
    let mut b = [0u8; 1];
    assert!(matches!(idle.read(&mut b), Ok(0) | Err(_)));
    // A regular file at the path is never replaced.
    std::fs::write(&sock, b"not a socket").unwrap();
    assert!(matches!(
        blkback::NbdServer::bind_unix(&sock, vec![export(dev())]),
        Err(blkback::NbdError::NotASocket(_))
    ));
}
