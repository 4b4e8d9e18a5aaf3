//! Migration jobs: create (queued), list, show, cancel, logs; and the audit log.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use ferry_api::agent::SetSourceParams;
use ferry_api::hosts::HostState;
use ferry_api::instances::{Instance, InstanceState};
use ferry_api::migrations::{
    CreateMigration, LogLine, Migration, MigrationKind, MigrationPreview, MigrationState, Policy,
    SamplePage, UpdateMigration, SAMPLES_PAGE_MAX,
};

use serde::Deserialize;
use uuid::Uuid;

use super::hosts::one_host;
use super::instances::find;
use super::{ApiJson, ApiQuery};
use crate::agents::agent_client;
use crate::auth::{AuditReader, Operator, Reader};
use crate::driver::{log, publish_migration};
use crate::preflight;
use crate::server::AppState;
use crate::store::{codes, AuditEntry, MigrationFilter, NewMigration};
use crate::ServerError;

async fn get(state: &AppState, id: &str) -> Result<Migration, ServerError> {
    let uuid = Uuid::parse_str(id).map_err(|_| ServerError::not_found("migration", id))?;
    state
        .store
        .get_migration(uuid)
        .await?
        .ok_or_else(|| ServerError::not_found("migration", id))
}

/// Queues a migration. It starts when a slot is free (see the scheduler); the answer is the
/// Pending job. Without a destination, the best fit host by the pre-flight checks is picked.
#[utoipa::path(post, path = "/v1/migrations", request_body = CreateMigration, responses((status = 202, body = Migration), (status = 400, description = "invalid request", body = ferry_api::ErrorBody), (status = 404, description = "no such instance or host", body = ferry_api::ErrorBody), (status = 409, description = "the instance or destination cannot take part now", body = ferry_api::ErrorBody), (status = 413, description = "request body too large", body = ferry_api::ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    who: Operator,
    ApiJson(req): ApiJson<CreateMigration>,
) -> Result<(StatusCode, Json<Migration>), ServerError> {
    let instance = find(&state, &req.instance).await?;
    let kind = check_request(&instance, &req)?;
    let destination = match req.destination.clone() {
        Some(d) => d,
        None => pick_destination(&state, &instance, kind, &req.options.disk_map).await?,
    };
    let dest = one_host(&state, &destination).await?;
    check_destination(&instance, &dest)?;
    let m = state
        .store
        .insert_migration(&NewMigration {
            id: Uuid::new_v4(),
            instance_id: instance.id,
            kind,
            source: instance.host.clone(),
            destination: dest.name.clone(),
            options: req.options.clone(),
        })
        .await?;
    state
        .store
        .audit(
            &who.name,
            "migration.create",
            &m.id.to_string(),
            &serde_json::to_value(&req).unwrap_or_default(),
        )
        .await?;
    log(
        &state,
        m.id,
        "info",
        &format!(
            "requested by {}: {} {} -> {}",
            who.name, instance.name, m.source, m.destination
        ),
    )
    .await;
    publish_migration(&state, &m);
    state.queue.notify_one();
    Ok((StatusCode::ACCEPTED, Json(m)))
}

