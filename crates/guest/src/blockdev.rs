//! Finding the test disk and doing durable block I/O on it.
//!
//! The host names the disk by its virtio-blk serial (`-device virtio-blk-pci,serial=S`),
//! because device names (`vdb`, `vdc`) follow probe order and are not stable; a name or, for a
//! guest run as an ordinary process, a file path work too.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::block::BLOCK_SIZE;
use crate::config::DiskIo;
use crate::disk::{BlockDevice, Disk};
use crate::pages::Page;
use crate::pattern::Fill;
use crate::{log, sys};

const O_DIRECT: i32 = 0o40000;
const EINVAL: i32 = 22;
/// Blocks used when `ferry.disk_blocks` is not given: 64 MiB, so that a verify reads a bounded
/// amount whatever the disk's size.
pub const DEFAULT_MAX_BLOCKS: u64 = 16384;
/// How long to wait for the disk to appear: virtio-blk probes asynchronously after insmod.
pub const APPEAR_WAIT: Duration = Duration::from_secs(5);

/// The disk as a file, written with O_DIRECT (completion = the device has the data) or, where
/// O_DIRECT is refused, with write + fdatasync.
pub struct FileDevice {
    file: File,
    direct: bool,
}

/// The bytes of consecutive pages.
fn as_bytes_mut(pages: &mut [Page]) -> &mut [u8] {
    // SAFETY: `Page` is `repr(C)` around `[u8; PAGE_SIZE]` with size == alignment == 4096, so a
    // slice of pages is exactly `len * 4096` initialised bytes without padding, and the
    // returned slice borrows `pages` mutably for its whole life.
    unsafe {
        std::slice::from_raw_parts_mut(
            pages.as_mut_ptr().cast::<u8>(),
            std::mem::size_of_val(pages),
        )
    }
}

impl BlockDevice for FileDevice {
    fn write_block(&mut self, index: u64, block: &Page) -> io::Result<()> {
        let n = self.file.write_at(&block.0, index * BLOCK_SIZE as u64)?;
        if n != BLOCK_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write: {n} of {BLOCK_SIZE} bytes"),
            ));
        }
        if !self.direct {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn read_blocks(&mut self, first: u64, buf: &mut [Page]) -> io::Result<()> {
        let offset = first * BLOCK_SIZE as u64;
        let bytes = as_bytes_mut(buf);
        if !self.direct {
            // Every page is clean after its fdatasync, so this makes the read go to the device.
            sys::drop_cached(&self.file, offset, bytes.len() as u64);
        }
        self.file.read_exact_at(bytes, offset)
    }

    fn mode(&self) -> &'static str {
        if self.direct {
            "direct"
        } else {
            "sync"
        }
    }
}

