//! The phase sequence of one live migration, its commit point and its undo steps.
//!
//! The order and the rules live here once, whoever drives the halves:
//! 1. prepare the destination: QEMU in incoming mode, started paused (`-S`), listening;
//! 2. run the source: QEMU stops the guest before switchover and waits; the source half lets
//!    it switch over unless a cancel came first (after that, cancels are refused);
//! 3. wait until the destination holds the whole guest, still paused;
//! 4. **commit**: the driver records that the destination owns the guest;
//! 5. start the guest on the destination;
//! 6. stop the source, which has handed over.
//!
//! Before the commit the only copy that may run is the source's; after it, only the
//! destination's. Undo before the commit removes the destination and lets the source run; a
//! source whose migration completed (`postmigrate`) is resumed only once the destination is
//! proven gone, and until then both stay paused. After the commit nothing is undone: the
//! destination is started, retried while its host cannot be reached, and the source is never
//! resumed. Post-copy hands the guest over when it starts, so its failures keep the
//! destination and commit it there. docs/ARCHITECTURE.md draws this as a state machine.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{error, warn};

use crate::source::{Observer, SourceOutcome};
use crate::MigrateError;

/// The operations a driver provides for each side; [`live_migrate`] calls them in order.
pub trait MigrationHalves {
    /// Start the destination paused in incoming mode and make it listen; returns the stream
    /// address.
    fn prepare_destination(
        &mut self,
    ) -> impl Future<Output = Result<SocketAddr, MigrateError>> + Send;
    /// Run the source's half to completion (see [`crate::source::run_source`]).
    fn run_source(
        &mut self,
        dest: SocketAddr,
        observe: &mut Observer<'_>,
    ) -> impl Future<Output = Result<SourceOutcome, MigrateError>> + Send;
    /// Wait until the destination holds the whole guest (its incoming migration completed);
    /// it stays paused. (After post-copy it already runs, which is fine too.)
    fn destination_ready(&mut self) -> impl Future<Output = Result<(), MigrateError>> + Send;
    /// The commit point: record that the destination owns the guest. An error means nothing
    /// was recorded and the guest still belongs to the source.
    fn commit(&mut self) -> impl Future<Output = Result<(), MigrateError>> + Send;
    /// Undo the commit, only after the destination is proven gone without ever having run
    /// the guest (`StartError::never_ran`): the guest belongs to the source again.
    fn uncommit(&mut self) -> impl Future<Output = Result<(), MigrateError>> + Send;
    /// Let the committed destination run the guest and confirm it runs. An error with
    /// `retry` true (its host cannot be reached) is tried again; the source is resumed only
    /// when the destination is proven gone without having run (`never_ran`).
    fn start_destination(&mut self) -> impl Future<Output = Result<(), StartError>> + Send;
    /// Stop the handed-over source process.
    fn finish_source(&mut self) -> impl Future<Output = ()> + Send;
    /// Kill the destination process and free what it held (port, tap, files). `Ok` is proof
    /// that no destination QEMU is left; an error means it may still exist.
    fn remove_destination(&mut self) -> impl Future<Output = Result<(), MigrateError>> + Send;
    /// Make sure the guest runs on the source. `destination_gone`: the destination was
    /// removed and never committed, so a handed-over source (`postmigrate`) may run again;
    /// otherwise only a source that did not hand over is resumed.
    fn resume_source(
        &mut self,
        destination_gone: bool,
    ) -> impl Future<Output = Result<(), MigrateError>> + Send;
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
    /// How long to wait between attempts when a step after the source stopped must be
    /// retried (undo of a handed-over source, start of a committed destination).
    fn retry_backoff(&self, attempt: u32) -> Duration {
        Duration::from_secs(u64::from(attempt.min(5)) * 2)
    }
}

