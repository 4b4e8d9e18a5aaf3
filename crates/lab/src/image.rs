//! The test guest's boot image: a Debian cloud kernel plus an initramfs holding busybox and
//! our own guest program as `/init`.
//!
//! Why build it ourselves: the lab, tests, benchmarks and `ferry demo` need a guest that boots in
//! seconds under TCG and checks its own memory, on any Debian machine, without a toolchain or a
//! disk image download. The kernel comes from Debian's package (modules must match it, so they
//! come from the same .deb), busybox from the host, the guest program is embedded in this crate
//! by build.rs, and the cpio archive is written by the small newc writer below.
//!
//! Images are cached under `<cache>/images/<id>/`, where `id` hashes every input; a second call
//! with the same inputs is a no-op. Builds happen in a staging directory renamed into place, so
//! a crashed or concurrent build never leaves a half image behind.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bump when the image layout or the initramfs content rules change, to invalidate caches.
pub const FORMAT_VERSION: u32 = 2;
/// Debian meta package whose dependency names the current cloud kernel.
pub const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";
/// Modules copied into the initramfs, in the order the guest loads them (written to
/// `/lib/modules/order`, which the guest reads).
pub const GUEST_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    // The ACPI power button as an input device: a graceful stop presses it.
    "button",
    "evdev",
];

static GUEST_PROGRAM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry-guest"));

/// The embedded, statically linked guest program (`/init` of the initramfs).
pub fn guest_program() -> &'static [u8] {
    GUEST_PROGRAM
}

/// Where and how to build the image.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    /// Holds `debs/` (downloaded kernels) and `images/<id>/`.
    pub cache_dir: PathBuf,
    /// Kernel package; `None` resolves it from `apt-cache depends linux-image-cloud-amd64`
    /// (or, offline, takes the newest kernel .deb in the cache).
    pub kernel_package: Option<String>,
    /// A statically linked busybox (it runs in the initramfs without any libraries).
    pub busybox: PathBuf,
    /// Never call apt; use a .deb already in `<cache>/debs/`.
    pub offline: bool,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            cache_dir: Self::default_cache_dir(),
            kernel_package: None,
            busybox: PathBuf::from("/bin/busybox"),
            offline: false,
        }
    }
}

impl ImageOptions {
    /// `$FERRY_CACHE_DIR`, else `$XDG_CACHE_HOME/ferry`, else `$HOME/.cache/ferry`, else
    /// `/var/cache/ferry`: a persistent place, so the kernel is downloaded once per machine.
    pub fn default_cache_dir() -> PathBuf {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        if let Some(dir) = var("FERRY_CACHE_DIR") {
            PathBuf::from(dir)
        } else if let Some(dir) = var("XDG_CACHE_HOME") {
            PathBuf::from(dir).join("ferry")
        } else if let Some(home) = var("HOME") {
            PathBuf::from(home).join(".cache/ferry")
        } else {
            PathBuf::from("/var/cache/ferry")
        }
    }
}

/// A built image, ready for `qemu -kernel <kernel> -initrd <initrd>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_version: String,
    /// Hash of all inputs; also the image's directory name.
    pub id: String,
}

/// Why the image could not be built; each variant has a hint on what to do ([`ImageError::hint`]),
/// kept out of the message because every caller prints the hint on its own line.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("apt is not usable: {message}")]
    AptMissing { message: String },
    #[error("kernel package {package:?} not found: {message}")]
    PackageNotFound { package: String, message: String },
    #[error("downloading {package:?} failed: {message}")]
    DownloadFailed { package: String, message: String },
    #[error("busybox {path:?} is unusable: {message}")]
    BusyboxMissing { path: PathBuf, message: String },
    #[error("unpacking the kernel package failed: {message}")]
    DpkgDebFailed { message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A program the Debian disk image is built with is not installed.
    #[error("{tool} not found (Debian package {package})")]
    ToolMissing { tool: String, package: String },
    /// The Debian disk image is built as root (chroot, file ownership in the filesystem).
    #[error("building the Debian disk image needs root")]
    NotRoot,
    /// The machine's apt configuration names no mirror for the suite to build.
    #[error("no apt source for {suite}: {message}")]
    NoAptSource { suite: String, message: String },
    /// mmdebstrap failed; `log` keeps its output.
    #[error("mmdebstrap failed: {message} (log: {})", log.display())]
    BootstrapFailed { message: String, log: PathBuf },
    /// A step of turning the root directory into a bootable disk failed.
    #[error("{step} failed: {message}")]
    DiskFailed { step: String, message: String },
    /// The requested disk size cannot hold the image or an MBR disk.
    #[error("disk size {size_gib} GiB: {message}")]
    InvalidSize { size_gib: u32, message: String },
}

