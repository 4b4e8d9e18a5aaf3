//! What a migration cost the guest, beyond QEMU's own figures.
//!
//! QEMU reports its pause at switchover, but a guest also lives through auto-converge's vCPU
//! throttle (which can hold it at 99 % for seconds) and through whatever silence its clients
//! see, which is longer than QEMU's pause. [`GuestImpact`] folds the progress samples into
//! the throttle's history, its peak, the time it spent above 50 % and the guest CPU time it
//! took, and keeps what observers outside the guest measured ([`Observation`]), each figure
//! named for what it measures.

use serde::{Deserialize, Serialize};

use crate::progress::{Phase, Progress};

/// The throttle above which a guest is slowed hard enough for its users to notice.
pub const HARD_THROTTLE_PERCENT: u64 = 50;

/// One change of auto-converge's vCPU throttle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThrottleStep {
    /// Milliseconds since the migration started.
    pub at_ms: u64,
    /// The share of each vCPU's time taken away from the guest, from now on.
    pub percent: u64,
}

/// What an observer outside the guest saw during the migration: the longest time without an
/// answer from it, and how many probes it sent and lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    /// Who measured and how, e.g. `lab UDP echo every 5 ms`.
    pub by: String,
    /// The longest gap between two answers, milliseconds.
    pub longest_gap_ms: u64,
    #[serde(default)]
    pub probes_sent: u64,
    #[serde(default)]
    pub probes_lost: u64,
}

/// What a migration cost the guest (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestImpact {
    /// Every change of the vCPU throttle, in order; the last one is back to 0 once the
    /// migration ended with the guest throttled.
    #[serde(default)]
    pub throttle: Vec<ThrottleStep>,
    /// The highest throttle, percent (0: never throttled).
    pub throttle_peak_percent: u64,
    /// How long the throttle was above [`HARD_THROTTLE_PERCENT`], milliseconds.
    pub throttle_above_50_ms: u64,
    /// Guest CPU time the throttle took away, vCPU-milliseconds: each vCPU loses the
    /// throttle's share of its time (estimated from the samples, so as fine as they are).
    pub cpu_lost_ms: u64,
    /// The guest's vCPUs, for `cpu_lost_ms`.
    pub vcpus: u32,
    /// QEMU's pause at switchover (QEMU calls it downtime): from stopping the guest on the
    /// source to starting it on the destination, as QEMU measures it.
    pub qemu_pause_ms: Option<u64>,
    /// What observers outside the guest saw (the lab's echo probe, a ping of the guest's
    /// address); empty when nobody could watch.
    #[serde(default)]
    pub observed: Vec<Observation>,
    /// The last sample folded in: time and throttle, to account the time until the next one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last: Option<(u64, u64)>,
}

impl GuestImpact {
    /// An empty record for a guest with `vcpus` vCPUs.
    pub fn new(vcpus: u32) -> GuestImpact {
        GuestImpact {
            vcpus,
            ..Default::default()
        }
    }

    /// Folds in one progress sample; returns the throttle's new value when it changed. The
    /// throttle seen in a sample is taken to hold until the next one; a completed, failed or
    /// cancelled sample ends it (QEMU drops the throttle when the migration ends).
    pub fn observe(&mut self, p: &Progress) -> Option<ThrottleStep> {
        let ended = matches!(p.phase, Phase::Completed | Phase::Failed | Phase::Cancelled);
        let now = p.elapsed_ms;
        let percent = if ended {
            0
        } else {
            p.cpu_throttle_percent.unwrap_or(0)
        };
        if let Some((at, was)) = self.last {
            let dt = now.saturating_sub(at);
            if was > HARD_THROTTLE_PERCENT {
                self.throttle_above_50_ms += dt;
            }
            self.cpu_lost_ms += dt * was * u64::from(self.vcpus.max(1)) / 100;
        }
        let was = self.last.map_or(0, |(_, was)| was);
        self.last = Some((now, percent));
        if ended {
            if let Some(pause) = p.downtime_ms {
                self.qemu_pause_ms = Some(pause);
            }
        }
        if percent == was {
            return None;
        }
        self.throttle_peak_percent = self.throttle_peak_percent.max(percent);
        let step = ThrottleStep {
            at_ms: now,
            percent,
        };
        self.throttle.push(step);
        Some(step)
    }