/// Why a committed destination did not start.
#[derive(Debug)]
pub struct StartError {
    pub error: MigrateError,
    /// The destination may still start (its host is unreachable, QEMU slow): try again. False
    /// when it is proven it cannot (its QEMU is gone).
    pub retry: bool,
    /// Proven: the destination's QEMU is gone and was never told to run the guest, so the
    /// source's stopped copy is the newest one.
    pub never_ran: bool,
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
            // source would lose writes. It owns the guest now, held for recovery.
            error!(%e, "post-copy failed; destination kept and committed, source not resumed");
            if let Err(c) = halves.commit().await {
                error!(%c, "the destination's ownership could not be recorded");
            }
            return Err(e);
        }
        Err(e) => {
            // The source did not hand over: QEMU resumed it or the half will. The
            // destination never ran (it starts paused and was not committed).
            let gone = match halves.remove_destination().await {
                Ok(()) => true,
                Err(undo) => {
                    warn!(%undo, "destination could not be removed after a failed migration");
                    false
                }
            };
            if let Err(resume) = halves.resume_source(gone).await {
                error!(%resume, "source guest could not be resumed after a failed migration");
            }
            return Err(e);
        }
    };
    if let Err(e) = halves.destination_ready().await {
        warn!(%e, "destination does not hold the guest; removing it, then resuming the source");
        undo_handover(halves).await;
        return Err(e);
    }
    if let Err(e) = halves.commit().await {
        warn!(%e, "commit not recorded; the guest stays with the source");
        undo_handover(halves).await;
        return Err(e);
    }
    start_committed(halves).await?;
    halves.finish_source().await;
    Ok(MigrationOutcome {
        destination: dest,
        source,
    })
}

/// Undo after the source handed over but before the commit: the source may run again only
/// once the destination is proven gone. Until then both stay paused, and removal is retried:
/// a paused guest is recoverable, two running guests are not.
async fn undo_handover<H: MigrationHalves + Send>(halves: &mut H) {
    let mut attempt = 0;
    while let Err(undo) = halves.remove_destination().await {
        attempt += 1;
        error!(%undo, attempt, "destination not removed yet; the source stays paused until it is");
        tokio::time::sleep(halves.retry_backoff(attempt)).await;
    }
    if let Err(resume) = halves.resume_source(true).await {
        error!(%resume, "source guest could not be resumed");
    }
}

/// Finishes a migration whose commit is already recorded (its driver restarted after the
/// commit point): start the destination, then stop the source. Nothing before the commit is
/// repeated and nothing is undone.
pub async fn finish_committed<H: MigrationHalves + Send>(
    halves: &mut H,
) -> Result<(), MigrateError> {
    start_committed(halves).await?;
    halves.finish_source().await;
    Ok(())
}

