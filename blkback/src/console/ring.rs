//! The backend's view of a Xen PV console ring (`struct xencons_interface`,
//! `xen/include/public/io/console.h`): one page holding two byte rings and their indices.
//!
//! ```text
//!  offset 0     in[1024]     backend -> guest (the guest's input)
//!         1024  out[2048]    guest -> backend (the guest's output)
//!         3072  in_cons, in_prod, out_cons, out_prod   (u32 each, free-running)
//! ```
//!
//! The page is the guest's: it can rewrite any byte of it at any time. So the backend
//! keeps its own copy of the indices it owns (`out_cons`, `in_prod`) and only publishes
//! them; the guest's indices (`out_prod`, `in_cons`) are read once per call and checked
//! (`prod - cons` may not exceed the ring's size, as hvc_xen checks ours); every access is
//! masked into the ring. A guest lying about its indices gets [`RingError`], never a read
//! or write outside the ring, a loop, or an allocation.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use xen_sys::SharedMem;

pub const IN_OFF: usize = 0;
pub const IN_SIZE: u32 = 1024;
pub const OUT_OFF: usize = 1024;
pub const OUT_SIZE: u32 = 2048;
pub const IN_CONS: usize = 3072;
pub const IN_PROD: usize = 3076;
pub const OUT_CONS: usize = 3080;
pub const OUT_PROD: usize = 3084;
/// The interface fits in one page.
pub const RING_BYTES: usize = 3088;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    #[error("the console page is {0} bytes, smaller than the ring interface")]
    Short(usize),
    #[error("the guest's output indices are invalid (prod {prod}, cons {cons}: more than {OUT_SIZE} bytes apart)")]
    Out { prod: u32, cons: u32 },
    #[error("the guest's input indices are invalid (prod {prod}, cons {cons}: more than {IN_SIZE} bytes apart)")]
    In { prod: u32, cons: u32 },
}

/// The backend's end of one console ring.
pub struct ConsRing {
    mem: Arc<SharedMem>,
    out_cons: u32,
    in_prod: u32,
}

impl ConsRing {
    /// Takes the ring as it is: a fresh frontend's page is zero; a ring an earlier
    /// backend served (daemon restart) goes on from the indices that backend published.
    pub fn attach(mem: Arc<SharedMem>) -> Result<ConsRing, RingError> {
        if mem.len() < RING_BYTES {
            return Err(RingError::Short(mem.len()));
        }
        let out_cons = mem.load_u32(OUT_CONS, Ordering::Acquire);
        let in_prod = mem.load_u32(IN_PROD, Ordering::Acquire);
        let ring = ConsRing {
            mem,
            out_cons,
            in_prod,
        };
        ring.out_pending()?;
        ring.in_space()?;
        Ok(ring)
    }

    /// Bytes the guest has written that we have not read.
    fn out_pending(&self) -> Result<u32, RingError> {
        let prod = self.mem.load_u32(OUT_PROD, Ordering::Acquire);
        let n = prod.wrapping_sub(self.out_cons);
        if n > OUT_SIZE {
            return Err(RingError::Out {
                prod,
                cons: self.out_cons,
            });
        }
        Ok(n)
    }

    /// Room in the guest's input ring.
    fn in_space(&self) -> Result<u32, RingError> {
        let cons = self.mem.load_u32(IN_CONS, Ordering::Acquire);
        let used = self.in_prod.wrapping_sub(cons);
        if used > IN_SIZE {
            return Err(RingError::In {
                prod: self.in_prod,
                cons,
            });
        }
        Ok(IN_SIZE - used)
    }

    /// Moves up to `buf.len()` bytes of the guest's output into `buf`; the guest may
    /// write more once this returns (notify it).
    pub fn read_out(&mut self, buf: &mut [u8]) -> Result<usize, RingError> {
        let n = (self.out_pending()? as usize).min(buf.len());
        let mut done = 0;
        while done < n {
            let at = (self.out_cons & (OUT_SIZE - 1)) as usize;
            let run = (n - done).min(OUT_SIZE as usize - at);
            self.mem.read(OUT_OFF + at, &mut buf[done..done + run]);
            done += run;
            self.out_cons = self.out_cons.wrapping_add(run as u32);
        }
        if n > 0 {
            // Release: our copies out of the ring happen before the guest may reuse it.
            self.mem
                .store_u32(OUT_CONS, self.out_cons, Ordering::Release);
        }
        Ok(n)
    }

    /// Moves as much of `data` as fits into the guest's input; returns how much.
    pub fn write_in(&mut self, data: &[u8]) -> Result<usize, RingError> {
        let n = (self.in_space()? as usize).min(data.len());
        let mut done = 0;
        while done < n {
            let at = (self.in_prod & (IN_SIZE - 1)) as usize;
            let run = (n - done).min(IN_SIZE as usize - at);
            self.mem.write(IN_OFF + at, &data[done..done + run]);
            done += run;
            self.in_prod = self.in_prod.wrapping_add(run as u32);
        }
        if n > 0 {
            // Release: the bytes are in the ring before the guest sees the index.
            self.mem.store_u32(IN_PROD, self.in_prod, Ordering::Release);
        }
        Ok(n)
    }
}

/// The guest's end of a ring in shared memory, as hvc_xen drives it (tests and the
/// in-process frontend).
pub struct GuestEnd {
    pub mem: Arc<SharedMem>,
}

impl GuestEnd {
    /// Writes what fits of `data` to the output ring.
    pub fn write_out(&self, data: &[u8]) -> usize {
        let cons = self.mem.load_u32(OUT_CONS, Ordering::Acquire);
        let mut prod = self.mem.load_u32(OUT_PROD, Ordering::Relaxed);
        let mut sent = 0;
        while sent < data.len() && prod.wrapping_sub(cons) < OUT_SIZE {
            let at = (prod & (OUT_SIZE - 1)) as usize;
            self.mem.write(OUT_OFF + at, &data[sent..sent + 1]);
            prod = prod.wrapping_add(1);
            sent += 1;
        }
        self.mem.store_u32(OUT_PROD, prod, Ordering::Release);
        sent
    }

