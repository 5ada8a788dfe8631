//! Signed template repositories: the publisher's index and keys, and the client's checks
//! and chunk-level fetching.
//!
//! # Repository layout (a directory, served over HTTP(S) or used as a local path)
//!
//! ```text
//! index.json            the index ([`Index`]): exact bytes that are signed
//! index.json.sig        [`SignatureFile`]: ed25519 over DOMAIN || index.json
//! keys.json(.sig)       optional key rotation: [`KeyList`] signed by the old key
//! packages/NAME-VERSION.qtpl   template packages (crate::package format), unchanged
//! ```
//!
//! Signatures are ed25519 through `ed25519-dalek` (RustCrypto/dalek, the reference Rust
//! implementation): one crate signs, verifies and derives keys, with no password prompt
//! or scrypt parameters in the way of a non-interactive publisher, and `verify_strict`
//! refuses malleable and small-order signatures. Key files are two hex lines.
//!
//! # What the client checks (TUF's threat list)
//! - the signature, by a key pinned in its trust store (or rotated to by a key list that
//!   a pinned key signed): bad, missing and unknown-key signatures are refused;
//! - the index version against the highest one seen for that key (rollback; a fresh
//!   install is held to it too);
//! - `expires` against the clock (freeze);
//! - the package's size from the server against the index before reading, and never a
//!   byte past the announced size (oversize, endless data);
//! - the manifest's blake3 against the index (mix-and-match), its name and release date
//!   against the index entry, then every fetched blob's blake3 on arrival.
//!
//! # Incremental fetching
//! The manifest lives at a known offset in the package (recorded in the index), and
//! every chunk is a zstd blob at a known offset: [`PackageFetch`] fetches the manifest
//! with one range request, then only the blobs whose content the caller does not hold,
//! coalescing neighbours into one request. Fetched ranges land at their own offsets in
//! a sparse `.part` file: an interrupted download resumes by re-checking what the file
//! holds (a blob is present when its bytes hash right), with no bookkeeping to trust.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::package::{self, BlobRef, PackageManifest, ZERO_CHUNK};

pub const INDEX: &str = "index.json";
pub const INDEX_SIG: &str = "index.json.sig";
pub const KEYS: &str = "keys.json";
pub const KEYS_SIG: &str = "keys.json.sig";
const INDEX_DOMAIN: &[u8] = b"qubes-ctl template index v1\0";
const KEYS_DOMAIN: &[u8] = b"qubes-ctl template key list v1\0";
const SECRET_HEADER: &str = "qubes-ctl template repository secret key";
const PUBLIC_HEADER: &str = "qubes-ctl template repository public key";
/// An index or key list beyond this is not one a publisher wrote.
const MAX_SMALL: u64 = 16 << 20;
/// Missing blobs closer than this are fetched in one request (the gap rides along).
const COALESCE_GAP: u64 = 64 << 10;
/// One request never asks for more than this (bounded memory per request).
const MAX_REQUEST: u64 = 64 << 20;
/// Default validity of a signed index.
pub const DEFAULT_EXPIRES_DAYS: u64 = 30;

