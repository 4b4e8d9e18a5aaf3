use std::collections::VecDeque;

use ferry_qmp::commands::{MigrationInfo, MigrationStatus};
use serde::{Deserialize, Serialize};

/// Where a migration is, in the words operators use (QEMU's own states are finer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Setup,
    /// Copying memory while the guest runs, in rounds.
    Precopy,
    /// The guest is paused for the last pages and device state.
    Switchover,
    /// The guest runs on the destination; remaining pages are pulled on demand.
    Postcopy,
    Completed,
    Failed,
    Cancelling,
    Cancelled,
    /// A cold migration copies the disks of a stopped instance (no memory moves).
    DiskCopy,
}

impl Phase {
    pub fn from_status(status: &MigrationStatus) -> Phase {
        match status {
            MigrationStatus::Active => Phase::Precopy,
            MigrationStatus::PreSwitchover | MigrationStatus::Device => Phase::Switchover,
            MigrationStatus::PostcopyActive
            | MigrationStatus::PostcopyPaused
            | MigrationStatus::PostcopyRecover
            | MigrationStatus::PostcopyRecoverSetup => Phase::Postcopy,
            MigrationStatus::Completed => Phase::Completed,
            MigrationStatus::Failed => Phase::Failed,
            MigrationStatus::Cancelling => Phase::Cancelling,
            MigrationStatus::Cancelled => Phase::Cancelled,
            _ => Phase::Setup,
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Setup => "setup",
            Phase::Precopy => "precopy",
            Phase::Switchover => "switchover",
            Phase::Postcopy => "postcopy",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
            Phase::Cancelling => "cancelling",
            Phase::Cancelled => "cancelled",
            Phase::DiskCopy => "disk-copy",
        }
    }
}

/// One progress sample, as shown live and stored with the migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub phase: Phase,
    /// Since the migration command was issued.
    pub elapsed_ms: u64,
    /// Share of guest RAM no longer waiting to be sent; 100 at completion.
    pub percent: f64,
    pub transferred_bytes: u64,
    pub remaining_bytes: u64,
    pub total_bytes: u64,
    /// Dirty-bitmap syncs so far: 1 during the first full pass, +1 per later round.
    pub iteration: u64,
    /// Recent send rate, bytes per second.
    pub throughput_bps: f64,
    /// How fast the guest dirties memory, bytes per second.
    pub dirty_rate_bps: f64,
    /// Time left at the current rates; `None` while the guest dirties as fast as we send.
    pub eta_ms: Option<u64>,
    /// QEMU's estimate of its pause if it switched over now (QEMU's `expected-downtime`).
    #[serde(rename = "expected_qemu_pause_ms", alias = "expected_downtime_ms")]
    pub expected_downtime_ms: Option<u64>,
    /// Set at completion: QEMU's measured total time and pause (QEMU's `downtime`: the guest
    /// stopped on the source until it runs on the destination, as QEMU counts it; what the
    /// guest's users see is longer, see [`crate::GuestImpact`]).
    pub total_time_ms: Option<u64>,
    #[serde(rename = "qemu_pause_ms", alias = "downtime_ms")]
    pub downtime_ms: Option<u64>,
    /// Auto-converge's current vCPU throttle.
    pub cpu_throttle_percent: Option<u64>,
    /// Block migration: each local disk's copy. With disks, `percent` and `eta_ms` weigh
    /// disks and memory by their bytes; the other fields stay memory's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<crate::mirror::DiskProgress>,
    /// The controller's latest prediction of the whole migration, revised at the start of
    /// each round (`eta_ms` then follows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<crate::control::Revision>,
}

impl Progress {
    /// A sample of the disk copy that runs before the memory migration: `mem_total` bytes of
    /// memory wait for it.
    pub fn disk_copy(
        elapsed_ms: u64,
        disks: Vec<crate::mirror::DiskProgress>,
        mem_total: u64,
    ) -> Progress {
        let percent = crate::mirror::overall_percent(&disks, 0, mem_total);
        let rate: f64 = disks.iter().map(|d| d.rate_bps).sum();
        let left: u64 = disks.iter().map(|d| d.remaining_bytes).sum::<u64>() + mem_total;
        Progress {
            phase: Phase::DiskCopy,
            elapsed_ms,
            percent,
            transferred_bytes: 0,
            remaining_bytes: mem_total,
            total_bytes: mem_total,
            iteration: 0,
            throughput_bps: 0.0,
            dirty_rate_bps: 0.0,
            eta_ms: (rate > 0.0).then(|| (left as f64 / rate * 1000.0) as u64),
            expected_downtime_ms: None,
            total_time_ms: None,
            downtime_ms: None,
            cpu_throttle_percent: None,
            disks,
            revision: None,
        }
    }

