//! Templates: made from an image, a recipe build or a package, listed, exported and
//! removed. Every way in ends in [`Controller::install_root`].

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use storage::qubes::{QubeClass, QubeVolumes};

use super::volumes::{image_size, ExactReader};
use super::{as_strs, class_name, copy_atomic, validate_qube_name, Controller, DEFAULT_CMDLINE};
use crate::catalogue::{QubePrefs, TemplateRecord};
use crate::results::{Removed, TemplateBuilt, TemplateExported, TemplateInfo, TemplateSummary};

/// Where a template's root image comes from: an image or a verified package's chunk
/// stream (no temporary copy of the image).
pub(super) enum ImageSource<'a> {
    Stream {
        what: String,
        size: u64,
        reader: Box<dyn std::io::Read + 'a>,
    },
}

impl Controller {
    pub(super) fn require_template(&self, name: &str) -> Result<QubeVolumes> {
        let q = self.vols.qube(name).with_context(|| {
            format!("template {name} does not exist; see `qubes-ctl template list`")
        })?;
        if q.class != QubeClass::TemplateVM {
            bail!("{name} is a {}, not a template", class_name(&q.class));
        }
        Ok(q)
    }

    pub(super) fn template_create(
        &self,
        name: &str,
        image: &Path,
        file: fs::File,
        replace: bool,
    ) -> Result<TemplateInfo> {
        validate_qube_name("template", name)?;
        let size = image_size(&file)
            .with_context(|| format!("reading image {}", image.display()))?
            .ok_or_else(|| {
                anyhow!(
                    "{} is not a regular file or a block device; give a raw disk image",
                    image.display()
                )
            })?;
        if size == 0 {
            bail!(
                "{} is empty (0 bytes); give a raw disk image",
                image.display()
            );
        }
        let rec = TemplateRecord {
            origin: "image".into(),
            ..Default::default()
        };
        let source = ImageSource::Stream {
            what: image.display().to_string(),
            size,
            reader: Box::new(ExactReader {
                inner: file,
                left: size,
                size,
                what: format!("image {}", image.display()),
            }),
        };
        self.install_root(name, source, rec, None, None, replace)?;
        self.template_info(name)
    }

    /// Creates the TemplateVM if needed and imports `image` as its root (the old root, if
    /// any, becomes a revision). Kernel files are put in place before the record that
    /// points at them is committed.
    pub(super) fn install_root(
        &self,
        name: &str,
        image: ImageSource<'_>,
        mut rec: TemplateRecord,
        kernel: Option<&Path>,
        initrd: Option<&Path>,
        replace: bool,
    ) -> Result<()> {
        let _locked = self.lock_qubes(&[name]);
        let exists = self.vols.qube(name).is_ok();
        if exists {
            self.require_template(name)?;
            self.refuse_if_served(name, "replace the root of")?;
            if !replace {
                let users = self.template_users(name)?;
                let used = if users.is_empty() {
                    String::new()
                } else {
                    format!(" (used by {})", users.join(", "))
                };
                bail!(
                    "template {name} already exists{used}; pass --replace to replace its root \
                     (the current one is kept as a revision: `qubes-ctl volume revert {name}:root` brings it back), \
                     or pick another --name"
                );
            }
        }
        let kdir = self.paths.kernels_dir(name);
        if let Some(k) = kernel {
            fs::create_dir_all(&kdir)?;
            copy_atomic(k, &kdir.join("vmlinuz"))?;
            if let Some(i) = initrd {
                copy_atomic(i, &kdir.join("initrd.img"))?;
            }
            rec.has_kernel = true;
        }
        // A new template is made first (its creation marker and preferences committed
        // with it); the volume model removes it again unless the import completes.
        let pending = if exists {
            None
        } else {
            let mut prefs = QubePrefs {
                label: crate::catalogue::Label::Black,
                ..Default::default()
            };
            if !rec.has_kernel {
                prefs.kernel = "none".into();
                prefs.virt_mode = "hvm".into();
            }
            let records = Self::creation_records(name, "template", &prefs, None);
            let _txn = self.txn();
            Some(
                self.vols
                    .create_pending(name, QubeClass::TemplateVM, None, &as_strs(&records))?,
            )
        };
        let ImageSource::Stream {
            what,
            size,
            mut reader,
        } = image;
        // The copy runs outside the catalogue transaction (other requests go on); the
        // record is committed with the creation's end. A new template killed before that
        // is undone at the next open (its creation marker); a replaced root killed before
        // it keeps the old record, whose fingerprint `pool verify`'s caller can compare.
        let stats_fp = match self.vols.import(name, "root", &mut reader, size) {
            Ok(stats) => stats.fingerprint,
            Err(e) => {
                let e = anyhow!(e).context(format!("importing {what} into {name}:root"));
                if let Some(p) = pending {
                    let _txn = self.txn();
                    if let Err(u) = p.undo() {
                        return Err(e.context(format!(
                            "removing the unfinished template {name} failed too ({u}); the next qubes-ctl command removes it"
                        )));
                    }
                }
                return Err(e);
            }
        };
        // Complete as far as the volumes go; if the commit below fails, the creation
        // marker it would clear makes the next open remove the template.
        if let Some(p) = pending {
            p.keep();
        }
        if rec.fingerprint.is_empty() {
            rec.fingerprint = stats_fp;
        }
        let _txn = self.txn();
        self.catalogue().set_template(name, Some(&rec))?;
        self.mark_created(name)?;
        // The root volume is exactly the image (its fingerprint is the image's); a user
        // who wants more room runs `volume resize TEMPLATE:root SIZE`.
        Ok(())
    }

