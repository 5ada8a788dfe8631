//! The admin API: every CLI command is a [`Request`]; the answer is a [`Reply`]. The CLI
//! sends it to the daemon over `ROOT/run/admin.sock` (one JSON line each way) when a
//! daemon owns the pool, and runs it in-process otherwise: one code path either way.
//!
//! The protocol is versioned ([`PROTOCOL`]): each request line carries `"v"`, and the ping
//! reply says the daemon's. A daemon answers a request of another version with an error
//! of kind [`ErrorKind::Protocol`] naming both versions and the fix; `ping` and
//! `daemon_stop` are answered whatever the version, so any client can find and stop any
//! daemon. Errors are typed: a `kind` a script can match, and the message.
//!
//! Files a command reads or writes are opened by the CLI, with the caller's rights and
//! umask, and travel to the daemon as descriptors (`SCM_RIGHTS` on the request line): the
//! daemon never opens a path a client named. The paths in requests are for messages only.

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The admin protocol's version. Bump it when a request or a reply changes shape.
/// Version 1 is the unversioned protocol (no `"v"` in requests, errors as bare strings).
pub const PROTOCOL: u32 = 2;

/// What went wrong, for scripts to match (the message is for people).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The client and the daemon speak different protocol versions.
    Protocol,
    /// The request line is not a request of this protocol.
    Malformed,
    /// No such qube, template, volume or revision.
    NotFound,
    /// The name is taken.
    Exists,
    /// The qube runs (or its volume holds a run's writes); shut it down first.
    Running,
    NotRunning,
    /// Another operation holds what the request needs (an import, a client, the pool).
    Busy,
    /// Other qubes depend on it.
    InUse,
    /// The pool or the host filesystem is full.
    NoSpace,
    /// A value in the request is not acceptable.
    Invalid,
    /// Anything else (I/O, a hypervisor command, a damaged pool...).
    Failed,
}

/// A typed error reply. Version 1 daemons sent a bare string: it reads as `Failed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(from = "ErrorWire")]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ErrorWire {
    Typed { kind: ErrorKind, message: String },
    Text(String),
}

impl From<ErrorWire> for ApiError {
    fn from(w: ErrorWire) -> Self {
        match w {
            ErrorWire::Typed { kind, message } => ApiError { kind, message },
            ErrorWire::Text(message) => ApiError {
                kind: ErrorKind::Failed,
                message,
            },
        }
    }
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
        }
    }

    /// The reply to a request of protocol `client` (this daemon speaks [`PROTOCOL`]).
    pub fn protocol(client: u32) -> Self {
        let who = if client < PROTOCOL {
            "an older qubes-ctl than the one that started the daemon"
        } else {
            "a newer qubes-ctl than the one that started the daemon"
        };
        ApiError::new(
            ErrorKind::Protocol,
            protocol_mismatch(PROTOCOL, client, who),
        )
    }

    /// The kind of a controller error, from the typed errors in its chain.
    pub fn of(e: &anyhow::Error) -> Self {
        use storage::qubes::ModelError as M;
        use storage::PoolError as P;
        let kind = e
            .chain()
            .find_map(|c| {
                if let Some(a) = c.downcast_ref::<ApiError>() {
                    return Some(a.kind);
                }
                if let Some(m) = c.downcast_ref::<M>() {
                    return match m {
                        M::NoSuchQube { .. }
                        | M::NoSuchVolume { .. }
                        | M::NoRevisions { .. }
                        | M::NoSuchRevision { .. } => Some(ErrorKind::NotFound),
                        M::QubeExists { .. } => Some(ErrorKind::Exists),
                        M::Running { .. } | M::Dirty { .. } => Some(ErrorKind::Running),
                        M::NotRunning { .. } => Some(ErrorKind::NotRunning),
                        M::Busy { .. } => Some(ErrorKind::Busy),
                        M::InUse { .. } => Some(ErrorKind::InUse),
                        M::Name(_)
                        | M::TemplateRequired { .. }
                        | M::TemplateNotAllowed { .. }
                        | M::WrongTemplateClass { .. }
                        | M::NotPersistent { .. }
                        | M::FollowsSource { .. } => Some(ErrorKind::Invalid),
                        _ => None,
                    };
                }
                if let Some(p) = c.downcast_ref::<P>() {
                    return match p {
                        P::NoSuchVolume(_) => Some(ErrorKind::NotFound),
                        P::VolumeExists(_) => Some(ErrorKind::Exists),
                        P::NoSpace { .. } | P::HostFull { .. } => Some(ErrorKind::NoSpace),
                        P::Busy { .. } | P::Locked { .. } => Some(ErrorKind::Busy),
                        P::BadVolumeKey { .. } | P::ShrinkRefused { .. } => {
                            Some(ErrorKind::Invalid)
                        }
                        _ => None,
                    };
                }
                if c.downcast_ref::<storage::NameError>().is_some() {
                    return Some(ErrorKind::Invalid);
                }
                None
            })
            .unwrap_or(ErrorKind::Failed);
        ApiError::new(kind, crate::cli::error_text(e))
    }
}