impl ImageError {
    /// What the operator can do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            ImageError::AptMissing { .. } => {
                "image building needs Debian's apt-get and apt-cache; or put a kernel .deb into \
                 <cache>/debs/ and build offline"
            }
            ImageError::PackageNotFound { .. } => {
                "run `apt-cache search linux-image | grep cloud` and pass an existing package \
                 name, or check /etc/apt/sources.list"
            }
            ImageError::DownloadFailed { .. } => {
                "check the machine reaches its Debian mirror (`apt-get update`), or copy the \
                 .deb into <cache>/debs/ and build offline"
            }
            ImageError::BusyboxMissing { .. } => {
                "install a static busybox (`apt-get install busybox-static`) or pass its path"
            }
            ImageError::DpkgDebFailed { .. } => {
                "is dpkg-deb installed and the .deb complete? delete it from <cache>/debs/ to \
                 download it again"
            }
            ImageError::Io { .. } => "check the cache directory is writable and has free space",
            ImageError::ToolMissing { .. } => {
                "run scripts/setup (as root), or apt-get install the package named above"
            }
            ImageError::NotRoot => "run it as root (sudo)",
            ImageError::NoAptSource { .. } => {
                "the image is built from the Debian mirror this machine's apt uses: add a `deb` \
                 source for the suite (see /etc/apt/sources.list.d/) and run apt-get update"
            }
            ImageError::BootstrapFailed { .. } => {
                "read the log; check the mirror is reachable (`apt-get update`) and that chroot \
                 and mounting /proc work here"
            }
            ImageError::DiskFailed { .. } => {
                "read the message; a disk too small for the root filesystem shows as mkfs.ext4 \
                 running out of space (pass a larger --size)"
            }
            ImageError::InvalidSize { .. } => "pass --size between 1 and 2047 (GiB)",
        }
    }

    /// A stable short code for logs and APIs.
    pub fn code(&self) -> &'static str {
        match self {
            ImageError::AptMissing { .. } => "apt-missing",
            ImageError::PackageNotFound { .. } => "package-not-found",
            ImageError::DownloadFailed { .. } => "download-failed",
            ImageError::BusyboxMissing { .. } => "busybox-missing",
            ImageError::DpkgDebFailed { .. } => "dpkg-deb-failed",
            ImageError::Io { .. } => "io",
            ImageError::ToolMissing { .. } => "tool-missing",
            ImageError::NotRoot => "needs-root",
            ImageError::NoAptSource { .. } => "no-apt-source",
            ImageError::BootstrapFailed { .. } => "bootstrap-failed",
            ImageError::DiskFailed { .. } => "disk-build-failed",
            ImageError::InvalidSize { .. } => "invalid-size",
        }
    }
}

pub(crate) fn io_err(context: impl fmt::Display) -> impl FnOnce(io::Error) -> ImageError {
    let context = context.to_string();
    move |source| ImageError::Io { context, source }
}

/// The file that names a datastore's storage (`<datastore>/.ferry-datastore-id`): two hosts
/// whose datastores hold the same content in it share that storage.
pub const DATASTORE_ID_FILE: &str = ".ferry-datastore-id";

