//! Template packages: one portable file holding a template image, its kernel and initrd,
//! and the metadata to trust them.
//!
//! Contract: [`read_package`] returns a [`VerifiedPackage`] only after the header checksum,
//! the manifest hash, and the blake3 of EVERY stored chunk (and of the kernel and initrd)
//! have been checked against the manifest; any damage is an error that names the region
//! (header, manifest, chunk N, kernel, initrd) and nothing has been written anywhere. The
//! package is streamed, never held in memory whole (it can be many GiB and comes from the
//! network): open hashes each stored blob from the file, and reading re-reads it. Each
//! chunk carries two hashes: of its stored (zstd) bytes, checked at open without
//! decompressing, and of its content, checked again (against the verified manifest, kept
//! in memory) as [`VerifiedPackage::image_reader`] unpacks it, so a file changed after
//! verification is an error, never wrong data.
//!
//! # File layout (format version 1, little endian)
//!
//! ```text
//! offset 0     header, 128 bytes
//!              0..8    magic "QTMPLPKG"
//!              8..12   format version (u32) = 1
//!              12..16  flags (u32) = 0
//!              16..24  manifest offset (u64)
//!              24..32  manifest length (u64)
//!              32..64  blake3 of the manifest bytes
//!              64..96  reserved, zero
//!              96..128 blake3 of bytes 0..96 (header checksum)
//! offset 128   data: blobs back to back, each one zstd frame
//!              (unique non-zero image chunks in image order, then kernel, then initrd)
//! manifest     JSON ([`PackageManifest`]); the file ends exactly at its last byte
//! ```
//!
//! The image is cut into `chunk_size` chunks. `chunk_hashes[i]` is the blake3 of chunk i,
//! or all zero bytes ([`ZERO_CHUNK`]) for a chunk of zeros, which has no blob. Identical
//! chunks share one blob (looked up by hash). The manifest is written last, so a
//! package whose writer died has no valid header and is refused.
//!
//! Export reads the source through [`storage::BlockDevice`] (holes reported by
//! `block_status` are not read), hashes and compresses batches of chunks in parallel with
//! rayon, and writes blobs in order; import decompresses and verifies in parallel.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use storage::{BlockDevice, BlockError};
use thiserror::Error;

pub const MAGIC: [u8; 8] = *b"QTMPLPKG";
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 128;
pub const DEFAULT_CHUNK_SIZE: u64 = 256 << 10;
/// Marks a chunk of zeros in `chunk_hashes` (blake3 never yields it in practice).
pub const ZERO_CHUNK: [u8; 32] = [0; 32];
const ZSTD_LEVEL: i32 = 3;
/// Chunks handled per parallel batch (export and import).
const BATCH: usize = 64;
/// A manifest beyond this is not something this code wrote.
const MAX_MANIFEST: u64 = 256 << 20;

