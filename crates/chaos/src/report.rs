//! What a cell found and how a run is printed: one JSON object (`--json`) or a table.

use serde::Serialize;

use crate::watch::WatchReport;

/// One cell's outcome. `ok` is the verdict: no two copies, the job ended, the record named
/// where the guest really runs, and the guest's memory verified (or the guest is gone because
/// its only QEMU was killed). `hit` says whether the fault landed in the phase asked for.
#[derive(Debug, Clone, Serialize)]
pub struct CellResult {
    pub fault: String,
    /// The phase asked for, or for a random cell the phase observed when the fault landed.
    pub phase: String,
    pub hit: bool,
    pub two_copies: bool,
    pub ok: bool,
    /// The job's end state, or its state when the bound ran out.
    pub job_state: String,
    pub job_error: Option<String>,
    /// Where the server's instance record pointed at the end, and its state there.
    pub record_host: Option<String>,
    pub record_state: Option<String>,
    /// Where heartbeats showed the guest running at the end (`none`: nowhere).
    pub running_on: String,
    /// Seconds after the fault cleared until the record named where the guest runs.
    pub record_matched_s: Option<f64>,
    /// Memory verification: pages checked and errors; `None` when no copy runs.
    pub verify_checked: Option<u64>,
    pub verify_errors: Option<u64>,
    /// The job as it was when the fault landed: state/phase/iteration.
    pub at_fault: Option<String>,
    /// What the injection did.
    pub note: String,
    pub watch: WatchReport,
    pub migration: Option<String>,
    /// Seconds the whole cell took.
    pub seconds: f64,
    /// For random cells: the delay after the job was created.
    pub delay_ms: Option<u64>,
    /// Why the cell is not ok (empty when it is).
    pub error: Option<String>,
    /// Where the lab's logs and database were saved for a cell that is not ok.
    pub logs: Option<String>,
}

/// A whole run, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub ok: bool,
    pub cells_total: usize,
    pub cells_ok: usize,
    pub cells_hit: usize,
    pub two_copies: usize,
    pub seed: Option<u64>,
    pub accel: String,
    pub seconds: f64,
    pub cells: Vec<CellResult>,
}

impl Summary {
    pub fn new(cells: Vec<CellResult>, seed: Option<u64>, accel: &str, seconds: f64) -> Summary {
        Summary {
            ok: cells.iter().all(|c| c.ok),
            cells_total: cells.len(),
            cells_ok: cells.iter().filter(|c| c.ok).count(),
            cells_hit: cells.iter().filter(|c| c.hit).count(),
            two_copies: cells.iter().filter(|c| c.two_copies).count(),
            seed,
            accel: accel.to_string(),
            seconds,
            cells,
        }
    }
}

/// The header of [`table_row`]'s table.
pub fn table_header() -> String {
    format!(
        "| {:<22} | {:<14} | {:<3} | {:<3} | {:<3} | {:<10} | {:<20} | {:<6} | {:<7} | {:>5} | {} |\n|{}",
        "fault", "phase", "hit", "2x", "ok", "job", "record", "runs", "verify", "s", "detail",
        "---|".repeat(11)
    )
}

/// One markdown table row per cell, so the table pastes into docs as is.
pub fn table_row(c: &CellResult) -> String {
    let yn = |b: bool| if b { "yes" } else { "no" };
    let record = match (&c.record_host, &c.record_state) {
        (Some(h), Some(s)) => format!("{h} {s}"),
        _ => "-".into(),
    };
    let verify = match (c.verify_checked, c.verify_errors) {
        (Some(_), Some(0)) => "ok".to_string(),
        (Some(_), Some(e)) => format!("{e} err"),
        _ => "-".into(),
    };
    let mut detail = c.note.clone();
    if let Some(e) = &c.job_error {
        detail.push_str(&format!("; job error {e}"));
    }
    if let Some(e) = &c.error {
        detail.push_str(&format!("; NOT OK: {e}"));
    }
    if let Some(l) = &c.logs {
        detail.push_str(&format!("; logs {l}"));
    }
    format!(
        "| {:<22} | {:<14} | {:<3} | {:<3} | {:<3} | {:<10} | {:<20} | {:<6} | {:<7} | {:>5.0} | {} |",
        c.fault,
        c.phase,
        yn(c.hit),
        yn(c.two_copies),
        yn(c.ok),
        c.job_state,
        record,
        c.running_on,
        verify,
        c.seconds,
        detail.replace('|', "/")
    )
}

/// The whole table with a closing line of totals.
pub fn table(s: &Summary) -> String {
    let mut out = table_header();
    for c in &s.cells {
        out.push('\n');
        out.push_str(&table_row(c));
    }
    out.push_str(&format!(
        "\n\n{} cells: {} ok, {} hit their phase, {} with two copies; {:.0} s{}",
        s.cells_total,
        s.cells_ok,
        s.cells_hit,
        s.two_copies,
        s.seconds,
        s.seed.map(|x| format!(", seed {x}")).unwrap_or_default()
    ));
    out
}
