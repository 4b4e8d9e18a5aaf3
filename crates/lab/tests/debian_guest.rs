//! Boots the Debian disk image the way a real guest boots (SeaBIOS, syslinux from the disk, the
//! kernel and initrd from the boot partition, systemd from the ext4 root) under TCG, and talks
//! to it only through qemu-guest-agent: proves the image builder and the agent client fit
//! together. The image is built once and cached (`FERRY_CACHE_DIR`, else ~/.cache/ferry); the
//! guest runs on a throw-away qcow2 overlay.
//!
//! Needs root (the build) and qemu-system-x86_64; skipped (with a message) otherwise. A missing
//! build tool is a failure: `scripts/setup` installs them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ferry_lab::debian_image::{ensure_debian_image, DebianImage, DebianImageOptions};
use ferry_qemu::GUEST_AGENT_PORT;
use ferry_qmp::guest_agent::{GuestAgent, IpAddressType, ShutdownMode};

mod common;
use common::{require_root_and_qemu, QEMU};
/// Debian's `ovmf` package (scripts/setup installs it): the firmware code, read-only, and the
/// template each UEFI guest copies into a vars file (NVRAM) of its own.
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// How the guest's firmware finds its bootloader on the disk.
enum Firmware<'a> {
    /// SeaBIOS (QEMU's default on `pc`): the MBR boot code and syslinux's ldlinux.sys.
    Bios,
    /// OVMF on `q35` with this per-guest NVRAM: `EFI/BOOT/BOOTX64.EFI` (syslinux.efi).
    Uefi { vars: &'a Path },
}
/// How long the guest may take to boot to a working agent under TCG on a busy machine.
const BOOT_BOUND: Duration = Duration::from_secs(180);

