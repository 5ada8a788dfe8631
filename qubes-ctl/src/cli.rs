//! Command line: parses arguments into a [`Request`], sends it to the daemon (or runs it
//! in-process when no daemon owns the pool) and prints the answer as a table or as JSON.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::Value;

use crate::api::{self, Reply, Request};
use crate::controller::{self, parse_volume_ref, Controller, InitOptions};
use crate::paths::Paths;
use crate::repo::{repo_args, InstallMode, RepoAction};
use crate::units::{human_size, parse_size};

#[derive(Parser, Debug)]
#[command(
    name = "qubes-ctl",
    version,
    about = "Templates, qubes and their copy-on-write volumes"
)]
pub struct Cli {
    /// Where the pool, kernels, cache and run files live.
    #[arg(long, global = true, env = "QUBES_CTL_ROOT")]
    pub root: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Format::Human)]
    pub format: Format,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// The storage pool.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Templates (TemplateVMs): build from a recipe, create from an image, export/import.
    #[command(subcommand)]
    Template(TemplateCmd),
    /// Qubes.
    #[command(subcommand)]
    Qube(QubeCmd),
    /// Volumes of qubes, written QUBE:VOLUME (root, private, volatile).
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// The daemon that owns the pool while qubes run.
    Daemon {
        #[command(subcommand)]
        action: Option<DaemonCmd>,
    },
}

#[derive(Subcommand, Debug)]
pub enum PoolCmd {
    /// Create the pool.
    Init {
        /// Data chunk size, 4K to 1M (power of two).
        #[arg(long, default_value = "64K")]
        chunk_size: String,
        /// Data capacity (default: 95% of the filesystem's free space).
        #[arg(long)]
        size: Option<String>,
        /// thin (default) or reflink (files on XFS/btrfs).
        #[arg(long, default_value = "thin")]
        driver: String,
    },
    /// Capacity, usage, chunk size, volume count, commit generation.
    Info,
    /// Walk every structure, recompute refcounts and checksums.
    Verify,
}

