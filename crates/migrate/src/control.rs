//! The convergence controller: pure decisions over progress samples.
//!
//! QEMU only knows one way to finish pre-copy: wait until the remaining memory fits into the
//! downtime target. A guest that dirties memory about as fast as the link sends never gets
//! there, and every platform then either waits forever or aborts. The controller watches the
//! samples the source half takes anyway and, when the remaining memory stops shrinking, takes
//! the next step of a [`ControlPolicy`]; when the completion budget runs out it applies the
//! [`TimeoutAction`]. At the start of every round it also predicts the rest of the migration
//! again from what QEMU has shown ([`Controller::revise`]): the plan's prediction rests on
//! rates measured before the stream started, the revision on the stream itself. It does no
//! I/O and reads no clock (the sample carries the elapsed time), so it is tested on recorded
//! traces and the benchmark can run other platforms' policies through the same code.

use serde::{Deserialize, Serialize};

use crate::plan::{forecast, Model, Throttle};
use crate::progress::{Phase, Progress};

/// What happens when a migration runs out of its completion budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeoutAction {
    /// Cancel; the guest keeps running on the source. Nothing is at risk.
    #[default]
    Abort,
    /// Switch to post-copy (needs post-copy permitted): the migration always finishes, but
    /// from then on a network failure pauses the guest until the link is back.
    Postcopy,
}

/// How a running migration is steered. The variants other than `Fixed` and `Escalate` mirror
/// the default behaviour of widely used platforms so the benchmark can compare them on the
/// same QEMU; they are ordinary policies an operator may choose as well.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ControlPolicy {
    /// Keep the parameters as set; only the budget applies.
    Fixed,
    /// Ferry's controller: on a stall, raise the downtime target (up to `downtime_cap_ms`),
    /// then the auto-converge throttle ceiling, then switch to post-copy if permitted.
    Escalate(EscalateConfig),
    /// Raise the downtime target on a fixed schedule: step `i` of `steps` (from 0) sets
    /// `max_ms/steps + i*(max_ms - max_ms/steps)/steps` after `i*delay_ms` (OpenStack Nova).
    DowntimeSteps {
        max_ms: u64,
        steps: u64,
        delay_ms: u64,
    },
    /// Abort when the remaining memory has not reached a new low for `timeout_ms`
    /// (KubeVirt's progress timeout).
    ProgressTimeout { timeout_ms: u64 },
    /// Poll every `poll_ms`; double the downtime target each time the remaining memory has
    /// grown between polls `growths` times (counted cumulatively, as Proxmox VE does with 6).
    DoubleOnGrowth { growths: u64, poll_ms: u64 },
}

/// Knobs of [`ControlPolicy::Escalate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EscalateConfig {
    /// The downtime target is never raised above this.
    pub downtime_cap_ms: u64,
    /// A stall is this many dirty-bitmap rounds without a new low of remaining memory...
    pub stall_rounds: u64,
    /// ...lasting at least this long (rounds of a small guest take milliseconds).
    pub stall_ms: u64,
    /// Auto-converge is on, so raising its ceiling is an available step.
    pub throttle: bool,
    /// Switching to post-copy is permitted as the last step.
    pub postcopy: bool,
    /// What the link sends, from the plan. QEMU switches over once the remaining memory fits
    /// its *measured* rate times the target, and that rate collapses when little is left to
    /// send; the controller scales the target so that the cap means milliseconds at link
    /// speed (what QEMU 8.2+ calls avail-switchover-bandwidth).
    #[serde(default)]
    pub link_bps: Option<f64>,
    /// While the guest is still being throttled harder, the downtime target stops here: a
    /// slower guest for a few seconds costs it less than a long pause. Lifted when a stall
    /// window passes without the throttle rising.
    #[serde(default)]
    pub soft_cap_ms: Option<u64>,
    /// The plan's predicted total time: the controller says so when its revision moves more
    /// than a quarter away from it (see [`Controller::revise`]).
    #[serde(default)]
    pub predicted_total_ms: Option<u64>,
    /// Switch to post-copy as soon as the first full pass is done (with `postcopy`), instead
    /// of as the last step: for a guest that outwrites the link every later pre-copy round
    /// re-sends its whole working set, and throttling it to an end costs the guest seconds of
    /// CPU; after one pass post-copy sends each page still dirty once, while the guest runs
    /// on the destination (measured in docs/PERFORMANCE.md, "Busy guests").
    #[serde(default)]
    pub postcopy_after_first_pass: bool,
}

impl Default for EscalateConfig {
    fn default() -> Self {
        EscalateConfig {
            downtime_cap_ms: 500,
            stall_rounds: 3,
            stall_ms: 1500,
            throttle: false,
            postcopy: false,
            link_bps: None,
            soft_cap_ms: None,
            predicted_total_ms: None,
            postcopy_after_first_pass: false,
        }
    }
}

/// Auto-converge ceilings the escalation walks through, in percent of vCPU time taken away.
pub const THROTTLE_STEPS: [u8; 3] = [50, 80, 99];