/// Makes the image cache `cache_dir` a datastore that shows it is shared: every lab host of
/// this machine mounts the one directory, and its identity file says so the way a file on an
/// NFS export says it to real hosts, so the pre-flight `storage` check passes the guest's
/// kernel and initrd without a warning and without an identity only the lab's configs know.
/// The identity names this machine and the directory. An existing file is kept (an operator
/// may have named the storage). Returns the datastore's path, `cache_dir` itself.
pub fn image_store(cache_dir: &Path) -> Result<PathBuf, ImageError> {
    fs::create_dir_all(cache_dir).map_err(io_err(format!("creating {}", cache_dir.display())))?;
    let file = cache_dir.join(DATASTORE_ID_FILE);
    if file.exists() {
        return Ok(cache_dir.to_path_buf());
    }
    let machine = fs::read_to_string("/etc/machine-id")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown-machine".into());
    let path = cache_dir
        .canonicalize()
        .unwrap_or_else(|_| cache_dir.to_path_buf());
    let identity = format!("ferry-image-cache {machine} {}\n", path.display());
    // Written aside and linked into place: a concurrent lab finds the whole file or none, and
    // the link never replaces a file another one wrote meanwhile.
    let tmp = cache_dir.join(format!("{DATASTORE_ID_FILE}.{}", unique_suffix()));
    fs::write(&tmp, identity).map_err(io_err(format!("writing {}", tmp.display())))?;
    let linked = fs::hard_link(&tmp, &file);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(cache_dir.to_path_buf()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(cache_dir.to_path_buf()),
        Err(e) => Err(ImageError::Io {
            context: format!("writing {}", file.display()),
            source: e,
        }),
    }
}

