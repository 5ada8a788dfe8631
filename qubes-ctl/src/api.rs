//! The admin API: every CLI command is a [`Request`]; the answer is JSON. The CLI sends
//! it to the daemon over `ROOT/run/admin.sock` (one JSON line each way) when a daemon owns
//! the pool, and runs it in-process otherwise: one code path either way.

use std::io::{BufRead, BufReader, Write};
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
    TemplateCreate {
        name: String,
        image: PathBuf,
    },
    TemplateBuild {
        recipe: PathBuf,
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
    TemplateExport {
        name: String,
        file: PathBuf,
    },
    TemplateImport {
        file: PathBuf,
        name: Option<String>,
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
    VolumeImport {
        qube: String,
        vol: String,
        file: PathBuf,
    },
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

/// Sends one request to the daemon and waits for its reply.
pub fn call(socket: &Path, req: &Request) -> std::io::Result<Reply> {
    let stream = UnixStream::connect(socket)?;
    let mut writer = stream.try_clone()?;
    let mut line = serde_json::to_string(req).map_err(std::io::Error::other)?;
    line.push('\n');
    writer.write_all(line.as_bytes())?;
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
    let stream = UnixStream::connect(socket).ok()?;
    let _ = stream.set_read_timeout(Some(timeout));
    drop(stream);
    match call(socket, &Request::Ping) {
        Ok(Reply::Ok(v)) => Some(v),
        _ => None,
    }
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