/// The message for a client of protocol `client` talking to a daemon of `daemon`.
pub fn protocol_mismatch(daemon: u32, client: u32, who: &str) -> String {
    format!(
        "the daemon speaks admin protocol version {daemon} and this client version {client}          ({who}); restart the daemon with this qubes-ctl: `qubes-ctl daemon stop` (running          qubes stay marked running and the next daemon serves them again), then run the          command again"
    )
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Ping,
    PoolInfo,
    PoolVerify,
    /// The image travels as descriptor 0.
    TemplateCreate {
        name: String,
        image: PathBuf,
        #[serde(default)]
        replace: bool,
    },
    /// The recipe as the client resolved it (its `extends` merged, its files read with the
    /// client's rights); each of its `files`, then each local `gpg_keys` file, travels as a
    /// descriptor, in that order. `recipe` is the path the client named, for messages.
    TemplateBuild {
        recipe: PathBuf,
        resolved: Box<template_builder::Recipe>,
        name: Option<String>,
        mirror: Option<String>,
    },
    TemplateList,
    TemplateInfo {
        name: String,
    },
    TemplateRemove {
        name: String,
    },
    /// The package is written to descriptor 0.
    TemplateExport {
        name: String,
        file: PathBuf,
    },
    /// The package travels as descriptor 0.
    TemplateImport {
        file: PathBuf,
        name: Option<String>,
        #[serde(default)]
        replace: bool,
    },
    /// Template repositories: trust, sources, install/upgrade/downgrade/reinstall.
    TemplateRepo {
        action: crate::repo::RepoAction,
    },
    QubeCreate {
        name: String,
        class: String,
        template: Option<String>,
        label: Option<String>,
    },
    QubeList,
    QubeRemove {
        name: String,
    },
    QubeClone {
        src: String,
        dst: String,
    },
    QubePrefs {
        name: String,
        key: Option<String>,
        value: Option<String>,
    },
    QubeStart {
        name: String,
        hypervisor: Option<String>,
    },
    QubeShutdown {
        name: String,
        timeout_secs: u64,
        kill: bool,
    },
    QubeConsole {
        name: String,
    },
    QubePause {
        name: String,
    },
    QubeUnpause {
        name: String,
    },
    VolumeList {
        qube: Option<String>,
    },
    VolumeInfo {
        qube: String,
        vol: String,
    },
    VolumeRevert {
        qube: String,
        vol: String,
        revision: Option<String>,
    },
    VolumeResize {
        qube: String,
        vol: String,
        size: u64,
        allow_shrink: bool,
    },
    /// Exactly `size` bytes are read from descriptor 0.
    VolumeImport {
        qube: String,
        vol: String,
        file: PathBuf,
        size: u64,
    },
    /// The image is written to descriptor 0.
    VolumeExport {
        qube: String,
        vol: String,
        file: PathBuf,
    },
    VolumeConfig {
        qube: String,
        vol: String,
        key: String,
        value: String,
    },
    VolumeDiscard {
        qube: String,
        vol: String,
    },
    DaemonStop,
}

impl Request {
    /// Commands that need a daemon (they leave something running behind them).
    pub fn needs_daemon(&self) -> bool {
        matches!(self, Request::QubeStart { .. })
    }
}

/// One reply line: either `{"ok": VALUE}` or `{"error": {"kind": KIND, "message": TEXT}}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok(serde_json::Value),
    Error(ApiError),
}

