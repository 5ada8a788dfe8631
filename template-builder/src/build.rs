//! Recipe -> root tree -> reproducible image + kernel/initrd.
//!
//! ```text
//!  recipe ──hash──> cache key ──hit──> cache_dir/builds/KEY/{root.img,vmlinuz,initrd.img,build.json}
//!                      │ miss
//!                      v
//!  bootstrap (mmdebstrap | dnf --installroot)   debs/rpms cached in cache_dir/{debs,dnf}/…
//!  customize: fstab, recipe files, services (symlinks from [Install]), commands (chroot)
//!  cleanup:   resolv.conf, hostname, machine-id, logs, package caches
//!  clamp mtimes to SOURCE_DATE_EPOCH -> mke2fs -d (UUID/hash seed from the recipe hash)
//! ```
//!
//! Contract: the image bytes (and so `fingerprint`) depend on the recipe, the package
//! content the mirror served and nothing else: not on the template name, the host name,
//! the build time or the work directory. The cache key is the recipe hash plus the
//! mirror; a rebuild of an unchanged recipe returns the cached outputs (`cache_hit`).
//! Every tool's output goes, with timestamps, to `work_dir/KEY/build.log`; a failure
//! names the tool and quotes the end of that log.

use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::image::{self, ImageError};
use crate::recipe::{Distribution, Recipe, RecipeError};

/// The Debian project's documented default mirror (the redirector), used when neither the
/// recipe nor the caller names one.
pub const DEBIAN_DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// Fedora's documented metalink, used when neither the recipe nor the caller names a repo.
pub const FEDORA_DEFAULT_METALINK: &str =
    "https://mirrors.fedoraproject.org/metalink?repo=fedora-$releasever&arch=$basearch";

#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Template name; defaults to the recipe's `name`. Does not change the image.
    pub name: Option<String>,
    /// Overrides the recipe's mirror (Debian: archive URL; Fedora: repo baseurl).
    pub mirror: Option<String>,
    /// Package caches and finished builds; kept between builds.
    pub cache_dir: PathBuf,
    /// Scratch space for the root tree and the build log.
    pub work_dir: PathBuf,
    /// Show a progress bar per step on stderr.
    pub progress: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BuiltTemplate {
    pub name: String,
    /// Raw ext4 image.
    pub image: PathBuf,
    pub size: u64,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub kernel_cmdline: String,
    /// `name=version`, sorted.
    pub packages: Vec<String>,
    pub recipe_hash: String,
    /// RFC 3339 UTC time the image was built (not when a cache hit was served).
    pub build_date: String,
    /// blake3 (hex) of the image bytes.
    pub fingerprint: String,
    pub cache_hit: bool,
}

#[derive(Debug, Error)]
pub enum BuildError {
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run {tool}: {source}; install it (scripts/install-deps.sh)")]
    SpawningTool {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}) while {step}; last lines of {log}:\n{tail}")]
    Tool {
        tool: String,
        step: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("recipe {recipe} asks for a kernel but {dir} holds no vmlinuz-*/initrd.img-* (add linux-image-amd64 / kernel-core and an initramfs generator to packages)")]
    NoKernel { recipe: String, dir: PathBuf },
    #[error("service {unit}: {reason}")]
    Service { unit: String, reason: String },
    #[error("path {path} cannot be used: {reason}")]
    BadPath { path: PathBuf, reason: String },
    #[error("recipe {recipe}: removing {removed} would also remove {lost}, which the recipe installs; drop {removed} from remove_packages or {lost} from packages")]
    RemovalConflict {
        recipe: String,
        removed: String,
        lost: String,
    },
    #[error("cached build {path} is unreadable: {reason}; remove that directory to rebuild")]
    BadCache { path: PathBuf, reason: String },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BuildError {
    let path = path.to_path_buf();
    move |source| BuildError::Io { op, path, source }
}

/// Timestamped build log plus one progress line per step.
struct Steps {
    start: Instant,
    log_path: PathBuf,
    log: Arc<Mutex<fs::File>>,
    bar: Option<ProgressBar>,
    total: usize,
    done: usize,
}

