//! Drives one migration job through its phases over the two agents, recording every step.
//!
//! The phase order and undo rules are `ferry_migrate::live_migrate`'s; this module supplies
//! halves that call the agents ([`AgentHalves`]), persists state changes, samples and log
//! lines, and finishes the job in the store. After a server restart, [`recover`] re-attaches to
//! every job that was in flight: the source agent is the authority on how far it got.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chrono::Utc;
use ferry_api::agent::{
    AgentInstance, DirtyRate, IncomingDisk, IncomingReady, LaunchIncoming, PrepareIncoming,
    ReconnectSource, RemovedIncoming, SourceState, SourceStatus, StartSource,
};
use ferry_api::checks::CheckStatus;
use ferry_api::instances::InstanceSpec;
use ferry_api::instances::{Instance, InstanceState};
use ferry_api::migrations::{
    DiskCopy, DiskCopyState, Event, Migration, MigrationKind, MigrationPlan, MigrationState,
    MigrationStats, Policy,
};
use ferry_api::{ApiClient, ApiError, ErrorBody};
use ferry_migrate::phases::StartError;
use ferry_migrate::{
    Decision, MigrateError, MigrationHalves, MigrationParams, PlanInputs, Progress, SourceOutcome,
};
use tokio::sync::watch;
use tracing::{info, warn, Instrument};
use uuid::Uuid;

use crate::agents::agent_client;
use crate::server::AppState;
use crate::ServerError;
use crate::{checks, preflight};

/// Starts driving migration `id` in the background. `attach`: the job was already running
/// before this server started; pick it up where the agents are.
pub fn spawn(state: AppState, id: Uuid, attach: bool) {
    let span = tracing::info_span!("migration", %id);
    tokio::spawn(
        async move {
            drive(&state, id, attach).await;
            state.queue.notify_one();
        }
        .instrument(span),
    );
}

/// Re-attaches to every job that was Preparing, Migrating or Completing when the server
/// stopped.
pub async fn recover(state: &AppState) {
    let active = match state.store.active_migrations().await {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "cannot list migrations to recover");
            return;
        }
    };
    for m in active {
        log(
            state,
            m.id,
            "info",
            "server restarted: re-attaching to this migration",
        )
        .await;
        spawn(state.clone(), m.id, true);
    }
}

/// Sends the migration's current record to watchers.
pub fn publish_migration(state: &AppState, m: &Migration) {
    state.events.publish(Event::Migration {
        migration: Box::new(m.clone()),
    });
}

fn publish_instance(state: &AppState, i: Instance) {
    state.events.publish(Event::Instance {
        instance: Box::new(i),
    });
}

/// Appends to the migration's log (and the server log).
pub async fn log(state: &AppState, id: Uuid, level: &str, message: &str) {
    match level {
        "warn" | "error" => warn!(%id, "{message}"),
        _ => info!(%id, "{message}"),
    }
    if let Err(e) = state.store.add_log(id, level, message).await {
        warn!(%id, error = %e, "cannot store a migration log line");
    }
}

/// How a job ended, before it is written down.
enum Ending {
    Completed(Option<MigrationStats>),
    Cancelled,
    Failed(ErrorBody),
}

async fn drive(state: &AppState, id: Uuid, attach: bool) {
    let (cancel_tx, cancel_rx) = watch::channel(false);
    state
        .cancels
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, cancel_tx.clone());
    let ending = match state.store.get_migration(id).await {
        Ok(Some(m)) => {
            if m.cancel_requested {
                let _ = cancel_tx.send(true);
            }
            let planned =
                !attach && m.kind == MigrationKind::Live && m.options.policy == Policy::Auto;
            let mut launched = false;
            // The dirty rate is measured while the checks run: a migration starts in
            // milliseconds, not after one step and then the other.
            let (gate, dirty) = if attach {
                let gate = Gate {
                    link_bps: None,
                    block_copies: Vec::new(),
                };
                (Ok(gate), None)
            } else if planned {
                // The destination's QEMU starts as soon as the checks pass, while the dirty
                // rate (which the parameters it listens with depend on) is still measured.
                let checked_then_launched = async {
                    let gate = preflight_gate(state, &m).await;
                    if let Ok(g) = &gate {
                        if g.block_copies.is_empty() && !*cancel_rx.borrow() {
                            launched = launch_destination(state, &m).await;
                        }
                    }
                    gate
                };
                let (gate, dirty) =
                    tokio::join!(checked_then_launched, measure_dirty_rate(state, &m));
                (gate, Some(dirty))
            } else {
                (preflight_gate(state, &m).await, None)
            };
            match (gate, m.kind) {
                (Err(body), _) => Ending::Failed(body),
                (Ok(gate), MigrationKind::Live) => {
                    let mut m = m;
                    if let Some(dirty) = dirty {
                        let disk_bytes = gate.block_copies.iter().map(|b| b.allocated_bytes).sum();
                        m.plan = Some(plan_live(state, &m, gate.link_bps, disk_bytes, dirty).await);
                    }
                    let job = LiveJob {
                        attach,
                        launched,
                        block_copies: gate.block_copies,
                    };
                    drive_live(state, &m, job, cancel_rx).await
                }
                (Ok(_), MigrationKind::Cold) => drive_cold(state, &m, attach, cancel_rx).await,
            }
        }
        Ok(None) => Ending::Failed(ErrorBody::new("migration-not-found", "job vanished", "")),
        Err(e) => Ending::Failed(ServerError::from(e).body),
    };
    finish(state, id, ending).await;
    state
        .cancels
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
}

/// Starts the destination's QEMU in incoming mode before the plan exists (a memory-only
/// live job); it listens once [`AgentHalves::prepare_destination`] has the parameters. True
/// when it started. A failure only loses the head start: the agent forgets the attempt, and
/// the preparation does it all again and reports what fails.
async fn launch_destination(state: &AppState, m: &Migration) -> bool {
    let launched = async {
        let instance = state
            .store
            .get_instance(&m.instance_id.to_string())
            .await?
            .ok_or_else(|| ServerError::not_found("instance", &m.instance_id.to_string()))?;
        let dst = agent_client(state, &m.destination).await?;
        let tls = crate::stream_tls::for_migration(state, m).await?;
        let body = LaunchIncoming {
            instance_id: instance.id,
            name: instance.name.clone(),
            spec: destination_spec(&instance.spec, &[]),
            tls: Some(tls.destination),
        };
        let path = format!("/v1/migrations/{}/incoming/launch", m.id);
        dst.post::<_, serde_json::Value>(&path, &body)
            .await
            .map_err(|e| ServerError::from_agent(&m.destination, e))?;
        Ok::<_, ServerError>(instance.name)
    }
    .await;
    match launched {
        Ok(name) => {
            let message = format!(
                "{name}'s QEMU started in incoming mode on {} while the dirty rate is measured",
                m.destination
            );
            log(state, m.id, "info", &message).await;
            true
        }
        Err(e) => {
            let message = format!(
                "the destination's QEMU was not started ahead ({}: {}); it starts once the plan is made",
                e.body.code, e.body.message
            );
            log(state, m.id, "warn", &message).await;
            false
        }
    }
}

/// The guest's dirty rate, measured by the source agent (a few hundred milliseconds).
async fn measure_dirty_rate(state: &AppState, m: &Migration) -> Result<DirtyRate, String> {
    dirty_rate(state, &m.source, m.instance_id).await
}

/// The dirty rate of the instance `instance_id` running on `source`, as its agent measures it:
/// shared by a job's plan and the plan preview (`POST /v1/migrations/preview`).
pub(crate) async fn dirty_rate(
    state: &AppState,
    source: &str,
    instance_id: Uuid,
) -> Result<DirtyRate, String> {
    let src = agent_client(state, source)
        .await
        .map_err(|e| e.body.message)?;
    let path = format!("/v1/instances/{instance_id}/dirty-rate");
    src.post::<_, DirtyRate>(&path, &())
        .await
        .map_err(|e| e.to_string())
}

