//! The guest's settings, read from the kernel command line.
//!
//! The host has no other channel into a freshly booted initramfs, so everything the guest needs
//! (address, working set, write rate) arrives as `ferry.*` keys on `/proc/cmdline`. PID 1 must
//! never die over a typo there (the kernel would panic), so bad values fall back to defaults and
//! come back as warnings for the console.

use std::net::Ipv4Addr;

use crate::pattern::Fill;

/// Highest writer rate accepted, MiB/s; matches the host's validation.
pub const MAX_RATE_MIB_S: u32 = 4096;
/// Largest working set accepted, MiB (a sanity bound; RAM is checked separately at runtime).
pub const MAX_WSS_MIB: u32 = 1 << 20;
/// Highest disk writer rate accepted, blocks/s: far above what any disk does, i.e. "as fast as
/// the disk goes".
pub const MAX_DISK_RATE: u32 = 1_000_000;
/// Largest `ferry.disk_blocks` accepted: 4 TiB of 4 KiB blocks (a sanity bound; the disk's
/// size is checked at runtime).
pub const MAX_DISK_BLOCKS: u64 = 1 << 30;

/// How disk writes are made durable before they are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskIo {
    /// O_DIRECT: the write returns once the device has the data (falls back to `Sync` where
    /// O_DIRECT is refused).
    Direct,
    /// Buffered write + fdatasync.
    Sync,
}

/// Settings of one guest run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub ip: Option<(Ipv4Addr, u8)>,
    pub gateway: Option<Ipv4Addr>,
    pub wss_mib: u32,
    pub rate_mib_s: u32,
    pub fill: Fill,
    pub heartbeat_ms: u32,
    /// The disk to write: virtio-blk serial, device name or (ordinary process) file path.
    pub disk: Option<String>,
    /// Disk writer rate, blocks/s; 0 writes every block once, then idles.
    pub disk_rate: u32,
    /// Blocks of the disk to use; `None`: the whole disk up to 64 MiB.
    pub disk_blocks: Option<u64>,
    pub disk_io: DiskIo,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ip: None,
            gateway: None,
            wss_mib: 64,
            rate_mib_s: 32,
            fill: Fill::Pattern,
            heartbeat_ms: 10,
            disk: None,
            disk_rate: 100,
            disk_blocks: None,
            disk_io: DiskIo::Direct,
        }
    }
}

impl Config {
    /// `A.B.C.D/NN` or `none`, for the ready line.
    pub fn ip_text(&self) -> String {
        match self.ip {
            Some((addr, prefix)) => format!("{addr}/{prefix}"),
            None => "none".to_string(),
        }
    }
}

fn parse_cidr(value: &str) -> Option<(Ipv4Addr, u8)> {
    let (addr, prefix) = value.split_once('/')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    (prefix <= 32).then_some((addr, prefix))
}

fn parse_bounded(value: &str, min: u32, max: u32) -> Option<u32> {
    value
        .parse::<u32>()
        .ok()
        .filter(|v| (min..=max).contains(v))
}

/// Parses the `ferry.*` keys of a kernel command line; returns the settings and one warning per
/// ignored value.
pub fn parse_cmdline(cmdline: &str) -> (Config, Vec<String>) {
    let mut cfg = Config::default();
    let mut warnings = Vec::new();
    for token in cmdline.split_whitespace() {
        let Some(rest) = token.strip_prefix("ferry.") else {
            continue;
        };
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        let ok = match key {
            "ip" => parse_cidr(value).map(|v| cfg.ip = Some(v)).is_some(),
            "gw" => value.parse().map(|v| cfg.gateway = Some(v)).is_ok(),
            "wss" => parse_bounded(value, 1, MAX_WSS_MIB)
                .map(|v| cfg.wss_mib = v)
                .is_some(),
            "rate" => parse_bounded(value, 0, MAX_RATE_MIB_S)
                .map(|v| cfg.rate_mib_s = v)
                .is_some(),
            "hb_ms" => parse_bounded(value, 1, 60_000)
                .map(|v| cfg.heartbeat_ms = v)
                .is_some(),
            "fill" => match value {
                "pattern" => {
                    cfg.fill = Fill::Pattern;
                    true
                }
                "random" => {
                    cfg.fill = Fill::Random;
                    true
                }
                _ => false,
            },
            "disk" => (!value.is_empty())
                .then(|| cfg.disk = Some(value.to_string()))
                .is_some(),
            "disk_rate" => parse_bounded(value, 0, MAX_DISK_RATE)
                .map(|v| cfg.disk_rate = v)
                .is_some(),
            "disk_blocks" => value
                .parse::<u64>()
                .ok()
                .filter(|v| (1..=MAX_DISK_BLOCKS).contains(v))
                .map(|v| cfg.disk_blocks = Some(v))
                .is_some(),
            "disk_io" => match value {
                "direct" => {
                    cfg.disk_io = DiskIo::Direct;
                    true
                }
                "sync" => {
                    cfg.disk_io = DiskIo::Sync;
                    true
                }
                _ => false,
            },
            _ => {
                warnings.push(format!("unknown key ferry.{key} ignored"));
                continue;
            }
        };
        if !ok {
            warnings.push(format!(
                "bad value {token:?} ignored, keeping the default for ferry.{key}"
            ));
        }
    }
    (cfg, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_ferry_keys() {
        let (cfg, warnings) = parse_cmdline("console=ttyS0 panic=-1 quiet\n");
        assert_eq!(cfg, Config::default());
        assert!(warnings.is_empty());
    }

    #[test]
    fn all_keys() {
        let (cfg, warnings) = parse_cmdline(
            "console=ttyS0 ferry.ip=10.0.2.15/24 ferry.gw=10.0.2.2 ferry.wss=16 ferry.rate=0 \
             ferry.fill=random ferry.hb_ms=20",
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(cfg.ip, Some((Ipv4Addr::new(10, 0, 2, 15), 24)));
        assert_eq!(cfg.gateway, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(cfg.wss_mib, 16);
        assert_eq!(cfg.rate_mib_s, 0);
        assert_eq!(cfg.fill, Fill::Random);
        assert_eq!(cfg.heartbeat_ms, 20);
        assert_eq!(cfg.ip_text(), "10.0.2.15/24");
        assert_eq!(cfg.disk, None);
    }

    #[test]
    fn disk_keys() {
        let (cfg, warnings) = parse_cmdline(
            "ferry.disk=ferry-data ferry.disk_rate=0 ferry.disk_blocks=256 ferry.disk_io=sync",
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(cfg.disk.as_deref(), Some("ferry-data"));
        assert_eq!(
            (cfg.disk_rate, cfg.disk_blocks, cfg.disk_io),
            (0, Some(256), DiskIo::Sync)
        );
        let (cfg, warnings) = parse_cmdline(
            "ferry.disk= ferry.disk_rate=2000000 ferry.disk_blocks=0 ferry.disk_io=odirect",
        );
        assert_eq!(cfg, Config::default());
        assert_eq!(warnings.len(), 4, "{warnings:?}");
    }

    #[test]
    fn bad_values_fall_back_with_warnings() {
        let (cfg, warnings) = parse_cmdline(
            "ferry.ip=10.0.2.300/24 ferry.ip=10.0.0.1/33 ferry.ip ferry.gw=x ferry.wss=0 \
             ferry.wss=-5 ferry.rate=99999 ferry.fill=zeros ferry.hb_ms=0 ferry.bogus=1",
        );
        assert_eq!(cfg, Config::default());
        assert_eq!(warnings.len(), 10, "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("ferry.bogus")));
    }
}