/// Reads a request line: its protocol version (1 if it names none) and the request, or
/// the error to answer with.
pub fn parse_request(line: &str) -> Result<Request, ApiError> {
    let v: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| ApiError::new(ErrorKind::Malformed, format!("malformed request: {e}")))?;
    let version = v
        .get("v")
        .and_then(|x| x.as_u64())
        .map(|x| u32::try_from(x).unwrap_or(u32::MAX))
        .unwrap_or(1);
    // Any client may find and stop any daemon.
    let op = v.get("op").and_then(|x| x.as_str());
    if version != PROTOCOL && !matches!(op, Some("ping" | "daemon_stop")) {
        return Err(ApiError::protocol(version));
    }
    serde_json::from_value(v)
        .map_err(|e| ApiError::new(ErrorKind::Malformed, format!("malformed request: {e}")))
}

/// Most descriptors one request carries (a template build sends one per file its recipe
/// installs; the kernel's own limit, SCM_MAX_FD, is 253).
pub const MAX_FDS: usize = 64;

/// Sends one request to the daemon and waits for its reply.
pub fn call(socket: &Path, req: &Request) -> std::io::Result<Reply> {
    call_with_fds(socket, req, &[], None)
}

/// Sends one request with `fds` attached (`SCM_RIGHTS` on its first byte) and waits for
/// the reply, at most `timeout` if given.
pub fn call_with_fds(
    socket: &Path,
    req: &Request,
    fds: &[BorrowedFd<'_>],
    timeout: Option<Duration>,
) -> std::io::Result<Reply> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    let mut writer = stream.try_clone()?;
    let mut v = serde_json::to_value(req).map_err(std::io::Error::other)?;
    v["v"] = PROTOCOL.into();
    let mut line = v.to_string();
    line.push('\n');
    let mut space = [0u8; rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(rustix::net::SendAncillaryMessage::ScmRights(fds)) {
        return Err(std::io::Error::other(format!(
            "too many files for one request ({} > {MAX_FDS})",
            fds.len()
        )));
    }
    let sent = rustix::net::sendmsg(
        writer.as_fd(),
        &[IoSlice::new(line.as_bytes())],
        &mut control,
        rustix::net::SendFlags::NOSIGNAL,
    )?;
    writer.write_all(&line.as_bytes()[sent..])?;
    writer.flush()?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer)?;
    if answer.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the daemon closed the connection without answering (see ROOT/run/daemon.log)",
        ));
    }
    serde_json::from_str(&answer).map_err(std::io::Error::other)
}

/// True if a daemon answers on `socket` within `timeout`.
pub fn daemon_alive(socket: &Path, timeout: Duration) -> bool {
    ping(socket, timeout).is_some()
}

/// The daemon's answer to a ping (`pid`, `build`, `served`), if one answers.
pub fn ping(socket: &Path, timeout: Duration) -> Option<crate::results::Pong> {
    match call_with_fds(socket, &Request::Ping, &[], Some(timeout)) {
        Ok(Reply::Ok(v)) => serde_json::from_value(v).ok(),
        _ => None,
    }
}

/// Something accepts connections on `socket` (a daemon, perhaps one that does not answer).
pub fn listening(socket: &Path) -> bool {
    UnixStream::connect(socket).is_ok()
}

/// Reads one request line and the descriptors sent with it.
pub fn read_request(conn: &UnixStream) -> std::io::Result<(String, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 64 << 10];
    let mut space = [0u8; rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        conn.as_fd(),
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        rustix::net::RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let rustix::net::RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    buf.truncate(got.bytes);
    if got.bytes > 0 && !buf.ends_with(b"\n") {
        let mut rest = BufReader::new(conn);
        rest.read_until(b'\n', &mut buf)?;
    }
    let line = String::from_utf8(buf).map_err(std::io::Error::other)?;
    Ok((line, fds))
}

/// Identifies the running qubes-ctl binary: a rebuilt or upgraded binary is a new file
/// (inode, size, mtime), so a daemon started from an older one can be told apart.
pub fn build_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        use std::os::unix::fs::MetadataExt;
        let md = std::env::current_exe().and_then(std::fs::metadata);
        match md {
            Ok(m) => format!(
                "{}-{}-{}-{}.{}",
                env!("CARGO_PKG_VERSION"),
                m.ino(),
                m.size(),
                m.mtime(),
                m.mtime_nsec()
            ),
            Err(_) => env!("CARGO_PKG_VERSION").to_string(),
        }
    })
}
