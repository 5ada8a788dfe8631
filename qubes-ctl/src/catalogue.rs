//! The qube catalogue: per-qube properties (label, memory, kernel, ...) and per-template
//! build records. Both live in the pool's key/value store, so they are committed in the
//! same transaction as the volumes they describe (a crash never leaves a qube with
//! volumes but no properties, or the other way round).

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use storage::{Pool, PoolError};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CatalogueError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(
        "stored record {key} is unreadable ({source}); it was written by an incompatible version"
    )]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    BadValue(String),
    #[error("unknown property {0:?}; known: label, netvm, memory, maxmem, vcpus, virt_mode, kernel, kernelopts, template_for_dispvms, hypervisor, provides_network, ip")]
    UnknownProperty(String),
}

/// The colours of Qubes' window borders: the user's trust levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Label {
    Red,
    Orange,
    Yellow,
    Green,
    Gray,
    Blue,
    Purple,
    Black,
}

impl FromStr for Label {
    type Err = CatalogueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "red" => Label::Red,
            "orange" => Label::Orange,
            "yellow" => Label::Yellow,
            "green" => Label::Green,
            "gray" | "grey" => Label::Gray,
            "blue" => Label::Blue,
            "purple" => Label::Purple,
            "black" => Label::Black,
            _ => {
                return Err(CatalogueError::BadValue(format!(
                "label {s:?} is not one of red, orange, yellow, green, gray, blue, purple, black"
            )))
            }
        })
    }
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string));
        f.write_str(s.as_deref().unwrap_or("?"))
    }
}

/// Properties a user sets with `qube prefs`. Defaults follow Qubes where they make sense
/// on QEMU too (memory is larger than Qubes' 400 MiB because TCG guests without memory
/// balancing need it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct QubePrefs {
    pub label: Label,
    pub netvm: Option<String>,
    /// MiB.
    pub memory: u64,
    /// MiB.
    pub maxmem: u64,
    pub vcpus: u32,
    /// pv | pvh | hvm
    pub virt_mode: String,
    /// "template" (the template's kernel and initrd), "none" (the image boots itself, HVM)
    pub kernel: String,
    /// Appended to the kernel command line.
    pub kernelopts: String,
    /// An AppVM that DispVMs may be based on.
    pub template_for_dispvms: bool,
    /// Preferred hypervisor (xen | qemu | none); empty: the host default.
    pub hypervisor: String,
    /// Other qubes may use this one as their netvm.
    pub provides_network: bool,
    /// Address on the qubes network (10.137.0.N), assigned at the first start that
    /// needs one; read-only for users.
    pub ip: Option<String>,
}

impl Default for QubePrefs {
    fn default() -> Self {
        QubePrefs {
            label: Label::Red,
            netvm: None,
            memory: 512,
            maxmem: 4000,
            vcpus: 2,
            virt_mode: "pvh".into(),
            kernel: "template".into(),
            kernelopts: String::new(),
            template_for_dispvms: false,
            hypervisor: String::new(),
            provides_network: false,
            ip: None,
        }
    }
}

impl QubePrefs {
    pub const KEYS: [&'static str; 12] = [
        "label",
        "netvm",
        "memory",
        "maxmem",
        "vcpus",
        "virt_mode",
        "kernel",
        "kernelopts",
        "template_for_dispvms",
        "hypervisor",
        "provides_network",
        "ip",
    ];

    pub fn get(&self, key: &str) -> Result<String, CatalogueError> {
        Ok(match key {
            "label" => self.label.to_string(),
            "netvm" => self.netvm.clone().unwrap_or_default(),
            "memory" => self.memory.to_string(),
            "maxmem" => self.maxmem.to_string(),
            "vcpus" => self.vcpus.to_string(),
            "virt_mode" => self.virt_mode.clone(),
            "kernel" => self.kernel.clone(),
            "kernelopts" => self.kernelopts.clone(),
            "template_for_dispvms" => self.template_for_dispvms.to_string(),
            "hypervisor" => self.hypervisor.clone(),
            "provides_network" => self.provides_network.to_string(),
            "ip" => self.ip.clone().unwrap_or_default(),
            other => return Err(CatalogueError::UnknownProperty(other.to_string())),
        })
    }