/// The auto policy's plan for a live job: the source agent measured the guest's dirty rate
/// (`measured`), the pre-flight probe gave the link, earlier jobs between the same hosts what
/// QEMU gets through there ([`crate::send_rates`]), and [`ferry_migrate::plan::plan`]
/// chooses. Logged line by line and stored with the job, so a server restarted mid-migration
/// uses the same parameters. A failed measurement is logged and planned around, never fatal.
async fn plan_live(
    state: &AppState,
    m: &Migration,
    link_bps: Option<f64>,
    disk_bytes: u64,
    measured: Result<DirtyRate, String>,
) -> MigrationPlan {
    let instance = state
        .store
        .get_instance(&m.instance_id.to_string())
        .await
        .ok()
        .flatten();
    let dirty = match measured {
        Ok(d) => Some(d.dirty_rate_bps),
        Err(e) => {
            let message = format!("dirty rate not measured: {e}");
            log(state, m.id, "warn", &message).await;
            None
        }
    };
    let planned = compute_plan(
        state,
        &PlanFor {
            instance: instance.as_ref(),
            source: &m.source,
            destination: &m.destination,
            options: &m.options,
            link_bps,
            disk_bytes,
            dirty_rate_bps: dirty,
        },
    )
    .await;
    log(state, m.id, "info", &planned.plan.summary()).await;
    for reason in &planned.plan.reasons {
        log(state, m.id, "info", &format!("plan: {reason}")).await;
    }
    if let Err(e) = state.store.set_plan(m.id, &planned).await {
        log(state, m.id, "warn", &format!("plan not stored: {e}")).await;
    }
    planned
}

/// What the auto policy plans from: one instance moving between two hosts with its options,
/// and what was measured (the link by the probe, the dirty rate by the source agent).
pub(crate) struct PlanFor<'a> {
    pub instance: Option<&'a ferry_api::instances::Instance>,
    pub source: &'a str,
    pub destination: &'a str,
    pub options: &'a ferry_api::migrations::MigrationOptions,
    pub link_bps: Option<f64>,
    pub disk_bytes: u64,
    pub dirty_rate_bps: Option<f64>,
}

/// The plan [`ferry_migrate::plan::plan`] makes for `p`, with the source's cores and the rate
/// learned for the host pair: one function for a job's plan and for the preview shown before
/// a job exists, so the preview predicts what the job will do.
pub(crate) async fn compute_plan(state: &AppState, p: &PlanFor<'_>) -> MigrationPlan {
    let base = p.options.to_params();
    let offline_after = chrono::Duration::seconds(state.config.heartbeat_timeout_s as i64);
    let cpus = match state
        .store
        .get_host(p.source, offline_after, Utc::now())
        .await
    {
        Ok(Some(h)) => h.facts.map(|f| f.cores).unwrap_or(1),
        _ => 1,
    };
    let learned = crate::send_rates::learned(state, p.source, p.destination).await;
    let inputs = PlanInputs {
        ram_bytes: p
            .instance
            .map(|i| u64::from(i.spec.memory_mib) << 20)
            .unwrap_or(0),
        dirty_rate_bps: p.dirty_rate_bps,
        link_bps: p.link_bps,
        host_cpus: cpus,
        guest_vcpus: p.instance.map(|i| i.spec.vcpus).unwrap_or(1),
        downtime_ms: p.options.downtime_ms,
        postcopy_permitted: p.options.post_copy,
        budget: p.options.budget_s.map(Duration::from_secs),
        budget_scale: 1.0,
        timeout_action: p.options.timeout_action.unwrap_or_default(),
        disk_bytes: p.disk_bytes,
        learned_rate_bps: learned.as_ref().map(|r| r.rate_bps),
        learned_switchover_ms: learned.and_then(|r| r.switchover_ms),
        source_rate_bps: state.store.source_send_rate(p.source).await.ok().flatten(),
    };
    let (params, plan) = ferry_migrate::plan::plan(&inputs, &base);
    MigrationPlan { plan, params }
}

/// The link bandwidth the pre-flight probe measured to a candidate, for the plan.
pub(crate) fn probed_link_bps(candidate: &ferry_api::checks::Candidate) -> Option<f64> {
    candidate
        .checks
        .iter()
        .find(|c| c.name == "migration-port-reachable")
        .and_then(|c| c.values.get("bandwidth_mbit_s"))
        .and_then(|v| v.as_f64())
        .map(|mbit| mbit * 1e6 / 8.0)
}

/// The local disks a live migration to a candidate copies, as its storage check decided.
pub(crate) fn block_copies_of(candidate: &ferry_api::checks::Candidate) -> Vec<checks::BlockCopy> {
    candidate
        .checks
        .iter()
        .find(|c| c.name == "storage")
        .and_then(|c| c.values.get("copies"))
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default()
}

/// Runs the full pre-flight suite for the job's destination before anything starts, logging
/// every verdict. A failure that is not overridden (`options.force` on an overridable check)
/// is the job's error: the check's name as code, its message and hint. Otherwise returns the
/// link bandwidth the probe measured, for the plan.
/// What the pre-flight gate found for a job that may start: the link's measured bandwidth and,
/// for a live job, the local disks to copy and where (the storage check's mapping).
struct Gate {
    link_bps: Option<f64>,
    block_copies: Vec<checks::BlockCopy>,
}

async fn preflight_gate(state: &AppState, m: &Migration) -> Result<Gate, ErrorBody> {
    let instance = match state.store.get_instance(&m.instance_id.to_string()).await {
        Ok(Some(i)) => i,
        Ok(None) => {
            return Err(ServerError::not_found("instance", &m.instance_id.to_string()).body)
        }
        Err(e) => return Err(ServerError::from(e).body),
    };
    log(state, m.id, "info", "pre-flight checks").await;
    let candidates = match preflight::evaluate(
        state,
        &preflight::Request {
            instance: &instance,
            kind: m.kind,
            destination: Some(&m.destination),
            probe: true,
            migration: Some(m.id),
            disk_map: Some(&m.options.disk_map),
        },
    )
    .await
    {
        Ok(c) => c,
        Err(e) => return Err(e.body),
    };
    let Some(candidate) = candidates.into_iter().find(|c| c.host == m.destination) else {
        return Err(ErrorBody::new(
            "host-not-found",
            format!("host {} is not a possible destination", m.destination),
            "pick another destination",
        ));
    };
    let mut refused = None;
    for c in &candidate.checks {
        // An agent that does not answer right now is retried by every step below (and a
        // cancel ends the wait), so it does not fail the job here.
        let retried = c.name == "agent-reachable";
        let blocking = checks::blocks(c, m.options.force) && !retried;
        let (level, verdict) = match c.status {
            CheckStatus::Pass => ("info", "pass"),
            CheckStatus::Warn => ("warn", "warn"),
            CheckStatus::Fail if retried => ("warn", "fail, retried while preparing"),
            CheckStatus::Fail if !blocking => ("warn", "fail, overridden by --force"),
            CheckStatus::Fail => ("error", "fail"),
        };
        let hint = if c.hint.is_empty() {
            String::new()
        } else {
            format!(" (hint: {})", c.hint)
        };
        log(
            state,
            m.id,
            level,
            &format!("check {}: {verdict}: {}{hint}", c.name, c.message),
        )
        .await;
        if blocking && refused.is_none() {
            refused = Some(ErrorBody::new(&c.name, c.message.clone(), c.hint.clone()));
        }
    }
    if let Some(body) = refused {
        return Err(body);
    }
    let link_bps = probed_link_bps(&candidate);
    // The mapping the check decided and logged is the one the job runs.
    let block_copies = match m.kind {
        MigrationKind::Live => block_copies_of(&candidate),
        MigrationKind::Cold => Vec::new(),
    };
    Ok(Gate {
        link_bps,
        block_copies,
    })
}