/// A change the controller asks the source half to make.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Action {
    SetDowntime {
        ms: u64,
    },
    /// Let auto-converge throttle the vCPUs up to `max_pct`, `increment_pct` per step.
    SetThrottleCeiling {
        max_pct: u8,
        increment_pct: u8,
    },
    StartPostcopy,
    /// Cancel the migration; `timeout` tells a budget overrun from a stall abort.
    Abort {
        timeout: bool,
    },
    /// Change nothing; logged so the migration's log says why nothing more happens.
    Hold,
    /// Change nothing: the prediction moved by more than [`REVISION_NOTICE`] (or an end came
    /// into sight, or went out of it), and the log says so with the numbers behind it.
    Revise {
        total_ms: Option<u64>,
        pause_ms: Option<u64>,
    },
}

/// A revision that moves the predicted total by more than this share of the prediction last
/// announced is logged ([`Action::Revise`]).
pub const REVISION_NOTICE: f64 = 0.25;

/// The rest of a running migration as the controller predicts it at the start of a round,
/// from QEMU's own figures: its recent send rate, the guest's dirty rate (taken back to what
/// it would be unthrottled) and the memory left; carried by every later sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revision {
    /// The round it was made at (QEMU's dirty-bitmap syncs) and when, ms since the start.
    pub round: u64,
    pub at_ms: u64,
    /// Predicted total time from the start; `None` when no end is in sight at these rates.
    pub total_ms: Option<u64>,
    /// Predicted pause at switchover.
    pub pause_ms: Option<u64>,
    /// What it assumed, bytes per second.
    pub rate_bps: f64,
    pub dirty_rate_bps: f64,
}

/// One decision with the numbers behind it, for the migration's log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub elapsed_ms: u64,
    pub action: Action,
    pub reason: String,
}

/// Steers one migration; fed every progress sample, in order.
#[derive(Debug, Clone)]
pub struct Controller {
    policy: ControlPolicy,
    budget_ms: Option<u64>,
    timeout_action: TimeoutAction,
    postcopy_permitted: bool,
    downtime_ms: u64,
    /// Lowest remaining bytes seen in pre-copy, with the round and time it was seen.
    low: Option<(u64, u64, u64)>,
    last_remaining: Option<u64>,
    /// The current round and the largest remaining seen in it.
    round_peak: Option<(u64, u64)>,
    last_poll_ms: Option<u64>,
    growths: u64,
    /// Steps taken so far (downtime raises count in `downtime_ms`).
    throttle_step: usize,
    schedule_step: u64,
    postcopy_started: bool,
    gave_up: bool,
    exhausted_logged: bool,
    /// QEMU's throttle at the previous stall, to tell whether auto-converge still rises.
    throttle_at_last_stall: Option<u64>,
    soft_cap_lifted: bool,
    /// Auto-converge as QEMU runs it, for the revisions.
    throttle: Option<Throttle>,
    /// The latest revision, and the predicted total last announced (the plan's first).
    revision: Option<Revision>,
    announced: Option<Option<u64>>,
}

const MIB: f64 = 1048576.0;

fn mib(b: u64) -> f64 {
    b as f64 / MIB
}

/// The log line of a revision: the new prediction, the one it replaces, and what it rests on.
fn revision_reason(r: &Revision, was: Option<u64>, p: &Progress, throttle: f64) -> String {
    let secs = |ms: u64| format!("{:.1} s", ms as f64 / 1000.0);
    let now = match (r.total_ms, r.pause_ms) {
        (Some(t), Some(pause)) => format!("total {}, pause {pause} ms", secs(t)),
        _ => "no end at these rates".into(),
    };
    let before = was.map_or_else(|| "no end".into(), secs);
    format!(
        "prediction revised at round {}: {now} (was {before}); QEMU sends {:.1} MiB/s, the guest dirties {:.1} MiB/s unthrottled (throttle {throttle:.0} %), {:.1} MiB left",
        r.round,
        r.rate_bps / MIB,
        r.dirty_rate_bps / MIB,
        mib(p.remaining_bytes),
    )
}

impl Controller {
    /// `downtime_ms` is the target QEMU starts with; `budget_ms` the completion budget.
    pub fn new(
        policy: ControlPolicy,
        downtime_ms: u64,
        budget_ms: Option<u64>,
        timeout_action: TimeoutAction,
        postcopy_permitted: bool,
    ) -> Controller {
        Controller {
            policy,
            budget_ms,
            timeout_action,
            postcopy_permitted,
            downtime_ms,
            low: None,
            last_remaining: None,
            round_peak: None,
            last_poll_ms: None,
            growths: 0,
            throttle_step: 0,
            schedule_step: 0,
            postcopy_started: false,
            gave_up: false,
            exhausted_logged: false,
            throttle_at_last_stall: None,
            soft_cap_lifted: false,
            throttle: None,
            revision: None,
            announced: None,
        }
    }

    /// The controller for a migration with these parameters, steered by `policy`.
    pub fn for_params(params: &crate::MigrationParams, policy: ControlPolicy) -> Controller {
        let mut c = Controller::new(
            policy,
            params.downtime_limit_ms,
            params.completion_timeout.map(|t| t.as_millis() as u64),
            params.timeout_action,
            params.postcopy,
        );
        c.throttle = Throttle::of(params);
        if let ControlPolicy::Escalate(cfg) = &c.policy {
            c.announced = cfg.predicted_total_ms.map(Some);
        }
        c
    }