#[derive(Debug, Error)]
pub enum PackageError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the image to export: {0}")]
    ReadingImage(#[from] BlockError),
    #[error("{path} is not a template package (bad magic)")]
    NotAPackage { path: PathBuf },
    #[error("{path}: package format version {version} is not supported (this build reads {FORMAT_VERSION})")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path}: header checksum mismatch (the header is damaged)")]
    HeaderCorrupt { path: PathBuf },
    #[error("{path}: file is {actual} bytes, the header says {expected} (truncated or extended)")]
    Truncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: manifest is damaged: {reason}")]
    ManifestCorrupt { path: PathBuf, reason: String },
    #[error("{path}: chunk {chunk} (image offset {offset}) is damaged: {reason}")]
    ChunkCorrupt {
        path: PathBuf,
        chunk: u64,
        offset: u64,
        reason: String,
    },
    #[error("{path}: {what} is damaged: {reason}")]
    BlobCorrupt {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("invalid export request: {0}")]
    Invalid(String),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PackageError {
    let path = path.to_path_buf();
    move |source| PackageError::Io { op, path, source }
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn to_hex(b: &[u8; 32]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Option<[u8; 32]> {
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(out)
    }

    pub fn serialize<S: Serializer>(b: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&to_hex(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        from_hex(&s).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }

    pub mod vec {
        use serde::ser::SerializeSeq;
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(v: &[[u8; 32]], s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(v.len()))?;
            for b in v {
                seq.serialize_element(&super::to_hex(b))?;
            }
            seq.end()
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<[u8; 32]>, D::Error> {
            Vec::<String>::deserialize(d)?
                .iter()
                .map(|s| {
                    super::from_hex(s)
                        .ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
                })
                .collect()
        }
    }
}

/// Where one blob lives and what it must decompress to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// blake3 of the decompressed bytes.
    #[serde(with = "hex32")]
    pub hash: [u8; 32],
    /// blake3 of the stored (compressed) bytes: every blob is checked against it when
    /// the package is opened, before anything is returned.
    #[serde(with = "hex32")]
    pub stored_hash: [u8; 32],
    /// Absolute file offset of the zstd frame.
    pub offset: u64,
    pub stored_len: u64,
    /// Decompressed length.
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageManifest {
    pub format_version: u32,
    pub name: String,
    /// Image size in bytes.
    pub size: u64,
    pub chunk_size: u64,
    /// blake3 per chunk; [`ZERO_CHUNK`] for a chunk of zeros.
    #[serde(with = "hex32::vec")]
    pub chunk_hashes: Vec<[u8; 32]>,
    /// Unique non-zero chunks, in file order.
    pub blobs: Vec<BlobRef>,
    pub kernel: Option<BlobRef>,
    pub initrd: Option<BlobRef>,
    pub kernel_cmdline: String,
    pub packages: Vec<String>,
    pub recipe_hash: String,
    /// blake3 (hex) over the image bytes.
    pub fingerprint: String,
    pub build_date: String,
    pub created_by: String,
}

impl PackageManifest {
    pub fn has_kernel(&self) -> bool {
        self.kernel.is_some()
    }
    pub fn has_initrd(&self) -> bool {
        self.initrd.is_some()
    }
}

/// What the exporter knows about the template besides its bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateMeta {
    pub packages: Vec<String>,
    pub recipe_hash: String,
    pub build_date: String,
    pub kernel_cmdline: String,
}

impl From<&crate::build::BuiltTemplate> for TemplateMeta {
    fn from(t: &crate::build::BuiltTemplate) -> Self {
        TemplateMeta {
            packages: t.packages.clone(),
            recipe_hash: t.recipe_hash.clone(),
            build_date: t.build_date.clone(),
            kernel_cmdline: t.kernel_cmdline.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportStats {
    pub image_bytes: u64,
    pub chunks: u64,
    pub zero_chunks: u64,
    /// Non-zero chunks that repeat an earlier one (stored once).
    pub dedup_chunks: u64,
    pub stored_chunks: u64,
    /// Size of the package file.
    pub package_bytes: u64,
    pub fingerprint: String,
}

fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: u64 has no invalid bit patterns and align_to only yields correctly
        // aligned, in-bounds middle slices.
        unsafe { b.align_to::<u64>() }
    };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

/// Which chunks of `[first, first+count)` are entirely inside holes (need no read).
fn hole_chunks(
    image: &dyn BlockDevice,
    first: u64,
    count: usize,
    chunk: u64,
) -> Result<Vec<bool>, BlockError> {
    let start = first * chunk;
    let end = ((first + count as u64) * chunk).min(image.size());
    let mut holes = vec![false; count];
    let mut off = start;
    let mut runs = Vec::new();
    while off < end {
        let ext = image.block_status(off, end - off)?;
        let Some(last) = ext.last() else { break };
        let next = last.offset + last.length;
        runs.extend(ext);
        if next <= off {
            break;
        }
        off = next;
    }
    for (i, h) in holes.iter_mut().enumerate() {
        let (cs, ce) = (
            start + i as u64 * chunk,
            (start + (i as u64 + 1) * chunk).min(end),
        );
        *h = cs < ce
            && runs
                .iter()
                .any(|e| e.zero && e.offset <= cs && e.offset + e.length >= ce);
    }
    Ok(holes)
}

/// Writes `image` (plus kernel/initrd) as a package at `out` (replaced atomically).
pub fn export_package(
    name: &str,
    image: &dyn BlockDevice,
    meta: &TemplateMeta,
    kernel: Option<&Path>,
    initrd: Option<&Path>,
    out: &Path,
) -> Result<ExportStats, PackageError> {
    export_package_with(name, image, meta, kernel, initrd, out, DEFAULT_CHUNK_SIZE)
}

/// [`export_package`] with an explicit chunk size (power of two, 4 KiB..16 MiB).
pub fn export_package_with(
    name: &str,
    image: &dyn BlockDevice,
    meta: &TemplateMeta,
    kernel: Option<&Path>,
    initrd: Option<&Path>,
    out: &Path,
    chunk_size: u64,
) -> Result<ExportStats, PackageError> {
    if !chunk_size.is_power_of_two() || !(4096..=16 << 20).contains(&chunk_size) {
        return Err(PackageError::Invalid(format!(
            "chunk size {chunk_size} must be a power of two in 4K..16M"
        )));
    }
    let size = image.size();
    let n_chunks = size.div_ceil(chunk_size);
    let tmp = out.with_extension("partial");
    let mut f = fs::File::create(&tmp).map_err(io_err("creating", &tmp))?;
    f.write_all(&[0u8; HEADER_LEN as usize])
        .map_err(io_err("writing", &tmp))?;
    let mut pos = HEADER_LEN;
    let mut stats = ExportStats {
        image_bytes: size,
        chunks: n_chunks,
        ..Default::default()
    };
    let mut chunk_hashes = Vec::with_capacity(n_chunks as usize);
    let mut blobs: Vec<BlobRef> = Vec::new();
    let mut seen: HashMap<[u8; 32], ()> = HashMap::new();
    let mut fp = blake3::Hasher::new();
    let cs = chunk_size as usize;
    let mut buf = vec![0u8; BATCH * cs];

    let mut first = 0u64;
    while first < n_chunks {
        let count = ((n_chunks - first) as usize).min(BATCH);
        let bstart = first * chunk_size;
        let blen = ((first + count as u64) * chunk_size).min(size) - bstart;
        let batch = &mut buf[..blen as usize];
        let holes = hole_chunks(image, first, count, chunk_size)?;
        // Read maximal runs of non-hole chunks with one call each.
        let mut i = 0;
        while i < count {
            let s = i * cs;
            if holes[i] {
                let e = ((i + 1) * cs).min(batch.len());
                batch[s..e].fill(0);
                i += 1;
                continue;
            }
            let mut j = i;
            while j < count && !holes[j] {
                j += 1;
            }
            let e = (j * cs).min(batch.len());
            image.read_at(&mut batch[s..e], bstart + s as u64)?;
            i = j;
        }
        let batch: &[u8] = batch;
        // The whole-image fingerprint is sequential by nature; run it beside the
        // per-chunk hashes instead of before them.
        let ((), hashes) = rayon::join(
            || {
                fp.update_rayon(batch);
            },
            || -> Vec<[u8; 32]> {
                batch
                    .par_chunks(cs)
                    .enumerate()
                    .map(|(k, c)| {
                        if holes[k] || is_zero(c) {
                            ZERO_CHUNK
                        } else {
                            *blake3::hash(c).as_bytes()
                        }
                    })
                    .collect()
            },
        );
        // First occurrence of each new hash in this batch gets compressed.
        let mut todo = Vec::new();
        for (k, h) in hashes.iter().enumerate() {
            if *h == ZERO_CHUNK {
                stats.zero_chunks += 1;
            } else if seen.insert(*h, ()).is_some() {
                stats.dedup_chunks += 1;
            } else {
                todo.push(k);
            }
        }
        let compressed: Vec<std::io::Result<(Vec<u8>, [u8; 32])>> = todo
            .par_iter()
            .map(|&k| {
                let z = zstd::bulk::compress(
                    &batch[k * cs..((k + 1) * cs).min(batch.len())],
                    ZSTD_LEVEL,
                )?;
                let h = *blake3::hash(&z).as_bytes();
                Ok((z, h))
            })
            .collect();
        for (&k, z) in todo.iter().zip(compressed) {
            let (z, stored_hash) = z.map_err(io_err("compressing a chunk for", &tmp))?;
            f.write_all(&z).map_err(io_err("writing", &tmp))?;
            let len = (((k + 1) * cs).min(batch.len()) - k * cs) as u64;
            blobs.push(BlobRef {
                hash: hashes[k],
                stored_hash,
                offset: pos,
                stored_len: z.len() as u64,
                len,
            });
            pos += z.len() as u64;
            stats.stored_chunks += 1;
        }
        chunk_hashes.extend(hashes);
        first += count as u64;
    }

    let mut add_file = |p: Option<&Path>| -> Result<Option<BlobRef>, PackageError> {
        let Some(p) = p else { return Ok(None) };
        let bytes = fs::read(p).map_err(io_err("reading", p))?;
        let z = zstd::bulk::compress(&bytes, ZSTD_LEVEL).map_err(io_err("compressing", p))?;
        f.write_all(&z).map_err(io_err("writing", &tmp))?;
        let r = BlobRef {
            hash: *blake3::hash(&bytes).as_bytes(),
            stored_hash: *blake3::hash(&z).as_bytes(),
            offset: pos,
            stored_len: z.len() as u64,
            len: bytes.len() as u64,
        };
        pos += z.len() as u64;
        Ok(Some(r))
    };
    let kernel = add_file(kernel)?;
    let initrd = add_file(initrd)?;

    stats.fingerprint = fp.finalize().to_hex().to_string();
    let manifest = PackageManifest {
        format_version: FORMAT_VERSION,
        name: name.into(),
        size,
        chunk_size,
        chunk_hashes,
        blobs,
        kernel,
        initrd,
        kernel_cmdline: meta.kernel_cmdline.clone(),
        packages: meta.packages.clone(),
        recipe_hash: meta.recipe_hash.clone(),
        fingerprint: stats.fingerprint.clone(),
        build_date: meta.build_date.clone(),
        created_by: format!("template-builder {}", env!("CARGO_PKG_VERSION")),
    };
    let mjson = serde_json::to_vec(&manifest).expect("manifest serialises");
    f.write_all(&mjson).map_err(io_err("writing", &tmp))?;
    let header = encode_header(pos, mjson.len() as u64, blake3::hash(&mjson).as_bytes());
    f.seek(SeekFrom::Start(0))
        .map_err(io_err("seeking", &tmp))?;
    f.write_all(&header).map_err(io_err("writing", &tmp))?;
    f.sync_all().map_err(io_err("syncing", &tmp))?;
    stats.package_bytes = pos + mjson.len() as u64;
    drop(f);
    fs::rename(&tmp, out).map_err(io_err("renaming", &tmp))?;
    Ok(stats)
}

fn encode_header(
    manifest_offset: u64,
    manifest_len: u64,
    manifest_hash: &[u8; 32],
) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&manifest_offset.to_le_bytes());
    h[24..32].copy_from_slice(&manifest_len.to_le_bytes());
    h[32..64].copy_from_slice(manifest_hash);
    let sum = *blake3::hash(&h[..96]).as_bytes();
    h[96..128].copy_from_slice(&sum);
    h
}

struct Header {
    manifest_offset: u64,
    manifest_len: u64,
    manifest_hash: [u8; 32],
}

fn decode_header(path: &Path, h: &[u8; HEADER_LEN as usize]) -> Result<Header, PackageError> {
    if h[0..8] != MAGIC {
        return Err(PackageError::NotAPackage { path: path.into() });
    }
    if blake3::hash(&h[..96]).as_bytes() != &h[96..128] {
        return Err(PackageError::HeaderCorrupt { path: path.into() });
    }
    let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(PackageError::UnsupportedVersion {
            path: path.into(),
            version,
        });
    }
    let mut manifest_hash = [0u8; 32];
    manifest_hash.copy_from_slice(&h[32..64]);
    Ok(Header {
        manifest_offset: u64_at(16),
        manifest_len: u64_at(24),
        manifest_hash,
    })
}

/// A package whose every byte has been checked; see the module doc.
pub struct VerifiedPackage {
    path: PathBuf,
    manifest: PackageManifest,
    /// The package file: blobs are read from it when needed (a package can be many GiB;
    /// it is never held in memory whole).
    file: fs::File,
    blob_of: HashMap<[u8; 32], usize>,
}

impl std::fmt::Debug for VerifiedPackage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedPackage")
            .field("path", &self.path)
            .field("name", &self.manifest.name)
            .finish()
    }
}

