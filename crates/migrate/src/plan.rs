//! The "auto" policy: predict a migration from measured numbers and choose its strategy.
//!
//! Before the stream starts we know the guest's RAM, its dirty rate (QEMU's `calc-dirty-rate`),
//! the link bandwidth (the pre-flight probe) and, once migrations have run between the same
//! two hosts, how fast QEMU really got through guest memory there ([`learn_rate`]): on a
//! loaded host that is a fraction of what raw TCP reaches. The classic pre-copy model, with
//! QEMU's auto-converge throttle when it is armed ([`forecast`]), then says how many rounds it
//! takes, how long, what the final pause is, and whether it converges at all.
//! From that the planner picks the options an expert would: parallel streams when one stream
//! cannot fill the link, the auto-converge throttle armed for a guest that may outrun the link
//! (hard, at once) with XBZRLE against a cache of what it rewrites, post-copy only when
//! permitted (after one pass for a guest that outwrites the link, else as the last resort), and
//! a completion budget. The prediction is shown to the
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
/// Without an earlier migration between the same hosts, QEMU is assumed to get through
/// guest memory at this share of the probed link (and never faster than its streams send,
/// [`SINGLE_STREAM_BPS`] each). Measured: a probe of about 950 MiB/s where QEMU sent 214-456
/// MiB/s (issue 17: 0.23-0.48); in the lab's bench (docs/PERFORMANCE.md) QEMU is CPU-bound,
/// at 0.04-0.3 of an unshaped namespace link of tens of Gbit/s, and reaches 0.6-0.9 of a
/// link shaped to 1 Gbit/s. One share cannot fit every host; the learned rate replaces it
/// after the first migration.
pub const PROBE_RATE_SHARE: f64 = 0.5;
/// When the source host has sent to other hosts, a new pair's rate is this share of its probed
/// link, up to the fastest the source's QEMU got through to any host: QEMU is bounded by
/// the narrower of the link and its own sending (CPU), and the second is the source's, so it
/// carries over to a new destination. In the lab's bench a 1 Gbit/s shaped link's first
/// migration was planned at half its probe (57 MiB/s) and sent at 0.6-0.9 of it.
pub const LINK_RATE_SHARE: f64 = 0.9;
/// How much the newest migration counts in the learned rate of a host pair (an exponentially
/// weighted mean): enough to follow a host whose load changed within two or three migrations.
pub const LEARN_WEIGHT: f64 = 0.5;
/// The first downtime target under auto, and where escalation stops unless the user set one.
pub const AUTO_DOWNTIME_MS: u64 = 50;
pub const AUTO_DOWNTIME_CAP_MS: u64 = 500;
/// The throttle a guest that outwrites the link gets as soon as QEMU engages auto-converge
/// (after two too-dirty rounds; QEMU cannot throttle sooner), and its ceiling. QEMU sleeps a
/// throttled vCPU p/(100-p) x 10 ms of every 10 ms it runs: 190 ms at 95 %, 990 ms at 99 %.
/// A guest whose writing is paced rather than CPU-bound (most real ones) is slowed only once
/// little CPU is left to it: started at the throttle that would halve a CPU-bound writer
/// (50-75 %) and raised 20 points per two rounds, the lab's writers at 100 and 200 % of the
/// link kept writing for 4-7 rounds of 3-4 s each, and the migration sent 3.3-5.0 times their
/// non-zero RAM; at 95 % at once, 2.0-2.9 times, with observed gaps of 0.36-0.46 s against
/// 0.14-2.0 s (docs/PERFORMANCE.md, "Busy guests"). A reply then waits at most about 0.2 s
/// for the vCPU.
pub const AUTO_THROTTLE_PCT: u8 = 95;
/// Where the throttle may still rise to, [`AUTO_THROTTLE_STEP_PCT`] at a time, when the
/// guest still outwrites the link at [`AUTO_THROTTLE_PCT`]: a paced writer needs only a few
/// percent of its CPU (a lab guest writing 48 MiB/s against a 16 MiB/s cap never converged
/// at 95 %, `crates/server/tests/guest_impact.rs`). Converging comes before the gap.
pub const AUTO_THROTTLE_MAX_PCT: u8 = 99;
/// The throttle's step above [`AUTO_THROTTLE_PCT`].
pub const AUTO_THROTTLE_STEP_PCT: u8 = 2;
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