impl Steps {
    fn new(log_path: &Path, progress: bool, total: usize) -> Result<Steps, BuildError> {
        let log = fs::File::create(log_path).map_err(io_err("creating build log", log_path))?;
        Ok(Steps {
            start: Instant::now(),
            log_path: log_path.into(),
            log: Arc::new(Mutex::new(log)),
            bar: None,
            total,
            done: 0,
            // progress is applied per step below
        }
        .with_progress(progress))
    }

    fn with_progress(mut self, progress: bool) -> Self {
        if progress {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{pos}/{len}] {msg} ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_length(self.total as u64);
            bar.enable_steady_tick(Duration::from_millis(120));
            self.bar = Some(bar);
        }
        self
    }

    fn line(&self, text: &str) {
        let t = self.start.elapsed().as_secs_f64();
        if let Ok(mut f) = self.log.lock() {
            let _ = writeln!(f, "[{} +{t:8.2}s] {text}", rfc3339(SystemTime::now()));
        }
    }

    fn step(&mut self, what: &str) {
        self.done += 1;
        self.line(&format!("== step {}/{}: {what}", self.done, self.total));
        if let Some(bar) = &self.bar {
            bar.set_position(self.done as u64);
            bar.set_message(what.to_string());
        }
    }

    fn finish(&self, what: &str) {
        self.line(what);
        if let Some(bar) = &self.bar {
            bar.finish_with_message(what.to_string());
        }
    }

    /// Runs a tool, copying its output line by line into the log.
    fn run(&self, mut cmd: Command, step: &str) -> Result<(), BuildError> {
        let tool = cmd.get_program().to_string_lossy().into_owned();
        self.line(&format!("$ {cmd:?}"));
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| BuildError::SpawningTool {
                tool: tool.clone(),
                source,
            })?;
        let tail = Arc::new(Mutex::new(VecDeque::<String>::new()));
        let pumps: Vec<_> = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        .map(|stream| {
            let log = self.log.clone();
            let tail = tail.clone();
            let start = self.start;
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Ok(mut f) = log.lock() {
                        let _ = writeln!(f, "[+{:8.2}s]   {line}", start.elapsed().as_secs_f64());
                    }
                    if let Ok(mut t) = tail.lock() {
                        if t.len() == 25 {
                            t.pop_front();
                        }
                        t.push_back(line);
                    }
                }
            })
        })
        .collect();
        let status = child.wait().map_err(|source| BuildError::SpawningTool {
            tool: tool.clone(),
            source,
        })?;
        for p in pumps {
            let _ = p.join();
        }
        if !status.success() {
            let tail = tail
                .lock()
                .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
                .unwrap_or_default();
            return Err(BuildError::Tool {
                tool,
                step: step.into(),
                status: status.to_string(),
                log: self.log_path.clone(),
                tail,
            });
        }
        Ok(())
    }
}

/// RFC 3339 UTC, second precision, without a date crate.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The mirror a build uses: the caller's, the recipe's, or the distribution's default.
pub fn effective_mirror(recipe: &Recipe, opts: &BuildOptions) -> String {
    opts.mirror
        .clone()
        .or_else(|| recipe.mirror.clone())
        .unwrap_or_else(|| match recipe.distribution {
            Distribution::Debian => DEBIAN_DEFAULT_MIRROR.into(),
            Distribution::Fedora => FEDORA_DEFAULT_METALINK.into(),
        })
}

fn cache_key(recipe_hash: &str, mirror: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"qubes-template-build v1\0");
    h.update(recipe_hash.as_bytes());
    h.update(b"\0");
    h.update(mirror.as_bytes());
    h.finalize().to_hex()[..32].to_string()
}

fn no_whitespace(p: &Path) -> Result<(), BuildError> {
    if p.to_string_lossy().contains(char::is_whitespace) {
        return Err(BuildError::BadPath {
            path: p.into(),
            reason: "mmdebstrap hooks split on whitespace".into(),
        });
    }
    Ok(())
}

/// Held for the duration of a build so two builds of the same key do not race.
struct KeyLock(#[allow(dead_code)] fs::File);

fn lock_key(path: &Path) -> Result<KeyLock, BuildError> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err("opening lock", path))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).map_err(|e| {
        BuildError::Io {
            op: "locking",
            path: path.into(),
            source: e.into(),
        }
    })?;
    Ok(KeyLock(f))
}

