use std::time::Duration;

use ferry_qmp::commands::{CapabilityState, MigrateSetParameters};
use serde::{Deserialize, Serialize};

use crate::control::{ControlPolicy, TimeoutAction};
use crate::MigrateError;

/// When and how often the destination announces the guest's MAC (RARP) after switchover, so
/// switches learn where it went. Until then replies to the guest go to the old port: QEMU's
/// 50 ms first delay is 50 ms of extra outage as the guest's peers see it. Not shortened by
/// default: in the lab (TCG, QEMU 10) announcing at once ([`Announce::PROMPT`]) made no
/// measurable difference, 113-214 ms against 129-177 ms guest-observed over four demo runs
/// each, because the destination's TCG warm-up dominates. (On QEMU 7.2 it seemed to break
/// guests; that was 7.2's TCG dirty-tracking bug, see the `dirty-tracking` pre-flight check.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    pub initial_ms: u64,
    pub max_ms: u64,
    pub rounds: u64,
    pub step_ms: u64,
}

impl Announce {
    /// Announce at once, then a few times quickly (opt-in; see above).
    pub const PROMPT: Announce = Announce {
        initial_ms: 0,
        max_ms: 100,
        rounds: 5,
        step_ms: 25,
    };
}

/// A migration bandwidth cap.
///
/// `Unlimited` is set explicitly on QEMU: its own default silently caps a migration at
/// 128 MiB/s, which on a fast link turns a sub-second migration into a long one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bandwidth {
    #[default]
    Unlimited,
    /// Bytes per second.
    Limited(u64),
}

/// What QEMU is told for `Unlimited`: 1 TiB/s, far above any link, and far below the values
/// that overflow QEMU's rate arithmetic.
pub const UNLIMITED_BYTES_PER_SEC: u64 = 1 << 40;

impl Bandwidth {
    pub fn bytes_per_sec(self) -> u64 {
        match self {
            Bandwidth::Unlimited => UNLIMITED_BYTES_PER_SEC,
            Bandwidth::Limited(b) => b,
        }
    }
}

/// An inclusive range of TCP ports a destination may listen on for migration streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl Default for PortRange {
    /// 49152-49215, the range libvirt uses as well, so firewalls already opened for it work.
    fn default() -> Self {
        PortRange {
            first: 49152,
            last: 49215,
        }
    }
}

impl std::str::FromStr for PortRange {
    type Err = MigrateError;
    fn from_str(s: &str) -> Result<Self, MigrateError> {
        let bad =
            || MigrateError::InvalidParams(format!("port range '{s}' must look like 49152-49215"));
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let first: u16 = a.trim().parse().map_err(|_| bad())?;
        let last: u16 = b.trim().parse().map_err(|_| bad())?;
        if first == 0 || last < first {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }
}

/// The per-migration settings, mapped onto QEMU capabilities and parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationParams {
    pub bandwidth: Bandwidth,
    /// The pause QEMU aims for at switchover. QEMU's default is 300 ms.
    pub downtime_limit_ms: u64,
    pub auto_converge: bool,
    pub postcopy: bool,
    /// Post-copy's page requests travel on a channel of their own (QEMU's `postcopy-preempt`)
    /// instead of queueing behind the background stream: on a link the stream fills, a guest
    /// on the destination otherwise waits for every page it touches behind megabytes already
    /// queued. Needs `postcopy`.
    #[serde(default)]
    pub postcopy_preempt: bool,
    /// Parallel streams (multifd); `None` means one stream.
    pub multifd_channels: Option<u8>,
    /// Compression of multifd streams (`zstd`, `zlib`); needs `multifd_channels`.
    pub multifd_compression: Option<String>,
    pub port_range: PortRange,
    /// How often progress is sampled from the source.
    pub sample_interval: Duration,
    /// The completion budget: past it the controller applies `timeout_action`.
    pub completion_timeout: Option<Duration>,
    #[serde(default)]
    pub timeout_action: TimeoutAction,
    /// Bandwidth of post-copy's background stream in bytes per second (pages the destination
    /// asks for jump the queue); `None` is unlimited.
    #[serde(default)]
    pub postcopy_bandwidth: Option<u64>,
    /// XBZRLE delta compression of re-sent pages with this cache size; `None` is off.
    #[serde(default)]
    pub xbzrle_cache_bytes: Option<u64>,
    /// Auto-converge's first throttle, its step and its ceiling, in percent.
    #[serde(default = "default_throttle_initial")]
    pub throttle_initial_pct: u8,
    #[serde(default = "default_throttle_increment")]
    pub throttle_increment_pct: u8,
    #[serde(default = "default_max_throttle")]
    pub max_throttle_pct: u8,
    /// MAC announcements after switchover; `None` keeps QEMU's defaults.
    #[serde(default)]
    pub announce: Option<Announce>,
    /// How the running migration is steered (see [`crate::control`]).
    #[serde(default = "default_policy")]
    pub policy: ControlPolicy,
    /// Also migrate a source guest that is paused, instead of refusing it: the benchmark
    /// moves a paused guest to learn what QEMU can send when no guest CPU competes with it.
    /// The guest runs on the destination afterwards, as after any migration.
    #[serde(default)]
    pub allow_paused_source: bool,
}

