//! Serves a raw image file to a Xen domain over blkif, without libxl's help: writes the
//! vbd nodes under our own backend type directory for a domain created paused
//! (`xl create -p`), runs the handshake and the ring until the domain goes away.
//! For trying the backend in a real dom0 (scripts/testvm.sh --xen):
//!
//!   blkif_serve DOMID IMAGE [DEVID [VDEV]]      (default 51712 = xvda)
//!
//! Prints `ready <backend path>` once the backend is in InitWait: unpause the domain then.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use blkback::blkif::xen::XenConnector;
use blkback::blkif::xenbus::{self, BlkifDevice, DeviceInfo, Outcome, XenStore as _};
use blkback::blkif::VbdParams;
use blkback::testing::FileDevice;
use storage::BlockDevice;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        bail!("usage: blkif_serve DOMID IMAGE [DEVID [VDEV]]");
    }
    let domid: u32 = args[0].parse().context("DOMID")?;
    let image = std::path::PathBuf::from(&args[1]);
    let devid: u32 = args
        .get(2)
        .map_or(Ok(51712), |s| s.parse())
        .context("DEVID")?;
    let vdev = args.get(3).cloned().unwrap_or_else(|| "xvda".into());
    let size = std::fs::metadata(&image)
        .with_context(|| format!("image {}", image.display()))?
        .len();
    let device: Arc<dyn BlockDevice> = Arc::new(
        FileDevice::create(&image, size).with_context(|| format!("opening {}", image.display()))?,
    );
    let xs =
        Arc::new(xen_sys::XenStore::open().context("opening xenstore (is xenstored running?)")?);
    let paths = xenbus::add_device(
        &xs,
        0,
        domid,
        devid,
        &vdev,
        false,
        &image.display().to_string(),
    )
    .context("writing the device's xenstore nodes")?;
    let conn = XenConnector {
        gnttab: xen_sys::GntTab::open().context("opening /dev/xen/gntdev")?,
        device,
        params: VbdParams::default(),
    };
    let info = DeviceInfo {
        size,
        read_only: false,
        discard_granularity: 4096,
    };
    let mut dev = BlkifDevice::new(xs.clone(), &paths.backend, info, conn)?;
    for p in dev.watch_paths() {
        xs.watch(&p, "blkif")
            .with_context(|| format!("watching {p}"))?;
    }
    dev.start()?;
    println!("ready {}", paths.backend);
    loop {
        if xs.next_watch(Duration::from_secs(1))?.is_none() {
            continue;
        }
        let before = dev.state();
        if dev.on_change()? == Outcome::Gone {
            eprintln!("blkif_serve: domain {domid} gone");
            break;
        }
        if dev.state() != before {
            eprintln!("blkif_serve: backend state {:?}", dev.state());
        }
    }
    drop(dev);
    xenbus::remove_device(&*xs, &paths).context("removing the device's nodes")?;
    Ok(())
}
