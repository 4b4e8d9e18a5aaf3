//! The "auto" policy: predict a migration from measured numbers and choose its strategy.
//!
//! Before the stream starts we know the guest's RAM, its dirty rate (QEMU's `calc-dirty-rate`)
//! and the link bandwidth (the pre-flight probe). The classic pre-copy model then says how
//! many rounds it takes, how long, what the final pause is, and whether it converges at all.
//! From that the planner picks the options an expert would: parallel streams when one stream
//! cannot fill the link, the auto-converge throttle armed for a guest that may outrun the link,
//! XBZRLE with a cache sized from the dirty working set on a slow link, post-copy as the last
//! resort only when permitted, and a completion budget. The prediction is shown to the
//! operator before and during the run; the [`crate::control::Controller`] corrects course when
//! the guest does not behave as measured.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::control::{ControlPolicy, EscalateConfig, TimeoutAction};
use crate::MigrationParams;

/// What one QEMU migration thread sends at most on a typical host, bytes per second. Beyond
/// this the stream is CPU-bound and parallel (multifd) channels help.
pub const SINGLE_STREAM_BPS: f64 = 1.0e9;
/// Assumed when no probe measured the link (10 Gbit/s).
pub const DEFAULT_LINK_BPS: f64 = 1.25e9;
/// The first downtime target under auto, and where escalation stops unless the user set one.
pub const AUTO_DOWNTIME_MS: u64 = 50;
pub const AUTO_DOWNTIME_CAP_MS: u64 = 500;
/// The share of the link a throttled guest is slowed to at once. Not lower: every step up
/// costs the guest (QEMU sleeps a vCPU at p % for p/(100-p) x 10 ms of every 10 ms it runs,
/// 990 ms at 99 %). Measured in the lab at 100 and 200 % writers: starting at a third of the
/// link gave 2-74 ms pauses but 1.1-2.0 s gaps in the guest's network replies; at half, 2-15 ms
/// pauses and 0.3-0.4 s gaps.
const THROTTLE_TARGET_SHARE: f64 = 0.5;
/// While auto-converge still throttles harder, the pause stops here (the guest-observed
/// downtime target).
pub const AUTO_SOFT_CAP_MS: u64 = 100;
/// Default completion budget: this much per GiB of RAM, at least `BUDGET_MIN`, and at least
/// three times the predicted copy time of all of RAM.
pub const BUDGET_PER_GIB: Duration = Duration::from_secs(60);
pub const BUDGET_MIN: Duration = Duration::from_secs(30);
/// Pre-copy is called convergent only with this margin: dirty rate below 80 % of the rate.
const CONVERGENCE_MARGIN: f64 = 0.8;
/// XBZRLE pays off only when bandwidth, not CPU, is scarce.
const XBZRLE_BELOW_BPS: f64 = 0.3e9;
const MAX_ROUNDS: u32 = 30;

/// The measured inputs of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanInputs {
    pub ram_bytes: u64,
    /// Bytes of distinct pages the guest dirties per second; `None` if not measured.
    pub dirty_rate_bps: Option<f64>,
    /// Link throughput from the pre-flight probe; `None` if not measured.
    pub link_bps: Option<f64>,
    /// CPUs of the source host (bounds the parallel channels).
    pub host_cpus: u32,
    /// The guest's vCPUs: a guest that dirties memory keeps them busy, an idle one leaves its
    /// cores to the migration's threads.
    #[serde(default = "one_vcpu")]
    pub guest_vcpus: u32,
    /// The user's downtime target, if they set one (then it is also the cap).
    pub downtime_ms: Option<u64>,
    pub postcopy_permitted: bool,
    /// The user's completion budget, if they set one.
    pub budget: Option<Duration>,
    /// Multiplies the per-GiB part of the default budget: 1 in production; the lab benchmark
    /// scales every platform's per-GiB budgets alike.
    pub budget_scale: f64,
    pub timeout_action: TimeoutAction,
    /// Block migration: the data the local disks hold, copied before the memory. The budget
    /// and the predicted time cover it too.
    #[serde(default)]
    pub disk_bytes: u64,
}