/// Opens and fully verifies a package (see the module doc).
pub fn read_package(file: &Path) -> Result<VerifiedPackage, PackageError> {
    let mut f = fs::File::open(file).map_err(io_err("opening", file))?;
    let actual = f.metadata().map_err(io_err("stat", file))?.len();
    let mut h = [0u8; HEADER_LEN as usize];
    if actual < HEADER_LEN {
        return Err(PackageError::Truncated {
            path: file.into(),
            expected: HEADER_LEN,
            actual,
        });
    }
    f.read_exact(&mut h)
        .map_err(io_err("reading header of", file))?;
    let hdr = decode_header(file, &h)?;
    let manifest_bad = |reason: String| PackageError::ManifestCorrupt {
        path: file.into(),
        reason,
    };
    if hdr.manifest_offset < HEADER_LEN || hdr.manifest_len > MAX_MANIFEST {
        return Err(manifest_bad("header points outside the file".into()));
    }
    let expected = hdr
        .manifest_offset
        .checked_add(hdr.manifest_len)
        .ok_or_else(|| manifest_bad("overflow".into()))?;
    if expected != actual {
        return Err(PackageError::Truncated {
            path: file.into(),
            expected,
            actual,
        });
    }
    f.seek(SeekFrom::Start(hdr.manifest_offset))
        .map_err(io_err("seeking to the manifest of", file))?;
    let mut mjson = vec![0u8; hdr.manifest_len as usize];
    f.read_exact(&mut mjson)
        .map_err(io_err("reading manifest of", file))?;
    if blake3::hash(&mjson).as_bytes() != &hdr.manifest_hash {
        return Err(manifest_bad("blake3 does not match the header".into()));
    }
    let manifest: PackageManifest = serde_json::from_slice(&mjson)
        .map_err(|e| manifest_bad(format!("not a valid manifest: {e}")))?;
    let blob_of = check_manifest(&manifest, hdr.manifest_offset).map_err(manifest_bad)?;

    // The chunk index that first uses each blob, to name it in errors.
    let mut first_use = vec![u64::MAX; manifest.blobs.len()];
    for (i, h) in manifest.chunk_hashes.iter().enumerate() {
        if let Some(&b) = blob_of.get(h) {
            first_use[b] = first_use[b].min(i as u64);
        }
    }
    manifest
        .blobs
        .par_iter()
        .enumerate()
        .try_for_each(|(i, b)| {
            check_blob(&f, b).map_err(|reason| {
                let chunk = first_use[i];
                PackageError::ChunkCorrupt {
                    path: file.into(),
                    chunk,
                    offset: chunk * manifest.chunk_size,
                    reason,
                }
            })
        })?;
    for (what, b) in [("kernel", &manifest.kernel), ("initrd", &manifest.initrd)] {
        if let Some(b) = b {
            check_blob(&f, b).map_err(|reason| PackageError::BlobCorrupt {
                path: file.into(),
                what,
                reason,
            })?;
        }
    }
    Ok(VerifiedPackage {
        path: file.into(),
        manifest,
        file: f,
        blob_of,
    })
}