/// What `POST /v1/migrations` with this body would do, without queueing anything: the
/// destination (the best fit when none is given), its checks, and the auto policy's plan
/// from a fresh dirty-rate measurement. Refuses what create would refuse, with the same
/// codes, so a preview that passes predicts a create that is accepted.
#[utoipa::path(post, path = "/v1/migrations/preview", request_body = CreateMigration, responses((status = 200, body = MigrationPreview), (status = 400, description = "invalid request", body = ferry_api::ErrorBody), (status = 404, description = "no such instance or host", body = ferry_api::ErrorBody), (status = 409, description = "the instance or destination cannot take part now", body = ferry_api::ErrorBody), (status = 413, description = "request body too large", body = ferry_api::ErrorBody)))]
pub async fn preview(
    State(state): State<AppState>,
    _r: Reader,
    ApiJson(req): ApiJson<CreateMigration>,
) -> Result<Json<MigrationPreview>, ServerError> {
    let instance = find(&state, &req.instance).await?;
    let kind = check_request(&instance, &req)?;
    let destination = match req.destination.clone() {
        Some(d) => d,
        None => pick_destination(&state, &instance, kind, &req.options.disk_map).await?,
    };
    let dest = one_host(&state, &destination).await?;
    check_destination(&instance, &dest)?;
    let candidates = preflight::evaluate(
        &state,
        &preflight::Request {
            instance: &instance,
            kind,
            destination: Some(&dest.name),
            probe: true,
            migration: None,
            disk_map: Some(&req.options.disk_map),
        },
    )
    .await?;
    let candidate = candidates
        .into_iter()
        .find(|c| c.host == dest.name)
        .ok_or_else(|| ServerError::not_found("host", &dest.name))?;
    let mut notes = Vec::new();
    let plan = if kind == MigrationKind::Cold {
        notes.push("a cold migration copies disks and is not planned".to_string());
        None
    } else if req.options.policy == Policy::Manual {
        notes.push("the manual policy runs with exactly the options given; nothing is planned or predicted".to_string());
        None
    } else {
        let dirty = match crate::driver::dirty_rate(&state, &instance.host, instance.id).await {
            Ok(d) => Some(d.dirty_rate_bps),
            Err(e) => {
                notes.push(format!("dirty rate not measured: {e}"));
                None
            }
        };
        let disk_bytes = crate::driver::block_copies_of(&candidate)
            .iter()
            .map(|b| b.allocated_bytes)
            .sum();
        Some(
            crate::driver::compute_plan(
                &state,
                &crate::driver::PlanFor {
                    instance: Some(&instance),
                    source: &instance.host,
                    destination: &dest.name,
                    options: &req.options,
                    link_bps: crate::driver::probed_link_bps(&candidate),
                    disk_bytes,
                    dirty_rate_bps: dirty,
                },
            )
            .await,
        )
    };
    Ok(Json(MigrationPreview {
        instance: instance.name.clone(),
        kind,
        source: instance.host.clone(),
        destination: dest.name.clone(),
        candidate,
        plan,
        notes,
    }))
}

/// The refusals of a migration request that need only the instance: bad options, disks it
/// lacks, a state the kind cannot move, a job already in flight. Returns the kind.
fn check_request(instance: &Instance, req: &CreateMigration) -> Result<MigrationKind, ServerError> {
    req.options
        .validate()
        .map_err(|body| ServerError { status: 400, body })?;
    let kind = req.kind.unwrap_or(MigrationKind::Live);
    if kind == MigrationKind::Cold && !req.options.disk_map.is_empty() {
        return Err(ServerError::bad_request(
            "invalid-migration-options",
            "disk_map (--map-disk) applies to live migrations; a cold migration copies each disk to the datastore of the same name",
            "drop --map-disk, or migrate the instance live",
        ));
    }
    for (disk, ds) in &req.options.disk_map {
        if !instance.spec.disks.iter().any(|d| &d.id == disk) {
            return Err(ServerError::bad_request(
                "unknown-disk",
                format!(
                    "{} has no disk {disk} (mapped to datastore {ds})",
                    instance.name
                ),
                "name a disk id from `ferry instance show`",
            ));
        }
    }
    match (kind, instance.state) {
        (MigrationKind::Live, InstanceState::Running)
        | (MigrationKind::Cold, InstanceState::Stopped) => {}
        (MigrationKind::Live, _) => {
            return Err(ServerError::conflict(
                "instance-not-running",
                format!(
                    "{} is not running, so it cannot be migrated live",
                    instance.name
                ),
                "use a cold migration (--cold) for a stopped instance",
            ))
        }
        (MigrationKind::Cold, _) => {
            return Err(ServerError::conflict(
                "instance-running",
                format!(
                    "{} is running; a cold migration needs it stopped",
                    instance.name
                ),
                "stop it first, or migrate it live",
            ))
        }
    }
    if let Some(existing) = instance.migration {
        return Err(ServerError::conflict(
            codes::MIGRATION_IN_PROGRESS,
            format!(
                "{} already has migration {existing} in flight",
                instance.name
            ),
            "wait for it to end or cancel it",
        ));
    }
    Ok(kind)
}

