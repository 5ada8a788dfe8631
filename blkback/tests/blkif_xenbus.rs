//! The blkif XenBus handshake against the in-memory xenstore: the nodes the backend
//! publishes, 1 -> 2 -> (frontend 3) -> 4, close and reconnect, domain death, backend
//! shutdown, and frontends that publish nonsense. I/O runs over the connected ring.

use std::sync::Arc;
use std::time::Duration;

use blkback::blkif::abi::*;
use blkback::blkif::testing::{Frontend, TestConnector};
use blkback::blkif::xenbus::{BlkifDevice, DeviceInfo, MemStore, Outcome, State, XenStore};
use storage::{BlockDevice, Pool};

const BE: &str = "/local/domain/0/backend/vbd3/7/51712";
const FE: &str = "/local/domain/7/device/vbd/51712";
const MIB: u64 = 1 << 20;

type Dev = BlkifDevice<Arc<MemStore>, TestConnector>;

fn toolstack(xs: &MemStore) {
    for (p, v) in [
        (format!("{BE}/frontend"), FE.to_string()),
        (format!("{BE}/frontend-id"), "7".into()),
        (format!("{BE}/online"), "1".into()),
        (format!("{BE}/state"), "1".into()),
        (format!("{FE}/backend"), BE.into()),
        (format!("{FE}/backend-id"), "0".into()),
        (format!("{FE}/state"), "1".into()),
    ] {
        xs.write(&p, &v).unwrap();
    }
}

fn setup(read_only: bool) -> (Arc<MemStore>, Frontend, Dev, Arc<dyn BlockDevice>) {
    let xs = Arc::new(MemStore::new());
    toolstack(&xs);
    let pool = storage::MemPool::with_options(64 << 10, None);
    pool.create_volume("work/private", 8 * MIB).unwrap();
    let dev = pool.open_volume("work/private", read_only).unwrap();
    let front = Frontend::new(0);
    let conn = TestConnector::for_frontend(&front, dev.clone());
    let info = DeviceInfo {
        size: dev.size(),
        read_only,
        discard_granularity: 64 << 10,
        persistent: true,
    };
    let mut d = BlkifDevice::new(xs.clone(), BE, info, conn).unwrap();
    for p in d.watch_paths() {
        xs.watch(&p, "blkif").unwrap();
    }
    d.start().unwrap();
    (xs, front, d, dev)
}

/// Feeds pending watch events to the device, as the daemon's loop does.
fn pump(xs: &MemStore, d: &mut Dev) -> Outcome {
    let mut out = Outcome::Alive;
    while xs.next_watch(Duration::from_millis(20)).unwrap().is_some() {
        out = d.on_change().unwrap();
        if out == Outcome::Gone {
            break;
        }
    }
    out
}

fn node(xs: &MemStore, p: &str) -> Option<String> {
    xs.read(p).unwrap()
}

fn frontend_connects(xs: &MemStore, front: &Frontend) {
    xs.write_all(&front.nodes(FE, 17)).unwrap();
    xs.write(&format!("{FE}/state"), "3").unwrap();
}