/// Opens `path` for block I/O in `io` mode, falling back from O_DIRECT to synced writes when
/// the file system or device refuses O_DIRECT (EINVAL).
pub fn open_device(path: &Path, io: DiskIo) -> io::Result<FileDevice> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true);
    if io == DiskIo::Direct {
        match opts.clone().custom_flags(O_DIRECT).open(path) {
            Ok(file) => return Ok(FileDevice { file, direct: true }),
            Err(e) if e.raw_os_error() == Some(EINVAL) => {
                log(&format!(
                    "disk {}: O_DIRECT refused, using write + fdatasync",
                    path.display()
                ));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(FileDevice {
        file: opts.open(path)?,
        direct: false,
    })
}

/// The name under `sys_block` of the disk whose serial is `spec`, else of the disk named
/// `spec`. Serials win, since a device name is only a fallback for hand-run guests.
pub fn find_block_device(spec: &str, sys_block: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(sys_block)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    let by_serial = names.iter().find(|name| {
        std::fs::read_to_string(sys_block.join(name).join("serial"))
            .is_ok_and(|serial| serial.trim() == spec)
    });
    by_serial
        .or_else(|| names.iter().find(|name| *name == spec))
        .cloned()
}

/// A device node for disk `name`: devtmpfs's `/dev/NAME`, else one made with mknod from
/// `/sys/block/NAME/dev` (`MAJOR:MINOR`).
fn device_node(name: &str, sys_block: &Path, dev_dir: &Path) -> Result<PathBuf, String> {
    let node = dev_dir.join(name);
    if node.exists() {
        return Ok(node);
    }
    let dev_file = sys_block.join(name).join("dev");
    let text =
        std::fs::read_to_string(&dev_file).map_err(|e| format!("{}: {e}", dev_file.display()))?;
    let (major, minor) = text
        .trim()
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .ok_or_else(|| format!("{}: not MAJOR:MINOR: {text:?}", dev_file.display()))?;
    let node = dev_dir.join(format!("ferry-{name}"));
    if !node.exists() {
        sys::mknod_block(&node, major, minor)
            .map_err(|e| format!("mknod {}: {e}", node.display()))?;
    }
    Ok(node)
}

/// Where the disk `spec` is: a path as given, or a block device found by serial or name
/// (waiting up to `wait` for it to appear). Returns the path and a short label for reports.
pub fn locate(spec: &str, wait: Duration) -> Result<(PathBuf, String), String> {
    if spec.starts_with('/') {
        return Ok((PathBuf::from(spec), spec.to_string()));
    }
    let sys_block = Path::new("/sys/block");
    let deadline = Instant::now() + wait;
    loop {
        if let Some(name) = find_block_device(spec, sys_block) {
            let node = device_node(&name, sys_block, Path::new("/dev"))?;
            return Ok((node, name));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no disk with serial or name {spec:?} in /sys/block within {wait:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Blocks to use on a device of `device_blocks`: the requested count if it fits, else the
/// whole device up to [`DEFAULT_MAX_BLOCKS`].
pub fn blocks_to_use(device_blocks: u64, requested: Option<u64>) -> Result<u64, String> {
    if device_blocks == 0 {
        return Err("the disk is smaller than one 4 KiB block".into());
    }
    match requested {
        Some(n) if n > device_blocks => Err(format!(
            "ferry.disk_blocks={n} but the disk has only {device_blocks} blocks"
        )),
        Some(n) => Ok(n),
        None => Ok(device_blocks.min(DEFAULT_MAX_BLOCKS)),
    }
}

/// Finds, opens and sizes the disk. Returns it with its label.
pub fn open_disk(
    spec: &str,
    io: DiskIo,
    requested_blocks: Option<u64>,
    fill: Fill,
) -> Result<(Disk, String), String> {
    let (path, label) = locate(spec, APPEAR_WAIT)?;
    let dev = open_device(&path, io).map_err(|e| format!("open {}: {e}", path.display()))?;
    let size = {
        use std::io::{Seek, SeekFrom};
        (&dev.file)
            .seek(SeekFrom::End(0))
            .map_err(|e| format!("size of {}: {e}", path.display()))?
    };
    let blocks = blocks_to_use(size / BLOCK_SIZE as u64, requested_blocks)?;
    let nonce = sys::random_u64();
    Ok((Disk::new(Box::new(dev), blocks, nonce, fill), label))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DiskReport;

    /// A unique scratch path, removed on drop.
    pub struct TempPath(pub PathBuf);

    impl TempPath {
        pub fn new(tag: &str) -> TempPath {
            static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            TempPath(
                std::env::temp_dir().join(format!("ferry-guest-{tag}-{}-{n}", std::process::id())),
            )
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn fresh_file(blocks: u64) -> TempPath {
        let t = TempPath::new("disk");
        File::create(&t.0)
            .unwrap()
            .set_len(blocks * BLOCK_SIZE as u64)
            .unwrap();
        t
    }

    fn ok(r: &DiskReport) -> bool {
        r.errors == 0 && r.first_bad.is_empty()
    }

    #[test]
    fn file_disk_in_both_modes_detects_host_side_damage() {
        for io in [DiskIo::Direct, DiskIo::Sync] {
            let f = fresh_file(40);
            let path = f.0.to_str().unwrap().to_string();
            let (mut disk, label) = open_disk(&path, io, Some(32), Fill::Random).unwrap();
            assert_eq!(label, path);
            assert_eq!(disk.blocks(), 32);
            if io == DiskIo::Sync {
                assert_eq!(disk.mode(), "sync");
            }
            for _ in 0..50 {
                disk.write_next().unwrap();
            }
            let r = disk.verify();
            assert!(ok(&r), "{io:?} {} {r:?}", disk.mode());
            // Another process zeroes block 5 behind the guest's back.
            let other = OpenOptions::new().write(true).open(&f.0).unwrap();
            other.write_all_at(&[0; BLOCK_SIZE], 5 * 4096).unwrap();
            other.sync_all().unwrap();
            let r = disk.verify();
            assert_eq!(r.errors, 1, "{r:?}");
            assert_eq!(r.first_bad[0].index, 5);
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(blocks_to_use(100, None), Ok(100));
        assert_eq!(blocks_to_use(1 << 20, None), Ok(DEFAULT_MAX_BLOCKS));
        assert_eq!(blocks_to_use(1 << 20, Some(1 << 19)), Ok(1 << 19));
        assert!(blocks_to_use(10, Some(11)).is_err());
        assert!(blocks_to_use(0, None).is_err());
        let f = fresh_file(0);
        let e = open_disk(f.0.to_str().unwrap(), DiskIo::Sync, None, Fill::Pattern);
        assert!(e.is_err());
    }

    #[test]
    fn finds_disks_by_serial_then_name_and_makes_nodes_only_when_missing() {
        let root = TempPath::new("sys");
        let sys_block = root.0.join("block");
        for (name, serial, dev) in [("vda", "boot", "253:0"), ("vdb", "ferry-data", "253:16")] {
            std::fs::create_dir_all(sys_block.join(name)).unwrap();
            std::fs::write(sys_block.join(name).join("serial"), format!("{serial}\n")).unwrap();
            std::fs::write(sys_block.join(name).join("dev"), format!("{dev}\n")).unwrap();
        }
        assert_eq!(
            find_block_device("ferry-data", &sys_block).as_deref(),
            Some("vdb")
        );
        assert_eq!(find_block_device("vda", &sys_block).as_deref(), Some("vda"));
        assert_eq!(find_block_device("nope", &sys_block), None);
        let dev_dir = root.0.join("dev");
        std::fs::create_dir_all(&dev_dir).unwrap();
        std::fs::write(dev_dir.join("vda"), b"").unwrap();
        assert_eq!(
            device_node("vda", &sys_block, &dev_dir).unwrap(),
            dev_dir.join("vda")
        );
        std::fs::write(sys_block.join("vdb").join("dev"), "junk").unwrap();
        assert!(device_node("vdb", &sys_block, &dev_dir).is_err());
        std::fs::write(sys_block.join("vdb").join("dev"), "253:16\n").unwrap();
        match device_node("vdb", &sys_block, &dev_dir) {
            Ok(node) => {
                use std::os::unix::fs::{FileTypeExt, MetadataExt};
                assert_eq!(node, dev_dir.join("ferry-vdb"));
                let meta = std::fs::metadata(&node).unwrap();
                assert!(meta.file_type().is_block_device());
                assert_eq!(meta.rdev(), crate::sys::makedev(253, 16));
            }
            // Not root, or a file system that forbids device nodes.
            Err(e) => assert!(e.contains("mknod"), "{e}"),
        }
    }

    #[test]
    fn makedev_matches_glibc() {
        assert_eq!(crate::sys::makedev(253, 16), 0xfd10);
        assert_eq!(crate::sys::makedev(259, 1), 0x10301);
        assert_eq!(crate::sys::makedev(8, 300), 0x10_082c);
    }
}
