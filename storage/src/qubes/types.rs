//! The persistent shapes of the volume model: what a qube's volumes are, as stored in the
//! pool's key/value store (`qube-volumes/<name>`, JSON) and as reported to the controller.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// 1 GiB.
pub const GIB: u64 = 1 << 30;
/// Qubes' default sizes.
pub const DEFAULT_ROOT_SIZE: u64 = 10 * GIB;
pub const DEFAULT_PRIVATE_SIZE: u64 = 2 * GIB;
pub const DEFAULT_VOLATILE_SIZE: u64 = 10 * GIB;
/// Pool default for `revisions_to_keep` of volumes saved at stop.
pub const DEFAULT_REVISIONS_TO_KEEP: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum QubeClass {
    TemplateVM,
    AppVM,
    DispVM,
    StandaloneVM,
}

impl QubeClass {
    pub const ALL: [QubeClass; 4] = [
        QubeClass::TemplateVM,
        QubeClass::AppVM,
        QubeClass::DispVM,
        QubeClass::StandaloneVM,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            QubeClass::TemplateVM => "TemplateVM",
            QubeClass::AppVM => "AppVM",
            QubeClass::DispVM => "DispVM",
            QubeClass::StandaloneVM => "StandaloneVM",
        }
    }
}

impl fmt::Display for QubeClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown qube class {0:?}; use one of TemplateVM, AppVM, DispVM, StandaloneVM")]
pub struct ParseClassError(pub String);

impl FromStr for QubeClass {
    type Err = ParseClassError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        QubeClass::ALL
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| ParseClassError(s.escape_debug().to_string()))
    }
}

/// One volume of a qube, with Qubes' properties.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeConfig {
    /// `root`, `private` or `volatile`.
    pub name: String,
    /// Bytes. For a `snap_on_start` volume, the size of its source when the config was
    /// written; the running snapshot always has its source's size.
    pub size: u64,
    pub rw: bool,
    /// At start, a writable snapshot of `source` as committed then.
    pub snap_on_start: bool,
    /// At stop, what the qube wrote becomes the new head (the old one a revision).
    pub save_on_stop: bool,
    /// `QUBE:VOLUME` of the volume snapshotted at start.
    pub source: Option<String>,
    /// Revisions kept after each commit (0 keeps none). Meaningful for `save_on_stop`.
    pub revisions_to_keep: u32,
    /// Qubes' flag for volumes whose contents must not outlive a run (kept for
    /// compatibility of configurations; every volume that is not `save_on_stop` is dropped
    /// at stop whatever this says).
    pub ephemeral: bool,
}

/// A qube's volumes, as stored in the pool meta `qube-volumes/<qube>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QubeVolumes {
    pub qube: String,
    pub class: QubeClass,
    /// AppVM: its TemplateVM. DispVM: its disposable template (an AppVM).
    /// StandaloneVM: the TemplateVM it was copied from (provenance only).
    pub template: Option<String>,
    pub volumes: Vec<VolumeConfig>,
}

impl QubeVolumes {
    pub fn volume(&self, name: &str) -> Option<&VolumeConfig> {
        self.volumes.iter().find(|v| v.name == name)
    }

    /// Whether this qube's volumes depend on `other` (a template or disposable template).
    pub fn depends_on(&self, other: &str) -> bool {
        let by_template = matches!(self.class, QubeClass::AppVM | QubeClass::DispVM)
            && self.template.as_deref() == Some(other);
        by_template
            || self.volumes.iter().any(|v| {
                v.source
                    .as_deref()
                    .and_then(|s| s.split_once(':'))
                    .is_some_and(|(q, _)| q == other)
            })
    }
}

/// A volume made ready by `start`: the pool key the transport must export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartedVolume {
    pub name: String,
    pub key: String,
    pub read_only: bool,
    pub size: u64,
}

/// An older state of a `save_on_stop` volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revision {
    /// Unix time with microseconds of when this state was superseded, e.g. `1764160000.123456`.
    pub id: String,
    pub key: String,
    /// `id` as unix seconds.
    pub timestamp: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub qube: String,
    pub name: String,
    pub config: VolumeConfig,
    /// The committed head, if the volume has one now (a `snap_on_start` or volatile volume
    /// has one only while the qube runs).
    pub head_key: Option<String>,
    /// Size of the volume the qube sees (the running snapshot if there is one).
    pub size: u64,
    /// Bytes mapped in that volume.
    pub usage: u64,
    /// A running snapshot exists: writes not yet committed as the head.
    pub dirty: bool,
    pub running: bool,
    /// Oldest first.
    pub revisions: Vec<Revision>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_parses_case_insensitively_and_displays() {
        for c in QubeClass::ALL {
            assert_eq!(
                c.to_string().to_lowercase().parse::<QubeClass>().unwrap(),
                c
            );
            assert_eq!(
                c.to_string().to_uppercase().parse::<QubeClass>().unwrap(),
                c
            );
        }
        assert!("vm".parse::<QubeClass>().is_err());
        assert_eq!(
            serde_json::to_string(&QubeClass::AppVM).unwrap(),
            "\"AppVM\""
        );
    }
}
