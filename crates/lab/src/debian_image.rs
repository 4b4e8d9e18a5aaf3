//! A real Debian guest: a bootable qcow2 disk of a minimal Debian bookworm that boots from its
//! own disk (no `-kernel`) through SeaBIOS or through UEFI (OVMF) and runs qemu-guest-agent.
//!
//! Why: the lab's busybox guest (image.rs) boots from `-kernel`/`-initrd` and has no disk. Work
//! on disks, bootloaders and guests Ferry did not build needs a guest like the ones operators
//! run: a partitioned disk, a bootloader, systemd, fsck, an agent to ask questions. It is built
//! from Debian packages only, on any Debian 12 machine, with the mirror that machine's apt
//! already uses, so the lab still needs no download but Debian's.
//!
//! How, without mounting anything and without loop devices (neither works in every container):
//!
//! 1. The configuration (fstab naming a root UUID chosen up front, initramfs-tools settings,
//!    systemd-networkd: the static addresses Ferry hands the guest as SMBIOS OEM strings,
//!    written by the `ferry-net` unit before networkd starts, else DHCP on `en*`; hostname)
//!    is rendered into an overlay directory.
//! 2. mmdebstrap (variant minbase, no docs or locales) bootstraps the root directory; the
//!    overlay goes in before any package, so the initramfs the kernel package generates sees
//!    the fstab (it then carries fsck for the root) and the module policy (virtio_blk).
//! 3. A sparse raw disk gets an MBR written here (syslinux's mbr.bin as boot code, the boot
//!    partition active), a FAT16 boot partition (mkfs.fat --offset, mcopy of vmlinuz, initrd
//!    and syslinux.cfg, `syslinux --install --offset`), and an ext4 root partition filled from
//!    the directory by `mkfs.ext4 -d` at an offset. The boot partition also holds the UEFI
//!    removable-media loader `EFI/BOOT/BOOTX64.EFI` (syslinux.efi, with its ldlinux.e64 and the
//!    same syslinux.cfg beside it): UEFI firmware reads FAT on an MBR partition too, so one
//!    disk boots under both firmwares and a guest can be switched without another image. (No
//!    GPT: SeaBIOS booting syslinux from GPT needs gptmbr.bin and a legacy-boot flag, and
//!    OVMF does not need it.)
//! 4. `qemu-img convert -c` makes the compressed qcow2 that guests use as a backing file.
//!
//! Images are cached under `<cache>/debian-images/<id>/`, where `id` hashes every input (the
//! suite, the package list including the exact kernel package, the disk size, the format
//! version); a second call returns the cached image at once. Builds happen in a staging
//! directory renamed into place, so a failed, interrupted or concurrent build never leaves a
//! half image behind.
//!
//! Known limit: the kernel and initrd in the boot partition are the ones the image was built
//! with; a kernel upgraded inside the guest is installed but not booted.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::image::{io_err, resolve_kernel_package, unique_suffix, ImageError, ImageOptions};

/// Bump when the build steps or the rendered configuration change, to invalidate caches.
pub const DEBIAN_FORMAT_VERSION: u32 = 1;
/// The Debian release the image runs.
pub const DEBIAN_SUITE: &str = "bookworm";
/// Packages on top of minbase (the kernel package is added to these). systemd-sysv and udev
/// make a booting system; dbus lets `shutdown` (and so `guest-shutdown`) reach logind;
/// qemu-guest-agent is started by its udev rule when the port appears; e2fsprogs gives fsck
/// for the root; initramfs-tools builds the initrd with virtio_blk; iproute2 and
/// systemd-resolved make the DHCP network usable.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "dbus",
    "qemu-guest-agent",
    "e2fsprogs",
    "initramfs-tools",
    "iproute2",
    "systemd-resolved",
];
/// Default virtual disk size; the qcow2 only holds what is used.
pub const DEFAULT_SIZE_GIB: u32 = 4;
/// An MBR partition table addresses at most 2^32 sectors (2 TiB).
pub const MAX_SIZE_GIB: u32 = 2047;
/// The guest's hostname.
pub const GUEST_HOSTNAME: &str = "debian";

const SECTOR: u64 = 512;
/// Partitions start on 1 MiB boundaries.
const ALIGN_SECTORS: u64 = 2048;
/// The FAT boot partition: kernel (about 14 MB) and initrd (about 15 MB) with room to spare.
const BOOT_PARTITION_MIB: u64 = 128;
/// Bytes of boot code an MBR holds before the disk signature.
const MBR_BOOT_CODE_MAX: usize = 440;
/// ext4 block size used for the root filesystem.
const EXT4_BLOCK: u64 = 4096;
const PART_TYPE_FAT16_LBA: u8 = 0x0e;
const PART_TYPE_LINUX: u8 = 0x83;