    pub fn set(&mut self, key: &str, value: &str) -> Result<(), CatalogueError> {
        let bad = |what: &str| CatalogueError::BadValue(format!("{key} = {value:?}: {what}"));
        let num = |max: u64| -> Result<u64, CatalogueError> {
            let n: u64 = value.parse().map_err(|_| bad("expected a whole number"))?;
            if n == 0 || n > max {
                return Err(bad(&format!("must be between 1 and {max}")));
            }
            Ok(n)
        };
        match key {
            "label" => self.label = value.parse()?,
            "netvm" => {
                if value.is_empty() || value == "none" {
                    self.netvm = None
                } else {
                    storage::validate_name("netvm", value)
                        .map_err(|e| CatalogueError::BadValue(e.to_string()))?;
                    self.netvm = Some(value.to_string())
                }
            }
            "memory" => self.memory = num(1 << 20)?,
            "maxmem" => self.maxmem = num(1 << 20)?,
            "vcpus" => self.vcpus = num(512)? as u32,
            "virt_mode" => {
                if !matches!(value, "pv" | "pvh" | "hvm") {
                    return Err(bad("expected pv, pvh or hvm"));
                }
                self.virt_mode = value.into()
            }
            "kernel" => {
                if !matches!(value, "template" | "none") {
                    return Err(bad("expected `template` (boot the template's kernel) or `none` (the image boots itself)"));
                }
                self.kernel = value.into()
            }
            "kernelopts" => {
                if value.chars().any(|c| c.is_control()) {
                    return Err(bad("control characters are not allowed"));
                }
                self.kernelopts = value.into()
            }
            "template_for_dispvms" => {
                self.template_for_dispvms = match value {
                    "true" | "1" | "yes" => true,
                    "false" | "0" | "no" => false,
                    _ => return Err(bad("expected true or false")),
                }
            }
            "provides_network" => {
                self.provides_network = match value {
                    "true" | "1" | "yes" => true,
                    "false" | "0" | "no" => false,
                    _ => return Err(bad("expected true or false")),
                }
            }
            "ip" => return Err(bad("assigned automatically at start; read-only")),
            "hypervisor" => {
                if !matches!(value, "" | "xen" | "qemu" | "none") {
                    return Err(bad("expected xen, qemu or none"));
                }
                self.hypervisor = value.into()
            }
            other => return Err(CatalogueError::UnknownProperty(other.to_string())),
        }
        Ok(())
    }
}

/// What the controller knows about how a template came to be.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TemplateRecord {
    /// recipe | image | package
    pub origin: String,
    pub recipe: Option<String>,
    pub recipe_hash: Option<String>,
    pub packages: Vec<String>,
    pub build_date: Option<String>,
    /// blake3 over the root image as built/imported.
    pub fingerprint: String,
    pub has_kernel: bool,
    pub kernel_cmdline: String,
}

/// What the daemon records about a running qube, so a restarted daemon can pick it up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RuntimeRecord {
    pub hypervisor: String,
    pub started_at: u64,
    /// The uid (and gid) the qube's QEMU runs as, which owns its NBD socket: kept here
    /// so a restarted daemon gives the socket it serves again to the same QEMU.
    pub qemu_uid: Option<u32>,
}

const PREFS: &str = "qube-prefs/";
const TEMPLATE: &str = "template/";
const RUNTIME: &str = "runtime/";

fn get<T: for<'de> Deserialize<'de>>(
    pool: &dyn Pool,
    key: &str,
) -> Result<Option<T>, CatalogueError> {
    match pool.get_meta(key)? {
        None => Ok(None),
        Some(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|source| CatalogueError::Decode {
                key: key.to_string(),
                source,
            }),
    }
}

