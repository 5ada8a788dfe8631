//! The controller: carries out [`Request`]s against the pool, the qube catalogue, the NBD
//! exports and the hypervisor. The daemon owns one `Controller` behind a mutex; without a
//! daemon the CLI builds one for a single request. The controller owns no storage logic:
//! volume semantics are `storage::qubes`, serving is `blkback`, domains are `hypervisor`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use storage::qubes::{QubeClass, QubeVolumes, StartedVolume, Volumes};
use storage::Pool;

use crate::api::Request;
use crate::catalogue::{Catalogue, QubePrefs, RuntimeRecord, TemplateRecord};
use crate::paths::Paths;

/// Default kernel command line for templates whose build did not record one.
pub const DEFAULT_CMDLINE: &str = "root=/dev/vda rw console=ttyS0";

/// A qube whose volumes this process serves.
struct Served {
    server: blkback::NbdServer,
    hypervisor: String,
}

pub struct Controller {
    paths: Paths,
    vols: Volumes,
    served: BTreeMap<String, Served>,
    /// True inside the daemon: only the daemon may leave exports behind a request.
    in_daemon: bool,
}

/// Which pool driver a directory holds.
fn detect_driver(dir: &Path) -> Option<&'static str> {
    if dir.join("pool.meta").exists() {
        Some("thin")
    } else if dir.join("pool.json").exists() {
        Some("reflink")
    } else {
        None
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Free bytes of the filesystem holding `dir` (the default pool capacity).
fn fs_free_bytes(dir: &Path) -> Result<u64> {
    let st = rustix::fs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

pub struct InitOptions {
    pub driver: String,
    pub chunk_size: u64,
    pub capacity: Option<u64>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            driver: "thin".into(),
            chunk_size: 64 << 10,
            capacity: None,
        }
    }
}

