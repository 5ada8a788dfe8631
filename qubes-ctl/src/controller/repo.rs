//! The client side of template repositories (see `template_builder::repo` for the
//! checks): trust store and sources under `ROOT/repos/`, and install / upgrade /
//! downgrade / reinstall through one path that fetches only the chunks the installed
//! version of the template lacks.

use std::fs;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use template_builder::repo::{self as trepo, IndexEntry, LocalChunks, Repo, TrustStore};

use super::templates::ImageSource;
use super::Controller;
use crate::catalogue::TemplateRecord;
use crate::repo::{InstallMode, RepoAction};
use crate::results::{
    AvailableTemplate, InstallOutcome, RepoReply, RepoSources, RepoTransfer, RepoTrusted,
    TemplateInstalled, TemplateOffer, TemplateOffers, UpToDate,
};

/// Pool meta key prefix: what a repository installed, per template.
const INSTALLED: &str = "repo-installed/";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Installed {
    version: String,
    release_date: String,
    fingerprint: String,
    repo: String,
}

impl Controller {
    fn repos_dir(&self) -> PathBuf {
        self.paths.root().join("repos")
    }

    fn trust_path(&self) -> PathBuf {
        self.repos_dir().join("trust.json")
    }

    fn sources_path(&self) -> PathBuf {
        self.repos_dir().join("sources.json")
    }

    fn sources(&self) -> Result<Vec<String>> {
        match fs::read(self.sources_path()) {
            Ok(b) => Ok(serde_json::from_slice(&b).context("reading repos/sources.json")?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e).context("reading repos/sources.json"),
        }
    }

    pub(super) fn template_repo(&self, action: RepoAction) -> Result<RepoReply> {
        match action {
            RepoAction::Trust { pubkey } => {
                let vk = trepo::load_public(std::path::Path::new(&pubkey))?;
                let mut t = TrustStore::load(&self.trust_path())?;
                let added = t.trust(&vk);
                t.save(&self.trust_path())?;
                Ok(RepoReply::Trusted(RepoTrusted {
                    trusted: trepo::key_id(&vk),
                    new: added,
                }))
            }
            RepoAction::AddSource { url } => {
                let mut s = self.sources()?;
                if !s.contains(&url) {
                    s.push(url);
                }
                fs::create_dir_all(self.repos_dir())?;
                let tmp = self.sources_path().with_extension("tmp");
                fs::write(&tmp, serde_json::to_vec_pretty(&s)?)?;
                fs::rename(&tmp, self.sources_path())?;
                Ok(RepoReply::Sources(RepoSources {
                    sources: s,
                    trust: None,
                }))
            }
            RepoAction::Show => {
                let t = TrustStore::load(&self.trust_path())?;
                Ok(RepoReply::Sources(RepoSources {
                    sources: self.sources()?,
                    trust: Some(t),
                }))
            }
            RepoAction::ListAvailable { repos } => {
                let repos = self.open_repos(&repos)?;
                let mut out = Vec::new();
                for r in &repos {
                    for e in &r.index.packages {
                        let inst = self.installed(&e.name)?;
                        out.push(AvailableTemplate {
                            name: e.name.clone(),
                            version: e.version.clone(),
                            release_date: e.release_date.clone(),
                            size: e.size,
                            installed: inst.map(|i| i.version),
                            repo: r.source.url().to_string(),
                        });
                    }
                }
                Ok(RepoReply::Available(out))
            }
            RepoAction::InfoAvailable { name, repos } => {
                let repos = self.open_repos(&repos)?;
                let found: Vec<TemplateOffer> = repos
                    .iter()
                    .flat_map(|r| {
                        r.index
                            .packages
                            .iter()
                            .filter(|e| e.name == name)
                            .map(move |e| {
                                TemplateOffer::new(
                                    e,
                                    r.source.url().to_string(),
                                    r.index.version,
                                    r.key.clone(),
                                )
                            })
                    })
                    .collect();
                if found.is_empty() {
                    bail!("no repository offers a template named {name}; see `qubes-ctl template list --available`");
                }
                Ok(RepoReply::Offers(TemplateOffers {
                    name,
                    available: found,
                }))
            }
            RepoAction::Install { mode, spec, repos } => self.repo_install(mode, spec, &repos),
        }
    }

