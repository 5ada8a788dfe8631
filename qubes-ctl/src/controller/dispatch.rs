//! The request dispatch: which qubes a request locks, and which method carries it out.

use std::fs;
use std::path::Path;

use anyhow::{anyhow, Result};
use serde_json::Value;

use super::Controller;
use crate::api::Request;
use crate::results::{PoolVerified, Stopping};

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
            Request::Ping => wire(self.ping()),
            Request::PoolInfo => self.pool_info().and_then(wire),
            Request::PoolVerify => {
                let report = self.pool().verify()?;
                wire(PoolVerified {
                    clean: report.is_clean(),
                    report,
                })
            }
            Request::TemplateCreate {
                name,
                image,
                replace,
            } => {
                let f = file(&image)?;
                self.template_create(&name, &image, f, replace)
                    .and_then(wire)
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
                    .and_then(wire)
            }
            Request::TemplateList => self.template_list().and_then(wire),
            Request::TemplateInfo { name } => self.template_info(&name).and_then(wire),
            Request::TemplateRemove { name } => self.template_remove(&name).and_then(wire),
            Request::TemplateExport { name, file: path } => {
                let f = file(&path)?;
                self.template_export(&name, &path, f).and_then(wire)
            }
            Request::TemplateImport {
                file: path,
                name,
                replace,
            } => {
                let f = file(&path)?;
                self.template_import(&path, f, name, replace).and_then(wire)
            }
            Request::TemplateRepo { action } => self.template_repo(action).and_then(wire),
            Request::QubeCreate {
                name,
                class,
                template,
                label,
            } => self
                .qube_create(&name, &class, template.as_deref(), label.as_deref())
                .and_then(wire),
            Request::QubeList => self.qube_list().and_then(wire),
            Request::QubeRemove { name } => self.qube_remove(&name).and_then(wire),
            Request::QubeClone { src, dst } => self.qube_clone(&src, &dst).and_then(wire),
            Request::QubePrefs { name, key, value } => {
                self.qube_prefs(&name, key, value).and_then(wire)
            }
            Request::QubeStart { name, hypervisor } => {
                self.qube_start(&name, hypervisor).and_then(wire)
            }
            Request::QubeShutdown {
                name,
                timeout_secs,
                kill,
            } => self.qube_shutdown(&name, timeout_secs, kill).and_then(wire),
            Request::QubeConsole { name } => self.qube_console(&name).and_then(wire),
            Request::QubePause { name } => self.qube_pause(&name, true).and_then(wire),
            Request::QubeUnpause { name } => self.qube_pause(&name, false).and_then(wire),
            Request::VolumeList { qube } => self.volume_list(qube.as_deref()).and_then(wire),
            Request::VolumeInfo { qube, vol } => self.volume_info(&qube, &vol).and_then(wire),
            Request::VolumeRevert {
                qube,
                vol,
                revision,
            } => self
                .volume_revert(&qube, &vol, revision.as_deref())
                .and_then(wire),
            Request::VolumeResize {
                qube,
                vol,
                size,
                allow_shrink,
            } => self
                .volume_resize(&qube, &vol, size, allow_shrink)
                .and_then(wire),
            Request::VolumeImport {
                qube,
                vol,
                file: path,
                size,
            } => {
                let f = file(&path)?;
                self.volume_import(&qube, &vol, &path, f, size)
                    .and_then(wire)
            }
            Request::VolumeExport {
                qube,
                vol,
                file: path,
            } => {
                let out = file(&path)?;
                self.volume_export(&qube, &vol, &path, out).and_then(wire)
            }
            Request::VolumeConfig {
                qube,
                vol,
                key,
                value,
            } => self.volume_config(&qube, &vol, &key, &value).and_then(wire),
            Request::VolumeDiscard { qube, vol } => self.volume_discard(&qube, &vol).and_then(wire),
            // In process: nothing was served, nothing is left running.
            Request::DaemonStop => wire(Stopping {
                stopping: true,
                detached: None,
            }),
        }
    }
}

/// A typed result as the wire carries it (see [`crate::results`]).
fn wire<T: serde::Serialize>(result: T) -> Result<Value> {
    Ok(serde_json::to_value(result)?)
}
