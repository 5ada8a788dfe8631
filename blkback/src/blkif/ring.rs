//! The back end of a shared blkif ring (`xen/io/ring.h`, `BACK_RING_*` macros), over
//! pages the frontend granted. The frontend owns `req_prod` and `rsp_event`, we own
//! `rsp_prod` and `req_event`; all four are read and written atomically, slots are
//! copied out once (a hostile frontend may rewrite a slot while we look at it).
//!
//! Barriers, as ring.h puts them: acquire-load `req_prod` before reading slots (rmb);
//! write responses, then release-store `rsp_prod` (wmb); a full fence between
//! publishing `rsp_prod` / `req_event` and re-reading the peer's index (mb), so neither
//! side can miss the other's update and sleep forever.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use xen_sys::SharedMem;

use super::abi::{ring_entries, Response, REQUEST_SIZE, RESPONSE_SIZE, RING_HEADER};

const REQ_PROD: usize = 0;
const REQ_EVENT: usize = 4;
const RSP_PROD: usize = 8;
const RSP_EVENT: usize = 12;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    /// `req_prod` claims more outstanding requests than the ring holds: the frontend is
    /// broken or hostile; the device is closed.
    #[error("frontend request producer {prod} is {ahead} slots ahead of our responses (ring of {entries})")]
    ProducerOverflow { prod: u32, ahead: u32, entries: u32 },
    #[error("ring of {0} bytes holds no request slot")]
    TooSmall(usize),
}

pub struct BackRing {
    mem: Arc<SharedMem>,
    entries: u32,
    req_cons: u32,
    rsp_prod_pvt: u32,
    rsp_pushed: u32,
}

impl BackRing {
    /// Attaches to a ring the frontend initialised (`SHARED_RING_INIT`). Consumption
    /// starts at the published `rsp_prod` (`BACK_RING_ATTACH`), so a backend attaching
    /// to a running ring redoes the requests it had not answered.
    pub fn attach(mem: Arc<SharedMem>) -> Result<BackRing, RingError> {
        let entries = ring_entries(mem.len() / xen_sys::PAGE_SIZE);
        if entries == 0 {
            return Err(RingError::TooSmall(mem.len()));
        }
        let start = mem.load_u32(RSP_PROD, Ordering::Acquire);
        Ok(BackRing {
            mem,
            entries,
            req_cons: start,
            rsp_prod_pvt: start,
            rsp_pushed: start,
        })
    }

    pub fn entries(&self) -> u32 {
        self.entries
    }

    fn slot(&self, idx: u32) -> usize {
        RING_HEADER + (idx & (self.entries - 1)) as usize * REQUEST_SIZE
    }

    /// Requests published and not yet consumed (`RING_HAS_UNCONSUMED_REQUESTS`), after
    /// checking the producer is sane (`RING_REQUEST_PROD_OVERFLOW`).
    fn unconsumed(&self) -> Result<u32, RingError> {
        let prod = self.mem.load_u32(REQ_PROD, Ordering::Acquire);
        let ahead = prod.wrapping_sub(self.rsp_prod_pvt);
        if ahead > self.entries {
            return Err(RingError::ProducerOverflow {
                prod,
                ahead,
                entries: self.entries,
            });
        }
        let req = prod.wrapping_sub(self.req_cons);
        let room = self.entries - self.req_cons.wrapping_sub(self.rsp_prod_pvt);
        Ok(req.min(room))
    }

    /// Whether the frontend has published requests not yet taken (without asking it for
    /// a kick).
    pub fn has_requests(&self) -> Result<bool, RingError> {
        Ok(self.unconsumed()? > 0)
    }

    /// The next request slot, copied out, or `None` if the frontend has published none.
    pub fn next_request(&mut self) -> Result<Option<[u8; REQUEST_SIZE]>, RingError> {
        if self.unconsumed()? == 0 {
            return Ok(None);
        }
        let mut b = [0; REQUEST_SIZE];
        self.mem.read(self.slot(self.req_cons), &mut b);
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(Some(b))
    }

    /// Queues a response in the next slot (published by [`Self::push_responses`]).
    pub fn put_response(&mut self, r: &Response) {
        self.mem.write(self.slot(self.rsp_prod_pvt), &r.encode());
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
    }