    /// Predicts the rest of the migration again at the start of each pre-copy round after the
    /// first, from the sample's own rates ([`crate::plan::forecast`]), and puts the latest
    /// revision (and the time left by it) on every sample from then on. Returns a
    /// [`Action::Revise`] decision when the predicted total moved by more than
    /// [`REVISION_NOTICE`] from the prediction last announced, or an end came into sight or
    /// went out of it.
    pub fn revise(&mut self, p: &mut Progress) -> Option<Decision> {
        let new_round = p.phase == Phase::Precopy
            && p.iteration >= 2
            && p.throughput_bps > 0.0
            && self.revision.as_ref().is_none_or(|r| p.iteration > r.round);
        let mut notice = None;
        if new_round {
            let throttle = p.cpu_throttle_percent.unwrap_or(0).min(99) as f64;
            let dirty = p.dirty_rate_bps / (1.0 - throttle / 100.0);
            let model = Model {
                ram_bytes: p.total_bytes as f64,
                rate_bps: p.throughput_bps,
                dirty_bps: dirty,
                downtime_s: self.downtime_ms as f64 / 1000.0,
                throttle: self.throttle,
            };
            let rest = forecast(&model, p.remaining_bytes as f64, throttle);
            let r = Revision {
                round: p.iteration,
                at_ms: p.elapsed_ms,
                total_ms: rest.map(|f| p.elapsed_ms + (f.total_s * 1000.0) as u64),
                pause_ms: rest.map(|f| (f.pause_s * 1000.0).ceil() as u64),
                rate_bps: p.throughput_bps,
                dirty_rate_bps: dirty,
            };
            let moved = match (self.announced, r.total_ms) {
                (None, _) => true,
                (Some(Some(was)), Some(now)) => {
                    (now as f64 - was as f64).abs() > REVISION_NOTICE * was.max(1) as f64
                }
                (Some(was), now) => was.is_some() != now.is_some(),
            };
            if moved {
                let reason = revision_reason(&r, self.announced.flatten(), p, throttle);
                self.announced = Some(r.total_ms);
                let action = Action::Revise {
                    total_ms: r.total_ms,
                    pause_ms: r.pause_ms,
                };
                notice = Some(self.decide(p, action, reason));
            }
            self.revision = Some(r);
        }
        if let Some(r) = &self.revision {
            if let (Some(total), Phase::Precopy) = (r.total_ms, p.phase) {
                p.eta_ms = Some(total.saturating_sub(p.elapsed_ms));
            }
            p.revision = Some(r.clone());
        }
        notice
    }

    /// The downtime target as last set.
    pub fn downtime_ms(&self) -> u64 {
        self.downtime_ms
    }

    /// The decisions this sample calls for (usually none).
    pub fn on_sample(&mut self, p: &Progress) -> Vec<Decision> {
        if self.gave_up || self.postcopy_started || p.phase != Phase::Precopy {
            if p.phase == Phase::Postcopy {
                self.postcopy_started = true;
            }
            return Vec::new();
        }
        if let Some(d) = self.budget_decision(p) {
            return vec![d];
        }
        match self.policy.clone() {
            ControlPolicy::Fixed => Vec::new(),
            ControlPolicy::Escalate(cfg) => self.escalate(&cfg, p),
            ControlPolicy::DowntimeSteps {
                max_ms,
                steps,
                delay_ms,
            } => self.downtime_schedule(max_ms, steps, delay_ms, p),
            ControlPolicy::ProgressTimeout { timeout_ms } => self.progress_timeout(timeout_ms, p),
            ControlPolicy::DoubleOnGrowth { growths, poll_ms } => {
                self.double_on_growth(growths, poll_ms, p)
            }
        }
    }

    fn decide(&mut self, p: &Progress, action: Action, reason: String) -> Decision {
        match &action {
            Action::SetDowntime { ms } => self.downtime_ms = *ms,
            Action::StartPostcopy => self.postcopy_started = true,
            Action::Abort { .. } => self.gave_up = true,
            Action::SetThrottleCeiling { max_pct, .. } => {
                if let Some(t) = &mut self.throttle {
                    t.max_pct = f64::from(*max_pct);
                }
            }
            Action::Hold | Action::Revise { .. } => {}
        }
        Decision {
            elapsed_ms: p.elapsed_ms,
            action,
            reason,
        }
    }

    fn budget_decision(&mut self, p: &Progress) -> Option<Decision> {
        let budget = self.budget_ms?;
        if p.elapsed_ms < budget {
            return None;
        }
        let why = format!(
            "completion budget of {:.1} s spent with {:.1} MiB still to send",
            budget as f64 / 1000.0,
            mib(p.remaining_bytes)
        );
        Some(
            if self.timeout_action == TimeoutAction::Postcopy && self.postcopy_permitted {
                self.decide(
                    p,
                    Action::StartPostcopy,
                    format!("{why}; timeout action is post-copy"),
                )
            } else {
                self.decide(
                    p,
                    Action::Abort { timeout: true },
                    format!("{why}; timeout action is abort, the guest stays on the source"),
                )
            },
        )
    }

    /// Returns whether the migration is stalled: the dirty set a round starts with (the
    /// largest remaining seen during that round; within a round remaining always falls toward
    /// zero, so its minimum says nothing) has not reached a new low, 10 % below the last one,
    /// for `rounds` rounds and `ms` milliseconds.
    fn stalled(&mut self, p: &Progress, rounds: u64, ms: u64) -> bool {
        match self.round_peak {
            Some((round, peak)) if round == p.iteration => {
                self.round_peak = Some((round, peak.max(p.remaining_bytes)));
                return self.is_stalled(p, rounds, ms);
            }
            // The previous round is complete and its dirty set is a new low.
            Some((_, peak)) if self.low.is_none_or(|(low, _, _)| peak * 10 < low * 9) => {
                self.low = Some((peak, p.iteration, p.elapsed_ms));
            }
            Some(_) => {}
            None => {}
        }
        self.round_peak = Some((p.iteration, p.remaining_bytes));
        self.is_stalled(p, rounds, ms)
    }