fn one_vcpu() -> u32 {
    1
}

/// Below this dirty rate a guest counts as idle: its vCPUs leave their cores to the
/// migration's sending threads.
const IDLE_DIRTY_BPS: f64 = 4.0 * 1048576.0;

/// What the model expects of the chosen strategy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Plain pre-copy reaches the downtime target without help.
    pub converges: bool,
    /// Predicted time to completion; `None` if the model sees no end without escalation.
    pub total_ms: Option<u64>,
    /// Predicted pause at switchover.
    pub downtime_ms: u64,
    pub rounds: u32,
    /// Effective send rate assumed, bytes per second.
    pub rate_bps: f64,
    pub dirty_rate_bps: f64,
    pub budget_ms: u64,
}

/// The chosen strategy, its prediction and the reasons, as logged and shown to the user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub strategy: Vec<String>,
    pub prediction: Prediction,
    pub reasons: Vec<String>,
}

/// Pre-copy rounds under the classic model: round `i` sends what was dirtied during round
/// `i-1`. Returns (rounds, total seconds, final pause seconds) once the remaining set fits
/// the downtime target, or `None` if it never does.
pub fn precopy_model(
    ram_bytes: f64,
    rate_bps: f64,
    dirty_bps: f64,
    downtime_s: f64,
) -> Option<(u32, f64, f64)> {
    if rate_bps <= 0.0 {
        return None;
    }
    let mut remaining = ram_bytes;
    let mut total = 0.0;
    for round in 1..=MAX_ROUNDS {
        let t = remaining / rate_bps;
        if t <= downtime_s {
            return Some((round, total + t, t));
        }
        total += t;
        let next = (dirty_bps * t).min(ram_bytes);
        if next >= remaining * 0.98 {
            return None;
        }
        remaining = next;
    }
    None
}

/// The default completion budget: [`BUDGET_PER_GIB`] of RAM, at least [`BUDGET_MIN`], both
/// multiplied by `scale` (1 in production; the lab benchmark scales every platform's budgets
/// alike), and never less than `copies` times copying all of RAM once at `rate_bps`: 3 for a
/// guest that converges, 8 for one that must be throttled (the first pass, the two rounds QEMU
/// waits before throttling, and the rounds that shrink once it does; measured in the lab, a
/// guest writing at link speed needed 6-7).
pub fn default_budget(ram_bytes: u64, rate_bps: f64, scale: f64, copies: f64) -> Duration {
    let per_gib = BUDGET_PER_GIB.as_secs_f64() * ram_bytes as f64 / (1u64 << 30) as f64;
    let rule = per_gib.max(BUDGET_MIN.as_secs_f64()) * scale;
    let copy_all = ram_bytes as f64 / rate_bps.max(1.0);
    Duration::from_millis((rule.max(copies * copy_all) * 1000.0) as u64)
}

/// How many full copies of RAM the default budget allows (see [`default_budget`]).
fn budget_copies(converges: bool) -> f64 {
    if converges {
        3.0
    } else {
        8.0
    }
}