    /// Publishes queued responses; true if the frontend asked to be notified of them
    /// (`RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`).
    pub fn push_responses(&mut self) -> bool {
        let (old, new) = (self.rsp_pushed, self.rsp_prod_pvt);
        if old == new {
            return false;
        }
        self.mem.store_u32(RSP_PROD, new, Ordering::Release);
        self.rsp_pushed = new;
        fence(Ordering::SeqCst);
        let ev = self.mem.load_u32(RSP_EVENT, Ordering::Relaxed);
        new.wrapping_sub(ev) < new.wrapping_sub(old)
    }

    /// Whether more requests are waiting; if none, asks for a notification on the next
    /// one and looks again (`RING_FINAL_CHECK_FOR_REQUESTS`), so a request published
    /// in between is not missed.
    pub fn final_check_for_requests(&mut self) -> Result<bool, RingError> {
        if self.unconsumed()? > 0 {
            return Ok(true);
        }
        self.mem
            .store_u32(REQ_EVENT, self.req_cons.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::SeqCst);
        Ok(self.unconsumed()? > 0)
    }
}

/// The front end of a ring, for the in-process test frontend (and nothing else: the
/// real frontend is the guest's kernel).
pub struct FrontRing {
    mem: Arc<SharedMem>,
    entries: u32,
    req_prod_pvt: u32,
    rsp_cons: u32,
}

impl FrontRing {
    /// `SHARED_RING_INIT` + `FRONT_RING_INIT`.
    pub fn init(mem: Arc<SharedMem>) -> FrontRing {
        mem.store_u32(REQ_PROD, 0, Ordering::Relaxed);
        mem.store_u32(RSP_PROD, 0, Ordering::Relaxed);
        mem.store_u32(REQ_EVENT, 1, Ordering::Relaxed);
        mem.store_u32(RSP_EVENT, 1, Ordering::Release);
        let entries = ring_entries(mem.len() / xen_sys::PAGE_SIZE);
        FrontRing {
            mem,
            entries,
            req_prod_pvt: 0,
            rsp_cons: 0,
        }
    }

    pub fn entries(&self) -> u32 {
        self.entries
    }

