//! The phase sequence of one live migration and its undo steps.
//!
//! The order and the rules live here once, whoever drives the halves:
//! 1. prepare the destination (start QEMU in incoming mode, listen);
//! 2. run the source until QEMU reports completion;
//! 3. confirm the destination runs the guest;
//! 4. stop the source, which has handed over.
//!
//! Undo: any failure before step 3 removes the destination and leaves the guest running on the
//! source. A failure at step 3 resumes the source only after the destination was killed, so the
//! guest never runs twice.

use std::future::Future;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tracing::{error, warn};

use crate::source::{Observer, SourceOutcome};
use crate::MigrateError;

/// The operations a driver provides for each side; [`live_migrate`] calls them in order.
pub trait MigrationHalves {
    /// Start the destination in incoming mode and make it listen; returns the stream address.
    fn prepare_destination(
        &mut self,
    ) -> impl Future<Output = Result<SocketAddr, MigrateError>> + Send;
    /// Run the source's half to completion (see [`crate::source::run_source`]).
    fn run_source(
        &mut self,
        dest: SocketAddr,
        observe: &mut Observer<'_>,
    ) -> impl Future<Output = Result<SourceOutcome, MigrateError>> + Send;
    /// Wait for the destination guest to run.
    fn confirm_destination(&mut self) -> impl Future<Output = Result<(), MigrateError>> + Send;
    /// Stop the handed-over source process.
    fn finish_source(&mut self) -> impl Future<Output = ()> + Send;
    /// Kill the destination process and free what it held (port, tap, files). An error means
    /// the destination may still run the guest, so the source must not be resumed.
    fn remove_destination(&mut self) -> impl Future<Output = Result<(), MigrateError>> + Send;
    /// Resume the source guest; only called once the destination is gone.
    fn resume_source(&mut self) -> impl Future<Output = Result<(), MigrateError>> + Send;
    /// Post-copy recovery, destination side: listen again for the broken stream (see
    /// [`crate::destination::recover`]). Drivers that cannot leave the migration held.
    fn recover_destination(
        &mut self,
    ) -> impl Future<Output = Result<SocketAddr, MigrateError>> + Send {
        async {
            Err(MigrateError::PostcopyFailed(
                "this driver cannot recover a post-copy stream".into(),
            ))
        }
    }
    /// Post-copy recovery, source side: reconnect to `dest` and follow to the end (see
    /// [`crate::source::reconnect`]).
    fn reconnect_source(
        &mut self,
        dest: SocketAddr,
        observe: &mut Observer<'_>,
    ) -> impl Future<Output = Result<SourceOutcome, MigrateError>> + Send {
        let _ = (dest, observe);
        async {
            Err(MigrateError::PostcopyFailed(
                "this driver cannot recover a post-copy stream".into(),
            ))
        }
    }
}

/// How often a broken post-copy stream is reconnected before the migration is left held
/// (destination paused with the newest memory, source stopped) for the operator.
const POSTCOPY_RECOVERY_ATTEMPTS: u32 = 10;
/// Pause between recovery attempts, while the network may still be down.
const POSTCOPY_RECOVERY_BACKOFF: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs the source half; when its post-copy stream breaks, reconnects it through the halves
/// until it completes or the attempts run out.
async fn run_source_with_recovery<H: MigrationHalves + Send>(
    halves: &mut H,
    dest: SocketAddr,
    observe: &mut Observer<'_>,
) -> Result<SourceOutcome, MigrateError> {
    let mut result = halves.run_source(dest, observe).await;
    let mut attempt = 0;
    while let Err(MigrateError::PostcopyPaused(why)) = &result {
        attempt += 1;
        if attempt > POSTCOPY_RECOVERY_ATTEMPTS {
            return Err(MigrateError::PostcopyFailed(format!(
                "the post-copy stream broke ({why}) and {POSTCOPY_RECOVERY_ATTEMPTS} reconnects failed"
            )));
        }
        warn!(%why, attempt, "post-copy stream broke; reconnecting");
        if attempt > 1 {
            tokio::time::sleep(POSTCOPY_RECOVERY_BACKOFF).await;
        }
        result = match halves.recover_destination().await {
            Ok(addr) => halves.reconnect_source(addr, observe).await,
            Err(e @ MigrateError::PostcopyFailed(_)) => return Err(e),
            Err(e) => {
                warn!(%e, "destination cannot listen again yet");
                Err(MigrateError::PostcopyPaused(why.clone()))
            }
        };
        if let Err(e) = &result {
            if !matches!(
                e,
                MigrateError::PostcopyPaused(_) | MigrateError::PostcopyFailed(_)
            ) {
                warn!(%e, "reconnect failed");
                // A failed reconnect leaves both sides paused: try again.
                result = Err(MigrateError::PostcopyPaused(e.to_string()));
            }
        }
    }
    result
}

/// The result of a completed live migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationOutcome {
    pub destination: SocketAddr,
    pub source: SourceOutcome,
}

