//! The request dispatch: which qubes a request locks, and which method carries it out.

use std::fs;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::Controller;
use crate::api::Request;

/// The qubes a request acts on, whose locks it holds while it runs. Requests that make
/// a template take its lock themselves (the name may be known only once it is built),
/// and a start takes its netvm's when it starts it.
fn locked_qubes(req: &Request) -> Vec<&str> {
    match req {
        Request::TemplateRemove { name }
        | Request::TemplateExport { name, .. }
        | Request::QubeCreate { name, .. }
        | Request::QubeRemove { name }
        | Request::QubePrefs { name, .. }
        | Request::QubeStart { name, .. }
        | Request::QubeShutdown { name, .. }
        | Request::QubePause { name }
        | Request::QubeUnpause { name } => vec![name],
        Request::QubeClone { src, dst } => vec![src, dst],
        Request::VolumeRevert { qube, .. }
        | Request::VolumeResize { qube, .. }
        | Request::VolumeImport { qube, .. }
        | Request::VolumeExport { qube, .. }
        | Request::VolumeConfig { qube, .. }
        | Request::VolumeDiscard { qube, .. } => vec![qube],
        Request::Ping
        | Request::PoolInfo
        | Request::PoolVerify
        | Request::TemplateCreate { .. }
        | Request::TemplateBuild { .. }
        | Request::TemplateList
        | Request::TemplateInfo { .. }
        | Request::TemplateImport { .. }
        | Request::TemplateRepo { .. }
        | Request::QubeList
        | Request::QubeConsole { .. }
        | Request::VolumeList { .. }
        | Request::VolumeInfo { .. }
        | Request::DaemonStop => Vec::new(),
    }
}

impl Controller {
    pub fn handle(&self, req: Request) -> Result<Value> {
        self.handle_with(req, Vec::new())
    }

    /// Carries out `req` with the files the client opened for it (see [`crate::api`]),
    /// holding the locks of the qubes it names.
    pub fn handle_with(&self, req: Request, files: Vec<fs::File>) -> Result<Value> {
        let names: Vec<String> = locked_qubes(&req).into_iter().map(String::from).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let _locked = self.lock_qubes(&names);
        self.dispatch(req, files)
    }

