//! Recipes: TOML files that say what goes into a template.
//!
//! Contract: [`Recipe::load`] returns a fully *resolved* recipe (every `extends` parent
//! merged in, every file path made absolute, every default filled) or a [`RecipeError`]
//! naming the file, the line and column, and a hint. Nothing later in the build has to
//! re-validate a field. [`Recipe::hash`] is a pure function of the resolved recipe and of
//! the bytes of the files it installs, so it can key caches and derive image UUIDs.
//!
//! Merging (`extends = "minimal.toml"`, relative to the child): scalars of the child win;
//! `packages`, `services` and `gpg_keys` are unions (parent order first); `commands` are
//! the parent's then the child's; `files` are the parent's then the child's, a child entry
//! with the same `dest` replacing the parent's; `remove_packages` (of any level) are taken
//! out of the merged package list, and the build purges any of them that the bootstrap
//! installed anyway (as a dependency, or with the base variant).

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

/// Default image size when a recipe gives none (Qubes' default root is 10 GiB; templates
/// are imported into a volume of their own size, so keep the image tight).
pub const DEFAULT_IMAGE_SIZE: u64 = 2 << 30;
/// Default `SOURCE_DATE_EPOCH` (2024-01-01T00:00:00Z) when a recipe gives none.
pub const DEFAULT_SOURCE_DATE_EPOCH: u64 = 1_704_067_200;
pub const DEFAULT_KERNEL_CMDLINE: &str = "root=/dev/vda rw console=ttyS0";
const MAX_EXTENDS_DEPTH: usize = 8;

#[derive(Debug, Error)]
pub enum RecipeError {
    #[error("reading recipe {path}: {source}")]
    Reading {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A syntax error, an unknown key or a bad value.
    #[error("{path}:{line}:{column}: {message}{}", hint.as_ref().map(|h| format!("\n  hint: {h}")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
        hint: Option<String>,
    },
    #[error("{path}: {message}")]
    Incomplete { path: PathBuf, message: String },
    #[error("{path}: `extends` chain deeper than {MAX_EXTENDS_DEPTH} (a cycle?)")]
    ExtendsTooDeep { path: PathBuf },
    #[error("{recipe}: file {src} (installed as {dest}) cannot be read: {source}")]
    MissingFile {
        recipe: PathBuf,
        src: PathBuf,
        dest: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    Debian,
    Fedora,
}

impl fmt::Display for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Distribution::Debian => "debian",
            Distribution::Fedora => "fedora",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Filesystem {
    Ext4,
}

/// A size written as bytes (`1073741824`) or with a binary suffix (`"2G"`, `"512M"`, `"2GiB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Size(u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        let bad = |s: &str| {
            serde::de::Error::custom(format!(
                "bad size {s:?}: write bytes or a number with K, M, G or T (binary units), e.g. \"2G\""
            ))
        };
        let v = match Raw::deserialize(d)? {
            Raw::Int(n) => n,
            Raw::Str(s) => {
                let t = s.trim();
                let t = t
                    .strip_suffix("iB")
                    .or_else(|| t.strip_suffix('B'))
                    .unwrap_or(t);
                let (num, shift) = match t.chars().last() {
                    Some('K' | 'k') => (&t[..t.len() - 1], 10),
                    Some('M' | 'm') => (&t[..t.len() - 1], 20),
                    Some('G' | 'g') => (&t[..t.len() - 1], 30),
                    Some('T' | 't') => (&t[..t.len() - 1], 40),
                    _ => (t, 0),
                };
                let n: u64 = num.trim().parse().map_err(|_| bad(&s))?;
                n.checked_mul(1u64 << shift).ok_or_else(|| bad(&s))?
            }
        };
        if v < (64 << 20) || v % 4096 != 0 {
            return Err(serde::de::Error::custom(format!(
                "image size {v} bytes: must be a multiple of 4096 and at least 64M"
            )));
        }
        Ok(Size(v))
    }
}