fn load_cached(dir: &Path, name: &str) -> Result<Option<BuiltTemplate>, BuildError> {
    let meta = dir.join("build.json");
    let Ok(text) = fs::read_to_string(&meta) else {
        return Ok(None);
    };
    let mut t: BuiltTemplate = serde_json::from_str(&text).map_err(|e| BuildError::BadCache {
        path: dir.into(),
        reason: e.to_string(),
    })?;
    let size_ok = fs::metadata(&t.image)
        .map(|m| m.len() == t.size)
        .unwrap_or(false);
    let blobs_ok = [&t.kernel, &t.initrd]
        .iter()
        .all(|p| p.as_ref().is_none_or(|p| p.exists()));
    if !size_ok || !blobs_ok {
        return Ok(None);
    }
    t.name = name.into();
    t.cache_hit = true;
    Ok(Some(t))
}

/// Unmounts anything still mounted under `root` (a crashed earlier build), deepest first.
fn unmount_under(root: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let root = root.to_string_lossy().to_string();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|p| p == &root || p.starts_with(&format!("{root}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").arg("-l").arg(&p).status();
    }
}

fn remove_tree(root: &Path) -> Result<(), BuildError> {
    unmount_under(root);
    match fs::remove_dir_all(root) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BuildError::Io {
            op: "removing old tree",
            path: root.into(),
            source: e,
        }),
    }
}

/// Builds (or fetches from the cache) the template described by `recipe`.
pub fn build(recipe: &Recipe, opts: &BuildOptions) -> Result<BuiltTemplate, BuildError> {
    let name = opts.name.clone().unwrap_or_else(|| recipe.name.clone());
    let recipe_hash = recipe.hash();
    let mirror = effective_mirror(recipe, opts);
    let key = cache_key(&recipe_hash, &mirror);
    let cache_dir =
        std::path::absolute(&opts.cache_dir).map_err(io_err("resolving", &opts.cache_dir))?;
    let work_dir =
        std::path::absolute(&opts.work_dir).map_err(io_err("resolving", &opts.work_dir))?;
    let builds = cache_dir.join("builds");
    fs::create_dir_all(&builds).map_err(io_err("creating", &builds))?;
    let out_dir = builds.join(&key);
    let _lock = lock_key(&builds.join(format!("{key}.lock")))?;
    if let Some(hit) = load_cached(&out_dir, &name)? {
        return Ok(hit);
    }

    let work = work_dir.join(&key);
    fs::create_dir_all(&work).map_err(io_err("creating", &work))?;
    let tree = work.join("root");
    remove_tree(&tree)?;
    let mut steps = Steps::new(&work.join("build.log"), opts.progress, 6)?;
    steps.line(&format!(
        "recipe {} ({}), hash {recipe_hash}, mirror {mirror}",
        recipe.name,
        recipe.path.display()
    ));

    match recipe.distribution {
        Distribution::Debian => {
            steps.step("bootstrap (mmdebstrap)");
            bootstrap_debian(recipe, &mirror, &cache_dir, &tree, &steps)?;
        }
        Distribution::Fedora => {
            steps.step("bootstrap (dnf --installroot)");
            bootstrap_fedora(recipe, &mirror, &cache_dir, &work, &tree, &steps)?;
        }
    }
    remove_packages(recipe, &work, &tree, &steps)?;
    steps.step("customize (files, services, commands)");
    customize(recipe, &tree, &steps)?;
    let packages = list_packages(recipe.distribution, &tree, &steps)?;
    cleanup(&tree)?;

    steps.step("image (mke2fs -d)");
    fs::create_dir_all(&out_dir).map_err(io_err("creating", &out_dir))?;
    image::clamp_tree_times(&tree, recipe.source_date_epoch)?;
    let img = out_dir.join("root.img");
    let tmp_img = out_dir.join("root.img.tmp");
    image::make_ext4(
        &tree,
        &tmp_img,
        recipe.image_size,
        &recipe_hash,
        recipe.source_date_epoch,
    )?;

    steps.step("kernel and initrd");
    let (kernel, initrd) = if recipe.kernel {
        extract_kernel(recipe, &tree, &out_dir)?
    } else {
        (None, None)
    };

    steps.step("fingerprint");
    let fingerprint = image::fingerprint_file(&tmp_img)?;
    fs::rename(&tmp_img, &img).map_err(io_err("renaming image", &tmp_img))?;
    let built = BuiltTemplate {
        name,
        image: img,
        size: recipe.image_size,
        kernel,
        initrd,
        kernel_cmdline: recipe.kernel_cmdline.clone(),
        packages,
        recipe_hash,
        build_date: rfc3339(SystemTime::now()),
        fingerprint,
        cache_hit: false,
    };
    let meta = out_dir.join("build.json");
    let tmp_meta = out_dir.join("build.json.tmp");
    fs::write(
        &tmp_meta,
        serde_json::to_vec_pretty(&built).expect("serialises"),
    )
    .map_err(io_err("writing", &tmp_meta))?;
    fs::rename(&tmp_meta, &meta).map_err(io_err("renaming", &tmp_meta))?;

    steps.step("removing the work tree");
    remove_tree(&tree)?;
    steps.finish(&format!(
        "built {} ({}), fingerprint {}",
        built.name,
        recipe.name,
        &built.fingerprint[..16]
    ));
    Ok(built)
}