fn default_throttle_initial() -> u8 {
    20
}
fn default_throttle_increment() -> u8 {
    10
}
fn default_max_throttle() -> u8 {
    99
}
fn default_policy() -> ControlPolicy {
    ControlPolicy::Fixed
}

impl Default for MigrationParams {
    fn default() -> Self {
        MigrationParams {
            bandwidth: Bandwidth::Unlimited,
            downtime_limit_ms: 300,
            auto_converge: false,
            postcopy: false,
            postcopy_preempt: false,
            multifd_channels: None,
            multifd_compression: None,
            port_range: PortRange::default(),
            sample_interval: Duration::from_millis(250),
            completion_timeout: None,
            timeout_action: TimeoutAction::Abort,
            postcopy_bandwidth: None,
            xbzrle_cache_bytes: None,
            throttle_initial_pct: default_throttle_initial(),
            throttle_increment_pct: default_throttle_increment(),
            max_throttle_pct: default_max_throttle(),
            announce: None,
            policy: ControlPolicy::Fixed,
            allow_paused_source: false,
        }
    }
}

impl MigrationParams {
    /// Rejects values QEMU would refuse, or that are almost surely a mistake, before anything
    /// starts.
    pub fn validate(&self) -> Result<(), MigrateError> {
        let bad = |m: String| Err(MigrateError::InvalidParams(m));
        if let Bandwidth::Limited(b) = self.bandwidth {
            if b < 1 << 20 {
                return bad(format!("bandwidth {b} B/s is below 1 MiB/s"));
            }
        }
        if self.downtime_limit_ms == 0 || self.downtime_limit_ms > 60_000 {
            return bad(format!(
                "downtime target {} ms must be between 1 and 60000 ms",
                self.downtime_limit_ms
            ));
        }
        if let Some(n) = self.multifd_channels {
            if n == 0 || n > 64 {
                return bad(format!("{n} multifd channels must be between 1 and 64"));
            }
        }
        if let Some(c) = &self.multifd_compression {
            if self.multifd_channels.is_none() || !matches!(c.as_str(), "none" | "zlib" | "zstd") {
                return bad(format!(
                    "compression '{c}' needs multifd channels and one of none, zlib, zstd"
                ));
            }
        }
        for (name, pct) in [
            ("initial throttle", self.throttle_initial_pct),
            ("throttle increment", self.throttle_increment_pct),
            ("maximum throttle", self.max_throttle_pct),
        ] {
            if !(1..=99).contains(&pct) {
                return bad(format!("{name} {pct} % must be between 1 and 99"));
            }
        }
        if let Some(c) = self.xbzrle_cache_bytes {
            if c < 1 << 20 {
                return bad(format!("XBZRLE cache of {c} bytes is below 1 MiB"));
            }
        }
        if self.postcopy && self.multifd_channels.is_some() {
            // QEMU 10.0 refuses the post-copy capability beside multifd ("Postcopy is not
            // yet compatible with multifd") only when the source starts; saying so at the
            // request keeps the user from a job that fails after its checks.
            return bad(
                "post-copy cannot be combined with parallel streams or compression (QEMU sends post-copy on one stream)"
                    .into(),
            );
        }
        if self.postcopy_preempt && !self.postcopy {
            return bad("post-copy preemption needs post-copy permitted".into());
        }
        if self.timeout_action == TimeoutAction::Postcopy && !self.postcopy {
            return bad("timeout action post-copy needs post-copy permitted".into());
        }
        if self.sample_interval.is_zero() || self.sample_interval > Duration::from_millis(500) {
            return bad("progress sample interval must be between 1 and 500 ms".into());
        }
        Ok(())
    }

    /// Capabilities; both sides must be given the same set before the stream starts.
    pub fn capabilities(&self) -> Vec<CapabilityState> {
        let cap = |name: &str, state: bool| CapabilityState {
            capability: name.to_string(),
            state,
        };
        let mut caps = vec![
            cap("events", true),
            cap("auto-converge", self.auto_converge),
            cap("postcopy-ram", self.postcopy),
            cap("multifd", self.multifd_channels.is_some()),
            cap("xbzrle", self.xbzrle_cache_bytes.is_some()),
            // The destination opens shared disks for writing (takes their locks) only when
            // Ferry starts it after the commit, never when the stream ends: until then the
            // source may still be resumed. Without effect on the source.
            cap("late-block-activate", true),
        ];
        // Only named when on: QEMUs before 7.1 do not know it.
        if self.postcopy_preempt {
            caps.push(cap("postcopy-preempt", true));
        }
        caps
    }

