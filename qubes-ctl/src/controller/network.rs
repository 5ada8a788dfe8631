//! Qubes' network: netvm rules, addresses on 10.137.0.0/24, and the link from a qube's
//! NIC to its netvm.

use anyhow::{anyhow, bail, Context, Result};

use super::lifecycle::give_socket;
use super::Controller;
use crate::catalogue::QubePrefs;

impl Controller {
    /// Qubes' rules: a netvm exists and provides network, chains have no loop, and a
    /// qube others use as their netvm keeps providing it.
    pub(super) fn check_network_prefs(&self, name: &str, prefs: &QubePrefs) -> Result<()> {
        let mut seen = vec![name.to_string()];
        let mut next = prefs.netvm.clone();
        while let Some(n) = next {
            if seen.contains(&n) {
                bail!(
                    "netvm {n} would make a loop ({} -> {n}); pick another netvm",
                    seen.join(" -> ")
                );
            }
            if self.vols.qube(&n).is_err() {
                bail!(
                    "netvm {n} does not exist; create it or pick another (`qubes-ctl qube list`)"
                );
            }
            let p = self.catalogue().prefs(&n)?;
            if !p.provides_network {
                bail!("{n} does not provide network; set `qubes-ctl qube prefs {n} provides_network true` first");
            }
            seen.push(n);
            next = p.netvm;
        }
        if !prefs.provides_network {
            let users: Vec<String> = self
                .vols
                .list_qubes()?
                .into_iter()
                .map(|q| q.qube)
                .filter(|q| q != name)
                .filter(|q| {
                    self.catalogue()
                        .prefs(q)
                        .is_ok_and(|p| p.netvm.as_deref() == Some(name))
                })
                .collect();
            if !users.is_empty() {
                bail!(
                    "{name} is the netvm of {}; give them another netvm first",
                    users.join(", ")
                );
            }
        }
        Ok(())
    }

    /// The qube's address on the qubes network (10.137.0.N), assigned on first use.
    pub(super) fn network_ip(&self, name: &str) -> Result<String> {
        let _txn = self.txn();
        let mut prefs = self.catalogue().prefs(name)?;
        if let Some(ip) = &prefs.ip {
            return Ok(ip.clone());
        }
        let mut used = std::collections::BTreeSet::new();
        for q in self.vols.list_qubes()? {
            if let Some(ip) = self.catalogue().prefs(&q.qube)?.ip {
                used.insert(ip);
            }
        }
        let ip = (2..=254)
            .map(|n| format!("10.137.0.{n}"))
            .find(|ip| !used.contains(ip))
            .ok_or_else(|| anyhow!("the qubes network 10.137.0.0/24 is full"))?;
        prefs.ip = Some(ip.clone());
        self.catalogue().set_prefs(name, Some(&prefs))?;
        self.pool().commit()?;
        Ok(ip)
    }

    /// Qubes' network for the domain: its address, gateway and MAC on the kernel command
    /// line (`qubes.ip=`, `qubes.gateway=`, `qubes.netvm=1` for a netvm; the guest
    /// integration configures the interfaces from them), and its NIC linked to the netvm.
    pub(super) fn wire_network(
        &self,
        name: &str,
        prefs: &QubePrefs,
        hv: &dyn hypervisor::Hypervisor,
        mut spec: hypervisor::DomainSpec,
    ) -> Result<hypervisor::DomainSpec> {
        if prefs.netvm.is_none() && !prefs.provides_network {
            return Ok(spec);
        }
        let ip = self.network_ip(name)?;
        let last: u8 = ip
            .rsplit('.')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        spec.net.mac = format!("00:16:3e:5e:6c:{last:02x}");
        spec.net.ip = ip.clone();
        spec.net.provides_network = prefs.provides_network;
        let mut opts = format!(" qubes.ip={ip} qubes.mac={}", spec.net.mac);
        if prefs.provides_network {
            opts.push_str(" qubes.netvm=1");
        }
        if let Some(n) = &prefs.netvm {
            let gateway = self.network_ip(n)?;
            opts.push_str(&format!(" qubes.gateway={gateway}"));
            let nrun = self.paths.qube_run_dir(n);
            let sock = nrun.join(format!("vif-{name}.sock"));
            if sock.as_os_str().len() > 107 {
                bail!(
                    "the link socket {} is too long for a unix socket; use a shorter --root or qube name",
                    sock.display()
                );
            }
            // The netvm's end: the same number, locally administered (`fe:`), which the
            // guest integration's udev rule recognises as a client link (QEMU; on Xen
            // this waits until the netvm's kernel serves vif backends).
            let backend_mac = format!("fe:16:3e:5e:6c:{last:02x}");
            hv.attach_client(n, &nrun, name, &sock, &backend_mac)
                .with_context(|| format!("connecting {name} to its netvm {n}"))?;
            // The netvm's QEMU made the link's listening end; only this qube's QEMU
            // may connect to it.
            give_socket(&sock, spec.user)?;
            spec.net.netvm_socket = Some(sock);
        }
        spec.cmdline.push_str(&opts);
        Ok(spec)
    }
}