fn bootstrap_debian(
    recipe: &Recipe,
    mirror: &str,
    cache_dir: &Path,
    tree: &Path,
    steps: &Steps,
) -> Result<(), BuildError> {
    let debs = cache_dir
        .join("debs")
        .join(format!("debian-{}-{}", recipe.release, recipe.architecture));
    fs::create_dir_all(&debs).map_err(io_err("creating", &debs))?;
    no_whitespace(&debs)?;
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg(format!("--variant={}", recipe.variant))
        .arg("--components=main")
        .arg(format!("--architectures={}", recipe.architecture))
        .arg("--mode=root")
        // The .debs of earlier builds are synced in before download and out after
        // install (apt skips what is already in archives/ with the right hash).
        .arg("--skip=essential/unlink")
        .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/")
        .arg(format!(
            "--setup-hook=sync-in {} /var/cache/apt/archives/",
            debs.display()
        ))
        .arg(format!(
            "--customize-hook=sync-out /var/cache/apt/archives {}",
            debs.display()
        ));
    if !recipe.packages.is_empty() {
        cmd.arg(format!("--include={}", recipe.packages.join(",")));
    }
    cmd.arg(&recipe.release).arg(tree).arg(mirror);
    cmd.env("SOURCE_DATE_EPOCH", recipe.source_date_epoch.to_string())
        .env("LC_ALL", "C.UTF-8");
    steps.run(
        cmd,
        &format!("bootstrapping with mmdebstrap from {mirror} (another mirror: --mirror URL)"),
    )
}

fn bootstrap_fedora(
    recipe: &Recipe,
    mirror: &str,
    cache_dir: &Path,
    work: &Path,
    tree: &Path,
    steps: &Steps,
) -> Result<(), BuildError> {
    let repos = work.join("repos.d");
    let _ = fs::remove_dir_all(&repos);
    fs::create_dir_all(&repos).map_err(io_err("creating", &repos))?;
    for k in recipe.gpg_keys.iter().filter(|k| !k.contains("://")) {
        if !Path::new(k).is_file() {
            return Err(BuildError::BadPath {
                path: k.into(),
                reason: "GPG key not found (on Debian: apt install distribution-gpg-keys)".into(),
            });
        }
    }
    let url_key = if mirror.contains("metalink") {
        "metalink"
    } else {
        "baseurl"
    };
    let mut repo =
        format!("[tb-fedora]\nname=template repository\n{url_key}={mirror}\nenabled=1\n");
    if recipe.gpg_keys.is_empty() {
        repo.push_str("gpgcheck=0\n");
    } else {
        let keys: Vec<String> = recipe
            .gpg_keys
            .iter()
            .map(|k| {
                if k.contains("://") {
                    k.clone()
                } else {
                    format!("file://{k}")
                }
            })
            .collect();
        repo.push_str(&format!(
            "gpgcheck=1\nrepo_gpgcheck=0\ngpgkey={}\n",
            keys.join(" ")
        ));
    }
    let repo_file = repos.join("tb-fedora.repo");
    fs::write(&repo_file, repo).map_err(io_err("writing", &repo_file))?;
    let dnf_cache = cache_dir
        .join("dnf")
        .join(format!("fedora-{}-{}", recipe.release, recipe.architecture));
    fs::create_dir_all(&dnf_cache).map_err(io_err("creating", &dnf_cache))?;
    // dnf prefixes cachedir with the installroot, so the shared package cache is
    // bind-mounted at the root's default cachedir for the install.
    let root_cache = tree.join("var/cache/dnf");
    fs::create_dir_all(&root_cache).map_err(io_err("creating", &root_cache))?;
    let mut bind = Command::new("mount");
    bind.arg("--bind").arg(&dnf_cache).arg(&root_cache);
    steps.run(bind, "mounting the dnf package cache")?;
    let _unbind = Unmount(root_cache.clone());
    let mut cmd = dnf_in(recipe, work, tree, &repos)?;
    cmd.arg("--setopt=keepcache=True")
        .arg("--setopt=install_weak_deps=False")
        // An unreachable mirror is the error, not "no match for argument".
        .arg("--setopt=skip_if_unavailable=False")
        .arg("--setopt=tsflags=nodocs")
        .arg("--repo=tb-fedora")
        .arg("install")
        .args(&recipe.packages);
    steps.run(
        cmd,
        &format!("installing packages with dnf from {mirror} (another mirror: --mirror URL)"),
    )
}

