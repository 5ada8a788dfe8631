//! Pool backends the model and conformance tests run against, behind one fixture: a pool,
//! and a simulated crash that reopens it at its last commit. Included by the test crates
//! with `#[path]`; compiled on its own it only checks that the fixtures build.
#![allow(dead_code)]

use std::sync::Arc;

use storage::{MemPool, Pool};

pub trait Backend {
    fn name(&self) -> &'static str;
    fn pool(&self) -> Arc<dyn Pool>;
    /// Drops the pool without committing and returns it as reopened after a power cut.
    /// Every handle to the old pool must have been dropped.
    fn crash(&mut self) -> Arc<dyn Pool>;
}

#[derive(Default)]
pub struct Mem {
    pool: MemPool,
}

impl Mem {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(chunk: u64, capacity: u64) -> Self {
        Mem {
            pool: MemPool::with_options(chunk, Some(capacity)),
        }
    }
}

impl Backend for Mem {
    fn name(&self) -> &'static str {
        "mem"
    }

    fn pool(&self) -> Arc<dyn Pool> {
        Arc::new(self.pool.clone())
    }

    fn crash(&mut self) -> Arc<dyn Pool> {
        self.pool = self.pool.crash();
        self.pool()
    }
}

#[test]
fn fixtures_build() {
    let mut m = Mem::new();
    m.pool().create_volume("a", 4096).unwrap();
    assert!(!m.crash().exists("a").unwrap());
}