    /// Adds the disks' state to a memory sample, and weighs the percent by bytes.
    pub fn with_disks(mut self, disks: Vec<crate::mirror::DiskProgress>) -> Progress {
        if disks.is_empty() {
            return self;
        }
        if self.phase != Phase::Completed {
            let done = self.total_bytes.saturating_sub(self.remaining_bytes);
            self.percent = crate::mirror::overall_percent(&disks, done, self.total_bytes);
        }
        self.disks = disks;
        self
    }
}

/// Turns successive `query-migrate` replies into [`Progress`] samples.
///
/// Kept free of I/O and clocks (the caller passes the elapsed time) so it is tested on
/// recorded replies.
#[derive(Debug, Default)]
pub struct ProgressTracker {
    /// (elapsed ms, transferred bytes) over the last second, for the send rate.
    window: VecDeque<(u64, u64)>,
    last: Option<Progress>,
    /// What was left when QEMU first reported the switchover (the guest stopped).
    last_pages: Option<u64>,
}

/// The send rate is averaged over this long: long enough to smooth bursts, short enough to
/// show a bandwidth change within a second.
const RATE_WINDOW_MS: u64 = 1000;

impl ProgressTracker {
    pub fn new() -> ProgressTracker {
        ProgressTracker::default()
    }

    /// What QEMU still had to send when it stopped the guest for the switchover, once it has.
    pub fn last_pages_bytes(&self) -> Option<u64> {
        self.last_pages
    }

    pub fn last(&self) -> Option<&Progress> {
        self.last.as_ref()
    }