/// Chooses the parameters for a migration under the auto policy, starting from `base` (the
/// port range, sampling and any explicit choices stay).
pub fn plan(inputs: &PlanInputs, base: &MigrationParams) -> (MigrationParams, Plan) {
    let mut p = base.clone();
    let mut strategy = Vec::new();
    let mut reasons = Vec::new();
    let mib = |b: f64| b / 1048576.0;

    let link = inputs.link_bps.unwrap_or_else(|| {
        reasons.push(format!(
            "link not measured; assuming {:.0} MiB/s",
            mib(DEFAULT_LINK_BPS)
        ));
        DEFAULT_LINK_BPS
    });
    // A cap the user set is the link as far as this migration is concerned.
    let link = match base.bandwidth {
        crate::Bandwidth::Limited(cap) if (cap as f64) < link => {
            reasons.push(format!("bandwidth capped at {:.0} MiB/s", mib(cap as f64)));
            cap as f64
        }
        _ => link,
    };
    let dirty = inputs.dirty_rate_bps.unwrap_or_else(|| {
        reasons.push("dirty rate not measured; assuming an idle guest".into());
        0.0
    });

    // Parallel channels when one stream cannot fill the link, and only as many as the host has
    // cores to spare: each channel is a sending thread, and a busy guest's vCPUs need their
    // cores (measured in the lab, QEMU 10, idle 512 MiB guest on 2 cores: 5.7 Gbit/s with one
    // stream, 7.4 with two multifd channels).
    let busy_vcpus = if dirty >= IDLE_DIRTY_BPS {
        inputs.guest_vcpus
    } else {
        0
    };
    let spare_cores = inputs.host_cpus.saturating_sub(busy_vcpus).clamp(1, 4);
    let channels = ((link / SINGLE_STREAM_BPS).ceil() as u32).clamp(1, spare_cores);
    let rate = link.min(SINGLE_STREAM_BPS * channels as f64);
    if channels > 1 && p.multifd_channels.is_none() {
        p.multifd_channels = Some(channels as u8);
        strategy.push(format!("multifd x{channels}"));
        reasons.push(format!(
            "link {:.0} MiB/s is more than one stream sends (~{:.0} MiB/s): {channels} parallel channels",
            mib(link),
            mib(SINGLE_STREAM_BPS)
        ));
    }

    let (start_ms, cap_ms) = match inputs.downtime_ms {
        Some(ms) => (ms.min(AUTO_DOWNTIME_MS), ms),
        None => (AUTO_DOWNTIME_MS, AUTO_DOWNTIME_CAP_MS),
    };
    p.downtime_limit_ms = start_ms;
    let ram = inputs.ram_bytes as f64;
    let at_start = precopy_model(ram, rate, dirty, start_ms as f64 / 1000.0);
    let at_cap = precopy_model(ram, rate, dirty, cap_ms as f64 / 1000.0);
    let converges = dirty < rate * CONVERGENCE_MARGIN && at_start.is_some();
    reasons.push(format!(
        "guest dirties {:.1} MiB/s against {:.1} MiB/s of sending ({:.0} %)",
        mib(dirty),
        mib(rate),
        100.0 * dirty / rate
    ));

    let mut escalate = EscalateConfig {
        downtime_cap_ms: cap_ms,
        postcopy: inputs.postcopy_permitted,
        link_bps: Some(rate),
        ..Default::default()
    };
    // Throttling is only for a guest that would otherwise never finish: it takes the guest's
    // CPU time away for the rest of the copy (at 80 % QEMU sleeps the vCPU 40 ms of every
    // 50). Auto-converge cannot be switched on once the stream runs, so the plan decides here.
    if !converges && dirty >= rate * CONVERGENCE_MARGIN {
        p.auto_converge = true;
        // QEMU throttles only after two rounds that dirtied more than half of what they sent;
        // by then the guest must slow to well below the rate at once: to half of it, assuming
        // its writing scales with its CPU time. The ceiling is at the top, so there
        // is nothing for the controller to raise.
        let needed = (100.0 * (1.0 - THROTTLE_TARGET_SHARE * rate / dirty)).clamp(20.0, 99.0) as u8;
        p.throttle_initial_pct = needed;
        p.throttle_increment_pct = 20;
        p.max_throttle_pct = 99;
        if inputs.downtime_ms.is_none() {
            escalate.soft_cap_ms = Some(AUTO_SOFT_CAP_MS);
            reasons.push(format!(
                "while the throttle rises the pause stays at most {AUTO_SOFT_CAP_MS} ms; up to {cap_ms} ms once it stops rising"
            ));
        }
        strategy.push(format!("auto-converge from {needed} %"));
        reasons.push(format!(
            "to send faster than it writes, the guest's vCPUs start throttled at {needed} % once QEMU sees two rounds not converge"
        ));
    }
    if !converges {
        reasons.push(match at_cap {
            Some(_) => format!(
                "plain pre-copy reaches {start_ms} ms only by raising the target toward {cap_ms} ms"
            ),
            None => format!(
                "plain pre-copy does not converge even at {cap_ms} ms: the controller will throttle{}",
                if inputs.postcopy_permitted { " and then switch to post-copy" } else { "" }
            ),
        });
        // Delta compression tips a marginal case (the guest writes nearly as fast as the link)
        // when pages change little; a guest writing faster than the link needs throttling.
        if rate < XBZRLE_BELOW_BPS && p.multifd_channels.is_none() && dirty > 0.0 && dirty < rate {
            // The working set re-sent each round is what the guest dirties in about a second.
            let working_set = dirty.clamp(16.0 * 1048576.0, ram / 4.0);
            let cache = (working_set as u64)
                .next_power_of_two()
                .min(inputs.ram_bytes / 2);
            p.xbzrle_cache_bytes = Some(cache);
            strategy.push(format!("xbzrle cache {:.0} MiB", mib(cache as f64)));
            reasons.push(format!(
                "slow link: re-sent pages delta-compressed against a {:.0} MiB cache (dirty working set ~{:.0} MiB)",
                mib(cache as f64),
                mib(working_set)
            ));
        }
    }
    if inputs.postcopy_permitted {
        p.postcopy = true;
        strategy.push("post-copy permitted".into());
    }
    p.policy = ControlPolicy::Escalate(escalate);
    strategy.push(format!("pause limit {start_ms} ms, up to {cap_ms} ms"));

    // Local disks are copied first, at about the rate memory goes: three times that long.
    let disk_s = inputs.disk_bytes as f64 / rate.max(1.0);
    if inputs.disk_bytes > 0 {
        strategy.push(format!(
            "copy {:.1} MiB of local disks first",
            inputs.disk_bytes as f64 / 1048576.0
        ));
    }
    let budget = inputs.budget.unwrap_or_else(|| {
        default_budget(
            inputs.ram_bytes,
            rate,
            inputs.budget_scale,
            budget_copies(converges),
        ) + Duration::from_secs_f64(3.0 * disk_s)
    });
    p.completion_timeout = Some(budget);
    p.timeout_action = if inputs.postcopy_permitted {
        inputs.timeout_action
    } else {
        TimeoutAction::Abort
    };
    strategy.push(format!(
        "budget {:.0} s, then {}",
        budget.as_secs_f64(),
        match p.timeout_action {
            TimeoutAction::Abort => "abort",
            TimeoutAction::Postcopy => "post-copy",
        }
    ));

    let chosen = at_start.or(at_cap);
    let prediction = Prediction {
        converges,
        total_ms: chosen.map(|(_, total, _)| ((total + disk_s) * 1000.0) as u64),
        downtime_ms: chosen
            .map(|(_, _, pause)| (pause * 1000.0).ceil() as u64)
            .unwrap_or(cap_ms),
        rounds: chosen.map(|(rounds, _, _)| rounds).unwrap_or(MAX_ROUNDS),
        rate_bps: rate,
        dirty_rate_bps: dirty,
        budget_ms: budget.as_millis() as u64,
    };
    (
        p,
        Plan {
            strategy,
            prediction,
            reasons,
        },
    )
}

