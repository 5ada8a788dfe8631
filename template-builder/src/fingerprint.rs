//! A reader that proves an image is the one a manifest names: it hashes the bytes as they
//! pass and, on the read that delivers the last announced byte, compares the blake3 with
//! the expected fingerprint. A mismatch (or a short image) is a read error, so an importer
//! that streams from it fails before it commits anything.

use std::io::{self, Read};

/// Hashing reads above this size are spread over the rayon pool.
const PARALLEL_HASH: usize = 1 << 20;

pub struct FingerprintReader<R> {
    inner: R,
    hasher: blake3::Hasher,
    remaining: u64,
    expected: String,
    what: String,
}

impl<R: Read> FingerprintReader<R> {
    /// `expected` is the hex blake3 over exactly `size` bytes; `what` names the image in
    /// errors (e.g. "package deb.qtpl").
    pub fn new(inner: R, size: u64, expected: &str, what: &str) -> Self {
        FingerprintReader {
            inner,
            hasher: blake3::Hasher::new(),
            remaining: size,
            expected: expected.to_ascii_lowercase(),
            what: what.into(),
        }
    }
}

impl<R: Read> Read for FingerprintReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: the image ended {} bytes before its announced size",
                    self.what, self.remaining
                ),
            ));
        }
        if n >= PARALLEL_HASH {
            self.hasher.update_rayon(&buf[..n]);
        } else {
            self.hasher.update(&buf[..n]);
        }
        self.remaining -= n as u64;
        if self.remaining == 0 {
            let got = self.hasher.finalize().to_hex();
            if got.as_str() != self.expected {
                return Err(io::Error::other(format!(
                    "{}: the image's fingerprint is {got} but its manifest claims {}; \
                     the package was forged or built wrongly, nothing was imported",
                    self.what, self.expected
                )));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_right_bytes_and_refuses_others() {
        let data = vec![7u8; 3 << 20];
        let fp = blake3::hash(&data).to_hex().to_string();
        let mut out = Vec::new();
        FingerprintReader::new(&data[..], data.len() as u64, &fp, "x")
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data);
        let mut other = data.clone();
        other[12345] ^= 1;
        let err = FingerprintReader::new(&other[..], other.len() as u64, &fp, "x")
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("fingerprint"), "{err}");
        let err = FingerprintReader::new(&data[..1000], data.len() as u64, &fp, "x")
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