#[derive(Debug, Error)]
pub enum RepoError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("fetching {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("{0}")]
    Key(String),
    #[error("{url}: the index has no signature ({INDEX_SIG} is missing); refusing an unsigned repository")]
    MissingSignature { url: String },
    #[error("{url}: the index signature does not verify with key {key}; the index was altered or signed by someone else")]
    BadSignature { url: String, key: String },
    #[error("{url}: the index is signed by key {key}, which is not trusted; pin it with `qubes-ctl template repo trust KEYFILE.pub` if you trust its publisher")]
    UnknownKey { url: String, key: String },
    #[error("{url}: index version {got} is older than version {seen} already seen from key {key}: refusing a rollback to an older index")]
    Rollback {
        url: String,
        key: String,
        got: u64,
        seen: u64,
    },
    #[error("{url}: the index expired at {expires} (unix time; now {now}): the repository is stale or frozen; ask its publisher to re-sign it")]
    Expired { url: String, expires: u64, now: u64 },
    #[error("{url}: {reason}")]
    BadIndex { url: String, reason: String },
    #[error("{what}: {reason}")]
    Mismatch { what: String, reason: String },
    #[error("{0}")]
    Package(#[from] package::PackageError),
    #[error("{0}")]
    Invalid(String),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RepoError {
    let path = path.to_path_buf();
    move |source| RepoError::Io { op, path, source }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.trim();
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Writes `bytes` to `path` through a temporary file and a rename (crash-safe).
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), RepoError> {
    let tmp = path.with_extension("tmp-write");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("creating", &tmp))?;
    f.write_all(bytes).map_err(io_err("writing", &tmp))?;
    f.sync_all().map_err(io_err("syncing", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("renaming", &tmp))?;
    Ok(())
}

// ------------------------------------------------------------------------- keys

/// Short form of a key for messages (the full key is 64 hex digits).
pub fn key_id(vk: &VerifyingKey) -> String {
    hex(vk.as_bytes())
}

/// Writes a new secret key at `path` (mode 0600) and its public key at `path.pub`.
pub fn keygen(path: &Path) -> Result<VerifyingKey, RepoError> {
    if path.exists() {
        return Err(RepoError::Key(format!(
            "{} exists; refusing to overwrite a key (remove it first)",
            path.display()
        )));
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|e| RepoError::Key(format!("no randomness for a new key: {e}")))?;
    let sk = SigningKey::from_bytes(&seed);
    let vk = sk.verifying_key();
    write_atomic(
        path,
        format!("{SECRET_HEADER}\n{}\n", hex(&seed)).as_bytes(),
        0o600,
    )?;
    write_atomic(
        &pub_path(path),
        format!("{PUBLIC_HEADER}\n{}\n", key_id(&vk)).as_bytes(),
        0o644,
    )?;
    Ok(vk)
}

pub fn pub_path(secret: &Path) -> PathBuf {
    let mut s = secret.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

fn key_body<'a>(path: &Path, text: &'a str, header: &str) -> Result<&'a str, RepoError> {
    let mut lines = text.lines();
    if lines.next() != Some(header) {
        return Err(RepoError::Key(format!(
            "{} is not a {header} file",
            path.display()
        )));
    }
    lines
        .next()
        .ok_or_else(|| RepoError::Key(format!("{} has no key line", path.display())))
}

pub fn load_secret(path: &Path) -> Result<SigningKey, RepoError> {
    let text = fs::read_to_string(path).map_err(io_err("reading key", path))?;
    let seed = unhex::<32>(key_body(path, &text, SECRET_HEADER)?)
        .ok_or_else(|| RepoError::Key(format!("{}: bad key line", path.display())))?;
    Ok(SigningKey::from_bytes(&seed))
}

pub fn parse_public(s: &str) -> Option<VerifyingKey> {
    VerifyingKey::from_bytes(&unhex::<32>(s)?).ok()
}

pub fn load_public(path: &Path) -> Result<VerifyingKey, RepoError> {
    let text = fs::read_to_string(path).map_err(io_err("reading key", path))?;
    parse_public(key_body(path, &text, PUBLIC_HEADER)?)
        .ok_or_else(|| RepoError::Key(format!("{}: not a valid ed25519 key", path.display())))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    /// The signer's public key (hex).
    pub key: String,
    /// ed25519 signature (hex) over DOMAIN || the signed file's bytes.
    pub signature: String,
}

fn sign(sk: &SigningKey, domain: &[u8], bytes: &[u8]) -> Vec<u8> {
    let mut msg = domain.to_vec();
    msg.extend_from_slice(bytes);
    let sig = SignatureFile {
        key: key_id(&sk.verifying_key()),
        signature: hex(&sk.sign(&msg).to_bytes()),
    };
    serde_json::to_vec_pretty(&sig).expect("signature serialises")
}

/// Which key signed `bytes`, once the signature verifies with it.
fn check_sig(
    url: &str,
    domain: &[u8],
    bytes: &[u8],
    sig: &[u8],
) -> Result<VerifyingKey, RepoError> {
    let bad = |key: &str| RepoError::BadSignature {
        url: url.into(),
        key: key.into(),
    };
    let s: SignatureFile = serde_json::from_slice(sig).map_err(|_| bad("(unreadable)"))?;
    let vk = parse_public(&s.key).ok_or_else(|| bad(&s.key))?;
    let sig = unhex::<64>(&s.signature).ok_or_else(|| bad(&s.key))?;
    let mut msg = domain.to_vec();
    msg.extend_from_slice(bytes);
    vk.verify_strict(&msg, &Signature::from_bytes(&sig))
        .map_err(|_| bad(&s.key))?;
    Ok(vk)
}

// ------------------------------------------------------------------------ index

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    pub format: u32,
    /// Grows with every signing; clients refuse one older than they have seen.
    pub version: u64,
    /// Unix time of signing.
    pub signed: u64,
    /// Unix time after which clients refuse the index.
    pub expires: u64,
    pub packages: Vec<IndexEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexEntry {
    pub name: String,
    pub version: String,
    /// The package manifest's build date.
    pub release_date: String,
    /// Path relative to the repository root.
    pub file: String,
    pub size: u64,
    /// blake3 (hex) of the whole package file.
    pub blake3: String,
    pub manifest_offset: u64,
    pub manifest_len: u64,
    /// blake3 (hex) of the manifest bytes.
    pub manifest_blake3: String,
    /// The image fingerprint the manifest claims (checked again on import).
    pub fingerprint: String,
    /// Image size.
    pub image_size: u64,
    /// Stored bytes of the image blobs (what a fresh install transfers, about).
    pub data_bytes: u64,
}

impl IndexEntry {
    pub fn label(&self) -> String {
        format!("{}-{}", self.name, self.version)
    }
}

/// Orders versions by runs: digits numerically, the rest bytewise (`4.10` > `4.9`).
pub fn cmp_version(a: &str, b: &str) -> std::cmp::Ordering {
    fn runs(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let b = s.as_bytes();
        for i in 1..=b.len() {
            if i == b.len() || b[i].is_ascii_digit() != b[start].is_ascii_digit() {
                out.push((b[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ra, rb) = (runs(a), runs(b));
    for (x, y) in ra.iter().zip(rb.iter()) {
        let o = match (x.0, y.0) {
            (true, true) => {
                let (tx, ty) = (x.1.trim_start_matches('0'), y.1.trim_start_matches('0'));
                tx.len().cmp(&ty.len()).then(tx.cmp(ty))
            }
            _ => x.1.cmp(y.1),
        };
        if o.is_ne() {
            return o;
        }
    }
    ra.len().cmp(&rb.len())
}

// -------------------------------------------------------------------- publisher

/// Creates an empty repository at `dir` signed with `key`.
pub fn repo_init(dir: &Path, key: &Path, expires_days: u64) -> Result<Index, RepoError> {
    let sk = load_secret(key)?;
    if dir.join(INDEX).exists() {
        return Err(RepoError::Invalid(format!(
            "{} already holds a repository; add packages with `template repo add`",
            dir.display()
        )));
    }
    fs::create_dir_all(dir.join("packages")).map_err(io_err("creating", dir))?;
    let idx = Index {
        format: 1,
        version: 1,
        signed: now_secs(),
        expires: now_secs() + expires_days * 86400,
        packages: Vec::new(),
    };
    write_index(dir, &idx, &sk)?;
    Ok(idx)
}

fn write_index(dir: &Path, idx: &Index, sk: &SigningKey) -> Result<(), RepoError> {
    let bytes = serde_json::to_vec_pretty(idx).expect("index serialises");
    // The signature goes first: a reader that sees the new index with the old signature
    // refuses it (and retries), never accepts a mismatched pair.
    let sig = sign(sk, INDEX_DOMAIN, &bytes);
    write_atomic(&dir.join(INDEX_SIG), &sig, 0o644)?;
    write_atomic(&dir.join(INDEX), &bytes, 0o644)
}

/// Reads the repository's own index (the publisher trusts its disk).
pub fn read_local_index(dir: &Path) -> Result<Index, RepoError> {
    let p = dir.join(INDEX);
    let bytes = fs::read(&p).map_err(io_err("reading", &p))?;
    serde_json::from_slice(&bytes).map_err(|e| RepoError::BadIndex {
        url: p.display().to_string(),
        reason: e.to_string(),
    })
}

/// Re-signs the index with a higher version (and a new expiry), optionally changed.
pub fn repo_resign(
    dir: &Path,
    key: &Path,
    expires_days: u64,
    change: impl FnOnce(&mut Index) -> Result<(), RepoError>,
) -> Result<Index, RepoError> {
    let sk = load_secret(key)?;
    let mut idx = read_local_index(dir)?;
    change(&mut idx)?;
    idx.version += 1;
    idx.signed = now_secs();
    idx.expires = now_secs() + expires_days * 86400;
    write_index(dir, &idx, &sk)?;
    Ok(idx)
}

/// Verifies `package` fully, copies it into the repository and re-signs the index.
pub fn repo_add(
    dir: &Path,
    key: &Path,
    package: &Path,
    version: &str,
    expires_days: u64,
) -> Result<(Index, IndexEntry), RepoError> {
    load_secret(key)?;
    let pkg = package::read_package(package)?;
    let m = pkg.manifest().clone();
    drop(pkg);
    if version.is_empty() || version.contains('/') || version.starts_with('.') {
        return Err(RepoError::Invalid(format!("bad version {version:?}")));
    }
    let (manifest_offset, manifest_len) = manifest_span(package)?;
    let file = format!("packages/{}-{version}.qtpl", m.name);
    let dst = dir.join(&file);
    let tmp = dst.with_extension("partial");
    fs::copy(package, &tmp).map_err(io_err("copying the package to", &tmp))?;
    let (size, blake3) = hash_file(&tmp)?;
    let f = fs::File::open(&tmp).map_err(io_err("opening", &tmp))?;
    let mut mbytes = vec![0u8; manifest_len as usize];
    f.read_exact_at(&mut mbytes, manifest_offset)
        .map_err(io_err("reading the manifest of", &tmp))?;
    let entry = IndexEntry {
        name: m.name.clone(),
        version: version.into(),
        release_date: m.build_date.clone(),
        file: file.clone(),
        size,
        blake3,
        manifest_offset,
        manifest_len,
        manifest_blake3: blake3::hash(&mbytes).to_hex().to_string(),
        fingerprint: m.fingerprint.clone(),
        image_size: m.size,
        data_bytes: m.blobs.iter().map(|b| b.stored_len).sum(),
    };
    let e2 = entry.clone();
    let idx = repo_resign(dir, key, expires_days, move |idx| {
        if idx
            .packages
            .iter()
            .any(|p| p.name == e2.name && p.version == e2.version)
        {
            return Err(RepoError::Invalid(format!(
                "{} is already in the repository; publish a new version",
                e2.label()
            )));
        }
        fs::rename(&tmp, &dst).map_err(io_err("renaming", &tmp))?;
        idx.packages.push(e2);
        Ok(())
    })?;
    Ok((idx, entry))
}

/// Signs a key list with the old key and re-signs the index with the new one: clients
/// that trust the old key move to the new one when they next read the repository.
pub fn repo_rotate(
    dir: &Path,
    old_key: &Path,
    new_key: &Path,
    expires_days: u64,
) -> Result<KeyList, RepoError> {
    let old = load_secret(old_key)?;
    let new = load_secret(new_key)?;
    let version = match fs::read(dir.join(KEYS)) {
        Ok(b) => {
            serde_json::from_slice::<KeyList>(&b)
                .map_err(|e| RepoError::Invalid(format!("{KEYS}: {e}")))?
                .version
                + 1
        }
        Err(_) => 1,
    };
    let list = KeyList {
        version,
        keys: vec![key_id(&new.verifying_key())],
    };
    let bytes = serde_json::to_vec_pretty(&list).expect("key list serialises");
    write_atomic(&dir.join(KEYS_SIG), &sign(&old, KEYS_DOMAIN, &bytes), 0o644)?;
    write_atomic(&dir.join(KEYS), &bytes, 0o644)?;
    repo_resign(dir, new_key, expires_days, |_| Ok(()))?;
    Ok(list)
}

/// The keys that sign a repository from now on, signed by a key the client trusts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyList {
    pub version: u64,
    pub keys: Vec<String>,
}

fn hash_file(p: &Path) -> Result<(u64, String), RepoError> {
    let mut f = fs::File::open(p).map_err(io_err("opening", p))?;
    let mut h = blake3::Hasher::new();
    let n = io::copy(&mut f, &mut h).map_err(io_err("reading", p))?;
    Ok((n, h.finalize().to_hex().to_string()))
}

fn manifest_span(package: &Path) -> Result<(u64, u64), RepoError> {
    let f = fs::File::open(package).map_err(io_err("opening", package))?;
    let mut h = [0u8; 32];
    f.read_exact_at(&mut h, 0)
        .map_err(io_err("reading the header of", package))?;
    let u = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    Ok((u(16), u(24)))
}

// ------------------------------------------------------------------ trust store

/// The client's pinned keys and the highest index version seen per key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrustStore {
    /// Hex public keys.
    pub keys: Vec<String>,
    /// Keys that a key list replaced: refused from now on.
    pub retired: Vec<String>,
    pub highest: BTreeMap<String, u64>,
    pub key_list_version: BTreeMap<String, u64>,
}

impl TrustStore {
    pub fn load(path: &Path) -> Result<TrustStore, RepoError> {
        match fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                RepoError::Invalid(format!("{}: damaged trust store: {e}", path.display()))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(TrustStore::default()),
            Err(e) => Err(io_err("reading", path)(e)),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), RepoError> {
        if let Some(d) = path.parent() {
            fs::create_dir_all(d).map_err(io_err("creating", d))?;
        }
        write_atomic(
            path,
            &serde_json::to_vec_pretty(self).expect("trust store serialises"),
            0o644,
        )
    }

    pub fn trust(&mut self, vk: &VerifyingKey) -> bool {
        let k = key_id(vk);
        self.retired.retain(|r| *r != k);
        if self.keys.contains(&k) {
            return false;
        }
        self.keys.push(k);
        true
    }

    fn trusts(&self, k: &str) -> bool {
        self.keys.iter().any(|x| x == k)
    }
}

// ----------------------------------------------------------------------- source

/// Where a repository is: an HTTP(S) base URL or a local directory.
pub struct Source {
    url: String,
    kind: SourceKind,
}

enum SourceKind {
    Http(ureq::Agent),
    Local(PathBuf),
}

impl Source {
    pub fn new(url: &str) -> Source {
        let url = url.trim_end_matches('/').to_string();
        let kind = if url.starts_with("http://") || url.starts_with("https://") {
            SourceKind::Http(
                ureq::AgentBuilder::new()
                    .timeout_connect(Duration::from_secs(30))
                    .timeout_read(Duration::from_secs(120))
                    .build(),
            )
        } else {
            SourceKind::Local(PathBuf::from(url.strip_prefix("file://").unwrap_or(&url)))
        };
        Source { url, kind }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn full(&self, rel: &str) -> String {
        format!("{}/{rel}", self.url)
    }

    fn fetch_err(&self, rel: &str, reason: impl std::fmt::Display) -> RepoError {
        RepoError::Fetch {
            url: self.full(rel),
            reason: reason.to_string(),
        }
    }

    /// A small file whole (index, signature); `None` if the repository has none.
    fn get_small(&self, rel: &str) -> Result<Option<Vec<u8>>, RepoError> {
        let mut out = Vec::new();
        match &self.kind {
            SourceKind::Local(dir) => {
                let p = dir.join(rel);
                match fs::File::open(&p) {
                    Ok(f) => f.take(MAX_SMALL + 1).read_to_end(&mut out),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(io_err("opening", &p)(e)),
                }
                .map_err(io_err("reading", &p))?;
            }
            SourceKind::Http(agent) => match agent.get(&self.full(rel)).call() {
                Ok(r) => {
                    r.into_reader()
                        .take(MAX_SMALL + 1)
                        .read_to_end(&mut out)
                        .map_err(|e| self.fetch_err(rel, e))?;
                }
                Err(ureq::Error::Status(404, _)) => return Ok(None),
                Err(e) => return Err(self.fetch_err(rel, e)),
            },
        }
        if out.len() as u64 > MAX_SMALL {
            return Err(self.fetch_err(rel, format!("larger than {MAX_SMALL} bytes")));
        }
        Ok(Some(out))
    }

    /// Copies `len` bytes at `offset` of `rel` into `sink`, after checking that the file
    /// is `total` bytes as the index says. Never reads past `len`. Returns bytes read.
    fn get_range(
        &self,
        rel: &str,
        total: u64,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), RepoError>,
    ) -> Result<u64, RepoError> {
        let size_err = |got: String| RepoError::Mismatch {
            what: self.full(rel),
            reason: format!(
                "the repository serves {got} bytes but its signed index says {total}; \
                 refusing a package that differs from the index"
            ),
        };
        let mut reader: Box<dyn Read> = match &self.kind {
            SourceKind::Local(dir) => {
                let p = dir.join(rel);
                let f = fs::File::open(&p).map_err(io_err("opening", &p))?;
                let n = f.metadata().map_err(io_err("stat", &p))?.len();
                if n != total {
                    return Err(size_err(n.to_string()));
                }
                let mut f = f;
                io::Seek::seek(&mut f, io::SeekFrom::Start(offset))
                    .map_err(io_err("seeking", &p))?;
                Box::new(f)
            }
            SourceKind::Http(agent) => {
                let r = agent
                    .get(&self.full(rel))
                    .set("Range", &format!("bytes={offset}-{}", offset + len - 1))
                    .call()
                    .map_err(|e| self.fetch_err(rel, e))?;
                match r.status() {
                    206 => {
                        let cr = r.header("Content-Range").unwrap_or("").to_string();
                        let tot = cr.rsplit('/').next().unwrap_or("");
                        if tot != total.to_string() {
                            return Err(size_err(tot.to_string()));
                        }
                        let want = format!("bytes {offset}-{}/", offset + len - 1);
                        if !cr.starts_with(&want) {
                            return Err(self.fetch_err(
                                rel,
                                format!("asked for {want}, the server sent {cr}"),
                            ));
                        }
                    }
                    200 => {
                        // No range support: only usable for the whole file from 0.
                        let cl = r.header("Content-Length").unwrap_or("?").to_string();
                        if cl != total.to_string() {
                            return Err(size_err(cl));
                        }
                        if offset != 0 {
                            return Err(self.fetch_err(
                                rel,
                                "the server ignores range requests; serve the repository \
                                 with one that supports them (needed for incremental updates)",
                            ));
                        }
                    }
                    s => return Err(self.fetch_err(rel, format!("HTTP status {s}"))),
                }
                Box::new(r.into_reader())
            }
        };
        let mut got = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        while got < len {
            let want = ((len - got) as usize).min(buf.len());
            let n = reader
                .read(&mut buf[..want])
                .map_err(|e| self.fetch_err(rel, e))?;
            if n == 0 {
                return Err(self.fetch_err(
                    rel,
                    format!("ended after {got} of {len} bytes at offset {offset}"),
                ));
            }
            sink(&buf[..n])?;
            got += n as u64;
        }
        Ok(got)
    }
}

// ------------------------------------------------------------------------ client

/// A repository whose index passed every check.
pub struct Repo {
    pub source: Source,
    pub index: Index,
    pub key: String,
}

/// Fetches and checks a repository's index; records the version seen in `trust` (the
/// caller saves it). Key rotation: an index signed by an unknown key is accepted when
/// the repository's key list names that key and is signed by a trusted one.
pub fn open_repo(url: &str, trust: &mut TrustStore, now: u64) -> Result<Repo, RepoError> {
    let source = Source::new(url);
    let u = source.url().to_string();
    let bytes = source
        .get_small(INDEX)?
        .ok_or_else(|| RepoError::BadIndex {
            url: u.clone(),
            reason: format!("no {INDEX}: not a template repository"),
        })?;
    let sig = source
        .get_small(INDEX_SIG)?
        .ok_or_else(|| RepoError::MissingSignature { url: u.clone() })?;
    let vk = check_sig(&u, INDEX_DOMAIN, &bytes, &sig)?;
    let key = key_id(&vk);
    if !trust.trusts(&key) {
        rotate_to(&source, trust, &key)?;
    }
    let index: Index = serde_json::from_slice(&bytes).map_err(|e| RepoError::BadIndex {
        url: u.clone(),
        reason: format!("not a valid index: {e}"),
    })?;
    if index.format != 1 {
        return Err(RepoError::BadIndex {
            url: u,
            reason: format!("index format {} (this build reads 1)", index.format),
        });
    }
    let seen = trust.highest.get(&key).copied().unwrap_or(0);
    if index.version < seen {
        return Err(RepoError::Rollback {
            url: u,
            key,
            got: index.version,
            seen,
        });
    }
    if now >= index.expires {
        return Err(RepoError::Expired {
            url: u,
            expires: index.expires,
            now,
        });
    }
    trust.highest.insert(key.clone(), index.version);
    Ok(Repo { source, index, key })
}

fn rotate_to(source: &Source, trust: &mut TrustStore, key: &str) -> Result<(), RepoError> {
    let u = source.url().to_string();
    let unknown = || RepoError::UnknownKey {
        url: u.clone(),
        key: key.into(),
    };
    let (Some(list), Some(sig)) = (source.get_small(KEYS)?, source.get_small(KEYS_SIG)?) else {
        return Err(unknown());
    };
    let signer = key_id(&check_sig(&u, KEYS_DOMAIN, &list, &sig)?);
    if !trust.trusts(&signer) {
        return Err(unknown());
    }
    let kl: KeyList = serde_json::from_slice(&list).map_err(|e| RepoError::BadIndex {
        url: u.clone(),
        reason: format!("{KEYS}: {e}"),
    })?;
    let seen = trust.key_list_version.get(&signer).copied().unwrap_or(0);
    if kl.version < seen {
        return Err(RepoError::Rollback {
            url: format!("{u}/{KEYS}"),
            key: signer,
            got: kl.version,
            seen,
        });
    }
    if !kl.keys.iter().any(|k| k == key) {
        return Err(unknown());
    }
    // The new keys inherit the old key's rollback floor.
    let floor = trust.highest.get(&signer).copied().unwrap_or(0);
    for k in &kl.keys {
        let vk = parse_public(k).ok_or_else(unknown)?;
        trust.trust(&vk);
        trust.key_list_version.insert(key_id(&vk), kl.version);
        let h = trust.highest.entry(key_id(&vk)).or_insert(0);
        *h = (*h).max(floor);
    }
    if !kl.keys.contains(&signer) {
        trust.keys.retain(|k| *k != signer);
        trust.retired.push(signer);
    }
    Ok(())
}

/// A download in progress: the verified manifest, and the `.part` file that holds the
/// fetched ranges at their package offsets.
pub struct PackageFetch<'r> {
    repo: &'r Repo,
    pub entry: IndexEntry,
    pub manifest: PackageManifest,
    part: fs::File,
    part_path: PathBuf,
    /// Bytes received from the repository by this process.
    pub fetched_bytes: u64,
    pub requests: u64,
    progress: bool,
}

impl<'r> PackageFetch<'r> {
    /// Fetches and checks the manifest of `entry` (the part file lives in `cache`).
    pub fn start(
        repo: &'r Repo,
        entry: &IndexEntry,
        cache: &Path,
        progress: bool,
    ) -> Result<PackageFetch<'r>, RepoError> {
        fs::create_dir_all(cache).map_err(io_err("creating", cache))?;
        let tag = entry.blake3.get(..16).unwrap_or("x");
        let part_path = cache.join(format!("{}.{tag}.part", entry.label()));
        let part = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part_path)
            .map_err(io_err("opening", &part_path))?;
        part.set_len(entry.size)
            .map_err(io_err("sizing", &part_path))?;
        if entry.manifest_len > 256 << 20
            || entry
                .manifest_offset
                .checked_add(entry.manifest_len)
                .is_none_or(|e| e != entry.size)
        {
            return Err(RepoError::BadIndex {
                url: repo.source.url().into(),
                reason: format!("{}: manifest outside the package", entry.label()),
            });
        }
        let mut f = PackageFetch {
            repo,
            entry: entry.clone(),
            manifest: empty_manifest(),
            part,
            part_path,
            fetched_bytes: 0,
            requests: 0,
            progress,
        };
        let want = unhex::<32>(&entry.manifest_blake3).ok_or_else(|| RepoError::BadIndex {
            url: repo.source.url().into(),
            reason: "bad manifest hash".into(),
        })?;
        let span = (entry.manifest_offset, entry.manifest_len);
        if !f.holds(span.0, span.1, &want)? {
            f.fetch_ranges(&[span], false)?;
        }
        let mut bytes = vec![0u8; span.1 as usize];
        f.part
            .read_exact_at(&mut bytes, span.0)
            .map_err(io_err("reading", &f.part_path))?;
        let what = format!("{}/{}", repo.source.url(), entry.file);
        if blake3::hash(&bytes).as_bytes() != &want {
            return Err(RepoError::Mismatch {
                what,
                reason: "the package's manifest does not match the signed index \
                         (a different or altered package); nothing was installed"
                    .into(),
            });
        }
        let m: PackageManifest =
            serde_json::from_slice(&bytes).map_err(|e| RepoError::Mismatch {
                what: what.clone(),
                reason: format!("unreadable manifest: {e}"),
            })?;
        let mism = |field: &str, got: &str, want: &str| RepoError::Mismatch {
            what: what.clone(),
            reason: format!(
                "the package's {field} is {got:?} but the signed index says {want:?}; refusing it"
            ),
        };
        if m.name != entry.name {
            return Err(mism("name", &m.name, &entry.name));
        }
        if m.build_date != entry.release_date {
            return Err(mism(
                "release date (version)",
                &m.build_date,
                &entry.release_date,
            ));
        }
        if m.fingerprint != entry.fingerprint || m.size != entry.image_size {
            return Err(mism("fingerprint", &m.fingerprint, &entry.fingerprint));
        }
        package::check_manifest_layout(&m, entry.manifest_offset).map_err(|reason| {
            RepoError::Mismatch {
                what: what.clone(),
                reason,
            }
        })?;
        f.manifest = m;
        Ok(f)
    }

    /// Whether the part file already holds bytes hashing to `want` at `offset`.
    fn holds(&self, offset: u64, len: u64, want: &[u8; 32]) -> Result<bool, RepoError> {
        let mut b = vec![0u8; len as usize];
        self.part
            .read_exact_at(&mut b, offset)
            .map_err(io_err("reading", &self.part_path))?;
        Ok(blake3::hash(&b).as_bytes() == want)
    }

    fn fetch_ranges(&mut self, spans: &[(u64, u64)], bar: bool) -> Result<(), RepoError> {
        let total: u64 = spans.iter().map(|s| s.1).sum();
        let pb = if bar && self.progress {
            let pb = indicatif::ProgressBar::new(total);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            pb.set_message(format!("fetching {}", self.entry.label()));
            pb
        } else {
            indicatif::ProgressBar::hidden()
        };
        for &(off, len) in spans {
            let mut pos = off;
            let part = &self.part;
            let pp = &self.part_path;
            let n = self.repo.source.get_range(
                &self.entry.file,
                self.entry.size,
                off,
                len,
                &mut |b| {
                    part.write_all_at(b, pos).map_err(io_err("writing", pp))?;
                    pos += b.len() as u64;
                    pb.inc(b.len() as u64);
                    Ok(())
                },
            )?;
            self.fetched_bytes += n;
            self.requests += 1;
        }
        pb.finish_and_clear();
        Ok(())
    }

    /// Fetches every blob of `blobs` the part file does not hold yet, and checks each
    /// one's stored blake3 on arrival.
    pub fn fetch_blobs(&mut self, blobs: &[BlobRef]) -> Result<(), RepoError> {
        let mut missing: Vec<&BlobRef> = Vec::new();
        let present: Vec<bool> = blobs
            .par_iter()
            .map(|b| self.holds(b.offset, b.stored_len, &b.stored_hash))
            .collect::<Result<_, _>>()?;
        for (b, p) in blobs.iter().zip(present) {
            if !p {
                missing.push(b);
            }
        }
        missing.sort_by_key(|b| b.offset);
        let mut spans: Vec<(u64, u64)> = Vec::new();
        for b in &missing {
            match spans.last_mut() {
                Some((o, l))
                    if b.offset <= *o + *l + COALESCE_GAP
                        && b.offset + b.stored_len - *o <= MAX_REQUEST =>
                {
                    *l = (b.offset + b.stored_len).max(*o + *l) - *o;
                }
                _ => spans.push((b.offset, b.stored_len)),
            }
        }
        self.fetch_ranges(&spans, true)?;
        let bad = missing
            .par_iter()
            .map(|b| Ok((b, self.holds(b.offset, b.stored_len, &b.stored_hash)?)))
            .collect::<Result<Vec<_>, RepoError>>()?
            .into_iter()
            .find(|(_, ok)| !ok);
        if let Some((b, _)) = bad {
            return Err(RepoError::Mismatch {
                what: format!("{}/{}", self.repo.source.url(), self.entry.file),
                reason: format!(
                    "the blob at offset {} does not match its blake3 in the signed manifest; \
                     nothing was installed",
                    b.offset
                ),
            });
        }
        Ok(())
    }

    /// Decompresses a fetched blob (kernel, initrd) and checks its content hash.
    pub fn blob_bytes(&self, b: &BlobRef) -> Result<Vec<u8>, RepoError> {
        let mut stored = vec![0u8; b.stored_len as usize];
        self.part
            .read_exact_at(&mut stored, b.offset)
            .map_err(io_err("reading", &self.part_path))?;
        let mut out = vec![0u8; b.len as usize];
        unpack(&stored, b, &mut out).map_err(|reason| RepoError::Mismatch {
            what: self.entry.label(),
            reason,
        })?;
        Ok(out)
    }

    /// The image in order: each chunk from `local` when it holds that content (checked
    /// again as it is read), otherwise from the fetched blobs (decompressed and checked).
    pub fn image_reader<'a>(&'a self, local: &'a dyn LocalChunks) -> impl Read + 'a {
        Assembler {
            fetch: self,
            local,
            next: 0,
            buf: Vec::new(),
            pos: 0,
            blob_of: self
                .manifest
                .blobs
                .iter()
                .enumerate()
                .map(|(i, b)| (b.hash, i))
                .collect(),
        }
    }

    /// Forgets the part file (after a successful install).
    pub fn finish(self) {
        let _ = fs::remove_file(&self.part_path);
    }
}

fn empty_manifest() -> PackageManifest {
    PackageManifest {
        format_version: 0,
        name: String::new(),
        size: 0,
        chunk_size: 0,
        chunk_hashes: Vec::new(),
        blobs: Vec::new(),
        kernel: None,
        initrd: None,
        kernel_cmdline: String::new(),
        packages: Vec::new(),
        recipe_hash: String::new(),
        fingerprint: String::new(),
        build_date: String::new(),
        created_by: String::new(),
    }
}

fn unpack(stored: &[u8], b: &BlobRef, out: &mut [u8]) -> Result<(), String> {
    if blake3::hash(stored).as_bytes() != &b.stored_hash {
        return Err("a blob's stored bytes do not match the manifest".into());
    }
    let n = zstd::bulk::decompress_to_buffer(stored, out).map_err(|e| format!("zstd: {e}"))?;
    if n as u64 != b.len || blake3::hash(out).as_bytes() != &b.hash {
        return Err("a blob's content does not match the manifest".into());
    }
    Ok(())
}

/// Content the client already holds, by blake3 of a chunk (e.g. the installed version
/// of the template, in the pool).
pub trait LocalChunks: Sync {
    /// Fills `out` with the chunk of this content, if held; `Ok(false)` if not.
    fn read_chunk(&self, hash: &[u8; 32], out: &mut [u8]) -> io::Result<bool>;
    fn has(&self, hash: &[u8; 32]) -> bool;
}

/// Nothing held locally (a fresh install).
pub struct NoChunks;

impl LocalChunks for NoChunks {
    fn read_chunk(&self, _: &[u8; 32], _: &mut [u8]) -> io::Result<bool> {
        Ok(false)
    }
    fn has(&self, _: &[u8; 32]) -> bool {
        false
    }
}

/// The chunks of a block device, cut at a manifest's chunk size and hashed.
pub struct DeviceChunks<'d> {
    dev: &'d dyn storage::BlockDevice,
    at: HashMap<[u8; 32], u64>,
}