#[derive(Subcommand, Debug)]
pub enum TemplateCmd {
    /// Build a template from a recipe (recipes/debian/minimal.toml, ...).
    Build {
        recipe: PathBuf,
        #[arg(long)]
        name: Option<String>,
        /// Package mirror (default: the recipe's, i.e. the distribution's official one).
        #[arg(long, env = "QUBES_CTL_MIRROR")]
        mirror: Option<String>,
    },
    /// Create a template from a raw disk image (any OS, e.g. a Windows HVM).
    Create {
        name: String,
        #[arg(long)]
        from_image: PathBuf,
    },
    /// Templates with their origin, size and fingerprint (`--available`: in repositories).
    List {
        #[arg(long)]
        available: bool,
        /// Repository URL or directory (instead of the configured sources).
        #[arg(long)]
        repo: Vec<String>,
    },
    /// Recipe hash, packages, build date, fingerprint, kernel, revisions, users.
    Info {
        name: String,
        #[arg(long)]
        available: bool,
        #[arg(long)]
        repo: Vec<String>,
    },
    /// Signed template repositories: keys, publishing, trusted keys, sources.
    #[command(subcommand)]
    Repo(crate::repo::RepoCmd),
    /// Install NAME or NAME-VERSION from a signed repository (newest by default).
    Install {
        spec: String,
        #[arg(long)]
        repo: Vec<String>,
    },
    /// Upgrade one (or every) repository template, fetching only the changed chunks.
    Upgrade {
        name: Option<String>,
        #[arg(long)]
        repo: Vec<String>,
    },
    /// Install an older version (NAME, or NAME-VERSION) of a repository template.
    Downgrade {
        spec: String,
        #[arg(long)]
        allow_downgrade: bool,
        #[arg(long)]
        repo: Vec<String>,
    },
    /// Fetch and install the installed version again (repairs a modified template).
    Reinstall {
        name: String,
        #[arg(long)]
        repo: Vec<String>,
    },
    /// Remove a template no qube uses any more.
    Remove { name: String },
    /// Write a portable, verified template package.
    Export { name: String, file: PathBuf },
    /// Import a template package (verified before anything is written).
    Import {
        file: PathBuf,
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum QubeCmd {
    /// Create a qube (AppVM on a template by default).
    Create {
        name: String,
        #[arg(long, default_value = "AppVM")]
        class: String,
        #[arg(long)]
        template: Option<String>,
        #[arg(long)]
        label: Option<String>,
    },
    /// Qubes with class, state, label and template.
    List,
    /// Remove a halted qube and its volumes (revisions included).
    Remove { name: String },
    /// Copy a qube (O(1) snapshots of its volumes).
    Clone { src: String, dst: String },
    /// Show or set properties: `qube prefs work`, `qube prefs work memory 800`.
    Prefs {
        name: String,
        key: Option<String>,
        value: Option<String>,
    },
    /// Snapshot and export its volumes, then boot the domain.
    Start {
        name: String,
        /// xen | qemu | none (default: xen where /proc/xen exists, else qemu).
        #[arg(long)]
        hypervisor: Option<String>,
    },
    /// Shut the domain down, close its exports, commit private as a new revision.
    Shutdown {
        name: String,
        /// Seconds to wait for a clean shutdown before giving up.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Kill the domain instead of asking it to shut down.
        #[arg(long)]
        kill: bool,
    },
    /// Print the qube's serial console log.
    Console { name: String },
    /// Freeze a running qube's vCPUs (its volumes stay exported).
    Pause { name: String },
    /// Resume a paused qube.
    Unpause { name: String },
}

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Volumes of one qube or of all: size, usage, dirty flag, revisions.
    List { qube: Option<String> },
    /// One volume: size, usage, dirty, revisions, source, NBD URI while running.
    Info { volume: String },
    /// Make a revision the head again (default: the newest); the head is kept as a revision.
    Revert {
        volume: String,
        revision: Option<String>,
    },
    /// Grow a volume (or shrink it, with --allow-shrink).
    Resize {
        volume: String,
        size: String,
        #[arg(long)]
        allow_shrink: bool,
    },
    /// Replace the volume's content with a raw image (`-` for stdin).
    Import { volume: String, file: String },
    /// Write the volume's content as a raw image (`-` for stdout).
    Export { volume: String, file: String },
    /// Set a volume property: `volume config work:private revisions_to_keep 3`.
    Config {
        volume: String,
        key: String,
        value: String,
    },
    /// Drop the uncommitted writes of a dirty volume (left by a crash).
    Discard { volume: String },
}

#[derive(Subcommand, Debug, Clone, Copy)]
pub enum DaemonCmd {
    /// Run in the foreground (default).
    Run,
    /// Start in the background and return once it answers.
    Start,
    /// Stop it; running qubes stay marked running and are served again by the next daemon.
    Stop,
    Status,
}

pub fn main_with(cli: Cli) -> Result<()> {
    let paths = Paths::new(cli.root.clone().unwrap_or_else(Paths::default_root));
    let format = cli.format;
    let (req, mutating) = match cli.cmd {
        Cmd::Pool(PoolCmd::Init {
            chunk_size,
            size,
            driver,
        }) => {
            if crate::daemon::is_running(&paths) {
                bail!(
                    "a daemon owns the pool at {}; stop it first",
                    paths.root().display()
                );
            }
            let opts = InitOptions {
                driver,
                chunk_size: parse_size(&chunk_size)?,
                capacity: size.as_deref().map(parse_size).transpose()?,
            };
            let v = controller::init_pool(&paths, &opts)?;
            return print(format, "pool-info", &v);
        }
        Cmd::Daemon { action } => {
            return daemon_cmd(&paths, action.unwrap_or(DaemonCmd::Run), format)
        }
        Cmd::Pool(PoolCmd::Info) => (Request::PoolInfo, false),
        Cmd::Pool(PoolCmd::Verify) => (Request::PoolVerify, false),
        Cmd::Template(t) => match t {
            TemplateCmd::Build {
                recipe,
                name,
                mirror,
            } => (
                Request::TemplateBuild {
                    recipe: absolute(&recipe)?,
                    name,
                    mirror,
                },
                true,
            ),
            TemplateCmd::Create { name, from_image } => (
                Request::TemplateCreate {
                    name,
                    image: absolute(&from_image)?,
                },
                true,
            ),
            TemplateCmd::List {
                available: false, ..
            } => (Request::TemplateList, false),
            TemplateCmd::Info {
                name,
                available: false,
                ..
            } => (Request::TemplateInfo { name }, false),
            TemplateCmd::List { repo, .. } => repo_req(RepoAction::ListAvailable {
                repos: repo_args(repo)?,
            }),
            TemplateCmd::Info { name, repo, .. } => repo_req(RepoAction::InfoAvailable {
                name,
                repos: repo_args(repo)?,
            }),
            TemplateCmd::Repo(cmd) => match crate::repo::repo_cmd(cmd)? {
                Ok(v) => return print(format, "plain", &v),
                Err(action) => (Request::TemplateRepo { action }, true),
            },
            TemplateCmd::Install { spec, repo } => {
                install_req(InstallMode::Install, Some(spec), repo)?
            }
            TemplateCmd::Upgrade { name, repo } => install_req(InstallMode::Upgrade, name, repo)?,
            TemplateCmd::Downgrade {
                spec,
                allow_downgrade,
                repo,
            } => {
                if !allow_downgrade {
                    bail!("a downgrade installs an older release, which may lack security fixes; confirm with --allow-downgrade");
                }
                install_req(InstallMode::Downgrade, Some(spec), repo)?
            }
            TemplateCmd::Reinstall { name, repo } => {
                install_req(InstallMode::Reinstall, Some(name), repo)?
            }
            TemplateCmd::Remove { name } => (Request::TemplateRemove { name }, true),
            TemplateCmd::Export { name, file } => (
                Request::TemplateExport {
                    name,
                    file: absolute(&file)?,
                },
                false,
            ),
            TemplateCmd::Import { file, name } => (
                Request::TemplateImport {
                    file: absolute(&file)?,
                    name,
                },
                true,
            ),
        },
        Cmd::Qube(q) => match q {
            QubeCmd::Create {
                name,
                class,
                template,
                label,
            } => (
                Request::QubeCreate {
                    name,
                    class,
                    template,
                    label,
                },
                true,
            ),
            QubeCmd::List => (Request::QubeList, false),
            QubeCmd::Remove { name } => (Request::QubeRemove { name }, true),
            QubeCmd::Clone { src, dst } => (Request::QubeClone { src, dst }, true),
            QubeCmd::Prefs { name, key, value } => (Request::QubePrefs { name, key, value }, true),
            QubeCmd::Start { name, hypervisor } => (Request::QubeStart { name, hypervisor }, true),
            QubeCmd::Shutdown {
                name,
                timeout,
                kill,
            } => (
                Request::QubeShutdown {
                    name,
                    timeout_secs: timeout,
                    kill,
                },
                true,
            ),
            QubeCmd::Console { name } => (Request::QubeConsole { name }, false),
            QubeCmd::Pause { name } => (Request::QubePause { name }, true),
            QubeCmd::Unpause { name } => (Request::QubeUnpause { name }, true),
        },
        Cmd::Volume(v) => match v {
            VolumeCmd::List { qube } => (Request::VolumeList { qube }, false),
            VolumeCmd::Info { volume } => {
                let (qube, vol) = parse_volume_ref(&volume)?;
                (Request::VolumeInfo { qube, vol }, false)
            }
            VolumeCmd::Revert { volume, revision } => {
                let (qube, vol) = parse_volume_ref(&volume)?;
                (
                    Request::VolumeRevert {
                        qube,
                        vol,
                        revision,
                    },
                    true,
                )
            }
            VolumeCmd::Resize {
                volume,
                size,
                allow_shrink,
            } => {
                let (qube, vol) = parse_volume_ref(&volume)?;
                (
                    Request::VolumeResize {
                        qube,
                        vol,
                        size: parse_size(&size)?,
                        allow_shrink,
                    },
                    true,
                )
            }
            VolumeCmd::Import { volume, file } => {
                let (qube, vol) = parse_volume_ref(&volume)?;
                return volume_import(&paths, format, qube, vol, &file);
            }
            VolumeCmd::Export { volume, file } => {
                let (qube, vol) = parse_volume_ref(&volume)?;
                return volume_export(&paths, format, qube, vol, &file);
            }
            VolumeCmd::Config { volume, key, value } => {
                let (qube, vol) = parse_volume_ref(&volume)?;
                (
                    Request::VolumeConfig {
                        qube,
                        vol,
                        key,
                        value,
                    },
                    true,
                )
            }
            VolumeCmd::Discard { volume } => {
                let (qube, vol) = parse_volume_ref(&volume)?;
                (Request::VolumeDiscard { qube, vol }, true)
            }
        },
    };
    let kind = kind_of(&req);
    let v = execute(&paths, req, mutating)?;
    print(format, kind, &v)
}

/// A daemon started by another qubes-ctl binary (one rebuilt or upgraded since) would
/// run the old code for every command: with no qube running it is stopped (the next
/// `qube start` starts the new one); otherwise the user is told how to restart it.
/// Returns whether a daemon answers afterwards.
fn retire_stale_daemon(paths: &Paths) -> bool {
    let sock = paths.admin_socket();
    let Some(p) = api::ping(&sock, std::time::Duration::from_secs(2)) else {
        return false;
    };
    if p["build"].as_str() == Some(api::build_id()) {
        return true;
    }
    let pid = p["pid"].as_u64().unwrap_or(0);
    if p["served"].as_u64() != Some(0) {
        eprintln!(
            "qubes-ctl: warning: the daemon (pid {pid}) runs another qubes-ctl build; \
             shut its qubes down and run `qubes-ctl daemon stop` to switch to this one"
        );
        return true;
    }
    let _ = stop_daemon(paths, pid);
    api::daemon_alive(&sock, std::time::Duration::from_secs(1))
}

/// Asks the daemon (process `pid`, 0 if unknown) to stop and waits until it has exited:
/// the pool lock is released only then.
fn stop_daemon(paths: &Paths, pid: u64) -> Result<Value> {
    let sock = paths.admin_socket();
    let v = match api::call(&sock, &Request::DaemonStop)? {
        Reply::Ok(v) => v,
        Reply::Error(e) => bail!(e),
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let gone = || {
        if pid == 0 {
            return !api::daemon_alive(&sock, std::time::Duration::from_secs(1));
        }
        // A zombie no longer holds anything.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state == "Z" || state == "X"),
        }
    };
    while std::time::Instant::now() < deadline && !gone() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(v)
}

fn repo_req(action: RepoAction) -> (Request, bool) {
    (Request::TemplateRepo { action }, false)
}

fn install_req(
    mode: InstallMode,
    spec: Option<String>,
    repo: Vec<String>,
) -> Result<(Request, bool)> {
    let action = RepoAction::Install {
        mode,
        spec,
        repos: repo_args(repo)?,
    };
    Ok((Request::TemplateRepo { action }, true))
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

/// Runs a request through the daemon if one answers, else in-process.
pub fn execute(paths: &Paths, req: Request, mutating: bool) -> Result<Value> {
    let sock = paths.admin_socket();
    let mut alive = retire_stale_daemon(paths);
    if !alive && req.needs_daemon() {
        crate::daemon::spawn(paths).context("the qube's volumes are served by the daemon")?;
        alive = true;
    }
    if alive {
        return match api::call(&sock, &req).context("talking to the daemon")? {
            Reply::Ok(v) => Ok(v),
            Reply::Error(e) => Err(anyhow!(e)),
        };
    }
    let mut ctl = Controller::open(paths, mutating, false)?;
    ctl.handle(req)
}

fn volume_import(
    paths: &Paths,
    format: Format,
    qube: String,
    vol: String,
    file: &str,
) -> Result<()> {
    // Stdin is spooled into a file first so that a daemon can read it and so that a short
    // read is caught before the pool is touched.
    let (path, _spool) = if file == "-" {
        std::fs::create_dir_all(paths.run_dir())?;
        let mut tmp = tempfile::NamedTempFile::new_in(paths.run_dir())?;
        let mut stdin = std::io::stdin().lock();
        std::io::copy(&mut stdin as &mut dyn Read, &mut tmp)
            .context("reading the image from stdin")?;
        let p = tmp.path().to_path_buf();
        (p, Some(tmp))
    } else {
        (absolute(Path::new(file))?, None)
    };
    let v = execute(
        paths,
        Request::VolumeImport {
            qube,
            vol,
            file: path,
        },
        true,
    )?;
    print(format, "volume", &v)
}

fn volume_export(
    paths: &Paths,
    format: Format,
    qube: String,
    vol: String,
    file: &str,
) -> Result<()> {
    if file == "-" {
        std::fs::create_dir_all(paths.run_dir())?;
        let tmp = tempfile::NamedTempFile::new_in(paths.run_dir())?;
        execute(
            paths,
            Request::VolumeExport {
                qube,
                vol,
                file: tmp.path().to_path_buf(),
            },
            false,
        )?;
        let mut f = std::fs::File::open(tmp.path())?;
        std::io::copy(&mut f, &mut std::io::stdout().lock())
            .context("writing the image to stdout")?;
        return Ok(());
    }
    let v = execute(
        paths,
        Request::VolumeExport {
            qube,
            vol,
            file: absolute(Path::new(file))?,
        },
        false,
    )?;
    print(format, "plain", &v)
}

fn daemon_cmd(paths: &Paths, action: DaemonCmd, format: Format) -> Result<()> {
    match action {
        DaemonCmd::Run => crate::daemon::run(paths),
        DaemonCmd::Start => {
            if !crate::daemon::is_running(paths) {
                crate::daemon::spawn(paths)?;
            }
            print(
                format,
                "plain",
                &serde_json::json!({"daemon": "running", "socket": paths.admin_socket()}),
            )
        }
        DaemonCmd::Stop => {
            let Some(p) = api::ping(&paths.admin_socket(), std::time::Duration::from_secs(2))
            else {
                return print(
                    format,
                    "plain",
                    &serde_json::json!({"daemon": "not running"}),
                );
            };
            let v = stop_daemon(paths, p["pid"].as_u64().unwrap_or(0))?;
            print(format, "plain", &v)
        }
        DaemonCmd::Status => {
            let v = match api::ping(&paths.admin_socket(), std::time::Duration::from_secs(2)) {
                Some(p) => serde_json::json!({
                    "daemon": "running",
                    "pid": p["pid"],
                    "qubes_served": p["served"],
                    "same_build": p["build"].as_str() == Some(api::build_id()),
                }),
                None => serde_json::json!({"daemon": "not running"}),
            };
            print(format, "plain", &v)
        }
    }
}

fn kind_of(req: &Request) -> &'static str {
    match req {
        Request::PoolInfo => "pool-info",
        Request::PoolVerify => "verify",
        Request::TemplateList => "template-list",
        Request::TemplateInfo { .. }
        | Request::TemplateBuild { .. }
        | Request::TemplateCreate { .. }
        | Request::TemplateImport { .. } => "template",
        Request::QubeList => "qube-list",
        Request::QubeCreate { .. }
        | Request::QubeClone { .. }
        | Request::QubePause { .. }
        | Request::QubeUnpause { .. } => "qube",
        Request::QubeStart { .. } => "started",
        Request::QubeConsole { .. } => "console",
        Request::VolumeList { .. } => "volume-list",
        Request::TemplateRepo {
            action: RepoAction::ListAvailable { .. },
        } => "template-available",
        Request::VolumeInfo { .. }
        | Request::VolumeRevert { .. }
        | Request::VolumeResize { .. }
        | Request::VolumeConfig { .. }
        | Request::VolumeDiscard { .. } => "volume",
        _ => "plain",
    }
}

fn s(v: &Value, k: &str) -> String {
    match &v[k] {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn size(v: &Value, k: &str) -> String {
    v[k].as_u64().map(human_size).unwrap_or_else(|| "-".into())
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn print(format: Format, kind: &str, v: &Value) -> Result<()> {
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    let empty = Vec::new();
    match kind {
        "qube-list" => table(
            &["NAME", "CLASS", "STATE", "LABEL", "TEMPLATE"],
            v.as_array()
                .unwrap_or(&empty)
                .iter()
                .map(|q| {
                    vec![
                        s(q, "name"),
                        s(q, "class"),
                        s(q, "state"),
                        s(q, "label"),
                        s(q, "template"),
                    ]
                })
                .collect(),
        ),
        "template-list" => table(
            &["NAME", "ORIGIN", "SIZE", "USAGE", "FINGERPRINT"],
            v.as_array()
                .unwrap_or(&empty)
                .iter()
                .map(|t| {
                    let fp = s(t, "fingerprint");
                    vec![
                        s(t, "name"),
                        s(t, "origin"),
                        size(t, "size"),
                        size(t, "usage"),
                        fp.chars().take(16).collect(),
                    ]
                })
                .collect(),
        ),
        "template-available" => table(
            &[
                "NAME",
                "VERSION",
                "RELEASED",
                "SIZE",
                "INSTALLED",
                "REPOSITORY",
            ],
            v.as_array()
                .unwrap_or(&empty)
                .iter()
                .map(|t| {
                    vec![
                        s(t, "name"),
                        s(t, "version"),
                        s(t, "release_date"),
                        size(t, "size"),
                        s(t, "installed"),
                        s(t, "repo"),
                    ]
                })
                .collect(),
        ),
        "volume-list" => table(
            &["VOLUME", "SIZE", "USAGE", "DIRTY", "REVISIONS", "SOURCE"],
            v.as_array()
                .unwrap_or(&empty)
                .iter()
                .map(|x| {
                    vec![
                        format!("{}:{}", s(x, "qube"), s(x, "name")),
                        size(x, "size"),
                        size(x, "usage"),
                        s(x, "dirty"),
                        x["revisions"]
                            .as_array()
                            .map(|a| a.len())
                            .unwrap_or(0)
                            .to_string(),
                        s(&x["config"], "source"),
                    ]
                })
                .collect(),
        ),
        "volume" => {
            println!("volume     {}:{}", s(v, "qube"), s(v, "name"));
            println!("size       {}", size(v, "size"));
            println!("usage      {}", size(v, "usage"));
            println!("dirty      {}", s(v, "dirty"));
            println!("running    {}", s(v, "running"));
            println!("source     {}", s(&v["config"], "source"));
            println!(
                "keep       {} revisions",
                s(&v["config"], "revisions_to_keep")
            );
            if let Some(uri) = v["nbd_uri"].as_str() {
                println!("nbd_uri    {uri}");
            }
            for r in v["revisions"].as_array().unwrap_or(&empty) {
                println!("revision   {}", s(r, "id"));
            }
        }
        "started" => {
            println!("{} is running on {}", s(v, "name"), s(v, "hypervisor"));
            if s(v, "hypervisor") != "none" {
                println!("console: {}", s(v, "console"));
            }
            for x in v["volumes"].as_array().unwrap_or(&empty) {
                println!("  {:<9} {}", s(x, "volume"), s(x, "nbd_uri"));
            }
        }
        "console" => print!("{}", v["text"].as_str().unwrap_or("")),
        "verify" => {
            let r = &v["report"];
            println!(
                "{}: {} volumes, {} metadata pages, {} data chunks",
                if v["clean"].as_bool() == Some(true) {
                    "clean"
                } else {
                    "PROBLEMS FOUND"
                },
                s(r, "volumes"),
                s(r, "metadata_pages"),
                s(r, "data_chunks")
            );
            for l in r["leaks"].as_array().unwrap_or(&empty) {
                println!("leak: {}", l.as_str().unwrap_or(""));
            }
            for e in r["errors"].as_array().unwrap_or(&empty) {
                println!("error: {}", e.as_str().unwrap_or(""));
            }
            if v["clean"].as_bool() != Some(true) {
                bail!("pool verify found problems");
            }
        }
        _ => print_kv(v, ""),
    }
    Ok(())
}

fn print_kv(v: &Value, prefix: &str) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match x {
                    Value::Object(_) => print_kv(x, &format!("{prefix}{k}.")),
                    Value::Array(a) if a.len() > 8 => {
                        println!("{prefix}{k:<14} [{} items]", a.len())
                    }
                    Value::Array(a) => println!(
                        "{prefix}{k:<14} {}",
                        a.iter()
                            .map(|e| e.as_str().map(str::to_string).unwrap_or(e.to_string()))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    Value::String(s) => println!("{prefix}{k:<14} {s}"),
                    Value::Null => println!("{prefix}{k:<14} -"),
                    other => println!("{prefix}{k:<14} {other}"),
                }
            }
        }
        other => println!("{other}"),
    }
}
