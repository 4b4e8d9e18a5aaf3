//! The source half: start the stream, sample progress, abort on request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_qmp::commands::{
    capability, CapabilityState, Cont, Migrate, MigrateCancel, MigrateContinue,
    MigrateSetCapabilities, MigrateSetParameters, MigrateStartPostcopy, MigrationInfo,
    MigrationStatus, QueryMigrate, QueryStatus, RunState,
};
use ferry_qmp::{Qmp, QmpError};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::control::{Action, ControlPolicy, Controller, Decision};
use crate::mirror::{MirrorTarget, Mirrors};
use crate::progress::{Phase, Progress, ProgressTracker};
use crate::{MigrateError, MigrationParams};

/// Where a source half stands with respect to the point of no return, shared by the half and
/// whoever may cancel it, so that "cancel" and "switch over" are decided once, under one lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// Copying: a cancel is still accepted.
    Open,
    /// A cancel was accepted; the half will stop before switchover.
    AbortRequested,
    /// The half has let QEMU switch over (or start post-copy): cancelling is refused from now.
    PastNoReturn,
}

/// Asks a running migration to stop before switchover.
#[derive(Debug, Clone)]
pub struct AbortHandle(Arc<watch::Sender<Gate>>);

/// The receiving end of an [`AbortHandle`], handed to the source half.
#[derive(Debug, Clone)]
pub struct AbortSignal {
    gate: Arc<watch::Sender<Gate>>,
    seen: watch::Receiver<Gate>,
}

/// A cancel that came after the source half let QEMU switch over: the guest is on its way
/// to the destination and will run there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too late to cancel: the source has switched over to the destination")]
pub struct TooLate;

impl AbortHandle {
    pub fn new() -> (AbortHandle, AbortSignal) {
        let gate = Arc::new(watch::channel(Gate::Open).0);
        let seen = gate.subscribe();
        (AbortHandle(gate.clone()), AbortSignal { gate, seen })
    }

    /// Asks the half to stop before switchover. Refused once it has passed the point of no
    /// return; asking twice is fine.
    pub fn abort(&self) -> Result<(), TooLate> {
        let mut result = Ok(());
        self.0.send_if_modified(|g| match *g {
            Gate::Open => {
                *g = Gate::AbortRequested;
                true
            }
            Gate::AbortRequested => false,
            Gate::PastNoReturn => {
                result = Err(TooLate);
                false
            }
        });
        result
    }

    /// For a switch the half does not make itself (an operator's switch to post-copy): passes
    /// the point of no return as [`AbortSignal::pass_no_return`] does.
    pub fn pass_no_return(&self) -> bool {
        pass_no_return(&self.0)
    }

    /// True once the half has switched over (or started post-copy).
    pub fn is_past_no_return(&self) -> bool {
        *self.0.borrow() == Gate::PastNoReturn
    }
}

impl AbortSignal {
    pub fn is_aborted(&self) -> bool {
        *self.gate.borrow() == Gate::AbortRequested
    }

    /// True once the half has switched over (or started post-copy).
    pub fn is_past_no_return(&self) -> bool {
        *self.gate.borrow() == Gate::PastNoReturn
    }

    /// Resolves once abort was requested; never, if the handle is dropped without aborting.
    pub async fn aborted(&mut self) {
        if self
            .seen
            .wait_for(|g| *g == Gate::AbortRequested)
            .await
            .is_err()
        {
            std::future::pending::<()>().await;
        }
    }

    /// Passes the point of no return unless a cancel came first: true means the half may let
    /// QEMU switch over, and every later [`AbortHandle::abort`] is refused with [`TooLate`].
    pub fn pass_no_return(&self) -> bool {
        pass_no_return(&self.gate)
    }
}

/// The one place the gate moves past the point of no return (see [`AbortSignal::pass_no_return`]).
fn pass_no_return(gate: &watch::Sender<Gate>) -> bool {
    let mut passed = false;
    gate.send_if_modified(|g| match *g {
        Gate::Open => {
            *g = Gate::PastNoReturn;
            passed = true;
            true
        }
        Gate::PastNoReturn => {
            passed = true;
            false
        }
        Gate::AbortRequested => false,
    });
    passed
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
    /// What QEMU still had to send when it stopped the guest (at pre-switchover): the last
    /// pages, whose transfer is the part of the pause the rounds' model predicts; the rest
    /// (device state, hand-over) is learned per host pair.
    #[serde(default)]
    pub last_pages_bytes: Option<u64>,
    pub final_progress: Progress,
}

