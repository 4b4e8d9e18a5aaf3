//! What QEMU can send on this machine: each scenario's guest, filled the same way, migrated
//! while paused, the way QEMU sends fastest here (unlimited, parallel channels, one per core),
//! with nothing else limiting it (no budget of a policy).
//!
//! Raw TCP between two namespaces is kernel to kernel; a migration stream shares the machine's
//! cores with QEMU's sender, its receiver and, while the guest runs, the guest's own vCPU. A
//! paused guest takes the last of these away, so its migration is the fastest this machine
//! moves that memory over that link: the ceiling every cell's link ratio is also taken against.
//! On a shared machine one paused migration may fall on a busy moment, so each scenario's is
//! taken before and after its cells, and the faster one counts.

use std::time::Duration;

use ferry_lab::Lab;
use ferry_migrate::{AbortHandle, ControlPolicy, MigrationParams, TimeoutAction};
use ferry_qmp::Stop;
use serde::Serialize;

use crate::error::BenchError;
use crate::{boot_filled, tx_bytes, Scenario};

/// One scenario's paused migration.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Ceiling {
    pub scenario: String,
    /// `before` or `after` the scenario's cells.
    pub when: String,
    /// QEMU's total time.
    pub total_ms: Option<u64>,
    /// QEMU's pause at switchover (the guest was paused anyway).
    pub qemu_pause_ms: Option<u64>,
    /// The guest's RAM that had to move: RAM minus the zero pages QEMU found.
    pub nonzero_ram_bytes: Option<u64>,
    /// What QEMU sent (its `transferred`).
    pub transferred_bytes: Option<u64>,
    /// Bytes that left hv1's migration interface.
    pub bytes_on_wire: u64,
    /// Non-zero RAM per second of QEMU's total time: the same measure as a cell's link ratio
    /// takes against raw TCP.
    pub rate_bps: Option<f64>,
    pub rate_mbit_s: Option<f64>,
    /// That rate against the raw TCP throughput of the same link.
    pub raw_tcp_ratio: Option<f64>,
    pub error: Option<String>,
}

/// Boots `sc`'s guest, lets it fill its working set, pauses it and migrates it hv1 -> hv2;
/// the guest is stopped afterwards. A failed migration is a result with its error. `when`
/// says where in the scenario it ran; progress goes to stderr.
pub(crate) async fn measure(
    lab: &Lab,
    sc: &Scenario,
    link_bps: f64,
    when: &str,
) -> Result<Ceiling, BenchError> {
    crate::say(&format!(
        "{} / paused guest, {when} (the ceiling)...",
        sc.name
    ));
    let (mut vm, _) = boot_filled(lab, sc, 0).await?;
    vm.qemu.qmp().execute(&Stop {}).await?;
    // QEMU's fastest way to send here: parallel channels, one per core (at most 4).
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let params = MigrationParams {
        announce: None,
        policy: ControlPolicy::Fixed,
        allow_paused_source: true,
        multifd_channels: Some(cores.clamp(2, 4) as u8),
        sample_interval: Duration::from_millis(50),
        completion_timeout: Some(Duration::from_secs(120)),
        timeout_action: TimeoutAction::Abort,
        ..MigrationParams::default()
    };
    let hv1 = lab.net.host("hv1")?.netns.clone();
    let tx_before = tx_bytes(&hv1)?;
    let (_abort, signal) = AbortHandle::new();
    let result = lab
        .migrate(&mut vm, "hv2", &params, &mut |_| {}, signal)
        .await;
    let mut c = Ceiling {
        scenario: sc.name.clone(),
        when: when.into(),
        bytes_on_wire: tx_bytes(&hv1)?.saturating_sub(tx_before),
        ..Ceiling::default()
    };
    match result {
        Ok(out) => {
            let s = &out.source;
            let total_ms = if s.total_time_ms > 0 {
                s.total_time_ms
            } else {
                s.final_progress.elapsed_ms
            };
            let nonzero = s.final_progress.total_bytes.saturating_sub(s.zero_bytes);
            let rate = nonzero as f64 / (total_ms.max(1) as f64 / 1000.0);
            c.total_ms = Some(total_ms);
            c.qemu_pause_ms = Some(s.downtime_ms);
            c.nonzero_ram_bytes = Some(nonzero);
            c.transferred_bytes = Some(s.transferred_bytes);
            c.rate_bps = Some(rate);
            c.rate_mbit_s = Some(rate * 8e-6);
            c.raw_tcp_ratio = Some(rate / link_bps);
        }
        Err(e) => c.error = Some(e.to_string()),
    }
    lab.stop_guest(vm).await;
    crate::say(&format!("  {}", line(&c)));
    Ok(c)
}

/// The fastest of a scenario's paused migrations: the machine allowed at least that.
pub(crate) fn best(runs: &[Ceiling]) -> Option<&Ceiling> {
    runs.iter().filter(|c| c.rate_bps.is_some()).max_by(|a, b| {
        a.rate_bps
            .partial_cmp(&b.rate_bps)
            .unwrap_or(std::cmp::Ordering::Equal)
    })
}

/// A cell's rate (non-zero RAM per second) against its scenario's ceiling.
pub(crate) fn ratio(rate_bps: Option<f64>, ceiling: Option<&Ceiling>) -> Option<f64> {
    let c = ceiling?.rate_bps.filter(|c| *c > 0.0)?;
    Some(rate_bps? / c)
}

/// One line for the progress output.
fn line(c: &Ceiling) -> String {
    match (c.total_ms, c.rate_mbit_s, c.raw_tcp_ratio) {
        (Some(ms), Some(mbit), Some(r)) => format!(
            "paused guest moved in {ms} ms: {mbit:.0} Mbit/s of non-zero RAM, {r:.2} of raw TCP"
        ),
        _ => format!(
            "paused guest not moved: {}",
            c.error.as_deref().unwrap_or("no figures")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paused(when: &str, rate: Option<f64>) -> Ceiling {
        Ceiling {
            scenario: "s".into(),
            when: when.into(),
            rate_bps: rate,
            error: rate.is_none().then(|| "failed".into()),
            ..Ceiling::default()
        }
    }

    #[test]
    fn the_faster_paused_migration_is_the_ceiling_and_cells_are_taken_against_it() {
        let runs = [paused("before", Some(60e6)), paused("after", Some(90e6))];
        let fastest = best(&runs).unwrap();
        assert_eq!(fastest.when, "after");
        assert_eq!(ratio(Some(45e6), Some(fastest)), Some(0.5));
        let failed = [paused("before", None), paused("after", Some(30e6))];
        assert_eq!(
            best_when(&failed),
            Some("after"),
            "a failed one never counts"
        );
        assert_eq!(best(&[paused("before", None)]).map(|c| c.rate_bps), None);
        assert_eq!(ratio(None, Some(&runs[0])), None);
    }

    fn best_when(runs: &[Ceiling]) -> Option<&str> {
        best(runs).map(|c| c.when.as_str())
    }
}