impl Plan {
    /// One line for logs and the CLI.
    pub fn summary(&self) -> String {
        let p = &self.prediction;
        let total = p
            .total_ms
            .map(|t| format!("{:.1} s", t as f64 / 1000.0))
            .unwrap_or_else(|| "no end without escalation".into());
        format!(
            "plan: {}; predicted {total}, {} ms pause, {} rounds{}",
            self.strategy.join(", "),
            p.downtime_ms,
            p.rounds,
            if p.converges {
                ""
            } else {
                " (does not converge on its own)"
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn inputs(dirty_mib: f64, link_mib: f64) -> PlanInputs {
        PlanInputs {
            ram_bytes: 2 * GIB,
            dirty_rate_bps: Some(dirty_mib * 1048576.0),
            link_bps: Some(link_mib * 1048576.0),
            host_cpus: 8,
            guest_vcpus: 2,
            downtime_ms: None,
            postcopy_permitted: false,
            budget: None,
            budget_scale: 1.0,
            timeout_action: TimeoutAction::Abort,
            disk_bytes: 0,
        }
    }

    #[test]
    fn the_model_matches_the_geometric_series() {
        // 1000 MB at 100 MB/s with 50 MB/s dirtied: 10 s, 5 s, 2.5 s, ... until a round fits
        // 300 ms: 10+5+2.5+1.25+0.625+0.3125 then 0.156 s of pause.
        let (rounds, total, pause) = precopy_model(1e9, 1e8, 5e7, 0.3).unwrap();
        assert_eq!(rounds, 7);
        assert!((pause - 0.15625).abs() < 1e-9);
        assert!((total - 19.84375).abs() < 1e-6, "{total}");
        assert!(precopy_model(1e9, 1e8, 1.1e8, 0.3).is_none());
        assert!(precopy_model(1e9, 0.0, 0.0, 0.3).is_none());
    }

    #[test]
    fn an_idle_guest_on_a_fast_link_gets_parallel_channels_and_a_tight_pause() {
        let (p, plan) = plan(&inputs(0.0, 2500.0), &MigrationParams::default());
        assert_eq!(p.multifd_channels, Some(3));
        assert!(!p.auto_converge, "nothing to throttle");
        assert_eq!(p.downtime_limit_ms, AUTO_DOWNTIME_MS);
        assert!(plan.prediction.converges);
        assert_eq!(plan.prediction.rounds, 2);
        assert_eq!(p.timeout_action, TimeoutAction::Abort);
        // 2 GiB: the per-GiB rule gives 120 s.
        assert_eq!(p.completion_timeout, Some(Duration::from_secs(120)));
        assert!(
            plan.summary().starts_with("plan: multifd x3"),
            "{}",
            plan.summary()
        );
    }

    #[test]
    fn a_guest_faster_than_the_link_is_armed_and_escalated() {
        let mut i = inputs(2000.0, 1000.0);
        i.postcopy_permitted = true;
        i.timeout_action = TimeoutAction::Postcopy;
        let (p, plan) = plan(&i, &MigrationParams::default());
        assert!(!plan.prediction.converges);
        assert_eq!(plan.prediction.total_ms, None);
        assert!(p.auto_converge && p.postcopy);
        assert_eq!(p.timeout_action, TimeoutAction::Postcopy);
        match &p.policy {
            ControlPolicy::Escalate(c) => assert!(!c.throttle && c.postcopy),
            other => panic!("{other:?}"),
        }
        assert!(plan.reasons.iter().any(|r| r.contains("does not converge")));
    }

    #[test]
    fn post_copy_is_never_chosen_unless_permitted() {
        let mut i = inputs(2000.0, 1000.0);
        i.timeout_action = TimeoutAction::Postcopy;
        let (p, _) = plan(&i, &MigrationParams::default());
        assert!(!p.postcopy);
        assert_eq!(p.timeout_action, TimeoutAction::Abort);
    }

    #[test]
    fn a_slow_link_gets_xbzrle_sized_from_the_working_set() {
        let (p, plan) = plan(&inputs(100.0, 110.0), &MigrationParams::default());
        assert_eq!(p.xbzrle_cache_bytes, Some(128 << 20));
        let (faster, _) = super::plan(&inputs(220.0, 110.0), &MigrationParams::default());
        assert_eq!(faster.xbzrle_cache_bytes, None, "throttling, not deltas");
        assert_eq!(faster.throttle_initial_pct, 75);
        assert_eq!(p.multifd_channels, None);
        assert!(plan.strategy.iter().any(|s| s.contains("xbzrle")));
        // At 110 MiB/s, copying 2 GiB takes ~18.6 s: a guest that must be throttled gets 8
        // copies (149 s), more than the per-GiB rule (120 s).
        assert_eq!(p.completion_timeout, Some(Duration::from_millis(148_945)));
    }

    #[test]
    fn the_users_downtime_is_the_cap_and_their_budget_is_kept() {
        let mut i = inputs(10.0, 1000.0);
        i.downtime_ms = Some(200);
        i.budget = Some(Duration::from_secs(7));
        let (p, _) = plan(&i, &MigrationParams::default());
        assert_eq!(p.downtime_limit_ms, AUTO_DOWNTIME_MS);
        assert_eq!(p.completion_timeout, Some(Duration::from_secs(7)));
        match &p.policy {
            ControlPolicy::Escalate(c) => assert_eq!(c.downtime_cap_ms, 200),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parallel_channels_need_spare_cores() {
        // A busy 2-vCPU guest on a 2-core host leaves no core: one stream.
        let mut i = inputs(100.0, 2500.0);
        i.host_cpus = 2;
        let (p, _) = plan(&i, &MigrationParams::default());
        assert_eq!(p.multifd_channels, None, "one stream on a 2-core host");
        i.host_cpus = 4;
        assert_eq!(
            plan(&i, &MigrationParams::default()).0.multifd_channels,
            Some(2)
        );
        // An idle guest leaves its cores to the channels.
        let mut i = inputs(0.0, 2500.0);
        i.host_cpus = 2;
        assert_eq!(
            plan(&i, &MigrationParams::default()).0.multifd_channels,
            Some(2)
        );
    }

    #[test]
    fn a_user_bandwidth_cap_is_the_link() {
        let base = MigrationParams {
            bandwidth: crate::Bandwidth::Limited(4 << 20),
            ..MigrationParams::default()
        };
        let (p, plan) = plan(&inputs(8.0, 1000.0), &base);
        assert_eq!(plan.prediction.rate_bps, 4.0 * 1048576.0);
        assert!(!plan.prediction.converges);
        assert_eq!(p.bandwidth, crate::Bandwidth::Limited(4 << 20));
    }

    #[test]
    fn budget_covers_a_slow_copy() {
        // 2 GiB at 10 MiB/s: ~205 s to copy once, so the budget is three times that.
        let (p, _) = plan(&inputs(0.0, 10.0), &MigrationParams::default());
        assert!(p.completion_timeout.unwrap() >= Duration::from_secs(600));
    }

    #[test]
    fn local_disks_lengthen_the_budget_and_the_prediction() {
        let base = MigrationParams::default();
        let (p0, plan0) = plan(&inputs(0.0, 100.0), &base);
        let with_disks = PlanInputs {
            disk_bytes: 1 << 30,
            ..inputs(0.0, 100.0)
        };
        let (p1, plan1) = plan(&with_disks, &base);
        // 1 GiB at 100 MiB/s: about 10 s more to copy, 30 s more of budget.
        let more = p1.completion_timeout.unwrap() - p0.completion_timeout.unwrap();
        assert!((29..=32).contains(&more.as_secs()), "{more:?}");
        let t0 = plan0.prediction.total_ms.unwrap();
        let t1 = plan1.prediction.total_ms.unwrap();
        assert!((9_000..=11_000).contains(&(t1 - t0)), "{t0} -> {t1}");
        assert!(plan1
            .strategy
            .iter()
            .any(|s| s.contains("1024.0 MiB of local disks")));
    }
}
