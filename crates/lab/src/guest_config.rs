//! Settings of the test guest, as the host passes them: on the kernel command line.
//!
//! The guest is a bare initramfs with no configuration channel besides `/proc/cmdline`, so this
//! type is the host-side twin of the guest's `ferry.*` key parser (crates/guest/src/config.rs).
//! Keep both in step.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Port of the guest's TCP and UDP echo services.
pub const ECHO_PORT: u16 = 7777;
/// Port of the guest's status/control line protocol.
pub const CONTROL_PORT: u16 = 7778;
/// Highest writer rate the guest accepts, MiB/s.
pub const MAX_RATE_MIB_S: u32 = 4096;
/// RAM the guest kernel, initramfs and our threads need besides the working set, MiB.
pub const KERNEL_RESERVE_MIB: u32 = 96;
/// Highest disk writer rate the guest accepts, blocks/s ("as fast as the disk goes").
pub const MAX_DISK_RATE: u32 = 1_000_000;
/// Disk writer rate when none is given, blocks/s.
pub const DEFAULT_DISK_RATE: u32 = 100;
/// Largest block count the guest accepts (4 TiB of 4 KiB blocks).
pub const MAX_DISK_BLOCKS: u64 = 1 << 30;
/// Longest serial a virtio-blk disk shows the guest (VIRTIO_BLK_ID_BYTES); QEMU cuts longer
/// ones, and the guest would then not find its disk.
pub const MAX_DISK_SERIAL: usize = 20;

/// Content of the working set's pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fill {
    /// A repeated word per page: highly compressible, the friendly case.
    #[default]
    Pattern,
    /// A pseudo-random stream per page: incompressible, the worst case for bandwidth.
    Random,
}

impl Fill {
    /// The value of `ferry.fill=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Fill::Pattern => "pattern",
            Fill::Random => "random",
        }
    }
}

/// How the guest makes each disk write durable before it counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskIo {
    /// O_DIRECT (the guest falls back to `Sync` where it is refused).
    #[default]
    Direct,
    /// Buffered write + fdatasync.
    Sync,
}

/// The guest's disk writer: which disk and how fast. The disk must be fresh (all zero): blocks
/// not yet written are verified as zeros.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestDisk {
    /// virtio-blk serial of the disk (`-device virtio-blk-pci,...,serial=SERIAL`), or a guest
    /// device name such as `vdb`.
    pub serial: String,
    /// Durable 4 KiB writes per second; 0 writes every block once, then idles.
    #[serde(default = "default_disk_rate")]
    pub rate_blocks_s: u32,
    /// Blocks to use from the start of the disk; `None`: the whole disk up to 64 MiB.
    #[serde(default)]
    pub blocks: Option<u64>,
    #[serde(default)]
    pub io: DiskIo,
}

fn default_disk_rate() -> u32 {
    DEFAULT_DISK_RATE
}

impl GuestDisk {
    /// The disk with serial `serial`, default rate, size and I/O mode.
    pub fn new(serial: impl Into<String>) -> Self {
        GuestDisk {
            serial: serial.into(),
            rate_blocks_s: DEFAULT_DISK_RATE,
            blocks: None,
            io: DiskIo::Direct,
        }
    }

    fn cmdline_keys(&self) -> String {
        let mut keys = format!(
            " ferry.disk={} ferry.disk_rate={}",
            self.serial, self.rate_blocks_s
        );
        if let Some(blocks) = self.blocks {
            keys.push_str(&format!(" ferry.disk_blocks={blocks}"));
        }
        if self.io == DiskIo::Sync {
            keys.push_str(" ferry.disk_io=sync");
        }
        keys
    }

    fn validate(&self) -> Result<(), String> {
        let s = &self.serial;
        if s.is_empty() || s.len() > MAX_DISK_SERIAL {
            return Err(format!(
                "disk serial {s:?} must have 1 to {MAX_DISK_SERIAL} characters"
            ));
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "disk serial {s:?} may only contain letters, digits, '-', '_' and '.' (it goes on \
                 the kernel command line and QEMU's -device option)"
            ));
        }
        if self.rate_blocks_s > MAX_DISK_RATE {
            return Err(format!(
                "disk writer rate {} blocks/s is above the maximum of {MAX_DISK_RATE}",
                self.rate_blocks_s
            ));
        }
        if let Some(blocks) = self.blocks {
            if !(1..=MAX_DISK_BLOCKS).contains(&blocks) {
                return Err(format!(
                    "disk block count {blocks} is outside 1..={MAX_DISK_BLOCKS}"
                ));
            }
        }
        Ok(())
    }
}

/// What the test guest should do: its address, how hard its memory writer works and, if it
/// has a disk, how its disk writer works.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestConfig {
    /// eth0 address and prefix length; `None` leaves eth0 down.
    pub ip: Option<(Ipv4Addr, u8)>,
    pub gateway: Option<Ipv4Addr>,
    /// Working set of the memory writer, MiB.
    pub wss_mib: u32,
    /// Writer rate, MiB/s; 0 fills the working set once and then idles.
    pub rate_mib_s: u32,
    pub fill: Fill,
    /// Heartbeat interval on the serial console, ms.
    pub heartbeat_ms: u32,
    /// The disk writer; `None`: the guest writes no disk.
    #[serde(default)]
    pub disk: Option<GuestDisk>,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            ip: None,
            gateway: None,
            wss_mib: 64,
            rate_mib_s: 32,
            fill: Fill::Pattern,
            heartbeat_ms: 10,
            disk: None,
        }
    }
}

