//! What `daemon status` reports beyond "running": how much the daemon serves.

use super::Controller;
use crate::results::{Pong, PoolUsage, ServingStats};

impl Controller {
    /// The ping reply: who answers (protocol, pid, build) and, from the daemon, what it
    /// serves.
    pub(crate) fn ping(&self) -> Pong {
        Pong {
            pong: true,
            protocol: Some(crate::api::PROTOCOL),
            pid: Some(std::process::id()),
            build: Some(crate::api::build_id().to_string()),
            served: Some(self.served().len() as u64),
            stats: self.in_daemon.then(|| self.serving_stats()),
        }
    }

    /// Figures for the ping reply: NBD connections open and requests served over all
    /// running qubes, and the pool's usage (left out if the pool cannot say).
    pub(crate) fn serving_stats(&self) -> ServingStats {
        let (mut conns, mut reqs) = (0u64, 0u64);
        for s in self.served().values() {
            conns += s.server.active_connections() as u64;
            reqs += s.server.requests_served();
        }
        let pool = self.pool().info_cached().map(|i| PoolUsage {
            capacity: i.capacity,
            data_used: i.data_used,
            metadata_used: i.metadata_used,
            volumes: i.volumes,
            used_percent: if i.capacity == 0 {
                0.0
            } else {
                (i.data_used as f64 * 1000.0 / i.capacity as f64).round() / 10.0
            },
        });
        ServingStats {
            uptime_secs: crate::daemon::uptime().map(|d| d.as_secs()),
            nbd_connections: conns,
            nbd_requests_served: reqs,
            admin_requests_served: crate::daemon::admin_requests(),
            pool_usage: pool,
        }
    }
}