/// The refusals of a destination: the instance's own host, a disabled or offline host.
fn check_destination(
    instance: &Instance,
    dest: &ferry_api::hosts::Host,
) -> Result<(), ServerError> {
    if dest.name == instance.host {
        return Err(ServerError::bad_request(
            "same-host",
            format!("{} already is on {}", instance.name, dest.name),
            "pick another destination",
        ));
    }
    if !dest.enabled {
        return Err(ServerError::conflict(
            "host-disabled",
            format!("host {} is disabled", dest.name),
            "enable it or pick another host",
        ));
    }
    if dest.state != HostState::Online {
        return Err(ServerError::conflict(
            "host-offline",
            format!("host {} is offline", dest.name),
            "start its agent or pick another host",
        ));
    }
    Ok(())
}

/// The best fit destination by the pre-flight checks; 409 `no-fit-destination` explains each
/// host when none fits.
async fn pick_destination(
    state: &AppState,
    instance: &Instance,
    kind: MigrationKind,
    disk_map: &std::collections::BTreeMap<String, String>,
) -> Result<String, ServerError> {
    let candidates = preflight::evaluate(
        state,
        &preflight::Request {
            instance,
            kind,
            destination: None,
            probe: true,
            migration: None,
            disk_map: Some(disk_map),
        },
    )
    .await?;
    match candidates.iter().find(|c| c.fit) {
        Some(c) => Ok(c.host.clone()),
        None if candidates.is_empty() => Err(ServerError::conflict(
            "no-fit-destination",
            format!("there is no other host to move {} to", instance.name),
            "add a host to the cluster",
        )),
        None => Err(ServerError::conflict(
            "no-fit-destination",
            format!(
                "no host can take {}: {}",
                instance.name,
                preflight::why_unfit(&candidates)
            ),
            format!(
                "see `ferry migrate {} --check` for every check and its hint",
                instance.name
            ),
        )),
    }
}

/// Filters of `GET /v1/migrations`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    pub state: Option<String>,
    /// Instance name or id.
    pub instance: Option<String>,
    /// Source or destination host.
    pub host: Option<String>,
    pub limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/migrations", params(ListQuery), responses((status = 200, body = Vec<Migration>), (status = 400, description = "bad query parameters", body = ferry_api::ErrorBody), (status = 404, description = "no such instance (filter)", body = ferry_api::ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    _r: Reader,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Vec<Migration>>, ServerError> {
    let state_filter = match &q.state {
        Some(s) => Some(MigrationState::parse(s).ok_or_else(|| {
            ServerError::bad_request(
                "bad-query",
                format!("unknown state '{s}'"),
                "use pending, preparing, migrating, completing, completed, failed or cancelled",
            )
        })?),
        None => None,
    };
    let instance = match &q.instance {
        Some(i) => Some(find(&state, i).await?.id),
        None => None,
    };
    let filter = MigrationFilter {
        state: state_filter,
        instance,
        host: q.host.clone(),
        active_only: false,
        limit: q.limit,
    };
    Ok(Json(state.store.list_migrations(&filter).await?))
}

#[utoipa::path(get, path = "/v1/migrations/{id}", params(("id" = String, Path, description = "migration id (UUID)")), responses((status = 200, body = Migration), (status = 404, description = "no such migration", body = ferry_api::ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    _r: Reader,
    Path(id): Path<String>,
) -> Result<Json<Migration>, ServerError> {
    Ok(Json(get(&state, &id).await?))
}

