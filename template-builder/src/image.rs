//! Root tree -> reproducible raw ext4 image.
//!
//! Contract: [`make_ext4`] turns a directory into an ext4 image whose bytes depend only on
//! the tree's content (names, bytes, modes, owners, mtimes clamped to the epoch) and on the
//! `seed` string: the filesystem UUID and the directory hash seed are derived from `seed`
//! (`mke2fs -U`, `-E hash_seed=`), and every timestamp mke2fs writes (superblock, inode
//! ctimes, lost+found) is pinned to `epoch` through `SOURCE_DATE_EPOCH` (honoured by
//! e2fsprogs >= 1.47.1) and `E2FSPROGS_FAKE_TIME`. [`clamp_tree_times`] must run first:
//! mke2fs copies mtimes and atimes from the tree.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("clamping timestamps under {path}: {source}")]
    ClampingTimes {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating image file {path}: {source}")]
    CreatingImage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("running mke2fs (is e2fsprogs installed?): {0}")]
    SpawningMke2fs(#[source] std::io::Error),
    #[error("mke2fs failed for {image} from {tree} ({status}): {stderr}\n  hint: is the image size ({size} bytes) large enough for the tree?")]
    Mke2fs {
        image: PathBuf,
        tree: PathBuf,
        size: u64,
        status: String,
        stderr: String,
    },
    #[error("e2fsprogs {found} is too old: need >= 1.47.1 for SOURCE_DATE_EPOCH support (install it from backports)")]
    OldE2fsprogs { found: String },
    #[error("hashing {path}: {source}")]
    Hashing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Sets every mtime and atime newer than `epoch` to `epoch` (symlinks themselves, not
/// their targets), so files written during the build look as old as the packages.
pub fn clamp_tree_times(root: &Path, epoch: u64) -> Result<(), ImageError> {
    use rustix::fs::{utimensat, AtFlags, Timespec, Timestamps, CWD};
    let err = |path: &Path, source| ImageError::ClampingTimes {
        path: path.into(),
        source,
    };
    let mut stack = vec![root.to_path_buf()];
    let epoch_i = i64::try_from(epoch).unwrap_or(i64::MAX);
    while let Some(p) = stack.pop() {
        let md = fs::symlink_metadata(&p).map_err(|e| err(&p, e))?;
        if md.is_dir() {
            for entry in fs::read_dir(&p).map_err(|e| err(&p, e))? {
                stack.push(entry.map_err(|e| err(&p, e))?.path());
            }
        }
        use std::os::unix::fs::MetadataExt;
        let mtime = md.mtime().min(epoch_i);
        let t = Timespec {
            tv_sec: mtime,
            tv_nsec: 0,
        };
        utimensat(
            CWD,
            &p,
            &Timestamps {
                last_access: t,
                last_modification: t,
            },
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| err(&p, e.into()))?;
    }
    Ok(())
}

/// A UUID-shaped string derived from `seed` and `purpose` (RFC 4122 version 4 layout, so
/// tools that validate UUIDs accept it).
pub fn derived_uuid(seed: &str, purpose: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"qubes-template-uuid\0");
    h.update(purpose.as_bytes());
    h.update(b"\0");
    h.update(seed.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h.finalize().as_bytes()[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// `mke2fs -V` version, e.g. "1.47.2"; refuses versions without SOURCE_DATE_EPOCH support.
pub fn check_e2fsprogs() -> Result<String, ImageError> {
    let out = Command::new("mke2fs")
        .arg("-V")
        .output()
        .map_err(ImageError::SpawningMke2fs)?;
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    let version = text.split_whitespace().nth(1).unwrap_or("").to_string();
    let parts: Vec<u32> = version.split('.').filter_map(|p| p.parse().ok()).collect();
    if parts.len() < 3 || (parts[0], parts[1], parts[2]) < (1, 47, 1) {
        return Err(ImageError::OldE2fsprogs { found: version });
    }
    Ok(version)
}

/// Label given to every root filesystem (the image's fstab mounts `LABEL=root`).
pub const ROOT_LABEL: &str = "root";

/// Builds `image` (replaced if present) of `size` bytes from `tree`. The tree's times
/// must already be clamped ([`clamp_tree_times`]).
pub fn make_ext4(
    tree: &Path,
    image: &Path,
    size: u64,
    seed: &str,
    epoch: u64,
) -> Result<(), ImageError> {
    check_e2fsprogs()?;
    let create = |source| ImageError::CreatingImage {
        path: image.into(),
        source,
    };
    match fs::remove_file(image) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(create(e)),
    }
    fs::File::create(image)
        .and_then(|f| f.set_len(size))
        .map_err(create)?;
    let out = Command::new("mke2fs")
        .args([
            "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-L", ROOT_LABEL,
        ])
        .arg("-U")
        .arg(derived_uuid(seed, "fs-uuid"))
        .arg("-E")
        .arg(format!(
            "hash_seed={},root_owner=0:0,nodiscard",
            derived_uuid(seed, "hash-seed")
        ))
        .arg("-d")
        .arg(tree)
        .arg(image)
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
        .env_remove("MKE2FS_DEVICE_SECTSIZE")
        .output()
        .map_err(ImageError::SpawningMke2fs)?;
    if !out.status.success() {
        return Err(ImageError::Mke2fs {
            image: image.into(),
            tree: tree.into(),
            size,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// blake3 (hex) over a file's bytes, hashed in parallel.
pub fn fingerprint_file(path: &Path) -> Result<String, ImageError> {
    let err = |source| ImageError::Hashing {
        path: path.into(),
        source,
    };
    let mut f = fs::File::open(path).map_err(err)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 16 << 20];
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = f.read(&mut buf[filled..]).map_err(err)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        h.update_rayon(&buf[..filled]);
        if filled < buf.len() {
            break;
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_stable_and_distinct() {
        let a = derived_uuid("abc", "fs-uuid");
        assert_eq!(a, derived_uuid("abc", "fs-uuid"));
        assert_ne!(a, derived_uuid("abc", "hash-seed"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }
}