    /// Reads what the backend put in the input ring.
    pub fn read_in(&self) -> Vec<u8> {
        let prod = self.mem.load_u32(IN_PROD, Ordering::Acquire);
        let mut cons = self.mem.load_u32(IN_CONS, Ordering::Relaxed);
        let mut out = Vec::new();
        while cons != prod && out.len() < IN_SIZE as usize {
            let mut b = [0u8];
            self.mem
                .read(IN_OFF + (cons & (IN_SIZE - 1)) as usize, &mut b);
            out.push(b[0]);
            cons = cons.wrapping_add(1);
        }
        self.mem.store_u32(IN_CONS, cons, Ordering::Release);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (ConsRing, GuestEnd) {
        let mem = Arc::new(SharedMem::anonymous(1).unwrap());
        (ConsRing::attach(mem.clone()).unwrap(), GuestEnd { mem })
    }

    #[test]
    fn bytes_cross_both_ways_and_wrap() {
        let (mut be, fe) = pair();
        let mut got = Vec::new();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 13) as u8).collect();
        let mut sent = 0;
        let mut buf = [0u8; 700];
        while got.len() < data.len() {
            sent += fe.write_out(&data[sent..]);
            let n = be.read_out(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, data);
        let mut back = Vec::new();
        let mut put = 0;
        while back.len() < data.len() {
            put += be.write_in(&data[put..]).unwrap();
            back.extend(fe.read_in());
        }
        assert_eq!(back, data);
    }

    #[test]
    fn a_full_input_ring_takes_nothing_more() {
        let (mut be, fe) = pair();
        assert_eq!(be.write_in(&[1; 5000]).unwrap(), IN_SIZE as usize);
        assert_eq!(be.write_in(&[2; 10]).unwrap(), 0);
        assert_eq!(fe.read_in().len(), IN_SIZE as usize);
        assert_eq!(be.write_in(&[2; 10]).unwrap(), 10);
    }

    #[test]
    fn indices_wrap_around_u32() {
        let mem = Arc::new(SharedMem::anonymous(1).unwrap());
        for off in [IN_CONS, IN_PROD, OUT_CONS, OUT_PROD] {
            mem.store_u32(off, u32::MAX - 3, Ordering::Relaxed);
        }
        let mut be = ConsRing::attach(mem.clone()).unwrap();
        let fe = GuestEnd { mem };
        assert_eq!(fe.write_out(b"0123456789"), 10);
        let mut buf = [0u8; 64];
        assert_eq!(be.read_out(&mut buf).unwrap(), 10);
        assert_eq!(&buf[..10], b"0123456789");
        assert_eq!(be.write_in(b"abcdefgh").unwrap(), 8);
        assert_eq!(fe.read_in(), b"abcdefgh");
    }

    /// A guest that claims more output than the ring holds, or has consumed input we
    /// never produced, is refused; nothing is read or published for it.
    #[test]
    fn hostile_indices_are_errors() {
        let (mut be, fe) = pair();
        fe.mem.store_u32(OUT_PROD, OUT_SIZE + 1, Ordering::Release);
        let mut buf = [0u8; 4096];
        assert_eq!(
            be.read_out(&mut buf),
            Err(RingError::Out {
                prod: OUT_SIZE + 1,
                cons: 0
            })
        );
        assert_eq!(fe.mem.load_u32(OUT_CONS, Ordering::Acquire), 0);
        // prod behind cons: a huge unsigned distance.
        fe.mem.store_u32(OUT_PROD, u32::MAX, Ordering::Release);
        assert!(be.read_out(&mut buf).is_err());
        // The guest says it consumed input that was never there.
        fe.mem.store_u32(IN_CONS, 5, Ordering::Release);
        assert_eq!(be.write_in(b"x"), Err(RingError::In { prod: 0, cons: 5 }));
        assert_eq!(fe.mem.load_u32(IN_PROD, Ordering::Acquire), 0);
        // Exactly full is fine.
        let mem = Arc::new(SharedMem::anonymous(1).unwrap());
        mem.store_u32(OUT_PROD, OUT_SIZE, Ordering::Release);
        let mut be = ConsRing::attach(mem).unwrap();
        assert_eq!(be.read_out(&mut buf).unwrap(), OUT_SIZE as usize);
        // Rewriting our published index does not move our own.
        let (mut be, fe) = pair();
        assert_eq!(fe.write_out(b"abc"), 3);
        assert_eq!(be.read_out(&mut buf).unwrap(), 3);
        fe.mem.store_u32(OUT_CONS, 0, Ordering::Release);
        assert_eq!(be.read_out(&mut buf).unwrap(), 0);
    }

    #[test]
    fn a_resumed_ring_goes_on_from_the_published_indices() {
        let (mut be, fe) = pair();
        fe.write_out(b"hello");
        let mut buf = [0u8; 3];
        assert_eq!(be.read_out(&mut buf).unwrap(), 3);
        drop(be);
        let mut be = ConsRing::attach(fe.mem.clone()).unwrap();
        let mut rest = [0u8; 8];
        assert_eq!(be.read_out(&mut rest).unwrap(), 2);
        assert_eq!(&rest[..2], b"lo");
        let mem = Arc::new(SharedMem::anonymous(1).unwrap());
        mem.store_u32(OUT_PROD, 9999, Ordering::Release);
        assert!(ConsRing::attach(mem).is_err());
    }
}