#[test]
fn handshake_publishes_features_connects_and_serves() {
    let (xs, mut front, mut d, dev) = setup(false);
    assert_eq!(pump(&xs, &mut d), Outcome::Alive);
    let want = [
        ("state", "2"),
        ("feature-flush-cache", "1"),
        ("feature-persistent", "1"),
        ("feature-discard", "1"),
        ("discard-granularity", "65536"),
        ("feature-max-indirect-segments", "256"),
        ("max-ring-page-order", "4"),
        ("sectors", "16384"),
        ("sector-size", "512"),
        ("info", "0"),
    ];
    for (k, v) in want {
        assert_eq!(node(&xs, &format!("{BE}/{k}")).as_deref(), Some(v), "{k}");
    }
    assert!(!d.is_connected());
    frontend_connects(&xs, &front);
    pump(&xs, &mut d);
    assert_eq!(node(&xs, &format!("{BE}/state")).as_deref(), Some("4"));
    assert_eq!(d.state(), State::Connected);
    assert_eq!(d.running().unwrap().params.event_channel, 17);
    assert!(
        d.running().unwrap().params.persistent,
        "both ends offered it"
    );
    // I/O over the ring the handshake mapped.
    let data: Vec<u8> = (0..4 * PAGE_SIZE).map(|i| (i % 251) as u8).collect();
    assert_eq!(front.write(64, &data), RSP_OKAY);
    let mut v = vec![0; data.len()];
    dev.read_at(&mut v, 64 * 512).unwrap();
    assert_eq!(v, data);

    // The guest closes its device: 5 -> 5, 6 -> 6, and the ring is released.
    xs.write(&format!("{FE}/state"), "5").unwrap();
    pump(&xs, &mut d);
    assert_eq!(node(&xs, &format!("{BE}/state")).as_deref(), Some("5"));
    assert!(!d.is_connected());
    xs.write(&format!("{FE}/state"), "6").unwrap();
    pump(&xs, &mut d);
    assert_eq!(node(&xs, &format!("{BE}/state")).as_deref(), Some("6"));

    // The guest reloads its driver with a 4-page ring: back to 2, then 4 again.
    xs.write(&format!("{FE}/state"), "1").unwrap();
    pump(&xs, &mut d);
    assert_eq!(node(&xs, &format!("{BE}/state")).as_deref(), Some("2"));
    front.reinit(2);
    xs.rm(&format!("{FE}/ring-ref")).unwrap();
    frontend_connects(&xs, &front);
    pump(&xs, &mut d);
    assert_eq!(node(&xs, &format!("{BE}/state")).as_deref(), Some("4"));
    assert_eq!(d.running().unwrap().params.ring_refs.len(), 4);
    assert_eq!(front.read(64, 4), (RSP_OKAY, data));

    // The domain dies: its frontend directory goes, the backend closes and is done.
    xs.rm("/local/domain/7").unwrap();
    assert_eq!(pump(&xs, &mut d), Outcome::Gone);
    assert_eq!(node(&xs, &format!("{BE}/state")).as_deref(), Some("6"));
    assert!(!d.is_connected());
}

#[test]
fn backend_shutdown_closes_a_connected_device() {
    let (xs, front, mut d, _dev) = setup(false);
    frontend_connects(&xs, &front);
    pump(&xs, &mut d);
    assert!(d.is_connected());
    d.shutdown().unwrap();
    assert!(!d.is_connected());
    assert_eq!(node(&xs, &format!("{BE}/state")).as_deref(), Some("6"));
    assert_eq!(d.state(), State::Closed);
}

#[test]
fn removing_the_backend_node_releases_the_device() {
    let (xs, front, mut d, _dev) = setup(false);
    frontend_connects(&xs, &front);
    pump(&xs, &mut d);
    assert!(d.is_connected());
    xs.rm(BE).unwrap();
    assert_eq!(pump(&xs, &mut d), Outcome::Gone);
    assert!(!d.is_connected());
}

#[test]
fn a_read_only_volume_is_advertised_read_only_without_discard() {
    let (xs, _front, mut d, _dev) = setup(true);
    pump(&xs, &mut d);
    assert_eq!(node(&xs, &format!("{BE}/info")).as_deref(), Some("4"));
    assert_eq!(node(&xs, &format!("{BE}/feature-discard")), None);
}