/// Hashes a blob's stored bytes straight from the file, a piece at a time.
/// Fuzz entry (template-builder/fuzz and its corpus replay): `data` as a package file
/// from the network, through open and verification and, if it passes, unpacking of the
/// image (when at most 64 MiB), kernel and initrd. Must not panic or allocate without
/// bound.
#[doc(hidden)]
pub fn fuzz_package(data: &[u8]) {
    let dir = std::env::temp_dir().join(format!(
        "qtpkg-fuzz-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = fs::create_dir_all(&dir);
    let file = dir.join("p.qtpkg");
    if fs::write(&file, data).is_err() {
        return;
    }
    if let Ok(pkg) = read_package(&file) {
        if pkg.manifest().size <= 64 << 20 {
            let _ = std::io::copy(&mut pkg.image_reader(), &mut std::io::sink());
        }
        let _ = pkg.write_kernel(&dir);
        let _ = pkg.write_initrd(&dir);
    }
    let _ = fs::remove_dir_all(&dir);
}

fn check_blob(f: &fs::File, b: &BlobRef) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; b.stored_len.min(1 << 20) as usize];
    let mut pos = 0;
    while pos < b.stored_len {
        let n = (b.stored_len - pos).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], b.offset + pos)
            .map_err(|e| format!("reading the stored bytes: {e}"))?;
        h.update(&buf[..n]);
        pos += n as u64;
    }
    if h.finalize().as_bytes() != &b.stored_hash {
        return Err("blake3 of the stored bytes does not match the manifest".into());
    }
    Ok(())
}