    pub(super) fn dispatch(&self, req: Request, files: Vec<fs::File>) -> Result<Value> {
        let mut files = files.into_iter();
        let mut file = |what: &Path| {
            files.next().ok_or_else(|| {
                anyhow!(
                    "no open file came with the request for {}; the client must open it",
                    what.display()
                )
            })
        };
        match req {
            Request::Ping => {
                let mut v = json!({
                    "pong": true,
                    "protocol": crate::api::PROTOCOL,
                    "pid": std::process::id(),
                    "build": crate::api::build_id(),
                    "served": self.served().len(),
                });
                if self.in_daemon {
                    v["stats"] = self.serving_stats();
                }
                Ok(v)
            }
            Request::PoolInfo => self.pool_info(),
            Request::PoolVerify => {
                let report = self.pool().verify()?;
                Ok(json!({"clean": report.is_clean(), "report": report}))
            }
            Request::TemplateCreate {
                name,
                image,
                replace,
            } => {
                let f = file(&image)?;
                self.template_create(&name, &image, f, replace)
            }
            Request::TemplateBuild {
                recipe,
                resolved,
                name,
                mirror,
            } => {
                let local_keys = resolved.gpg_keys.iter().filter(|k| !k.contains("://"));
                let inputs = (0..resolved.files.len() + local_keys.count())
                    .map(|_| file(&recipe))
                    .collect::<Result<Vec<_>>>()?;
                self.template_build(&recipe, *resolved, inputs, name, mirror)
            }
            Request::TemplateList => self.template_list(),
            Request::TemplateInfo { name } => self.template_info(&name),
            Request::TemplateRemove { name } => self.template_remove(&name),
            Request::TemplateExport { name, file: path } => {
                let f = file(&path)?;
                self.template_export(&name, &path, f)
            }
            Request::TemplateImport {
                file: path,
                name,
                replace,
            } => {
                let f = file(&path)?;
                self.template_import(&path, f, name, replace)
            }
            Request::TemplateRepo { action } => self.template_repo(action),
            Request::QubeCreate {
                name,
                class,
                template,
                label,
            } => self.qube_create(&name, &class, template.as_deref(), label.as_deref()),
            Request::QubeList => self.qube_list(),
            Request::QubeRemove { name } => self.qube_remove(&name),
            Request::QubeClone { src, dst } => self.qube_clone(&src, &dst),
            Request::QubePrefs { name, key, value } => self.qube_prefs(&name, key, value),
            Request::QubeStart { name, hypervisor } => self.qube_start(&name, hypervisor),
            Request::QubeShutdown {
                name,
                timeout_secs,
                kill,
            } => self.qube_shutdown(&name, timeout_secs, kill),
            Request::QubeConsole { name } => self.qube_console(&name),
            Request::QubePause { name } => self.qube_pause(&name, true),
            Request::QubeUnpause { name } => self.qube_pause(&name, false),
            Request::VolumeList { qube } => self.volume_list(qube.as_deref()),
            Request::VolumeInfo { qube, vol } => self.volume_info(&qube, &vol),
            Request::VolumeRevert {
                qube,
                vol,
                revision,
            } => {
                self.refuse_if_served(&qube, "revert a volume of")?;
                {
                    let _txn = self.txn();
                    self.vols.revert(&qube, &vol, revision.as_deref())?;
                }
                self.volume_info(&qube, &vol)
            }
            Request::VolumeResize {
                qube,
                vol,
                size,
                allow_shrink,
            } => {
                // A running qube's client would get EINVAL past the new end, and what it
                // flushed there would be lost.
                if size < self.vols.volume_status(&qube, &vol)?.size {
                    self.refuse_if_served(&qube, "shrink a volume of")?;
                }
                {
                    let _txn = self.txn();
                    self.vols.resize(&qube, &vol, size, allow_shrink)?;
                }
                self.volume_info(&qube, &vol)
            }
            Request::VolumeImport {
                qube,
                vol,
                file: path,
                size,
            } => {
                let f = file(&path)?;
                self.volume_import(&qube, &vol, &path, f, size)
            }
            Request::VolumeExport {
                qube,
                vol,
                file: path,
            } => {
                let mut out = file(&path)?;
                let n = self.vols.export(&qube, &vol, &mut out)?;
                // Only a regular file has anything to sync (/dev/null, a FIFO: EINVAL).
                if out.metadata().is_ok_and(|m| m.is_file()) {
                    out.sync_all()
                        .with_context(|| format!("syncing {}", path.display()))?;
                }
                Ok(json!({"volume": format!("{qube}:{vol}"), "file": path, "bytes": n}))
            }
            Request::VolumeConfig {
                qube,
                vol,
                key,
                value,
            } => {
                match key.as_str() {
                    "revisions_to_keep" => {
                        let n: u32 = value
                            .parse()
                            .map_err(|_| anyhow!("revisions_to_keep must be a whole number (0 keeps none), not {value:?}"))?;
                        let _txn = self.txn();
                        self.vols.set_revisions_to_keep(&qube, &vol, n)?;
                    }
                    other => bail!(
                        "volume property {other:?} cannot be set; settable: revisions_to_keep"
                    ),
                }
                self.volume_info(&qube, &vol)
            }
            Request::VolumeDiscard { qube, vol } => {
                // The running snapshot is what the qube's client sees; dropping it under
                // a running qube leaves that qube unservable.
                self.refuse_if_served(&qube, "discard the writes of")?;
                {
                    let _txn = self.txn();
                    self.vols.discard(&qube, &vol)?;
                }
                self.volume_info(&qube, &vol)
            }
            Request::DaemonStop => Ok(json!({"stopping": true})),
        }
    }
}