    fn is_stalled(&self, p: &Progress, rounds: u64, ms: u64) -> bool {
        match self.low {
            Some((_, round, at)) => p.iteration >= round + rounds && p.elapsed_ms >= at + ms,
            None => false,
        }
    }

    /// After a step, give it a fresh stall window to work in.
    fn restart_stall_window(&mut self, p: &Progress) {
        if let Some((low, _, _)) = self.low {
            self.low = Some((low, p.iteration, p.elapsed_ms));
        }
    }

    fn escalate(&mut self, cfg: &EscalateConfig, p: &Progress) -> Vec<Decision> {
        if let Some(d) = self.postcopy_after_first_pass(cfg, p) {
            return vec![d];
        }
        if !self.stalled(p, cfg.stall_rounds, cfg.stall_ms) {
            return Vec::new();
        }
        let (low, round, at) = self.low.unwrap_or_default();
        let rate = p.throughput_bps.max(1.0);
        let numbers = format!(
            "remaining memory has not gone below {:.1} MiB for {} rounds and {:.1} s (sending {:.1} MiB/s, guest dirtying {:.1} MiB/s)",
            mib(low),
            p.iteration.saturating_sub(round),
            p.elapsed_ms.saturating_sub(at) as f64 / 1000.0,
            rate / MIB,
            p.dirty_rate_bps / MIB,
        );
        self.restart_stall_window(p);
        // While QEMU's auto-converge is still raising the throttle (or the controller has
        // ceilings left to raise), the pause stops at the soft cap.
        let throttle_now = p.cpu_throttle_percent.unwrap_or(0);
        let throttle_rising = throttle_now > self.throttle_at_last_stall.unwrap_or(0)
            || (cfg.throttle && self.throttle_step < THROTTLE_STEPS.len());
        self.throttle_at_last_stall = Some(throttle_now);
        let cap_ms = match cfg.soft_cap_ms {
            Some(soft) if !self.soft_cap_lifted && throttle_rising => soft.min(cfg.downtime_cap_ms),
            Some(_) => {
                self.soft_cap_lifted = true;
                cfg.downtime_cap_ms
            }
            None => cfg.downtime_cap_ms,
        };
        // 1. A longer pause: what the smallest dirty set needs at link speed, at least double
        // the current target, never more than the cap at link speed. In QEMU's terms (its
        // measured rate) that is the same pause scaled by link / measured rate.
        let link = cfg.link_bps.unwrap_or(rate).max(rate);
        let scale = link / rate;
        let cap_in_qemu_terms = (cap_ms as f64 * scale) as u64;
        if self.downtime_ms < cap_in_qemu_terms {
            let needed = (low as f64 / link * 1000.0 * 1.25).ceil() as u64;
            let ms = ((needed as f64 * scale) as u64)
                .max(self.downtime_ms * 2)
                .min(cap_in_qemu_terms);
            let why_cap = if cap_ms < cfg.downtime_cap_ms {
                format!("cap {cap_ms} ms at link speed while the guest is throttled harder")
            } else {
                format!("cap {cap_ms} ms at link speed")
            };
            let reason = format!(
                "{numbers}; sending {:.1} MiB at link speed ({:.1} MiB/s) pauses about {needed} ms; target raised from {} ms to {ms} ms in QEMU's terms ({why_cap})",
                mib(low),
                link / MIB,
                self.downtime_ms,
            );
            return vec![self.decide(p, Action::SetDowntime { ms }, reason)];
        }
        // 2. Slow the guest down.
        if cap_ms < cfg.downtime_cap_ms
            && !(cfg.throttle && self.throttle_step < THROTTLE_STEPS.len())
        {
            let reason = format!(
                "{numbers}; downtime target held at {cap_ms} ms while auto-converge throttles the vCPUs harder (now {throttle_now} %)"
            );
            return vec![self.decide(p, Action::Hold, reason)];
        }
        if cfg.throttle && self.throttle_step < THROTTLE_STEPS.len() {
            let max_pct = THROTTLE_STEPS[self.throttle_step];
            self.throttle_step += 1;
            let reason = format!(
                "{numbers}; downtime target already at its cap of {cap_ms} ms, so auto-converge may now throttle the vCPUs up to {max_pct} %"
            );
            let action = Action::SetThrottleCeiling {
                max_pct,
                increment_pct: 20,
            };
            return vec![self.decide(p, action, reason)];
        }
        // 3. Finish on the destination.
        if cfg.postcopy && self.postcopy_permitted {
            let reason = format!(
                "{numbers}; downtime at its cap and throttling exhausted, switching to post-copy"
            );
            return vec![self.decide(p, Action::StartPostcopy, reason)];
        }
        if !self.exhausted_logged {
            self.exhausted_logged = true;
            let reason = format!(
                "{numbers}; no escalation step left (post-copy not permitted); waiting for the completion budget"
            );
            return vec![self.decide(p, Action::Hold, reason)];
        }
        Vec::new()
    }