/// Decompresses a verified blob into `out` (exactly `b.len` bytes) and checks the
/// content hash too, so an exporter bug cannot pass as data.
fn unpack_blob(stored: &[u8], b: &BlobRef, out: &mut [u8]) -> Result<(), String> {
    let n = zstd::bulk::decompress_to_buffer(stored, out).map_err(|e| format!("zstd: {e}"))?;
    if n as u64 != b.len || out.len() as u64 != b.len {
        return Err(format!("decompresses to {n} bytes, expected {}", b.len));
    }
    if blake3::hash(out).as_bytes() != &b.hash {
        return Err("blake3 of the content does not match the manifest".into());
    }
    Ok(())
}

/// [`check_manifest`] for a client that fetches a package piecewise (the manifest
/// first): the layout must be sound before any blob offset is trusted.
pub fn check_manifest_layout(m: &PackageManifest, data_end: u64) -> Result<(), String> {
    check_manifest(m, data_end).map(|_| ())
}

/// Structural checks: counts, bounds, ordering, every non-zero chunk has a blob of the
/// right length. Returns hash -> blob index.
fn check_manifest(m: &PackageManifest, data_end: u64) -> Result<HashMap<[u8; 32], usize>, String> {
    if m.format_version != FORMAT_VERSION {
        return Err(format!("format_version {}", m.format_version));
    }
    if !m.chunk_size.is_power_of_two() || !(4096..=16 << 20).contains(&m.chunk_size) {
        return Err(format!("chunk_size {}", m.chunk_size));
    }
    if m.chunk_hashes.len() as u64 != m.size.div_ceil(m.chunk_size) {
        return Err(format!(
            "{} chunk hashes for a {}-byte image",
            m.chunk_hashes.len(),
            m.size
        ));
    }
    let mut next = HEADER_LEN;
    let all = m.blobs.iter().chain(m.kernel.iter()).chain(m.initrd.iter());
    for b in all {
        if b.offset != next
            || b.offset
                .checked_add(b.stored_len)
                .is_none_or(|e| e > data_end)
        {
            return Err(format!(
                "blob at {} (+{}) is out of place",
                b.offset, b.stored_len
            ));
        }
        if b.len > 4 << 30 {
            return Err(format!("blob length {}", b.len));
        }
        next = b.offset + b.stored_len;
    }
    if next != data_end {
        return Err(format!("{} unaccounted data bytes", data_end - next));
    }
    let mut blob_of = HashMap::with_capacity(m.blobs.len());
    for (i, b) in m.blobs.iter().enumerate() {
        if b.hash == ZERO_CHUNK || blob_of.insert(b.hash, i).is_some() {
            return Err(format!("blob {i} duplicates another"));
        }
    }
    for (i, h) in m.chunk_hashes.iter().enumerate() {
        if *h == ZERO_CHUNK {
            continue;
        }
        let Some(&b) = blob_of.get(h) else {
            return Err(format!("chunk {i} has no blob"));
        };
        let want = m.chunk_size.min(m.size - i as u64 * m.chunk_size);
        if m.blobs[b].len != want {
            return Err(format!(
                "chunk {i}: blob holds {} bytes, chunk is {want}",
                m.blobs[b].len
            ));
        }
    }
    Ok(blob_of)
}