/// Completes a live job's record of what the guest lived through (QEMU's pause from its
/// stats) and logs it in one line, each figure named for what it measures.
async fn finish_impact(state: &AppState, id: Uuid, ending: &Ending) {
    let Ok(Some(m)) = state.store.get_migration(id).await else {
        return;
    };
    let Some(mut impact) = m.impact else {
        return;
    };
    if let Ending::Completed(Some(s)) = ending {
        impact.qemu_pause_ms = Some(s.qemu_pause_ms);
    }
    let _ = state.store.set_impact(id, &impact).await;
    log(state, id, "info", &format!("guest: {}", impact.summary())).await;
}

async fn finish(state: &AppState, id: Uuid, ending: Ending) {
    crate::stream_tls::forget(state, id);
    // Before the store lets go of the instance: heartbeats of both hosts collected during
    // the job must not be read as the state after it.
    if let Ok(Some(m)) = state.store.get_migration(id).await {
        state
            .reports
            .settle(m.instance_id, &[m.source.as_str(), m.destination.as_str()]);
    }
    finish_impact(state, id, &ending).await;
    let result = match &ending {
        Ending::Completed(stats) => {
            if let Some(s) = stats {
                let message = format!(
                    "qemu: completed in {} ms with a pause of {} ms, {:.1} MiB sent in {} rounds",
                    s.total_ms,
                    s.qemu_pause_ms,
                    s.bytes_transferred as f64 / (1 << 20) as f64,
                    s.iterations
                );
                log(state, id, "info", &message).await;
            }
            log(state, id, "info", "completed").await;
            state.store.complete_migration(id, stats.as_ref()).await
        }
        Ending::Cancelled => {
            log(
                state,
                id,
                "info",
                "cancelled; the guest stays on the source",
            )
            .await;
            state
                .store
                .set_migration_state(id, MigrationState::Cancelled, None)
                .await
        }
        Ending::Failed(body) => {
            log(
                state,
                id,
                "error",
                &format!("failed: {}: {}", body.code, body.message),
            )
            .await;
            state
                .store
                .set_migration_state(id, MigrationState::Failed, Some(body))
                .await
        }
    };
    match result {
        Ok(m) => {
            publish_migration(state, &m);
            if let Ok(Some(i)) = state.store.get_instance(&m.instance_id.to_string()).await {
                publish_instance(state, i);
            }
        }
        Err(e) => warn!(%id, error = %e, "cannot record the end of a migration"),
    }
}

async fn set_state(state: &AppState, id: Uuid, to: MigrationState) -> Result<(), ServerError> {
    let m = state.store.set_migration_state(id, to, None).await?;
    publish_migration(state, &m);
    Ok(())
}

async fn drive_cold(
    state: &AppState,
    m: &Migration,
    attach: bool,
    cancel: watch::Receiver<bool>,
) -> Ending {
    match crate::cold::drive(state, m, attach, cancel).await {
        Ok(()) => Ending::Completed(None),
        Err(crate::cold::ColdEnd::Cancelled) => Ending::Cancelled,
        Err(crate::cold::ColdEnd::Failed(body)) => Ending::Failed(body),
    }
}

/// What a live job's driver starts from.
struct LiveJob {
    /// Re-attached after a server restart.
    attach: bool,
    /// The destination's QEMU was started ahead ([`launch_destination`]).
    launched: bool,
    /// The disks the checks decided to copy.
    block_copies: Vec<checks::BlockCopy>,
}

async fn drive_live(
    state: &AppState,
    m: &Migration,
    job: LiveJob,
    cancel: watch::Receiver<bool>,
) -> Ending {
    let LiveJob {
        attach,
        launched,
        block_copies,
    } = job;
    let mut resume = std::collections::HashMap::new();
    if !attach {
        clear_stale_copies(state, m, &block_copies).await;
        resume = crate::kept_copies::take_over(state, m, &block_copies).await;
    }
    let mut halves = match AgentHalves::new(state, m, attach, block_copies, resume, cancel).await {
        Ok(h) => h,
        Err(e) => {
            if launched {
                remove_launched(state, m).await;
            }
            return Ending::Failed(e.body);
        }
    };
    halves.launched = launched;
    if attach && halves.committed {
        // The server stopped after the commit point: only the destination may run the guest.
        halves
            .log(
                "info",
                "the commit was recorded before the restart: finishing on the destination",
            )
            .await;
        return match ferry_migrate::phases::finish_committed(&mut halves).await {
            Ok(()) => {
                halves.end_copies(true).await;
                Ending::Completed(halves.source_stats().await)
            }
            Err(e) => Ending::Failed(ErrorBody::new(e.code(), e.to_string(), e.hint())),
        };
    }
    let mut observe = |_: &ferry_migrate::SourceEvent| {};
    let result = ferry_migrate::live_migrate(&mut halves, &mut observe).await;
    halves.save_impact().await;
    if let Err(e) = &result {
        // A datastore that filled up is no place to keep a partial copy on.
        let code = halves
            .last_error
            .as_ref()
            .map_or(e.code(), |b| b.code.as_str());
        if code == "no-space" {
            halves.dest_kept_images = false;
            halves.discard_kept = true;
        }
    }
    halves.end_copies(result.is_ok()).await;
    match result {
        Ok(outcome) => {
            crate::send_rates::learn(state, m, &outcome.source).await;
            Ending::Completed(Some(stats_of(&outcome.source)))
        }
        Err(MigrateError::Cancelled) => Ending::Cancelled,
        Err(e) => Ending::Failed(
            halves
                .last_error
                .take()
                .unwrap_or_else(|| ErrorBody::new(e.code(), e.to_string(), e.hint())),
        ),
    }
}

/// Removes a destination started ahead that the job will not use; best effort, and a failure
/// is logged on the job.
async fn remove_launched(state: &AppState, m: &Migration) {
    let path = format!("/v1/migrations/{}/incoming", m.id);
    let removed = match agent_client(state, &m.destination).await {
        Ok(dst) => dst
            .delete::<serde_json::Value>(&path)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.body.message),
    };
    if let Err(e) = removed {
        let message = format!("the destination started ahead was not removed: {e}");
        log(state, m.id, "warn", &message).await;
    }
}

/// An instance that moves back to a host it left keeps its images there until their cleanup;
/// those images are stale now and would block the copies' target files. Removes them first
/// (the same cleanup `ferry migration cleanup` does, logged on both jobs).
async fn clear_stale_copies(state: &AppState, m: &Migration, copies: &[checks::BlockCopy]) {
    if copies.is_empty() {
        return;
    }
    let filter = crate::store::MigrationFilter {
        instance: Some(m.instance_id),
        state: Some(MigrationState::Completed),
        ..Default::default()
    };
    let Ok(earlier) = state.store.list_migrations(&filter).await else {
        return;
    };
    let every = crate::store::MigrationFilter {
        instance: Some(m.instance_id),
        ..Default::default()
    };
    let all = state
        .store
        .list_migrations(&every)
        .await
        .unwrap_or_default();
    for old in earlier.iter().filter(|o| {
        o.source == m.destination
            && o.cleaned_up_at.is_none()
            && o.copies
                .iter()
                .any(|c| c.source_kept && copies.iter().any(|b| b.target == c.image))
    }) {
        let replaced = replaced_later(old, &all, m);
        if replaced {
            let message = format!(
                "the images migration {} left on {} were replaced by a later copy; recorded as cleaned up",
                old.id, m.destination
            );
            log(state, m.id, "info", &message).await;
            match state.store.mark_cleaned_up(old.id).await {
                Ok(cleaned) => publish_migration(state, &cleaned),
                Err(e) => warn!(id = %old.id, error = %e, "cannot record the cleanup"),
            }
            continue;
        }
        let message = format!(
            "{} kept the images migration {} left there; they are stale now and are removed before the copy",
            m.destination, old.id
        );
        log(state, m.id, "info", &message).await;
        if let Err(e) =
            crate::cold::cleanup(state, old, "ferry (the instance moves back there)").await
        {
            let message = format!(
                "the stale images of migration {} were not removed: {}",
                old.id, e.body.message
            );
            log(state, m.id, "warn", &message).await;
        }
    }
}

