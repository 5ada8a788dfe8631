//! The [`Pool`] operations of the thin driver: volumes, attributes, commit, verify.

use super::*;

// ---- Pool ------------------------------------------------------------------------------

impl Pool for ThinPool {
    fn driver(&self) -> &'static str {
        "thin"
    }

    fn info(&self) -> Result<PoolInfo, PoolError> {
        let m = self.lock()?;
        Ok(PoolInfo {
            driver: "thin".into(),
            path: self.path.display().to_string(),
            chunk_size: self.geo.chunk_size,
            capacity: self.geo.data_chunks * self.geo.chunk_size,
            data_used: m.data_used * self.geo.chunk_size,
            metadata_used: m.meta_used * PAGE_SIZE as u64,
            metadata_capacity: None,
            volumes: m.cat.volumes.len() as u64,
            generation: m.sb.generation,
            host_free: self
                .data
                .host_free()
                .map_err(|e| PoolError::io("statvfs of pool.data", e))?,
            warnings: self.fallback.iter().cloned().collect(),
        })
    }

    fn list_volumes(&self) -> Result<Vec<VolumeInfo>, PoolError> {
        let keys: Vec<String> = self.lock()?.by_key.keys().cloned().collect();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            match self.volume(&k) {
                Ok(v) => out.push(v),
                Err(PoolError::NoSuchVolume(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn volume(&self, key: &str) -> Result<VolumeInfo, PoolError> {
        let mut m = self.lock()?;
        let id = self.id(&m, key)?;
        let r = m.root(id).map_err(|e| self.perr(e))?;
        let v = m
            .vol(id)
            .ok_or_else(|| PoolError::NoSuchVolume(key.into()))?;
        Ok(VolumeInfo {
            key: v.key.clone(),
            size: v.size,
            mapped: r.mapped.checked_mul(self.geo.chunk_size).ok_or_else(|| {
                PoolError::Corrupt(format!(
                    "volume {key}: {} mapped chunks is more than a volume can hold",
                    r.mapped
                ))
            })?,
            attrs: v.attrs.clone(),
        })
    }

    fn create_volume(&self, key: &str, size: u64) -> Result<(), PoolError> {
        validate_volume_key(key)?;
        let mut m = self.lock()?;
        if m.id_of(key).is_some() {
            return Err(PoolError::VolumeExists(key.into()));
        }
        let h = meta::map_height(size.div_ceil(self.geo.chunk_size));
        self.mutate(&mut m, |m| {
            m.add_volume(
                key,
                size,
                format::RootEntry {
                    height: h,
                    ..Default::default()
                },
            )
        })
        .map(|_| ())
        .map_err(|e| self.perr(e))
    }

    fn snapshot(&self, source: &str, target: &str) -> Result<(), PoolError> {
        validate_volume_key(target)?;
        let t = std::time::Instant::now();
        let _g = self.gate.write();
        tracing::debug!(
            waited_us = t.elapsed().as_micros() as u64,
            target,
            "snapshot: gate"
        );
        let mut m = self.lock()?;
        let src = self.id(&m, source)?;
        if m.id_of(target).is_some() {
            return Err(PoolError::VolumeExists(target.into()));
        }
        self.mutate(&mut m, |m| m.snapshot(src, target))
            .map(|_| ())
            .map_err(|e| self.perr(e))
    }

    fn remove_volume(&self, key: &str) -> Result<(), PoolError> {
        let _g = self.gate.write();
        let mut m = self.lock()?;
        let id = self.id(&m, key)?;
        if let Some(&users) = m.handles.get(&id) {
            return Err(PoolError::Busy {
                volume: key.into(),
                users,
            });
        }
        self.mutate(&mut m, |m| m.remove_volume(id))
            .map_err(|e| self.perr(e))
    }

    fn rename_volume(&self, from: &str, to: &str) -> Result<(), PoolError> {
        validate_volume_key(to)?;
        let mut m = self.lock()?;
        let id = self.id(&m, from)?;
        if m.id_of(to).is_some() {
            return Err(PoolError::VolumeExists(to.into()));
        }
        m.by_key.remove(from);
        m.by_key.insert(to.to_string(), id);
        if let Some(v) = m.vol_mut(id) {
            v.key = to.to_string();
        }
        m.cat_dirty = true;
        Ok(())
    }

    fn resize_volume(&self, key: &str, size: u64, allow_shrink: bool) -> Result<(), PoolError> {
        let _g = self.gate.write();
        let mut m = self.lock()?;
        let id = self.id(&m, key)?;
        let old = m.vol(id).map(|v| v.size).unwrap_or(0);
        let cs = self.geo.chunk_size;
        if size < old {
            if !allow_shrink {
                return Err(PoolError::ShrinkRefused {
                    volume: key.into(),
                    from: old,
                    to: size,
                });
            }
            // Bytes past the new end of the last chunk must read zero if it grows again.
            if !size.is_multiple_of(cs)
                && m.lookup(id, size / cs)
                    .map_err(|e| self.perr(e))?
                    .is_mapped()
            {
                drop(m);
                // Up to the end of the chunk, without computing that end: it may be
                // past u64::MAX.
                let within = self.geo.locate(VolOffset::new(size)).1;
                let tail = (cs - within).min(old - size);
                self.write_locked(id, &vec![0u8; tail as usize], VolOffset::new(size))
                    .map_err(|e| self.perr(e))?;
                m = self.lock()?;
            }
            let (lo, hi) = (size.div_ceil(cs), old.div_ceil(cs));
            self.mutate(&mut m, |m| m.unmap_range(id, lo, hi))
                .map_err(|e| self.perr(e))?;
        } else {
            self.mutate(&mut m, |m| m.grow_map(id, size.div_ceil(cs)))
                .map_err(|e| self.perr(e))?;
        }
        m.touch(id);
        if let Some(v) = m.vol_mut(id) {
            v.size = size;
        }
        m.cat_dirty = true;
        Ok(())
    }

    fn set_volume_attr(&self, key: &str, attr: &str, value: Option<&str>) -> Result<(), PoolError> {
        let mut m = self.lock()?;
        let id = self.id(&m, key)?;
        if let Some(v) = m.vol_mut(id) {
            match value {
                Some(val) => v.attrs.insert(attr.to_string(), val.to_string()),
                None => v.attrs.remove(attr),
            };
        }
        m.cat_dirty = true;
        Ok(())
    }

    fn open_volume(&self, key: &str, read_only: bool) -> Result<Arc<dyn BlockDevice>, PoolError> {
        let mut m = self.lock()?;
        let id = self.id(&m, key)?;
        *m.handles.entry(id).or_insert(0) += 1;
        drop(m);
        let pool = self.self_arc()?;
        Ok(Arc::new(ThinVolume {
            pool,
            id,
            name: key.to_string(),
            read_only,
        }))
    }

    fn get_meta(&self, key: &str) -> Result<Option<String>, PoolError> {
        Ok(self.lock()?.cat.meta.get(key).cloned())
    }

    fn set_meta(&self, key: &str, value: Option<&str>) -> Result<(), PoolError> {
        let mut m = self.lock()?;
        crate::pool::bookkeeping::set_meta(&mut m.cat.meta, key, value);
        m.cat_dirty = true;
        Ok(())
    }

    fn meta_keys(&self, prefix: &str) -> Result<Vec<String>, PoolError> {
        Ok(crate::pool::bookkeeping::meta_keys(
            &self.lock()?.cat.meta,
            prefix,
        ))
    }

    fn batch(&self) -> crate::pool::BatchGuard<'_> {
        crate::pool::BatchGuard(Some(self.batch.lock()))
    }

    fn commit(&self) -> Result<(), PoolError> {
        let t = std::time::Instant::now();
        let _b = self.batch.lock();
        let _g = self.gate.write();
        let mut m = self.state.lock();
        let waited = t.elapsed();
        let r = self.commit_locked(&mut m);
        tracing::debug!(
            waited_us = waited.as_micros() as u64,
            total_us = t.elapsed().as_micros() as u64,
            "pool commit"
        );
        r
    }

    fn verify(&self) -> Result<VerifyReport, PoolError> {
        let pin = self.pin();
        let mut report = verify::verify(&*self.meta_file, &pin.sb).0;
        // A damaged slot is found at open (which uses the other); report it here too.
        for slot in [PageNo(0), PageNo(1)] {
            let problem = match meta::read_page(&*self.meta_file, slot) {
                Ok(buf) => Superblock::unpack(slot, &buf[..])
                    .err()
                    .map(|e| e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(p) = problem {
                report.warnings.push(format!(
                    "superblock slot {} is damaged ({p}); the pool runs on the other slot (generation {}) and the next commit rewrites it",
                    slot.0, pin.sb.generation
                ));
            }
        }
        Ok(report)
    }

    fn import_volume(
        &self,
        key: &str,
        image: &mut dyn Read,
        size: u64,
        opts: &ImportOptions,
    ) -> Result<ImportStats, PoolError> {
        self.import(key, image, size, opts)
    }

    fn fingerprint(&self, key: &str) -> Result<String, PoolError> {
        let (id, size, epoch) = {
            let m = self.lock()?;
            let id = self.id(&m, key)?;
            let v = m
                .vol(id)
                .ok_or_else(|| PoolError::NoSuchVolume(key.into()))?;
            if let Some(fp) = &v.fingerprint {
                return Ok(fp.clone());
            }
            (id, v.size, m.epoch(id))
        };
        let piece = 16u64 << 20;
        let mut buf = vec![0u8; piece.min(size) as usize];
        let mut h = blake3::Hasher::new();
        let mut pos = 0;
        while pos < size {
            let n = (size - pos).min(piece) as usize;
            {
                let _g = self.gate.read();
                self.read_locked(id, &mut buf[..n], VolOffset::new(pos))
                    .map_err(|e| self.perr(e))?;
            }
            h.update_rayon(&buf[..n]);
            pos += n as u64;
        }
        let fp = h.finalize().to_hex().to_string();
        let mut m = self.lock()?;
        if m.epoch(id) == epoch {
            if let Some(v) = m.vol_mut(id) {
                v.fingerprint = Some(fp.clone());
                m.cat_dirty = true;
            }
        }
        Ok(fp)
    }
}

impl ThinPool {
    /// The `Arc` this pool lives in (volumes hold one).
    pub(super) fn self_arc(&self) -> Result<Arc<ThinPool>, PoolError> {
        self.me
            .upgrade()
            .ok_or_else(|| PoolError::Invalid("pool is shutting down".into()))
    }
}