/// Records what an observer outside the guest saw during a live migration (the lab's echo
/// probe, a monitoring system's ping): the longest gap between the guest's answers, which is
/// what its users lived through, next to QEMU's pause. Kept with the job (one entry per
/// observer, the latest wins), logged, and shown by `migration show`.
#[utoipa::path(post, path = "/v1/migrations/{id}/observations", params(("id" = String, Path, description = "migration id (UUID)")), request_body = Object, responses((status = 200, body = Migration), (status = 400, description = "invalid observation", body = ferry_api::ErrorBody), (status = 404, description = "no such migration", body = ferry_api::ErrorBody), (status = 409, description = "not a live migration", body = ferry_api::ErrorBody)))]
pub async fn observe(
    State(state): State<AppState>,
    _who: Operator,
    Path(id): Path<String>,
    ApiJson(o): ApiJson<ferry_migrate::Observation>,
) -> Result<Json<Migration>, ServerError> {
    let m = get(&state, &id).await?;
    if m.kind != MigrationKind::Live {
        return Err(ServerError::conflict(
            "not-live",
            format!(
                "migration {} is a cold migration: the guest was not running",
                m.id
            ),
            "observations belong to live migrations",
        ));
    }
    let bad = |message: String| {
        ServerError::bad_request(
            "invalid-observation",
            message,
            "send `by` (who measured and how, at most 100 characters), `longest_gap_ms`, and `probes_lost` no larger than `probes_sent`",
        )
    };
    if o.by.trim().is_empty() || o.by.chars().count() > 100 || o.by.chars().any(char::is_control) {
        return Err(bad(format!(
            "observer name {:?} is empty, too long or has control characters",
            o.by
        )));
    }
    if o.probes_lost > o.probes_sent {
        return Err(bad(format!(
            "{} probes lost of {} sent",
            o.probes_lost, o.probes_sent
        )));
    }
    let message = format!(
        "observed by {}: longest gap {} ms, {} of {} probes lost",
        o.by, o.longest_gap_ms, o.probes_lost, o.probes_sent
    );
    let mut impact = m.impact.clone().unwrap_or_default();
    impact.add_observation(o);
    state.store.set_impact(m.id, &impact).await?;
    log(&state, m.id, "info", &message).await;
    let m = get(&state, &id).await?;
    publish_migration(&state, &m);
    Ok(Json(m))
}

/// Cancels a job before switchover: a Pending job ends at once; a running one is stopped by
/// the source and ends Cancelled with the guest on the source. Once the source has let QEMU
/// switch over, the cancel is refused (`too-late-to-cancel`): the guest is moving and will
/// run on the destination.
#[utoipa::path(post, path = "/v1/migrations/{id}/cancel", params(("id" = String, Path, description = "migration id (UUID)")), responses((status = 200, body = Migration), (status = 404, description = "no such migration", body = ferry_api::ErrorBody), (status = 409, description = "the job is past switchover or ended", body = ferry_api::ErrorBody)))]
pub async fn cancel(
    State(state): State<AppState>,
    who: Operator,
    Path(id): Path<String>,
) -> Result<Json<Migration>, ServerError> {
    let m = get(&state, &id).await?;
    let m = match m.state {
        MigrationState::Pending => {
            let m = state
                .store
                .set_migration_state(m.id, MigrationState::Cancelled, None)
                .await?;
            log(&state, m.id, "info", "cancelled while pending").await;
            m
        }
        MigrationState::Preparing | MigrationState::Migrating => {
            if m.state == MigrationState::Migrating {
                // The source agent decides cancel against switchover under one lock: ask it
                // first, so a refusal reaches the caller. Not reachable, or not started there
                // yet: the request is recorded and the driver delivers it.
                if let Ok(src) = agent_client(&state, &m.source).await {
                    let path = format!("/v1/migrations/{}/cancel?wait=false", m.id);
                    if let Err(e) = src.post::<_, serde_json::Value>(&path, &()).await {
                        if e.code() == "too-late-to-cancel" {
                            return Err(too_late_to_cancel(&m));
                        }
                    }
                }
            }
            let m = state.store.set_cancel_requested(m.id).await?;
            state.signal_cancel(m.id);
            log(
                &state,
                m.id,
                "info",
                &format!("cancel requested by {}", who.name),
            )
            .await;
            m
        }
        MigrationState::Completing => return Err(too_late_to_cancel(&m)),
        s => {
            return Err(ServerError::conflict(
                "cannot-cancel",
                format!(
                "migration {} is {}; only pending, preparing or migrating jobs can be cancelled",
                m.id,
                s.as_str()
            ),
                "after switchover, migrate the instance back instead",
            ))
        }
    };
    state
        .store
        .audit(
            &who.name,
            "migration.cancel",
            &m.id.to_string(),
            &serde_json::json!({}),
        )
        .await?;
    publish_migration(&state, &m);
    state.queue.notify_one();
    Ok(Json(m))
}

fn too_late_to_cancel(m: &Migration) -> ServerError {
    ServerError::conflict(
        "too-late-to-cancel",
        format!(
            "migration {} has switched over: {} is moving to {}",
            m.id, m.instance_name, m.destination
        ),
        "wait for it to complete, then migrate the instance back if needed",
    )
}