#[test]
fn bad_frontend_parameters_close_the_device_with_an_error() {
    let cases: &[(&str, &str)] = &[
        ("protocol", "x86_32-abi"),
        ("ring-page-order", "5"),
        ("ring-page-order", "x"),
        ("event-channel", "-1"),
        ("ring-ref", "99999"),
        ("multi-queue-num-queues", "2"),
    ];
    for (k, v) in cases {
        let (xs, front, mut d, _dev) = setup(false);
        xs.write_all(&front.nodes(FE, 17)).unwrap();
        xs.write(&format!("{FE}/{k}"), v).unwrap();
        xs.write(&format!("{FE}/state"), "3").unwrap();
        pump(&xs, &mut d);
        assert_eq!(
            node(&xs, &format!("{BE}/state")).as_deref(),
            Some("5"),
            "{k}={v}"
        );
        assert!(node(&xs, &format!("{BE}/error")).is_some(), "{k}={v}");
        assert!(!d.is_connected(), "{k}={v}");
    }
    // No event channel at all.
    let (xs, front, mut d, _dev) = setup(false);
    xs.write_all(&front.nodes(FE, 17)).unwrap();
    xs.rm(&format!("{FE}/event-channel")).unwrap();
    xs.write(&format!("{FE}/state"), "3").unwrap();
    pump(&xs, &mut d);
    assert_eq!(node(&xs, &format!("{BE}/state")).as_deref(), Some("5"));
}

#[test]
fn missing_toolstack_nodes_are_named() {
    let xs = Arc::new(MemStore::new());
    xs.write(&format!("{BE}/frontend-id"), "7").unwrap();
    let pool = storage::MemPool::with_options(64 << 10, None);
    pool.create_volume("v", MIB).unwrap();
    let dev = pool.open_volume("v", false).unwrap();
    let front = Frontend::new(0);
    let info = DeviceInfo {
        size: MIB,
        read_only: false,
        discard_granularity: 4096,
        persistent: true,
    };
    let e = BlkifDevice::new(xs, BE, info, TestConnector::for_frontend(&front, dev))
        .err()
        .unwrap();
    assert!(e.to_string().contains("frontend"), "{e}");
}

#[test]
fn add_device_writes_what_a_frontend_needs_and_the_handshake_runs_on_it() {
    use blkback::blkif::xenbus::{add_device, remove_device, BACKEND_KIND};
    let xs = Arc::new(MemStore::new());
    let paths = add_device(&xs, 0, 7, 51712, "xvda", false, "/pool/work/private").unwrap();
    assert_eq!(paths.frontend, FE);
    assert_eq!(
        paths.backend,
        format!("/local/domain/0/backend/{BACKEND_KIND}/7/51712")
    );
    // What blkfront reads to find its backend, and the backend's view of the guest.
    assert_eq!(
        node(&xs, &format!("{FE}/backend")),
        Some(paths.backend.clone())
    );
    assert_eq!(node(&xs, &format!("{FE}/state")).as_deref(), Some("1"));
    assert_eq!(
        node(&xs, &format!("{}/frontend-id", paths.backend)).as_deref(),
        Some("7")
    );
    // The guest owns its frontend nodes and may only read the backend's.
    assert_eq!(xs.permissions(FE), Some(vec![(7, 0), (0, 1)]));
    assert_eq!(xs.permissions(&paths.backend), Some(vec![(0, 0), (7, 1)]));
    assert_eq!(
        xs.permissions(&format!("{}/state", paths.backend)),
        Some(vec![(0, 0), (7, 1)])
    );

    let pool = storage::MemPool::with_options(64 << 10, None);
    pool.create_volume("v", MIB).unwrap();
    let dev = pool.open_volume("v", false).unwrap();
    let mut front = Frontend::new(1);
    let info = DeviceInfo {
        size: MIB,
        read_only: false,
        discard_granularity: 4096,
        persistent: true,
    };
    let conn = TestConnector::for_frontend(&front, dev);
    let mut d = BlkifDevice::new(xs.clone(), &paths.backend, info, conn).unwrap();
    for p in d.watch_paths() {
        xs.watch(&p, "blkif").unwrap();
    }
    d.start().unwrap();
    frontend_connects(&xs, &front);
    pump(&xs, &mut d);
    assert!(d.is_connected());
    assert_eq!(front.write(0, &[3; PAGE_SIZE]), RSP_OKAY);
    xs.rm("/local/domain/7").unwrap();
    assert_eq!(pump(&xs, &mut d), Outcome::Gone);
    remove_device(&xs, &paths).unwrap();
    assert!(xs.dump().keys().all(|k| !k.contains("/7/51712")));
    assert_eq!(
        xs.directory(&format!("/local/domain/0/backend/{BACKEND_KIND}"))
            .unwrap(),
        Vec::<String>::new()
    );
}

