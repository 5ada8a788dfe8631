//! The qube catalogue: create, clone, remove, prefs, and what `qube list` / `qube show`
//! say of a qube (its state included).

use std::fs;

use anyhow::{anyhow, bail, Result};
use storage::qubes::QubeClass;

use super::{as_strs, class_name, copy_atomic, validate_qube_name, Controller};
use crate::catalogue::QubePrefs;
use crate::results::{PrefsReply, QubeConsole, QubeInfo, QubeState, Removed};

impl Controller {
    pub(super) fn qube_create(
        &self,
        name: &str,
        class: &str,
        template: Option<&str>,
        label: Option<&str>,
    ) -> Result<QubeInfo> {
        validate_qube_name("qube", name)?;
        let class: QubeClass = class.parse().map_err(|_| {
            anyhow!("class {class:?} is not one of AppVM, DispVM, StandaloneVM, TemplateVM")
        })?;
        let txn = self.txn();
        if self.vols.qube(name).is_ok() {
            bail!("qube {name} already exists; pick another name or remove it first");
        }
        let mut prefs = QubePrefs::default();
        if let Some(l) = label {
            prefs.set("label", l)?;
        }
        if let Some(t) = template {
            if let Ok(tp) = self.catalogue().prefs(t) {
                prefs.kernel = tp.kernel.clone();
                prefs.virt_mode = tp.virt_mode.clone();
            }
        }
        let records = Self::creation_records(name, "qube", &prefs, None);
        self.vols
            .create_qube_with(name, class, template, &as_strs(&records))?;
        if class == QubeClass::StandaloneVM {
            // A standalone qube keeps its own copy of the kernel it was created with.
            if let Some(t) = template {
                let src = self.paths.kernels_dir(t);
                if src.exists() {
                    let dst = self.paths.kernels_dir(name);
                    fs::create_dir_all(&dst)?;
                    for f in ["vmlinuz", "initrd.img"] {
                        if src.join(f).exists() {
                            copy_atomic(&src.join(f), &dst.join(f))?;
                        }
                    }
                }
                if let Some(mut rec) = self.catalogue().template(t)? {
                    rec.origin = format!("standalone copy of {t}");
                    self.catalogue().set_template(name, Some(&rec))?;
                }
            }
        }
        self.mark_created(name)?;
        drop(txn);
        self.qube_show(name)
    }

    pub(super) fn qube_state(&self, name: &str) -> Result<QubeState> {
        if !self.vols.is_running(name)? {
            return Ok(QubeState::Halted);
        }
        if self.in_daemon && !self.is_served(name) {
            // A start or a shutdown under way passes through this state for a moment
            // (Qubes calls it Transient).
            if self.qube_locks.is_held(name) {
                return Ok(QubeState::Transient);
            }
            // Marked running, but the daemon could not serve it (see its log).
            return Ok(QubeState::Broken);
        }
        // Volumes started; the hypervisor knows whether the guest is paused.
        let rt = self.catalogue().runtime(name)?.unwrap_or_default();
        if rt.hypervisor.is_empty() || rt.hypervisor == "none" {
            return Ok(QubeState::Running);
        }
        let hv = hypervisor::by_name(&rt.hypervisor)?;
        Ok(match hv.state(name, &self.paths.qube_run_dir(name)) {
            Ok(hypervisor::DomainState::Paused) => QubeState::Paused,
            _ => QubeState::Running,
        })
    }

    /// `qube pause` / `qube unpause`: the guest stops or resumes; storage is untouched.
    pub(super) fn qube_pause(&self, name: &str, pause: bool) -> Result<QubeInfo> {
        self.vols.qube(name)?;
        let rt = self.catalogue().runtime(name)?.unwrap_or_default();
        let hv_name = self.served_hypervisor(name).unwrap_or(rt.hypervisor);
        if !self.vols.is_running(name)? {
            bail!("{name} is not running; start it first");
        }
        if hv_name.is_empty() || hv_name == "none" {
            bail!("{name} runs no guest (hypervisor none): there is nothing to pause");
        }
        let hv = hypervisor::by_name(&hv_name)?;
        let run_dir = self.paths.qube_run_dir(name);
        if pause {
            hv.pause(name, &run_dir)?;
        } else {
            hv.unpause(name, &run_dir)?;
        }
        self.qube_show(name)
    }