/// Builds the image if the cache has none for the current inputs. Returns the image and
/// whether it was (re)built now.
pub fn ensure_image(opts: &ImageOptions) -> Result<(GuestImage, bool), ImageError> {
    let busybox = fs::read(&opts.busybox).map_err(|e| ImageError::BusyboxMissing {
        path: opts.busybox.clone(),
        message: e.to_string(),
    })?;
    let debs = opts.cache_dir.join("debs");
    fs::create_dir_all(&debs).map_err(io_err(format!("creating {}", debs.display())))?;
    let deb = kernel_deb(opts, &debs)?;
    let deb_name = deb
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let deb_size = fs::metadata(&deb)
        .map_err(io_err(format!("reading {}", deb.display())))?
        .len();
    let id = input_hash(guest_program(), &busybox, &deb_name, deb_size);

    let images = opts.cache_dir.join("images");
    let dir = images.join(&id);
    if let Some(image) = load_image(&dir) {
        tracing::debug!(id = %image.id, "guest image cached");
        return Ok((image, false));
    }
    fs::create_dir_all(&images).map_err(io_err(format!("creating {}", images.display())))?;
    let staging = images.join(format!(".staging-{id}-{}", unique_suffix()));
    let result = build_into(&staging, &dir, &deb, &busybox, &id);
    let image = match result {
        Ok(image) => image,
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    if let Err(e) = fs::rename(&staging, &dir) {
        let _ = fs::remove_dir_all(&staging);
        // A concurrent builder may have won the race with identical content.
        return match load_image(&dir) {
            Some(existing) => Ok((existing, false)),
            None => Err(io_err(format!("moving the image into {}", dir.display()))(
                e,
            )),
        };
    }
    tracing::info!(id = %id, kernel = %image.kernel_version, "guest image built");
    Ok((image, true))
}

/// sha256 over everything that determines the image's content.
fn input_hash(guest: &[u8], busybox: &[u8], deb_name: &str, deb_size: u64) -> String {
    let mut h = Sha256::new();
    h.update(FORMAT_VERSION.to_le_bytes());
    for part in [guest, busybox, deb_name.as_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update(deb_size.to_le_bytes());
    h.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(crate) fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

fn with_paths(mut image: GuestImage, dir: &Path) -> GuestImage {
    image.kernel = dir.join("vmlinuz");
    image.initrd = dir.join("initrd.cpio");
    image
}

/// A complete cached image in `dir`, if there is one. Paths are re-derived from `dir`, so the
/// cache can be moved.
fn load_image(dir: &Path) -> Option<GuestImage> {
    let text = fs::read_to_string(dir.join("image.json")).ok()?;
    let image = with_paths(serde_json::from_str(&text).ok()?, dir);
    (image.kernel.is_file() && image.initrd.is_file()).then_some(image)
}

/// Builds the image in `staging`; its image.json already names the files in `final_dir`.
fn build_into(
    staging: &Path,
    final_dir: &Path,
    deb: &Path,
    busybox: &[u8],
    id: &str,
) -> Result<GuestImage, ImageError> {
    let unpacked = staging.join("unpacked");
    fs::create_dir_all(&unpacked).map_err(io_err(format!("creating {}", unpacked.display())))?;
    let out = run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&unpacked)).map_err(|e| {
        ImageError::DpkgDebFailed {
            message: format!("dpkg-deb -x {}: {e}", deb.display()),
        }
    })?;
    if !out.status.success() {
        return Err(ImageError::DpkgDebFailed {
            message: format!(
                "dpkg-deb -x {}: {}",
                deb.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    let (vmlinuz, kernel_version) = find_kernel(&unpacked.join("boot"))?;
    let modules = collect_modules(&unpacked.join("lib/modules").join(&kernel_version))?;

    fs::copy(&vmlinuz, staging.join("vmlinuz"))
        .map_err(io_err(format!("copying {}", vmlinuz.display())))?;
    let initrd_path = staging.join("initrd.cpio");
    let file = fs::File::create(&initrd_path)
        .map_err(io_err(format!("creating {}", initrd_path.display())))?;
    write_initramfs(io::BufWriter::new(file), busybox, guest_program(), &modules)
        .map_err(io_err(format!("writing {}", initrd_path.display())))?;
    fs::remove_dir_all(&unpacked).map_err(io_err(format!("removing {}", unpacked.display())))?;

    let image = with_paths(
        GuestImage {
            kernel: PathBuf::new(),
            initrd: PathBuf::new(),
            kernel_version,
            id: id.to_string(),
        },
        final_dir,
    );
    let json = serde_json::to_vec_pretty(&image).map_err(|e| ImageError::Io {
        context: "encoding image.json".into(),
        source: io::Error::other(e),
    })?;
    fs::write(staging.join("image.json"), json).map_err(io_err("writing image.json"))?;
    Ok(image)
}

/// `boot/vmlinuz-<version>` of the unpacked package.
fn find_kernel(boot: &Path) -> Result<(PathBuf, String), ImageError> {
    let entries = fs::read_dir(boot).map_err(|e| ImageError::DpkgDebFailed {
        message: format!("package has no {}: {e}", boot.display()),
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(version) = name.strip_prefix("vmlinuz-") {
            return Ok((entry.path(), version.to_string()));
        }
    }
    Err(ImageError::DpkgDebFailed {
        message: format!("no vmlinuz-* in {} (not a kernel package?)", boot.display()),
    })
}

/// The `GUEST_MODULES` found under the package's module tree, decompressed, as
/// `(name, bytes)`. Missing ones are skipped with a warning: they may be built into the kernel.
fn collect_modules(root: &Path) -> Result<Vec<(String, Vec<u8>)>, ImageError> {
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let stem = ["ko", "ko.xz", "ko.zst"]
                .iter()
                .find_map(|ext| name.strip_suffix(&format!(".{ext}")));
            if let Some(stem) = stem {
                if GUEST_MODULES.contains(&stem) {
                    found.push((stem.to_string(), path));
                }
            }
        }
    }
    let mut modules = Vec::new();
    for wanted in GUEST_MODULES {
        let Some((_, path)) = found.iter().find(|(n, _)| n == wanted) else {
            tracing::warn!(module = wanted, "module not in the kernel package; skipped");
            continue;
        };
        modules.push((wanted.to_string(), read_module(path)?));
    }
    Ok(modules)
}

fn read_module(path: &Path) -> Result<Vec<u8>, ImageError> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else {
        return fs::read(path).map_err(io_err(format!("reading {}", path.display())));
    };
    let out = run(Command::new(tool).arg("-dc").arg(path))
        .map_err(io_err(format!("running {tool} -dc {}", path.display())))?;
    if !out.status.success() {
        return Err(ImageError::Io {
            context: format!("{tool} -dc {}", path.display()),
            source: io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        });
    }
    Ok(out.stdout)
}

/// Writes the initramfs: directories, `/dev/console` (without it the kernel gives init no
/// console and all output is lost), busybox with an `sh` link, `/init` and the modules.
fn write_initramfs<W: Write>(
    out: W,
    busybox: &[u8],
    init: &[u8],
    modules: &[(String, Vec<u8>)],
) -> io::Result<()> {
    let mut cpio = cpio::Writer::new(out);
    for dir in ["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"] {
        cpio.dir(dir, 0o755)?;
    }
    cpio.char_device("dev/console", 0o600, 5, 1)?;
    cpio.file("bin/busybox", 0o755, busybox)?;
    cpio.symlink("bin/sh", "busybox")?;
    cpio.file("init", 0o755, init)?;
    let mut order = String::new();
    for (name, bytes) in modules {
        cpio.file(&format!("lib/modules/{name}.ko"), 0o644, bytes)?;
        order.push_str(name);
        order.push('\n');
    }
    // The guest loads the modules in this order (each after its dependencies), so the list
    // lives in one place: GUEST_MODULES.
    cpio.file("lib/modules/order", 0o644, order.as_bytes())?;
    cpio.finish()?.flush()
}

/// The kernel package Debian's cloud kernel meta package currently depends on (e.g.
/// `linux-image-6.1.0-57-cloud-amd64`), refreshing empty apt lists once if needed. Shared with
/// the Debian disk image, so both images run the same kernel.
pub(crate) fn resolve_kernel_package() -> Result<String, ImageError> {
    Apt::default().resolve_kernel_package()
}

/// The kernel package's .deb in `debs`, downloading it if needed.
fn kernel_deb(opts: &ImageOptions, debs: &Path) -> Result<PathBuf, ImageError> {
    if opts.offline {
        let cached = match &opts.kernel_package {
            Some(pkg) => find_cached_deb(debs, pkg),
            None => newest_cached_kernel(debs),
        };
        return cached.ok_or_else(|| ImageError::PackageNotFound {
            package: opts
                .kernel_package
                .clone()
                .unwrap_or_else(|| KERNEL_META_PACKAGE.to_string()),
            message: format!("offline and no matching .deb in {}", debs.display()),
        });
    }
    let mut apt = Apt::default();
    let package = match &opts.kernel_package {
        Some(p) => p.clone(),
        None => apt.resolve_kernel_package()?,
    };
    if let Some(deb) = find_cached_deb(debs, &package) {
        return Ok(deb);
    }
    apt.download(&package, debs)
}

/// `<pkg>_*.deb` in `debs`, the last in name order if several.
fn find_cached_deb(debs: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{package}_");
    cached_debs(debs)
        .into_iter()
        .rfind(|(name, _)| name.starts_with(&prefix))
        .map(|(_, path)| path)
}

/// The newest `linux-image-*cloud*` .deb in `debs` (any `linux-image-*` if no cloud one).
fn newest_cached_kernel(debs: &Path) -> Option<PathBuf> {
    let all: Vec<_> = cached_debs(debs)
        .into_iter()
        .filter(|(n, _)| n.starts_with("linux-image-"))
        .collect();
    let cloud = all.iter().rfind(|(n, _)| n.contains("-cloud-"));
    cloud.or(all.last()).map(|(_, p)| p.clone())
}

fn cached_debs(debs: &Path) -> Vec<(String, PathBuf)> {
    let mut list: Vec<(String, PathBuf)> = fs::read_dir(debs)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .filter(|(n, p)| n.ends_with(".deb") && p.is_file())
        .collect();
    list.sort();
    list
}

/// The first `Depends: linux-image-...` of `apt-cache depends` output.
fn parse_depends(output: &str) -> Option<String> {
    output
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_string)
}

fn run(cmd: &mut Command) -> io::Result<Output> {
    cmd.output()
}

/// apt, refreshing its package lists at most once per build when they look empty.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn command(
        &self,
        program: &str,
        args: &[&str],
        cwd: Option<&Path>,
    ) -> Result<Output, ImageError> {
        let mut cmd = Command::new(program);
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        run(&mut cmd).map_err(|e| ImageError::AptMissing {
            message: format!("cannot run {program}: {e}"),
        })
    }

    /// Runs `apt-get update` once; returns false if it was already done.
    fn update_once(&mut self) -> Result<bool, ImageError> {
        if self.updated {
            return Ok(false);
        }
        self.updated = true;
        tracing::info!("apt lists look empty; running apt-get update");
        let out = self.command("apt-get", &["update"], None)?;
        if !out.status.success() {
            tracing::warn!(
                stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                "apt-get update failed"
            );
        }
        Ok(true)
    }

    fn resolve_kernel_package(&mut self) -> Result<String, ImageError> {
        loop {
            let out = self.command("apt-cache", &["depends", KERNEL_META_PACKAGE], None)?;
            if let Some(pkg) = parse_depends(&String::from_utf8_lossy(&out.stdout)) {
                return Ok(pkg);
            }
            if !self.update_once()? {
                return Err(ImageError::PackageNotFound {
                    package: KERNEL_META_PACKAGE.to_string(),
                    message: format!(
                        "apt-cache depends found no kernel: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                });
            }
        }
    }

    fn download(&mut self, package: &str, debs: &Path) -> Result<PathBuf, ImageError> {
        let tmp = debs.join(format!(".download-{}", unique_suffix()));
        fs::create_dir_all(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
        let result = self.download_into(package, &tmp, debs);
        let _ = fs::remove_dir_all(&tmp);
        result
    }

    fn download_into(
        &mut self,
        package: &str,
        tmp: &Path,
        debs: &Path,
    ) -> Result<PathBuf, ImageError> {
        tracing::info!(package, "downloading kernel package");
        loop {
            // As root, apt would drop to the `_apt` user, who cannot write into our cache.
            let out = self.command(
                "apt-get",
                &["-o", "APT::Sandbox::User=root", "download", package],
                Some(tmp),
            )?;
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if out.status.success() {
                break;
            }
            let unknown = stderr.contains("Unable to locate")
                || stderr.contains("has no installation candidate")
                || stderr.contains("No packages found");
            if unknown && self.update_once()? {
                continue;
            }
            return Err(if unknown {
                ImageError::PackageNotFound {
                    package: package.to_string(),
                    message: stderr,
                }
            } else {
                ImageError::DownloadFailed {
                    package: package.to_string(),
                    message: stderr,
                }
            });
        }
        let (name, path) =
            cached_debs(tmp)
                .into_iter()
                .next()
                .ok_or_else(|| ImageError::DownloadFailed {
                    package: package.to_string(),
                    message: "apt-get download succeeded but left no .deb".into(),
                })?;
        let dest = debs.join(&name);
        fs::rename(&path, &dest).map_err(io_err(format!("moving {name} into the cache")))?;
        Ok(dest)
    }
}

/// A writer of `newc` cpio archives, the format the kernel unpacks as initramfs.
mod cpio {
    use std::io::{self, Write};

    /// Writes entries one by one; `finish` appends the trailer.
    pub struct Writer<W: Write> {
        out: W,
        ino: u32,
        offset: u64,
    }

    impl<W: Write> Writer<W> {
        pub fn new(out: W) -> Self {
            Writer {
                out,
                ino: 1,
                offset: 0,
            }
        }

        pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
            self.entry(name, 0o040000 | perm, 2, (0, 0), &[])
        }

        pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
            self.entry(name, 0o100000 | perm, 1, (0, 0), data)
        }

        pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
            self.entry(name, 0o120777, 1, (0, 0), target.as_bytes())
        }

        pub fn char_device(
            &mut self,
            name: &str,
            perm: u32,
            major: u32,
            minor: u32,
        ) -> io::Result<()> {
            self.entry(name, 0o020000 | perm, 1, (major, minor), &[])
        }

        /// Writes the trailer and returns the inner writer.
        pub fn finish(mut self) -> io::Result<W> {
            self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
            Ok(self.out)
        }

        fn pad(&mut self) -> io::Result<()> {
            let pad = (4 - (self.offset % 4) as usize) % 4;
            self.write(&[0u8; 3][..pad])
        }

        fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
            self.out.write_all(bytes)?;
            self.offset += bytes.len() as u64;
            Ok(())
        }

        fn entry(
            &mut self,
            name: &str,
            mode: u32,
            nlink: u32,
            rdev: (u32, u32),
            data: &[u8],
        ) -> io::Result<()> {
            let size = u32::try_from(data.len()).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "cpio entry over 4 GiB")
            })?;
            let ino = if name == "TRAILER!!!" { 0 } else { self.ino };
            self.ino += 1;
            let fields = [
                ino,
                mode,
                0, // uid
                0, // gid
                nlink,
                0, // mtime: fixed, so images are reproducible
                size,
                0, // devmajor
                0, // devminor
                rdev.0,
                rdev.1,
                name.len() as u32 + 1,
                0, // check
            ];
            let mut header = String::with_capacity(110);
            header.push_str("070701");
            for f in fields {
                header.push_str(&format!("{f:08x}"));
            }
            self.write(header.as_bytes())?;
            self.write(name.as_bytes())?;
            self.write(&[0])?;
            self.pad()?;
            self.write(data)?;
            self.pad()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_program_is_a_static_elf() {
        let g = guest_program();
        assert_eq!(&g[..4], b"\x7fELF");
        assert!(g.len() > 100_000);
        // A dynamically linked binary names its interpreter; a static one has none.
        let needle = b"/lib64/ld-linux";
        assert!(!g.windows(needle.len()).any(|w| w == needle));
    }

    #[test]
    fn depends_output_parses() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            parse_depends(out).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(parse_depends("N: Unable to locate package x\n"), None);
    }

    #[test]
    fn the_image_store_gets_an_identity_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        assert_eq!(image_store(&cache).unwrap(), cache);
        let id = fs::read_to_string(cache.join(DATASTORE_ID_FILE)).unwrap();
        assert!(id.starts_with("ferry-image-cache "), "{id}");
        assert!(id
            .trim_end()
            .ends_with(&cache.canonicalize().unwrap().display().to_string()));
        // Idempotent, and an identity someone else wrote stays.
        image_store(&cache).unwrap();
        assert_eq!(
            fs::read_to_string(cache.join(DATASTORE_ID_FILE)).unwrap(),
            id
        );
        fs::write(cache.join(DATASTORE_ID_FILE), "nfs-7\n").unwrap();
        image_store(&cache).unwrap();
        assert_eq!(
            fs::read_to_string(cache.join(DATASTORE_ID_FILE)).unwrap(),
            "nfs-7\n"
        );
        let names: Vec<_> = fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    }

    #[test]
    fn hash_changes_with_inputs() {
        let a = input_hash(b"g", b"b", "k_1.deb", 10);
        assert_eq!(a.len(), 24);
        assert_eq!(a, input_hash(b"g", b"b", "k_1.deb", 10));
        assert_ne!(a, input_hash(b"g", b"b", "k_1.deb", 11));
        assert_ne!(a, input_hash(b"g", b"b", "k_2.deb", 10));
        assert_ne!(a, input_hash(b"gb", b"", "k_1.deb", 10));
    }

    #[test]
    fn cached_deb_lookup() {
        let dir = tempfile::tempdir().unwrap();
        for n in [
            "linux-image-6.1.0-55-cloud-amd64_6.1.1_amd64.deb",
            "linux-image-6.1.0-56-cloud-amd64_6.1.2_amd64.deb",
            "linux-image-6.1.0-56-amd64_6.1.2_amd64.deb",
            "notes.txt",
        ] {
            fs::write(dir.path().join(n), b"x").unwrap();
        }
        let found = find_cached_deb(dir.path(), "linux-image-6.1.0-55-cloud-amd64").unwrap();
        assert!(found.ends_with("linux-image-6.1.0-55-cloud-amd64_6.1.1_amd64.deb"));
        assert!(find_cached_deb(dir.path(), "linux-image-6.1.0-5").is_none());
        let newest = newest_cached_kernel(dir.path()).unwrap();
        assert!(newest.ends_with("linux-image-6.1.0-56-cloud-amd64_6.1.2_amd64.deb"));
    }

    #[test]
    fn offline_without_deb_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let busybox = dir.path().join("busybox");
        fs::write(&busybox, b"fake").unwrap();
        let opts = ImageOptions {
            cache_dir: dir.path().join("cache"),
            kernel_package: None,
            busybox,
            offline: true,
        };
        let err = ensure_image(&opts).unwrap_err();
        assert_eq!(err.code(), "package-not-found");
        assert!(!err.hint().is_empty());
        assert!(
            !err.to_string().contains("hint"),
            "printed once, by the caller: {err}"
        );
    }

    #[test]
    fn missing_busybox_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ImageOptions {
            cache_dir: dir.path().to_path_buf(),
            kernel_package: None,
            busybox: dir.path().join("nope"),
            offline: true,
        };
        assert_eq!(ensure_image(&opts).unwrap_err().code(), "busybox-missing");
    }

    /// One parsed archive entry: name, mode, rdev, data.
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    /// Parses a newc archive back into entries.
    fn parse_newc(mut bytes: &[u8]) -> Vec<Entry> {
        let mut out = Vec::new();
        let total = bytes.len();
        let field = |h: &[u8], i: usize| {
            u32::from_str_radix(std::str::from_utf8(&h[6 + i * 8..14 + i * 8]).unwrap(), 16)
                .unwrap()
        };
        loop {
            assert_eq!(&bytes[..6], b"070701");
            let (mode, size, rmaj, rmin, namesize) = (
                field(bytes, 1),
                field(bytes, 6) as usize,
                field(bytes, 9),
                field(bytes, 10),
                field(bytes, 11) as usize,
            );
            let name = std::str::from_utf8(&bytes[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            let data_at = (110 + namesize).div_ceil(4) * 4;
            let data = bytes[data_at..data_at + size].to_vec();
            let next = (data_at + size).div_ceil(4) * 4;
            bytes = &bytes[next..];
            if name == "TRAILER!!!" {
                break;
            }
            out.push((name, mode, (rmaj, rmin), data));
        }
        assert!(bytes.is_empty());
        assert_eq!(total % 4, 0);
        out
    }

    #[test]
    fn initramfs_layout() {
        let mut buf = Vec::new();
        let modules = vec![("virtio".to_string(), b"modbytes".to_vec())];
        write_initramfs(&mut buf, b"bb", b"initprog!", &modules).unwrap();
        let entries = parse_newc(&buf);
        let get = |n: &str| entries.iter().find(|e| e.0 == n).unwrap();
        assert_eq!(get("dev/console").1, 0o020600);
        assert_eq!(get("dev/console").2, (5, 1));
        assert_eq!(get("init").3, b"initprog!");
        assert_eq!(get("init").1, 0o100755);
        assert_eq!(get("bin/busybox").3, b"bb");
        assert_eq!(get("bin/sh").3, b"busybox");
        assert_eq!(get("lib/modules/virtio.ko").3, b"modbytes");
        assert_eq!(get("lib/modules").1, 0o040755);
    }

    #[test]
    fn initramfs_extracts_with_busybox_cpio() {
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.exists(),
            "no /bin/busybox: scripts/setup installs busybox-static"
        );
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.cpio");
        let modules = vec![("virtio_net".to_string(), vec![7u8; 1001])];
        let file = fs::File::create(&archive).unwrap();
        write_initramfs(file, b"busybox-bytes", b"init-bytes", &modules).unwrap();
        let out = Command::new(busybox)
            .args(["cpio", "-t", "-F"])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8_lossy(&out.stdout);
        for name in [
            "init",
            "dev/console",
            "bin/busybox",
            "lib/modules/virtio_net.ko",
        ] {
            assert!(
                listing.lines().any(|l| l == name),
                "{name} missing:\n{listing}"
            );
        }
    }
}