/// Purges `remove_packages` that the bootstrap brought in anyway (as dependencies, or
/// with the base variant): the list filter alone cannot keep those out. The package
/// manager removes what depends on them too; if that would take a package the recipe
/// installs, the build stops and names both.
fn remove_packages(
    recipe: &Recipe,
    work: &Path,
    tree: &Path,
    steps: &Steps,
) -> Result<(), BuildError> {
    if recipe.remove_packages.is_empty() {
        return Ok(());
    }
    let names = |pkgs: &[String]| -> std::collections::BTreeSet<String> {
        pkgs.iter()
            .filter_map(|p| p.split('=').next())
            .map(str::to_string)
            .collect()
    };
    let before = names(&list_packages(recipe.distribution, tree, steps)?);
    let present: Vec<&String> = recipe
        .remove_packages
        .iter()
        .filter(|p| before.contains(*p))
        .collect();
    if present.is_empty() {
        steps.line("remove_packages: none of them is installed");
        return Ok(());
    }
    let wanted = names(&recipe.packages);
    match recipe.distribution {
        Distribution::Debian => {
            let mounts = ChrootMounts::new(tree, steps)?;
            let mut cmd = in_chroot(recipe, tree);
            cmd.args(["apt-get", "-y", "--purge", "remove"])
                .args(&present);
            // Simulate first: a removal that drags out a wanted package fails before
            // anything changes.
            let mut sim = Command::new("chroot");
            sim.arg(tree)
                .args(["apt-get", "-s", "--purge", "remove"])
                .args(&present)
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .env("LC_ALL", "C.UTF-8");
            steps.line(&format!("$ {sim:?}"));
            let out = sim.output().map_err(|source| BuildError::SpawningTool {
                tool: "chroot apt-get".into(),
                source,
            })?;
            let plan = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                let text = format!("{plan}{}", String::from_utf8_lossy(&out.stderr));
                steps.line(&text);
                let lines: Vec<&str> = text.lines().collect();
                return Err(BuildError::Tool {
                    tool: "apt-get".into(),
                    step: format!("planning the removal of {}", join(&present)),
                    status: out.status.to_string(),
                    log: steps.log_path.clone(),
                    tail: lines[lines.len().saturating_sub(12)..].join("\n"),
                });
            }
            // "Purg NAME [VERSION]" / "Remv NAME [VERSION]" lines.
            for l in plan.lines() {
                let mut w = l.split_whitespace();
                if let (Some("Purg" | "Remv"), Some(name)) = (w.next(), w.next()) {
                    let name = name.split(':').next().unwrap_or(name);
                    if wanted.contains(name) {
                        return Err(BuildError::RemovalConflict {
                            recipe: recipe.name.clone(),
                            removed: join(&present),
                            lost: name.to_string(),
                        });
                    }
                }
            }
            steps.run(cmd, "removing remove_packages with apt-get")?;
            drop(mounts);
        }
        Distribution::Fedora => {
            let no_repos = work.join("no-repos");
            fs::create_dir_all(&no_repos).map_err(io_err("creating", &no_repos))?;
            let mut cmd = dnf_in(recipe, work, tree, &no_repos)?;
            cmd.arg("--setopt=protected_packages=")
                .arg("--setopt=clean_requirements_on_remove=False")
                .arg("remove")
                .args(&present);
            steps.run(cmd, "removing remove_packages with dnf")?;
        }
    }
    let after = names(&list_packages(recipe.distribution, tree, steps)?);
    if let Some(lost) = wanted
        .iter()
        .find(|p| before.contains(*p) && !after.contains(*p))
    {
        return Err(BuildError::RemovalConflict {
            recipe: recipe.name.clone(),
            removed: join(&present),
            lost: lost.clone(),
        });
    }
    if let Some(still) = present.iter().find(|p| after.contains(p.as_str())) {
        return Err(BuildError::BadPath {
            path: recipe.path.clone(),
            reason: format!("remove_packages: {still} is still installed after the removal"),
        });
    }
    steps.line(&format!("removed {}", join(&present)));
    Ok(())
}