impl VerifiedPackage {
    pub fn manifest(&self) -> &PackageManifest {
        &self.manifest
    }

    /// The image bytes, in order (`manifest().size` bytes). Chunks are decompressed in
    /// parallel batches; each one's content hash is checked again as it is unpacked.
    pub fn image_reader(&self) -> impl Read + '_ {
        ImageReader {
            pkg: self,
            next_chunk: 0,
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// A blob's stored (compressed) bytes, read from the file. Its content hash is
    /// checked again as it is unpacked, so a file changed after verification cannot
    /// pass as data.
    fn stored(&self, b: &BlobRef) -> Result<Vec<u8>, String> {
        use std::os::unix::fs::FileExt;
        let mut v = vec![0u8; b.stored_len as usize];
        self.file
            .read_exact_at(&mut v, b.offset)
            .map_err(|e| format!("reading the stored bytes: {e}"))?;
        Ok(v)
    }

    fn write_blob(
        &self,
        b: Option<&BlobRef>,
        what: &'static str,
        dir: &Path,
        file: &str,
    ) -> Result<Option<PathBuf>, PackageError> {
        let Some(b) = b else { return Ok(None) };
        let mut bytes = vec![0u8; b.len as usize];
        let r = self
            .stored(b)
            .and_then(|st| unpack_blob(&st, b, &mut bytes));
        r.map_err(|reason| PackageError::BlobCorrupt {
            path: self.path.clone(),
            what,
            reason,
        })?;
        fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        let p = dir.join(file);
        let tmp = dir.join(format!(".{file}.partial"));
        fs::write(&tmp, bytes).map_err(io_err("writing", &tmp))?;
        fs::rename(&tmp, &p).map_err(io_err("renaming", &tmp))?;
        Ok(Some(p))
    }

    /// Writes the kernel as `dir/vmlinuz`; `None` if the package has none.
    pub fn write_kernel(&self, dir: &Path) -> Result<Option<PathBuf>, PackageError> {
        self.write_blob(self.manifest.kernel.as_ref(), "kernel", dir, "vmlinuz")
    }

    /// Writes the initrd as `dir/initrd.img`; `None` if the package has none.
    pub fn write_initrd(&self, dir: &Path) -> Result<Option<PathBuf>, PackageError> {
        self.write_blob(self.manifest.initrd.as_ref(), "initrd", dir, "initrd.img")
    }
}

/// Decompresses BATCH chunks at a time in parallel, straight into its buffer.
struct ImageReader<'a> {
    pkg: &'a VerifiedPackage,
    next_chunk: u64,
    buf: Vec<u8>,
    pos: usize,
}