fn put<T: Serialize>(pool: &dyn Pool, key: &str, value: Option<&T>) -> Result<(), CatalogueError> {
    let s = value.map(|v| serde_json::to_string(v).expect("catalogue records serialize"));
    pool.set_meta(key, s.as_deref())?;
    Ok(())
}

/// Typed access to the records above. Writes are staged in the pool; the next pool commit
/// (the volume operation that follows) makes them durable together with it.
pub struct Catalogue<'p> {
    pool: &'p dyn Pool,
}

/// A record as a pool metadata entry, for the volume model to write in the commit that
/// creates its qube (see `storage::qubes::Volumes::create_qube_with`).
pub fn prefs_entry(qube: &str, prefs: &QubePrefs) -> (String, String) {
    entry(&format!("{PREFS}{qube}"), prefs)
}

/// The pool metadata keys of a qube's catalogue records (preferences, template record),
/// for the volume model to remove with the qube.
pub fn record_keys(qube: &str) -> [String; 2] {
    [format!("{PREFS}{qube}"), format!("{TEMPLATE}{qube}")]
}

pub fn template_entry(name: &str, rec: &TemplateRecord) -> (String, String) {
    entry(&format!("{TEMPLATE}{name}"), rec)
}

fn entry<T: Serialize>(key: &str, value: &T) -> (String, String) {
    let s = serde_json::to_string(value).expect("catalogue records serialize");
    (key.to_string(), s)
}

impl<'p> Catalogue<'p> {
    pub fn new(pool: &'p dyn Pool) -> Self {
        Catalogue { pool }
    }
    pub fn prefs(&self, qube: &str) -> Result<QubePrefs, CatalogueError> {
        Ok(get(self.pool, &format!("{PREFS}{qube}"))?.unwrap_or_default())
    }
    pub fn set_prefs(&self, qube: &str, prefs: Option<&QubePrefs>) -> Result<(), CatalogueError> {
        put(self.pool, &format!("{PREFS}{qube}"), prefs)
    }
    pub fn template(&self, name: &str) -> Result<Option<TemplateRecord>, CatalogueError> {
        get(self.pool, &format!("{TEMPLATE}{name}"))
    }
    pub fn set_template(
        &self,
        name: &str,
        rec: Option<&TemplateRecord>,
    ) -> Result<(), CatalogueError> {
        put(self.pool, &format!("{TEMPLATE}{name}"), rec)
    }
    pub fn runtime(&self, qube: &str) -> Result<Option<RuntimeRecord>, CatalogueError> {
        get(self.pool, &format!("{RUNTIME}{qube}"))
    }
    pub fn set_runtime(
        &self,
        qube: &str,
        rec: Option<&RuntimeRecord>,
    ) -> Result<(), CatalogueError> {
        put(self.pool, &format!("{RUNTIME}{qube}"), rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefs_get_set_validate() {
        let mut p = QubePrefs::default();
        p.set("label", "blue").unwrap();
        assert_eq!(p.get("label").unwrap(), "blue");
        p.set("memory", "1024").unwrap();
        assert_eq!(p.memory, 1024);
        assert!(p.set("memory", "0").is_err());
        assert!(p.set("memory", "lots").is_err());
        assert!(p.set("label", "pink").is_err());
        assert!(p.set("virt_mode", "kvm").is_err());
        assert!(p.set("netvm", "../x").is_err());
        p.set("netvm", "sys-net").unwrap();
        assert_eq!(p.netvm.as_deref(), Some("sys-net"));
        p.set("netvm", "none").unwrap();
        assert_eq!(p.netvm, None);
        assert!(matches!(
            p.set("colour", "x"),
            Err(CatalogueError::UnknownProperty(_))
        ));
        for k in QubePrefs::KEYS {
            p.get(k).unwrap();
        }
    }
}