/// Whether a job later than `old` (other than `m`) made its target where `old` kept a
/// source image on `m`'s destination. That job found the old image gone already (a target
/// must not exist), whatever `old`'s record says: what is there now is that job's (a partial
/// copy kept for a retry, say), never to be removed as `old`'s leftover.
fn replaced_later(old: &Migration, all: &[Migration], m: &Migration) -> bool {
    all.iter().any(|later| {
        later.id != m.id
            && later.created_at > old.created_at
            && later.destination == m.destination
            && later.copies.iter().any(|l| {
                let made = l.target_kept || l.state == DiskCopyState::Copied;
                made && old
                    .copies
                    .iter()
                    .any(|c| c.source_kept && l.target.as_ref() == Some(&c.image))
            })
    })
}

/// The two halves, each on its host's agent.
struct AgentHalves<'a> {
    state: &'a AppState,
    m: Migration,
    instance: Instance,
    params: MigrationParams,
    src: ApiClient,
    dst: ApiClient,
    attach: bool,
    cancel: watch::Receiver<bool>,
    /// Last sample sequence number received from the source agent.
    seq: u64,
    /// The most precise error seen (an agent's own code), preferred over the engine's.
    last_error: Option<ErrorBody>,
    /// Phase and round of the last sample written to the log.
    last_reported: Option<(ferry_migrate::Phase, u64)>,
    /// The source agent said it let QEMU switch over: cancels are refused from then on.
    switched_over: bool,
    /// The store says the destination owns the guest (the commit point is behind us).
    committed: bool,
    /// Whether log lines are held, and those held (see `hold_logs`).
    held_logs: std::sync::Mutex<(bool, Vec<(String, String)>)>,
    /// Block migration: where each local disk goes (empty after a restart: the destination
    /// was prepared before it).
    block_copies: Vec<checks::BlockCopy>,
    /// Block migration: the job's record of each disk's copy, kept current from the samples.
    copies: Vec<DiskCopy>,
    /// Block migration: the destination's exports, for the source's mirrors.
    mirrors: Vec<ferry_migrate::MirrorTarget>,
    /// Block migration: the (disk, event) log lines already written.
    disk_events: std::collections::HashSet<(String, &'static str)>,
    /// Block migration: the disks whose copy resumes from an image an earlier attempt kept
    /// on the destination, each with its bitmap.
    resume: std::collections::HashMap<String, String>,
    /// Block migration: the destination kept its images when it was removed.
    dest_kept_images: bool,
    /// The destination's QEMU was started ahead; preparing it only makes it listen.
    launched: bool,
    /// Block migration: the destination's kept images are to be removed after all.
    discard_kept: bool,
    /// What the guest lives through, from the samples (stored when it changes).
    impact: ferry_migrate::GuestImpact,
    /// The source QEMU's settings were read back (or the job has them from before a restart).
    qemu_settings_read: bool,
}

/// Which half an agent call is for.
#[derive(Debug, Clone, Copy)]
enum Side {
    Source,
    Destination,
}