impl ImageReader<'_> {
    fn refill(&mut self) -> std::io::Result<()> {
        let pkg = self.pkg;
        let m = &pkg.manifest;
        let n = m.chunk_hashes.len() as u64;
        let end = (self.next_chunk + BATCH as u64).min(n);
        let start_byte = self.next_chunk * m.chunk_size;
        let end_byte = (end * m.chunk_size).min(m.size);
        self.buf.resize((end_byte - start_byte) as usize, 0);
        let first = self.next_chunk;
        self.buf
            .par_chunks_mut(m.chunk_size as usize)
            .enumerate()
            .try_for_each(|(k, out)| {
                let i = first + k as u64;
                let h = &m.chunk_hashes[i as usize];
                if *h == ZERO_CHUNK {
                    out.fill(0);
                    return Ok(());
                }
                let b = &m.blobs[pkg.blob_of[h]];
                let r = pkg.stored(b).and_then(|st| unpack_blob(&st, b, out));
                r.map_err(|reason| {
                    std::io::Error::other(PackageError::ChunkCorrupt {
                        path: pkg.path.clone(),
                        chunk: i,
                        offset: i * m.chunk_size,
                        reason,
                    })
                })
            })?;
        self.pos = 0;
        self.next_chunk = end;
        Ok(())
    }
}

