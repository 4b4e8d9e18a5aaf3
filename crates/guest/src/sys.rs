//! What PID 1 of a bare initramfs must do before anything else works: mount the kernel's
//! filesystems, load the virtio drivers (modular in Debian's kernels) and configure eth0.
//!
//! The crate may use std only, so the two libc calls needed are declared here by hand; std
//! already links libc, so no extra dependency is involved. Shell-level work goes through the
//! initramfs's `/bin/busybox`.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::raw::{c_char, c_int, c_uint, c_ulong, c_void};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::log;

const BUSYBOX: &str = "/bin/busybox";
const MODULE_DIR: &str = "/lib/modules";

#[repr(C)]
struct Timespec {
    tv_sec: i64,
    tv_nsec: i64,
}

const CLOCK_MONOTONIC: c_int = 1;
const S_IFBLK: c_uint = 0o060000;
const POSIX_FADV_DONTNEED: c_int = 4;

extern "C" {
    fn mount(
        source: *const c_char,
        target: *const c_char,
        fstype: *const c_char,
        flags: c_ulong,
        data: *const c_void,
    ) -> c_int;
    fn clock_gettime(clock: c_int, ts: *mut Timespec) -> c_int;
    fn mknod(path: *const c_char, mode: c_uint, dev: u64) -> c_int;
    fn posix_fadvise(fd: c_int, offset: i64, len: i64, advice: c_int) -> c_int;
}

/// Milliseconds of CLOCK_MONOTONIC: the guest's own clock, since boot. Heartbeats carry it so
/// the host can tell guest time from host time across a pause.
pub fn monotonic_ms() -> u64 {
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { clock_gettime(CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

fn mount_fs(fstype: &str, target: &str) {
    if let Err(e) = std::fs::create_dir_all(target) {
        log(&format!("warning: mkdir {target}: {e}"));
    }
    let (Ok(src), Ok(tgt), Ok(fst)) = (
        CString::new(fstype),
        CString::new(target),
        CString::new(fstype),
    ) else {
        return;
    };
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; data is NULL.
    let rc = unsafe {
        mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fst.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        log(&format!(
            "warning: mount {fstype} on {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
}

/// Mounts proc, sysfs and devtmpfs.
pub fn mount_filesystems() {
    mount_fs("proc", "/proc");
    mount_fs("sysfs", "/sys");
    mount_fs("devtmpfs", "/dev");
    let _ = std::fs::create_dir_all("/tmp");
}

/// Loads the virtio modules present in /lib/modules, in dependency order; a missing or failing
/// module is logged and skipped (it may be built in, or not needed).
pub fn load_modules() {
    // The image builder lists its modules in dependency order (see LAB-NOTES), so plain
    // `insmod` works without modules.dep.
    let order = std::fs::read_to_string(format!("{MODULE_DIR}/order")).unwrap_or_default();
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = format!("{MODULE_DIR}/{name}.ko");
        if !Path::new(&path).exists() {
            log(&format!("module {name}: not in initramfs, skipped"));
            continue;
        }
        match Command::new(BUSYBOX).args(["insmod", &path]).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => log(&format!(
                "warning: insmod {name}: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => log(&format!("warning: insmod {name}: {e}")),
        }
    }
}

fn ip(args: &[&str]) {
    match Command::new(BUSYBOX).arg("ip").args(args).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => log(&format!(
            "warning: ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => log(&format!("warning: ip {}: {e}", args.join(" "))),
    }
}

/// Brings up lo, and eth0 with the configured address and default route. Waits a few seconds
/// for eth0 to appear, since virtio-net probes asynchronously after insmod.
pub fn configure_network(cfg: &Config) {
    ip(&["link", "set", "lo", "up"]);
    let Some((addr, prefix)) = cfg.ip else {
        log("no ferry.ip= given, eth0 left unconfigured");
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !Path::new("/sys/class/net/eth0").exists() {
        if Instant::now() > deadline {
            log("warning: eth0 did not appear within 5 s");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ip(&["link", "set", "eth0", "up"]);
    ip(&["addr", "add", &format!("{addr}/{prefix}"), "dev", "eth0"]);
    if let Some(gw) = cfg.gateway {
        ip(&["route", "add", "default", "via", &gw.to_string()]);
    }
}

/// MemAvailable in MiB from /proc/meminfo, if readable.
pub fn mem_available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// glibc's `makedev`: the dev_t of `major:minor`.
pub fn makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xffff_f000) << 32)
        | ((major & 0x0fff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0x00ff)
}

/// Creates block device node `path` for `major:minor` (owner read/write only), for a disk
/// devtmpfs did not provide a node for.
pub fn mknod_block(path: &Path, major: u64, minor: u64) -> std::io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { mknod(c_path.as_ptr(), S_IFBLK | 0o600, makedev(major, minor)) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Drops the guest kernel's clean cached pages of `file` in `[offset, offset + len)`, so the
/// next read comes from the device. Best effort: an error only means reads may be cached.
pub fn drop_cached(file: &std::fs::File, offset: u64, len: u64) {
    // SAFETY: plain integer arguments; the fd stays open for the duration of the call.
    unsafe {
        posix_fadvise(
            file.as_raw_fd(),
            offset as i64,
            len as i64,
            POSIX_FADV_DONTNEED,
        );
    }
}

/// 64 random bits from /dev/urandom (never blocks), or from the clock if that is unavailable.
pub fn random_u64() -> u64 {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    match read {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            crate::pattern::splitmix64(t ^ u64::from(std::process::id()))
        }
    }
}