impl<'d> DeviceChunks<'d> {
    pub fn scan(dev: &'d dyn storage::BlockDevice, chunk_size: u64) -> io::Result<Self> {
        let n = dev.size() / chunk_size;
        let at = (0..n)
            .into_par_iter()
            .map_init(
                || vec![0u8; chunk_size as usize],
                |buf, i| -> io::Result<Option<([u8; 32], u64)>> {
                    dev.read_at(buf, i * chunk_size).map_err(io::Error::other)?;
                    if buf.iter().all(|&b| b == 0) {
                        return Ok(None);
                    }
                    Ok(Some((*blake3::hash(buf).as_bytes(), i * chunk_size)))
                },
            )
            .collect::<io::Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        Ok(DeviceChunks { dev, at })
    }

    pub fn len(&self) -> usize {
        self.at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }
}

impl LocalChunks for DeviceChunks<'_> {
    fn read_chunk(&self, hash: &[u8; 32], out: &mut [u8]) -> io::Result<bool> {
        let Some(&off) = self.at.get(hash) else {
            return Ok(false);
        };
        self.dev.read_at(out, off).map_err(io::Error::other)?;
        // The device may have changed since the scan: only verified content counts.
        Ok(blake3::hash(out).as_bytes() == hash)
    }
    fn has(&self, hash: &[u8; 32]) -> bool {
        self.at.contains_key(hash)
    }
}

