//! Many servers in one process share one accept thread and one worker pool: binding
//! another socket starts no thread, and an idle server wakes nothing. Each socket still
//! reaches only its own exports, through a real client (nbdinfo), and a shutdown removes
//! only its own socket while the others keep serving.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use blkback::testing::FileDevice;
use blkback::{Export, NbdServer};

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

fn exports_of(sock: &std::path::Path) -> Vec<String> {
    let out = Command::new("nbdinfo")
        .args(["--list", "--json"])
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .output()
        .expect("nbdinfo (libnbd-bin) must be installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<String> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn servers_share_threads_and_keep_their_exports_apart() {
    let dir = tempfile::tempdir().unwrap();
    let bind = |i: usize| {
        let dev = FileDevice::create(&dir.path().join(format!("d{i}.img")), 1 << 20).unwrap();
        let exports = vec![Export {
            name: format!("q{i}/private"),
            description: String::new(),
            device: Arc::new(dev),
        }];
        NbdServer::bind_unix(&dir.path().join(format!("s{i}.sock")), exports).unwrap()
    };
    // The first bind starts the shared runtime.
    let mut servers = vec![bind(0)];
    let before = threads();
    for i in 1..100 {
        servers.push(bind(i));
    }
    assert_eq!(
        threads(),
        before,
        "binding 99 more sockets started threads (each server should cost none while idle)"
    );

    assert_eq!(exports_of(servers[7].path()), ["q7/private"]);
    assert_eq!(exports_of(servers[93].path()), ["q93/private"]);
    // Another socket's export name: refused on this one.
    let out = Command::new("nbdinfo")
        .arg(format!(
            "nbd+unix:///q8/private?socket={}",
            servers[7].path().display()
        ))
        .output()
        .unwrap();
    assert!(!out.status.success(), "socket 7 served q8's export");

    // Shut down every other server; the rest keep serving.
    let mut kept = Vec::new();
    for (i, s) in servers.into_iter().enumerate() {
        if i % 2 == 0 {
            let p = s.path().to_path_buf();
            s.shutdown(Duration::from_secs(1)).unwrap();
            assert!(!p.exists(), "{} left behind", p.display());
        } else {
            kept.push(s);
        }
    }
    assert_eq!(exports_of(kept[3].path()), ["q7/private"]);
    assert_eq!(exports_of(kept[49].path()), ["q99/private"]);
    // The clients' connection threads have ended; no server thread is left per socket.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while threads() > before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(threads(), before);
    for s in kept {
        s.shutdown(Duration::from_secs(1)).unwrap();
    }
}