/// The XBZRLE cache for a guest that outwrites the link: what it rewrites while one pass of
/// its RAM is sent at `rate_bps`, at most its RAM, rounded up to a power of two as QEMU wants.
/// A cache smaller than the set thrashes: every page leaves it before it is sent again. Pages
/// the dirty log marks but whose content did not change cost nothing with XBZRLE; in the lab
/// the throttled guests sent 7-32 % fewer bytes with it than without (and never more). The
/// cache is host memory of the source for the migration's length.
pub fn rewritten_set_cache(ram_bytes: u64, rate_bps: f64, dirty_bps: f64) -> u64 {
    let pass_s = ram_bytes as f64 / rate_bps.max(1.0);
    ((dirty_bps * pass_s) as u64)
        .clamp(1 << 20, ram_bytes.max(1 << 20))
        .next_power_of_two()
}
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
    /// How fast QEMU got through guest memory in earlier migrations between the same two
    /// hosts ([`learn_rate`]), bytes per second; `None` without history (then the probe,
    /// scaled by [`PROBE_RATE_SHARE`], stands in).
    #[serde(default)]
    pub learned_rate_bps: Option<f64>,
    /// How much longer than its last round's pages QEMU's pause was in earlier migrations
    /// between the same hosts ([`observed_switchover_ms`], learned like the rate): the
    /// device state and the hand-over, which the rounds' model does not see. `None` without
    /// history.
    #[serde(default)]
    pub learned_switchover_ms: Option<f64>,
    /// The fastest QEMU got through from this source host to any host (learned like
    /// `learned_rate_bps`): the source's own sending ceiling, which bounds a pair without
    /// history better than a fixed share of its probe. `None` when the source has no history.
    #[serde(default)]
    pub source_rate_bps: Option<f64>,
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
    let model = Model {
        ram_bytes,
        rate_bps,
        dirty_bps,
        downtime_s,
        throttle: None,
    };
    forecast(&model, ram_bytes, 0.0).map(|f| (f.rounds, f.total_s, f.pause_s))
}

/// Auto-converge as QEMU runs it: the throttle starts at `initial_pct` and rises by
/// `increment_pct` up to `max_pct`, one step each time two checks in a row found the guest
/// dirtying more than half of what was sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throttle {
    pub initial_pct: f64,
    pub increment_pct: f64,
    pub max_pct: f64,
}

impl Throttle {
    /// Auto-converge's settings in `params`, if it is on.
    pub fn of(params: &MigrationParams) -> Option<Throttle> {
        params.auto_converge.then(|| Throttle {
            initial_pct: params.throttle_initial_pct.into(),
            increment_pct: params.throttle_increment_pct.into(),
            max_pct: params.max_throttle_pct.into(),
        })
    }
}

/// What [`forecast`] models: a guest of `ram_bytes` dirtying `dirty_bps` (unthrottled) while
/// QEMU gets through `rate_bps` of its memory, switching over once a round fits `downtime_s`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Model {
    pub ram_bytes: f64,
    pub rate_bps: f64,
    pub dirty_bps: f64,
    pub downtime_s: f64,
    pub throttle: Option<Throttle>,
}

/// The rest of a migration as [`forecast`] sees it: rounds to go, seconds to the end (the
/// pause included) and the pause.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Forecast {
    pub rounds: u32,
    pub total_s: f64,
    pub pause_s: f64,
}

/// Rounds a throttled guest may need: each throttle step waits for two checks.
const MAX_THROTTLED_ROUNDS: u32 = 60;
/// QEMU checks whether to throttle at a dirty-bitmap sync at most once a second...
const THROTTLE_CHECK_S: f64 = 1.0;
/// ...and counts the period as too dirty when it dirtied more than this share of what it
/// sent (`throttle-trigger-threshold`, 50 by default).
const THROTTLE_TRIGGER: f64 = 0.5;

