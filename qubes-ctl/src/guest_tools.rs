//! What `qubes-ctl template build` adds to a recipe: the guest agent binary
//! (`qube run`), as Qubes installs its agent into every template. A recipe opts in by
//! installing the agent's unit (recipes/guest does); the binary is the one built with
//! this qubes-ctl, so host and agent always speak the same protocol version. Its bytes
//! count in the recipe hash: a new agent means a new template build.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use template_builder::recipe::FileSpec;
use template_builder::Recipe;

pub const AGENT_BIN: &str = "qubes-guest-agent";
pub const AGENT_DEST: &str = "/usr/lib/qubes-guest/qubes-guest-agent";
/// The unit whose presence in a recipe asks for the agent.
pub const AGENT_UNIT_DEST: &str = "/etc/systemd/system/qubes-guest-agent.service";

/// Where the agent binary is: `$QUBES_GUEST_AGENT`, else next to this executable
/// (`target/release/`), else in `../lib/qubes-ctl/` of it (an installed layout).
/// `Ok(None)` when `QUBES_GUEST_AGENT=none`.
pub fn agent_binary() -> Result<Option<PathBuf>> {
    if let Some(p) = std::env::var_os("QUBES_GUEST_AGENT") {
        if p == "none" {
            return Ok(None);
        }
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("QUBES_GUEST_AGENT={} is not a file", p.display());
        }
        return Ok(Some(p));
    }
    let exe = std::env::current_exe().context("locating the qubes-ctl executable")?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let candidates = [
        dir.join(AGENT_BIN),
        dir.join("../lib/qubes-ctl").join(AGENT_BIN),
    ];
    for c in &candidates {
        if c.is_file() {
            return Ok(Some(c.clone()));
        }
    }
    bail!(
        "the guest agent binary {AGENT_BIN} is missing (looked in {} and {}): build it \
         with `cargo build --release -p guest-agent` (the same profile as qubes-ctl), or set \
         QUBES_GUEST_AGENT=none to build a template without `qube run`",
        candidates[0].display(),
        candidates[1].display()
    )
}

/// Adds the agent binary to a recipe that installs the agent's unit. Returns whether
/// it did.
pub fn add_agent(recipe: &mut Recipe) -> Result<bool> {
    let wants = recipe.files.iter().any(|f| f.dest == AGENT_UNIT_DEST);
    let has = recipe.files.iter().any(|f| f.dest == AGENT_DEST);
    if !wants || has {
        return Ok(false);
    }
    let Some(bin) = agent_binary()? else {
        return Ok(false);
    };
    let bytes = std::fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    recipe.files.push(FileSpec {
        src: bin,
        dest: AGENT_DEST.to_string(),
        mode: 0o755,
        content_hash: blake3::hash(&bytes).to_hex().to_string(),
    });
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_recipes_with_the_agent_unit_get_the_binary_and_it_changes_the_hash() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("agent");
        std::fs::write(&bin, b"\x7fELF fake agent").unwrap();
        std::fs::write(dir.path().join("unit"), b"[Service]\n").unwrap();
        let base = "name = \"t\"\ndistribution = \"debian\"\nrelease = \"bookworm\"\n\
                    architecture = \"amd64\"\nimage_size = \"1G\"\n";
        std::fs::write(dir.path().join("plain.toml"), base).unwrap();
        std::fs::write(
            dir.path().join("agent.toml"),
            format!(
                "{base}[[files]]\nsrc = \"unit\"\ndest = \"{AGENT_UNIT_DEST}\"\nmode = \"0644\"\n"
            ),
        )
        .unwrap();
        // The only test in this crate that reads or sets QUBES_GUEST_AGENT.
        std::env::set_var("QUBES_GUEST_AGENT", &bin);
        let mut plain = Recipe::load(dir.path().join("plain.toml")).unwrap();
        assert!(!add_agent(&mut plain).unwrap());
        let mut r = Recipe::load(dir.path().join("agent.toml")).unwrap();
        let before = r.hash();
        assert!(add_agent(&mut r).unwrap());
        assert_eq!(r.files.last().unwrap().dest, AGENT_DEST);
        assert_ne!(
            r.hash(),
            before,
            "the agent's bytes are part of the recipe hash"
        );
        assert!(!add_agent(&mut r).unwrap(), "added once");
        std::env::set_var("QUBES_GUEST_AGENT", dir.path().join("missing"));
        let mut r = Recipe::load(dir.path().join("agent.toml")).unwrap();
        assert!(add_agent(&mut r).is_err());
        std::env::set_var("QUBES_GUEST_AGENT", "none");
        assert!(!add_agent(&mut r).unwrap());
        std::env::remove_var("QUBES_GUEST_AGENT");
    }
}
