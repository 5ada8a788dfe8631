//! Serves a raw image file or a thin pool volume to a Xen domain over blkif, without
//! libxl's help: writes the vbd nodes under our own backend type directory for a domain
//! created paused (`xl create -p`), runs the handshake and the ring until the domain goes
//! away. For trying the backend in a real dom0 (scripts/testvm.sh --xen):
//!
//!   blkif_serve DOMID IMAGE [DEVID [VDEV]]      (default 51712 = xvda)
//!   blkif_serve DOMID --thin POOLDIR SIZE_MIB   (a thin pool volume `vol`, created if
//!                                               missing; prints `mapped BYTES` at exit)
//!   blkif_serve --read-thin POOLDIR OFFSET LEN  (the volume's bytes, to stdout)
//!
//! Prints `ready <backend path>` once the backend is in InitWait: unpause the domain then.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use blkback::blkif::xen::XenConnector;
use blkback::blkif::xenbus::{self, BlkifDevice, DeviceInfo, Outcome, XenStore as _};
use blkback::blkif::VbdParams;
use blkback::testing::FileDevice;
use storage::{BlockDevice, Pool as _};

fn thin_pool(dir: &Path, mib: u64) -> anyhow::Result<Arc<storage::ThinPool>> {
    if dir.join("pool.meta").exists() {
        return Ok(storage::ThinPool::open(dir)?);
    }
    std::fs::create_dir_all(dir)?;
    let p = storage::ThinPool::create(
        dir,
        storage::ThinOptions {
            chunk_size: 64 << 10,
            capacity: (4 * mib) << 20,
        },
    )?;
    p.create_volume("vol", mib << 20)?;
    p.commit()?;
    Ok(p)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        bail!("usage: blkif_serve DOMID IMAGE [DEVID [VDEV]] | DOMID --thin POOLDIR SIZE_MIB | --read-thin POOLDIR OFFSET LEN");
    }
    if args[0] == "--read-thin" && args.len() == 4 {
        let pool = storage::ThinPool::open(Path::new(&args[1]))?;
        let dev = pool.open_volume("vol", true)?;
        let mut buf = vec![0; args[3].parse().context("LEN")?];
        dev.read_at(&mut buf, args[2].parse().context("OFFSET")?)?;
        std::io::Write::write_all(&mut std::io::stdout(), &buf)?;
        return Ok(());
    }
    let domid: u32 = args[0].parse().context("DOMID")?;
    let mut thin = None;
    let (params, device, rest): (String, Arc<dyn BlockDevice>, &[String]) = if args[1] == "--thin" {
        let dir = PathBuf::from(args.get(2).context("POOLDIR")?);
        let mib: u64 = args
            .get(3)
            .context("SIZE_MIB")?
            .parse()
            .context("SIZE_MIB")?;
        let pool = thin_pool(&dir, mib)?;
        let dev = pool.open_volume("vol", false)?;
        thin = Some(pool);
        (format!("thin:{}", dir.display()), dev, &args[4..])
    } else {
        let image = PathBuf::from(&args[1]);
        let size = std::fs::metadata(&image)
            .with_context(|| format!("image {}", image.display()))?
            .len();
        let dev = FileDevice::create(&image, size)
            .with_context(|| format!("opening {}", image.display()))?;
        (image.display().to_string(), Arc::new(dev), &args[2..])
    };
    let devid: u32 = rest
        .first()
        .map_or(Ok(51712), |s| s.parse())
        .context("DEVID")?;
    let vdev = rest.get(1).cloned().unwrap_or_else(|| "xvda".into());
    let xs =
        Arc::new(xen_sys::XenStore::open().context("opening xenstore (is xenstored running?)")?);
    let paths = xenbus::add_device(&xs, 0, domid, devid, &vdev, false, &params)
        .context("writing the device's xenstore nodes")?;
    let conn = XenConnector {
        gnttab: xen_sys::GntTab::open().context("opening /dev/xen/gntdev")?,
        device: device.clone(),
        params: VbdParams::default(),
    };
    let info = DeviceInfo {
        size: device.size(),
        read_only: false,
        discard_granularity: if thin.is_some() { 64 << 10 } else { 4096 },
        persistent: blkback::blkif::persistent::offered(),
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
    if let Some(pool) = thin {
        device.flush()?;
        println!("mapped {}", pool.volume("vol")?.mapped);
    }
    Ok(())
}