#[test]
fn a_new_backend_takes_over_a_connected_ring_and_redoes_the_unanswered_requests() {
    let (xs, mut front, mut d, dev) = setup(false);
    frontend_connects(&xs, &front);
    pump(&xs, &mut d);
    assert!(d.is_connected());
    let first: Vec<u8> = (0..PAGE_SIZE).map(|i| (i % 13) as u8).collect();
    assert_eq!(front.write(8, &first), RSP_OKAY);
    // The daemon dies (SIGKILL): its ring thread is gone, xenstore is left as it was.
    drop(d);
    assert_eq!(node(&xs, &format!("{BE}/state")).as_deref(), Some("4"));
    // The guest queues a write nobody serves yet.
    let second: Vec<u8> = (0..PAGE_SIZE).map(|i| (i % 7) as u8 + 1).collect();
    let buf = front.alloc(1, Some(&second));
    let id = front.id();
    front.ring.put_request(&encode::rw(
        OP_WRITE,
        id,
        16,
        &Frontend::page_segments(&buf),
    ));
    front.push();

    // A new daemon: same nodes, a new device object that resumes instead of starting.
    let info = DeviceInfo {
        size: dev.size(),
        read_only: false,
        discard_granularity: 64 << 10,
        persistent: true,
    };
    let conn = TestConnector::for_frontend(&front, dev.clone());
    let mut d2: Dev = BlkifDevice::new(xs.clone(), BE, info, conn).unwrap();
    for p in d2.watch_paths() {
        xs.watch(&p, "blkif2").unwrap();
    }
    d2.resume().unwrap();
    assert!(d2.is_connected());
    assert_eq!(d2.state(), State::Connected);
    assert_eq!(pump(&xs, &mut d2), Outcome::Alive);
    assert_eq!(node(&xs, &format!("{BE}/state")).as_deref(), Some("4"));
    // The write queued while no backend ran is served, and I/O goes on.
    let r = front.wait_response();
    assert_eq!((r.id, r.status), (id, RSP_OKAY));
    let mut v = vec![0; PAGE_SIZE];
    dev.read_at(&mut v, 16 * 512).unwrap();
    assert_eq!(v, second);
    assert_eq!(front.read(8, 1), (RSP_OKAY, first));
    // And it still closes as usual.
    d2.shutdown().unwrap();
    assert_eq!(node(&xs, &format!("{BE}/state")).as_deref(), Some("6"));
}

#[test]
fn resuming_a_device_that_waited_for_its_frontend_finishes_the_handshake() {
    let (xs, front, d, dev) = setup(false);
    drop(d);
    assert_eq!(node(&xs, &format!("{BE}/state")).as_deref(), Some("2"));
    let info = DeviceInfo {
        size: dev.size(),
        read_only: false,
        discard_granularity: 64 << 10,
        persistent: true,
    };
    let conn = TestConnector::for_frontend(&front, dev.clone());
    let mut d2: Dev = BlkifDevice::new(xs.clone(), BE, info.clone(), conn).unwrap();
    for p in d2.watch_paths() {
        xs.watch(&p, "blkif2").unwrap();
    }
    d2.resume().unwrap();
    assert_eq!(d2.state(), State::InitWait);
    assert!(!d2.is_connected());
    frontend_connects(&xs, &front);
    pump(&xs, &mut d2);
    assert!(d2.is_connected());
    assert_eq!(node(&xs, &format!("{BE}/state")).as_deref(), Some("4"));

    // A backend whose nodes are gone cannot be resumed: the error names the node.
    xs.rm(&format!("{BE}/state")).unwrap();
    let conn = TestConnector::for_frontend(&front, dev);
    let mut d3: Dev = BlkifDevice::new(xs.clone(), BE, info, conn).unwrap();
    let e = d3.resume().unwrap_err().to_string();
    assert!(e.contains("state"), "{e}");
}