impl<'a> AgentHalves<'a> {
    async fn new(
        state: &'a AppState,
        m: &Migration,
        attach: bool,
        block_copies: Vec<checks::BlockCopy>,
        resume: std::collections::HashMap<String, String>,
        cancel: watch::Receiver<bool>,
    ) -> Result<AgentHalves<'a>, ServerError> {
        let instance = state
            .store
            .get_instance(&m.instance_id.to_string())
            .await?
            .ok_or_else(|| ServerError::not_found("instance", &m.instance_id.to_string()))?;
        let copies = if attach {
            m.copies.clone()
        } else {
            let copies: Vec<DiskCopy> = block_copies
                .iter()
                .map(|b| {
                    let bitmap = resume
                        .get(&b.disk)
                        .cloned()
                        .unwrap_or_else(|| crate::kept_copies::bitmap_name(m.id));
                    planned_copy(b, bitmap)
                })
                .collect();
            if !copies.is_empty() {
                state.store.set_copies(m.id, &copies).await?;
                let spec = destination_spec(&instance.spec, &copies);
                state.store.set_dest_spec(m.id, &spec).await?;
            }
            copies
        };
        Ok(AgentHalves {
            block_copies,
            copies,
            mirrors: Vec::new(),
            disk_events: Default::default(),
            resume,
            dest_kept_images: false,
            discard_kept: false,
            launched: false,
            impact: m
                .impact
                .clone()
                .unwrap_or_else(|| ferry_migrate::GuestImpact::new(instance.spec.vcpus)),
            qemu_settings_read: m.qemu_settings.is_some(),
            state,
            params: m
                .plan
                .as_ref()
                .map(|p| p.params.clone())
                .unwrap_or_else(|| m.options.to_params()),
            src: agent_client(state, &m.source).await?,
            dst: agent_client(state, &m.destination).await?,
            m: m.clone(),
            attach,
            cancel,
            seq: 0,
            last_error: None,
            last_reported: None,
            switched_over: false,
            // After a restart the store tells whether the commit happened: it is the only
            // thing that moves an instance while its migration runs.
            committed: instance.host == m.destination,
            held_logs: Default::default(),
            instance,
        })
    }

    fn path(&self, tail: &str) -> String {
        format!("/v1/migrations/{}{tail}", self.m.id)
    }

    fn host(&self, side: Side) -> String {
        match side {
            Side::Source => self.m.source.clone(),
            Side::Destination => self.m.destination.clone(),
        }
    }

    fn client(&self, side: Side) -> ApiClient {
        match side {
            Side::Source => self.src.clone(),
            Side::Destination => self.dst.clone(),
        }
    }

    /// One step of the migration on `side`'s agent: POST `tail` with `body`, retrying while
    /// the agent is unreachable. Before switchover (`cancellable`) a cancel request wins;
    /// an agent's refusal becomes the job's error with the agent's own code.
    async fn step<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &mut self,
        side: Side,
        tail: &str,
        body: &B,
        cancellable: bool,
    ) -> Result<T, MigrateError> {
        let (client, host, path) = (self.client(side), self.host(side), self.path(tail));
        let result = self
            .retrying(&host, cancellable, || client.post(&path, body))
            .await;
        if result.is_err() && cancellable && self.cancel_requested() {
            return Err(MigrateError::Cancelled);
        }
        result.map_err(|e| self.agent_failed(&host, e))
    }

    /// A cleanup step on `side`'s agent (`DELETE` when `delete`, else `POST`): `Ok(false)`
    /// when the agent had nothing to clean (404).
    async fn cleanup(
        &mut self,
        side: Side,
        tail: &str,
        delete: bool,
    ) -> Result<bool, MigrateError> {
        Ok(self.cleanup_answer(side, tail, delete).await?.is_some())
    }

    /// [`Self::cleanup`] with the agent's answer (`None` for a 404).
    async fn cleanup_answer(
        &mut self,
        side: Side,
        tail: &str,
        delete: bool,
    ) -> Result<Option<serde_json::Value>, MigrateError> {
        let (client, host, path) = (self.client(side), self.host(side), self.path(tail));
        let result: Result<serde_json::Value, ApiError> = self
            .retrying(&host, false, || {
                let (client, path) = (client.clone(), path.clone());
                async move {
                    if delete {
                        client.delete(&path).await
                    } else {
                        client.post(&path, &()).await
                    }
                }
            })
            .await;
        match result {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.status() == Some(404) => Ok(None),
            // An undo step's failure is logged by its caller; it never replaces the error
            // that ended the job (a source QEMU that crashed mid-cancel fails its resume too,
            // and the crash is what the operator must read).
            Err(e) => Err(agent_error(&host, e).1),
        }
    }

    async fn log(&self, level: &str, message: &str) {
        {
            let mut held = self.held_logs.lock().unwrap_or_else(|e| e.into_inner());
            if held.0 {
                held.1.push((level.to_string(), message.to_string()));
                return;
            }
        }
        log(self.state, self.m.id, level, message).await;
    }

    /// While the guest is stopped on both sides (from the source's completion to the start on
    /// the destination) log lines wait in memory, so that no store write but the commit stands
    /// between the source's stop and the start; `release_logs` writes them.
    fn hold_logs(&self) {
        self.held_logs.lock().unwrap_or_else(|e| e.into_inner()).0 = true;
    }

    async fn release_logs(&self) {
        let lines = {
            let mut held = self.held_logs.lock().unwrap_or_else(|e| e.into_inner());
            held.0 = false;
            std::mem::take(&mut held.1)
        };
        for (level, message) in lines {
            log(self.state, self.m.id, &level, &message).await;
        }
    }

    /// Records an agent's error and turns it into the engine's error type.
    /// This job's stream credentials; a failure to issue them ends the job before any
    /// stream starts, with the server's own error recorded.
    async fn stream_tls(&mut self) -> Result<crate::stream_tls::HalvesTls, MigrateError> {
        crate::stream_tls::for_migration(self.state, &self.m)
            .await
            .map_err(|e| {
                let err =
                    MigrateError::Tls(ferry_migrate::TlsError::Invalid(e.body.message.clone()));
                self.last_error = Some(e.body);
                err
            })
    }

    fn agent_failed(&mut self, host: &str, e: ApiError) -> MigrateError {
        let (body, err) = agent_error(host, e);
        self.last_error = Some(body);
        err
    }

    fn cancel_requested(&self) -> bool {
        *self.cancel.borrow()
    }

    /// Calls an agent, retrying while it cannot be reached, up to [`crate::agents::AGENT_RETRY`]. Before
    /// switchover (`cancellable`) a cancel request ends the retries at once, so cancelling
    /// works while a host is down.
    async fn retrying<T, F, Fut>(
        &self,
        host: &str,
        cancellable: bool,
        call: F,
    ) -> Result<T, ApiError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ApiError>>,
    {
        let cancel = cancellable.then(|| self.cancel.clone());
        let warn = |message: String| async move { self.log("warn", &message).await };
        crate::agents::retry_unreachable(host, cancel, warn, call).await
    }

    /// The controller's decisions, each a log line with the numbers behind it.
    async fn record_decisions(&mut self, decisions: Vec<(u64, Decision)>) {
        for (seq, d) in decisions {
            self.seq = self.seq.max(seq);
            let level = match d.action {
                ferry_migrate::Action::Abort { .. } | ferry_migrate::Action::StartPostcopy => {
                    "warn"
                }
                _ => "info",
            };
            self.log(
                level,
                &format!(
                    "controller at {:.1} s: {}",
                    d.elapsed_ms as f64 / 1000.0,
                    d.reason
                ),
            )
            .await;
        }
    }

    async fn record(&mut self, samples: Vec<(u64, Progress)>) {
        for (seq, p) in samples {
            self.seq = self.seq.max(seq);
            if !self.qemu_settings_read && crate::qemu_settings::is_memory(p.phase) {
                self.qemu_settings_read = true;
                let (level, message) = crate::qemu_settings::record(
                    self.state,
                    self.m.id,
                    &self.src,
                    self.instance.id,
                )
                .await;
                self.log(level, &message).await;
            }
            // What QEMU reported, once per phase or round, so the log tells the story without
            // every sample.
            if p.phase != ferry_migrate::Phase::Setup
                && self.last_reported != Some((p.phase, p.iteration))
            {
                self.last_reported = Some((p.phase, p.iteration));
                let mib = |b: u64| b as f64 / (1 << 20) as f64;
                self.log(
                    "info",
                    &format!(
                        "qemu: {} round {}: {:.1} MiB sent, {:.1} MiB remaining, sending {:.1} MiB/s, guest dirtying {:.1} MiB/s",
                        p.phase.as_str(),
                        p.iteration,
                        mib(p.transferred_bytes),
                        mib(p.remaining_bytes),
                        p.throughput_bps / (1 << 20) as f64,
                        p.dirty_rate_bps / (1 << 20) as f64,
                    ),
                )
                .await;
            }
            if !p.disks.is_empty() {
                self.record_disks(&p).await;
            }
            self.record_impact(&p).await;
            let _ = self.state.store.add_sample(self.m.id, &p).await;
            let _ = self.state.store.set_progress(self.m.id, &p).await;
            self.state.events.publish(Event::Progress {
                migration_id: self.m.id,
                progress: p,
            });
        }
    }
}

