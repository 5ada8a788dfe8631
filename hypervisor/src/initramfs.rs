//! Builds tiny busybox initramfs images (cpio "newc", uncompressed, which the kernel
//! unpacks as is). Used by the KVM probe and by boot tests; nothing here needs root
//! because device nodes are written as archive entries, not created on the host.

use std::fs;
use std::io;
use std::path::Path;

/// Where Debian's busybox-static puts its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Lines every busybox `/init` starts with: mount the pseudo filesystems and create
/// the applet links, so the rest of the script can use plain command names.
pub const INIT_PRELUDE: &str = "#!/bin/busybox sh\n\
/bin/busybox mount -t proc proc /proc\n\
/bin/busybox mount -t sysfs sysfs /sys\n\
/bin/busybox mount -t devtmpfs devtmpfs /dev\n\
/bin/busybox --install -s /bin\n\
export PATH=/bin\n";

/// A cpio newc archive under construction.
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Cpio {
    pub fn new() -> Self {
        Self::default()
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let name = name.trim_start_matches('/');
        let namesize = name.len() + 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & S_IFDIR != 0 { 2 } else { 1 },
            0, // mtime: fixed so images are reproducible
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            namesize,
            0,
        );
        self.buf.extend_from_slice(header.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.entry(path, S_IFDIR | 0o755, (0, 0), &[]);
        self
    }

    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> &mut Self {
        self.entry(path, S_IFREG | (perm & 0o7777), (0, 0), data);
        self
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes());
        self
    }

    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> &mut Self {
        self.entry(path, S_IFCHR | (perm & 0o7777), (major, minor), &[]);
        self
    }

    /// Appends the trailer and returns the archive bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        // The kernel reads initramfs in 512-byte blocks in some paths; pad as cpio(1) does.
        while self.buf.len() % 512 != 0 {
            self.buf.push(0);
        }
        self.buf
    }
}

/// A busybox initramfs whose `/init` is [`INIT_PRELUDE`] followed by `script`.
/// `extra` files are copied from the host: `(path in the image, host path)`.
pub fn busybox_initramfs(script: &str, extra: &[(&str, &Path)]) -> io::Result<Vec<u8>> {
    let busybox = fs::read(BUSYBOX).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("{BUSYBOX}: {e}: run scripts/install-deps.sh (package busybox-static)"),
        )
    })?;
    let mut c = Cpio::new();
    for d in ["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"] {
        c.dir(d);
    }
    // Early console output needs /dev/console before devtmpfs is mounted.
    c.char_dev("dev/console", 0o600, 5, 1);
    c.file("bin/busybox", 0o755, &busybox);
    c.symlink("bin/sh", "busybox");
    let init = format!("{INIT_PRELUDE}{script}");
    c.file("init", 0o755, init.as_bytes());
    for (dest, src) in extra {
        let data = fs::read(src)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", src.display())))?;
        c.file(dest, 0o644, &data);
    }
    Ok(c.finish())
}

/// Debian's kernel builds virtio-blk as modules: the chain, in load order, relative
/// to `/lib/modules/RELEASE`.
pub const VIRTIO_BLK_MODULES: &[&str] = &[
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/drivers/block/virtio_blk.ko",
];

/// The ACPI power button as an input device (`/dev/input/event*`), what QMP
/// `system_powerdown` presses.
pub const POWER_BUTTON_MODULES: &[&str] = &[
    "kernel/drivers/input/evdev.ko",
    "kernel/drivers/acpi/button.ko",
];

/// `/lib/modules/RELEASE` for a kernel image named `vmlinuz-RELEASE`.
pub fn modules_dir(kernel: &Path) -> Option<std::path::PathBuf> {
    let name = kernel.file_name()?.to_str()?;
    let release = name.strip_prefix("vmlinuz-")?;
    Some(Path::new("/lib/modules").join(release))
}

/// A busybox initramfs for `kernel` that loads `modules` (uncompressed `.ko` paths
/// relative to its modules dir, in load order) and then runs `script`.
pub fn busybox_initramfs_with_modules(
    kernel: &Path,
    modules: &[&str],
    script: &str,
) -> io::Result<Vec<u8>> {
    let dir = modules_dir(kernel).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not named vmlinuz-RELEASE", kernel.display()),
        )
    })?;
    let base = |m: &str| {
        Path::new(m)
            .file_name()
            .map(|b| b.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let files: Vec<(String, std::path::PathBuf)> = modules
        .iter()
        .map(|m| (format!("lib/modules/{}", base(m)), dir.join(m)))
        .collect();
    let extra: Vec<(&str, &Path)> = files
        .iter()
        .map(|(d, s)| (d.as_str(), s.as_path()))
        .collect();
    let mut full = String::new();
    for m in modules {
        full.push_str(&format!("insmod /lib/modules/{}\n", base(m)));
    }
    full.push_str(script);
    busybox_initramfs(&full, &extra)
}

/// The newest `/boot/vmlinuz-*` on the host (Debian: linux-image-amd64).
pub fn host_kernel() -> Option<std::path::PathBuf> {
    let mut kernels: Vec<_> = fs::read_dir("/boot")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    kernels.pop()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_entries_are_aligned_and_terminated() {
        let mut c = Cpio::new();
        c.dir("bin").file("init", 0o755, b"#!/bin/sh\n");
        let img = c.finish();
        assert!(img.starts_with(b"070701"));
        assert_eq!(img.len() % 512, 0);
        let text = String::from_utf8_lossy(&img);
        assert!(text.contains("TRAILER!!!"));
        // Second header starts on a 4-byte boundary right after "bin\0" + padding.
        let second = text.find("070701").and_then(|_| text[6..].find("070701"));
        assert_eq!(second.map(|i| (i + 6) % 4), Some(0));
        // Mode of the regular file is recorded in octal 100755 -> hex 81ed.
        assert!(text.contains("000081ed"));
    }
}