/// The blobs of `m` that `local` does not hold (what an update must fetch).
pub fn missing_blobs(m: &PackageManifest, local: &dyn LocalChunks) -> Vec<BlobRef> {
    let need: HashSet<[u8; 32]> = m
        .chunk_hashes
        .iter()
        .filter(|h| **h != ZERO_CHUNK && !local.has(h))
        .copied()
        .collect();
    m.blobs
        .iter()
        .filter(|b| need.contains(&b.hash))
        .cloned()
        .collect()
}

const ASSEMBLE_BATCH: u64 = 64;

struct Assembler<'a> {
    fetch: &'a PackageFetch<'a>,
    local: &'a dyn LocalChunks,
    next: u64,
    buf: Vec<u8>,
    pos: usize,
    blob_of: HashMap<[u8; 32], usize>,
}

impl Assembler<'_> {
    fn refill(&mut self) -> io::Result<()> {
        let m = &self.fetch.manifest;
        let n = m.chunk_hashes.len() as u64;
        let end = (self.next + ASSEMBLE_BATCH).min(n);
        let start_byte = self.next * m.chunk_size;
        let end_byte = (end * m.chunk_size).min(m.size);
        self.buf.resize((end_byte - start_byte) as usize, 0);
        let first = self.next;
        let (fetch, local, blob_of) = (self.fetch, self.local, &self.blob_of);
        self.buf
            .par_chunks_mut(m.chunk_size as usize)
            .enumerate()
            .try_for_each(|(k, out)| -> io::Result<()> {
                let i = first + k as u64;
                let h = &m.chunk_hashes[i as usize];
                if *h == ZERO_CHUNK {
                    out.fill(0);
                    return Ok(());
                }
                if out.len() as u64 == m.chunk_size && local.read_chunk(h, out)? {
                    return Ok(());
                }
                let b = blob_of
                    .get(h)
                    .map(|&x| &m.blobs[x])
                    .ok_or_else(|| io::Error::other(format!("chunk {i} has no blob")))?;
                let mut stored = vec![0u8; b.stored_len as usize];
                fetch.part.read_exact_at(&mut stored, b.offset)?;
                unpack(&stored, b, out).map_err(|r| {
                    io::Error::other(format!(
                        "{} chunk {i}: {r} (it was not fetched, or was altered)",
                        fetch.entry.label()
                    ))
                })
            })?;
        self.pos = 0;
        self.next = end;
        Ok(())
    }
}

impl Read for Assembler<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            if self.next as usize == self.fetch.manifest.chunk_hashes.len() {
                return Ok(0);
            }
            self.refill()?;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_numerically() {
        use std::cmp::Ordering::*;
        assert_eq!(cmp_version("4.10", "4.9"), Greater);
        assert_eq!(cmp_version("1.0", "1.0"), Equal);
        assert_eq!(cmp_version("1.0-2", "1.0"), Greater);
        assert_eq!(cmp_version("2", "10"), Less);
    }

    #[test]
    fn signatures_verify_and_tampering_fails() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("k");
        let vk = keygen(&k).unwrap();
        assert_eq!(load_public(&pub_path(&k)).unwrap(), vk);
        let sk = load_secret(&k).unwrap();
        let sig = sign(&sk, INDEX_DOMAIN, b"hello");
        assert_eq!(check_sig("u", INDEX_DOMAIN, b"hello", &sig).unwrap(), vk);
        assert!(check_sig("u", INDEX_DOMAIN, b"hellp", &sig).is_err());
        assert!(check_sig("u", KEYS_DOMAIN, b"hello", &sig).is_err());
        assert!(keygen(&k).is_err(), "never overwrites a key");
    }
}