impl AgentHalves<'_> {
    /// Folds a sample into what the guest lives through; a change of the vCPU throttle is
    /// logged with its value and stored (with what outside observers reported meanwhile).
    async fn record_impact(&mut self, p: &Progress) {
        let Some(step) = self.impact.observe(p) else {
            if self.m.impact.is_none() {
                // The first sample: the job has a record from now on.
                self.m.impact = Some(self.impact.clone());
                let _ = self.state.store.set_impact(self.m.id, &self.impact).await;
            }
            return;
        };
        let message = if step.percent == 0 {
            "auto-converge released the guest's vCPUs (throttle 0 %)".to_string()
        } else {
            format!(
                "auto-converge throttles the guest's vCPUs to {} % (peak so far {} %)",
                step.percent, self.impact.throttle_peak_percent
            )
        };
        self.log("info", &message).await;
        self.save_impact().await;
    }

    /// Stores what the guest lived through so far, with what outside observers reported
    /// meanwhile (they write to the store directly).
    async fn save_impact(&mut self) {
        if let Ok(Some(stored)) = self.state.store.get_migration(self.m.id).await {
            for o in stored.impact.map(|i| i.observed).unwrap_or_default() {
                if !self.impact.observed.iter().any(|x| x.by == o.by) {
                    self.impact.observed.push(o);
                }
            }
        }
        self.m.impact = Some(self.impact.clone());
        let _ = self.state.store.set_impact(self.m.id, &self.impact).await;
    }

    /// Keeps the job's copies current from a sample's disks (stored when a disk's state
    /// changes: the bytes of every sample are in the job's progress already), and logs each
    /// mirror's start, sync and completion once.
    async fn record_disks(&mut self, p: &Progress) {
        let mut lines = Vec::new();
        let mut changed = false;
        for d in &p.disks {
            let Some(c) = self.copies.iter_mut().find(|c| c.disk == d.disk) else {
                continue;
            };
            let state = match d.state {
                ferry_migrate::DiskState::Copying | ferry_migrate::DiskState::Synced => {
                    DiskCopyState::Copying
                }
                ferry_migrate::DiskState::Completed => DiskCopyState::Copied,
                ferry_migrate::DiskState::Cancelled | ferry_migrate::DiskState::Failed => {
                    DiskCopyState::Failed
                }
            };
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            let mut once = |event: &'static str, line: String| {
                if self.disk_events.insert((d.disk.clone(), event)) {
                    lines.push(line);
                }
            };
            let target = c.target.as_ref().unwrap_or(&c.image);
            once(
                "started",
                if d.resumed {
                    format!(
                        "disk {}: copy resumed into {target}: only what the kept image lacks is sent ({:.1} MiB marked)",
                        d.disk,
                        mib(d.remaining_bytes)
                    )
                } else if self.resume.contains_key(&d.disk) {
                    format!(
                        "disk {}: copy started to {target}: the source's record of what the kept image lacks is gone or untrustworthy, so the whole disk is sent again",
                        d.disk
                    )
                } else {
                    format!("disk {}: copy started to {target}", d.disk)
                },
            );
            if d.whole_disk_mirror {
                once(
                    "whole-disk-mirror",
                    format!(
                        "disk {}: the guest rewrote it faster than {} pass(es) could copy it; a write-blocking mirror of the whole disk takes over (it resends the disk's data)",
                        d.disk, d.passes
                    ),
                );
            }
            match d.state {
                ferry_migrate::DiskState::Synced => once(
                    "synced",
                    format!(
                        "disk {}: in sync after {:.1} MiB in {} pass(es); guest writes now reach both hosts before they complete (write-blocking)",
                        d.disk,
                        mib(d.copied_bytes),
                        d.passes
                    ),
                ),
                ferry_migrate::DiskState::Completed => once(
                    "completed",
                    format!(
                        "disk {}: copy completed at switchover, {:.1} MiB copied; the destination image is consistent",
                        d.disk,
                        mib(d.copied_bytes)
                    ),
                ),
                ferry_migrate::DiskState::Failed => once(
                    "failed",
                    format!("disk {}: copy failed after {:.1} MiB", d.disk, mib(d.copied_bytes)),
                ),
                ferry_migrate::DiskState::Cancelled => once(
                    "cancelled",
                    format!(
                        "disk {}: copy stopped after {:.1} MiB; the source image is untouched",
                        d.disk,
                        mib(d.copied_bytes)
                    ),
                ),
                ferry_migrate::DiskState::Copying => {}
            }
            changed |= c.state != state;
            c.state = state;
            c.done_bytes = d.copied_bytes;
            c.remaining_bytes = d.remaining_bytes;
            c.rate_bps = d.rate_bps;
            c.elapsed_ms = p.elapsed_ms;
        }
        changed |= !lines.is_empty();
        for line in lines {
            self.log("info", &line).await;
        }
        if changed {
            let _ = self.state.store.set_copies(self.m.id, &self.copies).await;
        }
    }

    /// The end of the job for its copies: on success each is copied and the source's image is
    /// kept until the cleanup; otherwise each failed (the destination's images were removed).
    async fn end_copies(&mut self, completed: bool) {
        if self.copies.is_empty() {
            return;
        }
        // A copy that never got as far as a sample may have a bitmap that does not yet
        // describe its image: only copies seen running are kept for a retry.
        let mut unusable = Vec::new();
        for c in &mut self.copies {
            if completed {
                c.state = DiskCopyState::Copied;
                c.remaining_bytes = 0;
                c.source_kept = true;
            } else if c.state != DiskCopyState::Copied || !self.committed {
                if (self.dest_kept_images || self.discard_kept) && !self.committed {
                    let started = c.state != DiskCopyState::Pending;
                    c.target_kept = started && !self.discard_kept;
                    if !c.target_kept {
                        unusable.extend(c.target.clone());
                    }
                }
                c.state = DiskCopyState::Failed;
            }
        }
        if let Err(e) = self.state.store.set_copies(self.m.id, &self.copies).await {
            warn!(id = %self.m.id, error = %e, "cannot record the disk copies");
        }
        if !unusable.is_empty() {
            let what = "the images no retry can resume from";
            let host = self.m.destination.clone();
            if let Err(e) =
                crate::cold::remove_copies(self.state, &self.m, &host, unusable, "ferry", what)
                    .await
            {
                warn!(id = %self.m.id, error = %e, "destination images not removed");
            }
        }
        for c in self.copies.iter().filter(|c| c.target_kept) {
            let message = format!(
                "disk {}: {} keeps the partial copy ({:.1} MiB sent) for a retry to the same datastore; `ferry migration cleanup {}` removes it",
                c.disk,
                self.m.destination,
                c.done_bytes as f64 / (1 << 20) as f64,
                self.m.id
            );
            self.log("info", &message).await;
        }
        if completed {
            let names: Vec<String> = self.copies.iter().map(|c| c.image.to_string()).collect();
            let message = format!(
                "the source images stay on {} until `ferry migration cleanup {}`: {}",
                self.m.source,
                self.m.id,
                names.join(", ")
            );
            self.log("info", &message).await;
        }
    }

    /// QEMU's figures of the completed copy, if the source agent still has them.
    async fn source_stats(&self) -> Option<MigrationStats> {
        let status: SourceStatus = self.src.get(&self.path("")).await.ok()?;
        status.outcome.map(|o| stats_of(&o))
    }
}

fn stats_of(o: &SourceOutcome) -> MigrationStats {
    MigrationStats {
        total_ms: o.total_time_ms,
        qemu_pause_ms: o.downtime_ms,
        bytes_transferred: o.transferred_bytes,
        iterations: o.iterations,
    }
}

/// The job's record of a disk it is about to copy live, tracked by `bitmap` on the source.
fn planned_copy(b: &checks::BlockCopy, bitmap: String) -> DiskCopy {
    DiskCopy {
        disk: b.disk.clone(),
        image: b.source.clone(),
        target: Some(b.target.clone()),
        format: b.format,
        size_bytes: b.size_bytes,
        state: DiskCopyState::Pending,
        done_bytes: 0,
        remaining_bytes: b.allocated_bytes,
        rate_bps: 0.0,
        elapsed_ms: 0,
        sha256: None,
        source_kept: false,
        target_kept: false,
        bitmap: Some(bitmap),
    }
}

/// The instance's spec on the destination: each copied disk on its target datastore.
fn destination_spec(spec: &InstanceSpec, copies: &[DiskCopy]) -> InstanceSpec {
    let mut out = spec.clone();
    for d in &mut out.disks {
        if let Some(c) = copies.iter().find(|c| c.disk == d.id && c.image == d.image) {
            if let Some(t) = &c.target {
                d.image = t.clone();
            }
        }
    }
    out
}

/// The instance's spec on the source, from either side's spec.
fn source_spec(spec: &InstanceSpec, copies: &[DiskCopy]) -> InstanceSpec {
    let mut out = spec.clone();
    for d in &mut out.disks {
        if let Some(c) = copies
            .iter()
            .find(|c| c.disk == d.id && c.target.as_ref() == Some(&d.image))
        {
            d.image = c.image.clone();
        }
    }
    out
}

/// An agent's error as the job records it (the agent's own code) and as the engine sees it.
fn agent_error(host: &str, e: ApiError) -> (ErrorBody, MigrateError) {
    let body = ServerError::from_agent(host, e).body;
    let err = MigrateError::Failed(format!("{}: {}", body.code, body.message));
    (body, err)
}

/// Where the destination agent says its QEMU listens.
fn listen_addr(ready: &IncomingReady) -> Result<SocketAddr, MigrateError> {
    ready
        .addr
        .parse()
        .map_err(|_| MigrateError::Destination(format!("bad address {}", ready.addr)))
}

