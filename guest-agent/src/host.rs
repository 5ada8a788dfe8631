//! The host side of a session (`qubes-ctl qube run`): handshake, one command, its output
//! streamed to the caller's stdout/stderr, its exit status.
//!
//! What the guest sends is untrusted: frames are bounded ([`crate::proto::MAX_PAYLOAD`]),
//! only guest-to-host kinds are accepted, and nothing the guest says is ever run. A
//! guest that stalls stalls only this session (one `qube run` process), never the daemon
//! or another qube.

use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};
use thiserror::Error;

use crate::proto::{encode, Decoder, Exec, Msg, ProtoError, DATA_CHUNK, SYNC, VERSION};

#[derive(Debug, Error)]
pub enum HostError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("no answer from the guest agent within {0:?}: is the qube booted, and was its template built with the agent (qubes-guest-agent.service)?")]
    Timeout(Duration),
    #[error("the guest agent broke the protocol: {0}")]
    Proto(#[from] ProtoError),
    #[error("the guest agent sent {0}, which it may not send")]
    Unexpected(&'static str),
    #[error("the guest agent speaks protocol version {0}, this qubes-ctl speaks {VERSION}: rebuild the template")]
    Version(u32),
    #[error("the guest agent closed the connection before the command finished")]
    Closed,
    #[error("the command is too large for one request ({0})")]
    TooLarge(ProtoError),
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It ran to the end with this exit code (128 + N when killed by signal N).
    Exited(i32),
    /// `no_wait`: it was started as this pid (in the guest).
    Started(u32),
    /// The agent could not run it (no such user or command): its message and the code
    /// a shell would give (126, 127).
    Failed { message: String, code: i32 },
}

impl Outcome {
    pub fn code(&self) -> i32 {
        match self {
            Outcome::Exited(c) => *c,
            Outcome::Started(_) => 0,
            Outcome::Failed { code, .. } => *code,
        }
    }
}

fn name(m: &Msg) -> &'static str {
    match m {
        Msg::Hello { .. } => "Hello",
        Msg::Exec(_) => "Exec",
        Msg::Stdin(_) => "Stdin",
        Msg::Stdout(_) => "Stdout",
        Msg::Stderr(_) => "Stderr",
        Msg::Exit(_) => "Exit",
        Msg::Started(_) => "Started",
        Msg::Error(_) => "Error",
    }
}

/// A nonce that differs between sessions (pid and clock), so a reply left over from an
/// earlier session is told apart from this one's.
fn nonce() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_nanos() as u64) ^ ((std::process::id() as u64) << 40)
}

/// Control characters of a guest's error message shown as `?` (it goes to a terminal).
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Runs `exec` over `conn`. `handshake_by`: when to give up waiting for the agent (the
/// qube may still be booting). `stdin` is read only with `exec.pass_io`.
pub fn run(
    conn: &UnixStream,
    exec: &Exec,
    stdin: Option<BorrowedFd<'_>>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
    handshake_by: Instant,
) -> Result<Outcome, HostError> {
    conn.set_nonblocking(true)?;
    let began = Instant::now();
    let mut sock = conn;
    let nonce = nonce();
    let mut out = SYNC.to_vec();
    out.extend_from_slice(&encode(&Msg::Hello {
        version: VERSION,
        nonce,
    })?);
    let mut dec = Decoder::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut shaken = false;
    let mut stdin = if exec.pass_io { stdin } else { None };
    let mut failed: Option<String> = None;
    let mut started = None;
    loop {
        // Messages that are in.
        loop {
            let m = match dec.next_msg() {
                Ok(Some(m)) => m,
                Ok(None) => break,
                // Before the handshake, junk is what an earlier session left: skip it.
                Err(_) if !shaken => {
                    dec.resync();
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if !shaken {
                match m {
                    Msg::Hello { version, nonce: n } if n == nonce => {
                        if version != VERSION {
                            return Err(HostError::Version(version));
                        }
                        shaken = true;
                        out.extend_from_slice(
                            &encode(&Msg::Exec(exec.clone())).map_err(HostError::TooLarge)?,
                        );
                    }
                    _ => dec.resync(),
                }
                continue;
            }
            if !m.from_guest() {
                return Err(HostError::Unexpected(name(&m)));
            }
            match m {
                Msg::Stdout(d) => {
                    stdout.write_all(&d)?;
                    stdout.flush()?;
                }
                Msg::Stderr(d) => {
                    stderr.write_all(&d)?;
                    stderr.flush()?;
                }
                Msg::Started(pid) => {
                    started = Some(pid);
                    if exec.no_wait {
                        return Ok(Outcome::Started(pid));
                    }
                }
                Msg::Error(e) => failed = Some(printable(&e)),
                Msg::Exit(code) => {
                    return Ok(match failed {
                        Some(message) if started.is_none() => Outcome::Failed { message, code },
                        _ => Outcome::Exited(code),
                    })
                }
                Msg::Hello { .. } => return Err(HostError::Unexpected("a second Hello")),
                Msg::Exec(_) | Msg::Stdin(_) => unreachable!("filtered by from_guest"),
            }
        }
        let timeout = if shaken {
            -1
        } else {
            let left = handshake_by.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HostError::Timeout(
                    handshake_by.saturating_duration_since(began),
                ));
            }
            left.as_millis().min(i32::MAX as u128) as i32
        };
        let read_stdin = shaken && stdin.is_some() && out.len() < 2 * DATA_CHUNK;
        let mut fds = vec![PollFd::new(
            &sock,
            if out.is_empty() {
                PollFlags::IN
            } else {
                PollFlags::IN | PollFlags::OUT
            },
        )];
        if read_stdin {
            fds.push(PollFd::new(stdin.as_ref().unwrap(), PollFlags::IN));
        }
        match poll(&mut fds, timeout) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(io::Error::from(e).into()),
        }
        let stdin_ready = read_stdin
            && fds[1]
                .revents()
                .intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR);
        drop(fds);
        // Towards the guest.
        while !out.is_empty() {
            match sock.write(&out) {
                Ok(n) => {
                    out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::BrokenPipe => return Err(HostError::Closed),
                Err(e) => return Err(e.into()),
            }
        }
        // From the guest.
        match sock.read(&mut buf) {
            Ok(0) => return Err(HostError::Closed),
            Ok(n) => dec.feed(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Err(HostError::Closed),
            Err(e) => return Err(e.into()),
        }
        if stdin_ready {
            let fd = stdin.unwrap();
            let mut chunk = vec![0u8; DATA_CHUNK];
            match rustix::io::read(fd, &mut chunk) {
                Ok(0) => {
                    out.extend_from_slice(&encode(&Msg::Stdin(Vec::new()))?);
                    stdin = None;
                }
                Ok(n) => {
                    chunk.truncate(n);
                    out.extend_from_slice(&encode(&Msg::Stdin(chunk))?);
                }
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
                Err(e) => return Err(io::Error::from(e).into()),
            }
        }
    }
}