    pub(super) fn qube_show(&self, name: &str) -> Result<QubeInfo> {
        let q = self.vols.qube(name)?;
        let prefs = self.catalogue().prefs(name)?;
        let rt = self.catalogue().runtime(name)?;
        Ok(QubeInfo {
            name: q.qube,
            class: class_name(&q.class),
            template: q.template,
            state: self.qube_state(name)?,
            label: prefs.label.to_string(),
            hypervisor: rt.map(|r| r.hypervisor),
            prefs,
        })
    }

    pub(super) fn qube_list(&self) -> Result<Vec<QubeInfo>> {
        let mut out = Vec::new();
        for q in self.vols.list_qubes()? {
            out.push(self.qube_show(&q.qube)?);
        }
        Ok(out)
    }

    pub(super) fn qube_remove(&self, name: &str) -> Result<Removed> {
        let q = self.vols.qube(name)?;
        if q.class == QubeClass::TemplateVM {
            return self.template_remove(name);
        }
        self.refuse_if_served(name, "remove")?;
        let mut users = Vec::new();
        for other in self.vols.list_qubes()? {
            if self.catalogue().prefs(&other.qube)?.netvm.as_deref() == Some(name) {
                users.push(other.qube);
            }
        }
        if !users.is_empty() {
            bail!(
                "{name} is the netvm of {}; give them another netvm first",
                users.join(", ")
            );
        }
        self.txn_remove(name)?;
        let _ = fs::remove_dir_all(self.paths.kernels_dir(name));
        let _ = fs::remove_dir_all(self.paths.qube_run_dir(name));
        Ok(Removed {
            removed: name.to_string(),
        })
    }

    pub(super) fn qube_clone(&self, src: &str, dst: &str) -> Result<QubeInfo> {
        validate_qube_name("qube", dst)?;
        let txn = self.txn();
        self.vols.qube(src)?;
        if self.vols.qube(dst).is_ok() {
            bail!("qube {dst} already exists; pick another name for the clone");
        }
        let mut prefs = self.catalogue().prefs(src)?;
        // Addresses are per qube: the clone gets its own at its first start.
        prefs.ip = None;
        let rec = self.catalogue().template(src)?;
        let records = Self::creation_records(dst, "clone", &prefs, rec.as_ref());
        self.vols.clone_qube_with(src, dst, &as_strs(&records))?;
        let k = self.paths.kernels_dir(src);
        if k.exists() {
            let d = self.paths.kernels_dir(dst);
            fs::create_dir_all(&d)?;
            for f in ["vmlinuz", "initrd.img"] {
                if k.join(f).exists() {
                    copy_atomic(&k.join(f), &d.join(f))?;
                }
            }
        }
        self.mark_created(dst)?;
        drop(txn);
        self.qube_show(dst)
    }

    pub(super) fn qube_prefs(
        &self,
        name: &str,
        key: Option<String>,
        value: Option<String>,
    ) -> Result<PrefsReply> {
        self.vols.qube(name)?;
        let mut prefs = self.catalogue().prefs(name)?;
        match (key, value) {
            (None, _) => Ok(PrefsReply::All(prefs)),
            (Some(k), None) => Ok(PrefsReply::one(&k, prefs.get(&k)?)),
            (Some(k), Some(v)) => {
                prefs.set(&k, &v)?;
                let _txn = self.txn();
                self.check_network_prefs(name, &prefs)?;
                self.catalogue().set_prefs(name, Some(&prefs))?;
                self.pool().commit()?;
                Ok(PrefsReply::one(&k, prefs.get(&k)?))
            }
        }
    }

    pub(super) fn qube_console(&self, name: &str) -> Result<QubeConsole> {
        self.vols.qube(name)?;
        let run_dir = self.paths.qube_run_dir(name);
        let rt = self.catalogue().runtime(name)?.unwrap_or_default();
        let hv = hypervisor::by_name(if rt.hypervisor.is_empty() {
            "qemu"
        } else {
            &rt.hypervisor
        })?;
        let log = hv.console_log(&run_dir);
        let text = fs::read(&log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        Ok(QubeConsole {
            name: name.to_string(),
            log,
            text,
        })
    }
}