impl AgentHalves<'_> {
    /// Polls the source agent until its half ends, recording samples and decisions.
    async fn follow_source(&mut self) -> Result<SourceOutcome, MigrateError> {
        let poll = Duration::from_millis(self.state.config.progress_poll_ms);
        let mut cancel_sent = false;
        let mut last_unreachable_log: Option<Instant> = None;
        loop {
            if self.cancel_requested() && !cancel_sent {
                self.log("info", "cancel requested; asking the source to stop")
                    .await;
                match self
                    .src
                    .post::<_, SourceStatus>(&self.path("/cancel"), &())
                    .await
                {
                    Ok(_) => cancel_sent = true,
                    Err(e) if e.code() == "too-late-to-cancel" => {
                        cancel_sent = true;
                        let message = format!(
                            "cancel refused: too late, the source has switched over and the guest is moving to {}",
                            self.m.destination
                        );
                        self.log("warn", &message).await;
                    }
                    Err(e) => {
                        self.log("warn", &format!("cancel not delivered yet: {e}"))
                            .await
                    }
                }
            }
            let asked = Instant::now();
            let status: SourceStatus = match self
                .src
                .get(&format!(
                    "{}?after={}&wait_ms={}",
                    self.path(""),
                    self.seq,
                    poll.as_millis()
                ))
                .await
            {
                Ok(s) => s,
                Err(ApiError::Unreachable { .. }) => {
                    // Only the source knows whether it handed over: wait for it.
                    if last_unreachable_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        self.log(
                            "warn",
                            &format!(
                                "source agent on {} unreachable; waiting for it",
                                self.m.source
                            ),
                        )
                        .await;
                        last_unreachable_log = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(e) => return Err(self.agent_failed(&self.m.source.clone(), e)),
            };
            let news = !status.samples.is_empty() || !status.decisions.is_empty();
            self.record_decisions(status.decisions).await;
            let postcopy = status
                .samples
                .iter()
                .any(|(_, p)| p.phase == ferry_migrate::Phase::Postcopy);
            self.record(status.samples).await;
            if status.switched_over && !self.switched_over {
                self.switched_over = true;
                let _ = set_state(self.state, self.m.id, MigrationState::Completing).await;
                let message = if postcopy {
                    format!(
                        "post-copy started: the guest runs on {}; cancels are refused from now",
                        self.m.destination
                    )
                } else {
                    format!(
                        "switchover: {} stopped the guest and sends the last pages; cancels are refused from now",
                        self.m.source
                    )
                };
                self.log("info", &message).await;
            }
            if postcopy && !self.committed {
                // Post-copy hands the guest over when it starts: the destination owns it.
                if let Err(e) = self.commit().await {
                    warn!(error = %e, "cannot record the post-copy destination as owner yet");
                }
            }
            match status.state {
                SourceState::Running => {}
                SourceState::Completed => {
                    return status.outcome.ok_or_else(|| {
                        MigrateError::Failed("source reported completion without figures".into())
                    })
                }
                SourceState::Cancelled => return Err(MigrateError::Cancelled),
                SourceState::PostcopyPaused => {
                    let why = status
                        .error
                        .map(|e| e.message)
                        .unwrap_or_else(|| "the post-copy stream broke".into());
                    return Err(MigrateError::PostcopyPaused(why));
                }
                SourceState::Failed => {
                    let body = status.error.unwrap_or_else(|| {
                        ErrorBody::new("migration-failed", "the source reported a failure", "")
                    });
                    // After post-copy started the destination holds the newest memory: the
                    // phases must neither remove it nor resume the source.
                    let err = if body.code.starts_with("postcopy-") {
                        MigrateError::PostcopyFailed(body.message.clone())
                    } else {
                        MigrateError::Failed(body.message.clone())
                    };
                    self.last_error = Some(body);
                    return Err(err);
                }
                SourceState::Unknown => {
                    return Err(MigrateError::Failed(
                        "the source agent has no record of this migration (it never started)"
                            .into(),
                    ))
                }
            }
            // The agent answers at once when there is news, else after `poll`: sleep only
            // when it answered early with nothing (an agent that cannot wait).
            if !news && asked.elapsed() < poll / 2 {
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {},
                    _ = self.cancel.changed() => {},
                }
            }
        }
    }
}