    /// Builds from a recipe the client resolved; `inputs` are its files then its local GPG
    /// keys, opened by the client (see [`Request::TemplateBuild`]).
    pub(super) fn template_build(
        &self,
        recipe: &Path,
        mut recipe_obj: template_builder::Recipe,
        inputs: Vec<fs::File>,
        name: Option<String>,
        mirror: Option<String>,
    ) -> Result<TemplateBuilt> {
        recipe_obj.path = recipe.to_path_buf();
        // The builder reads files by path: give it copies of what the client sent, in a
        // directory of ours that goes when the build ends.
        let work = self.paths.cache_dir().join("work");
        fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let copies = tempfile::Builder::new()
            .prefix("recipe-inputs.")
            .tempdir_in(&work)
            .with_context(|| format!("creating a directory in {}", work.display()))?;
        let mut inputs = inputs.into_iter();
        let mut copy = |what: &str, expect: Option<&str>| -> Result<PathBuf> {
            let mut f = inputs
                .next()
                .ok_or_else(|| anyhow!("no open file came with the request for {what}"))?;
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes)
                .with_context(|| format!("reading {what} (sent by the client)"))?;
            let hash = blake3::hash(&bytes).to_hex().to_string();
            if expect.is_some_and(|e| e != hash) {
                bail!("{what} changed while the build was being requested; run the build again");
            }
            let dst = copies.path().join(&hash);
            fs::write(&dst, &bytes).with_context(|| format!("writing {}", dst.display()))?;
            Ok(dst)
        };
        for f in &mut recipe_obj.files {
            f.src = copy(&f.src.display().to_string(), Some(&f.content_hash))?;
        }
        for k in recipe_obj
            .gpg_keys
            .iter_mut()
            .filter(|k| !k.contains("://"))
        {
            *k = copy(k, None)?.to_string_lossy().into_owned();
        }
        crate::guest_tools::add_agent(&mut recipe_obj)?;
        let opts = template_builder::BuildOptions {
            name: name.clone(),
            mirror,
            cache_dir: self.paths.cache_dir(),
            work_dir: self.paths.cache_dir().join("work"),
            progress: !self.in_daemon,
        };
        let built = template_builder::build(&recipe_obj, &opts)?;
        let tname = name.unwrap_or_else(|| built.name.clone());
        validate_qube_name("template", &tname)?;
        // A rebuild that produced the same image changes nothing (no new revision).
        if let Ok(Some(old)) = self.catalogue().template(&tname) {
            if old.fingerprint == built.fingerprint && self.vols.qube(&tname).is_ok() {
                return Ok(TemplateBuilt {
                    info: self.template_info(&tname)?,
                    cache_hit: built.cache_hit,
                    unchanged: true,
                });
            }
        }
        let rec = TemplateRecord {
            origin: "recipe".into(),
            recipe: Some(recipe.display().to_string()),
            recipe_hash: Some(built.recipe_hash.clone()),
            packages: built.packages.clone(),
            build_date: Some(built.build_date.clone()),
            fingerprint: built.fingerprint.clone(),
            has_kernel: false,
            kernel_cmdline: built.kernel_cmdline.clone(),
        };
        let f = fs::File::open(&built.image)
            .with_context(|| format!("opening {}", built.image.display()))?;
        let size = f.metadata()?.len();
        let source = ImageSource::Stream {
            what: built.image.display().to_string(),
            size,
            reader: Box::new(f),
        };
        // A rebuild is the upgrade path of a recipe template: its old root is kept as a
        // revision.
        self.install_root(
            &tname,
            source,
            rec,
            built.kernel.as_deref(),
            built.initrd.as_deref(),
            true,
        )?;
        Ok(TemplateBuilt {
            info: self.template_info(&tname)?,
            cache_hit: built.cache_hit,
            unchanged: false,
        })
    }

    pub(super) fn template_list(&self) -> Result<Vec<TemplateSummary>> {
        let mut out = Vec::new();
        for q in self.vols.list_qubes()? {
            if q.class != QubeClass::TemplateVM {
                continue;
            }
            let rec = self.catalogue().template(&q.qube)?.unwrap_or_default();
            let root = self.vols.volume_status(&q.qube, "root")?;
            out.push(TemplateSummary {
                running: self.vols.is_running(&q.qube)?,
                name: q.qube,
                origin: rec.origin,
                size: root.size,
                usage: root.usage,
                fingerprint: rec.fingerprint,
            });
        }
        Ok(out)
    }

    pub(super) fn template_info(&self, name: &str) -> Result<TemplateInfo> {
        let q = self.require_template(name)?;
        let rec = self.catalogue().template(name)?.unwrap_or_default();
        let root = self.vols.volume_status(name, "root")?;
        let users = self.template_users(name)?;
        Ok(TemplateInfo {
            class: class_name(&q.class),
            name: q.qube,
            kernel: rec
                .has_kernel
                .then(|| self.paths.kernels_dir(name).join("vmlinuz")),
            kernel_cmdline: if rec.kernel_cmdline.is_empty() {
                DEFAULT_CMDLINE.to_string()
            } else {
                rec.kernel_cmdline
            },
            origin: rec.origin,
            recipe: rec.recipe,
            recipe_hash: rec.recipe_hash,
            build_date: rec.build_date,
            fingerprint: rec.fingerprint,
            packages: rec.packages,
            root_size: root.size,
            root_usage: root.usage,
            revisions: root.revisions.into_iter().map(|r| r.id).collect(),
            used_by: users,
        })
    }

    pub(super) fn template_users(&self, name: &str) -> Result<Vec<String>> {
        Ok(self
            .vols
            .list_qubes()?
            .into_iter()
            .filter(|o| o.template.as_deref() == Some(name))
            .map(|o| o.qube)
            .collect())
    }

    pub(super) fn template_remove(&self, name: &str) -> Result<Removed> {
        self.require_template(name)?;
        self.refuse_if_served(name, "remove")?;
        self.txn_remove(name)?;
        let _ = fs::remove_dir_all(self.paths.kernels_dir(name));
        Ok(Removed {
            removed: name.to_string(),
        })
    }

    /// The package is made in a staging directory of ours and copied into `out`, which
    /// the client opened (the CLI writes `FILE.partial` and renames it on success).
    pub(super) fn template_export(
        &self,
        name: &str,
        file: &Path,
        mut out: fs::File,
    ) -> Result<TemplateExported> {
        self.require_template(name)?;
        let rec = self.catalogue().template(name)?.unwrap_or_default();
        let root = self.vols.volume_status(name, "root")?;
        let head = root
            .head_key
            .clone()
            .ok_or_else(|| anyhow!("template {name} has no root head to export"))?;
        let dev = self.pool().open_volume(&head, true)?;
        let kdir = self.paths.kernels_dir(name);
        let kernel = kdir.join("vmlinuz");
        let initrd = kdir.join("initrd.img");
        let staging =
            tempfile::tempdir_in(self.paths.root()).context("creating a staging directory")?;
        let staged = staging.path().join("template.qtpl");
        let meta = template_builder::TemplateMeta {
            recipe_hash: rec.recipe_hash.clone().unwrap_or_default(),
            packages: rec.packages.clone(),
            build_date: rec.build_date.clone().unwrap_or_default(),
            kernel_cmdline: rec.kernel_cmdline.clone(),
        };
        let stats = template_builder::export_package(
            name,
            dev.as_ref(),
            &meta,
            rec.has_kernel.then_some(kernel.as_path()),
            (rec.has_kernel && initrd.exists()).then_some(initrd.as_path()),
            &staged,
        )?;
        let mut src =
            fs::File::open(&staged).with_context(|| format!("opening {}", staged.display()))?;
        std::io::copy(&mut src, &mut out).with_context(|| format!("writing {}", file.display()))?;
        if out.metadata().is_ok_and(|m| m.is_file()) {
            out.sync_all()
                .with_context(|| format!("syncing {}", file.display()))?;
        }
        Ok(TemplateExported {
            template: name.to_string(),
            file: file.to_path_buf(),
            stats,
        })
    }

    pub(super) fn template_import(
        &self,
        file: &Path,
        opened: fs::File,
        name: Option<String>,
        replace: bool,
    ) -> Result<TemplateInfo> {
        use std::os::fd::AsRawFd;
        // Everything is verified before the pool is touched. The package is read through
        // the descriptor the client opened (our own /proc/self/fd entry), never by path.
        let via = PathBuf::from(format!("/proc/self/fd/{}", opened.as_raw_fd()));
        let pkg = template_builder::read_package(&via).map_err(|e| {
            anyhow!(
                "{}",
                e.to_string()
                    .replace(&*via.to_string_lossy(), &file.display().to_string())
            )
        })?;
        let manifest = pkg.manifest().clone();
        let tname = name.unwrap_or_else(|| manifest.name.clone());
        validate_qube_name("template", &tname)?;
        let staging =
            tempfile::tempdir_in(self.paths.root()).context("creating a staging directory")?;
        let kernel = pkg.write_kernel(staging.path())?;
        let initrd = pkg.write_initrd(staging.path())?;
        let rec = TemplateRecord {
            origin: "package".into(),
            recipe: None,
            recipe_hash: Some(manifest.recipe_hash.clone()).filter(|s| !s.is_empty()),
            packages: manifest.packages.clone(),
            build_date: Some(manifest.build_date.clone()).filter(|s| !s.is_empty()),
            fingerprint: manifest.fingerprint.clone(),
            has_kernel: false,
            kernel_cmdline: manifest.kernel_cmdline.clone(),
        };
        let source = ImageSource::Stream {
            what: format!("package {}", file.display()),
            size: manifest.size,
            // The manifest's fingerprint is a claim: the bytes must prove it before the
            // import commits (a forged package could name an official build's).
            reader: Box::new(template_builder::FingerprintReader::new(
                pkg.image_reader(),
                manifest.size,
                &manifest.fingerprint,
                &format!("package {}", file.display()),
            )),
        };
        self.install_root(
            &tname,
            source,
            rec,
            kernel.as_deref(),
            initrd.as_deref(),
            replace,
        )?;
        drop(opened);
        self.template_info(&tname)
    }
}