const IMAGES_DIR: &str = "debian-images";
const MANIFEST: &str = "debian.json";
const LOG_FILE: &str = "build.log";
const FAILED_LOG: &str = "last-failed-build.log";
/// dpkg settings kept in the image (so later installs stay small too): no manuals, info
/// pages, translations or docs; copyright files stay.
const DPKG_OPTIONS: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/lintian/*",
];
/// Shell commands mmdebstrap runs on the finished root (`$1`): networkd (with Ferry's static
/// addresses, else DHCP), root
/// locked (no password login; there is no ssh either), and no resolv.conf of the build
/// machine (mmdebstrap copies it in for the build; systemd-resolved normally replaced it by
/// its symlink).
const CUSTOMIZE_HOOKS: &[&str] = &[
    r#"chroot "$1" systemctl enable systemd-networkd.service ferry-net.service"#,
    r#"chroot "$1" passwd --lock root"#,
    r#"if [ ! -L "$1/etc/resolv.conf" ]; then rm -f "$1/etc/resolv.conf"; fi"#,
];
/// Where Debian's syslinux-efi puts syslinux's 64-bit UEFI loader (and Fedora's syslinux-efi64).
const SYSLINUX_EFI_PATHS: &[&str] = &[
    "/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi",
    "/usr/share/syslinux/efi64/syslinux.efi",
];
/// Where its core module lives: Debian's syslinux-common, Fedora's syslinux-efi64.
const LDLINUX_E64_PATHS: &[&str] = &[
    "/usr/lib/syslinux/modules/efi64/ldlinux.e64",
    "/usr/share/syslinux/efi64/ldlinux.e64",
];
/// The UEFI loader's directory on the boot partition: the removable-media path that firmware
/// with an empty boot order (a fresh per-instance NVRAM) tries on every FAT filesystem.
const EFI_BOOT_DIR: &str = "EFI/BOOT";
/// Where Debian's syslinux-common puts the MBR boot code (and Fedora's syslinux).
const MBR_BIN_PATHS: &[&str] = &[
    "/usr/lib/syslinux/mbr/mbr.bin",
    "/usr/share/syslinux/mbr.bin",
];

/// Where and how to build the Debian disk image.
#[derive(Debug, Clone)]
pub struct DebianImageOptions {
    /// Holds `debian-images/<id>/`; the same cache as the lab image by default.
    pub cache_dir: PathBuf,
    /// Virtual disk size in GiB (1 to 2047).
    pub size_gib: u32,
    /// Build again even if the cache has an image for these inputs (to pick up new Debian
    /// packages; the package versions are not part of the cache key). The new disk gets a new
    /// file name and the old one is removed, so overlays made on the old one fail to open
    /// instead of reading another image's blocks.
    pub force: bool,
    /// Kernel package; `None` resolves it like the lab image does (what
    /// `linux-image-cloud-amd64` depends on), so both run the same kernel.
    pub kernel_package: Option<String>,
}

impl Default for DebianImageOptions {
    fn default() -> Self {
        DebianImageOptions {
            cache_dir: ImageOptions::default_cache_dir(),
            size_gib: DEFAULT_SIZE_GIB,
            force: false,
            kernel_package: None,
        }
    }
}

/// A built Debian disk image. Use it as a read-only backing file:
/// `qemu-img create -f qcow2 -b <path> -F qcow2 overlay.qcow2`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DebianImage {
    /// The qcow2 disk.
    pub path: PathBuf,
    /// Hash of all inputs; also the image's directory name.
    pub id: String,
    /// Debian release, e.g. `bookworm`.
    pub suite: String,
    /// The kernel package installed, e.g. `linux-image-6.1.0-57-cloud-amd64`.
    pub kernel_package: String,
    /// Kernel release booted, e.g. `6.1.0-57-cloud-amd64`.
    pub kernel_version: String,
    /// UUID of the ext4 root filesystem (named by fstab and the kernel command line).
    pub root_uuid: String,
    /// Virtual disk size in GiB.
    pub size_gib: u32,
    /// Packages asked for on top of minbase.
    pub packages: Vec<String>,
    /// Size of the qcow2 file in bytes.
    pub file_bytes: u64,
    /// How long the build took, in seconds.
    pub build_seconds: f64,
    /// When it was built (Unix seconds).
    pub built_unix: u64,
}

/// Builds the Debian disk image unless the cache has one for the same inputs. Returns the
/// image and whether it was built now.
pub fn ensure_debian_image(opts: &DebianImageOptions) -> Result<(DebianImage, bool), ImageError> {
    ensure_debian_image_with_progress(opts, &|step| tracing::info!("{step}"))
}

/// [`ensure_debian_image`], telling `progress` about each step of a build (a build takes a
/// minute or more, so a CLI wants to say what it is doing).
pub fn ensure_debian_image_with_progress(
    opts: &DebianImageOptions,
    progress: &dyn Fn(&str),
) -> Result<(DebianImage, bool), ImageError> {
    let layout = DiskLayout::for_size_gib(opts.size_gib)?;
    let images = opts.cache_dir.join(IMAGES_DIR);
    let kernel_package = match &opts.kernel_package {
        Some(p) => p.clone(),
        None => match resolve_kernel_package() {
            Ok(p) => p,
            // Offline or apt broken: a cached image of this size still serves.
            Err(e) => match (!opts.force).then(|| newest_cached(&images, opts.size_gib)) {
                Some(Some(image)) => {
                    tracing::warn!(error = %e, id = %image.id, "kernel package unknown; using the cached Debian image");
                    return Ok((image, false));
                }
                _ => return Err(e),
            },
        },
    };
    let packages = package_list(&kernel_package);
    let id = input_hash(DEBIAN_SUITE, &packages, opts.size_gib);
    let dir = images.join(&id);
    if !opts.force {
        if let Some(image) = load_image(&dir) {
            tracing::debug!(id = %image.id, "Debian image cached");
            return Ok((image, false));
        }
    }

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(ImageError::NotRoot);
    }
    let tools = Tools::find()?;
    let sources = apt_sources(DEBIAN_SUITE)?;
    fs::create_dir_all(&images).map_err(io_err(format!("creating {}", images.display())))?;
    remove_stale_staging(&images);
    let staging = images.join(format!(".staging-{id}-{}", unique_suffix()));
    fs::create_dir_all(&staging).map_err(io_err(format!("creating {}", staging.display())))?;

    let plan = Plan {
        id: id.clone(),
        layout,
        kernel_package,
        packages,
        sources,
        size_gib: opts.size_gib,
        failed_log: images.join(FAILED_LOG),
    };
    let started = Instant::now();
    let image = match build_into(&staging, &dir, &plan, &tools, started, progress) {
        Ok(image) => image,
        Err(e) => {
            let _ = fs::copy(staging.join(LOG_FILE), &plan.failed_log);
            remove_build_dir(&staging);
            return Err(e);
        }
    };
    install(&staging, &dir, opts.force)?;
    tracing::info!(id = %id, seconds = image.build_seconds, "Debian image built");
    Ok((image, true))
}

/// Everything one build needs to know.
struct Plan {
    id: String,
    layout: DiskLayout,
    kernel_package: String,
    packages: Vec<String>,
    sources: Vec<AptSource>,
    size_gib: u32,
    /// Where a failed build's log is kept (the staging directory is removed).
    failed_log: PathBuf,
}

/// The packages asked of mmdebstrap.
fn package_list(kernel_package: &str) -> Vec<String> {
    DEBIAN_PACKAGES
        .iter()
        .map(|p| p.to_string())
        .chain(std::iter::once(kernel_package.to_string()))
        .collect()
}

/// sha256 over everything that determines the image's content (the mirror and the package
/// versions do not): the suite, the packages, the size, and the configuration as rendered
/// (files, bootloader config, dpkg options, hooks), so a change to any of them is a new
/// image without anyone remembering to bump [`DEBIAN_FORMAT_VERSION`].
fn input_hash(suite: &str, packages: &[String], size_gib: u32) -> String {
    let mut h = Sha256::new();
    h.update(DEBIAN_FORMAT_VERSION.to_le_bytes());
    let mut part = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    part(suite.as_bytes());
    for p in packages {
        part(p.as_bytes());
    }
    part(&size_gib.to_le_bytes());
    const UUID: &str = "ROOT-UUID";
    for (path, mode, content) in overlay_files(UUID) {
        part(path.as_bytes());
        part(&mode.to_le_bytes());
        part(content.as_bytes());
    }
    part(render_syslinux_cfg(UUID).as_bytes());
    part(format!("{EFI_BOOT_DIR}/BOOTX64.EFI ldlinux.e64 syslinux.cfg").as_bytes());
    for s in DPKG_OPTIONS.iter().chain(CUSTOMIZE_HOOKS) {
        part(s.as_bytes());
    }
    hex(&h.finalize()[..12])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Stable per-image identifiers derived from the image id: the root filesystem's UUID (a
/// version-4-shaped UUID), the MBR disk signature and the FAT volume id. Derived rather than
/// random, so rebuilding the same inputs gives the same identities.
fn identities(id: &str) -> (String, u32, u32) {
    let d = Sha256::digest(format!("ferry-debian-image:{id}").as_bytes());
    let mut u = [0u8; 16];
    u.copy_from_slice(&d[..16]);
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        hex(&u[..4]),
        hex(&u[4..6]),
        hex(&u[6..8]),
        hex(&u[8..10]),
        hex(&u[10..])
    );
    let signature = u32::from_le_bytes([d[16], d[17], d[18], d[19]]);
    let volume_id = u32::from_le_bytes([d[20], d[21], d[22], d[23]]);
    (uuid, signature, volume_id)
}

// ---------------------------------------------------------------------------------------
// Disk layout and MBR (pure)
// ---------------------------------------------------------------------------------------

/// One partition in 512-byte sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// First sector.
    pub start_lba: u64,
    /// Length in sectors.
    pub sectors: u64,
}

impl Partition {
    /// Byte offset of the partition on the disk (what mkfs and mtools take).
    pub fn offset_bytes(&self) -> u64 {
        self.start_lba * SECTOR
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.sectors * SECTOR
    }
}

/// The disk: an MBR, a FAT16 boot partition at 1 MiB and an ext4 root partition from the end
/// of the boot partition to the end of the disk, both 1 MiB aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskLayout {
    /// Size of the whole disk.
    pub disk_bytes: u64,
    /// Partition 1, active: syslinux, kernel, initrd.
    pub boot: Partition,
    /// Partition 2: the root filesystem.
    pub root: Partition,
}

impl DiskLayout {
    /// The layout of a disk of `size_gib` GiB; at least 1 GiB (the root filesystem needs about
    /// 400 MiB), at most what an MBR can address.
    pub fn for_size_gib(size_gib: u32) -> Result<DiskLayout, ImageError> {
        if size_gib == 0 || size_gib > MAX_SIZE_GIB {
            return Err(ImageError::InvalidSize {
                size_gib,
                message: format!("must be between 1 and {MAX_SIZE_GIB}"),
            });
        }
        let disk_bytes = u64::from(size_gib) << 30;
        let total = disk_bytes / SECTOR;
        let boot = Partition {
            start_lba: ALIGN_SECTORS,
            sectors: BOOT_PARTITION_MIB * (1 << 20) / SECTOR,
        };
        let root_start = boot.start_lba + boot.sectors;
        let root = Partition {
            start_lba: root_start,
            sectors: total - root_start,
        };
        Ok(DiskLayout {
            disk_bytes,
            boot,
            root,
        })
    }

    /// Number of 4 KiB blocks of the root filesystem (mkfs.ext4's size argument).
    pub fn root_blocks(&self) -> u64 {
        self.root.size_bytes() / EXT4_BLOCK
    }

    /// Size of the boot filesystem in KiB (mkfs.fat's size argument).
    pub fn boot_kib(&self) -> u64 {
        self.boot.size_bytes() / 1024
    }

    /// The first sector: `boot_code` (at most 440 bytes, e.g. syslinux's mbr.bin), the disk
    /// signature, the two partition entries (boot active) and the 0x55AA signature.
    pub fn mbr(&self, boot_code: &[u8], disk_signature: u32) -> Result<[u8; 512], ImageError> {
        if boot_code.len() > MBR_BOOT_CODE_MAX {
            return Err(ImageError::DiskFailed {
                step: "writing the MBR".into(),
                message: format!(
                    "boot code is {} bytes, an MBR holds {MBR_BOOT_CODE_MAX}",
                    boot_code.len()
                ),
            });
        }
        let mut mbr = [0u8; 512];
        mbr[..boot_code.len()].copy_from_slice(boot_code);
        mbr[440..444].copy_from_slice(&disk_signature.to_le_bytes());
        let entries = [
            (true, PART_TYPE_FAT16_LBA, self.boot),
            (false, PART_TYPE_LINUX, self.root),
        ];
        for (i, (active, kind, part)) in entries.into_iter().enumerate() {
            let e = &mut mbr[446 + 16 * i..446 + 16 * (i + 1)];
            e[0] = if active { 0x80 } else { 0 };
            e[1..4].copy_from_slice(&chs(part.start_lba));
            e[4] = kind;
            e[5..8].copy_from_slice(&chs(part.start_lba + part.sectors - 1));
            let start = u32::try_from(part.start_lba).map_err(|_| too_big(part.start_lba))?;
            let len = u32::try_from(part.sectors).map_err(|_| too_big(part.sectors))?;
            e[8..12].copy_from_slice(&start.to_le_bytes());
            e[12..16].copy_from_slice(&len.to_le_bytes());
        }
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        Ok(mbr)
    }
}

fn too_big(sectors: u64) -> ImageError {
    ImageError::DiskFailed {
        step: "writing the MBR".into(),
        message: format!("sector {sectors} is beyond what an MBR can address"),
    }
}

/// The CHS address of a sector in the usual 255 heads x 63 sectors geometry, as an MBR entry
/// stores it; sectors beyond cylinder 1023 get the "use LBA" maximum (1023/254/63). BIOSes
/// and syslinux's MBR use the LBA fields, but some tools check these.
fn chs(lba: u64) -> [u8; 3] {
    const HEADS: u64 = 255;
    const SECTORS: u64 = 63;
    let cylinder = lba / (HEADS * SECTORS);
    if cylinder > 1023 {
        return [0xFE, 0xFF, 0xFF];
    }
    let head = (lba / SECTORS) % HEADS;
    let sector = lba % SECTORS + 1;
    [
        head as u8,
        (sector as u8) | (((cylinder >> 2) & 0xC0) as u8),
        (cylinder & 0xFF) as u8,
    ]
}

// ---------------------------------------------------------------------------------------
// Configuration (pure)
// ---------------------------------------------------------------------------------------

/// `/etc/fstab`: the root by UUID, checked by fsck at boot (pass 1), read-only on errors.
pub fn render_fstab(root_uuid: &str) -> String {
    format!(
        "# <file system> <mount point> <type> <options> <dump> <pass>\n\
         UUID={root_uuid} / ext4 errors=remount-ro 0 1\n"
    )
}

/// `syslinux.cfg` on the boot partition: boot at once, kernel messages and the login prompt
/// on the serial port (the host reads the boot there; `-nodefaults` guests have no screen,
/// so no `console=tty0`).
pub fn render_syslinux_cfg(root_uuid: &str) -> String {
    format!(
        "SERIAL 0 115200\n\
         DEFAULT debian\n\
         PROMPT 0\n\
         TIMEOUT 0\n\
         LABEL debian\n\
         \x20 LINUX /vmlinuz\n\
         \x20 INITRD /initrd.img\n\
         \x20 APPEND {}\n",
        kernel_cmdline(root_uuid)
    )
}

/// The kernel command line: root by UUID (independent of the disk controller's naming),
/// mounted read-only first so fsck can check it, serial console.
pub fn kernel_cmdline(root_uuid: &str) -> String {
    format!("root=UUID={root_uuid} ro console=ttyS0,115200n8")
}

/// systemd-networkd: DHCP on every ethernet interface with a predictable name, the fallback
/// for NICs Ferry gave no static address (the `ferry-net` unit's files sort first and win).
pub fn render_network() -> String {
    "[Match]\nName=en*\n\n[Network]\nDHCP=yes\n".to_string()
}

/// Where the image keeps [`render_net_script`].
pub const NET_SCRIPT: &str = "usr/local/sbin/ferry-net-config";
/// Directory and name prefix of the networkd files the script writes (in /run: rewritten at
/// every boot from what this boot's firmware says, nothing stale survives a change).
pub const NET_RUN_DIR: &str = "/run/systemd/network";

/// The oneshot unit that runs [`render_net_script`] before systemd-networkd starts, so the
/// first configuration networkd applies is already the static one.
pub fn render_net_unit() -> String {
    format!(
        "[Unit]\n\
         Description=Ferry: static network settings from the SMBIOS OEM strings\n\
         DefaultDependencies=no\n\
         Before=systemd-networkd.service network-pre.target\n\
         Wants=network-pre.target\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         RemainAfterExit=yes\n\
         ExecStart=/{NET_SCRIPT}\n\
         \n\
         [Install]\n\
         WantedBy=systemd-networkd.service\n"
    )
}

/// A POSIX sh script (dash; coreutils only) that reads the SMBIOS type 11 OEM strings QEMU
/// sets from the instance's NICs (`ferry.netN=ADDR/PREFIX[,gw=GW],mac=MAC`, see
/// `ferry_qemu::smbios_net_string`) from `/sys/firmware/dmi/entries/11-*/raw` (the kernel's
/// dmi-sysfs, built into Debian's kernels) and writes one networkd file per MAC with that
/// address. A structure's raw bytes are its formatted part (its length in byte 1) followed by
/// NUL-terminated strings. Strings that are not Ferry's, or malformed, are skipped; without
/// any, the DHCP file applies.
pub fn render_net_script() -> String {
    format!(
        r#"#!/bin/sh
# Ferry: static addresses for NICs from SMBIOS OEM strings (type 11) that QEMU sets from the
# instance's spec: "ferry.netN=ADDR/PREFIX[,gw=GW],mac=MAC". One systemd-networkd file per
# MAC; NICs without one keep the DHCP configuration in /etc/systemd/network.
set -u
out={NET_RUN_DIR}
mkdir -p "$out"
rm -f "$out"/10-ferry-net*.network
for raw in /sys/firmware/dmi/entries/11-*/raw; do
    [ -r "$raw" ] || continue
    len=$(od -An -tu1 -j1 -N1 "$raw" | tr -d ' \n')
    case "$len" in ''|*[!0-9]*) continue ;; esac
    tail -c +$((len + 1)) "$raw" | tr '\0' '\n' | while IFS= read -r s; do
        case "$s" in ferry.net[0-9]*=*) ;; *) continue ;; esac
        name=${{s%%=*}}
        rest=${{s#*=}}
        addr=${{rest%%,*}}
        gw=
        mac=
        for kv in $(printf '%s' "${{rest#"$addr"}}" | tr ',' ' '); do
            case "$kv" in
                gw=*) gw=${{kv#gw=}} ;;
                mac=*) mac=${{kv#mac=}} ;;
            esac
        done
        case "$name" in *[!a-z0-9.]*) continue ;; esac
        case "$addr" in ''|*[!0-9./]*) continue ;; esac
        case "$gw" in *[!0-9.]*) continue ;; esac
        case "$mac" in ''|*[!0-9a-f:]*) continue ;; esac
        f="$out/10-ferry-${{name#ferry.}}.network"
        {{
            printf '[Match]\nMACAddress=%s\n\n[Network]\nAddress=%s\n' "$mac" "$addr"
            if [ -n "$gw" ]; then printf 'Gateway=%s\n' "$gw"; fi
        }} > "$f.tmp" && mv "$f.tmp" "$f"
        echo "ferry-net: $mac $addr${{gw:+ via $gw}}"
    done
done
exit 0
"#
    )
}

/// `/etc/hosts` for the guest's hostname.
pub fn render_hosts(hostname: &str) -> String {
    format!(
        "127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
    )
}

/// initramfs-tools: `MODULES=most` puts the storage drivers (virtio_blk among them) into the
/// initrd whatever the build machine has (`dep` would look at the build machine);
/// `FSTYPE=ext4` makes the fsck hook copy fsck.ext4 in (by default it probes the root device,
/// which does not exist while the image is built, and leaves fsck out).
pub fn render_initramfs_conf() -> String {
    "MODULES=most\nFSTYPE=ext4\n".to_string()
}

/// The files copied into the root before packages are installed: `(path, mode, content)`.
fn overlay_files(root_uuid: &str) -> Vec<(&'static str, u32, String)> {
    vec![
        ("etc/fstab", 0o644, render_fstab(root_uuid)),
        ("etc/hostname", 0o644, format!("{GUEST_HOSTNAME}\n")),
        ("etc/hosts", 0o644, render_hosts(GUEST_HOSTNAME)),
        (
            "etc/initramfs-tools/conf.d/ferry.conf",
            0o644,
            render_initramfs_conf(),
        ),
        (
            "etc/systemd/network/80-ferry-dhcp.network",
            0o644,
            render_network(),
        ),
        (
            "etc/systemd/system/ferry-net.service",
            0o644,
            render_net_unit(),
        ),
        (NET_SCRIPT, 0o755, render_net_script()),
    ]
}

fn write_overlay(dir: &Path, root_uuid: &str) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    for (rel, mode, content) in overlay_files(root_uuid) {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
        }
        fs::write(&path, content).map_err(io_err(format!("writing {}", path.display())))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(io_err(format!("chmod {}", path.display())))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// apt sources (pure parsing)
// ---------------------------------------------------------------------------------------

/// One apt source the image is bootstrapped from (and keeps in its sources.list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSource {
    /// Mirror URI as this machine's apt has it.
    pub uri: String,
    /// `bookworm`, `bookworm-updates` or `bookworm-security`.
    pub suite: String,
}

impl AptSource {
    /// The one-line sources.list entry mmdebstrap takes as a mirror argument.
    pub fn line(&self) -> String {
        format!("deb {} {} main", self.uri, self.suite)
    }
}

/// The `main` sources of `suite` and its `-updates` and `-security` suites from
/// `apt-get indextargets --format '$(TARGET_OF) $(REPO_URI) $(RELEASE) $(COMPONENT)'`, in that
/// suite order, without duplicates. Other suites (backports, testing) are left out: the image
/// is plain `suite`.
pub fn parse_indextargets(output: &str, suite: &str) -> Vec<AptSource> {
    let order = [
        suite.to_string(),
        format!("{suite}-updates"),
        format!("{suite}-security"),
    ];
    let mut found: Vec<(usize, AptSource)> = Vec::new();
    for line in output.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [target_of, uri, release, component] = f[..] else {
            continue;
        };
        if target_of != "deb" || component != "main" {
            continue;
        }
        let Some(rank) = order.iter().position(|s| s == release) else {
            continue;
        };
        let source = AptSource {
            uri: uri.to_string(),
            suite: release.to_string(),
        };
        if !found.iter().any(|(_, s)| *s == source) {
            found.push((rank, source));
        }
    }
    found.sort_by_key(|(rank, _)| *rank);
    found.into_iter().map(|(_, s)| s).collect()
}

fn apt_sources(suite: &str) -> Result<Vec<AptSource>, ImageError> {
    let out = Command::new("apt-get")
        .args([
            "indextargets",
            "--format",
            "$(TARGET_OF) $(REPO_URI) $(RELEASE) $(COMPONENT)",
        ])
        .output()
        .map_err(|e| ImageError::AptMissing {
            message: format!("cannot run apt-get indextargets: {e}"),
        })?;
    let sources = parse_indextargets(&String::from_utf8_lossy(&out.stdout), suite);
    if !sources.iter().any(|s| s.suite == suite) {
        return Err(ImageError::NoAptSource {
            suite: suite.to_string(),
            message: format!(
                "apt-get indextargets lists no `deb` source of {suite} main{}",
                stderr_tail(&out.stderr)
                    .map(|t| format!(" ({t})"))
                    .unwrap_or_default()
            ),
        });
    }
    Ok(sources)
}

// ---------------------------------------------------------------------------------------
// The build
// ---------------------------------------------------------------------------------------

/// The programs a build runs, found before anything starts.
struct Tools {
    mmdebstrap: PathBuf,
    mkfs_ext4: PathBuf,
    mkfs_fat: PathBuf,
    mcopy: PathBuf,
    mmd: PathBuf,
    syslinux: PathBuf,
    syslinux_efi: PathBuf,
    ldlinux_e64: PathBuf,
    qemu_img: PathBuf,
    mbr_bin: PathBuf,
}

impl Tools {
    fn find() -> Result<Tools, ImageError> {
        let need = |tool: &str, package: &str| {
            which(tool).ok_or_else(|| ImageError::ToolMissing {
                tool: tool.to_string(),
                package: package.to_string(),
            })
        };
        Ok(Tools {
            mmdebstrap: need("mmdebstrap", "mmdebstrap")?,
            mkfs_ext4: need("mkfs.ext4", "e2fsprogs")?,
            mkfs_fat: need("mkfs.fat", "dosfstools")?,
            mcopy: need("mcopy", "mtools")?,
            mmd: need("mmd", "mtools")?,
            syslinux: need("syslinux", "syslinux")?,
            syslinux_efi: first_file(SYSLINUX_EFI_PATHS, "syslinux.efi", "syslinux-efi")?,
            ldlinux_e64: first_file(LDLINUX_E64_PATHS, "ldlinux.e64", "syslinux-common")?,
            qemu_img: need("qemu-img", "qemu-utils")?,
            mbr_bin: MBR_BIN_PATHS
                .iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
                .ok_or_else(|| ImageError::ToolMissing {
                    tool: "syslinux mbr.bin".into(),
                    package: "syslinux-common".into(),
                })?,
        })
    }
}

/// The first of `paths` that is a file, else which package provides it.
fn first_file(paths: &[&str], tool: &str, package: &str) -> Result<PathBuf, ImageError> {
    paths
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| ImageError::ToolMissing {
            tool: tool.into(),
            package: package.into(),
        })
}

/// `name` in `$PATH` or in the sbin directories (mkfs.* live there and a non-login root
/// shell's PATH may lack them).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Builds the image in `staging`; its manifest already names the files in `final_dir`.
fn build_into(
    staging: &Path,
    final_dir: &Path,
    plan: &Plan,
    tools: &Tools,
    started: Instant,
    progress: &dyn Fn(&str),
) -> Result<DebianImage, ImageError> {
    let mut log = BuildLog::create(&staging.join(LOG_FILE))?;
    let (root_uuid, disk_signature, volume_id) = identities(&plan.id);
    let overlay = staging.join("overlay");
    write_overlay(&overlay, &root_uuid)?;

    let rootfs = staging.join("rootfs");
    let mut mirrors: Vec<&str> = plan.sources.iter().map(|s| s.uri.as_str()).collect();
    mirrors.dedup();
    progress(&format!(
        "mmdebstrap {DEBIAN_SUITE} (minbase + {}) from {}",
        plan.packages.join(" "),
        mirrors.join(" ")
    ));
    bootstrap(&mut log, tools, plan, &overlay, &rootfs)?;
    let (vmlinuz, initrd, kernel_version) = boot_files(&rootfs.join("boot"))?;

    progress(&format!(
        "disk: {} GiB, MBR + FAT16 boot ({} MiB, syslinux for BIOS and UEFI) + ext4 root (UUID {root_uuid})",
        plan.size_gib, BOOT_PARTITION_MIB
    ));
    let raw = staging.join("disk.raw");
    let layout = &plan.layout;
    let boot_code =
        fs::read(&tools.mbr_bin).map_err(io_err(format!("reading {}", tools.mbr_bin.display())))?;
    let mbr = layout.mbr(&boot_code, disk_signature)?;
    let mut file = fs::File::create(&raw).map_err(io_err(format!("creating {}", raw.display())))?;
    file.set_len(layout.disk_bytes)
        .and_then(|_| file.seek(SeekFrom::Start(0)))
        .and_then(|_| file.write_all(&mbr))
        .and_then(|_| file.sync_all())
        .map_err(io_err(format!("writing the MBR to {}", raw.display())))?;
    drop(file);

    let boot_at = layout.boot.offset_bytes();
    let image_at = format!("{}@@{boot_at}", raw.display());
    log.step(
        "mkfs.fat",
        Command::new(&tools.mkfs_fat)
            .args(["-F", "16", "-n", "DEBIANBOOT", "-i"])
            .arg(format!("{volume_id:08X}"))
            .arg("--offset")
            .arg(layout.boot.start_lba.to_string())
            .arg(&raw)
            .arg(layout.boot_kib().to_string()),
    )?;
    let cfg = staging.join("syslinux.cfg");
    fs::write(&cfg, render_syslinux_cfg(&root_uuid))
        .map_err(io_err(format!("writing {}", cfg.display())))?;
    // The BIOS loader reads the root of the boot partition, the UEFI one EFI/BOOT.
    log.step(
        "mmd",
        Command::new(&tools.mmd)
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-i", &image_at, "::EFI"])
            .arg(format!("::{EFI_BOOT_DIR}")),
    )?;
    let efi = |name: &str| format!("{EFI_BOOT_DIR}/{name}");
    for (src, name) in [
        (&vmlinuz, "vmlinuz".to_string()),
        (&initrd, "initrd.img".to_string()),
        (&cfg, "syslinux.cfg".to_string()),
        (&tools.syslinux_efi, efi("BOOTX64.EFI")),
        (&tools.ldlinux_e64, efi("ldlinux.e64")),
        (&cfg, efi("syslinux.cfg")),
    ] {
        log.step(
            "mcopy",
            Command::new(&tools.mcopy)
                .env("MTOOLS_SKIP_CHECK", "1")
                .args(["-o", "-i", &image_at])
                .arg(src)
                .arg(format!("::{name}")),
        )?;
    }
    log.step(
        "syslinux --install",
        Command::new(&tools.syslinux)
            .args(["--install", "--offset"])
            .arg(boot_at.to_string())
            .arg(&raw),
    )?;

    progress("mkfs.ext4 -d: filling the root filesystem");
    log.step(
        "mkfs.ext4",
        Command::new(&tools.mkfs_ext4)
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                "4096",
                "-L",
                "debian-root",
                "-U",
            ])
            .arg(&root_uuid)
            .arg("-E")
            .arg(format!("offset={}", layout.root.offset_bytes()))
            .arg("-d")
            .arg(&rootfs)
            .arg(&raw)
            .arg(layout.root_blocks().to_string()),
    )?;
    remove_build_dir(&rootfs);
    remove_build_dir(&overlay);

    progress("qemu-img convert -c -O qcow2");
    let built_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // A new name per build: overlays name their backing file by path, and must never find
    // another build's blocks there.
    let disk_name = format!("debian-{DEBIAN_SUITE}-{built_unix}.qcow2");
    let disk = staging.join(&disk_name);
    log.step(
        "qemu-img convert",
        Command::new(&tools.qemu_img)
            .args(["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&disk),
    )?;
    fs::remove_file(&raw).map_err(io_err(format!("removing {}", raw.display())))?;
    let _ = fs::remove_file(&cfg);

    let file_bytes = fs::metadata(&disk)
        .map_err(io_err(format!("reading {}", disk.display())))?
        .len();
    let image = DebianImage {
        path: final_dir.join(&disk_name),
        id: plan.id.clone(),
        suite: DEBIAN_SUITE.to_string(),
        kernel_package: plan.kernel_package.clone(),
        kernel_version,
        root_uuid,
        size_gib: plan.size_gib,
        packages: plan.packages.clone(),
        file_bytes,
        build_seconds: (started.elapsed().as_millis() as f64) / 1000.0,
        built_unix,
    };
    let json = serde_json::to_vec_pretty(&image).map_err(|e| ImageError::Io {
        context: format!("encoding {MANIFEST}"),
        source: io::Error::other(e),
    })?;
    fs::write(staging.join(MANIFEST), json).map_err(io_err(format!("writing {MANIFEST}")))?;
    Ok(image)
}

/// Runs mmdebstrap into `rootfs`.
fn bootstrap(
    log: &mut BuildLog,
    tools: &Tools,
    plan: &Plan,
    overlay: &Path,
    rootfs: &Path,
) -> Result<(), ImageError> {
    let mut cmd = Command::new(&tools.mmdebstrap);
    cmd.args(["--variant=minbase", "--mode=root", "--format=directory"])
        .arg(format!("--include={}", plan.packages.join(",")));
    for opt in DPKG_OPTIONS {
        cmd.arg(format!("--dpkgopt={opt}"));
    }
    cmd.arg(format!(
        "--setup-hook=sync-in {} /",
        shell_quote(&overlay.to_string_lossy())
    ));
    for hook in CUSTOMIZE_HOOKS {
        cmd.arg(format!("--customize-hook={hook}"));
    }
    cmd.arg(DEBIAN_SUITE).arg(rootfs);
    for source in &plan.sources {
        cmd.arg(source.line());
    }
    let out = log.run(&mut cmd)?;
    if !out.status.success() {
        return Err(ImageError::BootstrapFailed {
            message: stderr_tail(&out.stderr).unwrap_or_else(|| out.status.to_string()),
            log: plan.failed_log.clone(),
        });
    }
    Ok(())
}

/// `vmlinuz-<version>` and `initrd.img-<version>` in the root's `/boot`.
fn boot_files(boot: &Path) -> Result<(PathBuf, PathBuf, String), ImageError> {
    let failed = |message: String| ImageError::DiskFailed {
        step: "finding the kernel".into(),
        message,
    };
    let mut versions: Vec<String> = fs::read_dir(boot)
        .map_err(|e| failed(format!("{}: {e}", boot.display())))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_string)
        })
        .collect();
    versions.sort();
    let version = versions
        .pop()
        .ok_or_else(|| failed(format!("no vmlinuz-* in {}", boot.display())))?;
    let initrd = boot.join(format!("initrd.img-{version}"));
    if !initrd.is_file() {
        return Err(failed(format!(
            "{} missing: initramfs-tools did not build an initrd",
            initrd.display()
        )));
    }
    Ok((boot.join(format!("vmlinuz-{version}")), initrd, version))
}

/// The build's log file: every command with its output, kept next to the image (and as
/// `last-failed-build.log` when a build fails).
struct BuildLog {
    file: fs::File,
}

impl BuildLog {
    fn create(path: &Path) -> Result<BuildLog, ImageError> {
        let file =
            fs::File::create(path).map_err(io_err(format!("creating {}", path.display())))?;
        Ok(BuildLog { file })
    }

    /// Runs `cmd` to completion, logging its command line and output.
    fn run(&mut self, cmd: &mut Command) -> Result<Output, ImageError> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let line = std::iter::once(program.clone())
            .chain(cmd.get_args().map(|a| shell_quote(&a.to_string_lossy())))
            .collect::<Vec<_>>()
            .join(" ");
        let started = Instant::now();
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(io_err(format!("running {program}")))?;
        let _ = writeln!(self.file, "$ {line}");
        let _ = self.file.write_all(&out.stdout);
        let _ = self.file.write_all(&out.stderr);
        let _ = writeln!(
            self.file,
            "# {} after {:.1} s\n",
            out.status,
            started.elapsed().as_secs_f64()
        );
        Ok(out)
    }

    /// Runs a disk step; a failure becomes [`ImageError::DiskFailed`] with its stderr.
    fn step(&mut self, step: &str, cmd: &mut Command) -> Result<(), ImageError> {
        let out = self.run(cmd)?;
        if out.status.success() {
            return Ok(());
        }
        Err(ImageError::DiskFailed {
            step: step.to_string(),
            message: stderr_tail(&out.stderr)
                .or_else(|| stderr_tail(&out.stdout))
                .unwrap_or_else(|| out.status.to_string()),
        })
    }
}

/// The last lines of a command's error output, for an error message.
fn stderr_tail(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return None;
    }
    Some(lines[lines.len().saturating_sub(4)..].join(" | "))
}

/// Quotes for a POSIX shell (and Perl's shellwords, which parses mmdebstrap's hooks).
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-=+,:@".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

// ---------------------------------------------------------------------------------------
// The cache
// ---------------------------------------------------------------------------------------

/// A complete cached image in `dir`, if there is one. The path is re-derived from `dir`, so
/// the cache can be moved.
fn load_image(dir: &Path) -> Option<DebianImage> {
    let text = fs::read_to_string(dir.join(MANIFEST)).ok()?;
    let mut image: DebianImage = serde_json::from_str(&text).ok()?;
    image.path = dir.join(image.path.file_name()?);
    image.path.is_file().then_some(image)
}

/// The most recently built cached image of this size, for when the inputs cannot be
/// resolved (no apt).
fn newest_cached(images: &Path, size_gib: u32) -> Option<DebianImage> {
    fs::read_dir(images)
        .ok()?
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| load_image(&e.path()))
        .filter(|i| i.size_gib == size_gib && i.suite == DEBIAN_SUITE)
        .max_by_key(|i| i.built_unix)
}

/// Moves a finished staging directory into place. With `force` an existing image is
/// replaced (moved aside first, so the directory is never half written); without it a
/// concurrent builder that got there first wins.
fn install(staging: &Path, dir: &Path, force: bool) -> Result<(), ImageError> {
    let old = dir.with_file_name(format!(".old-{}", unique_suffix()));
    let moved_old = force && dir.exists() && fs::rename(dir, &old).is_ok();
    let result = fs::rename(staging, dir);
    if moved_old {
        remove_build_dir(&old);
    }
    match result {
        Ok(()) => Ok(()),
        Err(e) => {
            remove_build_dir(staging);
            if load_image(dir).is_some() {
                Ok(())
            } else {
                Err(io_err(format!("moving the image into {}", dir.display()))(
                    e,
                ))
            }
        }
    }
}

/// Removes a build directory, unless something is still mounted below it: mmdebstrap mounts
/// /proc, /sys and /dev into the root while it works, and deleting through a leftover bind
/// mount of /dev would delete the machine's device nodes.
fn remove_build_dir(dir: &Path) {
    let mounts = mounts_under(dir);
    if !mounts.is_empty() {
        tracing::error!(dir = %dir.display(), ?mounts, "not removing a build directory with mounts inside; unmount them and remove it by hand");
        return;
    }
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove build directory");
        }
    }
}

/// Mount points at or below `dir`, from /proc/self/mountinfo.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mount_points(&text)
        .into_iter()
        .filter(|m| m.starts_with(&dir))
        .collect()
}

/// The mount point column of mountinfo, with its octal escapes (`\040` for a space) undone.
fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| {
            let mut out = Vec::new();
            let b = m.as_bytes();
            let mut i = 0;
            while i < b.len() {
                let escaped = (b[i] == b'\\' && i + 3 < b.len())
                    .then(|| std::str::from_utf8(&b[i + 1..i + 4]).ok())
                    .flatten()
                    .and_then(|o| u8::from_str_radix(o, 8).ok());
                match escaped {
                    Some(byte) => {
                        out.push(byte);
                        i += 4;
                    }
                    None => {
                        out.push(b[i]);
                        i += 1;
                    }
                }
            }
            PathBuf::from(String::from_utf8_lossy(&out).into_owned())
        })
        .collect()
}

/// Removes staging directories left by builds whose process is gone (killed, machine
/// rebooted): each holds a root filesystem of several hundred MB.
fn remove_stale_staging(images: &Path) {
    let Ok(entries) = fs::read_dir(images) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(".staging-") else {
            continue;
        };
        // .staging-<id>-<pid>-<nanos>
        let pid = rest.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                tracing::info!(dir = %entry.path().display(), "removing a stale Debian image build");
                remove_build_dir(&entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_a_4_gib_disk() {
        let l = DiskLayout::for_size_gib(4).unwrap();
        assert_eq!(l.disk_bytes, 4 << 30);
        assert_eq!(l.boot.start_lba, 2048);
        assert_eq!(l.boot.offset_bytes(), 1 << 20);
        assert_eq!(l.boot.size_bytes(), 128 << 20);
        assert_eq!(l.root.start_lba, 2048 + 262_144);
        assert_eq!(l.root.start_lba % ALIGN_SECTORS, 0, "root 1 MiB aligned");
        assert_eq!(
            l.root.start_lba + l.root.sectors,
            l.disk_bytes / 512,
            "root ends at the disk's end"
        );
        assert_eq!(l.root_blocks() * 4096, l.root.size_bytes());
        assert_eq!(l.boot_kib(), 131_072);
    }

    #[test]
    fn sizes_out_of_range_are_refused() {
        for size in [0, MAX_SIZE_GIB + 1, u32::MAX] {
            let err = DiskLayout::for_size_gib(size).unwrap_err();
            assert_eq!(err.code(), "invalid-size");
        }
        let max = DiskLayout::for_size_gib(MAX_SIZE_GIB).unwrap();
        assert!(
            max.mbr(&[], 1).is_ok(),
            "the largest disk still fits an MBR"
        );
    }

    #[test]
    fn mbr_entries_and_signature() {
        let l = DiskLayout::for_size_gib(4).unwrap();
        let code = vec![0xEBu8; 440];
        let mbr = l.mbr(&code, 0x1234_5678).unwrap();
        assert_eq!(&mbr[..440], &code[..]);
        assert_eq!(&mbr[440..444], &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(&mbr[510..], &[0x55, 0xAA]);
        let e1 = &mbr[446..462];
        assert_eq!(e1[0], 0x80, "boot partition active");
        assert_eq!(e1[4], 0x0e);
        assert_eq!(u32::from_le_bytes(e1[8..12].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(e1[12..16].try_into().unwrap()), 262_144);
        // LBA 2048 = cylinder 0, head 32, sector 33 in 255/63 geometry.
        assert_eq!(&e1[1..4], &[32, 33, 0]);
        let e2 = &mbr[462..478];
        assert_eq!(e2[0], 0);
        assert_eq!(e2[4], 0x83);
        assert_eq!(u32::from_le_bytes(e2[8..12].try_into().unwrap()), 264_192);
        assert_eq!(
            u32::from_le_bytes(e2[12..16].try_into().unwrap()),
            8_388_608 - 264_192
        );
        // Last sector 8388607: cylinder 522 (high bits 0b10 in the sector byte), head 42,
        // sector 32.
        assert_eq!(&e2[5..8], &[42, 32 | 0x80, 10]);
        let big = DiskLayout::for_size_gib(16).unwrap().mbr(&[], 0).unwrap();
        assert_eq!(
            &big[462 + 5..462 + 8],
            &[0xFE, 0xFF, 0xFF],
            "beyond cylinder 1023"
        );
        assert!(
            mbr[478..510].iter().all(|b| *b == 0),
            "entries 3 and 4 empty"
        );
        assert_eq!(l.mbr(&[0; 441], 0).unwrap_err().code(), "disk-build-failed");
    }

    #[test]
    fn chs_encoding() {
        assert_eq!(chs(0), [0, 1, 0]);
        assert_eq!(chs(62), [0, 63, 0]);
        assert_eq!(chs(63), [1, 1, 0]);
        // Cylinder 256 needs the high bits in the sector byte.
        assert_eq!(chs(256 * 255 * 63), [0, 1 | 0x40, 0]);
        assert_eq!(chs(1023 * 255 * 63 + 254 * 63 + 62), [254, 63 | 0xC0, 0xFF]);
        assert_eq!(chs(1024 * 255 * 63), [0xFE, 0xFF, 0xFF]);
    }

    #[test]
    fn configuration_names_the_root_uuid() {
        let (uuid, _, _) = identities("abc");
        assert_eq!(uuid.len(), 36);
        assert_eq!(&uuid[14..15], "4", "version 4 shape: {uuid}");
        assert_eq!(identities("abc").0, uuid, "stable");
        assert_ne!(identities("abd").0, uuid);

        let fstab = render_fstab(&uuid);
        assert!(fstab.contains(&format!("UUID={uuid} / ext4 errors=remount-ro 0 1\n")));
        let cfg = render_syslinux_cfg(&uuid);
        assert!(cfg.contains(&format!(
            "APPEND root=UUID={uuid} ro console=ttyS0,115200n8\n"
        )));
        assert!(cfg.contains("LINUX /vmlinuz\n") && cfg.contains("INITRD /initrd.img\n"));
        assert!(cfg.contains("TIMEOUT 0") && !cfg.contains("tty0"));
        assert!(render_network().contains("Name=en*") && render_network().contains("DHCP=yes"));
        assert!(render_hosts("debian").contains("127.0.1.1\tdebian\n"));
        assert!(render_initramfs_conf().contains("FSTYPE=ext4\n"));
        let files = overlay_files(&uuid);
        assert!(files.iter().any(|(p, _, _)| *p == "etc/fstab"));
        assert!(files.iter().all(|(p, _, _)| !p.starts_with('/')));
    }

    #[test]
    fn overlay_is_written_with_modes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        write_overlay(dir.path(), "u-u-i-d").unwrap();
        let fstab = dir.path().join("etc/fstab");
        assert!(fs::read_to_string(&fstab).unwrap().contains("UUID=u-u-i-d"));
        assert_eq!(
            fs::metadata(&fstab).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert!(dir
            .path()
            .join("etc/systemd/network/80-ferry-dhcp.network")
            .is_file());
        let script = dir.path().join(NET_SCRIPT);
        assert_eq!(
            fs::metadata(&script).unwrap().permissions().mode() & 0o777,
            0o755,
            "the unit executes it"
        );
        let unit =
            fs::read_to_string(dir.path().join("etc/systemd/system/ferry-net.service")).unwrap();
        assert!(
            unit.contains(&format!("ExecStart=/{NET_SCRIPT}\n")),
            "{unit}"
        );
        assert!(unit.contains("Before=systemd-networkd.service"), "{unit}");
        assert!(CUSTOMIZE_HOOKS
            .iter()
            .any(|h| h.contains("enable") && h.contains("ferry-net.service")));
    }

    /// The script as the guest runs it (dash where installed), on a fake dmi-sysfs: a
    /// structure with Ferry's strings and a foreign one, then one without any.
    #[test]
    fn the_net_script_writes_one_networkd_file_per_static_nic() {
        let dir = tempfile::tempdir().unwrap();
        let entries = dir.path().join("entries");
        let run = dir.path().join("run");
        let script = render_net_script()
            .replace("/sys/firmware/dmi/entries", &entries.to_string_lossy())
            .replace(NET_RUN_DIR, &run.to_string_lossy());
        let raw = |strings: &[&str]| {
            // Type 11, length 5, handle, count; then the strings, each NUL-terminated, and
            // the structure's terminating NUL.
            let mut b = vec![11u8, 5, 0x00, 0x0b, strings.len() as u8];
            for s in strings {
                b.extend_from_slice(s.as_bytes());
                b.push(0);
            }
            b.push(0);
            b
        };
        let put = |name: &str, bytes: Vec<u8>| {
            let d = entries.join(name);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("raw"), bytes).unwrap();
        };
        put(
            "11-0",
            raw(&[
                "vendor thing",
                "ferry.net0=10.77.0.50/24,gw=10.77.0.2,mac=52:54:00:de:b1:01",
                "ferry.net1=192.168.5.9/30,mac=52:54:00:de:b1:02",
                "ferry.net2=10.0.0.1/24;reboot,mac=52:54:00:de:b1:03",
            ]),
        );
        let shell = if Path::new("/bin/dash").exists() {
            "/bin/dash"
        } else {
            "sh"
        };
        let run_it = || {
            let out = Command::new(shell).arg("-c").arg(&script).output().unwrap();
            assert!(out.status.success(), "{out:?}");
            let mut files: Vec<(String, String)> = fs::read_dir(&run)
                .unwrap()
                .flatten()
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        fs::read_to_string(e.path()).unwrap(),
                    )
                })
                .collect();
            files.sort();
            files
        };
        let files = run_it();
        assert_eq!(
            files,
            [
                (
                    "10-ferry-net0.network".to_string(),
                    "[Match]\nMACAddress=52:54:00:de:b1:01\n\n[Network]\nAddress=10.77.0.50/24\n\
                     Gateway=10.77.0.2\n"
                        .to_string()
                ),
                (
                    "10-ferry-net1.network".to_string(),
                    "[Match]\nMACAddress=52:54:00:de:b1:02\n\n[Network]\nAddress=192.168.5.9/30\n"
                        .to_string()
                ),
            ],
            "a malformed string is skipped"
        );
        // The next boot without Ferry's strings: nothing static is left, DHCP applies.
        put("11-0", raw(&["vendor thing"]));
        assert!(run_it().is_empty());
        fs::remove_dir_all(&entries).unwrap();
        assert!(run_it().is_empty(), "no type 11 structure at all");
    }

    #[test]
    fn indextargets_give_the_suite_its_updates_and_security_only() {
        let out = "\
deb http://mirror.example/debian/ bookworm main
deb http://mirror.example/debian/ bookworm main
deb http://mirror.example/debian-security/ bookworm-security main
deb http://mirror.example/debian/ bookworm-backports main
deb http://mirror.example/debian/ bookworm contrib
deb-src http://mirror.example/debian/ bookworm main
deb http://mirror.example/debian/ bookworm-updates main
garbage
";
        let s = parse_indextargets(out, "bookworm");
        let lines: Vec<String> = s.iter().map(AptSource::line).collect();
        assert_eq!(
            lines,
            [
                "deb http://mirror.example/debian/ bookworm main",
                "deb http://mirror.example/debian/ bookworm-updates main",
                "deb http://mirror.example/debian-security/ bookworm-security main",
            ]
        );
        assert!(parse_indextargets(out, "trixie").is_empty());
    }

    #[test]
    fn hash_changes_with_inputs() {
        let p = package_list("linux-image-6.1.0-57-cloud-amd64");
        assert!(p.contains(&"qemu-guest-agent".to_string()));
        assert_eq!(p.last().unwrap(), "linux-image-6.1.0-57-cloud-amd64");
        let a = input_hash("bookworm", &p, 4);
        assert_eq!(a.len(), 24);
        assert_eq!(a, input_hash("bookworm", &p, 4));
        assert_ne!(a, input_hash("bookworm", &p, 5));
        assert_ne!(a, input_hash("trixie", &p, 4));
        assert_ne!(a, input_hash("bookworm", &package_list("linux-image-x"), 4));
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("/root/.cache/ferry"), "/root/.cache/ferry");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn mountinfo_parsing() {
        let info = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 0:5 / /proc rw - proc proc rw\n";
        assert_eq!(
            mount_points(info),
            [PathBuf::from("/mnt/with space"), PathBuf::from("/proc")]
        );
        let dir = tempfile::tempdir().unwrap();
        assert!(mounts_under(dir.path()).is_empty());
    }

    #[test]
    fn cache_lookup_and_stale_staging_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path();
        let img = |id: &str, size: u32, built: u64| DebianImage {
            path: PathBuf::from("/elsewhere/disk.qcow2"),
            id: id.into(),
            suite: DEBIAN_SUITE.into(),
            kernel_package: "k".into(),
            kernel_version: "v".into(),
            root_uuid: "u".into(),
            size_gib: size,
            packages: vec![],
            file_bytes: 1,
            build_seconds: 1.0,
            built_unix: built,
        };
        for (id, size, built, disk) in [
            ("a", 4, 10, true),
            ("b", 4, 20, true),
            ("c", 4, 30, false),
            ("d", 8, 40, true),
        ] {
            let d = images.join(id);
            fs::create_dir_all(&d).unwrap();
            fs::write(
                d.join(MANIFEST),
                serde_json::to_vec(&img(id, size, built)).unwrap(),
            )
            .unwrap();
            if disk {
                fs::write(d.join("disk.qcow2"), b"qcow2").unwrap();
            }
        }
        let loaded = load_image(&images.join("a")).unwrap();
        assert_eq!(
            loaded.path,
            images.join("a").join("disk.qcow2"),
            "re-derived"
        );
        assert!(load_image(&images.join("c")).is_none(), "no disk, no image");
        assert_eq!(newest_cached(images, 4).unwrap().id, "b");
        assert!(newest_cached(images, 16).is_none());

        // A staging dir of a process that does not exist is removed; ours is kept.
        let stale = images.join(".staging-x-4000000000-1");
        let live = images.join(format!(".staging-x-{}-1", std::process::id()));
        fs::create_dir_all(stale.join("rootfs/etc")).unwrap();
        fs::create_dir_all(&live).unwrap();
        remove_stale_staging(images);
        assert!(!stale.exists());
        assert!(live.exists());
    }

    #[test]
    fn boot_files_need_kernel_and_initrd() {
        let dir = tempfile::tempdir().unwrap();
        let boot = dir.path();
        assert_eq!(boot_files(boot).unwrap_err().code(), "disk-build-failed");
        fs::write(boot.join("vmlinuz-6.1.0-57-cloud-amd64"), b"k").unwrap();
        let err = boot_files(boot).unwrap_err();
        assert!(err.to_string().contains("initrd"), "{err}");
        fs::write(boot.join("initrd.img-6.1.0-57-cloud-amd64"), b"i").unwrap();
        let (k, i, v) = boot_files(boot).unwrap();
        assert_eq!(v, "6.1.0-57-cloud-amd64");
        assert!(k.ends_with("vmlinuz-6.1.0-57-cloud-amd64"));
        assert!(i.ends_with("initrd.img-6.1.0-57-cloud-amd64"));
    }
}