/// The pre-copy rounds from `remaining_bytes` on, with the guest throttled at
/// `throttle_pct` now: each round sends what the one before dirtied (never more than RAM);
/// with auto-converge, QEMU's throttle rises as it does (see [`Throttle`]) and slows the
/// guest's writing in proportion to the CPU it takes. `None` when the rounds stop shrinking
/// and no throttle step is left to make them.
pub fn forecast(m: &Model, remaining_bytes: f64, throttle_pct: f64) -> Option<Forecast> {
    if m.rate_bps <= 0.0 {
        return None;
    }
    let rounds = if m.throttle.is_some() {
        MAX_THROTTLED_ROUNDS
    } else {
        MAX_ROUNDS
    };
    let (mut remaining, mut total, mut throttle) = (remaining_bytes, 0.0, throttle_pct);
    // The current check period: its length, what it dirtied and sent, and the too-dirty
    // periods in a row.
    let (mut period_s, mut dirtied_in, mut sent_in, mut high) = (0.0, 0.0, 0.0, 0);
    for round in 1..=rounds {
        let t = remaining / m.rate_bps;
        if t <= m.downtime_s {
            return Some(Forecast {
                rounds: round,
                total_s: total + t,
                pause_s: t,
            });
        }
        total += t;
        let writing = m.dirty_bps * (1.0 - throttle / 100.0).max(0.0);
        let next = (writing * t).min(m.ram_bytes);
        let mut can_slow = false;
        let throttle_before = throttle;
        if let Some(th) = m.throttle {
            (period_s, dirtied_in, sent_in) =
                (period_s + t, dirtied_in + next, sent_in + remaining);
            if period_s > THROTTLE_CHECK_S {
                if dirtied_in > THROTTLE_TRIGGER * sent_in {
                    high += 1;
                    if high >= 2 {
                        high = 0;
                        throttle = if throttle <= 0.0 {
                            th.initial_pct
                        } else {
                            (throttle + th.increment_pct).min(th.max_pct)
                        };
                    }
                }
                (period_s, dirtied_in, sent_in) = (0.0, 0.0, 0.0);
            }
            // A throttle that rose in this round slows the next one, even at its ceiling.
            can_slow = throttle < th.max_pct || throttle > throttle_before;
        }
        if next >= remaining * 0.98 && !can_slow {
            return None;
        }
        remaining = next;
    }
    None
}

/// How fast QEMU got through guest memory in a completed migration: the pages it sent in
/// full (re-sends included) and the zero pages it found, per second of its total time. This
/// is the rate the model's rounds consume (a round is a number of pages, zero or not); on a
/// slow link it exceeds the link when much of the memory is zero. `None` for a migration too
/// short to tell (under 50 ms).
pub fn observed_rate(o: &crate::SourceOutcome) -> Option<f64> {
    let processed = o.normal_bytes + o.zero_bytes;
    (o.total_time_ms >= 50 && processed > 0)
        .then(|| processed as f64 / (o.total_time_ms as f64 / 1000.0))
}

/// How much longer QEMU's pause was than the transfer of what was left when it stopped the
/// guest: the device state and the hand-over. The last pages are timed at the rate the
/// migration got through ([`observed_rate`]); without them, QEMU's own last
/// `expected-downtime` stands in (it overestimates: it divides by a rate estimate, so the
/// pause minus it is often 0). `None` without either.
pub fn observed_switchover_ms(o: &crate::SourceOutcome) -> Option<f64> {
    let last_pages_ms = match (o.last_pages_bytes, observed_rate(o)) {
        (Some(bytes), Some(rate)) => bytes as f64 / rate * 1000.0,
        _ => o.final_progress.expected_downtime_ms? as f64,
    };
    Some((o.downtime_ms as f64 - last_pages_ms).max(0.0))
}