/// Switches a copying live migration to post-copy now: the guest continues on the destination
/// at once and the rest of its memory follows on demand. Only for jobs started with post-copy
/// permitted, because from here a broken migration network pauses the guest until it is back.
#[utoipa::path(post, path = "/v1/migrations/{id}/postcopy", params(("id" = String, Path, description = "migration id (UUID)")), responses((status = 200, body = Migration), (status = 404, description = "no such migration", body = ferry_api::ErrorBody), (status = 409, description = "post-copy is not permitted or the job is not copying", body = ferry_api::ErrorBody)))]
pub async fn postcopy(
    State(state): State<AppState>,
    who: Operator,
    Path(id): Path<String>,
) -> Result<Json<Migration>, ServerError> {
    let m = get(&state, &id).await?;
    if !m.options.post_copy {
        return Err(ServerError::conflict(
            "postcopy-not-permitted",
            format!("migration {} was started without post-copy permitted", m.id),
            "start a migration with --post-copy to be able to switch",
        ));
    }
    if m.state != MigrationState::Migrating || m.kind != MigrationKind::Live {
        return Err(ServerError::conflict(
            "cannot-postcopy",
            format!(
                "migration {} is {}; only a copying live migration can switch to post-copy",
                m.id,
                m.state.as_str()
            ),
            "wait until it copies (state migrating)",
        ));
    }
    let src = agent_client(&state, &m.source).await?;
    let _: () = src
        .post(&format!("/v1/migrations/{}/postcopy", m.id), &())
        .await
        .map_err(|e| ServerError::from_agent(&m.source, e))?;
    log(
        &state,
        m.id,
        "warn",
        &format!("switched to post-copy by {}", who.name),
    )
    .await;
    state
        .store
        .audit(
            &who.name,
            "migration.postcopy",
            &m.id.to_string(),
            &serde_json::json!({}),
        )
        .await?;
    Ok(Json(get(&state, &id).await?))
}

/// Changes the pacing (bandwidth cap, downtime target) of a pending or copying job; a
/// copying job's source QEMU applies it at once.
#[utoipa::path(patch, path = "/v1/migrations/{id}", params(("id" = String, Path, description = "migration id (UUID)")), request_body = UpdateMigration, responses((status = 200, body = Migration), (status = 400, description = "invalid request", body = ferry_api::ErrorBody), (status = 404, description = "no such migration", body = ferry_api::ErrorBody), (status = 409, description = "the job is neither pending nor copying", body = ferry_api::ErrorBody), (status = 413, description = "request body too large", body = ferry_api::ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    who: Operator,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<UpdateMigration>,
) -> Result<Json<Migration>, ServerError> {
    let m = get(&state, &id).await?;
    let mut options = m.options.clone();
    if let Some(b) = req.bandwidth_mib_s {
        options.bandwidth_mib_s = (b > 0).then_some(b);
    }
    if let Some(d) = req.downtime_ms {
        options.downtime_ms = Some(d);
    }
    options
        .validate()
        .map_err(|body| ServerError { status: 400, body })?;
    match m.state {
        MigrationState::Pending => {}
        MigrationState::Migrating if m.kind == MigrationKind::Live => {
            // Only what the request names: the controller may have moved the rest.
            let params = options.to_params();
            let body = SetSourceParams {
                bandwidth: req.bandwidth_mib_s.map(|_| params.bandwidth),
                downtime_limit_ms: req.downtime_ms,
            };
            let src = agent_client(&state, &m.source).await?;
            let _: () = src
                .post(&format!("/v1/migrations/{}/params", m.id), &body)
                .await
                .map_err(|e| ServerError::from_agent(&m.source, e))?;
        }
        s => {
            return Err(ServerError::conflict(
                "cannot-update",
                format!(
                    "migration {} is {}; pacing changes apply to pending or copying jobs",
                    m.id,
                    s.as_str()
                ),
                "retry while it copies, or start a new migration",
            ))
        }
    }
    let m = state.store.set_options(m.id, &options).await?;
    log(
        &state,
        m.id,
        "info",
        &format!(
            "pacing changed by {}: {}",
            who.name,
            serde_json::to_string(&req).unwrap_or_default()
        ),
    )
    .await;
    state
        .store
        .audit(
            &who.name,
            "migration.update",
            &m.id.to_string(),
            &serde_json::to_value(&req).unwrap_or_default(),
        )
        .await?;
    publish_migration(&state, &m);
    Ok(Json(m))
}

