//! What `daemon status` reports beyond "running": how much the daemon serves.

use serde_json::{json, Value};

use super::Controller;

impl Controller {
    /// The ping reply: who answers (protocol, pid, build) and, from the daemon, what it
    /// serves.
    pub(crate) fn ping(&self) -> Value {
        let mut v = json!({
            "pong": true,
            "protocol": crate::api::PROTOCOL,
            "pid": std::process::id(),
            "build": crate::api::build_id(),
            "served": self.served().len(),
        });
        if self.in_daemon {
            v["stats"] = self.serving_stats();
        }
        v
    }

    /// Figures for the ping reply: NBD connections open and requests served over all
    /// running qubes, and the pool's usage (left out if the pool cannot say).
    pub(crate) fn serving_stats(&self) -> Value {
        let (mut conns, mut reqs) = (0usize, 0u64);
        for s in self.served().values() {
            conns += s.server.active_connections();
            reqs += s.server.requests_served();
        }
        let pool = self.pool().info().ok().map(|i| {
            json!({
                "capacity": i.capacity,
                "data_used": i.data_used,
                "metadata_used": i.metadata_used,
                "volumes": i.volumes,
                "used_percent": if i.capacity == 0 { 0.0 } else {
                    (i.data_used as f64 * 1000.0 / i.capacity as f64).round() / 10.0
                },
            })
        });
        json!({
            "uptime_secs": crate::daemon::uptime().map(|d| d.as_secs()),
            "nbd_connections": conns,
            "nbd_requests_served": reqs,
            "admin_requests_served": crate::daemon::admin_requests(),
            "pool_usage": pool,
        })
    }
}
