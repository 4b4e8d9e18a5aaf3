//! Predicted against actual: what Ferry said a migration would take, and what it took.
//!
//! Two predictions are kept per run. Ferry auto's plan, made before the stream starts from
//! the dirty rate, the link and what QEMU got through on this link in the run's earlier
//! migrations (as the server learns it per host pair), along with the same plan made from the
//! probe alone (what the planner had before it learned). And the controller's first revision,
//! at the start of round 2, from QEMU's own figures: every configuration runs the controller,
//! so every cell that got that far has one. Errors are taken against QEMU's total time and
//! pause, cell by cell, and summarised as the median absolute error across cells.

use ferry_migrate::control::Revision;
use ferry_migrate::Plan;
use serde::Serialize;

use crate::render;

/// One run's predictions (all `None` where there was none).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct Predicted {
    /// The plan's total and pause (Ferry auto).
    pub plan_total_ms: Option<u64>,
    pub plan_pause_ms: Option<u64>,
    /// The rate the plan assumed, and whether it was learned (else a share of the probe).
    pub plan_rate_mib_s: Option<f64>,
    pub plan_rate_learned: Option<bool>,
    /// The same plan's total from the probe alone.
    pub probe_only_total_ms: Option<u64>,
    /// The controller's first revision: its round, when, and what it said.
    pub revised_round: Option<u64>,
    pub revised_at_ms: Option<u64>,
    pub revised_total_ms: Option<u64>,
    pub revised_pause_ms: Option<u64>,
}

impl Predicted {
    /// From the plan the run used and the one the probe alone gives (both Ferry auto's).
    pub fn planned(plan: Option<&Plan>, probe_only: Option<&Plan>, learned: bool) -> Predicted {
        Predicted {
            plan_total_ms: plan.and_then(|p| p.prediction.total_ms),
            plan_pause_ms: plan.map(|p| p.prediction.downtime_ms),
            plan_rate_mib_s: plan.map(|p| p.prediction.rate_bps / 1048576.0),
            plan_rate_learned: plan.map(|_| learned),
            probe_only_total_ms: probe_only.or(plan).and_then(|p| p.prediction.total_ms),
            ..Predicted::default()
        }
    }

    /// Keeps the first revision a sample carries.
    pub fn saw(&mut self, revision: Option<&Revision>) {
        if let (None, Some(r)) = (self.revised_round, revision) {
            self.revised_round = Some(r.round);
            self.revised_at_ms = Some(r.at_ms);
            self.revised_total_ms = r.total_ms;
            self.revised_pause_ms = r.pause_ms;
        }
    }
}

/// A cell's predictions (medians over its converged runs) with their errors, percent of the
/// actual figure.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct CellPrediction {
    #[serde(flatten)]
    pub predicted: Predicted,
    pub plan_total_error_pct: Option<f64>,
    pub plan_pause_error_pct: Option<f64>,
    pub probe_only_total_error_pct: Option<f64>,
    pub revised_total_error_pct: Option<f64>,
    pub revised_pause_error_pct: Option<f64>,
}

/// |predicted - actual| / actual, in percent; nothing without both (or an actual of 0).
fn error_pct(predicted: Option<u64>, actual: Option<u64>) -> Option<f64> {
    let (p, a) = (predicted? as f64, actual.filter(|a| *a > 0)? as f64);
    Some((p - a).abs() / a * 100.0)
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> Option<T> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied()
}