fn join(pkgs: &[&String]) -> String {
    pkgs.iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `chroot TREE` with a clean, reproducible environment; the caller adds the command.
fn in_chroot(recipe: &Recipe, tree: &Path) -> Command {
    let mut cmd = Command::new("chroot");
    cmd.arg(tree)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LC_ALL", "C.UTF-8")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("SOURCE_DATE_EPOCH", recipe.source_date_epoch.to_string());
    cmd
}

/// `dnf -y` acting on the image tree, with the recipe's release, repositories from
/// `repos_dir`, the rpm database where Fedora keeps it and SOURCE_DATE_EPOCH.
fn dnf_in(
    recipe: &Recipe,
    work: &Path,
    tree: &Path,
    repos_dir: &Path,
) -> Result<Command, BuildError> {
    let mut cmd = Command::new("dnf");
    cmd.arg("-y")
        .arg("--installroot")
        .arg(tree)
        .arg("--releasever")
        .arg(&recipe.release)
        .arg(format!("--setopt=reposdir={}", repos_dir.display()));
    cmd.env("SOURCE_DATE_EPOCH", recipe.source_date_epoch.to_string())
        .env("LC_ALL", "C.UTF-8")
        .env("HOME", rpm_home(work)?);
    Ok(cmd)
}

/// Where Fedora keeps its rpm database. Hosts' rpm may default elsewhere (Debian's rpm
/// uses ~/.rpmdb), so dnf and rpm are pointed here explicitly.
const RPM_DBPATH: &str = "/usr/lib/sysimage/rpm";

/// A HOME for dnf whose ~/.rpmmacros sets the database path (dnf has no option for it).
fn rpm_home(work: &Path) -> Result<PathBuf, BuildError> {
    let home = work.join("rpm-home");
    fs::create_dir_all(&home).map_err(io_err("creating", &home))?;
    let macros = home.join(".rpmmacros");
    fs::write(&macros, format!("%_dbpath {RPM_DBPATH}\n")).map_err(io_err("writing", &macros))?;
    Ok(home)
}

/// Unmounts a path when dropped (lazy, so a busy mount never blocks the error path).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

const FSTAB: &str = "\
# Root comes from the kernel command line (root=/dev/vda or /dev/xvda); /rw, /home and
# swap on the volatile disk are set up at boot by qubes-guest-setup.service.
LABEL=root / ext4 defaults 0 0
";

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), BuildError> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    }
    // A package may ship a symlink (resolv.conf, say): never write through it.
    if fs::symlink_metadata(path).is_ok() {
        fs::remove_file(path).map_err(io_err("replacing", path))?;
    }
    fs::write(path, bytes).map_err(io_err("writing", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
}

fn in_tree(tree: &Path, dest: &str) -> PathBuf {
    tree.join(dest.trim_start_matches('/'))
}

fn customize(recipe: &Recipe, tree: &Path, steps: &Steps) -> Result<(), BuildError> {
    write_file(&in_tree(tree, "/etc/fstab"), FSTAB.as_bytes(), 0o644)?;
    for f in &recipe.files {
        let bytes = fs::read(&f.src).map_err(io_err("reading recipe file", &f.src))?;
        if blake3::hash(&bytes).to_hex().as_str() != f.content_hash {
            return Err(BuildError::BadPath {
                path: f.src.clone(),
                reason: "changed since the recipe was loaded (load the recipe again)".into(),
            });
        }
        steps.line(&format!(
            "install {} -> {} ({:o})",
            f.src.display(),
            f.dest,
            f.mode
        ));
        write_file(&in_tree(tree, &f.dest), &bytes, f.mode)?;
    }
    for unit in &recipe.services {
        enable_service(tree, unit, steps)?;
    }
    if !recipe.commands.is_empty() {
        let mounts = ChrootMounts::new(tree, steps)?;
        for c in &recipe.commands {
            let mut cmd = in_chroot(recipe, tree);
            cmd.args(["/bin/sh", "-ec", c]);
            steps.run(cmd, &format!("running recipe command {c:?} in the image"))?;
        }
        drop(mounts);
    }
    Ok(())
}

/// /proc, /sys and /dev inside the tree while recipe commands run; unmounted on drop.
struct ChrootMounts(Vec<PathBuf>);

impl ChrootMounts {
    fn new(tree: &Path, steps: &Steps) -> Result<ChrootMounts, BuildError> {
        let mut m = ChrootMounts(Vec::new());
        for (fstype, src, dir) in [
            ("proc", "proc", "proc"),
            ("sysfs", "sysfs", "sys"),
            ("bind", "/dev", "dev"),
        ] {
            let target = tree.join(dir);
            fs::create_dir_all(&target).map_err(io_err("creating", &target))?;
            let mut cmd = Command::new("mount");
            if fstype == "bind" {
                cmd.arg("--rbind");
            } else {
                cmd.args(["-t", fstype]);
            }
            cmd.arg(src).arg(&target);
            steps.run(cmd, "mounting for recipe commands")?;
            m.0.push(target);
        }
        Ok(m)
    }
}

impl Drop for ChrootMounts {
    fn drop(&mut self) {
        for t in self.0.iter().rev() {
            let _ = Command::new("umount").arg("-R").arg("-l").arg(t).status();
        }
    }
}

/// `systemctl enable` without systemctl: the symlinks its [Install] section asks for.
fn enable_service(tree: &Path, unit: &str, steps: &Steps) -> Result<(), BuildError> {
    let bad = |reason: String| BuildError::Service {
        unit: unit.into(),
        reason,
    };
    if unit.contains('/') || !unit.contains('.') {
        return Err(bad("give a unit file name such as foo.service".into()));
    }
    let dirs = [
        "etc/systemd/system",
        "usr/lib/systemd/system",
        "lib/systemd/system",
    ];
    let found = dirs
        .iter()
        .map(|d| format!("{d}/{unit}"))
        .find(|rel| tree.join(rel).is_file());
    let Some(rel) = found else {
        return Err(bad(format!(
            "no unit file in the image under /{}",
            dirs.join(", /")
        )));
    };
    let text =
        fs::read_to_string(tree.join(&rel)).map_err(io_err("reading unit", &tree.join(&rel)))?;
    let mut section = String::new();
    let mut links = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line.to_string();
            continue;
        }
        if section != "[Install]" {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        for target in v.split_whitespace() {
            match k.trim() {
                "WantedBy" => links.push(format!("etc/systemd/system/{target}.wants/{unit}")),
                "RequiredBy" => links.push(format!("etc/systemd/system/{target}.requires/{unit}")),
                "Alias" => links.push(format!("etc/systemd/system/{target}")),
                _ => {}
            }
        }
    }
    if links.is_empty() {
        return Err(bad(
            "its [Install] section names no WantedBy=, RequiredBy= or Alias=".into(),
        ));
    }
    for link in links {
        let path = tree.join(&link);
        if let Some(d) = path.parent() {
            fs::create_dir_all(d).map_err(io_err("creating", d))?;
        }
        let _ = fs::remove_file(&path);
        std::os::unix::fs::symlink(format!("/{rel}"), &path).map_err(io_err("linking", &path))?;
        steps.line(&format!("enable {unit}: /{link} -> /{rel}"));
    }
    Ok(())
}