/// One QEMU run of the guest. Dropping it kills QEMU (if it still runs) before the temporary
/// directory with the overlay, sockets and log goes away, whether the test passed or not.
struct Guest {
    child: Child,
    serial: PathBuf,
    qga: PathBuf,
    started: Instant,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Guest {
    fn boot(overlay: &Path, dir: &Path, run: &str, firmware: Firmware) -> Guest {
        let serial = dir.join(format!("serial-{run}.log"));
        let qga = dir.join(format!("qga-{run}.sock"));
        let mut qemu = Command::new(QEMU);
        match firmware {
            Firmware::Bios => {
                qemu.args(["-machine", "pc"]);
            }
            Firmware::Uefi { vars } => {
                qemu.args(["-machine", "q35"])
                    .arg("-drive")
                    .arg(format!(
                        "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
                    ))
                    .arg("-drive")
                    .arg(format!(
                        "if=pflash,format=raw,unit=1,file={}",
                        vars.display()
                    ));
            }
        }
        let child = qemu
            .args(["-accel", "tcg", "-cpu", "qemu64", "-m", "512M"])
            .args(["-nodefaults", "-no-user-config"])
            .args(["-display", "none"])
            .arg("-blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=f0",
                overlay.display()
            ))
            .args(["-blockdev", "driver=qcow2,file=f0,node-name=disk0"])
            .args(["-device", "virtio-blk-pci,drive=disk0,bootindex=0"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-chardev")
            .arg(format!(
                "socket,id=qga0,path={},server=on,wait=off",
                qga.display()
            ))
            .args(["-device", "virtio-serial-pci,id=vser0"])
            .arg("-device")
            .arg(format!(
                "virtserialport,bus=vser0.0,chardev=qga0,name={GUEST_AGENT_PORT}"
            ))
            // A NIC on QEMU's user network (which has a DHCP server), closed to the outside:
            // shows systemd-networkd's DHCP on en* at work.
            .args(["-netdev", "user,id=n0,restrict=on"])
            .args(["-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start qemu");
        Guest {
            child,
            serial,
            qga,
            started: Instant::now(),
        }
    }

    fn serial_log(&self) -> String {
        fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn last_lines(&self) -> String {
        let log = self.serial_log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Waits for the agent to answer guest-ping; fails at once if QEMU exits. Returns the time
    /// from QEMU's start.
    async fn wait_for_agent(&mut self, agent: &GuestAgent) -> Duration {
        let ready = agent.wait_ready(BOOT_BOUND);
        tokio::pin!(ready);
        loop {
            tokio::select! {
                r = &mut ready => {
                    if let Err(e) = r {
                        panic!("guest agent did not answer within {BOOT_BOUND:?}: {e}\nserial:\n{}", self.last_lines());
                    }
                    return self.started.elapsed();
                }
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        panic!("qemu exited with {status} during boot; serial:\n{}", self.last_lines());
                    }
                }
            }
        }
    }

    /// Waits for QEMU to exit by itself (after a guest power-off).
    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "qemu still running {within:?} after guest-shutdown; serial:\n{}",
                self.last_lines()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn sh(agent: &GuestAgent, script: &str) -> (Option<i64>, String, String) {
    let out = agent
        .run("/bin/sh", &["-c", script], Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("`{script}` in the guest: {e}"));
    (
        out.exit_code,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn build_image() -> DebianImage {
    let opts = DebianImageOptions::default();
    let started = Instant::now();
    let (image, built) = tokio::task::spawn_blocking(move || ensure_debian_image(&opts))
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("building the Debian image: {e}\n  hint: {}", e.hint()));
    eprintln!(
        "Debian image {} ({}): {} in {:.1} s; qcow2 {:.1} MiB, kernel {}",
        image.id,
        image.path.display(),
        if built { "built" } else { "reused" },
        started.elapsed().as_secs_f64(),
        image.file_bytes as f64 / (1 << 20) as f64,
        image.kernel_version
    );
    image
}

/// A throw-away qcow2 overlay on the cached image, so the cached image stays pristine.
fn overlay_on(image: &DebianImage, dir: &Path) -> PathBuf {
    let overlay = dir.join("overlay.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(&image.path)
        .args(["-F", "qcow2"])
        .arg(&overlay)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    overlay
}

/// The same disk boots through UEFI: OVMF with a fresh NVRAM of this guest's own finds
/// `EFI/BOOT/BOOTX64.EFI` on the boot partition, syslinux.efi loads the kernel and initrd from
/// it, and the guest agent answers from a system that sees EFI firmware.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_guest_boots_from_its_disk_through_uefi() {
    require_root_and_qemu();
    assert!(
        Path::new(OVMF_CODE).is_file() && Path::new(OVMF_VARS).is_file(),
        "OVMF is missing: scripts/setup installs the ovmf package"
    );
    let image = build_image().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let overlay = overlay_on(&image, tmp.path());
    let vars = tmp.path().join("OVMF_VARS.fd");
    fs::copy(OVMF_VARS, &vars).expect("copy the NVRAM template");

    let mut guest = Guest::boot(&overlay, tmp.path(), "uefi", Firmware::Uefi { vars: &vars });
    let agent = GuestAgent::new(&guest.qga);
    let boot = guest.wait_for_agent(&agent).await;
    eprintln!(
        "UEFI boot: guest agent answered guest-ping {:.1} s after QEMU started (TCG)",
        boot.as_secs_f64()
    );
    let os = agent.get_osinfo().await.expect("guest-get-osinfo");
    assert_eq!(os.id.as_deref(), Some("debian"), "{os:?}");
    let (code, out, err) = sh(&agent, "test -d /sys/firmware/efi && echo uefi").await;
    assert_eq!(
        (code, out.trim()),
        (Some(0), "uefi"),
        "the guest runs on EFI firmware: {err}"
    );
    let serial = guest.serial_log();
    assert!(
        serial.contains("efi: EFI v") && serial.contains(&format!("root=UUID={}", image.root_uuid)),
        "the kernel was started by UEFI with the image's command line:\n{}",
        guest.last_lines()
    );
    // OVMF wrote its boot options for this disk into the guest's own NVRAM, not the template.
    assert_ne!(
        fs::read(&vars).unwrap(),
        fs::read(OVMF_VARS).unwrap(),
        "the per-guest NVRAM is in use"
    );

    agent
        .shutdown(ShutdownMode::Powerdown)
        .await
        .expect("guest-shutdown");
    let status = guest.wait_exit(Duration::from_secs(90)).await;
    assert!(status.success(), "qemu exited with {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_guest_boots_from_its_disk_and_answers_through_the_agent() {
    require_root_and_qemu();
    let image = build_image().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let overlay = overlay_on(&image, tmp.path());

    // First boot: the agent answers, the guest is Debian, commands run, the guest powers off.
    let mut guest = Guest::boot(&overlay, tmp.path(), "1", Firmware::Bios);
    let agent = GuestAgent::new(&guest.qga);
    let boot = guest.wait_for_agent(&agent).await;
    eprintln!(
        "first boot: guest agent answered guest-ping {:.1} s after QEMU started (TCG)",
        boot.as_secs_f64()
    );

    let info = agent.info().await.expect("guest-info");
    assert!(info.supports("guest-exec"), "{info:?}");
    let os = agent.get_osinfo().await.expect("guest-get-osinfo");
    assert_eq!(os.id.as_deref(), Some("debian"), "{os:?}");
    assert_eq!(os.version_id.as_deref(), Some("12"), "{os:?}");
    assert_eq!(
        os.kernel_release.as_deref(),
        Some(image.kernel_version.as_str())
    );
    eprintln!(
        "agent {} on {}",
        info.version,
        os.pretty_name.as_deref().unwrap_or("?")
    );

    // Booted the way we meant: syslinux from the disk, root by UUID, checked by fsck.
    let serial = guest.serial_log();
    assert!(
        serial.contains("SYSLINUX"),
        "not booted by syslinux:\n{serial}"
    );
    assert!(
        serial.contains(&format!("root=UUID={}", image.root_uuid)),
        "kernel command line without the root UUID"
    );
    assert!(
        !serial.contains("fsck not present"),
        "the initramfs has no fsck for the root"
    );
    assert!(
        serial.contains("debian-root: clean"),
        "fsck did not check the root in the initramfs"
    );

    // The system came up without failed units.
    let mut state = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        state = sh(&agent, "systemctl is-system-running || true").await.1;
        if !matches!(state.trim(), "starting" | "initializing") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let failed = sh(&agent, "systemctl --failed --no-legend --plain || true")
        .await
        .1;
    assert_eq!(state.trim(), "running", "failed units:\n{failed}");
    let (code, root, _) = sh(&agent, "findmnt -n -o SOURCE,FSTYPE,OPTIONS /").await;
    assert_eq!(code, Some(0));
    assert!(root.contains("ext4") && root.contains("rw"), "{root}");
    // Small: no package lists, no docs beyond copyright files.
    let (_, lists, _) = sh(&agent, "ls /var/lib/apt/lists").await;
    assert!(!lists.contains("_Packages"), "apt lists kept: {lists}");
    let (_, docs, _) = sh(
        &agent,
        "find /usr/share/doc -type f ! -name copyright | wc -l",
    )
    .await;
    assert_eq!(docs.trim(), "0", "docs kept");
    let (_, df, _) = sh(&agent, "df -h --output=used,size / | tail -1").await;
    eprintln!("root filesystem used/size: {}", df.trim());
    let (_, shadow, _) = sh(&agent, "passwd -S root").await;
    assert!(
        shadow.split_whitespace().nth(1) == Some("L"),
        "root not locked: {shadow}"
    );

    // Write a file and sync; read it back with a second command.
    let token = format!("ferry-{}", std::process::id());
    let (code, _, err) = sh(&agent, &format!("echo {token} > /root/ferry-test && sync")).await;
    assert_eq!(code, Some(0), "{err}");
    let out = agent
        .run("/bin/cat", &["/root/ferry-test"], Duration::from_secs(30))
        .await
        .expect("cat");
    assert!(out.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), token);
    let (code, _, err) = sh(&agent, "echo oops >&2; exit 7").await;
    assert_eq!((code, err.trim()), (Some(7), "oops"));

    // systemd-networkd takes the DHCP lease QEMU's user network offers on en*.
    let deadline = Instant::now() + Duration::from_secs(60);
    let nic = loop {
        let ifs = agent
            .network_get_interfaces()
            .await
            .expect("guest-network-get-interfaces");
        let nic = ifs
            .into_iter()
            .find(|i| i.hardware_address.as_deref() == Some("52:54:00:12:34:56"));
        if let Some(nic) = nic.filter(|n| {
            n.ip_addresses
                .iter()
                .any(|a| a.ip_address_type == IpAddressType::Ipv4)
        }) {
            break nic;
        }
        assert!(
            Instant::now() < deadline,
            "no DHCP address on the NIC within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(nic.name.starts_with("en"), "{nic:?}");
    let v4 = nic
        .ip_addresses
        .iter()
        .find(|a| a.ip_address_type == IpAddressType::Ipv4)
        .expect("ipv4");
    assert_eq!(
        (v4.ip_address.as_str(), v4.prefix),
        ("10.0.2.15", 24),
        "{nic:?}"
    );

    let shutdown_started = Instant::now();
    agent
        .shutdown(ShutdownMode::Powerdown)
        .await
        .expect("guest-shutdown");
    let status = guest.wait_exit(Duration::from_secs(90)).await;
    assert!(status.success(), "qemu exited with {status}");
    eprintln!(
        "guest powered off: QEMU exited {:.1} s after guest-shutdown was sent",
        shutdown_started.elapsed().as_secs_f64()
    );
    drop(agent);
    drop(guest);

    // Second boot of the same overlay: the file survived, the root was clean.
    let mut guest = Guest::boot(&overlay, tmp.path(), "2", Firmware::Bios);
    let agent = GuestAgent::new(&guest.qga);
    let boot = guest.wait_for_agent(&agent).await;
    eprintln!(
        "second boot: guest agent answered {:.1} s after QEMU started",
        boot.as_secs_f64()
    );
    let out = agent
        .run("/bin/cat", &["/root/ferry-test"], Duration::from_secs(30))
        .await
        .expect("cat after reboot");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), token);
    let serial = guest.serial_log();
    assert!(
        !serial.contains("recovering journal") && !serial.contains("was not cleanly unmounted"),
        "root not cleanly unmounted by the first shutdown:\n{}",
        guest.last_lines()
    );
    agent
        .shutdown(ShutdownMode::Powerdown)
        .await
        .expect("guest-shutdown");
    let status = guest.wait_exit(Duration::from_secs(90)).await;
    assert!(status.success(), "qemu exited with {status}");
}
