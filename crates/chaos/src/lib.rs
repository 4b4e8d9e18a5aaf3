//! The fault matrix, as code: lab migrations with one fault each (a cancel, a killed QEMU,
//! agent or server, a migration link down) in each phase of a migration, checked against the
//! promise Ferry makes: **never two copies** of a guest running, every job ends, the server's
//! record names the host that really runs the guest, and the guest's memory is intact.
//!
//! The judge is the guest itself (its serial heartbeats on both hosts, its memory
//! self-check), not the server or agents under test. Everything runs on real parts: lab
//! hosts as network namespaces, real QEMU, `ferry server` and `ferry agent` as separate
//! processes ([`daemons`], shared with `ferry lab up`).
//!
//! - [`matrix`]  the faults, phases and slices (full, quick, random with a seed)
//! - [`cluster`] the lab the cells run on; dropping it removes everything
//! - [`cell`]    one cell: guest, migration, fault at the phase, checks
//! - [`inject`]  inflicting and clearing a fault
//! - [`watch`]   where the guest runs, from its heartbeats on both hosts
//! - [`observe`] where a job is, from the server's record
//! - [`report`]  results, JSON summary and table

pub mod cell;
pub mod cluster;
pub mod daemons;
mod error;
pub mod inject;
pub mod matrix;
pub mod observe;
pub mod report;
pub mod watch;

pub use cell::CellOptions;
pub use cluster::{ChaosLab, LabSpec};
pub use error::ChaosError;
pub use matrix::{CellSpec, Fault, Phase};
pub use report::{CellResult, Summary};

/// Runs `cells` one after another on `lab`, calling `each` with every result as it comes (so
/// a long run shows progress); a failed cell does not stop the run. Cells are numbered from 1
/// (their guests' names and addresses).
pub async fn run_cells(
    lab: &mut ChaosLab,
    cells: &[CellSpec],
    opts: &CellOptions,
    mut each: impl FnMut(&CellResult),
) -> Result<Vec<CellResult>, ChaosError> {
    let mut results = Vec::new();
    for (i, spec) in cells.iter().enumerate() {
        let n = u8::try_from(i % 150 + 1).unwrap_or(1);
        let mut r = match cell::run_cell(lab, *spec, n, opts).await {
            Ok(r) => r,
            // The guest could not even be created (the cluster is broken): the cell says so
            // and the next one gets a fresh cluster.
            Err(e) => {
                let mut r = cell::empty_result(*spec);
                r.error = Some(format!("runner: {}", e.body()));
                r
            }
        };
        if !r.ok {
            let label = format!("{:02}-{}-{}", i + 1, r.fault, r.phase);
            r.logs = lab.save_logs(&label).map(|p| p.display().to_string());
        }
        let stuck = !matches!(r.job_state.as_str(), "completed" | "failed" | "cancelled")
            || r.error.as_deref().is_some_and(|e| e.starts_with("runner:"));
        if stuck && i + 1 < cells.len() {
            // A job left running holds its guest's QEMUs and the driver's retries: the next
            // cell gets a fresh cluster.
            lab.rebuild().await?;
        }
        each(&r);
        results.push(r);
    }
    Ok(results)
}