    /// Adds what an outside observer saw.
    pub fn add_observation(&mut self, o: Observation) {
        self.observed.retain(|x| x.by != o.by);
        self.observed.push(o);
    }

    /// The longest gap any observer saw.
    pub fn longest_observed_gap_ms(&self) -> Option<u64> {
        self.observed.iter().map(|o| o.longest_gap_ms).max()
    }

    /// One line for logs and `migration show`, each figure named for what it measures.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = self.qemu_pause_ms {
            parts.push(format!("QEMU's pause {p} ms"));
        }
        for o in &self.observed {
            parts.push(format!(
                "longest gap seen by {} {} ms ({} of {} probes lost)",
                o.by, o.longest_gap_ms, o.probes_lost, o.probes_sent
            ));
        }
        if self.throttle_peak_percent == 0 {
            parts.push("vCPUs never throttled".into());
        } else {
            parts.push(format!(
                "vCPU throttle peak {} %, {:.1} s above {} %, about {:.1} vCPU-s of guest CPU taken",
                self.throttle_peak_percent,
                self.throttle_above_50_ms as f64 / 1000.0,
                HARD_THROTTLE_PERCENT,
                self.cpu_lost_ms as f64 / 1000.0
            ));
        }
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(phase: Phase, at: u64, throttle: Option<u64>) -> Progress {
        let mut p = Progress::disk_copy(at, Vec::new(), 0);
        p.phase = phase;
        p.cpu_throttle_percent = throttle;
        p
    }

    #[test]
    fn a_throttled_trace_reports_its_throttle_and_the_cpu_it_took() {
        // A capped, busy guest: auto-converge at 89 % after 2 s, 99 % at 4 s, done at 19 s.
        let mut g = GuestImpact::new(2);
        let mut steps = Vec::new();
        for (at, t) in [(0, None), (1000, None), (2000, Some(89)), (3000, Some(89))] {
            steps.extend(g.observe(&sample(Phase::Precopy, at, t)));
        }
        for at in (4000..19000).step_by(1000) {
            steps.extend(g.observe(&sample(Phase::Precopy, at, Some(99))));
        }
        let mut end = sample(Phase::Completed, 19000, None);
        end.downtime_ms = Some(3);
        steps.extend(g.observe(&end));
        assert_eq!(
            steps,
            vec![
                ThrottleStep {
                    at_ms: 2000,
                    percent: 89
                },
                ThrottleStep {
                    at_ms: 4000,
                    percent: 99
                },
                ThrottleStep {
                    at_ms: 19000,
                    percent: 0
                },
            ]
        );
        assert_eq!(g.throttle_peak_percent, 99);
        assert_eq!(g.throttle_above_50_ms, 17_000);
        // 2 s at 89 % and 15 s at 99 %, on 2 vCPUs.
        assert_eq!(g.cpu_lost_ms, 2 * (2000 * 89 + 15000 * 99) / 100);
        assert_eq!(g.qemu_pause_ms, Some(3));
        let s = g.summary();
        assert!(s.contains("QEMU's pause 3 ms"), "{s}");
        assert!(s.contains("peak 99 %, 17.0 s above 50 %"), "{s}");
        assert!(!s.contains("downtime"), "{s}");
    }

    #[test]
    fn an_unthrottled_trace_says_so_and_observers_are_kept_by_name() {
        let mut g = GuestImpact::new(1);
        assert_eq!(g.observe(&sample(Phase::Precopy, 0, Some(0))), None);
        assert_eq!(g.observe(&sample(Phase::Completed, 500, None)), None);
        assert_eq!((g.throttle_peak_percent, g.cpu_lost_ms), (0, 0));
        g.add_observation(Observation {
            by: "lab UDP echo every 5 ms".into(),
            longest_gap_ms: 90,
            probes_sent: 200,
            probes_lost: 12,
        });
        g.add_observation(Observation {
            by: "lab UDP echo every 5 ms".into(),
            longest_gap_ms: 95,
            probes_sent: 210,
            probes_lost: 13,
        });
        assert_eq!(g.observed.len(), 1);
        assert_eq!(g.longest_observed_gap_ms(), Some(95));
        assert!(g.summary().contains("vCPUs never throttled"));
        assert!(g
            .summary()
            .contains("longest gap seen by lab UDP echo every 5 ms 95 ms"));
    }
}