/// Removes the source's copies of the disks a completed cold migration copied (kept until now
/// so that nothing is lost before the destination's copy proved good). Idempotent: a job
/// already cleaned up is answered as it is. Refused for a job that did not complete, or that
/// copied nothing.
#[utoipa::path(post, path = "/v1/migrations/{id}/cleanup", params(("id" = String, Path, description = "migration id (UUID)")), responses((status = 200, body = Migration), (status = 404, description = "no such migration", body = ferry_api::ErrorBody), (status = 409, description = "the job did not complete, or kept nothing to clean up", body = ferry_api::ErrorBody), (status = 502, description = "the source agent failed to remove them", body = ferry_api::ErrorBody), (status = 503, description = "the source host does not answer", body = ferry_api::ErrorBody)))]
pub async fn cleanup(
    State(state): State<AppState>,
    who: Operator,
    Path(id): Path<String>,
) -> Result<Json<Migration>, ServerError> {
    let m = get(&state, &id).await?;
    let already = m.cleaned_up_at.is_some();
    let m = crate::cold::cleanup(&state, &m, &who.name).await?;
    if !already {
        state
            .store
            .audit(
                &who.name,
                "migration.cleanup",
                &m.id.to_string(),
                &serde_json::json!({}),
            )
            .await?;
    }
    Ok(Json(m))
}

/// What Ferry did for this migration and what QEMU reported, in order.
#[utoipa::path(get, path = "/v1/migrations/{id}/logs", params(("id" = String, Path, description = "migration id (UUID)")), responses((status = 200, body = Vec<LogLine>), (status = 404, description = "no such migration", body = ferry_api::ErrorBody)))]
pub async fn logs(
    State(state): State<AppState>,
    _r: Reader,
    Path(id): Path<String>,
) -> Result<Json<Vec<LogLine>>, ServerError> {
    let m = get(&state, &id).await?;
    Ok(Json(state.store.logs(m.id).await?))
}

/// Paging of `GET /v1/migrations/{id}/samples`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SamplesQuery {
    /// Only samples with a `seq` above this (the previous page's `next_after`); 0 = from the
    /// start.
    pub after: Option<u64>,
    /// At most this many (default and ceiling `SAMPLES_PAGE_MAX`, 2000).
    pub limit: Option<u32>,
}

/// The job's stored progress history, oldest first, a page at a time: what charts of a job
/// opened mid-way or after it ended draw, since the event stream only carries what comes next.
#[utoipa::path(get, path = "/v1/migrations/{id}/samples", params(("id" = String, Path, description = "migration id (UUID)"), SamplesQuery), responses((status = 200, body = SamplePage), (status = 400, description = "bad query parameters", body = ferry_api::ErrorBody), (status = 404, description = "no such migration", body = ferry_api::ErrorBody)))]
pub async fn samples(
    State(state): State<AppState>,
    _r: Reader,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<SamplesQuery>,
) -> Result<Json<SamplePage>, ServerError> {
    let m = get(&state, &id).await?;
    let limit = match q.limit {
        None => SAMPLES_PAGE_MAX,
        Some(l) if (1..=SAMPLES_PAGE_MAX).contains(&l) => l,
        Some(l) => {
            return Err(ServerError::bad_request(
                "bad-query",
                format!("limit {l} is outside 1..={SAMPLES_PAGE_MAX}"),
                "page with ?after= and the answer's next_after instead",
            ))
        }
    };
    // One more than asked tells whether another page follows.
    let mut samples = state
        .store
        .samples_page(m.id, q.after.unwrap_or(0), limit + 1)
        .await?;
    let next_after = if samples.len() > limit as usize {
        samples.truncate(limit as usize);
        samples.last().map(|s| s.seq)
    } else {
        None
    };
    Ok(Json(SamplePage {
        samples,
        next_after,
    }))
}

/// Every change made through the API, newest first.
#[utoipa::path(get, path = "/v1/audit", responses((status = 200, body = Vec<AuditEntry>), (status = 403, description = "reading the audit log needs an admin token", body = ferry_api::ErrorBody)))]
pub async fn audit(
    State(state): State<AppState>,
    _a: AuditReader,
) -> Result<Json<Vec<AuditEntry>>, ServerError> {
    Ok(Json(state.store.list_audit(1000).await?))
}