impl CellPrediction {
    /// The medians of `runs` (the converged ones) against the cell's actual total and pause.
    pub fn of(runs: &[&Predicted], total_ms: Option<u64>, pause_ms: Option<u64>) -> Self {
        let m =
            |f: fn(&Predicted) -> Option<u64>| median(runs.iter().filter_map(|r| f(r)).collect());
        let predicted = Predicted {
            plan_total_ms: m(|r| r.plan_total_ms),
            plan_pause_ms: m(|r| r.plan_pause_ms),
            plan_rate_mib_s: median(runs.iter().filter_map(|r| r.plan_rate_mib_s).collect()),
            plan_rate_learned: runs.iter().find_map(|r| r.plan_rate_learned),
            probe_only_total_ms: m(|r| r.probe_only_total_ms),
            revised_round: m(|r| r.revised_round),
            revised_at_ms: m(|r| r.revised_at_ms),
            revised_total_ms: m(|r| r.revised_total_ms),
            revised_pause_ms: m(|r| r.revised_pause_ms),
        };
        CellPrediction {
            plan_total_error_pct: error_pct(predicted.plan_total_ms, total_ms),
            plan_pause_error_pct: error_pct(predicted.plan_pause_ms, pause_ms),
            probe_only_total_error_pct: error_pct(predicted.probe_only_total_ms, total_ms),
            revised_total_error_pct: error_pct(predicted.revised_total_ms, total_ms),
            revised_pause_error_pct: error_pct(predicted.revised_pause_ms, pause_ms),
            predicted,
        }
    }

    fn any(&self) -> bool {
        self.predicted.plan_pause_ms.is_some() || self.predicted.revised_round.is_some()
    }
}

/// One kind of prediction across the cells that have it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct ErrorSummary {
    pub cells: usize,
    /// The median absolute error, percent of the actual figure.
    pub median_abs_error_pct: Option<f64>,
}

/// The median absolute errors of every kind of prediction.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct Errors {
    pub plan_total: ErrorSummary,
    pub plan_pause: ErrorSummary,
    pub probe_only_total: ErrorSummary,
    pub revised_total: ErrorSummary,
    pub revised_pause: ErrorSummary,
}

impl Errors {
    pub fn of<'a>(cells: impl Iterator<Item = &'a CellPrediction> + Clone) -> Errors {
        let summary = |f: fn(&CellPrediction) -> Option<f64>| {
            let v: Vec<f64> = cells.clone().filter_map(f).collect();
            ErrorSummary {
                cells: v.len(),
                median_abs_error_pct: median(v),
            }
        };
        Errors {
            plan_total: summary(|c| c.plan_total_error_pct),
            plan_pause: summary(|c| c.plan_pause_error_pct),
            probe_only_total: summary(|c| c.probe_only_total_error_pct),
            revised_total: summary(|c| c.revised_total_error_pct),
            revised_pause: summary(|c| c.revised_pause_error_pct),
        }
    }
}

