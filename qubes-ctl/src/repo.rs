//! `qubes-ctl template repo ...` and the repository-backed template commands
//! (`install`, `upgrade`, `downgrade`, `reinstall`, `list/info --available`).
//!
//! Publisher commands (keygen, init, add, rotate) touch only the repository directory and
//! run in the CLI process; client commands are [`RepoAction`] requests carried out by the
//! controller (`controller/repo.rs`), which owns the trust store and the pool.

use std::path::PathBuf;

use crate::results::{RepoAdded, RepoKey, RepoRotated, RepoSigned};
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde::{Deserialize, Serialize};
use serde_json::{to_value, Value};
use template_builder::repo as trepo;

/// `template repo ...`
#[derive(Subcommand, Debug)]
pub enum RepoCmd {
    /// Publisher: write a new ed25519 signing key KEYFILE (0600) and KEYFILE.pub.
    Keygen { key: PathBuf },
    /// Publisher: create an empty signed repository in DIR.
    Init {
        dir: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// Days until clients refuse the index unless it is re-signed.
        #[arg(long, default_value_t = trepo::DEFAULT_EXPIRES_DAYS)]
        expires_days: u64,
    },
    /// Publisher: add a package (verified first) and re-sign the index with a higher version.
    Add {
        dir: PathBuf,
        package: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// Release version (default: the digits of the package's build date).
        #[arg(long)]
        version: Option<String>,
        #[arg(long, default_value_t = trepo::DEFAULT_EXPIRES_DAYS)]
        expires_days: u64,
    },
    /// Publisher: re-sign the index (new version and expiry) without other change.
    Resign {
        dir: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long, default_value_t = trepo::DEFAULT_EXPIRES_DAYS)]
        expires_days: u64,
    },
    /// Publisher: move to a new key; a key list signed by the old key tells clients.
    Rotate {
        dir: PathBuf,
        #[arg(long)]
        old_key: PathBuf,
        #[arg(long)]
        new_key: PathBuf,
        #[arg(long, default_value_t = trepo::DEFAULT_EXPIRES_DAYS)]
        expires_days: u64,
    },
    /// Client: pin a publisher's public key (KEYFILE.pub).
    Trust { pubkey: PathBuf },
    /// Client: add a repository (http(s):// URL or local directory).
    AddSource { url: String },
    /// Client: the pinned keys and the repositories.
    Show,
}

/// A client-side repository request (runs in the controller, daemon or not).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum RepoAction {
    Trust {
        pubkey: String,
    },
    AddSource {
        url: String,
    },
    Show,
    ListAvailable {
        repos: Vec<String>,
    },
    InfoAvailable {
        name: String,
        repos: Vec<String>,
    },
    /// Install, upgrade, downgrade or reinstall.
    Install {
        mode: InstallMode,
        /// NAME or NAME-VERSION; `None` for "upgrade every template from a repository".
        spec: Option<String>,
        repos: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstallMode {
    Install,
    Upgrade,
    Downgrade,
    Reinstall,
}

fn default_version(package: &std::path::Path) -> Result<String> {
    let pkg = template_builder::read_package(package)?;
    let v: String = pkg
        .manifest()
        .build_date
        .chars()
        .filter(|c| c.is_ascii_digit())
        .collect();
    if v.is_empty() {
        bail!(
            "{} has no build date to derive a version from; give --version",
            package.display()
        );
    }
    Ok(v)
}

/// Runs a publisher command, or turns a client one into its request.
pub fn repo_cmd(cmd: RepoCmd) -> Result<std::result::Result<Value, RepoAction>> {
    let abs = |p: &PathBuf| std::path::absolute(p).with_context(|| format!("{}", p.display()));
    Ok(Ok(match cmd {
        RepoCmd::Keygen { key } => {
            let vk = trepo::keygen(&key)?;
            to_value(RepoKey {
                public_key: trepo::pub_path(&key),
                secret_key: key,
                key: trepo::key_id(&vk),
            })?
        }
        RepoCmd::Init {
            dir,
            key,
            expires_days,
        } => {
            let idx = trepo::repo_init(&dir, &key, expires_days)?;
            to_value(RepoSigned {
                repository: dir,
                index_version: idx.version,
                expires: idx.expires,
            })?
        }
        RepoCmd::Add {
            dir,
            package,
            key,
            version,
            expires_days,
        } => {
            let version = match version {
                Some(v) => v,
                None => default_version(&package)?,
            };
            let (idx, entry) = trepo::repo_add(&dir, &key, &package, &version, expires_days)
                .with_context(|| format!("adding {} to {}", package.display(), dir.display()))?;
            to_value(RepoAdded {
                repository: dir,
                index_version: idx.version,
                added: entry,
            })?
        }
        RepoCmd::Resign {
            dir,
            key,
            expires_days,
        } => {
            let idx = trepo::repo_resign(&dir, &key, expires_days, |_| Ok(()))?;
            to_value(RepoSigned {
                repository: dir,
                index_version: idx.version,
                expires: idx.expires,
            })?
        }
        RepoCmd::Rotate {
            dir,
            old_key,
            new_key,
            expires_days,
        } => {
            let kl = trepo::repo_rotate(&dir, &old_key, &new_key, expires_days)?;
            to_value(RepoRotated {
                repository: dir,
                key_list: kl,
            })?
        }
        RepoCmd::Trust { pubkey } => {
            return Ok(Err(RepoAction::Trust {
                pubkey: abs(&pubkey)?.display().to_string(),
            }))
        }
        RepoCmd::AddSource { url } => {
            let url = if url.contains("://") {
                url
            } else {
                abs(&PathBuf::from(&url))?.display().to_string()
            };
            return Ok(Err(RepoAction::AddSource { url }));
        }
        RepoCmd::Show => return Ok(Err(RepoAction::Show)),
    }))
}

/// `--repo` values as the controller needs them (local paths made absolute).
pub fn repo_args(repos: Vec<String>) -> Result<Vec<String>> {
    repos
        .into_iter()
        .map(|r| {
            if r.contains("://") {
                Ok(r)
            } else {
                Ok(std::path::absolute(&r)
                    .with_context(|| r.clone())?
                    .display()
                    .to_string())
            }
        })
        .collect()
}