impl MigrationHalves for AgentHalves<'_> {
    async fn prepare_destination(&mut self) -> Result<SocketAddr, MigrateError> {
        if self.attach {
            // The stream address only matters to start the source, which already happened
            // (or will be found never to have happened).
            return Ok(SocketAddr::from(([0, 0, 0, 0], 0)));
        }
        if !self.launched {
            self.log(
                "info",
                &format!(
                    "starting {} in incoming mode on {}",
                    self.instance.name, self.m.destination
                ),
            )
            .await;
        }
        let disks: Vec<IncomingDisk> = self
            .block_copies
            .iter()
            .map(|b| IncomingDisk {
                disk: b.disk.clone(),
                image: b.target.clone(),
                format: b.format,
                size_bytes: b.size_bytes,
                backing: b.backing.clone(),
                required_bytes: b.required_bytes(),
                reuse: self.resume.contains_key(&b.disk),
            })
            .collect();
        for b in &self.block_copies {
            let message = format!(
                "disk {}: {} -> {} on {} ({})",
                b.disk, b.source, b.target, self.m.destination, b.reason
            );
            self.log("info", &message).await;
        }
        let body = PrepareIncoming {
            instance_id: self.instance.id,
            name: self.instance.name.clone(),
            spec: destination_spec(&self.instance.spec, &self.copies),
            params: self.params.clone(),
            disks,
            tls: Some(self.stream_tls().await?.destination),
        };
        self.log(
            "info",
            "streams encrypted: TLS with certificates issued for this migration and these two hosts only",
        )
        .await;
        let ready: IncomingReady = self
            .step(Side::Destination, "/incoming", &body, true)
            .await?;
        self.log("info", &format!("destination listening on {}", ready.addr))
            .await;
        for t in &ready.disks {
            let message = if t.resume {
                format!(
                    "disk {}: kept image exported on {}; only what it lacks is sent",
                    t.disk, t.addr
                )
            } else if self.resume.contains_key(&t.disk) {
                format!(
                    "disk {}: the kept image could not be reused (gone, or no longer the disk's format and size); a new one exported on {} gets the whole disk",
                    t.disk, t.addr
                )
            } else {
                format!(
                    "disk {}: new image exported on {} for the copy",
                    t.disk, t.addr
                )
            };
            self.log("info", &message).await;
        }
        // The source's mirror speed needs each disk's size and data (see `mirror_speed`).
        self.mirrors = ready
            .disks
            .iter()
            .map(|t| {
                let b = self.block_copies.iter().find(|b| b.disk == t.disk);
                let c = self.copies.iter().find(|c| c.disk == t.disk);
                ferry_migrate::MirrorTarget {
                    size_bytes: b.map_or(0, |b| b.size_bytes),
                    allocated_bytes: b.filter(|b| b.measured).map_or(0, |b| b.allocated_bytes),
                    bitmap: c.and_then(|c| c.bitmap.clone()).unwrap_or_default(),
                    ..t.clone()
                }
            })
            .collect();
        listen_addr(&ready)
    }

    async fn run_source(
        &mut self,
        dest: SocketAddr,
        _observe: &mut ferry_migrate::source::Observer<'_>,
    ) -> Result<SourceOutcome, MigrateError> {
        if !self.attach {
            if self.cancel_requested() {
                return Err(MigrateError::Cancelled);
            }
            let _ = set_state(self.state, self.m.id, MigrationState::Migrating).await;
            self.log(
                "info",
                &format!("{} -> {} at {dest}", self.m.source, self.m.destination),
            )
            .await;
            let body = StartSource {
                instance_id: self.instance.id,
                destination: dest.to_string(),
                params: self.params.clone(),
                disks: self.mirrors.clone(),
                tls: Some(self.stream_tls().await?.source),
            };
            let _: SourceStatus = self.step(Side::Source, "/source", &body, true).await?;
        }
        self.follow_source().await
    }

    async fn recover_destination(&mut self) -> Result<SocketAddr, MigrateError> {
        self.log(
            "warn",
            &format!(
                "post-copy stream broke; {} listens again",
                self.m.destination
            ),
        )
        .await;
        let ready: IncomingReady = self.step(Side::Destination, "/recover", &(), false).await?;
        listen_addr(&ready)
    }

    async fn reconnect_source(
        &mut self,
        dest: SocketAddr,
        _observe: &mut ferry_migrate::source::Observer<'_>,
    ) -> Result<SourceOutcome, MigrateError> {
        self.log(
            "info",
            &format!(
                "{} reconnects the post-copy stream to {dest}",
                self.m.source
            ),
        )
        .await;
        let body = ReconnectSource {
            destination: dest.to_string(),
        };
        let _: SourceStatus = self.step(Side::Source, "/reconnect", &body, false).await?;
        self.follow_source().await
    }

    async fn destination_ready(&mut self) -> Result<(), MigrateError> {
        // The guest is stopped everywhere until the start: what is not needed for it waits.
        self.hold_logs();
        let _: AgentInstance = self.step(Side::Destination, "/confirm", &(), false).await?;
        if !self.switched_over {
            let _ = set_state(self.state, self.m.id, MigrationState::Completing).await;
        }
        let message = format!(
            "the source handed over; {} holds the whole guest, paused",
            self.m.destination
        );
        self.log("info", &message).await;
        Ok(())
    }

    /// The commit point: one transaction moves the instance to the destination (generation +
    /// 1). Before it only the source may run the guest; after it only the destination.
    async fn commit(&mut self) -> Result<(), MigrateError> {
        if self.committed {
            return Ok(());
        }
        self.state
            .store
            .move_instance_for(self.m.id)
            .await
            .map_err(|e| MigrateError::Failed(format!("the commit was not recorded: {e}")))?;
        self.committed = true;
        let message = format!(
            "commit: {} belongs to {} from now on; the source is never resumed",
            self.instance.name, self.m.destination
        );
        self.log("info", &message).await;
        Ok(())
    }

    /// Only after the destination is proven gone without having run: the instance belongs
    /// to the source again (generation + 1).
    async fn uncommit(&mut self) -> Result<(), MigrateError> {
        let spec = source_spec(&self.instance.spec, &self.copies);
        self.state
            .store
            .move_instance_back(self.instance.id, &self.m.source, &spec)
            .await
            .map_err(|e| MigrateError::Failed(format!("the commit was not undone: {e}")))?;
        self.committed = false;
        let message = format!(
            "commit undone: {} never ran the guest and is gone; {} belongs to {} again",
            self.m.destination, self.instance.name, self.m.source
        );
        self.log("warn", &message).await;
        Ok(())
    }

    async fn start_destination(&mut self) -> Result<(), StartError> {
        let (client, host, path) = (
            self.client(Side::Destination),
            self.host(Side::Destination),
            self.path("/start"),
        );
        let result: Result<AgentInstance, ApiError> = self
            .retrying(&host, false, || client.post(&path, &()))
            .await;
        self.release_logs().await;
        match result {
            Ok(_) => {
                let _ = self
                    .state
                    .store
                    .set_instance_state(self.instance.id, InstanceState::Running)
                    .await;
                if let Ok(Some(i)) = self
                    .state
                    .store
                    .get_instance(&self.instance.id.to_string())
                    .await
                {
                    publish_instance(self.state, i);
                }
                let message = format!("the guest runs on {}", self.m.destination);
                self.log("info", &message).await;
                Ok(())
            }
            Err(e) => {
                // Unreachable, or a server-side error that may pass: the guest stays paused
                // there and the start is tried again. A refusal (4xx) is final.
                let retry = !matches!(e.status(), Some(400..=499));
                let never_ran = e.code() == "destination-never-started";
                // Past the commit: the agent's words, not the engine's "stays on the source".
                let body = ServerError::from_agent(&host, e).body;
                let error = MigrateError::NotStarted(format!("{}: {}", body.code, body.message));
                self.last_error = Some(body.clone());
                let message = format!(
                    "the committed guest did not start on {host} yet: {}: {}{}",
                    body.code,
                    body.message,
                    if retry {
                        "; it stays paused there, retrying"
                    } else {
                        ""
                    }
                );
                self.log("warn", &message).await;
                Err(StartError {
                    error,
                    retry,
                    never_ran,
                })
            }
        }
    }

    async fn finish_source(&mut self) {
        match self.cleanup(Side::Source, "/finish", false).await {
            Ok(true) => {
                let message = format!("source QEMU on {} stopped", self.m.source);
                self.log("info", &message).await
            }
            Ok(false) => {}
            Err(e) => {
                let message = format!(
                    "source cleanup on {} failed: {e}; the paused source stays until the agent cleans it",
                    self.m.source
                );
                self.log("warn", &message).await
            }
        }
    }

    async fn remove_destination(&mut self) -> Result<(), MigrateError> {
        self.release_logs().await;
        // A block migration's images stay for a retry (see `kept_copies`).
        let tail = if self.copies.is_empty() {
            "/incoming"
        } else {
            "/incoming?keep_images=true"
        };
        if let Some(answer) = self.cleanup_answer(Side::Destination, tail, true).await? {
            let removed: RemovedIncoming = serde_json::from_value(answer).unwrap_or_default();
            self.dest_kept_images = removed.kept_images;
            let message = format!("destination on {} removed", self.m.destination);
            self.log("info", &message).await;
            if let Some(why) = removed.not_kept {
                let message = format!(
                    "the partial images on {} were removed, not kept for a retry: {why}; a retry copies the whole disks",
                    self.m.destination
                );
                self.log("warn", &message).await;
            }
        }
        Ok(())
    }

    async fn resume_source(&mut self, destination_gone: bool) -> Result<(), MigrateError> {
        let tail = if destination_gone {
            "/resume?destination_gone=true"
        } else {
            "/resume"
        };
        self.cleanup(Side::Source, tail, false).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::migration;
    use ferry_api::instances::ImageRef;

    fn copy(image: &str, target: &str) -> DiskCopy {
        let at = |f: &str| ImageRef {
            datastore: "local".into(),
            file: f.into(),
        };
        let b = checks::BlockCopy {
            disk: "disk0".into(),
            source: at(image),
            target: at(target),
            format: ferry_api::instances::DiskFormat::Qcow2,
            size_bytes: 1 << 30,
            allocated_bytes: 1 << 20,
            measured: true,
            margin_bytes: 64 << 20,
            backing: None,
            reason: String::new(),
        };
        planned_copy(&b, "ferry-resume".into())
    }

    /// An instance left hv2 (its old image kept there), moved back by a job that was
    /// cancelled and kept its partial copy at the same place, and retries: the old image is
    /// gone, and the file there is the partial copy, only when the later job made it.
    #[test]
    fn an_image_a_later_copy_replaced_is_not_the_old_jobs_to_remove() {
        // Completed hv2 -> hv1: kept its source image a.qcow2 on hv2.
        let mut old = migration("hv2", "hv1");
        old.copies = vec![copy("a.qcow2", "a.qcow2")];
        old.copies[0].source_kept = true;
        // Then hv1 -> hv2, cancelled: its partial copy at a.qcow2 on hv2 is kept.
        let mut kept = migration("hv1", "hv2");
        kept.created_at = old.created_at + chrono::Duration::seconds(10);
        kept.copies = vec![copy("a.qcow2", "a.qcow2")];
        kept.copies[0].target_kept = true;
        // Now the retry hv1 -> hv2.
        let mut retry = migration("hv1", "hv2");
        retry.created_at = kept.created_at + chrono::Duration::seconds(10);
        let all = vec![old.clone(), kept.clone(), retry.clone()];
        assert!(replaced_later(&old, &all, &retry));
        // A later job that never made its copy there replaced nothing.
        let mut never = kept.clone();
        never.copies[0].target_kept = false;
        never.copies[0].state = DiskCopyState::Failed;
        assert!(!replaced_later(
            &old,
            &[old.clone(), never, retry.clone()],
            &retry
        ));
        // Nor does the retry itself, or a job to another host.
        let mut elsewhere = kept;
        elsewhere.destination = "hv3".into();
        assert!(!replaced_later(
            &old,
            &[old.clone(), elsewhere, retry.clone()],
            &retry
        ));
    }
}