/// The predictions table: one row per cell that has a prediction, then the medians.
pub(crate) fn markdown<'a>(
    rows: impl Iterator<
        Item = (
            &'a str,
            &'a str,
            Option<u64>,
            Option<u64>,
            &'a CellPrediction,
        ),
    >,
    errors: &Errors,
) -> String {
    let headers = [
        "scenario",
        "config",
        ">actual total ms",
        ">plan total ms",
        ">error %",
        ">probe-only total ms",
        ">error %",
        ">revised total ms",
        ">error %",
        ">actual pause ms",
        ">plan pause ms",
        ">error %",
        ">revised pause ms",
        ">error %",
        ">plan rate MiB/s",
        ">revised at",
    ];
    let n = |v: Option<u64>| render::dash(v.map(|v| v.to_string()));
    let pct = |v: Option<f64>| render::dash(v.map(|v| format!("{v:.0}")));
    let rows: Vec<Vec<String>> = rows
        .filter(|(.., p)| p.any())
        .map(|(scenario, config, total, pause, p)| {
            let d = &p.predicted;
            vec![
                scenario.to_string(),
                config.to_string(),
                n(total),
                n(d.plan_total_ms),
                pct(p.plan_total_error_pct),
                n(d.probe_only_total_ms),
                pct(p.probe_only_total_error_pct),
                n(d.revised_total_ms),
                pct(p.revised_total_error_pct),
                n(pause),
                n(d.plan_pause_ms),
                pct(p.plan_pause_error_pct),
                n(d.revised_pause_ms),
                pct(p.revised_pause_error_pct),
                d.plan_rate_mib_s.map_or_else(
                    || "-".into(),
                    |r| {
                        let how = if d.plan_rate_learned == Some(true) {
                            "learned"
                        } else {
                            "probe"
                        };
                        format!("{r:.0} ({how})")
                    },
                ),
                match (d.revised_round, d.revised_at_ms) {
                    (Some(round), Some(at)) => format!("round {round}, {at} ms"),
                    _ => "-".into(),
                },
            ]
        })
        .collect();
    let line = |what: &str, s: &ErrorSummary| match s.median_abs_error_pct {
        Some(e) => format!(
            "- {what}: median absolute error {e:.0} % over {} cells\n",
            s.cells
        ),
        None => format!("- {what}: no cell\n"),
    };
    format!(
        "{}\n{}{}{}{}{}",
        render::markdown_table(&headers, &rows),
        line("plan, total time (Ferry auto)", &errors.plan_total),
        line("plan, QEMU pause (Ferry auto)", &errors.plan_pause),
        line(
            "plan from the probe alone, total time (Ferry auto)",
            &errors.probe_only_total
        ),
        line(
            "revision at round 2, total time (every configuration)",
            &errors.revised_total
        ),
        line(
            "revision at round 2, QEMU pause (every configuration)",
            &errors.revised_pause
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(plan_total: Option<u64>, revised_total: Option<u64>) -> Predicted {
        Predicted {
            plan_total_ms: plan_total,
            plan_pause_ms: plan_total.map(|_| 10),
            plan_rate_mib_s: plan_total.map(|_| 500.0),
            plan_rate_learned: plan_total.map(|_| true),
            probe_only_total_ms: plan_total.map(|t| t / 3),
            revised_round: revised_total.map(|_| 2),
            revised_at_ms: revised_total.map(|_| 900),
            revised_total_ms: revised_total,
            revised_pause_ms: revised_total.map(|_| 8),
        }
    }

    #[test]
    fn errors_are_against_the_actual_figures_and_summarised_by_their_median() {
        // Actual 1000 ms and a 20 ms pause; the plan said 1200 ms and 10 ms.
        let a = CellPrediction::of(&[&run(Some(1200), Some(1050))], Some(1000), Some(20));
        assert_eq!(a.plan_total_error_pct, Some(20.0));
        assert_eq!(a.plan_pause_error_pct, Some(50.0));
        assert_eq!(a.probe_only_total_error_pct, Some(60.0));
        assert_eq!(a.revised_total_error_pct, Some(5.0));
        assert_eq!(a.revised_pause_error_pct, Some(60.0));
        let b = CellPrediction::of(&[&run(Some(500), Some(1000))], Some(1000), Some(10));
        // No plan (another platform's policy), a revision that hit.
        let c = CellPrediction::of(&[&run(None, Some(2000))], Some(2000), Some(8));
        // Nothing at all: a cell that did not converge.
        let d = CellPrediction::of(&[], None, None);
        let errors = Errors::of([&a, &b, &c, &d].into_iter());
        assert_eq!(errors.plan_total.cells, 2);
        assert_eq!(
            errors.plan_total.median_abs_error_pct,
            Some(50.0),
            "upper median"
        );
        assert_eq!(errors.revised_total.cells, 3);
        assert_eq!(
            errors.revised_total.median_abs_error_pct,
            Some(0.0),
            "of 5, 0 and 0"
        );
        let cells = [
            ("s", "ferry-auto", Some(1000), Some(20), &a),
            ("s", "nova", None, None, &d),
        ];
        let md = markdown(cells.into_iter(), &errors);
        assert_eq!(
            md.lines().filter(|l| l.starts_with("| s ")).count(),
            1,
            "{md}"
        );
        assert!(md.contains(" 500 (learned) | round 2, 900 ms |"), "{md}");
        assert!(
            md.contains("plan, total time (Ferry auto): median absolute error 50 % over 2 cells"),
            "{md}"
        );
    }

    #[test]
    fn the_first_revision_is_kept() {
        let mut p = Predicted::default();
        let r = |round, total| Revision {
            round,
            at_ms: round * 100,
            total_ms: Some(total),
            pause_ms: Some(3),
            rate_bps: 1.0,
            dirty_rate_bps: 0.0,
        };
        p.saw(None);
        p.saw(Some(&r(2, 1000)));
        p.saw(Some(&r(3, 5000)));
        assert_eq!((p.revised_round, p.revised_total_ms), (Some(2), Some(1000)));
    }
}