fn list_packages(
    dist: Distribution,
    tree: &Path,
    steps: &Steps,
) -> Result<Vec<String>, BuildError> {
    let mut cmd = match dist {
        Distribution::Debian => {
            let mut c = Command::new("dpkg-query");
            c.arg(format!(
                "--admindir={}",
                tree.join("var/lib/dpkg").display()
            ))
            .args(["-W", "-f", "${db:Status-Abbrev}${Package}=${Version}\\n"]);
            c
        }
        Distribution::Fedora => {
            let mut c = Command::new("rpm");
            c.arg("--root")
                .arg(tree)
                .arg("--dbpath")
                .arg(RPM_DBPATH)
                .args(["-qa", "--qf", "ii %{NAME}=%{VERSION}-%{RELEASE}\\n"]);
            c
        }
    };
    let tool = format!("{:?}", cmd.get_program());
    steps.line(&format!("$ {cmd:?}"));
    let out = cmd.output().map_err(|source| BuildError::SpawningTool {
        tool: tool.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(BuildError::Tool {
            tool,
            step: "listing installed packages".into(),
            status: out.status.to_string(),
            log: steps.log_path.clone(),
            tail: String::from_utf8_lossy(&out.stderr).into(),
        });
    }
    let mut pkgs: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("ii ").map(|p| p.trim().to_string()))
        .collect();
    pkgs.sort();
    Ok(pkgs)
}