impl Read for ImageReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.buf.len() {
            if self.next_chunk as usize == self.pkg.manifest.chunk_hashes.len() {
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

/// A raw image file served read-only as a [`BlockDevice`] (the builder's output, or any
/// raw disk image), with holes reported from SEEK_DATA/SEEK_HOLE.
pub struct RawImageFile {
    name: String,
    file: fs::File,
    size: u64,
}

impl RawImageFile {
    pub fn open(path: &Path) -> Result<RawImageFile, PackageError> {
        let file = fs::File::open(path).map_err(io_err("opening", path))?;
        let size = file.metadata().map_err(io_err("stat", path))?.len();
        Ok(RawImageFile {
            name: path.display().to_string(),
            file,
            size,
        })
    }

    fn err(
        &self,
        op: &'static str,
        offset: u64,
        length: u64,
        kind: storage::BlockErrorKind,
        detail: String,
    ) -> BlockError {
        BlockError::new(kind, op, &self.name, offset, length, detail)
    }
}

impl BlockDevice for RawImageFile {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        use std::os::unix::fs::FileExt;
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(self.err(
                "read",
                offset,
                buf.len() as u64,
                storage::BlockErrorKind::OutOfRange,
                String::new(),
            ));
        }
        self.file.read_exact_at(buf, offset).map_err(|e| {
            self.err(
                "read",
                offset,
                buf.len() as u64,
                storage::BlockErrorKind::Io,
                e.to_string(),
            )
        })
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        Err(self.err(
            "write",
            offset,
            buf.len() as u64,
            storage::BlockErrorKind::ReadOnly,
            "raw image is read-only".into(),
        ))
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn discard(&self, offset: u64, length: u64) -> Result<(), BlockError> {
        Err(self.err(
            "discard",
            offset,
            length,
            storage::BlockErrorKind::ReadOnly,
            "raw image is read-only".into(),
        ))
    }
    fn write_zeroes(&self, offset: u64, length: u64, _may_unmap: bool) -> Result<(), BlockError> {
        Err(self.err(
            "write_zeroes",
            offset,
            length,
            storage::BlockErrorKind::ReadOnly,
            "raw image is read-only".into(),
        ))
    }
    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<storage::Extent>, BlockError> {
        use rustix::fs::{seek, SeekFrom as S};
        let end = offset.saturating_add(length).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let io = |e: rustix::io::Errno| {
            self.err(
                "block_status",
                offset,
                length,
                storage::BlockErrorKind::Io,
                e.to_string(),
            )
        };
        let off_i = i64::try_from(offset).unwrap_or(i64::MAX);
        // ENXIO from SEEK_DATA: no data at or after offset, the rest is a hole.
        let data = match seek(&self.file, S::Data(off_i)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => self.size,
            Err(e) => return Err(io(e)),
        };
        if data > offset {
            let len = data.min(end) - offset;
            return Ok(vec![storage::Extent {
                offset,
                length: len,
                hole: true,
                zero: true,
            }]);
        }
        let hole = seek(&self.file, S::Hole(off_i)).map_err(io)?;
        let len = hole.min(end) - offset;
        Ok(vec![storage::Extent {
            offset,
            length: len,
            hole: false,
            zero: false,
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_checksum() {
        let h = encode_header(1000, 200, &[7u8; 32]);
        let d = decode_header(Path::new("x"), &h).unwrap();
        assert_eq!(
            (d.manifest_offset, d.manifest_len, d.manifest_hash),
            (1000, 200, [7u8; 32])
        );
        for i in 8..128 {
            let mut bad = h;
            bad[i] ^= 1;
            assert!(
                decode_header(Path::new("x"), &bad).is_err(),
                "flip at {i} accepted"
            );
        }
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v[1..]));
        v[4098] = 1;
        assert!(!is_zero(&v[1..]));
    }
}
