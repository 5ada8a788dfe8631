//! The hypervisor's description of a qube's domain (kernel, command line, disks), and
//! Xen's blkif disks served from this process.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use storage::qubes::{QubeVolumes, StartedVolume};

use super::{export_name, Controller, DEFAULT_CMDLINE};
use crate::catalogue::QubePrefs;

/// The guest's disk names, in volume order (root, private, volatile, kernel).
pub(super) const XEN_VDEVS: [&str; 4] = ["xvda", "xvdb", "xvdc", "xvdd"];

impl Controller {
    /// The qube whose kernel boots `q` (itself, its template, or its root's source).
    pub(super) fn kernel_owner(&self, q: &QubeVolumes) -> String {
        if let Some(src) = q
            .volumes
            .iter()
            .find(|v| v.name == "root")
            .and_then(|v| v.source.clone())
        {
            if let Some((owner, _)) = src.split_once(':') {
                return owner.to_string();
            }
        }
        q.qube.clone()
    }

    pub(super) fn domain_spec(
        &self,
        q: &QubeVolumes,
        prefs: &QubePrefs,
        started: &[StartedVolume],
        socket: &Path,
        run_dir: &Path,
    ) -> Result<hypervisor::DomainSpec> {
        let (kernel, initrd, cmdline) = if prefs.kernel == "template" {
            let owner = self.kernel_owner(q);
            let kdir = self.paths.kernels_dir(&owner);
            let kernel = kdir.join("vmlinuz");
            if !kernel.exists() {
                bail!(
                    "{} boots the kernel of {owner}, which has none ({} missing); set `qubes-ctl qube prefs {} kernel none` for images that boot themselves",
                    q.qube,
                    kernel.display(),
                    q.qube
                );
            }
            let rec = self.catalogue().template(&owner)?.unwrap_or_default();
            let base = if rec.kernel_cmdline.is_empty() {
                DEFAULT_CMDLINE.to_string()
            } else {
                rec.kernel_cmdline
            };
            let initrd = Some(kdir.join("initrd.img")).filter(|p| p.exists());
            (
                Some(kernel),
                initrd,
                format!("{base} qubes.hostname={}", q.qube),
            )
        } else {
            (None, None, String::new())
        };
        let cmdline = if prefs.kernelopts.is_empty() {
            cmdline
        } else {
            format!("{cmdline} {}", prefs.kernelopts)
        };
        let disks = started
            .iter()
            .zip(XEN_VDEVS)
            .map(|(s, vdev)| hypervisor::DiskSpec {
                vdev: vdev.to_string(),
                nbd_socket: socket.to_path_buf(),
                export: export_name(&q.qube, &s.name),
                read_only: s.read_only,
                block_device: None,
            })
            .collect();
        Ok(hypervisor::DomainSpec {
            name: q.qube.clone(),
            memory_mib: prefs.memory,
            maxmem_mib: prefs.maxmem.max(prefs.memory),
            vcpus: prefs.vcpus,
            virt_mode: prefs.virt_mode.parse().map_err(|e| anyhow!("{e}"))?,
            kernel,
            initrd,
            cmdline: cmdline.trim().to_string(),
            disks,
            netvm: prefs.netvm.clone(),
            net: Default::default(),
            label: prefs.label.to_string(),
            run_dir: run_dir.to_path_buf(),
            user: None,
        })
    }

    /// Under Xen with [`hypervisor::XenDiskMode::Blkif`] the domain was created paused
    /// without disks: serve its volumes over blkif, then unpause it. On failure the
    /// domain is destroyed (the caller undoes the storage).
    pub(super) fn xen_blkif_disks(
        &self,
        name: &str,
        hv_name: &str,
        spec: &hypervisor::DomainSpec,
        started: &[StartedVolume],
    ) -> Result<Option<crate::xen_disks::RealXenDisks>> {
        if hv_name != "xen" {
            return Ok(None);
        }
        let xen = hypervisor::Xen::new();
        if xen.disk_mode() != hypervisor::XenDiskMode::Blkif {
            return Ok(None);
        }
        let r = (|| {
            let domid = xen.domid(name)?;
            let chunk = self.pool().info()?.chunk_size;
            let vols = self.blkif_volumes(name, started)?;
            let disks = crate::xen_disks::attach_real(domid, chunk, vols, &spec.run_dir)?;
            if let Err(e) = hypervisor::Hypervisor::unpause(&xen, name, &spec.run_dir) {
                let _ = disks.detach();
                return Err(e.into());
            }
            anyhow::Ok(disks)
        })();
        match r {
            Ok(d) => Ok(Some(d)),
            Err(e) => {
                let _ = hypervisor::Hypervisor::kill(&xen, name, &spec.run_dir);
                Err(e.context(format!("serving {name}'s disks over blkif")))
            }
        }
    }

    /// The volumes of a Xen qube as its blkif disks, in the order (and so with the
    /// vdevs) of [`Self::domain_spec`].
    pub(super) fn blkif_volumes(
        &self,
        name: &str,
        started: &[StartedVolume],
    ) -> Result<Vec<crate::xen_disks::RealVolume>> {
        let mut vols = Vec::new();
        for (s, vdev) in started.iter().zip(XEN_VDEVS) {
            let device = self.pool().open_volume(&s.key, s.read_only)?;
            vols.push((
                vdev.to_string(),
                s.read_only,
                format!("{name}:{} ({})", s.name, s.key),
                device,
            ));
        }
        Ok(vols)
    }

    /// After a daemon restart: a running Xen domain whose disks an earlier daemon served
    /// over blkif gets them served again from the same rings (its backend nodes are
    /// still in xenstore); `None` for other domains (kernel NBD disks reconnect to the
    /// NBD socket by themselves).
    pub(super) fn xen_blkif_resume(
        &self,
        name: &str,
        started: &[StartedVolume],
    ) -> Result<Option<crate::xen_disks::RealXenDisks>> {
        let xen = hypervisor::Xen::new();
        let run_dir = self.paths.qube_run_dir(name);
        if hypervisor::Hypervisor::state(&xen, name, &run_dir)? == hypervisor::DomainState::Halted {
            return Ok(None);
        }
        let domid = xen.domid(name)?;
        if !crate::xen_disks::has_blkif_disks(domid)? {
            return Ok(None);
        }
        let chunk = self.pool().info()?.chunk_size;
        let vols = self.blkif_volumes(name, started)?;
        let disks = crate::xen_disks::reattach_real(domid, chunk, vols, &run_dir)
            .with_context(|| format!("serving {name}'s blkif disks again (domain {domid})"))?;
        Ok(Some(disks))
    }
}

/// Templates record a QEMU command line (virtio disks, serial console); under Xen the
/// same disks are xvd* and the PV console is hvc0.
pub(super) fn xen_cmdline(cmdline: &str) -> String {
    cmdline
        .split_whitespace()
        .map(|w| match w {
            "root=/dev/vda" => "root=/dev/xvda",
            "console=ttyS0" => "console=hvc0",
            other => other,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xen_command_line_uses_xen_devices() {
        assert_eq!(
            xen_cmdline("root=/dev/vda rw console=ttyS0 qubes.hostname=work"),
            "root=/dev/xvda rw console=hvc0 qubes.hostname=work"
        );
    }
}
