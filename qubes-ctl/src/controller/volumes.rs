//! Volumes: list, info and import (revert, resize, config and discard are one call into
//! the volume model each, in the dispatch).

use std::fs;
use std::path::Path;

use anyhow::Result;
use serde_json::{json, Value};
use storage::qubes::QubeVolumes;

use super::{export_name, Controller};

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
    pub(super) fn volume_json(&self, qube: &str, vol: &str) -> Result<Value> {
        let st = self.vols.volume_status(qube, vol)?;
        let mut v = serde_json::to_value(&st)?;
        let uri = self
            .is_served(qube)
            .then(|| blkback::nbd_uri(&self.paths.nbd_socket(qube), &export_name(qube, vol)));
        v["nbd_uri"] = json!(uri);
        Ok(v)
    }

    pub(super) fn volume_info(&self, qube: &str, vol: &str) -> Result<Value> {
        self.volume_json(qube, vol)
    }

    pub(super) fn volume_list(&self, qube: Option<&str>) -> Result<Value> {
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
        Ok(Value::Array(out))
    }

    pub(super) fn volume_import(
        &self,
        qube: &str,
        vol: &str,
        file: &Path,
        f: fs::File,
        size: u64,
    ) -> Result<Value> {
        self.refuse_if_served(qube, "import into")?;
        let mut reader = ExactReader {
            inner: std::io::BufReader::with_capacity(1 << 20, f),
            left: size,
            size,
            what: format!("the input {}", file.display()),
        };
        let stats = self.vols.import(qube, vol, &mut reader, size)?;
        let mut v = self.volume_info(qube, vol)?;
        v["import"] = serde_json::to_value(stats)?;
        Ok(v)
    }
}