    /// Opens every repository (`--repo` ones, else the configured sources), with all
    /// checks; the highest index versions seen are saved even if a later one fails.
    fn open_repos(&self, repos: &[String]) -> Result<Vec<Repo>> {
        let urls = if repos.is_empty() {
            self.sources()?
        } else {
            repos.to_vec()
        };
        if urls.is_empty() {
            bail!("no template repository configured; add one with `qubes-ctl template repo add-source URL` or pass --repo URL");
        }
        let mut trust = TrustStore::load(&self.trust_path())?;
        if trust.keys.is_empty() {
            bail!("no repository key is trusted; pin the publisher's key with `qubes-ctl template repo trust KEYFILE.pub`");
        }
        let now = trepo::now_secs();
        let mut out = Vec::new();
        let mut err = None;
        for u in &urls {
            match trepo::open_repo(u, &mut trust, now) {
                Ok(r) => out.push(r),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        trust.save(&self.trust_path())?;
        if let Some(e) = err {
            return Err(anyhow!(e));
        }
        Ok(out)
    }

    fn installed(&self, name: &str) -> Result<Option<Installed>> {
        let Some(s) = self.pool().get_meta(&format!("{INSTALLED}{name}"))? else {
            return Ok(None);
        };
        let inst: Installed = serde_json::from_str(&s)?;
        // A template replaced by other means (build, import) is no longer this release.
        let rec = self.catalogue().template(name)?;
        Ok(rec
            .filter(|r| r.fingerprint == inst.fingerprint && self.vols.qube(name).is_ok())
            .map(|_| inst))
    }

    fn repo_install(
        &self,
        mode: InstallMode,
        spec: Option<String>,
        repos: &[String],
    ) -> Result<RepoReply> {
        let repos = self.open_repos(repos)?;
        let all: Vec<(&Repo, &IndexEntry)> = repos
            .iter()
            .flat_map(|r| r.index.packages.iter().map(move |e| (r, e)))
            .collect();
        let Some(spec) = spec else {
            // `upgrade` with no name: every template a repository installed.
            let mut names: Vec<String> = Vec::new();
            for key in self.pool().meta_keys(INSTALLED)? {
                let n = key.trim_start_matches(INSTALLED).to_string();
                if self.installed(&n)?.is_some() {
                    names.push(n);
                }
            }
            let mut out = Vec::new();
            for n in names {
                out.push(self.install_one(mode, &n, None, &all)?);
            }
            return Ok(RepoReply::InstallAll(out));
        };
        // NAME, or NAME-VERSION when that names a published version.
        let (name, version) = match all.iter().find(|(_, e)| e.label() == spec) {
            Some((_, e)) if !all.iter().any(|(_, x)| x.name == spec) => {
                (e.name.clone(), Some(e.version.clone()))
            }
            _ => (spec.clone(), None),
        };
        self.install_one(mode, &name, version, &all)
            .map(RepoReply::Install)
    }

    fn install_one(
        &self,
        mode: InstallMode,
        name: &str,
        version: Option<String>,
        all: &[(&Repo, &IndexEntry)],
    ) -> Result<InstallOutcome> {
        use std::cmp::Ordering;
        storage::validate_name("template", name)?;
        let exists = self.vols.qube(name).is_ok();
        let inst = self.installed(name)?;
        let mut cands: Vec<&(&Repo, &IndexEntry)> = all
            .iter()
            .filter(|(_, e)| e.name == name)
            .filter(|(_, e)| version.as_ref().is_none_or(|v| *v == e.version))
            .collect();
        if cands.is_empty() {
            bail!(
                "no repository offers {name}{}; see `qubes-ctl template list --available`",
                version.map(|v| format!("-{v}")).unwrap_or_default()
            );
        }
        cands.sort_by(|a, b| trepo::cmp_version(&a.1.version, &b.1.version));
        let cur = inst.as_ref().map(|i| i.version.as_str());
        let pick = match mode {
            InstallMode::Install => {
                if exists {
                    bail!("template {name} already exists; use `template upgrade`, `downgrade` or `reinstall`");
                }
                cands.last()
            }
            InstallMode::Upgrade | InstallMode::Downgrade | InstallMode::Reinstall => {
                let Some(cur) = cur else {
                    bail!("template {name} was not installed from a repository (or was replaced since); install it with `template install {name}` under another name, or remove it first");
                };
                match mode {
                    InstallMode::Upgrade => {
                        match cands
                            .last()
                            .filter(|c| trepo::cmp_version(&c.1.version, cur) == Ordering::Greater)
                        {
                            Some(c) => Some(c),
                            None => {
                                return Ok(InstallOutcome::UpToDate(UpToDate {
                                    name: name.to_string(),
                                    version: cur.to_string(),
                                    up_to_date: true,
                                }))
                            }
                        }
                    }
                    InstallMode::Downgrade => cands
                        .iter()
                        .rev()
                        .find(|c| trepo::cmp_version(&c.1.version, cur) == Ordering::Less),
                    _ => cands.iter().find(|c| c.1.version == cur),
                }
            }
        };
        let Some(&&(repo, entry)) = pick else {
            bail!(
                "no suitable version of {name} for this request (installed: {})",
                cur.unwrap_or("none")
            );
        };
        if exists {
            self.refuse_if_served(name, "replace the root of")?;
        }
        self.fetch_and_install(repo, entry)
            .map(|i| InstallOutcome::Installed(Box::new(i)))
    }

    fn fetch_and_install(&self, repo: &Repo, entry: &IndexEntry) -> Result<TemplateInstalled> {
        let name = entry.name.clone();
        let used_before = self.pool().info()?.data_used;
        let cache = self.paths.cache_dir().join("downloads");
        let mut fetch = trepo::PackageFetch::start(repo, entry, &cache, !self.in_daemon)
            .with_context(|| format!("fetching {} from {}", entry.label(), repo.source.url()))?;
        let m = fetch.manifest.clone();
        // The installed version's chunks are read from the pool instead of fetched.
        let dev = match self.vols.qube(&name).ok().and(
            self.vols
                .volume_status(&name, "root")
                .ok()
                .and_then(|s| s.head_key),
        ) {
            Some(head) => Some(self.pool().open_volume(&head, true)?),
            None => None,
        };
        let scan;
        let local: &dyn LocalChunks = match &dev {
            Some(d) => {
                scan = trepo::DeviceChunks::scan(d.as_ref(), m.chunk_size)
                    .context("reading the installed template's chunks")?;
                &scan
            }
            None => &trepo::NoChunks,
        };
        let mut need = trepo::missing_blobs(&m, local);
        let blobs_needed = need.len();
        let kdir = self.paths.kernels_dir(&name);
        let reuse = |file: &str, b: &template_builder::package::BlobRef| {
            fs::read(kdir.join(file))
                .map(|x| blake3::hash(&x).as_bytes() == &b.hash)
                .unwrap_or(false)
        };
        let mut kfiles = Vec::new();
        for (file, b) in [("vmlinuz", &m.kernel), ("initrd.img", &m.initrd)] {
            if let Some(b) = b {
                if !reuse(file, b) {
                    need.push(b.clone());
                }
                kfiles.push((file, b.clone()));
            }
        }
        fetch
            .fetch_blobs(&need)
            .with_context(|| format!("fetching {} from {}", entry.label(), repo.source.url()))?;
        let staging =
            tempfile::tempdir_in(self.paths.root()).context("creating a staging directory")?;
        let mut kpaths = Vec::new();
        for (file, b) in &kfiles {
            let p = staging.path().join(file);
            let bytes = if reuse(file, b) {
                fs::read(kdir.join(file))?
            } else {
                fetch.blob_bytes(b)?
            };
            fs::write(&p, bytes)?;
            kpaths.push(p);
        }
        let rec = TemplateRecord {
            origin: "repo".into(),
            recipe: None,
            recipe_hash: Some(m.recipe_hash.clone()).filter(|s| !s.is_empty()),
            packages: m.packages.clone(),
            build_date: Some(m.build_date.clone()).filter(|s| !s.is_empty()),
            fingerprint: m.fingerprint.clone(),
            has_kernel: false,
            kernel_cmdline: m.kernel_cmdline.clone(),
        };
        let what = format!("{} from {}", entry.label(), repo.source.url());
        let reader = template_builder::FingerprintReader::new(
            fetch.image_reader(local),
            m.size,
            &m.fingerprint,
            &what,
        );
        let source = ImageSource::Stream {
            what: what.clone(),
            size: m.size,
            reader: Box::new(reader),
        };
        // The read handle on the old root must be gone before its head is replaced.
        let r = self.install_root(
            &name,
            source,
            rec,
            kpaths.first().map(|p| p.as_path()),
            kpaths.get(1).map(|p| p.as_path()),
            // install_one has decided: a fresh install refuses an existing name, the
            // other modes replace a repository template (the old root stays a revision).
            true,
        );
        let chunks_local = dev.as_ref().map(|_| local_count(&m, local)).unwrap_or(0);
        drop(dev);
        r?;
        let inst = Installed {
            version: entry.version.clone(),
            release_date: entry.release_date.clone(),
            fingerprint: m.fingerprint.clone(),
            repo: repo.source.url().into(),
        };
        {
            let _txn = self.txn();
            self.pool().set_meta(
                &format!("{INSTALLED}{name}"),
                Some(&serde_json::to_string(&inst)?),
            )?;
            self.pool().commit()?;
        }
        let used_after = self.pool().info()?.data_used;
        let transfer = RepoTransfer {
            package_bytes: entry.size,
            fetched_bytes: fetch.fetched_bytes,
            requests: fetch.requests,
            blobs: m.blobs.len() as u64,
            blobs_fetched: blobs_needed as u64,
            chunks_from_pool: chunks_local as u64,
            pool_bytes_added: used_after.saturating_sub(used_before),
        };
        fetch.finish();
        Ok(TemplateInstalled {
            info: self.template_info(&name)?,
            version: entry.version.clone(),
            repo: repo.source.url().to_string(),
            transfer,
        })
    }
}

fn local_count(m: &template_builder::PackageManifest, local: &dyn LocalChunks) -> usize {
    m.chunk_hashes.iter().filter(|h| local.has(h)).count()
}