/// A file mode written as an octal string (`"0755"`) or a TOML octal integer (`0o755`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mode(u32);

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u32),
            Str(String),
        }
        let v = match Raw::deserialize(d)? {
            Raw::Int(n) => n,
            Raw::Str(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8).map_err(|_| {
                serde::de::Error::custom(format!(
                    "bad mode {s:?}: write it in octal, e.g. \"0644\""
                ))
            })?,
        };
        if v > 0o7777 {
            return Err(serde::de::Error::custom(format!(
                "mode {v:o} has bits beyond 07777"
            )));
        }
        Ok(Mode(v))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    src: String,
    dest: String,
    mode: Option<Mode>,
}

/// The file as written; every field optional so `extends` can fill the gaps.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    name: Option<String>,
    distribution: Option<Distribution>,
    release: Option<String>,
    architecture: Option<String>,
    extends: Option<String>,
    packages: Option<Vec<String>>,
    remove_packages: Option<Vec<String>>,
    variant: Option<String>,
    files: Option<Vec<RawFile>>,
    commands: Option<Vec<String>>,
    services: Option<Vec<String>>,
    image_size: Option<Size>,
    filesystem: Option<Filesystem>,
    kernel: Option<bool>,
    kernel_cmdline: Option<String>,
    mirror: Option<String>,
    source_date_epoch: Option<u64>,
    gpg_keys: Option<Vec<String>>,
}

const KEYS: &[&str] = &[
    "name",
    "distribution",
    "release",
    "architecture",
    "extends",
    "packages",
    "remove_packages",
    "variant",
    "files",
    "commands",
    "services",
    "image_size",
    "filesystem",
    "kernel",
    "kernel_cmdline",
    "mirror",
    "source_date_epoch",
    "gpg_keys",
    "src",
    "dest",
    "mode",
];

/// One file copied into the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpec {
    /// Absolute path on the build host.
    pub src: PathBuf,
    /// Absolute path inside the image.
    pub dest: String,
    pub mode: u32,
    /// blake3 (hex) of the file's bytes when the recipe was loaded; the build refuses a
    /// file that changed since, so the recipe hash always describes what was installed.
    pub content_hash: String,
}

/// A resolved recipe (see the module doc). It deserialises too, so a client can resolve it
/// (reading the files with its own rights) and hand it to a builder elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipe {
    #[serde(skip)]
    pub path: PathBuf,
    pub name: String,
    pub distribution: Distribution,
    pub release: String,
    pub architecture: String,
    /// Merged, de-duplicated, minus `remove_packages`.
    pub packages: Vec<String>,
    /// Purged after the bootstrap if installed anyway (apt-get purge / dnf remove).
    pub remove_packages: Vec<String>,
    /// mmdebstrap `--variant` (Debian only; default `minbase`).
    pub variant: String,
    pub files: Vec<FileSpec>,
    pub commands: Vec<String>,
    pub services: Vec<String>,
    pub image_size: u64,
    pub filesystem: Filesystem,
    pub kernel: bool,
    pub kernel_cmdline: String,
    /// `None`: the distribution's official mirror (or the builder's `--mirror`).
    pub mirror: Option<String>,
    pub source_date_epoch: u64,
    /// Fedora: GPG key files (absolute) or URLs; packages are checked when any is given.
    pub gpg_keys: Vec<String>,
}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map(|i| before.len() - i)
        .unwrap_or(before.len() + 1);
    (line, column)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

fn hint_for(message: &str) -> Option<String> {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let field = rest.split('`').next().unwrap_or("");
        let best = KEYS.iter().min_by_key(|k| edit_distance(field, k))?;
        if edit_distance(field, best) <= 3 {
            return Some(format!("did you mean `{best}`?"));
        }
        return Some("see recipes/debian/minimal.toml for the recognised keys".into());
    }
    if message.contains("unknown variant") {
        return Some("distribution is `debian` or `fedora`; filesystem is `ext4`".into());
    }
    None
}

fn parse_file(path: &Path) -> Result<RawRecipe, RecipeError> {
    let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Reading {
        path: path.into(),
        source,
    })?;
    toml::from_str::<RawRecipe>(&text).map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(&text, s.start)).unwrap_or((1, 1));
        let message = e.message().trim().to_string();
        RecipeError::Invalid {
            path: path.into(),
            line,
            column,
            hint: hint_for(&message),
            message,
        }
    })
}