/// Creates a pool under `paths`. Refuses if one exists.
pub fn init_pool(paths: &Paths, opts: &InitOptions) -> Result<Value> {
    let dir = paths.pool_dir();
    if let Some(d) = detect_driver(&dir) {
        bail!("a {d} pool already exists at {}; remove that directory first if you really want a new one", dir.display());
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Leave a little room on the filesystem for metadata and the rest of the system.
    let capacity = match opts.capacity {
        Some(c) => c,
        None => fs_free_bytes(&dir)? / 100 * 95,
    };
    let pool: Arc<dyn Pool> = match opts.driver.as_str() {
        "thin" => storage::thin::ThinPool::create(
            &dir,
            storage::thin::ThinOptions {
                chunk_size: opts.chunk_size,
                capacity,
            },
        )?,
        "reflink" => Arc::new(storage::reflink::ReflinkPool::create(&dir)?),
        other => bail!("unknown pool driver {other:?}; use thin (default) or reflink"),
    };
    let info = pool.info()?;
    Ok(serde_json::to_value(info)?)
}

fn open_pool(paths: &Paths) -> Result<Arc<dyn Pool>> {
    let dir = paths.pool_dir();
    match detect_driver(&dir) {
        Some("thin") => Ok(storage::thin::ThinPool::open(&dir)?),
        Some("reflink") => Ok(Arc::new(storage::reflink::ReflinkPool::open(&dir)?)),
        _ => bail!(
            "no pool at {}; create one with `qubes-ctl pool init`",
            dir.display()
        ),
    }
}

/// Splits `QUBE:VOL`.
pub fn parse_volume_ref(s: &str) -> Result<(String, String)> {
    let (q, v) = s
        .split_once(':')
        .ok_or_else(|| anyhow!("volume {s:?} must be written QUBE:VOLUME, e.g. work:private"))?;
    storage::validate_name("qube", q)?;
    if !matches!(v, "root" | "private" | "volatile") {
        bail!("volume {v:?} of {q} does not exist: a qube has root, private and volatile");
    }
    Ok((q.to_string(), v.to_string()))
}

fn class_name(c: &QubeClass) -> String {
    c.to_string()
}

impl Controller {
    /// Opens the pool under `paths`. With `create`, a missing pool is created with the
    /// defaults first (the embedded default pool of a fresh machine).
    pub fn open(paths: &Paths, create: bool, in_daemon: bool) -> Result<Controller> {
        if create && detect_driver(&paths.pool_dir()).is_none() {
            init_pool(paths, &InitOptions::default())?;
            eprintln!("created a new thin pool at {}", paths.pool_dir().display());
        }
        let pool = open_pool(paths)?;
        Ok(Controller {
            paths: paths.clone(),
            vols: Volumes::new(pool),
            served: BTreeMap::new(),
            in_daemon,
        })
    }

    pub fn pool(&self) -> &Arc<dyn Pool> {
        self.vols.pool()
    }

    fn catalogue(&self) -> Catalogue<'_> {
        Catalogue::new(self.vols.pool().as_ref())
    }

    pub fn handle(&mut self, req: Request) -> Result<Value> {
        match req {
            Request::Ping => Ok(json!({
                "pong": true,
                "pid": std::process::id(),
                "build": crate::api::build_id(),
                "served": self.served.len(),
            })),
            Request::PoolInfo => Ok(serde_json::to_value(self.pool().info()?)?),
            Request::PoolVerify => {
                let report = self.pool().verify()?;
                Ok(json!({"clean": report.is_clean(), "report": report}))
            }
            Request::TemplateCreate { name, image } => self.template_create(&name, &image),
            Request::TemplateBuild {
                recipe,
                name,
                mirror,
            } => self.template_build(&recipe, name, mirror),
            Request::TemplateList => self.template_list(),
            Request::TemplateInfo { name } => self.template_info(&name),
            Request::TemplateRemove { name } => self.template_remove(&name),
            Request::TemplateExport { name, file } => self.template_export(&name, &file),
            Request::TemplateImport { file, name } => self.template_import(&file, name),
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
                self.vols.revert(&qube, &vol, revision.as_deref())?;
                self.volume_info(&qube, &vol)
            }
            Request::VolumeResize {
                qube,
                vol,
                size,
                allow_shrink,
            } => {
                self.vols.resize(&qube, &vol, size, allow_shrink)?;
                self.volume_info(&qube, &vol)
            }
            Request::VolumeImport { qube, vol, file } => self.volume_import(&qube, &vol, &file),
            Request::VolumeExport { qube, vol, file } => {
                let mut out = fs::File::create(&file)
                    .with_context(|| format!("creating {}", file.display()))?;
                let n = self.vols.export(&qube, &vol, &mut out)?;
                out.sync_all()?;
                Ok(json!({"volume": format!("{qube}:{vol}"), "file": file, "bytes": n}))
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
                        self.vols.set_revisions_to_keep(&qube, &vol, n)?;
                    }
                    other => bail!(
                        "volume property {other:?} cannot be set; settable: revisions_to_keep"
                    ),
                }
                self.volume_info(&qube, &vol)
            }
            Request::VolumeDiscard { qube, vol } => {
                self.vols.discard(&qube, &vol)?;
                self.volume_info(&qube, &vol)
            }
            Request::DaemonStop => Ok(json!({"stopping": true})),
        }
    }

    // ---------------------------------------------------------------- templates

    fn require_template(&self, name: &str) -> Result<QubeVolumes> {
        let q = self.vols.qube(name).with_context(|| {
            format!("template {name} does not exist; see `qubes-ctl template list`")
        })?;
        if q.class != QubeClass::TemplateVM {
            bail!("{name} is a {}, not a template", class_name(&q.class));
        }
        Ok(q)
    }

    fn template_create(&mut self, name: &str, image: &Path) -> Result<Value> {
        storage::validate_name("template", name)?;
        let meta =
            fs::metadata(image).with_context(|| format!("reading image {}", image.display()))?;
        if !meta.is_file() {
            bail!(
                "{} is not a regular file; give a raw disk image",
                image.display()
            );
        }
        let rec = TemplateRecord {
            origin: "image".into(),
            ..Default::default()
        };
        self.install_root(name, ImageSource::File(image), rec, None, None)?;
        self.template_info(name)
    }

    /// Creates the TemplateVM if needed and imports `image` as its root (the old root, if
    /// any, becomes a revision). Kernel files are put in place before the record that
    /// points at them is committed.
    fn install_root(
        &mut self,
        name: &str,
        image: ImageSource<'_>,
        mut rec: TemplateRecord,
        kernel: Option<&Path>,
        initrd: Option<&Path>,
    ) -> Result<()> {
        let exists = self.vols.qube(name).is_ok();
        if exists {
            self.require_template(name)?;
            self.refuse_if_served(name, "replace the root of")?;
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
        if !exists {
            let mut prefs = QubePrefs {
                label: crate::catalogue::Label::Black,
                ..Default::default()
            };
            if !rec.has_kernel {
                prefs.kernel = "none".into();
                prefs.virt_mode = "hvm".into();
            }
            self.catalogue().set_prefs(name, Some(&prefs))?;
            self.vols.create_qube(name, QubeClass::TemplateVM, None)?;
        }
        let (what, size, mut reader): (String, u64, Box<dyn std::io::Read + '_>) = match image {
            ImageSource::File(p) => {
                let f = fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
                (p.display().to_string(), f.metadata()?.len(), Box::new(f))
            }
            ImageSource::Stream { what, size, reader } => (what, size, reader),
        };
        // The record is staged first so the import's commit carries it.
        let old_rec = self.catalogue().template(name)?;
        self.catalogue().set_template(name, Some(&rec))?;
        let stats_fp = match self.vols.import(name, "root", &mut reader, size) {
            Ok(stats) => stats.fingerprint,
            Err(e) => {
                // Leave no half-made template behind, and no staged record for the next commit.
                if exists {
                    self.catalogue().set_template(name, old_rec.as_ref())?;
                } else {
                    self.remove_with_catalogue(name)?;
                }
                return Err(anyhow!(e).context(format!("importing {what} into {name}:root")));
            }
        };
        if rec.fingerprint.is_empty() {
            rec.fingerprint = stats_fp;
            self.catalogue().set_template(name, Some(&rec))?;
            self.pool().commit()?;
        }
        // The root volume is exactly the image (its fingerprint is the image's); a user
        // who wants more room runs `volume resize TEMPLATE:root SIZE`.
        Ok(())
    }

    fn template_build(
        &mut self,
        recipe: &Path,
        name: Option<String>,
        mirror: Option<String>,
    ) -> Result<Value> {
        let mut recipe_obj = template_builder::Recipe::load(recipe)?;
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
        storage::validate_name("template", &tname)?;
        // A rebuild that produced the same image changes nothing (no new revision).
        if let Ok(Some(old)) = self.catalogue().template(&tname) {
            if old.fingerprint == built.fingerprint && self.vols.qube(&tname).is_ok() {
                let mut v = self.template_info(&tname)?;
                v["unchanged"] = json!(true);
                v["cache_hit"] = json!(built.cache_hit);
                return Ok(v);
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
        self.install_root(
            &tname,
            ImageSource::File(&built.image),
            rec,
            built.kernel.as_deref(),
            built.initrd.as_deref(),
        )?;
        let mut v = self.template_info(&tname)?;
        v["cache_hit"] = json!(built.cache_hit);
        Ok(v)
    }

    fn template_list(&self) -> Result<Value> {
        let mut out = Vec::new();
        for q in self.vols.list_qubes()? {
            if q.class != QubeClass::TemplateVM {
                continue;
            }
            let rec = self.catalogue().template(&q.qube)?.unwrap_or_default();
            let root = self.vols.volume_status(&q.qube, "root")?;
            out.push(json!({
                "name": q.qube,
                "origin": rec.origin,
                "size": root.size,
                "usage": root.usage,
                "fingerprint": rec.fingerprint,
                "running": self.vols.is_running(&q.qube)?,
            }));
        }
        Ok(Value::Array(out))
    }

    fn template_info(&self, name: &str) -> Result<Value> {
        let q = self.require_template(name)?;
        let rec = self.catalogue().template(name)?.unwrap_or_default();
        let root = self.vols.volume_status(name, "root")?;
        let users: Vec<String> = self
            .vols
            .list_qubes()?
            .into_iter()
            .filter(|o| o.template.as_deref() == Some(name))
            .map(|o| o.qube)
            .collect();
        Ok(json!({
            "name": q.qube,
            "class": class_name(&q.class),
            "origin": rec.origin,
            "recipe": rec.recipe,
            "recipe_hash": rec.recipe_hash,
            "build_date": rec.build_date,
            "fingerprint": rec.fingerprint,
            "packages": rec.packages,
            "kernel": rec.has_kernel.then(|| self.paths.kernels_dir(name).join("vmlinuz")),
            "kernel_cmdline": if rec.kernel_cmdline.is_empty() { DEFAULT_CMDLINE.to_string() } else { rec.kernel_cmdline.clone() },
            "root_size": root.size,
            "root_usage": root.usage,
            "revisions": root.revisions.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
            "used_by": users,
        }))
    }

    fn template_remove(&mut self, name: &str) -> Result<Value> {
        self.require_template(name)?;
        self.refuse_if_served(name, "remove")?;
        self.remove_with_catalogue(name)?;
        let _ = fs::remove_dir_all(self.paths.kernels_dir(name));
        Ok(json!({"removed": name}))
    }

    fn template_export(&mut self, name: &str, file: &Path) -> Result<Value> {
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
            file,
        )?;
        Ok(json!({"template": name, "file": file, "stats": serde_json::to_value(&stats)?}))
    }

    fn template_import(&mut self, file: &Path, name: Option<String>) -> Result<Value> {
        // Everything is verified before the pool is touched.
        let pkg = template_builder::read_package(file)?;
        let manifest = pkg.manifest().clone();
        let tname = name.unwrap_or_else(|| manifest.name.clone());
        storage::validate_name("template", &tname)?;
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
            reader: Box::new(pkg.image_reader()),
        };
        self.install_root(&tname, source, rec, kernel.as_deref(), initrd.as_deref())?;
        self.template_info(&tname)
    }

    // ---------------------------------------------------------------- qubes

    fn qube_create(
        &mut self,
        name: &str,
        class: &str,
        template: Option<&str>,
        label: Option<&str>,
    ) -> Result<Value> {
        storage::validate_name("qube", name)?;
        let class: QubeClass = class.parse().map_err(|_| {
            anyhow!("class {class:?} is not one of AppVM, DispVM, StandaloneVM, TemplateVM")
        })?;
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
        self.catalogue().set_prefs(name, Some(&prefs))?;
        if let Err(e) = self.vols.create_qube(name, class, template) {
            self.catalogue().set_prefs(name, None)?;
            return Err(e.into());
        }
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
                    self.pool().commit()?;
                }
            }
        }
        self.qube_show(name)
    }

    fn qube_state(&self, name: &str) -> Result<&'static str> {
        if !self.vols.is_running(name)? {
            return Ok("halted");
        }
        // Volumes started; the hypervisor knows whether the guest is paused.
        let rt = self.catalogue().runtime(name)?.unwrap_or_default();
        if rt.hypervisor.is_empty() || rt.hypervisor == "none" {
            return Ok("running");
        }
        let hv = hypervisor::by_name(&rt.hypervisor)?;
        Ok(match hv.state(name, &self.paths.qube_run_dir(name)) {
            Ok(hypervisor::DomainState::Paused) => "paused",
            _ => "running",
        })
    }

    /// `qube pause` / `qube unpause`: the guest stops or resumes; storage is untouched.
    fn qube_pause(&mut self, name: &str, pause: bool) -> Result<Value> {
        self.vols.qube(name)?;
        let rt = self.catalogue().runtime(name)?.unwrap_or_default();
        let hv_name = self
            .served
            .get(name)
            .map(|s| s.hypervisor.clone())
            .unwrap_or(rt.hypervisor);
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

    fn qube_show(&self, name: &str) -> Result<Value> {
        let q = self.vols.qube(name)?;
        let prefs = self.catalogue().prefs(name)?;
        let rt = self.catalogue().runtime(name)?;
        Ok(json!({
            "name": q.qube,
            "class": class_name(&q.class),
            "template": q.template,
            "state": self.qube_state(name)?,
            "label": prefs.label.to_string(),
            "hypervisor": rt.map(|r| r.hypervisor),
            "prefs": prefs,
        }))
    }

    fn qube_list(&self) -> Result<Value> {
        let mut out = Vec::new();
        for q in self.vols.list_qubes()? {
            out.push(self.qube_show(&q.qube)?);
        }
        Ok(Value::Array(out))
    }

    fn qube_remove(&mut self, name: &str) -> Result<Value> {
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
        self.remove_with_catalogue(name)?;
        let _ = fs::remove_dir_all(self.paths.kernels_dir(name));
        let _ = fs::remove_dir_all(self.paths.qube_run_dir(name));
        Ok(json!({"removed": name}))
    }

    fn qube_clone(&mut self, src: &str, dst: &str) -> Result<Value> {
        storage::validate_name("qube", dst)?;
        self.vols.qube(src)?;
        if self.vols.qube(dst).is_ok() {
            bail!("qube {dst} already exists; pick another name for the clone");
        }
        let mut prefs = self.catalogue().prefs(src)?;
        // Addresses are per qube: the clone gets its own at its first start.
        prefs.ip = None;
        let rec = self.catalogue().template(src)?;
        self.catalogue().set_prefs(dst, Some(&prefs))?;
        self.catalogue().set_template(dst, rec.as_ref())?;
        if let Err(e) = self.vols.clone_qube(src, dst) {
            self.catalogue().set_prefs(dst, None)?;
            self.catalogue().set_template(dst, None)?;
            return Err(e.into());
        }
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
        self.qube_show(dst)
    }

    fn qube_prefs(
        &mut self,
        name: &str,
        key: Option<String>,
        value: Option<String>,
    ) -> Result<Value> {
        self.vols.qube(name)?;
        let mut prefs = self.catalogue().prefs(name)?;
        match (key, value) {
            (None, _) => Ok(serde_json::to_value(&prefs)?),
            (Some(k), None) => Ok(json!({ k.clone(): prefs.get(&k)? })),
            (Some(k), Some(v)) => {
                prefs.set(&k, &v)?;
                self.check_network_prefs(name, &prefs)?;
                self.catalogue().set_prefs(name, Some(&prefs))?;
                self.pool().commit()?;
                Ok(json!({ k.clone(): prefs.get(&k)? }))
            }
        }
    }

    /// Qubes' rules: a netvm exists and provides network, chains have no loop, and a
    /// qube others use as their netvm keeps providing it.
    fn check_network_prefs(&self, name: &str, prefs: &QubePrefs) -> Result<()> {
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
    fn network_ip(&mut self, name: &str) -> Result<String> {
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

    /// Removes a qube's volumes and its catalogue records in one commit; if the volume
    /// model refuses (running, in use), the staged catalogue edits are put back so the
    /// next commit does not carry half an operation.
    fn remove_with_catalogue(&mut self, name: &str) -> Result<()> {
        let prefs = self.catalogue().prefs(name)?;
        let rec = self.catalogue().template(name)?;
        self.catalogue().set_prefs(name, None)?;
        self.catalogue().set_template(name, None)?;
        if let Err(e) = self.vols.remove_qube(name) {
            self.catalogue().set_prefs(name, Some(&prefs))?;
            self.catalogue().set_template(name, rec.as_ref())?;
            return Err(e.into());
        }
        Ok(())
    }

    fn refuse_if_served(&self, name: &str, what: &str) -> Result<()> {
        if self.served.contains_key(name) || self.vols.is_running(name)? {
            bail!("cannot {what} {name} while it is running; shut it down first (`qubes-ctl qube shutdown {name}`)");
        }
        Ok(())
    }

    /// The qube whose kernel boots `q` (itself, its template, or its root's source).
    fn kernel_owner(&self, q: &QubeVolumes) -> String {
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

    fn qube_start(&mut self, name: &str, hypervisor: Option<String>) -> Result<Value> {
        let q = self.vols.qube(name)?;
        if self.served.contains_key(name) {
            bail!("{name} is already running");
        }
        if self.vols.is_running(name)? && !self.in_daemon {
            bail!("{name} is marked running; start the daemon (`qubes-ctl daemon`) to pick it up");
        }
        let prefs = self.catalogue().prefs(name)?;
        let hv_name = hypervisor
            .or_else(|| Some(prefs.hypervisor.clone()).filter(|s| !s.is_empty()))
            .unwrap_or_else(|| hypervisor::default_hypervisor().name().to_string());
        let hv = hypervisor::by_name(&hv_name)?;
        let run_dir = self.paths.qube_run_dir(name);
        fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        // As in Qubes, a qube's netvm is started first (with the same hypervisor).
        if let (Some(n), true) = (&prefs.netvm, hv_name != "none") {
            self.check_network_prefs(name, &prefs)?;
            if !self.vols.is_running(n)? {
                self.qube_start(n, Some(hv_name.clone()))
                    .with_context(|| format!("starting {name}'s netvm {n}"))?;
            }
            let nhv = self
                .served
                .get(n)
                .map(|s| s.hypervisor.clone())
                .unwrap_or_default();
            if nhv != hv_name {
                bail!("{name}'s netvm {n} runs on {nhv:?}, not {hv_name}: both must use the same hypervisor");
            }
        }

        self.catalogue().set_runtime(
            name,
            Some(&RuntimeRecord {
                hypervisor: hv_name.clone(),
                started_at: now_secs(),
            }),
        )?;
        let started = match self.vols.start(name) {
            Ok(s) => s,
            Err(e) => {
                self.catalogue().set_runtime(name, None)?;
                return Err(e.into());
            }
        };
        let served = match self.serve(name, &started) {
            Ok(s) => s,
            Err(e) => {
                let _ = self.catalogue().set_runtime(name, None);
                let _ = self.vols.stop(name);
                return Err(e);
            }
        };
        let socket = served.path().to_path_buf();
        if hv_name != "none" {
            let undo = |ctl: &mut Self, served: blkback::NbdServer| {
                let _ = served.shutdown(Duration::from_secs(1));
                let _ = ctl.catalogue().set_runtime(name, None);
                let _ = ctl.vols.stop(name);
            };
            let spec = self
                .domain_spec(&q, &prefs, &started, &socket, &run_dir)
                .and_then(|spec| self.wire_network(name, &prefs, hv.as_ref(), spec));
            let mut spec = match spec {
                Ok(s) => s,
                Err(e) => {
                    undo(self, served);
                    return Err(e);
                }
            };
            if hv_name == "xen" {
                spec.cmdline = xen_cmdline(&spec.cmdline);
            }
            if let Err(e) = hv.start(&spec) {
                if let Some(n) = &prefs.netvm {
                    let _ = hv.detach_client(n, &self.paths.qube_run_dir(n), name);
                }
                undo(self, served);
                return Err(anyhow!(e).context(format!("starting {name} on {hv_name}")));
            }
        }
        self.served.insert(
            name.to_string(),
            Served {
                server: served,
                hypervisor: hv_name.clone(),
            },
        );
        let vols: Vec<Value> = started
            .iter()
            .map(|s| {
                json!({
                    "volume": s.name,
                    "key": s.key,
                    "read_only": s.read_only,
                    "size": s.size,
                    "nbd_uri": blkback::nbd_uri(&socket, &export_name(name, &s.name)),
                })
            })
            .collect();
        Ok(json!({
            "name": name,
            "state": "running",
            "hypervisor": hv_name,
            "console": hv.console_log(&run_dir),
            "volumes": vols,
        }))
    }

    /// Qubes' network for the domain: its address, gateway and MAC on the kernel command
    /// line (`qubes.ip=`, `qubes.gateway=`, `qubes.netvm=1` for a netvm; the guest
    /// integration configures the interfaces from them), and its NIC linked to the netvm.
    fn wire_network(
        &mut self,
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
            // guest integration's udev rule recognises as a client link.
            let backend_mac = format!("fe:16:3e:5e:6c:{last:02x}");
            hv.attach_client(n, &nrun, name, &sock, &backend_mac)
                .with_context(|| format!("connecting {name} to its netvm {n}"))?;
            spec.net.netvm_socket = Some(sock);
        }
        spec.cmdline.push_str(&opts);
        Ok(spec)
    }

    fn serve(&self, name: &str, started: &[StartedVolume]) -> Result<blkback::NbdServer> {
        let mut exports = Vec::new();
        for s in started {
            let device = self.pool().open_volume(&s.key, s.read_only)?;
            exports.push(blkback::Export {
                name: export_name(name, &s.name),
                description: format!("{name}:{} ({})", s.name, s.key),
                device,
            });
        }
        let socket = self.paths.nbd_socket(name);
        blkback::NbdServer::bind_unix(&socket, exports)
            .with_context(|| format!("serving {name}'s volumes on {}", socket.display()))
    }

    fn domain_spec(
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
        let vdevs = ["xvda", "xvdb", "xvdc", "xvdd"];
        let disks = started
            .iter()
            .zip(vdevs)
            .map(|(s, vdev)| hypervisor::DiskSpec {
                vdev: vdev.to_string(),
                nbd_socket: socket.to_path_buf(),
                export: export_name(&q.qube, &s.name),
                read_only: s.read_only,
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
        })
    }

    fn qube_shutdown(&mut self, name: &str, timeout_secs: u64, kill: bool) -> Result<Value> {
        self.vols.qube(name)?;
        let timeout = Duration::from_secs(timeout_secs);
        let run_dir = self.paths.qube_run_dir(name);
        let rt = self.catalogue().runtime(name)?.unwrap_or_default();
        let hv_name = self
            .served
            .get(name)
            .map(|s| s.hypervisor.clone())
            .unwrap_or(rt.hypervisor);
        if !self.vols.is_running(name)? && !self.served.contains_key(name) {
            bail!("{name} is not running");
        }
        if !kill && self.catalogue().prefs(name)?.provides_network {
            let mut clients = Vec::new();
            for q in self.vols.list_qubes()? {
                if q.qube != name
                    && self.vols.is_running(&q.qube)?
                    && self.catalogue().prefs(&q.qube)?.netvm.as_deref() == Some(name)
                {
                    clients.push(q.qube);
                }
            }
            if !clients.is_empty() {
                bail!(
                    "{name} provides network to running qubes {}; shut them down first (or --kill)",
                    clients.join(", ")
                );
            }
        }
        if !hv_name.is_empty() && hv_name != "none" {
            let hv = hypervisor::by_name(&hv_name)?;
            if kill {
                hv.kill(name, &run_dir)?;
            } else {
                hv.shutdown(name, &run_dir, timeout)
                    .with_context(|| format!("shutting down {name}"))?;
            }
        }
        self.stop_storage(name, timeout)?;
        Ok(json!({"name": name, "state": "halted"}))
    }

    /// Waits for the NBD clients to flush and go, then commits the volumes (stop).
    fn stop_storage(&mut self, name: &str, grace: Duration) -> Result<()> {
        let hv_name = match self.served.get(name) {
            Some(s) => s.hypervisor.clone(),
            None => {
                self.catalogue()
                    .runtime(name)?
                    .unwrap_or_default()
                    .hypervisor
            }
        };
        let netvm = self.catalogue().prefs(name)?.netvm;
        if let (Some(n), false) = (netvm, hv_name.is_empty() || hv_name == "none") {
            let nrun = self.paths.qube_run_dir(&n);
            if let Err(e) =
                hypervisor::by_name(&hv_name).and_then(|hv| hv.detach_client(&n, &nrun, name))
            {
                tracing::warn!(qube = name, netvm = %n, "unplugging the link from the netvm: {e}");
            }
            let _ = fs::remove_file(nrun.join(format!("vif-{name}.sock")));
        }
        if let Some(s) = self.served.remove(name) {
            s.server
                .shutdown(grace)
                .with_context(|| format!("closing {name}'s exports"))?;
        }
        self.catalogue().set_runtime(name, None)?;
        self.vols.stop(name)?;
        Ok(())
    }

    fn qube_console(&self, name: &str) -> Result<Value> {
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
        Ok(json!({"name": name, "log": log, "text": text}))
    }

    // ---------------------------------------------------------------- volumes

    fn volume_json(&self, qube: &str, vol: &str) -> Result<Value> {
        let st = self.vols.volume_status(qube, vol)?;
        let mut v = serde_json::to_value(&st)?;
        let uri = self
            .served
            .contains_key(qube)
            .then(|| blkback::nbd_uri(&self.paths.nbd_socket(qube), &export_name(qube, vol)));
        v["nbd_uri"] = json!(uri);
        Ok(v)
    }

    fn volume_info(&self, qube: &str, vol: &str) -> Result<Value> {
        self.volume_json(qube, vol)
    }

    fn volume_list(&self, qube: Option<&str>) -> Result<Value> {
        let qubes: Vec<QubeVolumes> = match qube {
            Some(q) => vec![self.vols.qube(q)?],
            None => self.vols.list_qubes()?,
        };
        let mut out = Vec::new();
        for q in qubes {
            for v in &q.volumes {
                out.push(self.volume_json(&q.qube, &v.name)?);
            }
        }
        Ok(Value::Array(out))
    }

    fn volume_import(&mut self, qube: &str, vol: &str, file: &Path) -> Result<Value> {
        self.refuse_if_served(qube, "import into")?;
        let size = fs::metadata(file)
            .with_context(|| format!("reading {}", file.display()))?
            .len();
        let mut f = fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        let stats = self.vols.import(qube, vol, &mut f, size)?;
        let mut v = self.volume_info(qube, vol)?;
        v["import"] = serde_json::to_value(stats)?;
        Ok(v)
    }

    // ---------------------------------------------------------------- daemon support

    /// Serves again the qubes the pool still marks running (after a daemon crash), at the
    /// same socket paths, so clients that reconnect carry on.
    pub fn resume_running(&mut self) -> Result<Vec<String>> {
        let mut resumed = Vec::new();
        for name in self.vols.running_qubes()? {
            let rt = self.catalogue().runtime(&name)?.unwrap_or_default();
            let started = self.running_volumes(&name)?;
            let server = self.serve(&name, &started)?;
            let hv = if rt.hypervisor.is_empty() {
                "none".to_string()
            } else {
                rt.hypervisor
            };
            self.served.insert(
                name.clone(),
                Served {
                    server,
                    hypervisor: hv,
                },
            );
            resumed.push(name);
        }
        Ok(resumed)
    }

    /// The volumes a qube marked running has in the pool now (after a daemon crash), in
    /// start order, without changing anything: save_on_stop volumes are served from their
    /// running snapshot, the others from the snapshot / fresh volume made at start.
    fn running_volumes(&self, name: &str) -> Result<Vec<StartedVolume>> {
        let q = self.vols.qube(name)?;
        let mut out = Vec::new();
        for v in &q.volumes {
            let key = if v.save_on_stop {
                storage::qubes::run_key(name, &v.name)
            } else {
                storage::qubes::head_key(name, &v.name)
            };
            let info = self.pool().volume(&key).with_context(|| {
                format!("{name} is marked running but its volume {key} is missing; stop it with `qubes-ctl qube shutdown {name} --kill`")
            })?;
            out.push(StartedVolume {
                name: v.name.clone(),
                key,
                read_only: !v.rw,
                size: info.size,
            });
        }
        Ok(out)
    }

    /// Stops the storage of qubes whose domain has gone away (the guest powered off).
    pub fn reap_halted(&mut self) -> Vec<(String, Result<()>)> {
        let mut gone = Vec::new();
        for (name, s) in &self.served {
            if s.hypervisor == "none" {
                continue;
            }
            let Ok(hv) = hypervisor::by_name(&s.hypervisor) else {
                continue;
            };
            if let Ok(hypervisor::DomainState::Halted) =
                hv.state(name, &self.paths.qube_run_dir(name))
            {
                gone.push(name.clone());
            }
        }
        gone.into_iter()
            .map(|n| {
                let r = self.stop_storage(&n, Duration::from_secs(10));
                (n, r)
            })
            .collect()
    }

    pub fn served_qubes(&self) -> Vec<String> {
        self.served.keys().cloned().collect()
    }

    /// Closes exports without stopping the qubes (daemon exit): they stay marked
    /// running and a restarted daemon serves them again.
    pub fn detach_all(&mut self) {
        for (_, s) in std::mem::take(&mut self.served) {
            let _ = s.server.shutdown(Duration::from_secs(2));
        }
        let _ = self.pool().commit();
    }
}

/// Templates record a QEMU command line (virtio disks, serial console); under Xen the
/// same disks are xvd* and the PV console is hvc0.
fn xen_cmdline(cmdline: &str) -> String {
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

/// Where a template's root image comes from.
enum ImageSource<'a> {
    File(&'a Path),
    /// A verified package's chunk stream (no temporary copy of the image).
    Stream {
        what: String,
        size: u64,
        reader: Box<dyn std::io::Read + 'a>,
    },
}

/// NBD export name of a qube's volume: `QUBE/VOLUME`.
pub fn export_name(qube: &str, vol: &str) -> String {
    format!("{qube}/{vol}")
}

fn copy_atomic(src: &Path, dst: &Path) -> Result<()> {
    let tmp: PathBuf = dst.with_extension("tmp");
    fs::copy(src, &tmp)
        .with_context(|| format!("copying {} to {}", src.display(), tmp.display()))?;
    fs::File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, dst)?;
    Ok(())
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

    #[test]
    fn volume_refs() {
        assert_eq!(
            parse_volume_ref("work:private").unwrap(),
            ("work".into(), "private".into())
        );
        assert!(parse_volume_ref("work").is_err());
        assert!(parse_volume_ref("work:swap").is_err());
        assert!(parse_volume_ref("../x:root").is_err());
    }
}