    pub fn free_slots(&self) -> u32 {
        self.entries - self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    pub fn put_request(&mut self, b: &[u8; REQUEST_SIZE]) {
        assert!(self.free_slots() > 0, "test frontend overfilled its ring");
        let slot = RING_HEADER + (self.req_prod_pvt & (self.entries - 1)) as usize * REQUEST_SIZE;
        self.mem.write(slot, b);
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
    }

    /// Publishes requests as a raw producer value (tests of hostile frontends use this
    /// to claim more than they wrote).
    pub fn set_req_prod(&self, v: u32) {
        self.mem.store_u32(REQ_PROD, v, Ordering::Release);
    }

    /// `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`.
    pub fn push_requests(&mut self) -> bool {
        let old = self.mem.load_u32(REQ_PROD, Ordering::Relaxed);
        let new = self.req_prod_pvt;
        self.mem.store_u32(REQ_PROD, new, Ordering::Release);
        fence(Ordering::SeqCst);
        let ev = self.mem.load_u32(REQ_EVENT, Ordering::Relaxed);
        new.wrapping_sub(ev) < new.wrapping_sub(old)
    }

    /// The next response, if published.
    pub fn next_response(&mut self) -> Option<Response> {
        let prod = self.mem.load_u32(RSP_PROD, Ordering::Acquire);
        if prod == self.rsp_cons {
            self.mem
                .store_u32(RSP_EVENT, self.rsp_cons.wrapping_add(1), Ordering::Relaxed);
            fence(Ordering::SeqCst);
            if self.mem.load_u32(RSP_PROD, Ordering::Acquire) == self.rsp_cons {
                return None;
            }
        }
        let slot = RING_HEADER + (self.rsp_cons & (self.entries - 1)) as usize * REQUEST_SIZE;
        let mut b = [0; RESPONSE_SIZE];
        self.mem.read(slot, &mut b);
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        Some(Response::decode(&b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blkif::abi::{encode, OP_FLUSH_DISKCACHE, RSP_OKAY};

    #[test]
    fn requests_and_responses_cross_the_ring_with_wraparound() {
        let mem = Arc::new(SharedMem::anonymous(1).unwrap());
        let mut front = FrontRing::init(mem.clone());
        let mut back = BackRing::attach(mem).unwrap();
        for round in 0..100u64 {
            for i in 0..20 {
                front.put_request(&encode::simple(OP_FLUSH_DISKCACHE, round * 100 + i));
            }
            front.push_requests();
            let mut n = 0;
            while let Some(b) = back.next_request().unwrap() {
                let id = u64::from_le_bytes(b[8..16].try_into().unwrap());
                back.put_response(&Response {
                    id,
                    operation: b[0],
                    status: RSP_OKAY,
                });
                n += 1;
            }
            assert_eq!(n, 20);
            back.push_responses();
            assert!(!back.final_check_for_requests().unwrap());
            for i in 0..20 {
                assert_eq!(front.next_response().unwrap().id, round * 100 + i);
            }
            assert!(front.next_response().is_none());
        }
    }

    #[test]
    fn a_producer_beyond_the_ring_is_refused() {
        let mem = Arc::new(SharedMem::anonymous(1).unwrap());
        let front = FrontRing::init(mem.clone());
        let mut back = BackRing::attach(mem).unwrap();
        front.set_req_prod(33);
        assert!(matches!(
            back.next_request(),
            Err(RingError::ProducerOverflow { .. })
        ));
        front.set_req_prod(32);
        for _ in 0..32 {
            assert!(back.next_request().unwrap().is_some());
        }
        // A full ring of unanswered requests: nothing more until responses go out.
        assert!(back.next_request().unwrap().is_none());
    }

    #[test]
    fn a_backend_attaching_to_a_running_ring_redoes_unanswered_requests() {
        // Groundwork for a daemon restart: answered requests stay answered, the ones in
        // flight when the old backend died are served again.
        let mem = Arc::new(SharedMem::anonymous(1).unwrap());
        let mut front = FrontRing::init(mem.clone());
        for id in 0..20u64 {
            front.put_request(&encode::simple(OP_FLUSH_DISKCACHE, id));
        }
        front.push_requests();
        let mut old = BackRing::attach(mem.clone()).unwrap();
        for i in 0..10 {
            let b = old.next_request().unwrap().unwrap();
            if i < 6 {
                old.put_response(&Response {
                    id: u64::from_le_bytes(b[8..16].try_into().unwrap()),
                    operation: b[0],
                    status: RSP_OKAY,
                });
            }
        }
        old.push_responses();
        drop(old); // 6..=9 consumed, never answered: the old backend died.
        for id in 0..6 {
            assert_eq!(front.next_response().unwrap().id, id);
        }
        for id in 20..30u64 {
            front.put_request(&encode::simple(OP_FLUSH_DISKCACHE, id));
        }
        front.push_requests();
        let mut new = BackRing::attach(mem).unwrap();
        let mut seen = Vec::new();
        while let Some(b) = new.next_request().unwrap() {
            seen.push(u64::from_le_bytes(b[8..16].try_into().unwrap()));
        }
        assert_eq!(seen, (6..30).collect::<Vec<_>>());
    }

    #[test]
    fn notifications_follow_the_event_indices() {
        let mem = Arc::new(SharedMem::anonymous(1).unwrap());
        let mut front = FrontRing::init(mem.clone());
        let mut back = BackRing::attach(mem).unwrap();
        front.put_request(&encode::simple(OP_FLUSH_DISKCACHE, 1));
        // req_event starts at 1: the first request needs a kick.
        assert!(front.push_requests());
        front.put_request(&encode::simple(OP_FLUSH_DISKCACHE, 2));
        // The backend has not re-armed req_event: no second kick.
        assert!(!front.push_requests());
        while back.next_request().unwrap().is_some() {}
        assert!(!back.final_check_for_requests().unwrap());
        front.put_request(&encode::simple(OP_FLUSH_DISKCACHE, 3));
        assert!(front.push_requests());
    }
}
