//! Command line: parses arguments into a [`Request`], sends it to the daemon (or runs it
//! in-process when no daemon owns the pool) and prints the answer as a table or as JSON.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::Value;

use crate::api::{self, Reply, Request};
use crate::controller::{self, parse_volume_ref, Controller, InitOptions};
use crate::paths::Paths;
use crate::repo::{repo_args, InstallMode, RepoAction};
use crate::results::{
    AvailableTemplate, DaemonStarted, DaemonStatus, PoolVerified, QubeConsole, QubeInfo, QubeLog,
    QubeStarted, Stopping, TemplateSummary, VolumeInfo,
};
use crate::units::{human_size, parse_size};

/// `println!` that exits quietly when stdout is closed early (`qubes-ctl qube list | head
/// -1`), as coreutils do, instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {
        out_write(format_args!("{}\n", format_args!($($arg)*)))
    };
}
macro_rules! out {
    ($($arg:tt)*) => {
        out_write(format_args!($($arg)*))
    };
}

fn out_write(args: std::fmt::Arguments<'_>) {
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(args) {
        exit_on_broken_pipe(&e);
        eprintln!("qubes-ctl: error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// The reader went away: die of SIGPIPE quietly, as a coreutils tool does.
pub fn exit_on_broken_pipe(e: &std::io::Error) {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        // SAFETY: restoring the default action of SIGPIPE and raising it has no
        // preconditions; the process ends here.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::raise(libc::SIGPIPE);
        }
        std::process::exit(141);
    }
}

/// The error and its causes, each said once: a context that already quotes its cause
/// (as `"{op}: {source}"` errors do) is not followed by that cause again.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if text.contains(&c) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&c);
    }
    if text.contains("pool stopped after a failed metadata update") {
        text.push_str(
            "; free space on the filesystem holding the pool, then reopen it: if a daemon runs, \
             `qubes-ctl daemon stop` (running qubes stay marked running; the next command reopens the pool)",
        );
    }
    text
}

/// How long a command without a daemon waits for the pool lock another command holds
/// (`QUBES_CTL_LOCK_TIMEOUT`, seconds).
fn lock_timeout() -> Duration {
    let secs = std::env::var("QUBES_CTL_LOCK_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    Duration::from_secs(secs)
}

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
    /// More log lines on stderr: -v info, -vv debug, -vvv trace (RUST_LOG overrides).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
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
    /// Shell completions and man pages from these definitions (for installers).
    #[command(subcommand, hide = true)]
    Generate(crate::generate::Generate),
    /// Runs LVM commands sent on stdin, for this program's own lvm_thin pools (started by
    /// qubes-ctl itself, never by hand).
    #[command(hide = true)]
    LvmWorker,
}