fn union(into: &mut Vec<String>, more: Vec<String>) {
    for m in more {
        if !into.contains(&m) {
            into.push(m);
        }
    }
}

/// Parent-then-child merge of one level (both already parsed; files resolved).
struct Layer {
    raw: RawRecipe,
    files: Vec<FileSpec>,
    gpg_keys: Vec<String>,
}

fn load_layer(path: &Path, depth: usize) -> Result<Layer, RecipeError> {
    if depth > MAX_EXTENDS_DEPTH {
        return Err(RecipeError::ExtendsTooDeep { path: path.into() });
    }
    let mut raw = parse_file(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut files: Vec<FileSpec> = raw
        .files
        .take()
        .unwrap_or_default()
        .into_iter()
        .map(|f| FileSpec {
            src: dir.join(&f.src),
            dest: f.dest,
            mode: f.mode.map(|m| m.0).unwrap_or(0o644),
            content_hash: String::new(),
        })
        .collect();
    let mut gpg_keys: Vec<String> = raw
        .gpg_keys
        .take()
        .unwrap_or_default()
        .into_iter()
        .map(|k| {
            if k.contains("://") {
                k
            } else {
                dir.join(k).to_string_lossy().into_owned()
            }
        })
        .collect();
    for f in &files {
        if !f.dest.starts_with('/') || f.dest.split('/').any(|s| s == "..") {
            return Err(RecipeError::Incomplete {
                path: path.into(),
                message: format!(
                    "file dest {:?} must be an absolute path without `..`",
                    f.dest
                ),
            });
        }
    }
    let Some(parent_rel) = raw.extends.take() else {
        return Ok(Layer {
            raw,
            files,
            gpg_keys,
        });
    };
    let parent_path = dir.join(&parent_rel);
    let parent = load_layer(&parent_path, depth + 1)?;
    let (p, c) = (parent.raw, raw);
    let mut packages = p.packages.unwrap_or_default();
    union(&mut packages, c.packages.unwrap_or_default());
    let mut remove = p.remove_packages.unwrap_or_default();
    union(&mut remove, c.remove_packages.unwrap_or_default());
    let mut services = p.services.unwrap_or_default();
    union(&mut services, c.services.unwrap_or_default());
    let mut commands = p.commands.unwrap_or_default();
    commands.extend(c.commands.unwrap_or_default());
    let mut merged_files: Vec<FileSpec> = parent
        .files
        .into_iter()
        .filter(|pf| !files.iter().any(|cf| cf.dest == pf.dest))
        .collect();
    merged_files.append(&mut files);
    let mut keys = parent.gpg_keys;
    union(&mut keys, gpg_keys);
    gpg_keys = keys;
    let raw = RawRecipe {
        name: c.name.or(p.name),
        distribution: c.distribution.or(p.distribution),
        release: c.release.or(p.release),
        architecture: c.architecture.or(p.architecture),
        extends: None,
        packages: Some(packages),
        remove_packages: Some(remove),
        variant: c.variant.or(p.variant),
        files: None,
        commands: Some(commands),
        services: Some(services),
        image_size: c.image_size.or(p.image_size),
        filesystem: c.filesystem.or(p.filesystem),
        kernel: c.kernel.or(p.kernel),
        kernel_cmdline: c.kernel_cmdline.or(p.kernel_cmdline),
        mirror: c.mirror.or(p.mirror),
        source_date_epoch: c.source_date_epoch.or(p.source_date_epoch),
        gpg_keys: None,
    };
    Ok(Layer {
        raw,
        files: merged_files,
        gpg_keys,
    })
}

impl Recipe {
    /// Loads, merges and validates a recipe file.
    pub fn load(path: impl AsRef<Path>) -> Result<Recipe, RecipeError> {
        let path = path.as_ref();
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let Layer {
            raw,
            files,
            gpg_keys,
        } = load_layer(&path, 0)?;
        let incomplete = |m: &str| RecipeError::Incomplete {
            path: path.clone(),
            message: m.into(),
        };
        let name = raw.name.ok_or_else(|| incomplete("`name` is missing"))?;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(incomplete("`name` must be non-empty [A-Za-z0-9._-]"));
        }
        let distribution = raw
            .distribution
            .ok_or_else(|| incomplete("`distribution` is missing (debian or fedora)"))?;
        let release = raw
            .release
            .ok_or_else(|| incomplete("`release` is missing (e.g. bookworm, 41)"))?;
        let remove_packages = raw.remove_packages.unwrap_or_default();
        let packages: Vec<String> = raw
            .packages
            .unwrap_or_default()
            .into_iter()
            .filter(|p| !remove_packages.contains(p))
            .collect();
        for p in &packages {
            if p.is_empty() || p.contains(|c: char| c.is_whitespace() || c == ',') {
                return Err(incomplete(&format!("package name {p:?} is not valid")));
            }
        }
        let mut files = files;
        for f in &mut files {
            let bytes = std::fs::read(&f.src).map_err(|source| RecipeError::MissingFile {
                recipe: path.clone(),
                src: f.src.clone(),
                dest: f.dest.clone(),
                source,
            })?;
            f.content_hash = blake3::hash(&bytes).to_hex().to_string();
        }
        let mut seen = BTreeSet::new();
        for f in &files {
            if !seen.insert(f.dest.clone()) {
                return Err(incomplete(&format!("two files install to {}", f.dest)));
            }
        }
        Ok(Recipe {
            path,
            name,
            distribution,
            release,
            architecture: raw.architecture.unwrap_or_else(|| "amd64".into()),
            packages,
            remove_packages,
            variant: raw.variant.unwrap_or_else(|| "minbase".into()),
            files,
            commands: raw.commands.unwrap_or_default(),
            services: raw.services.unwrap_or_default(),
            image_size: raw.image_size.map(|s| s.0).unwrap_or(DEFAULT_IMAGE_SIZE),
            filesystem: raw.filesystem.unwrap_or(Filesystem::Ext4),
            kernel: raw.kernel.unwrap_or(false),
            kernel_cmdline: raw
                .kernel_cmdline
                .unwrap_or_else(|| DEFAULT_KERNEL_CMDLINE.into()),
            mirror: raw.mirror,
            source_date_epoch: raw.source_date_epoch.unwrap_or(DEFAULT_SOURCE_DATE_EPOCH),
            gpg_keys,
        })
    }

    /// blake3 (hex) over the resolved recipe and the content of every file it installs
    /// (as read by [`Recipe::load`]). Host paths of the files and of local GPG keys do not
    /// count (their bytes do), so a moved checkout, or a builder that received copies of
    /// them, hashes the same.
    pub fn hash(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"qubes-template-recipe v1\0");
        let mut doc = serde_json::to_value(self).expect("recipe serialises");
        if let Some(files) = doc.get_mut("files").and_then(|f| f.as_array_mut()) {
            for f in files {
                if let Some(o) = f.as_object_mut() {
                    o.remove("src");
                }
            }
        }
        if let Some(keys) = doc.get_mut("gpg_keys").and_then(|k| k.as_array_mut()) {
            keys.retain(|k| k.as_str().is_some_and(|k| k.contains("://")));
        }
        h.update(doc.to_string().as_bytes());
        for k in self.gpg_keys.iter().filter(|k| !k.contains("://")) {
            if let Ok(bytes) = std::fs::read(k) {
                h.update(&bytes);
            }
        }
        h.finalize().to_hex().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column() {
        assert_eq!(line_col("a\nbc\nd", 3), (2, 2));
        assert_eq!(line_col("abc", 0), (1, 1));
    }

    #[test]
    fn sizes() {
        #[derive(Deserialize)]
        struct T {
            s: Size,
        }
        assert_eq!(toml::from_str::<T>("s = \"2G\"").unwrap().s, Size(2 << 30));
        assert_eq!(
            toml::from_str::<T>("s = \"512MiB\"").unwrap().s,
            Size(512 << 20)
        );
        assert!(toml::from_str::<T>("s = \"2X\"").is_err());
        assert!(toml::from_str::<T>("s = 1000").is_err());
    }

    #[test]
    fn typo_hint() {
        assert_eq!(
            hint_for("unknown field `pakages`, expected one of ...").unwrap(),
            "did you mean `packages`?"
        );
    }
}
