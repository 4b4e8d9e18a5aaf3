//! The migration settings a QEMU actually has, read back from it.
//!
//! What a job asked for ([`crate::MigrationParams`], or the request's options) is not always
//! what ran: the auto policy changes it, QEMU keeps values of an earlier migration for
//! anything not set again, and a parameter it refused or clamped would go unnoticed. Reading
//! `query-migrate-capabilities` and `query-migrate-parameters` on the source once its stream
//! has started records the truth with the job.

use ferry_qmp::commands::{
    CapabilityState, MigrationParameters, QueryMigrateCapabilities, QueryMigrateParameters,
};
use ferry_qmp::Qmp;
use serde::{Deserialize, Serialize};

use crate::params::UNLIMITED_BYTES_PER_SEC;
use crate::MigrateError;

/// A source QEMU's migration settings as it reported them. Fields are `None` when this QEMU
/// did not report the parameter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuSettings {
    /// The capabilities that are on, by QEMU's name, sorted.
    pub capabilities: Vec<String>,
    /// Bandwidth cap, bytes per second.
    pub max_bandwidth: Option<u64>,
    /// The pause QEMU aims for at switchover, ms.
    pub downtime_limit_ms: Option<u64>,
    /// Parallel streams; they are used only with the `multifd` capability.
    pub multifd_channels: Option<u64>,
    pub multifd_compression: Option<String>,
    /// XBZRLE cache, bytes; used only with the `xbzrle` capability.
    pub xbzrle_cache_bytes: Option<u64>,
    /// Post-copy's background bandwidth, bytes per second (0 = unlimited).
    pub max_postcopy_bandwidth: Option<u64>,
    /// Auto-converge's first throttle, step and ceiling, percent.
    pub cpu_throttle_initial: Option<u64>,
    pub cpu_throttle_increment: Option<u64>,
    pub max_cpu_throttle: Option<u64>,
}

impl QemuSettings {
    /// The settings from QEMU's two replies (pure, so tests can feed recorded replies).
    pub fn from_replies(caps: &[CapabilityState], params: &MigrationParameters) -> QemuSettings {
        let mut capabilities: Vec<String> = caps
            .iter()
            .filter(|c| c.state)
            .map(|c| c.capability.clone())
            .collect();
        capabilities.sort();
        QemuSettings {
            capabilities,
            max_bandwidth: params.max_bandwidth,
            downtime_limit_ms: params.downtime_limit,
            multifd_channels: params.multifd_channels,
            multifd_compression: params.multifd_compression.clone(),
            xbzrle_cache_bytes: params.xbzrle_cache_size,
            max_postcopy_bandwidth: params.max_postcopy_bandwidth,
            cpu_throttle_initial: params.cpu_throttle_initial,
            cpu_throttle_increment: params.cpu_throttle_increment,
            max_cpu_throttle: params.max_cpu_throttle,
        }
    }

    /// Whether capability `name` is on.
    pub fn has(&self, name: &str) -> bool {
        self.capabilities.iter().any(|c| c == name)
    }

    /// One line for people: the pacing first, then what only matters with its capability,
    /// then every capability that is on, e.g. `bandwidth unlimited, pause limit 50 ms,
    /// capabilities auto-converge events pause-before-switchover`.
    pub fn summary(&self) -> String {
        let mib = |b: u64| format!("{} MiB/s", b / (1 << 20));
        let mut parts = Vec::new();
        match self.max_bandwidth {
            Some(b) if b >= UNLIMITED_BYTES_PER_SEC => parts.push("bandwidth unlimited".into()),
            Some(b) => parts.push(format!("bandwidth {}", mib(b))),
            None => {}
        }
        if let Some(d) = self.downtime_limit_ms {
            parts.push(format!("pause limit {d} ms"));
        }
        if self.has("multifd") {
            if let Some(n) = self.multifd_channels {
                parts.push(format!("{n} streams"));
            }
            if let Some(c) = self.multifd_compression.as_deref().filter(|c| *c != "none") {
                parts.push(format!("compression {c}"));
            }
        }
        if self.has("xbzrle") {
            if let Some(c) = self.xbzrle_cache_bytes {
                parts.push(format!("xbzrle cache {} MiB", c / (1 << 20)));
            }
        }
        if self.has("auto-converge") {
            if let (Some(a), Some(s), Some(m)) = (
                self.cpu_throttle_initial,
                self.cpu_throttle_increment,
                self.max_cpu_throttle,
            ) {
                parts.push(format!("throttle {a}% +{s}% up to {m}%"));
            }
        }
        if self.has("postcopy-ram") {
            match self.max_postcopy_bandwidth {
                Some(0) | None => {}
                Some(b) => parts.push(format!("post-copy bandwidth {}", mib(b))),
            }
        }
        if self.capabilities.is_empty() {
            parts.push("no capabilities".into());
        } else {
            parts.push(format!("capabilities {}", self.capabilities.join(" ")));
        }
        parts.join(", ")
    }
}

/// Reads the migration settings of the QEMU behind `qmp`.
pub async fn read(qmp: &Qmp) -> Result<QemuSettings, MigrateError> {
    let caps = qmp.execute(&QueryMigrateCapabilities).await?;
    let params = qmp.execute(&QueryMigrateParameters).await?;
    Ok(QemuSettings::from_replies(&caps, &params))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(json: serde_json::Value) -> MigrationParameters {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn settings_come_from_qemus_replies_not_from_the_request() {
        let caps = [
            CapabilityState::new("xbzrle", false),
            CapabilityState::new("pause-before-switchover", true),
            CapabilityState::new("events", true),
            CapabilityState::new("auto-converge", true),
        ];
        let p = params(serde_json::json!({
            "max-bandwidth": 1u64 << 40, "downtime-limit": 50, "multifd-channels": 2,
            "multifd-compression": "none", "xbzrle-cache-size": 67108864,
            "cpu-throttle-initial": 20, "cpu-throttle-increment": 10, "max-cpu-throttle": 99,
            "max-postcopy-bandwidth": 0, "tls-creds": "", "announce-step": 100,
            "some-future-parameter": true
        }));
        let s = QemuSettings::from_replies(&caps, &p);
        assert_eq!(
            s.capabilities,
            ["auto-converge", "events", "pause-before-switchover"]
        );
        assert_eq!(s.downtime_limit_ms, Some(50));
        assert_eq!(
            s.summary(),
            "bandwidth unlimited, pause limit 50 ms, throttle 20% +10% up to 99%, capabilities \
             auto-converge events pause-before-switchover"
        );
        let back: QemuSettings = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn the_summary_shows_what_the_capabilities_make_matter() {
        let caps = [
            CapabilityState::new("multifd", true),
            CapabilityState::new("xbzrle", true),
            CapabilityState::new("postcopy-ram", true),
        ];
        let p = params(serde_json::json!({
            "max-bandwidth": 104857600, "downtime-limit": 300, "multifd-channels": 4,
            "multifd-compression": "zstd", "xbzrle-cache-size": 33554432,
            "max-postcopy-bandwidth": 52428800
        }));
        assert_eq!(
            QemuSettings::from_replies(&caps, &p).summary(),
            "bandwidth 100 MiB/s, pause limit 300 ms, 4 streams, compression zstd, xbzrle cache \
             32 MiB, post-copy bandwidth 50 MiB/s, capabilities multifd postcopy-ram xbzrle"
        );
        assert_eq!(
            QemuSettings::from_replies(&[], &MigrationParameters::default()).summary(),
            "no capabilities"
        );
    }
}
