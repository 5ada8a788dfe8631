//! Typed results of the admin API: what the controller returns for a request, and what
//! the CLI renders as text or prints as JSON (`--format json`). On the wire each is the
//! JSON object of its fields, the `ok` value of a [`crate::api::Reply`]; the objects are
//! the ones protocol 2 always sent, so scripts reading them are unaffected.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use storage::qubes::VolumeStatus;
use storage::{ImportStats, PoolInfo, VerifyReport};

use crate::catalogue::QubePrefs;

/// A qube's state, as Qubes names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QubeState {
    Halted,
    Running,
    Paused,
    /// A start or a shutdown is under way (Qubes' Transient).
    Transient,
    /// Marked running, but the daemon could not serve it (its log says why).
    Broken,
}

impl std::fmt::Display for QubeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QubeState::Halted => "halted",
            QubeState::Running => "running",
            QubeState::Paused => "paused",
            QubeState::Transient => "transient",
            QubeState::Broken => "broken",
        })
    }
}

/// `qube start`: the qube runs, its volumes served at these NBD URIs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QubeStarted {
    pub name: String,
    pub state: QubeState,
    pub hypervisor: String,
    /// The guest's console log (for `hypervisor none`, where it would be).
    pub console: PathBuf,
    pub volumes: Vec<ServedVolume>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedVolume {
    pub volume: String,
    /// The pool volume served (the running snapshot of a volume saved at stop).
    pub key: String,
    pub read_only: bool,
    pub size: u64,
    pub nbd_uri: String,
}

/// `qube shutdown`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QubeHalted {
    pub name: String,
    pub state: QubeState,
}

/// One qube, as `qube list`, `qube create` and the others that show a qube give it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QubeInfo {
    pub name: String,
    pub class: String,
    pub template: Option<String>,
    pub state: QubeState,
    pub label: String,
    /// What it runs (or last ran) on; `None` if it never started.
    pub hypervisor: Option<String>,
    pub prefs: QubePrefs,
}

/// One volume (`volume info`, `volume list`, and what changes one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeInfo {
    #[serde(flatten)]
    pub status: VolumeStatus,
    /// Where the running qube's client reaches it; `None` when not served.
    pub nbd_uri: Option<String>,
    /// `volume import`: what the import wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import: Option<ImportStats>,
}

/// `pool info`: the driver's figures, with percentages and the host filesystem's free
/// space (`info.host_free`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolReport {
    #[serde(flatten)]
    pub info: PoolInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_used_percent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_used_percent: Option<f64>,
    /// The host filesystem is nearly full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// `pool verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolVerified {
    pub clean: bool,
    pub report: VerifyReport,
}

/// The ping reply. Every field is optional on reading: daemons of earlier builds sent
/// fewer (before the versioned protocol, no `protocol`: version 1).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Pong {
    pub pong: bool,
    pub protocol: Option<u32>,
    pub pid: Option<u32>,
    pub build: Option<String>,
    /// Qubes this process serves.
    pub served: Option<u64>,
    /// From the daemon only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<ServingStats>,
}

/// What the daemon serves (`daemon status`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServingStats {
    pub uptime_secs: Option<u64>,
    pub nbd_connections: u64,
    pub nbd_requests_served: u64,
    pub admin_requests_served: u64,
    /// `None` if the pool cannot say.
    pub pool_usage: Option<PoolUsage>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolUsage {
    pub capacity: u64,
    pub data_used: u64,
    pub metadata_used: u64,
    pub volumes: u64,
    pub used_percent: f64,
}

/// `daemon status`, made by the CLI from the ping reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// `running` or `not running`.
    pub daemon: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qubes_served: Option<u64>,
    /// The daemon runs this very qubes-ctl build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub same_build: Option<bool>,
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<ServingStats>,
}

impl DaemonStatus {
    pub fn not_running() -> Self {
        DaemonStatus {
            daemon: "not running".into(),
            pid: None,
            qubes_served: None,
            same_build: None,
            stats: None,
        }
    }

    pub fn of(p: Pong) -> Self {
        DaemonStatus {
            daemon: "running".into(),
            same_build: Some(p.build.as_deref() == Some(crate::api::build_id())),
            pid: p.pid,
            qubes_served: p.served,
            stats: p.stats,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed replies read what earlier builds sent, and write it back unchanged.
    #[test]
    fn replies_keep_their_wire_shape() {
        let started = serde_json::json!({
            "name": "work", "state": "running", "hypervisor": "none",
            "console": "/run/q/console.log",
            "volumes": [{"volume": "root", "key": "work/root", "read_only": true,
                         "size": 4096, "nbd_uri": "nbd+unix:///work/root?socket=/s"}],
        });
        let typed: QubeStarted = serde_json::from_value(started.clone()).unwrap();
        assert_eq!(typed.state, QubeState::Running);
        assert_eq!(serde_json::to_value(&typed).unwrap(), started);

        // A daemon before the versioned protocol: no `protocol`, no `stats`.
        let old: Pong =
            serde_json::from_value(serde_json::json!({"pong": true, "pid": 7})).unwrap();
        assert_eq!((old.protocol, old.pid, old.stats), (None, Some(7), None));

        let down = serde_json::to_value(DaemonStatus::not_running()).unwrap();
        assert_eq!(down, serde_json::json!({"daemon": "not running"}));
        let up = DaemonStatus::of(Pong {
            pong: true,
            protocol: Some(crate::api::PROTOCOL),
            pid: Some(9),
            build: Some("other".into()),
            served: Some(2),
            stats: Some(ServingStats {
                uptime_secs: Some(5),
                ..Default::default()
            }),
        });
        let v = serde_json::to_value(&up).unwrap();
        assert_eq!(v["same_build"], false);
        assert_eq!(v["qubes_served"], 2);
        assert_eq!(v["uptime_secs"], 5, "the stats sit beside the rest: {v}");
        assert_eq!(v["pool_usage"], serde_json::Value::Null);
    }
}