impl SourceOutcome {
    /// QEMU's figures of a completed migration, with the last sample taken of it.
    pub fn completed(
        info: &MigrationInfo,
        progress: Progress,
        last_pages_bytes: Option<u64>,
    ) -> SourceOutcome {
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
            last_pages_bytes,
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
/// With `disks` (block migration), each is first mirrored into the destination's export
/// until every mirror is in sync and write-blocking ([`copy_disks`]); only then does the memory
/// stream start, and at `pre-switchover` the mirrors are completed before the switchover.
/// Samples progress every `params.sample_interval`, hands each sample to `observe`, and lets
/// the [`Controller`] built from `params` steer: its decisions are applied to QEMU and
/// reported too. On abort, or when the controller gives up, it cancels and makes sure the
/// guest runs on the source again, with its own disks, before returning the error. Once
/// post-copy has started the guest runs on the destination: abort requests are refused and
/// the source is never resumed.
pub async fn run_source(
    qmp: &Qmp,
    dest: SocketAddr,
    params: &MigrationParams,
    disks: &[MirrorTarget],
    observe: &mut Observer<'_>,
    mut abort: AbortSignal,
) -> Result<SourceOutcome, MigrateError> {
    params.validate()?;
    let status = qmp.execute(&QueryStatus {}).await?;
    let paused_allowed = params.allow_paused_source && status.status == RunState::Paused;
    if !status.running && !paused_allowed {
        return Err(MigrateError::SourceNotRunning(status.status.to_string()));
    }
    set_capabilities(qmp, params).await?;
    // Source only: QEMU stops the guest at `pre-switchover` and waits for `migrate-continue`,
    // so a cancel and the switchover are decided here, once (see `AbortSignal::pass_no_return`).
    qmp.execute(&MigrateSetCapabilities {
        capabilities: vec![CapabilityState {
            capability: capability::PAUSE_BEFORE_SWITCHOVER.into(),
            state: true,
        }],
    })
    .await?;
    let started = Instant::now();
    let mut mirrors = copy_disks(qmp, params, disks, started, observe, &mut abort).await?;
    let begun = async {
        qmp.execute(&params.source_parameters()).await?;
        qmp.execute(&Migrate::new(format!("tcp:{dest}"))).await
    }
    .await;
    if let Err(e) = begun {
        mirrors.abort(qmp).await;
        return Err(e.into());
    }
    let mut controller = Controller::for_params(params, params.policy.clone());
    info!(%dest, "migration started");
    let stream = Stream::new(started, &mut mirrors);
    follow(qmp, params, &mut controller, stream, false, observe, abort).await
}

/// The disk copy of a block migration: copies every disk of `disks` into its export (see
/// [`crate::mirror`]) and waits until all are in sync and write-blocking. The bandwidth limit is shared
/// between the disks; the time budget counts from `started`. A cancel, the budget or a
/// failed mirror stops every mirror and returns the error; the guest keeps running here.
async fn copy_disks(
    qmp: &Qmp,
    params: &MigrationParams,
    disks: &[MirrorTarget],
    started: Instant,
    observe: &mut Observer<'_>,
    abort: &mut AbortSignal,
) -> Result<Mirrors, MigrateError> {
    if disks.is_empty() {
        return Ok(Mirrors::none());
    }
    let mem_total = memory_bytes(qmp).await;
    let mut mirrors = Mirrors::start(qmp, disks, params.bandwidth).await?;
    let sample = |mirrors: &Mirrors| {
        SourceEvent::Progress(Progress::disk_copy(
            started.elapsed().as_millis() as u64,
            mirrors.progress(),
            mem_total,
        ))
    };
    match sync_disks(qmp, params, &mut mirrors, started, observe, abort, &sample).await {
        Ok(()) => Ok(mirrors),
        Err(e) => {
            warn!(error = %e, "the disk copy ends; stopping every mirror");
            mirrors.abort(qmp).await;
            observe(&sample(&mirrors));
            Err(e)
        }
    }
}

/// Samples the started copies (which move themselves on) until every one is in sync. A cancel, the
/// budget or a failed mirror is the error; [`copy_disks`] then stops them.
async fn sync_disks(
    qmp: &Qmp,
    params: &MigrationParams,
    mirrors: &mut Mirrors,
    started: Instant,
    observe: &mut Observer<'_>,
    abort: &mut AbortSignal,
    sample: &(dyn Fn(&Mirrors) -> SourceEvent + Sync),
) -> Result<(), MigrateError> {
    let mut ticker = tokio::time::interval(params.sample_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = abort.aborted() => return Err(MigrateError::Cancelled),
        }
        let sampled = mirrors
            .sample(qmp, started.elapsed().as_millis() as u64)
            .await;
        observe(&sample(mirrors));
        sampled?;
        if params
            .completion_timeout
            .is_some_and(|b| started.elapsed() > b)
        {
            warn!("the time budget ran out during the disk copy");
            return Err(MigrateError::Timeout(started.elapsed().as_secs()));
        }
        if mirrors.all_ready() {
            return Ok(());
        }
    }
}

/// The guest's RAM in bytes, for weighing the disk copy against the memory still to come.
async fn memory_bytes(qmp: &Qmp) -> u64 {
    qmp.execute_raw("query-memory-size-summary", None)
        .await
        .ok()
        .and_then(|v| v.get("base-memory").and_then(|b| b.as_u64()))
        .unwrap_or(0)
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
    follow_fixed(qmp, params, true, observe, abort).await
}

/// Follows a stream past the point where the controller has a say (after a reconnect or a
/// restart): samples and the end only.
async fn follow_fixed(
    qmp: &Qmp,
    params: &MigrationParams,
    postcopy_seen: bool,
    observe: &mut Observer<'_>,
    abort: AbortSignal,
) -> Result<SourceOutcome, MigrateError> {
    let mut controller = Controller::for_params(params, ControlPolicy::Fixed);
    let mut mirrors = Mirrors::adopt(qmp).await;
    let stream = Stream::new(Instant::now(), &mut mirrors);
    follow(
        qmp,
        params,
        &mut controller,
        stream,
        postcopy_seen,
        observe,
        abort,
    )
    .await
}

/// Follows a migration this QEMU is already running (started before an agent restart) without
/// issuing a new `migrate`, until it ends, as [`run_source`] does from its start; `postcopy_seen`
/// when the stream had already switched to post-copy.
pub async fn attach(
    qmp: &Qmp,
    params: &MigrationParams,
    observe: &mut Observer<'_>,
    abort: AbortSignal,
) -> Result<SourceOutcome, MigrateError> {
    let info = query_patiently(qmp, params).await?;
    let Some(status) = info.status.filter(|s| *s != MigrationStatus::None) else {
        return Err(MigrateError::Failed(
            "QEMU has no record of the migration (was it restarted?)".into(),
        ));
    };
    let postcopy_seen = Phase::from_status(&status) == Phase::Postcopy;
    follow_fixed(qmp, params, postcopy_seen, observe, abort).await
}

/// How long a QMP command to a migrating source may go unanswered before the half gives up.
/// During the final copy QEMU's migration thread holds the main loop's lock while it sends,
/// so over a stalled link `query-migrate` answers only once the stream moves again: slowness
/// is not failure, and the source's real state is waited for.
fn qmp_patience(params: &MigrationParams) -> Duration {
    params
        .completion_timeout
        .map(|b| b.max(Duration::from_secs(60)))
        .unwrap_or(Duration::from_secs(600))
}

/// `query-migrate`, retried across timeouts for up to [`qmp_patience`].
async fn query_patiently(
    qmp: &Qmp,
    params: &MigrationParams,
) -> Result<MigrationInfo, MigrateError> {
    let deadline = Instant::now() + qmp_patience(params);
    loop {
        match qmp.execute(&QueryMigrate {}).await {
            Ok(info) => return Ok(info),
            Err(e @ QmpError::Timeout { .. }) if Instant::now() < deadline => {
                warn!(error = %e, "QEMU is slow to answer; waiting for its real state");
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// What a followed stream keeps from sample to sample: QEMU's replies turned into progress,
/// when it started (the budget's clock), and the mirrors of its local disks.
struct Stream<'m> {
    tracker: ProgressTracker,
    started: Instant,
    mirrors: &'m mut Mirrors,
}

impl<'m> Stream<'m> {
    fn new(started: Instant, mirrors: &'m mut Mirrors) -> Stream<'m> {
        Stream {
            tracker: ProgressTracker::new(),
            started,
            mirrors,
        }
    }

    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// Samples a started migration until it ends, applying the controller's decisions.
async fn follow(
    qmp: &Qmp,
    params: &MigrationParams,
    controller: &mut Controller,
    mut stream: Stream<'_>,
    mut postcopy_seen: bool,
    observe: &mut Observer<'_>,
    mut abort: AbortSignal,
) -> Result<SourceOutcome, MigrateError> {
    let mut ticker = tokio::time::interval(params.sample_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut events = qmp.events();
    // `migrate-continue` is sent once: QEMU may still report `pre-switchover` in a sample
    // taken right after it, and refuses a second continue once it has moved on ("not in
    // expected state: device"), which must not fail a switchover that is under way.
    let mut continued = false;
    loop {
        let aborted = tokio::select! {
            _ = ticker.tick() => false,
            _ = abort.aborted(), if !postcopy_seen => true,
            // QEMU announces every status change (pre-switchover above all): look at once
            // rather than at the next tick, so a guest stopped for switchover waits for nobody.
            _ = status_changed(&mut events) => false,
        };
        if aborted {
            return cancel(qmp, &mut stream, observe, MigrateError::Cancelled).await;
        }
        let info = query_patiently(qmp, params).await?;
        let elapsed_ms = stream.elapsed_ms();
        let mut disk_failure = None;
        if stream.mirrors.is_live() {
            if let Err(e) = stream.mirrors.sample(qmp, elapsed_ms).await {
                disk_failure = Some(e);
            }
        }
        let mut progress = stream
            .tracker
            .update(elapsed_ms, &info)
            .with_disks(stream.mirrors.progress());
        let revised = controller.revise(&mut progress);
        observe(&SourceEvent::Progress(progress.clone()));
        if let Some(e) = disk_failure {
            if !postcopy_seen && !abort.is_past_no_return() {
                warn!(error = %e, "a disk mirror failed; cancelling the migration");
                return cancel(qmp, &mut stream, observe, e).await;
            }
        }
        postcopy_seen |= progress.phase == Phase::Postcopy;
        if postcopy_seen || info.status == Some(MigrationStatus::Device) {
            // Already beyond the point of no return (a stream followed after a restart).
            abort.pass_no_return();
        }
        match info.status {
            Some(MigrationStatus::Completed) => {
                return Ok(SourceOutcome::completed(
                    &info,
                    progress,
                    stream.tracker.last_pages_bytes(),
                ))
            }
            Some(MigrationStatus::PreSwitchover) if continued => continue,
            Some(MigrationStatus::PreSwitchover) => {
                // The guest is stopped and the last pages wait. Either the cancel that came
                // first wins (QEMU resumes the guest here), or from now on nothing does.
                if stream.mirrors.is_live() {
                    // The guest is stopped: the mirrors' last writes make every destination
                    // image equal to its source before the destination may ever run.
                    if let Err(e) = stream.mirrors.complete(qmp).await {
                        warn!(error = %e, "a disk mirror did not complete; cancelling");
                        return cancel(qmp, &mut stream, observe, e).await;
                    }
                    let done = stream
                        .tracker
                        .last()
                        .cloned()
                        .map(|p| p.with_disks(stream.mirrors.progress()));
                    if let Some(p) = done {
                        observe(&SourceEvent::Progress(p));
                    }
                }
                if !abort.pass_no_return() {
                    return cancel(qmp, &mut stream, observe, MigrateError::Cancelled).await;
                }
                info!("switching over: the source sends the last pages and device state");
                qmp.execute(&MigrateContinue {
                    state: MigrationStatus::PreSwitchover,
                })
                .await?;
                continued = true;
                continue;
            }
            Some(MigrationStatus::Failed) if postcopy_seen => {
                return Err(MigrateError::PostcopyFailed(
                    info.error_desc.unwrap_or_else(|| "no reason given".into()),
                ));
            }
            Some(MigrationStatus::Failed) => {
                stream.mirrors.abort(qmp).await;
                ensure_running(qmp).await?;
                return Err(MigrateError::Failed(
                    info.error_desc.unwrap_or_else(|| "no reason given".into()),
                ));
            }
            Some(MigrationStatus::Cancelled) => {
                stream.mirrors.abort(qmp).await;
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
        for decision in revised.into_iter().chain(controller.on_sample(&progress)) {
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
                Action::StartPostcopy if !stream.mirrors.is_empty() => {
                    // The destination would write its images while the mirrors still copy
                    // into them: with local disks the migration stays pre-copy.
                    warn!("post-copy is not used with local disks; staying in pre-copy");
                }
                Action::StartPostcopy => {
                    // Post-copy hands the guest to the destination: a point of no return too.
                    if !abort.pass_no_return() {
                        return cancel(qmp, &mut stream, observe, MigrateError::Cancelled).await;
                    }
                    qmp.execute(&MigrateStartPostcopy {}).await?
                }
                Action::Abort { timeout } => {
                    let reason = if timeout {
                        MigrateError::Timeout(stream.started.elapsed().as_secs())
                    } else {
                        MigrateError::Cancelled
                    };
                    return cancel(qmp, &mut stream, observe, reason).await;
                }
                Action::Hold | Action::Revise { .. } => {}
            }
        }
    }
}

/// Resolves on the next `MIGRATION` event (or when events were lost); never once the
/// connection is gone (the next command reports that).
async fn status_changed(events: &mut tokio::sync::broadcast::Receiver<ferry_qmp::Event>) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match events.recv().await {
            Ok(e) if e.migration_status().is_some() => return,
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => return,
            Err(RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

/// Cancels the stream before switchover and waits until QEMU confirms and the guest runs
/// here again. Only called before the point of no return: QEMU is then copying or waiting
/// at `pre-switchover`, and cannot complete without our `migrate-continue`.
async fn cancel(
    qmp: &Qmp,
    stream: &mut Stream<'_>,
    observe: &mut Observer<'_>,
    reason: MigrateError,
) -> Result<SourceOutcome, MigrateError> {
    warn!(%reason, "cancelling migration");
    qmp.execute(&MigrateCancel {}).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = qmp.execute(&QueryMigrate {}).await?;
        let elapsed_ms = stream.elapsed_ms();
        let progress = stream.tracker.update(elapsed_ms, &info);
        observe(&SourceEvent::Progress(progress.clone()));
        match info.status {
            Some(MigrationStatus::Cancelled) | Some(MigrationStatus::Failed) => break,
            Some(MigrationStatus::Completed) => {
                // Cannot happen while QEMU pauses before switchover; if it did, the guest is
                // whole on the destination (still paused) and the caller commits it there.
                warn!("the migration completed despite the cancel");
                return Ok(SourceOutcome::completed(
                    &info,
                    progress,
                    stream.tracker.last_pages_bytes(),
                ));
            }
            _ if Instant::now() > deadline => {
                return Err(MigrateError::Failed(
                    "QEMU did not confirm the cancel within 30 s".into(),
                ))
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    stream.mirrors.abort(qmp).await;
    ensure_running(qmp).await?;
    Err(reason)
}

/// After a failed or cancelled migration the source must run the guest again. QEMU resumes it
/// by itself in most cases; if it was left paused (a failure during the final stop-and-copy),
/// resume it: the destination starts paused and runs only when Ferry commits it there, so it
/// cannot be running. A source whose outgoing migration completed (`postmigrate`) has handed
/// its guest over and is never resumed here; only [`resume_handed_over`] does that, once the
/// destination is proven gone.
pub async fn ensure_running(qmp: &Qmp) -> Result<(), MigrateError> {
    // Mirrors a lost half started stop here too: the guest keeps its own disks either way.
    crate::mirror::abort_all(qmp).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = qmp.execute(&QueryStatus {}).await?;
        if status.running {
            return Ok(());
        }
        match status.status {
            RunState::Postmigrate => return Err(MigrateError::HandedOver),
            RunState::Paused | RunState::FinishMigrate if Instant::now() > deadline => {
                warn!(state = %status.status, "source left stopped after a failed migration; resuming it");
                qmp.execute(&Cont {}).await?;
                return Ok(());
            }
            RunState::Paused | RunState::FinishMigrate => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => return Err(MigrateError::SourceNotRunning(other.to_string())),
        }
    }
}

/// Resumes a source whose guest was handed over (`postmigrate`) or left paused. Only for the
/// undo of a migration that was never committed, after the destination's QEMU was proven gone:
/// the source then holds the only copy of the guest.
pub async fn resume_handed_over(qmp: &Qmp) -> Result<(), MigrateError> {
    let status = qmp.execute(&QueryStatus {}).await?;
    if status.running {
        return Ok(());
    }
    match status.status {
        RunState::Postmigrate => {
            warn!("resuming a handed-over source: its destination is gone and was never committed");
            qmp.execute(&Cont {}).await?;
            Ok(())
        }
        _ => ensure_running(qmp).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted QEMU monitor: answers `query-migrate` with `statuses` in turn (the last one
    /// forever) and `migrate-continue` as QEMU does: accepted while the job waits at
    /// pre-switchover, refused once it has moved on. Returns how many continues came.
    async fn scripted_qemu(
        listener: tokio::net::UnixListener,
        statuses: Vec<&'static str>,
    ) -> usize {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let (stream, _) = listener.accept().await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        let greeting = serde_json::json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}});
        w.write_all(format!("{greeting}\r\n").as_bytes())
            .await
            .unwrap();
        let (mut next, mut continues) = (0, 0);
        while let Ok(Some(line)) = lines.next_line().await {
            let cmd: serde_json::Value = serde_json::from_str(&line).unwrap();
            let id = cmd["id"].clone();
            let reply = match cmd["execute"].as_str().unwrap_or("") {
                "query-migrate" => {
                    let status = statuses[next.min(statuses.len() - 1)];
                    next += 1;
                    serde_json::json!({"return": {"status": status}, "id": id})
                }
                "migrate-continue" => {
                    continues += 1;
                    if continues == 1 {
                        serde_json::json!({"return": {}, "id": id})
                    } else {
                        serde_json::json!({"error": {"class": "GenericError", "desc": "Migration not in expected state: device"}, "id": id})
                    }
                }
                _ => serde_json::json!({"return": {}, "id": id}),
            };
            w.write_all(format!("{reply}\r\n").as_bytes())
                .await
                .unwrap();
            if statuses[next.saturating_sub(1).min(statuses.len() - 1)] == "completed" {
                break;
            }
        }
        continues
    }

    /// QEMU still says pre-switchover in the sample right after `migrate-continue` (its
    /// migration thread has not woken yet): the half must not send a second continue, which
    /// QEMU refuses once it is past the state, and must see the switchover through.
    #[tokio::test]
    async fn a_late_pre_switchover_sample_does_not_send_a_second_continue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let qemu = tokio::spawn(scripted_qemu(
            listener,
            vec![
                "active",
                "pre-switchover",
                "pre-switchover",
                "device",
                "completed",
            ],
        ));
        let qmp = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        let params = MigrationParams {
            sample_interval: Duration::from_millis(5),
            ..MigrationParams::default()
        };
        let (_handle, signal) = AbortHandle::new();
        let outcome = follow_fixed(&qmp, &params, false, &mut |_| {}, signal).await;
        assert!(outcome.is_ok(), "{outcome:?}");
        drop(qmp);
        assert_eq!(qemu.await.unwrap(), 1, "exactly one migrate-continue");
    }

    #[test]
    fn a_cancel_before_the_point_of_no_return_wins() {
        let (handle, signal) = AbortHandle::new();
        assert_eq!(handle.abort(), Ok(()));
        assert!(signal.is_aborted());
        assert!(
            !signal.pass_no_return(),
            "the half must cancel, not switch over"
        );
        assert!(!handle.is_past_no_return());
        assert_eq!(handle.abort(), Ok(()), "asking twice is fine");
    }

    #[test]
    fn a_cancel_after_the_point_of_no_return_is_refused() {
        let (handle, signal) = AbortHandle::new();
        assert!(signal.pass_no_return());
        assert!(handle.is_past_no_return());
        assert_eq!(handle.abort(), Err(TooLate));
        assert!(!signal.is_aborted());
        assert!(signal.pass_no_return(), "passing twice is fine");
    }

    /// Cancel and switchover race from two threads many times: exactly one of them wins each
    /// time, never both (a cancelled half that switched over would leave two copies).
    #[test]
    fn cancel_and_switchover_never_both_win() {
        for _ in 0..2000 {
            let (handle, signal) = AbortHandle::new();
            let canceller = std::thread::spawn(move || handle.abort().is_ok());
            let switched = signal.pass_no_return();
            let cancelled = canceller.join().unwrap();
            assert!(
                switched != cancelled,
                "switched {switched}, cancelled {cancelled}"
            );
        }
    }

    #[tokio::test]
    async fn aborted_resolves_on_abort_and_never_after_the_point_of_no_return() {
        let (handle, mut signal) = AbortHandle::new();
        let waiter = tokio::spawn(async move { signal.aborted().await });
        handle.abort().unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("aborted() resolved")
            .unwrap();

        let (handle, mut signal) = AbortHandle::new();
        assert!(signal.pass_no_return());
        assert!(handle.abort().is_err());
        let waited = tokio::time::timeout(Duration::from_millis(50), signal.aborted()).await;
        assert!(waited.is_err(), "a refused cancel does not abort");
    }
}