/// Removes what differs between two builds of the same package set (or leaks the host).
fn cleanup(tree: &Path) -> Result<(), BuildError> {
    write_file(&in_tree(tree, "/etc/hostname"), b"localhost\n", 0o644)?;
    write_file(
        &in_tree(tree, "/etc/resolv.conf"),
        b"# Written at boot by the qube's network configuration.\n",
        0o644,
    )?;
    // Empty, not absent: systemd then generates the id at first boot of each qube.
    write_file(&in_tree(tree, "/etc/machine-id"), b"", 0o444)?;
    for rel in [
        "var/lib/dbus/machine-id",
        "var/log/dpkg.log",
        "var/log/alternatives.log",
        "var/log/apt/history.log",
        "var/log/apt/term.log",
        "var/log/apt/eipp.log.xz",
        "var/log/dnf.log",
        "var/log/dnf.librepo.log",
        "var/log/dnf.rpm.log",
        "var/log/hawkey.log",
        "var/cache/ldconfig/aux-cache",
        "var/lib/systemd/random-seed",
    ] {
        let p = tree.join(rel);
        if fs::symlink_metadata(&p).is_ok() {
            fs::remove_file(&p).map_err(io_err("removing", &p))?;
        }
    }
    for rel in [
        "var/cache/apt",
        "var/cache/dnf",
        "var/lib/dnf/history.sqlite",
        "var/lib/dnf/history.sqlite-shm",
        "var/lib/dnf/history.sqlite-wal",
        "tmp",
        "var/tmp",
    ] {
        let p = tree.join(rel);
        let Ok(md) = fs::symlink_metadata(&p) else {
            continue;
        };
        if md.is_dir() {
            for e in fs::read_dir(&p).map_err(io_err("listing", &p))? {
                let e = e.map_err(io_err("listing", &p))?.path();
                let r = if e.is_dir() && !e.is_symlink() {
                    fs::remove_dir_all(&e)
                } else {
                    fs::remove_file(&e)
                };
                r.map_err(io_err("removing", &e))?;
            }
        } else {
            fs::remove_file(&p).map_err(io_err("removing", &p))?;
        }
    }
    Ok(())
}

fn extract_kernel(
    recipe: &Recipe,
    tree: &Path,
    out: &Path,
) -> Result<(Option<PathBuf>, Option<PathBuf>), BuildError> {
    let boot = tree.join("boot");
    let newest = |prefixes: &[&str]| -> Option<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(&boot)
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                let n = p
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default();
                prefixes.iter().any(|pre| n.starts_with(pre)) && !n.ends_with(".old") && p.is_file()
            })
            .collect();
        v.sort();
        v.pop()
    };
    let no_kernel = || BuildError::NoKernel {
        recipe: recipe.name.clone(),
        dir: boot.clone(),
    };
    let k = newest(&["vmlinuz-"]).ok_or_else(no_kernel)?;
    let i = newest(&["initrd.img-", "initramfs-"]).ok_or_else(no_kernel)?;
    let (kout, iout) = (out.join("vmlinuz"), out.join("initrd.img"));
    fs::copy(&k, &kout).map_err(io_err("copying kernel", &k))?;
    fs::copy(&i, &iout).map_err(io_err("copying initrd", &i))?;
    Ok((Some(kout), Some(iout)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(1_704_067_200)),
            "2024-01-01T00:00:00Z"
        );
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn keys_depend_on_mirror() {
        assert_ne!(cache_key("h", "a"), cache_key("h", "b"));
    }
}