    pub fn update(&mut self, elapsed_ms: u64, info: &MigrationInfo) -> Progress {
        let phase = info
            .status
            .as_ref()
            .map(Phase::from_status)
            .unwrap_or(Phase::Setup);
        let ram = info.ram.clone().unwrap_or_default();
        let transferred = ram.transferred.unwrap_or(0);
        let total = ram.total.unwrap_or(0);
        let remaining = if phase == Phase::Completed {
            0
        } else {
            ram.remaining.unwrap_or(total)
        };
        self.window.push_back((elapsed_ms, transferred));
        while self
            .window
            .front()
            .is_some_and(|(t, _)| elapsed_ms.saturating_sub(*t) > RATE_WINDOW_MS)
            && self.window.len() > 2
        {
            self.window.pop_front();
        }
        let throughput_bps = match (self.window.front(), self.window.back()) {
            (Some(&(t0, b0)), Some(&(t1, b1))) if t1 > t0 => {
                b1.saturating_sub(b0) as f64 * 1000.0 / (t1 - t0) as f64
            }
            _ => ram.mbps.unwrap_or(0.0) * 1e6 / 8.0,
        };
        let page_size = ram.page_size.unwrap_or(4096);
        let dirty_rate_bps = ram.dirty_pages_rate.unwrap_or(0) as f64 * page_size as f64;
        let percent = if phase == Phase::Completed {
            100.0
        } else if total == 0 {
            0.0
        } else {
            (100.0 * (total.saturating_sub(remaining)) as f64 / total as f64).clamp(0.0, 100.0)
        };
        let net_rate = throughput_bps - dirty_rate_bps;
        let eta_ms = if phase == Phase::Completed {
            Some(0)
        } else if net_rate > 0.0 && phase == Phase::Precopy {
            Some((remaining as f64 / net_rate * 1000.0) as u64)
        } else {
            None
        };
        let progress = Progress {
            phase,
            elapsed_ms,
            percent,
            transferred_bytes: transferred,
            remaining_bytes: remaining,
            total_bytes: total,
            iteration: ram.dirty_sync_count.unwrap_or(0),
            throughput_bps,
            dirty_rate_bps,
            eta_ms,
            // QEMU stops estimating once it has switched over; the last estimate stays, so
            // that a completed migration can tell how far its pause ran past it
            // (`plan::observed_switchover_ms`, learned per host pair).
            expected_downtime_ms: info.expected_downtime.or_else(|| {
                self.last
                    .as_ref()
                    .and_then(|last| last.expected_downtime_ms)
            }),
            total_time_ms: info.total_time.filter(|_| phase.is_terminal()),
            downtime_ms: info.downtime,
            cpu_throttle_percent: info.cpu_throttle_percentage,
            disks: Vec::new(),
            revision: None,
        };
        if phase == Phase::Switchover && self.last_pages.is_none() {
            self.last_pages = Some(remaining);
        }
        self.last = Some(progress.clone());
        progress
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(json: serde_json::Value) -> MigrationInfo {
        serde_json::from_value(json).unwrap()
    }

    fn active(transferred: u64, remaining: u64, dirty_pages_rate: u64, sync: u64) -> MigrationInfo {
        info(serde_json::json!({
            "status": "active", "expected-downtime": 40, "total-time": 500,
            "ram": {"transferred": transferred, "remaining": remaining, "total": 1_000_000_000_u64,
                    "duplicate": 0, "normal": 0, "normal-bytes": 0, "skipped": 0,
                    "dirty-pages-rate": dirty_pages_rate, "mbps": 800.0, "dirty-sync-count": sync,
                    "postcopy-requests": 0, "page-size": 4096, "multifd-bytes": 0,
                    "pages-per-second": 0, "precopy-bytes": 0, "downtime-bytes": 0,
                    "postcopy-bytes": 0, "dirty-sync-missed-zero-copy": 0}
        }))
    }

    #[test]
    fn first_sample_uses_qemus_rate_then_the_window() {
        let mut t = ProgressTracker::new();
        let p = t.update(250, &active(0, 1_000_000_000, 0, 1));
        assert_eq!(p.phase, Phase::Precopy);
        assert_eq!(p.throughput_bps, 100e6);
        assert_eq!(p.percent, 0.0);
        let p = t.update(750, &active(100_000_000, 500_000_000, 0, 1));
        assert_eq!(p.throughput_bps, 200e6);
        assert_eq!(p.percent, 50.0);
        assert_eq!(p.eta_ms, Some(2500));
        assert_eq!(p.expected_downtime_ms, Some(40));
        assert_eq!(p.total_time_ms, None, "total time is only final at the end");
    }

    #[test]
    fn no_eta_while_the_guest_dirties_faster_than_we_send() {
        let mut t = ProgressTracker::new();
        t.update(0, &active(0, 500_000_000, 0, 1));
        // 100 MB/s sent, 50000 pages/s * 4 KiB = 204.8 MB/s dirtied.
        let p = t.update(1000, &active(100_000_000, 400_000_000, 50_000, 3));
        assert_eq!(p.iteration, 3);
        assert!(p.dirty_rate_bps > p.throughput_bps);
        assert_eq!(p.eta_ms, None);
    }

    #[test]
    fn completion_reports_qemus_final_numbers() {
        let mut t = ProgressTracker::new();
        let done = info(serde_json::json!({
            "status": "completed", "total-time": 412, "downtime": 11, "setup-time": 3,
            "ram": {"transferred": 300_000_000u64, "remaining": 0, "total": 536_870_912u64,
                    "mbps": 1700.5, "dirty-sync-count": 4, "page-size": 4096}
        }));
        let p = t.update(420, &done);
        assert_eq!(p.phase, Phase::Completed);
        assert_eq!(p.percent, 100.0);
        assert_eq!(p.total_time_ms, Some(412));
        assert_eq!(p.downtime_ms, Some(11));
        assert_eq!(p.eta_ms, Some(0));
    }

    #[test]
    fn unknown_or_missing_fields_do_not_break_sampling() {
        let mut t = ProgressTracker::new();
        let p = t.update(10, &info(serde_json::json!({"status": "setup"})));
        assert_eq!(p.phase, Phase::Setup);
        assert_eq!(p.percent, 0.0);
        let p = t.update(
            20,
            &info(serde_json::json!({"status": "some-future-state", "ram": {}})),
        );
        assert_eq!(p.phase, Phase::Setup);
    }

    #[test]
    fn the_rate_window_forgets_old_samples() {
        let mut t = ProgressTracker::new();
        t.update(0, &active(0, 900_000_000, 0, 1));
        t.update(500, &active(500_000_000, 500_000_000, 0, 1));
        // Rate drops to 100 MB/s; after more than a second only the slow samples count.
        t.update(1500, &active(600_000_000, 400_000_000, 0, 2));
        let p = t.update(2500, &active(700_000_000, 300_000_000, 0, 3));
        assert!(
            (p.throughput_bps - 100e6).abs() < 1.0,
            "{}",
            p.throughput_bps
        );
    }
}