    /// Parameters both sides need to agree on (stream layout).
    pub fn shared_parameters(&self) -> MigrateSetParameters {
        let a = self.announce;
        MigrateSetParameters {
            multifd_channels: self.multifd_channels.map(u64::from),
            multifd_compression: self.multifd_compression.clone(),
            announce_initial: a.map(|a| a.initial_ms),
            announce_max: a.map(|a| a.max_ms),
            announce_rounds: a.map(|a| a.rounds),
            announce_step: a.map(|a| a.step_ms),
            ..Default::default()
        }
    }

    /// Parameters only the source uses (pacing).
    pub fn source_parameters(&self) -> MigrateSetParameters {
        MigrateSetParameters {
            max_bandwidth: Some(self.bandwidth.bytes_per_sec()),
            downtime_limit: Some(self.downtime_limit_ms),
            xbzrle_cache_size: self.xbzrle_cache_bytes,
            max_postcopy_bandwidth: self.postcopy_bandwidth,
            cpu_throttle_initial: Some(self.throttle_initial_pct.into()),
            cpu_throttle_increment: Some(self.throttle_increment_pct.into()),
            max_cpu_throttle: Some(self.max_throttle_pct.into()),
            ..self.shared_parameters()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_unlimited_is_explicit() {
        let p = MigrationParams::default();
        p.validate().unwrap();
        let sp = p.source_parameters();
        assert_eq!(sp.max_bandwidth, Some(UNLIMITED_BYTES_PER_SEC));
        assert_eq!(sp.downtime_limit, Some(300));
    }

    #[test]
    fn invalid_values_are_refused_with_the_value_named() {
        let cases = [
            MigrationParams {
                downtime_limit_ms: 0,
                ..Default::default()
            },
            MigrationParams {
                bandwidth: Bandwidth::Limited(10),
                ..Default::default()
            },
            MigrationParams {
                multifd_channels: Some(0),
                ..Default::default()
            },
            MigrationParams {
                sample_interval: Duration::from_secs(2),
                ..Default::default()
            },
            MigrationParams {
                max_throttle_pct: 100,
                ..Default::default()
            },
            MigrationParams {
                timeout_action: TimeoutAction::Postcopy,
                ..Default::default()
            },
            MigrationParams {
                postcopy: true,
                multifd_channels: Some(2),
                ..Default::default()
            },
        ];
        for p in cases {
            let e = p.validate().unwrap_err();
            assert_eq!(e.code(), "invalid-migration-params", "{e}");
        }
    }

    #[test]
    fn port_range_parses() {
        assert_eq!(
            "49152-49215".parse::<PortRange>().unwrap(),
            PortRange::default()
        );
        assert_eq!(
            "5000".parse::<PortRange>().unwrap(),
            PortRange {
                first: 5000,
                last: 5000
            }
        );
        assert!("9-3".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("a-b".parse::<PortRange>().is_err());
    }

    #[test]
    fn capabilities_follow_options() {
        let p = MigrationParams {
            auto_converge: true,
            multifd_channels: Some(2),
            ..Default::default()
        };
        let on: Vec<_> = p
            .capabilities()
            .into_iter()
            .filter(|c| c.state)
            .map(|c| c.capability)
            .collect();
        assert_eq!(
            on,
            ["events", "auto-converge", "multifd", "late-block-activate"]
        );
        assert_eq!(p.shared_parameters().multifd_channels, Some(2));
        let p = MigrationParams {
            xbzrle_cache_bytes: Some(64 << 20),
            ..Default::default()
        };
        assert!(p
            .capabilities()
            .iter()
            .any(|c| c.capability == "xbzrle" && c.state));
        assert_eq!(p.source_parameters().xbzrle_cache_size, Some(64 << 20));
        assert!(
            !p.capabilities()
                .iter()
                .any(|c| c.capability == "postcopy-preempt"),
            "not named when off"
        );
        let p = MigrationParams {
            postcopy: true,
            postcopy_preempt: true,
            ..Default::default()
        };
        p.validate().unwrap();
        assert!(p
            .capabilities()
            .iter()
            .any(|c| c.capability == "postcopy-preempt" && c.state));
        let p = MigrationParams {
            postcopy_preempt: true,
            ..Default::default()
        };
        assert!(p.validate().is_err(), "preemption without post-copy");
    }
}
