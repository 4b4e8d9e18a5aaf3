//! The source half: start the stream, sample progress, abort on request.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferry_qmp::commands::{
    Cont, Migrate, MigrateCancel, MigrateSetCapabilities, MigrateSetParameters,
    MigrateStartPostcopy, MigrationInfo, MigrationStatus, QueryMigrate, QueryStatus, RunState,
};
use ferry_qmp::Qmp;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::control::{Action, ControlPolicy, Controller, Decision};
use crate::progress::{Phase, Progress, ProgressTracker};
use crate::{MigrateError, MigrationParams};

/// Asks a running migration to stop before switchover.
#[derive(Debug, Clone)]
pub struct AbortHandle(watch::Sender<bool>);

/// The receiving end of an [`AbortHandle`], handed to the source half.
#[derive(Debug, Clone)]
pub struct AbortSignal(watch::Receiver<bool>);

impl AbortHandle {
    pub fn new() -> (AbortHandle, AbortSignal) {
        let (tx, rx) = watch::channel(false);
        (AbortHandle(tx), AbortSignal(rx))
    }

    pub fn abort(&self) {
        let _ = self.0.send(true);
    }
}

impl AbortSignal {
    pub fn is_aborted(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once abort was requested; never, if the handle is dropped without aborting.
    pub async fn aborted(&mut self) {
        if self.0.wait_for(|a| *a).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// What the source saw of a completed migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceOutcome {
    pub total_time_ms: u64,
    pub downtime_ms: u64,
    pub setup_time_ms: Option<u64>,
    pub transferred_bytes: u64,
    pub iterations: u64,
    /// Guest RAM found zero (sent as a marker only), bytes; the rest is what had to move.
    #[serde(default)]
    pub zero_bytes: u64,
    /// Bytes of pages sent in full, re-sends included.
    #[serde(default)]
    pub normal_bytes: u64,
    pub final_progress: Progress,
}

impl SourceOutcome {
    /// QEMU's figures of a completed migration, with the last sample taken of it.
    pub fn completed(info: &MigrationInfo, progress: Progress) -> SourceOutcome {
        SourceOutcome {
            total_time_ms: info.total_time.unwrap_or(progress.elapsed_ms),
            downtime_ms: info.downtime.unwrap_or(0),
            setup_time_ms: info.setup_time,
            transferred_bytes: progress.transferred_bytes,
            iterations: progress.iteration,
            zero_bytes: info
                .ram
                .as_ref()
                .map(|r| r.duplicate.unwrap_or(0) * r.page_size.unwrap_or(4096))
                .unwrap_or(0),
            normal_bytes: info.ram.as_ref().and_then(|r| r.normal_bytes).unwrap_or(0),
            final_progress: progress,
        }
    }
}

/// Sets the capabilities both sides need; the destination calls this too, before listening.
pub async fn set_capabilities(qmp: &Qmp, params: &MigrationParams) -> Result<(), MigrateError> {
    qmp.execute(&MigrateSetCapabilities {
        capabilities: params.capabilities(),
    })
    .await?;
    Ok(())
}

/// What the source half reports while it runs: samples, and the controller's decisions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum SourceEvent {
    Progress(Progress),
    Decision(Decision),
}

/// Receives every [`SourceEvent`] of a running source half.
pub type Observer<'a> = dyn FnMut(&SourceEvent) + Send + 'a;

/// Migrates the guest behind `qmp` to a destination already listening at `dest`.
///
/// Samples progress every `params.sample_interval`, hands each sample to `observe`, and lets
/// the [`Controller`] built from `params` steer: its decisions are applied to QEMU and
/// reported too. On abort, or when the controller gives up, it cancels and makes sure the
/// guest runs on the source again before returning the error. Once post-copy has started the
/// guest runs on the destination: abort requests are refused and the source is never resumed.
pub async fn run_source(
    qmp: &Qmp,
    dest: SocketAddr,
    params: &MigrationParams,
    observe: &mut Observer<'_>,
    abort: AbortSignal,
) -> Result<SourceOutcome, MigrateError> {
    params.validate()?;
    let status = qmp.execute(&QueryStatus {}).await?;
    if !status.running {
        return Err(MigrateError::SourceNotRunning(status.status.to_string()));
    }
    set_capabilities(qmp, params).await?;
    qmp.execute(&params.source_parameters()).await?;
    let mut controller = Controller::for_params(params, params.policy.clone());
    let started = Instant::now();
    qmp.execute(&Migrate::new(format!("tcp:{dest}"))).await?;
    info!(%dest, "migration started");
    follow(qmp, params, &mut controller, started, false, observe, abort).await
}

/// Resumes a post-copy migration whose stream broke, over a new connection to `dest` (where
/// the destination listens after `migrate-recover`), and follows it to the end as
/// [`run_source`] does.
pub async fn reconnect(
    qmp: &Qmp,
    dest: SocketAddr,
    params: &MigrationParams,
    observe: &mut Observer<'_>,
    abort: AbortSignal,
) -> Result<SourceOutcome, MigrateError> {
    qmp.execute(&Migrate {
        uri: format!("tcp:{dest}"),
        resume: Some(true),
    })
    .await?;
    info!(%dest, "post-copy stream resumed");
    // Past the switch to post-copy the controller has nothing left to decide.
    let mut controller = Controller::for_params(params, ControlPolicy::Fixed);
    follow(
        qmp,
        params,
        &mut controller,
        Instant::now(),
        true,
        observe,
        abort,
    )
    .await
}

/// Samples a started migration until it ends, applying the controller's decisions.
async fn follow(
    qmp: &Qmp,
    params: &MigrationParams,
    controller: &mut Controller,
    started: Instant,
    mut postcopy_seen: bool,
    observe: &mut Observer<'_>,
    mut abort: AbortSignal,
) -> Result<SourceOutcome, MigrateError> {
    let mut tracker = ProgressTracker::new();
    let mut ticker = tokio::time::interval(params.sample_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let aborted = tokio::select! {
            _ = ticker.tick() => false,
            _ = abort.aborted(), if !postcopy_seen => true,
        };
        if aborted {
            return cancel(qmp, &mut tracker, started, observe, MigrateError::Cancelled).await;
        }
        let info = qmp.execute(&QueryMigrate {}).await?;
        let progress = tracker.update(started.elapsed().as_millis() as u64, &info);
        observe(&SourceEvent::Progress(progress.clone()));
        postcopy_seen |= progress.phase == Phase::Postcopy;
        match info.status {
            Some(MigrationStatus::Completed) => {
                return Ok(SourceOutcome::completed(&info, progress))
            }
            Some(MigrationStatus::Failed) if postcopy_seen => {
                return Err(MigrateError::PostcopyFailed(
                    info.error_desc.unwrap_or_else(|| "no reason given".into()),
                ));
            }
            Some(MigrationStatus::Failed) => {
                ensure_running(qmp).await?;
                return Err(MigrateError::Failed(
                    info.error_desc.unwrap_or_else(|| "no reason given".into()),
                ));
            }
            Some(MigrationStatus::Cancelled) => {
                ensure_running(qmp).await?;
                return Err(MigrateError::Cancelled);
            }
            Some(MigrationStatus::PostcopyPaused) => {
                return Err(MigrateError::PostcopyPaused(
                    info.error_desc
                        .unwrap_or_else(|| "the post-copy stream broke".into()),
                ));
            }
            _ => {}
        }
        for decision in controller.on_sample(&progress) {
            info!(action = ?decision.action, reason = %decision.reason, "controller decision");
            observe(&SourceEvent::Decision(decision.clone()));
            match decision.action {
                Action::SetDowntime { ms } => {
                    qmp.execute(&MigrateSetParameters {
                        downtime_limit: Some(ms),
                        ..Default::default()
                    })
                    .await?
                }
                Action::SetThrottleCeiling {
                    max_pct,
                    increment_pct,
                } => {
                    qmp.execute(&MigrateSetParameters {
                        max_cpu_throttle: Some(max_pct.into()),
                        cpu_throttle_increment: Some(increment_pct.into()),
                        ..Default::default()
                    })
                    .await?
                }
                Action::StartPostcopy => qmp.execute(&MigrateStartPostcopy {}).await?,
                Action::Abort { timeout } => {
                    let reason = if timeout {
                        MigrateError::Timeout(started.elapsed().as_secs())
                    } else {
                        MigrateError::Cancelled
                    };
                    return cancel(qmp, &mut tracker, started, observe, reason).await;
                }
                Action::Hold => {}
            }
        }
    }
}

/// Cancels the stream and waits until QEMU confirms; if the migration completed anyway (the
/// cancel raced switchover), that is reported as success would be: the caller sees `Ok` never
/// here, but a `Failed` naming the race, so it re-checks the destination.
async fn cancel(
    qmp: &Qmp,
    tracker: &mut ProgressTracker,
    started: Instant,
    observe: &mut Observer<'_>,
    reason: MigrateError,
) -> Result<SourceOutcome, MigrateError> {
    warn!(%reason, "cancelling migration");
    qmp.execute(&MigrateCancel {}).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = qmp.execute(&QueryMigrate {}).await?;
        let progress = tracker.update(started.elapsed().as_millis() as u64, &info);
        observe(&SourceEvent::Progress(progress));
        match info.status {
            Some(MigrationStatus::Cancelled) | Some(MigrationStatus::Failed) => break,
            Some(MigrationStatus::Completed) => {
                return Err(MigrateError::Failed(
                    "cancel arrived after switchover; the guest now runs on the destination".into(),
                ))
            }
            _ if Instant::now() > deadline => {
                return Err(MigrateError::Failed(
                    "QEMU did not confirm the cancel within 30 s".into(),
                ))
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    ensure_running(qmp).await?;
    Err(reason)
}

/// After a failed or cancelled migration the source must run the guest again. QEMU resumes it
/// by itself in most cases; if it was left paused (a failure during the final stop-and-copy),
/// resume it, because the destination never took over.
pub async fn ensure_running(qmp: &Qmp) -> Result<(), MigrateError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = qmp.execute(&QueryStatus {}).await?;
        if status.running {
            return Ok(());
        }
        match status.status {
            RunState::Paused | RunState::Postmigrate | RunState::FinishMigrate
                if Instant::now() > deadline =>
            {
                warn!(state = %status.status, "source left stopped after a failed migration; resuming it");
                qmp.execute(&Cont {}).await?;
                return Ok(());
            }
            RunState::Paused | RunState::Postmigrate | RunState::FinishMigrate => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => return Err(MigrateError::SourceNotRunning(other.to_string())),
        }
    }
}
