//! The admin API: every CLI command is a [`Request`]; the answer is JSON. The CLI sends
//! it to the daemon over `ROOT/run/admin.sock` (one JSON line each way) when a daemon owns
//! the pool, and runs it in-process otherwise: one code path either way.
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

/// One reply line: either `{"ok": VALUE}` or `{"error": "message"}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok(serde_json::Value),
    Error(String),
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
    let mut line = serde_json::to_string(req).map_err(std::io::Error::other)?;
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
pub fn ping(socket: &Path, timeout: Duration) -> Option<serde_json::Value> {
    match call_with_fds(socket, &Request::Ping, &[], Some(timeout)) {
        Ok(Reply::Ok(v)) => Some(v),
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
