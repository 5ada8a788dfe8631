//! Volumes: list, info, import, export, revert, resize, config and discard, each one
//! call into the volume model (`storage::qubes`), which checks and undoes its steps.

use std::fs;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use storage::qubes::QubeVolumes;

use super::{export_name, Controller};
use crate::results::{VolumeExported, VolumeInfo};

/// Size of an image descriptor: a regular file's length or a block device's size; `None`
/// for streams (pipes, FIFOs, terminals), whose size is not known in advance.
pub fn image_size(f: &fs::File) -> Result<Option<u64>> {
    use std::io::Seek;
    use std::os::unix::fs::FileTypeExt;
    let md = f.metadata()?;
    let ft = md.file_type();
    if ft.is_file() {
        Ok(Some(md.len()))
    } else if ft.is_block_device() {
        let mut f = f;
        let end = f.seek(std::io::SeekFrom::End(0))?;
        f.seek(std::io::SeekFrom::Start(0))?;
        Ok(Some(end))
    } else {
        Ok(None)
    }
}

/// Reads exactly `size` bytes: a stream that ends early, or goes on past `size`, is an
/// error, so a cut-off import fails before anything is committed.
pub(super) struct ExactReader<R> {
    pub(super) inner: R,
    pub(super) left: u64,
    pub(super) size: u64,
    pub(super) what: String,
}

impl<R: std::io::Read> std::io::Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = loop {
            match self.inner.read(&mut buf[..want]) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "{} ended after {} of {} bytes; nothing was imported",
                    self.what,
                    self.size - self.left,
                    self.size
                ),
            ));
        }
        self.left -= n as u64;
        if self.left == 0 {
            let mut probe = [0u8; 1];
            let more = loop {
                match self.inner.read(&mut probe) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => break r?,
                }
            };
            if more != 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} holds more than the {} bytes announced; nothing was imported (give the right --size)",
                        self.what, self.size
                    ),
                ));
            }
        }
        Ok(n)
    }
}

impl Controller {
    pub(super) fn volume_json(&self, qube: &str, vol: &str) -> Result<VolumeInfo> {
        let status = self.vols.volume_status(qube, vol)?;
        let nbd_uri = self
            .is_served(qube)
            .then(|| blkback::nbd_uri(&self.paths.nbd_socket(qube), &export_name(qube, vol)));
        Ok(VolumeInfo {
            status,
            nbd_uri,
            import: None,
        })
    }

    pub(super) fn volume_info(&self, qube: &str, vol: &str) -> Result<VolumeInfo> {
        self.volume_json(qube, vol)
    }

    pub(super) fn volume_list(&self, qube: Option<&str>) -> Result<Vec<VolumeInfo>> {
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
        Ok(out)
    }

    pub(super) fn volume_import(
        &self,
        qube: &str,
        vol: &str,
        file: &Path,
        f: fs::File,
        size: u64,
    ) -> Result<VolumeInfo> {
        self.refuse_if_served(qube, "import into")?;
        let mut reader = ExactReader {
            inner: std::io::BufReader::with_capacity(1 << 20, f),
            left: size,
            size,
            what: format!("the input {}", file.display()),
        };
        let stats = self.vols.import(qube, vol, &mut reader, size)?;
        Ok(VolumeInfo {
            import: Some(stats),
            ..self.volume_info(qube, vol)?
        })
    }

    pub(super) fn volume_revert(
        &self,
        qube: &str,
        vol: &str,
        revision: Option<&str>,
    ) -> Result<VolumeInfo> {
        self.refuse_if_served(qube, "revert a volume of")?;
        {
            let _txn = self.txn();
            self.vols.revert(qube, vol, revision)?;
        }
        self.volume_info(qube, vol)
    }

    pub(super) fn volume_resize(
        &self,
        qube: &str,
        vol: &str,
        size: u64,
        allow_shrink: bool,
    ) -> Result<VolumeInfo> {
        // A running qube's client would get EINVAL past the new end, and what it
        // flushed there would be lost.
        if size < self.vols.volume_status(qube, vol)?.size {
            self.refuse_if_served(qube, "shrink a volume of")?;
        }
        {
            let _txn = self.txn();
            self.vols.resize(qube, vol, size, allow_shrink)?;
        }
        self.volume_info(qube, vol)
    }

    pub(super) fn volume_export(
        &self,
        qube: &str,
        vol: &str,
        path: &Path,
        mut out: fs::File,
    ) -> Result<VolumeExported> {
        let n = self.vols.export(qube, vol, &mut out)?;
        // Only a regular file has anything to sync (/dev/null, a FIFO: EINVAL).
        if out.metadata().is_ok_and(|m| m.is_file()) {
            out.sync_all()
                .with_context(|| format!("syncing {}", path.display()))?;
        }
        Ok(VolumeExported {
            volume: format!("{qube}:{vol}"),
            file: path.to_path_buf(),
            bytes: n,
        })
    }

    pub(super) fn volume_config(
        &self,
        qube: &str,
        vol: &str,
        key: &str,
        value: &str,
    ) -> Result<VolumeInfo> {
        match key {
            "revisions_to_keep" => {
                let n: u32 = value.parse().map_err(|_| {
                    anyhow!(
                        "revisions_to_keep must be a whole number (0 keeps none), not {value:?}"
                    )
                })?;
                let _txn = self.txn();
                self.vols.set_revisions_to_keep(qube, vol, n)?;
            }
            other => {
                bail!("volume property {other:?} cannot be set; settable: revisions_to_keep")
            }
        }
        self.volume_info(qube, vol)
    }

    pub(super) fn volume_discard(&self, qube: &str, vol: &str) -> Result<VolumeInfo> {
        // The running snapshot is what the qube's client sees; dropping it under a
        // running qube leaves that qube unservable.
        self.refuse_if_served(qube, "discard the writes of")?;
        {
            let _txn = self.txn();
            self.vols.discard(qube, vol)?;
        }
        self.volume_info(qube, vol)
    }
}