    /// Post-copy once the first pass is done (QEMU's second dirty-bitmap sync), unless what is
    /// left already fits the pause at the current rate: then QEMU is about to switch over on
    /// its own, and pre-copy ends with nothing left for the destination to fetch.
    fn postcopy_after_first_pass(
        &mut self,
        cfg: &EscalateConfig,
        p: &Progress,
    ) -> Option<Decision> {
        if !(cfg.postcopy_after_first_pass && cfg.postcopy && self.postcopy_permitted) {
            return None;
        }
        if p.iteration < 2 || p.throughput_bps <= 0.0 {
            return None;
        }
        let fits = p.remaining_bytes as f64 <= p.throughput_bps * self.downtime_ms as f64 / 1000.0;
        if fits {
            return None;
        }
        let reason = format!(
            "first pass done with {:.1} MiB dirtied again (sending {:.1} MiB/s, guest dirtying {:.1} MiB/s): switching to post-copy, so each of those pages crosses the link once more while the guest runs on the destination",
            mib(p.remaining_bytes),
            p.throughput_bps / MIB,
            p.dirty_rate_bps / MIB,
        );
        Some(self.decide(p, Action::StartPostcopy, reason))
    }

    fn downtime_schedule(
        &mut self,
        max_ms: u64,
        steps: u64,
        delay_ms: u64,
        p: &Progress,
    ) -> Vec<Decision> {
        let steps = steps.max(1);
        let base = max_ms / steps;
        let offset = (max_ms - base) / steps;
        let mut out = Vec::new();
        while self.schedule_step <= steps && p.elapsed_ms >= self.schedule_step * delay_ms {
            let ms = base + offset * self.schedule_step;
            let reason = format!(
                "downtime schedule step {} of {steps} at {:.1} s",
                self.schedule_step,
                (self.schedule_step * delay_ms) as f64 / 1000.0
            );
            self.schedule_step += 1;
            if ms != self.downtime_ms {
                out.push(self.decide(p, Action::SetDowntime { ms }, reason));
            }
        }
        out
    }

    fn progress_timeout(&mut self, timeout_ms: u64, p: &Progress) -> Vec<Decision> {
        match self.low {
            Some((low, _, _)) if p.remaining_bytes >= low => {}
            _ => self.low = Some((p.remaining_bytes, p.iteration, p.elapsed_ms)),
        }
        let (low, _, at) = self.low.unwrap_or_default();
        if p.elapsed_ms.saturating_sub(at) < timeout_ms {
            return Vec::new();
        }
        let reason = format!(
            "no progress for {:.1} s (remaining memory has not gone below {:.1} MiB)",
            timeout_ms as f64 / 1000.0,
            mib(low)
        );
        vec![self.decide(p, Action::Abort { timeout: true }, reason)]
    }

