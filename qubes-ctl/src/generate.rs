//! `qubes-ctl generate completions SHELL | man DIR` (hidden): shell completions and man
//! pages from the clap definitions, so they never drift from the parser.
//! `scripts/install-service.sh` installs them.

use std::path::{Path, PathBuf};

use std::io::Write;

use anyhow::{Context, Result};
use clap::{CommandFactory, Subcommand};

#[derive(Subcommand, Debug)]
pub enum Generate {
    /// Completion script for SHELL on stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Man pages into DIR: qubes-ctl.1 and one page per subcommand (qubes-ctl-qube-start.1).
    Man { dir: PathBuf },
}

pub fn run(what: Generate) -> Result<()> {
    let mut cmd = crate::cli::Cli::command();
    match what {
        Generate::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "qubes-ctl", &mut out);
            std::io::stdout()
                .write_all(&out)
                .context("writing the completion script")
        }
        Generate::Man { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            cmd.build();
            write_pages(&cmd, "qubes-ctl", &dir)
        }
    }
}

fn write_pages(cmd: &clap::Command, name: &str, dir: &Path) -> Result<()> {
    // clap names are `&'static str` without its `string` feature; this runs once and exits.
    let static_name: &'static str = Box::leak(name.to_string().into_boxed_str());
    let cmd = cmd.clone().name(static_name);
    let path = dir.join(format!("{name}.1"));
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(())
}