// Parsed once per process: boxing `Init`'s driver options would only make the match
// on them noisier.
#[allow(clippy::large_enum_variant)]
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
        /// thin (default), reflink (files on XFS/btrfs), rbd (Ceph RBD images, shared
        /// by every machine that uses the same Ceph pool) or lvm_thin (an existing LVM
        /// thin pool, Qubes' layout: give --volume-group and --thin-pool).
        #[arg(long, default_value = "thin")]
        driver: String,
        /// rbd: the Ceph pool (created and `rbd pool init`ed beforehand).
        #[arg(long)]
        ceph_pool: Option<String>,
        /// rbd: ceph.conf (default: $CEPH_CONF, then /etc/ceph/ceph.conf).
        #[arg(long)]
        ceph_conf: Option<PathBuf>,
        /// rbd: Ceph user, without `client.` (default admin).
        #[arg(long)]
        ceph_id: Option<String>,
        /// rbd: RBD namespace inside the pool (default: the pool's own).
        #[arg(long)]
        ceph_namespace: Option<String>,
        /// rbd: this machine's name in "in use on machine X" errors (default HOST:ROOT).
        #[arg(long)]
        machine_name: Option<String>,
        /// lvm_thin: the volume group holding the thin pool (Qubes: qubes_dom0).
        #[arg(long)]
        volume_group: Option<String>,
        /// lvm_thin: the thin pool LV (Qubes: vm-pool).
        #[arg(long)]
        thin_pool: Option<String>,
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
        /// Replace the root of an existing template (the old one is kept as a revision).
        #[arg(long)]
        replace: bool,
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
        /// Replace the root of an existing template (the old one is kept as a revision).
        #[arg(long)]
        replace: bool,
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
    /// The qube's console log and the daemon's lines about it.
    Log {
        name: String,
        /// Daemon lines to show at most (the newest).
        #[arg(long, default_value_t = 200)]
        lines: usize,
    },
    /// Attach to the qube's serial console (Ctrl-] detaches); --log prints its log.
    Console {
        name: String,
        /// Print the console log (this boot's, or the last one's) instead of attaching.
        #[arg(long)]
        log: bool,
    },
    /// Run a command in the qube through its guest agent (starting the qube if halted)
    /// and exit with its status: `qube run work -- cat /etc/hostname`.
    Run {
        name: String,
        /// The user in the qube (default root).
        #[arg(long, short)]
        user: Option<String>,
        /// Pass this stdin to the command (stdout and stderr are always passed back).
        #[arg(long, short)]
        pass_io: bool,
        /// Start the command and return at once, without its output or status.
        #[arg(long)]
        no_wait: bool,
        /// Fail if the qube is not running instead of starting it.
        #[arg(long)]
        no_autostart: bool,
        /// Seconds to wait for the qube's agent (a qube started now is still booting).
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// The command and its arguments (run directly, no shell).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
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
    /// Replace the volume's content with a raw image (`-` for stdin). The volume gets the
    /// image's size; a stream (pipe, FIFO) needs `--size` and must hold exactly that.
    Import {
        volume: String,
        file: String,
        /// Bytes to import (default: the file's or block device's size).
        #[arg(long)]
        size: Option<String>,
    },
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
    // The daemon installs its own subscriber (journal or log file).
    if !matches!(
        cli.cmd,
        Cmd::Daemon {
            action: None | Some(DaemonCmd::Run)
        }
    ) {
        crate::logging::init_cli(cli.verbose);
    }
    // Whatever this process does to an lvm_thin pool, a kill in the middle must not stop
    // LVM half-way (a suspended device hangs every later command): LVM runs in a worker
    // process that finishes its command. /proc/self/exe is this very binary even after
    // an upgrade replaced the file.
    lvm2_sys::use_worker("/proc/self/exe".into(), vec!["lvm-worker".into()]);
    let (req, mutating) = match cli.cmd {
        Cmd::Generate(what) => return crate::generate::run(what),
        Cmd::LvmWorker => {
            return lvm2_sys::worker::serve().context("the LVM worker lost its parent's pipe")
        }
        Cmd::Pool(PoolCmd::Init {
            chunk_size,
            size,
            driver,
            ceph_pool,
            ceph_conf,
            ceph_id,
            ceph_namespace,
            machine_name,
            volume_group,
            thin_pool,
        }) => {
            if crate::daemon::is_running(&paths) {
                bail!(
                    "a daemon owns the pool at {}; stop it first",
                    paths.root().display()
                );
            }
            let opts = InitOptions {
                driver: driver.clone(),
                chunk_size: parse_size(&chunk_size)?,
                capacity: size.as_deref().map(parse_size).transpose()?,
                rbd: match (driver.as_str(), ceph_pool) {
                    ("rbd", Some(p)) => {
                        let mut o = storage::RbdOptions::new(&p);
                        o.ceph_conf = ceph_conf
                            .map(|c| std::path::absolute(&c))
                            .transpose()
                            .context("--ceph-conf")?;
                        o.ceph_id = ceph_id;
                        o.ceph_namespace = ceph_namespace;
                        o.machine = machine_name;
                        Some(o)
                    }
                    ("rbd", None) => bail!("--driver rbd needs --ceph-pool NAME"),
                    (_, Some(_)) => bail!("--ceph-pool is for --driver rbd"),
                    _ => None,
                },
                volume_group,
                thin_pool,
            };
            let info = controller::init_pool(&paths, &opts)?;
            return print(format, "pool-info", &serde_json::to_value(info)?);
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
            } => {
                // We resolve the recipe and open what it installs, with the caller's
                // rights: a daemon builds from these, never from a path we name.
                let recipe = absolute(&recipe)?;
                let resolved = template_builder::Recipe::load(&recipe)?;
                let mut files = Vec::new();
                let keys = resolved.gpg_keys.iter().filter(|k| !k.contains("://"));
                for src in resolved
                    .files
                    .iter()
                    .map(|f| f.src.as_path())
                    .chain(keys.map(Path::new))
                {
                    files.push(File::open(src).with_context(|| {
                        format!(
                            "opening {} (named by recipe {})",
                            src.display(),
                            recipe.display()
                        )
                    })?);
                }
                if files.len() > api::MAX_FDS {
                    bail!(
                        "recipe {} installs {} files (with its GPG keys); at most {} fit one build request: pack some into one archive or a command",
                        recipe.display(),
                        files.len(),
                        api::MAX_FDS
                    );
                }
                let req = Request::TemplateBuild {
                    recipe,
                    resolved: Box::new(resolved),
                    name,
                    mirror,
                };
                let v = execute_with(&paths, req, true, files)?;
                return print(format, "template", &v);
            }
            TemplateCmd::Create {
                name,
                from_image,
                replace,
            } => {
                let image = absolute(&from_image)?;
                let f = File::open(&image)
                    .with_context(|| format!("opening image {}", image.display()))?;
                let req = Request::TemplateCreate {
                    name,
                    image,
                    replace,
                };
                let v = execute_with(&paths, req, true, vec![f])?;
                return print(format, "template", &v);
            }
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
            TemplateCmd::Export { name, file } => {
                return template_export(&paths, format, name, &absolute(&file)?)
            }
            TemplateCmd::Import {
                file,
                name,
                replace,
            } => {
                let file = absolute(&file)?;
                let f = File::open(&file)
                    .with_context(|| format!("opening package {}", file.display()))?;
                let req = Request::TemplateImport {
                    file,
                    name,
                    replace,
                };
                let v = execute_with(&paths, req, true, vec![f])?;
                return print(format, "template", &v);
            }
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
            QubeCmd::Console { name, log: false } => return crate::console::attach(&paths, &name),
            QubeCmd::Console { name, log: true } => (Request::QubeConsole { name }, false),
            QubeCmd::Log { name, lines } => return qube_log(&paths, &name, lines, format),
            QubeCmd::Run {
                name,
                user,
                pass_io,
                no_wait,
                no_autostart,
                timeout,
                command,
            } => {
                let code = crate::run::run(
                    &paths,
                    &crate::run::RunArgs {
                        name,
                        user,
                        pass_io,
                        no_wait,
                        no_autostart,
                        timeout,
                        command,
                    },
                )?;
                std::process::exit(code);
            }
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
            VolumeCmd::Import { volume, file, size } => {
                let (qube, vol) = parse_volume_ref(&volume)?;
                let size = size.as_deref().map(parse_size).transpose()?;
                return volume_import(&paths, format, qube, vol, &file, size);
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
fn retire_stale_daemon(paths: &Paths) -> Result<bool> {
    let sock = paths.admin_socket();
    let Some(p) = api::ping(&sock, std::time::Duration::from_secs(2)) else {
        return Ok(false);
    };
    if p.build.as_deref() == Some(api::build_id()) {
        return Ok(true);
    }
    let pid = u64::from(p.pid.unwrap_or(0));
    // Daemons before the versioned protocol do not say theirs: version 1.
    let theirs = p.protocol.unwrap_or(1);
    if p.served != Some(0) && theirs != api::PROTOCOL {
        let who = format!("the daemon, pid {pid}, was started by another qubes-ctl build");
        bail!(api::ApiError::new(
            api::ErrorKind::Protocol,
            api::protocol_mismatch(theirs, api::PROTOCOL, &who)
        ));
    }
    if p.served != Some(0) {
        eprintln!(
            "qubes-ctl: warning: the daemon (pid {pid}) runs another qubes-ctl build; \
             shut its qubes down and run `qubes-ctl daemon stop` to switch to this one"
        );
        return Ok(true);
    }
    let _ = stop_daemon(paths, pid);
    Ok(api::daemon_alive(&sock, std::time::Duration::from_secs(1)))
}

/// Asks the daemon (process `pid`, 0 if unknown) to stop and waits until it has exited:
/// the pool lock is released only then.
fn stop_daemon(paths: &Paths, pid: u64) -> Result<Stopping> {
    let sock = paths.admin_socket();
    let v: Stopping = match api::call(&sock, &Request::DaemonStop)? {
        Reply::Ok(v) => typed(&v)?,
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
    execute_with(paths, req, mutating, Vec::new())
}

/// [`execute`] with the files the request reads or writes, opened by us (the caller's
/// rights and umask): they go to the daemon as descriptors.
pub fn execute_with(
    paths: &Paths,
    req: Request,
    mutating: bool,
    files: Vec<File>,
) -> Result<Value> {
    let sock = paths.admin_socket();
    let deadline = Instant::now() + lock_timeout();
    loop {
        let mut alive = retire_stale_daemon(paths)?;
        if !alive && api::listening(&sock) {
            refuse_frozen_daemon(paths)?;
        }
        if !alive && req.needs_daemon() {
            crate::daemon::spawn(paths).context("the qube's volumes are served by the daemon")?;
            alive = true;
        }
        if alive {
            let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
            return match api::call_with_fds(&sock, &req, &fds, None)
                .context("talking to the daemon")?
            {
                Reply::Ok(v) => Ok(v),
                Reply::Error(e) => Err(anyhow!(e)),
            };
        }
        match Controller::open(paths, mutating, false) {
            Ok(ctl) => return ctl.handle_with(req, files),
            Err(e) => {
                let Some(pid) = locked_by(&e) else {
                    return Err(e);
                };
                // Another command holds the pool for a moment: wait our turn.
                if Instant::now() >= deadline {
                    let holder = pid.map(|p| format!(" by process {p}")).unwrap_or_default();
                    bail!(
                        "the pool at {} is still held{holder} after {} s; wait for that command to finish, or stop it (`kill {}`)",
                        paths.pool_dir().display(),
                        lock_timeout().as_secs(),
                        pid.map(|p| p.to_string()).unwrap_or_else(|| "PID".into())
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// `Some(holder pid)` if `e` says the pool is locked by another process.
pub fn locked_by(e: &anyhow::Error) -> Option<Option<u32>> {
    e.chain()
        .find_map(|c| match c.downcast_ref::<storage::PoolError>() {
            Some(storage::PoolError::Locked { pid, .. }) => Some(*pid),
            _ => None,
        })
}

/// Something listens on the admin socket but does not answer a ping: a stopped
/// (SIGSTOP) or hung daemon. Say so instead of waiting for it forever.
fn refuse_frozen_daemon(paths: &Paths) -> Result<()> {
    // It may be a daemon just starting: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if !api::listening(&paths.admin_socket())
            || api::daemon_alive(&paths.admin_socket(), Duration::from_secs(1))
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let pid = std::fs::read_to_string(paths.daemon_pid())
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    match pid {
        Some(p) => bail!(
            "the daemon (pid {p}) accepts connections on {} but does not answer; if it is stopped, resume it with `kill -CONT {p}`, if it hangs, end it with `kill {p}`",
            paths.admin_socket().display()
        ),
        None => bail!(
            "a process accepts connections on {} but does not answer as a daemon; stop it and remove that socket",
            paths.admin_socket().display()
        ),
    }
}

fn volume_import(
    paths: &Paths,
    format: Format,
    qube: String,
    vol: String,
    file: &str,
    size: Option<u64>,
) -> Result<()> {
    let (f, shown) = if file == "-" {
        let stdin = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating stdin")?;
        (File::from(stdin), PathBuf::from("stdin"))
    } else {
        let p = absolute(Path::new(file))?;
        let f = File::open(&p).with_context(|| format!("opening {}", p.display()))?;
        (f, p)
    };
    // The size is taken first and kept: an input that ends early (a producer killed
    // part-way) is refused with nothing committed.
    let size = match size {
        Some(s) => s,
        None => controller::image_size(&f)
            .with_context(|| format!("reading {}", shown.display()))?
            .ok_or_else(|| {
                anyhow!(
                    "{} is a stream (pipe, FIFO or character device): its size is not known in advance; \
                     give it with --size BYTES (the input must hold exactly that many)",
                    shown.display()
                )
            })?,
    };
    let v = execute_with(
        paths,
        Request::VolumeImport {
            qube,
            vol,
            file: shown,
            size,
        },
        true,
        vec![f],
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
    let mut to_stdout = file == "-";
    let (f, shown) = if to_stdout {
        let stdout = std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating stdout")?;
        (File::from(stdout), PathBuf::from("stdout"))
    } else {
        let p = absolute(Path::new(file))?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&p)
            .with_context(|| format!("creating {}", p.display()))?;
        // `/dev/stdout` and the like: the image is the output, no summary after it.
        to_stdout = same_file(&f, &std::io::stdout());
        (f, p)
    };
    let req = Request::VolumeExport {
        qube,
        vol,
        file: shown,
    };
    let v = match execute_with(paths, req, false, vec![f]) {
        Ok(v) => v,
        Err(e) => {
            if let Some(io) = e.chain().find_map(|c| c.downcast_ref::<std::io::Error>()) {
                exit_on_broken_pipe(io);
            }
            if e.to_string().contains("Broken pipe") {
                exit_on_broken_pipe(&std::io::Error::from(std::io::ErrorKind::BrokenPipe));
            }
            return Err(e);
        }
    };
    if to_stdout {
        return Ok(());
    }
    print(format, "plain", &v)
}

fn same_file(f: &File, other: &impl AsFd) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(dup) = other.as_fd().try_clone_to_owned() else {
        return false;
    };
    match (f.metadata(), File::from(dup).metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The package is written to `FILE.partial`, opened here, and renamed over `FILE` once
/// complete.
fn template_export(paths: &Paths, format: Format, name: String, file: &Path) -> Result<()> {
    let mut partial = file.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&partial)
        .with_context(|| format!("creating {}", partial.display()))?;
    let req = Request::TemplateExport {
        name,
        file: file.to_path_buf(),
    };
    match execute_with(paths, req, false, vec![f]) {
        Ok(v) => {
            std::fs::rename(&partial, file)
                .with_context(|| format!("renaming {} to {}", partial.display(), file.display()))?;
            print(format, "plain", &v)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

fn daemon_cmd(paths: &Paths, action: DaemonCmd, format: Format) -> Result<()> {
    match action {
        DaemonCmd::Run => crate::daemon::run(paths),
        DaemonCmd::Start => {
            if !crate::daemon::is_running(paths) {
                crate::daemon::spawn(paths)?;
            }
            let started = DaemonStarted {
                daemon: "running".into(),
                socket: paths.admin_socket(),
            };
            print(format, "plain", &serde_json::to_value(started)?)
        }
        DaemonCmd::Stop => {
            let Some(p) = api::ping(&paths.admin_socket(), std::time::Duration::from_secs(2))
            else {
                return print(
                    format,
                    "plain",
                    &serde_json::to_value(DaemonStatus::not_running())?,
                );
            };
            let stopping = stop_daemon(paths, u64::from(p.pid.unwrap_or(0)))?;
            print(format, "plain", &serde_json::to_value(stopping)?)
        }
        DaemonCmd::Status => {
            let status = match api::ping(&paths.admin_socket(), std::time::Duration::from_secs(2)) {
                Some(p) => DaemonStatus::of(p),
                None => DaemonStatus::not_running(),
            };
            print(format, "plain", &serde_json::to_value(status)?)
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
        outln!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn print(format: Format, kind: &str, v: &Value) -> Result<()> {
    if format == Format::Json {
        outln!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    match kind {
        "qube-list" => {
            let qubes: Vec<QubeInfo> = typed(v)?;
            table(
                &["NAME", "CLASS", "STATE", "LABEL", "TEMPLATE"],
                qubes
                    .into_iter()
                    .map(|q| {
                        vec![
                            q.name,
                            q.class,
                            q.state.to_string(),
                            dash(&q.label),
                            dash_opt(q.template.as_deref()),
                        ]
                    })
                    .collect(),
            )
        }
        "template-list" => {
            let templates: Vec<TemplateSummary> = typed(v)?;
            table(
                &["NAME", "ORIGIN", "SIZE", "USAGE", "FINGERPRINT"],
                templates
                    .into_iter()
                    .map(|t| {
                        vec![
                            dash(&t.name),
                            dash(&t.origin),
                            human_size(t.size),
                            human_size(t.usage),
                            dash(&t.fingerprint).chars().take(16).collect(),
                        ]
                    })
                    .collect(),
            )
        }
        "template-available" => {
            let offered: Vec<AvailableTemplate> = typed(v)?;
            table(
                &[
                    "NAME",
                    "VERSION",
                    "RELEASED",
                    "SIZE",
                    "INSTALLED",
                    "REPOSITORY",
                ],
                offered
                    .into_iter()
                    .map(|t| {
                        vec![
                            dash(&t.name),
                            dash(&t.version),
                            dash(&t.release_date),
                            human_size(t.size),
                            dash_opt(t.installed.as_deref()),
                            dash(&t.repo),
                        ]
                    })
                    .collect(),
            )
        }
        "volume-list" => {
            let vols: Vec<VolumeInfo> = typed(v)?;
            table(
                &["VOLUME", "SIZE", "USAGE", "DIRTY", "REVISIONS", "SOURCE"],
                vols.into_iter()
                    .map(|x| {
                        let st = x.status;
                        vec![
                            format!("{}:{}", st.qube, st.name),
                            human_size(st.size),
                            human_size(st.usage),
                            st.dirty.to_string(),
                            st.revisions.len().to_string(),
                            dash_opt(st.config.source.as_deref()),
                        ]
                    })
                    .collect(),
            )
        }
        "volume" => {
            let x: VolumeInfo = typed(v)?;
            let st = &x.status;
            outln!("volume     {}:{}", st.qube, st.name);
            outln!("size       {}", human_size(st.size));
            outln!("usage      {}", human_size(st.usage));
            outln!("dirty      {}", st.dirty);
            outln!("running    {}", st.running);
            outln!("source     {}", dash_opt(st.config.source.as_deref()));
            outln!("keep       {} revisions", st.config.revisions_to_keep);
            if let Some(uri) = &x.nbd_uri {
                outln!("nbd_uri    {uri}");
            }
            for r in &st.revisions {
                outln!("revision   {}", dash(&r.id));
            }
        }
        "started" => {
            let q: QubeStarted = typed(v)?;
            outln!("{} is running on {}", q.name, dash(&q.hypervisor));
            if q.hypervisor != "none" {
                outln!("console: {}", q.console.display());
            }
            for x in &q.volumes {
                outln!("  {:<9} {}", x.volume, dash(&x.nbd_uri));
            }
        }
        "console" => out!("{}", typed::<QubeConsole>(v)?.text),
        "verify" => {
            let PoolVerified { clean, report: r } = typed(v)?;
            outln!(
                "{}: {} volumes, {} metadata pages, {} data chunks",
                match (clean, !r.warnings.is_empty()) {
                    (true, false) => "clean",
                    (true, true) => "clean, with warnings",
                    (false, _) => "PROBLEMS FOUND",
                },
                r.volumes,
                r.metadata_pages,
                r.data_chunks
            );
            for l in &r.leaks {
                outln!("leak: {l}");
            }
            for e in &r.errors {
                outln!("error: {e}");
            }
            for w in &r.warnings {
                outln!("warning: {w}");
            }
            if !clean {
                bail!("pool verify found problems");
            }
        }
        _ => print_kv(v, ""),
    }
    Ok(())
}

/// A reply read as the typed result of its request (see [`crate::results`]).
fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T> {
    serde_json::from_value(v.clone()).context(
        "the daemon's reply is not what this qubes-ctl expects; restart the daemon with it (`qubes-ctl daemon stop`)",
    )
}

/// A text cell: `-` for nothing.
fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

fn dash_opt(s: Option<&str>) -> String {
    dash(s.unwrap_or(""))
}

fn print_kv(v: &Value, prefix: &str) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match x {
                    Value::Object(_) => print_kv(x, &format!("{prefix}{k}.")),
                    Value::Array(a) if a.len() > 8 => {
                        outln!("{prefix}{k:<14} [{} items]", a.len())
                    }
                    Value::Array(a) => outln!(
                        "{prefix}{k:<14} {}",
                        a.iter()
                            .map(|e| e.as_str().map(str::to_string).unwrap_or(e.to_string()))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    Value::String(s) => outln!("{prefix}{k:<14} {s}"),
                    Value::Null => outln!("{prefix}{k:<14} -"),
                    other => outln!("{prefix}{k:<14} {other}"),
                }
            }
        }
        other => outln!("{other}"),
    }
}

/// `qube log NAME`: the console log, then the daemon's lines naming the qube (from the
/// journal when the daemon runs under systemd, else from `ROOT/run/daemon.log`).
fn qube_log(paths: &Paths, name: &str, lines: usize, format: Format) -> Result<()> {
    let console: QubeConsole = typed(&execute(
        paths,
        Request::QubeConsole {
            name: name.to_string(),
        },
        false,
    )?)?;
    let mut daemon = crate::logging::qube_lines(&paths.daemon_log(), name, lines);
    if daemon.is_empty() {
        daemon = crate::logging::journal_lines(name, lines).unwrap_or_default();
    }
    let log = QubeLog {
        name: name.to_string(),
        console_log: console.log,
        console: console.text,
        daemon,
    };
    if format == Format::Json {
        let v = serde_json::to_value(&log)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("== console ({}) ==", log.console_log.display());
    print!("{}", log.console);
    println!("== daemon ==");
    for l in log.daemon {
        println!("{l}");
    }
    Ok(())
}