    fn double_on_growth(&mut self, growths: u64, poll_ms: u64, p: &Progress) -> Vec<Decision> {
        if self
            .last_poll_ms
            .is_some_and(|t| p.elapsed_ms < t + poll_ms)
        {
            return Vec::new();
        }
        self.last_poll_ms = Some(p.elapsed_ms);
        let last = self.last_remaining.replace(p.remaining_bytes);
        if last.is_none_or(|last| p.remaining_bytes <= last) {
            return Vec::new();
        }
        self.growths += 1;
        if self.growths < growths.max(1) {
            return Vec::new();
        }
        self.growths = 0;
        let ms = self.downtime_ms.saturating_mul(2).min(2_000_000);
        let reason = format!(
            "remaining memory grew {growths} times between polls (last to {:.1} MiB); downtime target doubled to {ms} ms",
            mib(p.remaining_bytes)
        );
        vec![self.decide(p, Action::SetDowntime { ms }, reason)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pre-copy sample: `remaining` MiB at `ms`, round `iteration`.
    fn sample(ms: u64, iteration: u64, remaining_mib: u64) -> Progress {
        Progress {
            phase: Phase::Precopy,
            elapsed_ms: ms,
            percent: 0.0,
            transferred_bytes: 0,
            remaining_bytes: remaining_mib << 20,
            total_bytes: 512 << 20,
            iteration,
            throughput_bps: 100.0 * MIB,
            dirty_rate_bps: 120.0 * MIB,
            eta_ms: None,
            expected_downtime_ms: None,
            total_time_ms: None,
            downtime_ms: None,
            cpu_throttle_percent: None,
            disks: Vec::new(),
            revision: None,
        }
    }

    /// The shape of a recorded trace of a guest dirtying faster than the link (bench, 512 MiB,
    /// 200 %): the first pass falls from 480 MiB; every later round starts at 60-70 MiB and
    /// falls toward zero before the next sync refills it.
    fn stalled_trace() -> Vec<Progress> {
        let mut t = vec![
            sample(250, 1, 480),
            sample(500, 1, 400),
            sample(1000, 1, 200),
            sample(1500, 2, 90),
        ];
        for i in 0..40 {
            let start = 60 + (i / 2 % 3) * 5;
            let remaining = if i % 2 == 0 { start } else { start / 4 };
            t.push(sample(1750 + i * 250, 3 + i / 2, remaining));
        }
        t
    }

    fn run(c: &mut Controller, trace: &[Progress]) -> Vec<Decision> {
        trace.iter().flat_map(|p| c.on_sample(p)).collect()
    }

    fn escalate(throttle: bool, postcopy: bool) -> Controller {
        Controller::new(
            ControlPolicy::Escalate(EscalateConfig {
                throttle,
                postcopy,
                ..Default::default()
            }),
            50,
            None,
            TimeoutAction::Abort,
            postcopy,
        )
    }

    #[test]
    fn a_converging_trace_leads_to_no_decision() {
        // Every round starts with half the dirty set of the one before and falls to zero.
        let trace: Vec<_> = (0..20)
            .map(|i| {
                sample(
                    250 * (i + 1),
                    i / 2 + 1,
                    if i % 2 == 0 { 500 >> (i / 2) } else { 0 },
                )
            })
            .collect();
        let mut c = escalate(true, true);
        assert!(run(&mut c, &trace).is_empty());
    }

    #[test]
    fn a_stall_raises_downtime_then_throttles_then_switches_to_postcopy() {
        let mut c = escalate(true, true);
        let d = run(&mut c, &stalled_trace());
        let actions: Vec<_> = d.iter().map(|d| d.action.clone()).collect();
        // 60 MiB at 100 MiB/s needs ~750 ms: the first raise jumps to the 500 ms cap.
        assert_eq!(actions[0], Action::SetDowntime { ms: 500 });
        assert!(d[0].reason.contains("60.0 MiB"), "{}", d[0].reason);
        assert!(
            d[0].reason.contains("from 50 ms to 500 ms"),
            "{}",
            d[0].reason
        );
        assert_eq!(
            actions[1],
            Action::SetThrottleCeiling {
                max_pct: 50,
                increment_pct: 20
            }
        );
        assert_eq!(
            actions[2..],
            [
                Action::SetThrottleCeiling {
                    max_pct: 80,
                    increment_pct: 20
                },
                Action::SetThrottleCeiling {
                    max_pct: 99,
                    increment_pct: 20
                },
                Action::StartPostcopy
            ]
        );
        // Steps are spaced by a full stall window each.
        for w in d.windows(2) {
            assert!(w[1].elapsed_ms - w[0].elapsed_ms >= 1500, "{d:?}");
        }
    }

    fn after_first_pass(permitted: bool) -> Controller {
        Controller::new(
            ControlPolicy::Escalate(EscalateConfig {
                throttle: true,
                postcopy: permitted,
                postcopy_after_first_pass: true,
                ..Default::default()
            }),
            50,
            None,
            TimeoutAction::Abort,
            permitted,
        )
    }

    #[test]
    fn a_busy_guest_goes_post_copy_once_its_first_pass_is_done() {
        let mut c = after_first_pass(true);
        let d = run(&mut c, &stalled_trace());
        assert_eq!(d.len(), 1, "one decision, then nothing: {d:?}");
        assert_eq!(d[0].action, Action::StartPostcopy);
        // The first sample of round 2: 90 MiB dirtied again during the first pass.
        assert_eq!(d[0].elapsed_ms, 1500);
        assert!(
            d[0].reason.contains("first pass done with 90.0 MiB"),
            "{}",
            d[0].reason
        );
    }

    #[test]
    fn post_copy_after_the_first_pass_needs_permission_and_a_guest_that_would_not_finish() {
        // Not permitted: the ordinary escalation, never post-copy.
        let d = run(&mut after_first_pass(false), &stalled_trace());
        assert!(!d.is_empty());
        assert!(d.iter().all(|d| d.action != Action::StartPostcopy), "{d:?}");
        // An idle guest's second round fits the pause at once: QEMU switches over itself.
        let d = run(&mut after_first_pass(true), &idle_trace());
        assert!(d.is_empty(), "{d:?}");
        // The first pass is never cut short.
        let first_pass: Vec<_> = stalled_trace().into_iter().take(3).collect();
        assert!(run(&mut after_first_pass(true), &first_pass).is_empty());
    }

    #[test]
    fn the_pause_waits_at_the_soft_cap_while_the_throttle_rises() {
        let mut c = Controller::new(
            ControlPolicy::Escalate(EscalateConfig {
                soft_cap_ms: Some(100),
                ..Default::default()
            }),
            50,
            None,
            TimeoutAction::Abort,
            false,
        );
        // QEMU's auto-converge raises the throttle by 20 about every stall window, up to 99 %.
        let trace: Vec<_> = stalled_trace()
            .into_iter()
            .map(|mut p| {
                p.cpu_throttle_percent = Some((20 * (p.elapsed_ms / 1400)).min(99));
                p
            })
            .collect();
        let d = run(&mut c, &trace);
        assert_eq!(d[0].action, Action::SetDowntime { ms: 100 }, "{d:?}");
        assert!(d[0].reason.contains("throttled harder"), "{}", d[0].reason);
        assert_eq!(d[1].action, Action::Hold, "{d:?}");
        assert!(d[1].reason.contains("held at 100 ms"), "{}", d[1].reason);
        // Once a stall window passes without the throttle rising, the full cap applies.
        let full: Vec<_> = d
            .iter()
            .filter(|d| d.action == Action::SetDowntime { ms: 500 })
            .collect();
        assert_eq!(full.len(), 1, "{d:?}");
        let at = full[0].elapsed_ms;
        assert!(
            trace
                .iter()
                .filter(|p| p.elapsed_ms + 1500 >= at && p.elapsed_ms <= at)
                .all(|p| p.cpu_throttle_percent == Some(99)),
            "lifted while the throttle still rose: {d:?}"
        );
    }

    #[test]
    fn a_collapsed_measured_rate_is_corrected_with_the_link_rate() {
        // 10 MiB left, QEMU measures 4 MiB/s (little to send), the link does 16 MiB/s: a
        // 500 ms cap at link speed is 2000 ms in QEMU's terms; 10 MiB needs ~781 ms at link
        // speed, i.e. ~3125 ms in QEMU's terms, so the target goes to the 2000 ms cap.
        let mut c = Controller::new(
            ControlPolicy::Escalate(EscalateConfig {
                link_bps: Some(16.0 * MIB),
                ..Default::default()
            }),
            500,
            None,
            TimeoutAction::Abort,
            false,
        );
        let trace: Vec<_> = (0..24)
            .map(|i| {
                let mut s = sample(250 * (i + 1), i / 2 + 1, if i % 2 == 0 { 10 } else { 2 });
                s.throughput_bps = 4.0 * MIB;
                s
            })
            .collect();
        let d = run(&mut c, &trace);
        assert_eq!(d[0].action, Action::SetDowntime { ms: 2000 }, "{d:?}");
    }

    #[test]
    fn small_downtime_raises_double_first() {
        let mut c = escalate(false, false);
        // Rounds starting at 6 MiB at 100 MiB/s need ~75 ms: double from 50 to 100 ms.
        let trace: Vec<_> = (0..12).map(|i| sample(250 * (i + 1), i + 1, 6)).collect();
        let d = run(&mut c, &trace);
        assert_eq!(d[0].action, Action::SetDowntime { ms: 100 });
        assert_eq!(c.downtime_ms(), 100);
    }

    #[test]
    fn without_postcopy_the_controller_says_once_that_it_is_out_of_steps() {
        let mut c = escalate(false, false);
        let d = run(&mut c, &stalled_trace());
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[1].reason.contains("no escalation step left"));
    }

    #[test]
    fn budget_aborts_or_switches_to_postcopy() {
        let trace = stalled_trace();
        let mut c = Controller::new(
            ControlPolicy::Fixed,
            300,
            Some(3000),
            TimeoutAction::Postcopy,
            false,
        );
        let d = run(&mut c, &trace);
        assert_eq!(d.len(), 1, "one decision, then nothing: {d:?}");
        assert_eq!(d[0].action, Action::Abort { timeout: true });
        assert_eq!(d[0].elapsed_ms, 3000);
        let mut c = Controller::new(
            ControlPolicy::Fixed,
            300,
            Some(3000),
            TimeoutAction::Postcopy,
            true,
        );
        assert_eq!(run(&mut c, &trace)[0].action, Action::StartPostcopy);
    }

    #[test]
    fn downtime_schedule_follows_novas_formula() {
        let mut c = Controller::new(
            ControlPolicy::DowntimeSteps {
                max_ms: 500,
                steps: 10,
                delay_ms: 1000,
            },
            300,
            None,
            TimeoutAction::Abort,
            false,
        );
        let d = run(&mut c, &stalled_trace());
        let ms: Vec<_> = d
            .iter()
            .map(|d| match d.action {
                Action::SetDowntime { ms } => ms,
                _ => panic!("{d:?}"),
            })
            .collect();
        assert_eq!(ms, [50, 95, 140, 185, 230, 275, 320, 365, 410, 455, 500]);
    }

    #[test]
    fn progress_timeout_aborts_after_no_new_low() {
        let mut c = Controller::new(
            ControlPolicy::ProgressTimeout { timeout_ms: 2000 },
            300,
            None,
            TimeoutAction::Abort,
            false,
        );
        let d = run(&mut c, &stalled_trace());
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].action, Action::Abort { timeout: true });
        // The lowest remaining (15 MiB, a round's tail) is first seen at 2000 ms.
        assert_eq!(d[0].elapsed_ms, 4000);
    }

    #[test]
    fn double_on_growth_doubles_each_time_remaining_grows() {
        let mut c = Controller::new(
            ControlPolicy::DoubleOnGrowth {
                growths: 2,
                poll_ms: 500,
            },
            100,
            None,
            TimeoutAction::Abort,
            false,
        );
        // Polls at 250, 750, 1250, ... (every 500 ms): remaining 100, 90, 95, 80, 85, 90.
        let trace: Vec<_> = [100, 70, 90, 60, 95, 50, 80, 40, 85, 30, 90]
            .iter()
            .enumerate()
            .map(|(i, r)| sample(250 * (i as u64 + 1), 1 + i as u64, *r))
            .collect();
        let d = run(&mut c, &trace);
        // Growths at the polls 90->95, 80->85 (double), 85->90 (one more, no double yet).
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(c.downtime_ms(), 200);
        assert!(d[0].reason.contains("grew 2 times"));
    }

    #[test]
    fn nothing_is_decided_outside_precopy() {
        let mut c = escalate(true, true);
        let mut p = sample(100_000, 50, 60);
        p.phase = Phase::Switchover;
        assert!(c.on_sample(&p).is_empty());
        p.phase = Phase::Postcopy;
        assert!(c.on_sample(&p).is_empty());
        p.phase = Phase::Precopy;
        assert!(
            c.on_sample(&p).is_empty(),
            "post-copy was seen: no more steps"
        );
    }

    /// An idle 512 MiB guest's samples as the bench records them at 50 ms: the first pass
    /// at 512 MiB/s, then round 2 starts with 4 MiB dirtied.
    fn idle_trace() -> Vec<Progress> {
        let mut t: Vec<Progress> = [(250, 1, 384), (500, 1, 256), (750, 1, 128)]
            .into_iter()
            .map(|(ms, i, left)| sample(ms, i, left))
            .collect();
        t.extend(
            [(1000, 2, 4), (1050, 2, 1), (1100, 3, 1)].map(|(ms, i, left)| Progress {
                throughput_bps: 512.0 * MIB,
                dirty_rate_bps: MIB,
                ..sample(ms, i, left)
            }),
        );
        t
    }

    /// The controller for an auto plan that predicted `predicted_ms`.
    fn planned(predicted_ms: Option<u64>) -> Controller {
        let cfg = EscalateConfig {
            predicted_total_ms: predicted_ms,
            ..EscalateConfig::default()
        };
        let params = crate::MigrationParams {
            downtime_limit_ms: 50,
            ..crate::MigrationParams::default()
        };
        Controller::for_params(&params, ControlPolicy::Escalate(cfg))
    }

    #[test]
    fn the_first_round_revises_a_prediction_that_was_off() {
        // The plan said 2.5 s (a probe's rate); the first pass took 1 s.
        let mut c = planned(Some(2500));
        let mut notices = Vec::new();
        let mut seen = Vec::new();
        for mut p in idle_trace() {
            notices.extend(c.revise(&mut p));
            seen.push(p);
        }
        assert!(
            seen[..3].iter().all(|p| p.revision.is_none()),
            "none in round 1"
        );
        let r = seen[3].revision.clone().expect("revised at round 2");
        assert_eq!(r.round, 2);
        // 4 MiB at 512 MiB/s: 8 ms, within the 50 ms target, so that is the pause.
        assert_eq!(r.total_ms, Some(1007));
        assert_eq!(r.pause_ms, Some(8));
        assert_eq!(seen[3].eta_ms, Some(7), "the ETA follows the revision");
        assert_eq!(
            seen[4].revision.as_ref().map(|r| r.round),
            Some(2),
            "carried on"
        );
        assert_eq!(seen[5].revision.as_ref().map(|r| r.round), Some(3));
        assert_eq!(
            notices.len(),
            1,
            "one notice, when it moved from 2.5 s: {notices:?}"
        );
        assert_eq!(
            notices[0].action,
            Action::Revise {
                total_ms: Some(1007),
                pause_ms: Some(8)
            }
        );
        assert!(
            notices[0]
                .reason
                .contains("total 1.0 s, pause 8 ms (was 2.5 s)"),
            "{}",
            notices[0].reason
        );
    }

    #[test]
    fn a_prediction_that_holds_is_not_announced_again() {
        let mut c = planned(Some(1100));
        let notices: Vec<Decision> = idle_trace()
            .into_iter()
            .filter_map(|mut p| c.revise(&mut p))
            .collect();
        assert!(
            notices.is_empty(),
            "1.0 s is within a quarter of 1.1 s: {notices:?}"
        );
        // A policy without a plan announces its first prediction.
        let mut fixed =
            Controller::new(ControlPolicy::Fixed, 300, None, TimeoutAction::Abort, false);
        let first: Vec<Decision> = idle_trace()
            .into_iter()
            .filter_map(|mut p| fixed.revise(&mut p))
            .collect();
        assert_eq!(first.len(), 1, "{first:?}");
    }

    #[test]
    fn a_throttled_guest_is_revised_with_its_throttle() {
        // Round 4 of a guest writing 120 MiB/s unthrottled, held at 75 % (30 MiB/s), QEMU
        // sending 100 MiB/s with 100 MiB left: 1 s, 0.3 s, 0.09 s, then 27 ms of pause.
        let p = Progress {
            dirty_rate_bps: 30.0 * MIB,
            cpu_throttle_percent: Some(75),
            ..sample(9000, 4, 100)
        };
        let params = crate::MigrationParams {
            downtime_limit_ms: 50,
            auto_converge: true,
            throttle_initial_pct: 75,
            throttle_increment_pct: 20,
            max_throttle_pct: 99,
            ..crate::MigrationParams::default()
        };
        let mut c = Controller::for_params(&params, ControlPolicy::Fixed);
        let mut q = p.clone();
        let notice = c.revise(&mut q).expect("a first prediction is announced");
        let r = q.revision.unwrap();
        assert_eq!(r.dirty_rate_bps, 120.0 * MIB, "taken back to unthrottled");
        assert_eq!(r.total_ms, Some(9000 + 1417));
        assert_eq!(r.pause_ms, Some(27));
        assert!(notice.reason.contains("throttle 75 %"), "{}", notice.reason);
        // Without auto-converge the same guest outruns QEMU: no end, and the log says so.
        let mut plain =
            Controller::for_params(&crate::MigrationParams::default(), ControlPolicy::Fixed);
        let mut q = Progress {
            cpu_throttle_percent: None,
            dirty_rate_bps: 120.0 * MIB,
            ..p
        };
        let notice = plain.revise(&mut q).unwrap();
        assert_eq!(q.revision.unwrap().total_ms, None);
        assert!(
            notice.reason.contains("no end at these rates"),
            "{}",
            notice.reason
        );
    }
}