/// Starts the committed destination, retrying while it may still start; the source is never
/// resumed from here on.
async fn start_committed<H: MigrationHalves + Send>(halves: &mut H) -> Result<(), MigrateError> {
    let mut attempt = 0;
    loop {
        match halves.start_destination().await {
            Ok(()) => return Ok(()),
            Err(StartError {
                error, retry: true, ..
            }) => {
                attempt += 1;
                warn!(%error, attempt, "committed destination not started yet; retrying");
                tokio::time::sleep(halves.retry_backoff(attempt)).await;
            }
            Err(StartError {
                error,
                never_ran: true,
                ..
            }) => {
                // The only other copy is the stopped source, and nothing ran since it stopped.
                warn!(%error, "committed destination is gone and never ran; giving the guest back to the source");
                if let Err(e) = halves.uncommit().await {
                    error!(%e, "the commit could not be undone; the source stays stopped");
                    return Err(MigrateError::NotStarted(error.to_string()));
                }
                halves.resume_source(true).await?;
                return Err(MigrateError::DestinationNotRunning(format!(
                    "{error}; the guest runs on the source again"
                )));
            }
            Err(StartError { error, .. }) => {
                error!(%error, "committed destination cannot start; the source stays stopped");
                return Err(MigrateError::NotStarted(error.to_string()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the calls and fails where told; pure logic, no QEMU. A name in `fail_at`
    /// fails that step every time; in `fail_once`, only its first time.
    #[derive(Default)]
    struct Script {
        fail_at: &'static [&'static str],
        fail_once: &'static [&'static str],
        source_error: Option<fn() -> MigrateError>,
        start_retry: bool,
        start_never_ran: bool,
        calls: Vec<&'static str>,
    }

    impl Script {
        fn step(&mut self, name: &'static str) -> Result<(), MigrateError> {
            let first = !self.calls.contains(&name);
            self.calls.push(name);
            if self.fail_at.contains(&name) || (first && self.fail_once.contains(&name)) {
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
            last_pages_bytes: None,
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
            match self.source_error {
                Some(e) => Err(e()),
                None => Ok(outcome()),
            }
        }
        async fn destination_ready(&mut self) -> Result<(), MigrateError> {
            self.step("ready")
        }
        async fn commit(&mut self) -> Result<(), MigrateError> {
            self.step("commit")
        }
        async fn start_destination(&mut self) -> Result<(), StartError> {
            let (retry, never_ran) = (self.start_retry, self.start_never_ran);
            self.step("start").map_err(|error| StartError {
                error,
                retry,
                never_ran,
            })
        }
        async fn uncommit(&mut self) -> Result<(), MigrateError> {
            self.step("uncommit")
        }
        async fn finish_source(&mut self) {
            self.calls.push("finish");
        }
        async fn remove_destination(&mut self) -> Result<(), MigrateError> {
            self.step("remove-dest")
        }
        async fn resume_source(&mut self, destination_gone: bool) -> Result<(), MigrateError> {
            self.step(if destination_gone {
                "resume-after-removal"
            } else {
                "resume-not-handed-over"
            })
        }
        fn retry_backoff(&self, _attempt: u32) -> Duration {
            Duration::ZERO
        }
    }

    async fn run_script(
        mut s: Script,
    ) -> (Result<MigrationOutcome, MigrateError>, Vec<&'static str>) {
        let result = live_migrate(&mut s, &mut |_| {}).await;
        (result, s.calls)
    }

    async fn run(fail_at: &'static [&'static str]) -> (bool, Vec<&'static str>) {
        let (r, calls) = run_script(Script {
            fail_at,
            ..Default::default()
        })
        .await;
        (r.is_ok(), calls)
    }

    #[tokio::test]
    async fn success_commits_before_the_destination_runs_and_stops_the_source_last() {
        assert_eq!(
            run(&[]).await,
            (
                true,
                vec!["prepare", "source", "ready", "commit", "start", "finish"]
            )
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
            (
                false,
                vec!["prepare", "source", "remove-dest", "resume-after-removal"]
            )
        );
    }

    /// The destination starts paused and is never committed on this path, so a source that did
    /// not hand over may run even while the destination's removal is still failing; a
    /// handed-over one may not (see the next tests).
    #[tokio::test]
    async fn a_failed_copy_with_an_unremovable_destination_resumes_only_a_source_that_kept_its_guest(
    ) {
        let (ok, calls) = run(&["source", "remove-dest"]).await;
        assert!(!ok);
        assert_eq!(
            calls,
            vec!["prepare", "source", "remove-dest", "resume-not-handed-over"]
        );
    }

    #[tokio::test]
    async fn a_destination_that_never_holds_the_guest_is_removed_before_the_source_resumes() {
        let (ok, calls) = run(&["ready"]).await;
        assert!(!ok);
        assert_eq!(
            calls,
            vec![
                "prepare",
                "source",
                "ready",
                "remove-dest",
                "resume-after-removal"
            ]
        );
        assert!(!calls.contains(&"commit"), "nothing was committed");
        assert!(!calls.contains(&"finish"), "the source must not be stopped");
    }

    /// The unknown state: the source handed over and the destination cannot be reached to be
    /// removed. Both stay paused (no resume) until the removal is proven, then the source runs.
    #[tokio::test]
    async fn a_handed_over_source_stays_paused_until_the_destination_is_proven_gone() {
        let (r, calls) = run_script(Script {
            fail_at: &["ready"],
            fail_once: &["remove-dest"],
            ..Default::default()
        })
        .await;
        assert!(r.is_err());
        assert_eq!(
            calls,
            vec![
                "prepare",
                "source",
                "ready",
                "remove-dest",
                "remove-dest",
                "resume-after-removal"
            ]
        );
    }

    #[tokio::test]
    async fn a_commit_that_is_not_recorded_gives_the_guest_back_to_the_source() {
        let (ok, calls) = run(&["commit"]).await;
        assert!(!ok);
        assert_eq!(
            calls,
            vec![
                "prepare",
                "source",
                "ready",
                "commit",
                "remove-dest",
                "resume-after-removal"
            ]
        );
    }

    /// After the commit only the destination may run: an unreachable destination is retried,
    /// the source is neither resumed nor stopped before the destination runs.
    #[tokio::test]
    async fn after_the_commit_the_destination_start_is_retried_and_the_source_never_resumes() {
        let (r, calls) = run_script(Script {
            fail_once: &["start"],
            start_retry: true,
            ..Default::default()
        })
        .await;
        assert!(r.is_ok());
        assert_eq!(
            calls,
            vec!["prepare", "source", "ready", "commit", "start", "start", "finish"]
        );
    }

    #[tokio::test]
    async fn a_committed_destination_that_cannot_start_fails_without_resuming_the_source() {
        let (r, calls) = run_script(Script {
            fail_at: &["start"],
            start_retry: false,
            ..Default::default()
        })
        .await;
        assert_eq!(r.unwrap_err().code(), "destination-not-started");
        assert_eq!(calls, vec!["prepare", "source", "ready", "commit", "start"]);
    }

    #[tokio::test]
    async fn a_driver_restarted_after_the_commit_only_starts_the_destination_and_stops_the_source()
    {
        let mut s = Script::default();
        finish_committed(&mut s).await.unwrap();
        assert_eq!(s.calls, vec!["start", "finish"]);
    }

    /// The chaos matrix's case: the destination's QEMU killed between the commit and the
    /// start. It never ran, so the commit is undone and the stopped source runs again.
    #[tokio::test]
    async fn a_committed_destination_gone_before_it_ran_gives_the_guest_back_to_the_source() {
        let (r, calls) = run_script(Script {
            fail_at: &["start"],
            start_never_ran: true,
            ..Default::default()
        })
        .await;
        assert_eq!(r.unwrap_err().code(), "destination-not-running");
        assert_eq!(
            calls,
            vec![
                "prepare",
                "source",
                "ready",
                "commit",
                "start",
                "uncommit",
                "resume-after-removal"
            ]
        );
    }

    #[tokio::test]
    async fn a_commit_that_cannot_be_undone_keeps_the_source_stopped() {
        let (r, calls) = run_script(Script {
            fail_at: &["start", "uncommit"],
            start_never_ran: true,
            ..Default::default()
        })
        .await;
        assert_eq!(r.unwrap_err().code(), "destination-not-started");
        assert!(!calls.iter().any(|c| c.starts_with("resume")), "{calls:?}");
    }

    #[tokio::test]
    async fn a_broken_post_copy_keeps_and_commits_the_destination() {
        let (r, calls) = run_script(Script {
            source_error: Some(|| MigrateError::PostcopyFailed("link".into())),
            ..Default::default()
        })
        .await;
        assert_eq!(r.unwrap_err().code(), "postcopy-failed");
        assert_eq!(calls, vec!["prepare", "source", "commit"]);
    }

    #[tokio::test]
    async fn a_cancel_before_switchover_resumes_the_source_and_removes_the_destination() {
        let (r, calls) = run_script(Script {
            source_error: Some(|| MigrateError::Cancelled),
            ..Default::default()
        })
        .await;
        assert_eq!(r.unwrap_err().code(), "migration-cancelled");
        assert_eq!(
            calls,
            vec!["prepare", "source", "remove-dest", "resume-after-removal"]
        );
    }
}