/// A host pair's learned rate after one more migration: an exponentially weighted mean
/// ([`LEARN_WEIGHT`] for the newest), or the first observation itself.
pub fn learn_rate(previous: Option<f64>, observed: f64) -> f64 {
    match previous {
        Some(p) if p > 0.0 => p + LEARN_WEIGHT * (observed - p),
        _ => observed,
    }
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

    let probe = inputs.link_bps.unwrap_or_else(|| {
        reasons.push(format!(
            "link not measured; assuming {:.0} MiB/s",
            mib(DEFAULT_LINK_BPS)
        ));
        DEFAULT_LINK_BPS
    });
    let link = probe;
    let cap = match base.bandwidth {
        crate::Bandwidth::Limited(cap) => cap as f64,
        crate::Bandwidth::Unlimited => f64::INFINITY,
    };
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
    let mut channels = ((link / SINGLE_STREAM_BPS).ceil() as u32).clamp(1, spare_cores);
    if inputs.postcopy_permitted && channels > 1 {
        // QEMU 10.0 refuses the post-copy capability beside multifd ("Postcopy is not yet
        // compatible with multifd"): a permitted post-copy keeps one stream.
        reasons.push(format!(
            "post-copy permitted: one stream, not {channels} parallel channels (QEMU does not combine post-copy with multifd)"
        ));
        channels = 1;
    }
    // What QEMU gets through: as learned on this host pair, else a share of the probe.
    let rate = match inputs.learned_rate_bps.filter(|r| *r > 0.0) {
        Some(learned) => {
            reasons.push(format!(
                "QEMU got through {:.0} MiB/s of guest memory in earlier migrations between these hosts (the probe says {:.0} MiB/s)",
                mib(learned),
                mib(probe)
            ));
            learned.min(cap)
        }
        None => {
            let streams = SINGLE_STREAM_BPS * channels as f64;
            match inputs.source_rate_bps.filter(|r| *r > 0.0) {
                Some(ceiling) => {
                    let assumed = (probe * LINK_RATE_SHARE).min(ceiling).min(cap);
                    reasons.push(format!(
                        "no earlier migration between these hosts: assuming QEMU gets through {:.0} MiB/s ({LINK_RATE_SHARE} of the probed {:.0} MiB/s, at most the {:.0} MiB/s this source reached to other hosts and the cap)",
                        mib(assumed),
                        mib(probe),
                        mib(ceiling)
                    ));
                    assumed
                }
                None => {
                    let assumed = (probe * PROBE_RATE_SHARE).min(streams).min(cap);
                    reasons.push(format!(
                "no earlier migration between these hosts: assuming QEMU gets through {:.0} MiB/s ({PROBE_RATE_SHARE} of the probed {:.0} MiB/s, at most the cap and what its streams send)",
                mib(assumed),
                mib(probe)
            ));
                    assumed
                }
            }
        }
    };
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
        // by then the guest must slow at once, and hard (see [`AUTO_THROTTLE_PCT`]); QEMU
        // raises it further only while the guest still outwrites the link.
        let needed = AUTO_THROTTLE_PCT;
        p.throttle_initial_pct = needed;
        p.throttle_increment_pct = AUTO_THROTTLE_STEP_PCT;
        p.max_throttle_pct = AUTO_THROTTLE_MAX_PCT;
        if inputs.downtime_ms.is_none() {
            escalate.soft_cap_ms = Some(AUTO_SOFT_CAP_MS);
            reasons.push(format!(
                "while the throttle rises the pause stays at most {AUTO_SOFT_CAP_MS} ms; up to {cap_ms} ms once it stops rising"
            ));
        }
        strategy.push(format!("auto-converge at {needed} %"));
        reasons.push(format!(
            "to send faster than it writes, the guest's vCPUs are throttled at {needed} % once QEMU sees two rounds not converge (a vCPU then waits up to 0.2 s for its turn), and up to {AUTO_THROTTLE_MAX_PCT} % while the guest still outwrites the link"
        ));
        // Re-sent pages delta-compressed against a cache that holds the rewritten set (not
        // with multifd, which QEMU does not combine with XBZRLE). Not in a block migration:
        // measured on memory-only moves only, and a source QEMU died on a cancel of a
        // block migration that had it on (issue 10's open crash), so not there until that
        // is understood.
        if p.multifd_channels.is_none() && p.xbzrle_cache_bytes.is_none() && inputs.disk_bytes == 0
        {
            let cache = rewritten_set_cache(inputs.ram_bytes, rate, dirty);
            p.xbzrle_cache_bytes = Some(cache);
            strategy.push(format!("xbzrle cache {:.0} MiB", mib(cache as f64)));
            reasons.push(format!(
                "re-sent pages delta-compressed against a {:.0} MiB cache: what the guest rewrites during one pass, at most its RAM",
                mib(cache as f64)
            ));
        }
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
        if rate < XBZRLE_BELOW_BPS
            && p.multifd_channels.is_none()
            && p.xbzrle_cache_bytes.is_none()
            && dirty > 0.0
            && dirty < rate
        {
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
    // A guest that outwrites the link re-sends its whole working set in every pre-copy round;
    // when post-copy is permitted, one pass and then post-copy sends each page still dirty
    // once more, with no throttle (measured in docs/PERFORMANCE.md, "Busy guests").
    let postcopy_after_pass = inputs.postcopy_permitted && p.auto_converge;
    if postcopy_after_pass {
        p.postcopy = true;
        escalate.postcopy_after_first_pass = true;
        strategy.push("post-copy after the first pass".into());
        reasons.push(
            "post-copy is permitted: after one full pass the destination runs the guest and fetches what is still dirty, instead of pre-copy rounds that re-send the working set under a throttle".into(),
        );
    } else if inputs.postcopy_permitted {
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

    // An armed throttle is what ends the migration: model it as QEMU will run it.
    let throttled = p.auto_converge.then(|| {
        let model = Model {
            ram_bytes: ram,
            rate_bps: rate,
            dirty_bps: dirty,
            downtime_s: start_ms as f64 / 1000.0,
            throttle: Throttle::of(&p),
        };
        forecast(&model, ram, 0.0).map(|f| (f.rounds, f.total_s, f.pause_s))
    });
    // One pass, then what the guest dirtied meanwhile (at most its RAM), fetched by the
    // destination at the same rate; the pause is the device state only.
    let after_pass = postcopy_after_pass.then(|| {
        let pass_s = ram / rate;
        (2, pass_s + (dirty * pass_s).min(ram) / rate, 0.0)
    });
    let chosen = after_pass.or_else(|| throttled.unwrap_or(at_start.or(at_cap)));
    if let ControlPolicy::Escalate(cfg) = &mut p.policy {
        cfg.predicted_total_ms = chosen.map(|(_, total, _)| ((total + disk_s) * 1000.0) as u64);
    }
    // The rounds' model sees the last round's pages; QEMU's pause also holds the device
    // state and the hand-over, as long as they took here before.
    let switchover_ms = match inputs.learned_switchover_ms.filter(|ms| *ms >= 0.0) {
        Some(ms) => {
            reasons.push(format!(
                "QEMU's pause ran {ms:.0} ms past its last pages in earlier migrations between these hosts (device state, hand-over): the predicted pause includes it"
            ));
            ms
        }
        None => {
            reasons.push(
                "no earlier migration between these hosts: the predicted pause is the last pages alone, without the device state and hand-over".into(),
            );
            0.0
        }
    };
    let prediction = Prediction {
        converges,
        total_ms: chosen.map(|(_, total, _)| ((total + disk_s) * 1000.0) as u64),
        downtime_ms: chosen
            .map(|(_, _, pause)| (pause * 1000.0 + switchover_ms).ceil() as u64)
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
            // QEMU got through memory at link speed before: the planner's own choices are
            // what these tests look at.
            learned_rate_bps: Some(link_mib * 1048576.0),
            learned_switchover_ms: None,
            source_rate_bps: None,
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
    fn a_permitted_post_copy_keeps_one_stream_on_a_fast_link() {
        let mut i = inputs(0.0, 2500.0);
        i.postcopy_permitted = true;
        let (p, plan) = plan(&i, &MigrationParams::default());
        assert!(p.postcopy, "{}", plan.summary());
        assert_eq!(p.multifd_channels, None, "{}", plan.summary());
        assert!(plan.reasons.iter().any(|r| r.contains("one stream")));
    }

    #[test]
    fn a_guest_faster_than_the_link_is_armed_and_escalated() {
        let mut i = inputs(2000.0, 1000.0);
        i.postcopy_permitted = true;
        i.timeout_action = TimeoutAction::Postcopy;
        let (p, plan) = plan(&i, &MigrationParams::default());
        assert!(!plan.prediction.converges);
        // Not on its own: post-copy after the first pass ends it.
        let total = plan.prediction.total_ms.expect("post-copy ends it");
        assert!(p.auto_converge && p.postcopy);
        assert_eq!(p.timeout_action, TimeoutAction::Postcopy);
        match &p.policy {
            ControlPolicy::Escalate(c) => {
                assert!(!c.throttle && c.postcopy);
                assert!(c.postcopy_after_first_pass, "one pass, then post-copy");
            }
            other => panic!("{other:?}"),
        }
        assert!(plan.reasons.iter().any(|r| r.contains("does not converge")));
        assert!(plan
            .strategy
            .iter()
            .any(|s| s == "post-copy after the first pass"));
        // One pass of 2 GiB at 1000 MiB/s (2 s), then all of it again, since the guest
        // rewrites more than its RAM meanwhile: two copies of RAM.
        assert_eq!(total, 4096);
        assert_eq!(plan.prediction.rounds, 2);
    }

    #[test]
    fn a_guest_that_converges_keeps_post_copy_as_the_last_resort() {
        let mut i = inputs(100.0, 1000.0);
        i.postcopy_permitted = true;
        let (p, plan) = plan(&i, &MigrationParams::default());
        assert!(p.postcopy && !p.auto_converge);
        match &p.policy {
            ControlPolicy::Escalate(c) => assert!(!c.postcopy_after_first_pass),
            other => panic!("{other:?}"),
        }
        assert!(plan.strategy.iter().any(|s| s == "post-copy permitted"));
    }

    #[test]
    fn post_copy_is_never_chosen_unless_permitted() {
        let mut i = inputs(2000.0, 1000.0);
        i.timeout_action = TimeoutAction::Postcopy;
        let (p, _) = plan(&i, &MigrationParams::default());
        assert!(!p.postcopy);
        assert_eq!(p.timeout_action, TimeoutAction::Abort);
        match &p.policy {
            ControlPolicy::Escalate(c) => assert!(!c.postcopy_after_first_pass),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_slow_link_gets_xbzrle_sized_from_the_working_set() {
        let (p, plan) = plan(&inputs(100.0, 110.0), &MigrationParams::default());
        // Throttled too (100 of 110 MiB/s is within the convergence margin): the cache holds
        // what it rewrites in an 18.6 s pass, all of its 2 GiB.
        assert_eq!(p.xbzrle_cache_bytes, Some(2 << 30));
        let (faster, _) = super::plan(&inputs(220.0, 110.0), &MigrationParams::default());
        // A guest that outwrites the link is throttled hard at once, and its re-sent pages
        // go against a cache of what it rewrites in a pass: 220 MiB/s x 18.6 s is more than
        // its 2 GiB, so all of it.
        assert_eq!(faster.xbzrle_cache_bytes, Some(2 << 30));
        assert_eq!(faster.throttle_initial_pct, AUTO_THROTTLE_PCT);
        assert_eq!(faster.max_throttle_pct, AUTO_THROTTLE_MAX_PCT);
        // A block migration gets the throttle but not XBZRLE (measured on memory only).
        let with_disks = PlanInputs {
            disk_bytes: 1 << 30,
            ..inputs(220.0, 110.0)
        };
        let (blocks, _) = super::plan(&with_disks, &MigrationParams::default());
        assert!(blocks.auto_converge);
        assert_eq!(blocks.xbzrle_cache_bytes, None);
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
        // Without history too: QEMU reaches a cap far below the probe.
        let first = PlanInputs {
            learned_rate_bps: None,
            ..inputs(8.0, 1000.0)
        };
        let (_, plan) = super::plan(&first, &base);
        assert_eq!(plan.prediction.rate_bps, 4.0 * 1048576.0);
    }

    #[test]
    fn the_pause_includes_the_switchover_learned_on_the_host_pair() {
        let base = MigrationParams::default();
        let (_, alone) = plan(&inputs(0.0, 1000.0), &base);
        let learned = PlanInputs {
            learned_switchover_ms: Some(17.4),
            ..inputs(0.0, 1000.0)
        };
        let (p, with) = plan(&learned, &base);
        assert_eq!(
            with.prediction.downtime_ms,
            (alone.prediction.downtime_ms as f64 + 17.4).ceil() as u64,
            "{alone:?} / {with:?}"
        );
        // A prediction, not a target: QEMU's limit is unchanged.
        assert_eq!(
            p.downtime_limit_ms,
            plan(&inputs(0.0, 1000.0), &base).0.downtime_limit_ms
        );
        assert!(with
            .reasons
            .iter()
            .any(|r| r.contains("17 ms past its last pages")));
        assert!(alone
            .reasons
            .iter()
            .any(|r| r.contains("without the device state")));
    }

    #[test]
    fn the_switchover_is_the_pause_beyond_what_qemu_expected_to_send() {
        let mut progress = crate::Progress::disk_copy(0, Vec::new(), 0);
        progress.expected_downtime_ms = Some(4);
        let outcome = |pause: u64, progress: crate::Progress| crate::SourceOutcome {
            downtime_ms: pause,
            final_progress: progress,
            ..serde_json::from_value(serde_json::json!({
                "total_time_ms": 900, "downtime_ms": 0, "transferred_bytes": 1,
                "iterations": 2, "final_progress": crate::Progress::disk_copy(0, Vec::new(), 0)
            }))
            .unwrap()
        };
        assert_eq!(
            observed_switchover_ms(&outcome(21, progress.clone())),
            Some(17.0)
        );
        assert_eq!(
            observed_switchover_ms(&outcome(3, progress.clone())),
            Some(0.0)
        );
        let unknown = crate::Progress::disk_copy(0, Vec::new(), 0);
        assert_eq!(observed_switchover_ms(&outcome(21, unknown)), None);
        // With the last pages known, they are timed at the migration's own rate instead:
        // 100 MiB in 1 s, 2 MiB left at the stop = 20 ms of a 50 ms pause.
        let timed = crate::SourceOutcome {
            total_time_ms: 1000,
            normal_bytes: 100 << 20,
            last_pages_bytes: Some(2 << 20),
            ..outcome(50, progress)
        };
        let switchover = observed_switchover_ms(&timed).unwrap();
        assert!((switchover - 30.0).abs() < 0.01, "{switchover}");
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

    /// What the lab's bench recorded (docs/bench/bench-512.json, 2026-11-26): a 512 MiB guest
    /// filled with random pages, migrated idle between two namespaces whose raw TCP reached
    /// 25221 Mbit/s. QEMU's total time and the non-zero RAM of four platforms' runs, in the
    /// order they ran, then Ferry auto's, which took 914 ms.
    const RECORDED_IDLE: [(u64, u64); 4] = [
        (1000, 488_456_192),
        (998, 488_243_200),
        (429, 488_615_936),
        (1419, 479_858_688),
    ];

    /// A completed migration that sent `nonzero` bytes of a 512 MiB guest once.
    fn outcome(total_ms: u64, nonzero: u64) -> crate::SourceOutcome {
        crate::SourceOutcome {
            total_time_ms: total_ms,
            downtime_ms: 5,
            setup_time_ms: None,
            transferred_bytes: nonzero,
            iterations: 2,
            zero_bytes: (512 << 20) - nonzero,
            normal_bytes: nonzero,
            last_pages_bytes: None,
            final_progress: crate::Progress::disk_copy(total_ms, Vec::new(), 0),
        }
    }

    fn lab_inputs(dirty_mib: f64, link_mbit: f64, learned: Option<f64>) -> PlanInputs {
        PlanInputs {
            ram_bytes: 512 << 20,
            dirty_rate_bps: Some(dirty_mib * 1048576.0),
            link_bps: Some(link_mbit * 1e6 / 8.0),
            host_cpus: 2,
            guest_vcpus: 1,
            downtime_ms: None,
            postcopy_permitted: false,
            budget: None,
            budget_scale: 0.05,
            timeout_action: TimeoutAction::Abort,
            disk_bytes: 0,
            learned_rate_bps: learned,
            learned_switchover_ms: None,
            source_rate_bps: None,
        }
    }

    #[test]
    fn a_prediction_uses_the_rate_learned_on_the_host_pair() {
        let mut learned = None;
        for (ms, nonzero) in RECORDED_IDLE {
            let seen = observed_rate(&outcome(ms, nonzero)).unwrap();
            learned = Some(learn_rate(learned, seen));
        }
        let learned = learned.unwrap();
        // 512, 513, 1193 and 361 MiB/s, weighted toward the newest.
        assert!((learned / 1048576.0 - 606.9).abs() < 0.1, "{learned}");
        let (_, with) = plan(
            &lab_inputs(0.0, 25221.0, Some(learned)),
            &MigrationParams::default(),
        );
        assert_eq!(with.prediction.rate_bps, learned);
        let total = with.prediction.total_ms.unwrap() as f64;
        assert!(
            (total - 914.0).abs() / 914.0 < 0.25,
            "predicted {total} ms for a recorded 914 ms"
        );
        assert!(
            with.reasons[0].contains("earlier migrations"),
            "{:?}",
            with.reasons
        );
        // Without history: half the probe (at most what its streams send).
        let (_, without) = plan(&lab_inputs(0.0, 25221.0, None), &MigrationParams::default());
        assert_eq!(
            without.prediction.rate_bps,
            25221e6 / 8.0 * PROBE_RATE_SHARE
        );
        // A new pair whose source sent to other hosts: the narrower of most of the link and
        // what this source reached (a shaped 1 Gbit/s link after a fast one, as in the bench).
        let new_pair = |link_mbit: f64| PlanInputs {
            source_rate_bps: Some(262.0 * 1048576.0),
            ..lab_inputs(0.0, link_mbit, None)
        };
        let (_, shaped) = plan(&new_pair(1000.0), &MigrationParams::default());
        assert_eq!(shaped.prediction.rate_bps, 1000e6 / 8.0 * LINK_RATE_SHARE);
        let (_, fast) = plan(&new_pair(25221.0), &MigrationParams::default());
        assert_eq!(fast.prediction.rate_bps, 262.0 * 1048576.0);
        assert!(
            fast.reasons
                .iter()
                .any(|r| r.contains("this source reached")),
            "{:?}",
            fast.reasons
        );
        assert!(without.reasons[0].contains("no earlier migration"));
        // A user's cap still bounds the learned rate.
        let capped = MigrationParams {
            bandwidth: crate::Bandwidth::Limited(100 << 20),
            ..MigrationParams::default()
        };
        let (_, c) = plan(&lab_inputs(0.0, 25221.0, Some(learned)), &capped);
        assert_eq!(c.prediction.rate_bps, (100 << 20) as f64);
    }

    #[test]
    fn a_throttled_guest_is_predicted_as_auto_converge_runs() {
        // Recorded too: the same guest filled with pattern pages (478 MiB of it non-zero)
        // writing 228 MiB/s over the link shaped to 959 Mbit/s; Ferry auto with the throttle
        // at 95 % from its start took 17442 ms (docs/bench/bench-busy-variants-2.json,
        // ferry-auto-hard-xbzrle, the policy since). The rate learned there: that memory moved
        // once at the link's 114 MiB/s (4.2 s for 512 MiB, zero pages free). The model
        // predicts 12.4 s: it slows the writer in proportion to the CPU taken, while the lab's
        // paced writer still wrote 17-20 MiB/s at 95 % (5 % of 228 would be 11).
        let nonzero = 478_490_624u64;
        let once_ms = (nonzero as f64 / (959e6 / 8.0) * 1000.0) as u64;
        let learned = observed_rate(&outcome(once_ms, nonzero)).unwrap();
        let (p, plan) = plan(
            &lab_inputs(228.0, 959.0, Some(learned)),
            &MigrationParams::default(),
        );
        assert!(p.auto_converge && !plan.prediction.converges);
        let total = plan.prediction.total_ms.expect("throttled to an end") as f64;
        assert!(
            (total - 17442.0).abs() / 17442.0 < 0.3,
            "predicted {total} ms for a recorded 17442 ms"
        );
        match &p.policy {
            ControlPolicy::Escalate(c) => {
                assert_eq!(c.predicted_total_ms, plan.prediction.total_ms)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_xbzrle_cache_holds_the_set_rewritten_in_a_pass() {
        // 512 MiB at 100 MiB/s: a 5.1 s pass; 20 MiB/s rewrites 102 MiB of it: 128 MiB.
        let mib = 1048576.0;
        assert_eq!(
            rewritten_set_cache(512 << 20, 100.0 * mib, 20.0 * mib),
            128 << 20
        );
        // A guest writing faster than the link rewrites all of it, never more.
        assert_eq!(
            rewritten_set_cache(512 << 20, 100.0 * mib, 230.0 * mib),
            512 << 20
        );
        assert_eq!(rewritten_set_cache(512 << 20, 100.0 * mib, 0.0), 1 << 20);
        // Multifd keeps XBZRLE off (QEMU does not combine them).
        let (p, _) = plan(&inputs(2000.0, 1000.0), &MigrationParams::default());
        assert!(p.multifd_channels.is_some() && p.auto_converge);
        assert_eq!(p.xbzrle_cache_bytes, None);
    }

    #[test]
    fn the_forecast_follows_qemus_throttle_steps() {
        // 100 MB at 10 MB/s, the guest dirtying 20 MB/s: four full rounds (the throttle comes
        // after two too-dirty checks, 50 %, and two more, 75 %), then the rounds halve from
        // 100 MB until one fits 100 ms.
        let m = Model {
            ram_bytes: 100e6,
            rate_bps: 10e6,
            dirty_bps: 20e6,
            downtime_s: 0.1,
            throttle: Some(Throttle {
                initial_pct: 50.0,
                increment_pct: 25.0,
                max_pct: 99.0,
            }),
        };
        let f = forecast(&m, 100e6, 0.0).unwrap();
        assert_eq!(f.rounds, 12);
        assert!((f.total_s - 59.921875).abs() < 1e-9, "{f:?}");
        assert!((f.pause_s - 0.078125).abs() < 1e-9, "{f:?}");
        // Without auto-converge it never ends; already throttled, it ends sooner.
        assert_eq!(
            forecast(
                &Model {
                    throttle: None,
                    ..m
                },
                100e6,
                0.0
            ),
            None
        );
        let later = forecast(&m, 100e6, 75.0).unwrap();
        assert!(later.total_s < f.total_s - 30.0, "{later:?}");
    }

    #[test]
    fn learning_weighs_the_newest_migration_half() {
        assert_eq!(learn_rate(None, 300.0), 300.0);
        assert_eq!(learn_rate(Some(300.0), 100.0), 200.0);
        let short = outcome(20, 1 << 20);
        assert_eq!(observed_rate(&short), None, "too short to tell");
    }
}