impl GuestConfig {
    /// The full kernel command line: serial console (the heartbeat goes there), reboot at once on
    /// a panic (so a broken guest shows up as a QEMU exit, not a hang), quiet (keep the console
    /// for our lines), then the `ferry.*` keys.
    pub fn kernel_cmdline(&self) -> String {
        let mut line = String::from("console=ttyS0 panic=-1 quiet");
        if let Some((addr, prefix)) = self.ip {
            line.push_str(&format!(" ferry.ip={addr}/{prefix}"));
        }
        if let Some(gw) = self.gateway {
            line.push_str(&format!(" ferry.gw={gw}"));
        }
        line.push_str(&format!(
            " ferry.wss={} ferry.rate={} ferry.fill={} ferry.hb_ms={}",
            self.wss_mib,
            self.rate_mib_s,
            self.fill.as_str(),
            self.heartbeat_ms
        ));
        if let Some(disk) = &self.disk {
            line.push_str(&disk.cmdline_keys());
        }
        line
    }

    /// Checks the settings against a guest of `memory_mib` RAM before booting it, because the
    /// guest itself can only clamp bad values and warn on a console nobody may read.
    pub fn validate(&self, memory_mib: u32) -> Result<(), String> {
        if self.wss_mib == 0 {
            return Err("wss_mib must be at least 1".into());
        }
        let room = memory_mib.saturating_sub(KERNEL_RESERVE_MIB);
        if self.wss_mib > room {
            return Err(format!(
                "working set of {} MiB does not fit a {memory_mib} MiB guest (at most {room} MiB; \
                 {KERNEL_RESERVE_MIB} MiB are kept for the kernel): lower wss or raise memory",
                self.wss_mib
            ));
        }
        if self.rate_mib_s > MAX_RATE_MIB_S {
            return Err(format!(
                "writer rate {} MiB/s is above the maximum of {MAX_RATE_MIB_S} MiB/s",
                self.rate_mib_s
            ));
        }
        if !(1..=60_000).contains(&self.heartbeat_ms) {
            return Err(format!(
                "heartbeat interval {} ms is outside 1..=60000 ms",
                self.heartbeat_ms
            ));
        }
        if let Some((_, prefix)) = self.ip {
            if prefix > 32 {
                return Err(format!("prefix length /{prefix} is above /32"));
            }
        }
        if let Some(disk) = &self.disk {
            disk.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_contains_every_key() {
        let cfg = GuestConfig {
            ip: Some((Ipv4Addr::new(10, 0, 2, 15), 24)),
            gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
            fill: Fill::Random,
            ..GuestConfig::default()
        };
        assert_eq!(
            cfg.kernel_cmdline(),
            "console=ttyS0 panic=-1 quiet ferry.ip=10.0.2.15/24 ferry.gw=10.0.2.2 ferry.wss=64 \
             ferry.rate=32 ferry.fill=random ferry.hb_ms=10"
        );
        assert!(!GuestConfig::default().kernel_cmdline().contains("ferry.ip"));
    }

    #[test]
    fn validate_limits() {
        let cfg = GuestConfig::default();
        assert!(cfg.validate(256).is_ok());
        assert!(cfg.validate(160).is_ok());
        assert!(cfg.validate(159).is_err());
        let fast = GuestConfig {
            rate_mib_s: 5000,
            ..GuestConfig::default()
        };
        assert!(fast.validate(1024).is_err());
        let zero = GuestConfig {
            wss_mib: 0,
            ..GuestConfig::default()
        };
        assert!(zero.validate(1024).is_err());
    }

    #[test]
    fn disk_keys_and_limits() {
        let mut cfg = GuestConfig {
            disk: Some(GuestDisk::new("ferry-data")),
            ..GuestConfig::default()
        };
        assert!(cfg
            .kernel_cmdline()
            .ends_with(" ferry.hb_ms=10 ferry.disk=ferry-data ferry.disk_rate=100"));
        assert!(cfg.validate(256).is_ok());
        cfg.disk = Some(GuestDisk {
            serial: "d0".into(),
            rate_blocks_s: 0,
            blocks: Some(256),
            io: DiskIo::Sync,
        });
        assert!(cfg.kernel_cmdline().ends_with(
            " ferry.disk=d0 ferry.disk_rate=0 ferry.disk_blocks=256 ferry.disk_io=sync"
        ));
        for bad in [
            GuestDisk::new(""),
            GuestDisk::new("a-serial-longer-than-20"),
            GuestDisk::new("two words"),
            GuestDisk::new("x,drive=y"),
            GuestDisk {
                rate_blocks_s: MAX_DISK_RATE + 1,
                ..GuestDisk::new("d0")
            },
            GuestDisk {
                blocks: Some(0),
                ..GuestDisk::new("d0")
            },
        ] {
            cfg.disk = Some(bad.clone());
            assert!(cfg.validate(256).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn disk_serde_defaults() {
        let old: GuestConfig = serde_json::from_str(
            r#"{"ip":null,"gateway":null,"wss_mib":8,"rate_mib_s":1,"fill":"random",
                "heartbeat_ms":10}"#,
        )
        .unwrap();
        assert_eq!(old.disk, None);
        let disk: GuestDisk = serde_json::from_str(r#"{"serial":"d0"}"#).unwrap();
        assert_eq!(disk, GuestDisk::new("d0"));
    }

    #[test]
    fn serde_roundtrip() {
        let cfg = GuestConfig {
            ip: Some((Ipv4Addr::new(10, 77, 0, 10), 24)),
            disk: Some(GuestDisk::new("ferry-data")),
            ..GuestConfig::default()
        };
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(json.contains("\"fill\":\"pattern\""));
        let back: GuestConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg);
    }
}