/// Runs one live migration through its phases, undoing on failure (see the module docs).
pub async fn live_migrate<H: MigrationHalves + Send>(
    halves: &mut H,
    observe: &mut Observer<'_>,
) -> Result<MigrationOutcome, MigrateError> {
    let dest = match halves.prepare_destination().await {
        Ok(d) => d,
        Err(e) => {
            if let Err(undo) = halves.remove_destination().await {
                warn!(%undo, "destination could not be removed after a failed preparation");
            }
            return Err(e);
        }
    };
    let source = match run_source_with_recovery(halves, dest, observe).await {
        Ok(s) => s,
        Err(e @ (MigrateError::PostcopyFailed(_) | MigrateError::PostcopyPaused(_))) => {
            // The destination holds the guest's newest memory: removing it or resuming the
            // source would lose writes. Both stay as they are for recovery.
            error!(%e, "post-copy failed; destination kept, source not resumed");
            return Err(e);
        }
        Err(e) => {
            if let Err(undo) = halves.remove_destination().await {
                warn!(%undo, "destination could not be removed after a failed migration");
            }
            // The source half resumes its guest itself; make sure of it once more now that the
            // destination is certainly gone.
            if let Err(resume) = halves.resume_source().await {
                error!(%resume, "source guest could not be resumed after a failed migration");
            }
            return Err(e);
        }
    };
    if let Err(e) = halves.confirm_destination().await {
        warn!(%e, "destination did not take over; killing it and resuming the source");
        if let Err(undo) = halves.remove_destination().await {
            // The destination may run the guest: resuming the source could make two copies.
            error!(%undo, "destination could not be removed; the source stays paused");
            return Err(e);
        }
        halves.resume_source().await?;
        return Err(e);
    }
    halves.finish_source().await;
    Ok(MigrationOutcome {
        destination: dest,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the calls and fails where told; pure logic, no QEMU.
    #[derive(Default)]
    struct Script {
        fail_at: &'static [&'static str],
        calls: Vec<&'static str>,
    }

    impl Script {
        fn step(&mut self, name: &'static str) -> Result<(), MigrateError> {
            self.calls.push(name);
            if self.fail_at.contains(&name) {
                Err(MigrateError::Failed(format!("{name} failed")))
            } else {
                Ok(())
            }
        }
    }

    fn outcome() -> SourceOutcome {
        SourceOutcome {
            total_time_ms: 1,
            downtime_ms: 1,
            setup_time_ms: None,
            transferred_bytes: 1,
            iterations: 1,
            zero_bytes: 0,
            normal_bytes: 0,
            final_progress: crate::ProgressTracker::new().update(
                0,
                &serde_json::from_value(serde_json::json!({"status": "completed"})).unwrap(),
            ),
        }
    }

    impl MigrationHalves for Script {
        async fn prepare_destination(&mut self) -> Result<SocketAddr, MigrateError> {
            self.step("prepare")?;
            Ok("10.0.0.1:49152".parse().unwrap())
        }
        async fn run_source(
            &mut self,
            _dest: SocketAddr,
            _observe: &mut Observer<'_>,
        ) -> Result<SourceOutcome, MigrateError> {
            self.step("source")?;
            Ok(outcome())
        }
        async fn confirm_destination(&mut self) -> Result<(), MigrateError> {
            self.step("confirm")
        }
        async fn finish_source(&mut self) {
            self.calls.push("finish");
        }
        async fn remove_destination(&mut self) -> Result<(), MigrateError> {
            self.step("remove-dest")
        }
        async fn resume_source(&mut self) -> Result<(), MigrateError> {
            self.step("resume")
        }
    }

    async fn run(fail_at: &'static [&'static str]) -> (bool, Vec<&'static str>) {
        let mut s = Script {
            fail_at,
            ..Default::default()
        };
        let ok = live_migrate(&mut s, &mut |_| {}).await.is_ok();
        (ok, s.calls)
    }

    #[tokio::test]
    async fn success_stops_the_source_last() {
        assert_eq!(
            run(&[]).await,
            (true, vec!["prepare", "source", "confirm", "finish"])
        );
    }

    #[tokio::test]
    async fn failures_before_switchover_remove_the_destination_and_keep_the_source() {
        assert_eq!(
            run(&["prepare"]).await,
            (false, vec!["prepare", "remove-dest"])
        );
        assert_eq!(
            run(&["source"]).await,
            (false, vec!["prepare", "source", "remove-dest", "resume"])
        );
    }

    #[tokio::test]
    async fn a_destination_that_cannot_be_removed_keeps_the_source_paused() {
        let (ok, calls) = run(&["confirm", "remove-dest"]).await;
        assert!(!ok);
        assert_eq!(calls, vec!["prepare", "source", "confirm", "remove-dest"]);
        assert!(!calls.contains(&"resume"), "two copies could run");
    }

    #[tokio::test]
    async fn a_destination_that_never_runs_is_killed_before_the_source_resumes() {
        let (ok, calls) = run(&["confirm"]).await;
        assert!(!ok);
        assert_eq!(
            calls,
            vec!["prepare", "source", "confirm", "remove-dest", "resume"]
        );
        assert!(
            !calls.contains(&"finish"),
            "a source must not be stopped when nobody took over"
        );
    }
}
