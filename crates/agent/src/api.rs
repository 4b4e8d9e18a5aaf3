//! The agent's HTTP API (axum): one handler per endpoint listed in `ferry_api::agent`, all
//! behind the bearer check, every error a JSON `ErrorBody`.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use ferry_api::agent::{
    AgentInstance, ChecksumImage, ChecksumStatus, CleanedUp, CleanupCopies, CopyReceiving,
    CopyStatus, DefineInstance, DirtyRate, ImageMeasure, IncomingReady, LaunchIncoming,
    MeasureImage, PrepareDisk, PrepareIncoming, PreparedDisk, ReceiveCopy, ReconnectSource,
    RemovedIncoming, SendCopy, SetSourceParams, SourceStatus, StartSource,
};
use ferry_api::checks::{CpuModelFeatures, ProbeConnect, ProbeListening, ProbeResult};
use ferry_api::hosts::HostFacts;
use ferry_api::instances::{ConsoleQuery, ConsoleSegment, ImageRef, StopOptions};
use serde::Deserialize;
use uuid::Uuid;

use crate::{checks, Agent, AgentError};

type ApiResult<T> = Result<Json<T>, AgentError>;

/// The router with every endpoint and a JSON 404 for unknown paths. Who may call is decided
/// before a request exists: the TLS handshake admits only the server's client certificate.
pub(crate) fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/facts", get(facts))
        .route("/v1/instances", get(list_instances))
        .route(
            "/v1/instances/{id}",
            put(define_instance)
                .get(get_instance)
                .delete(delete_instance),
        )
        .route("/v1/instances/{id}/start", post(start_instance))
        .route("/v1/instances/{id}/stop", post(stop_instance))
        .route("/v1/instances/{id}/fence", post(fence_instance))
        .route(
            "/v1/instances/{id}/migration-settings",
            get(migration_settings),
        )
        .route(
            "/v1/instances/{id}/console",
            get(console).delete(delete_console),
        )
        .route("/v1/migrations/{mid}", get(source_status))
        .route(
            "/v1/migrations/{mid}/incoming",
            post(prepare_incoming).delete(remove_incoming),
        )
        .route(
            "/v1/migrations/{mid}/incoming/launch",
            post(launch_incoming),
        )
        .route("/v1/migrations/{mid}/confirm", post(confirm))
        .route("/v1/migrations/{mid}/start", post(start_incoming))
        .route("/v1/migrations/{mid}/source", post(start_source))
        .route("/v1/migrations/{mid}/cancel", post(cancel))
        .route("/v1/migrations/{mid}/finish", post(finish))
        .route("/v1/migrations/{mid}/resume", post(resume))
        .route("/v1/migrations/{mid}/params", post(set_params))
        .route("/v1/migrations/{mid}/postcopy", post(postcopy))
        .route("/v1/migrations/{mid}/recover", post(recover))
        .route("/v1/migrations/{mid}/reconnect", post(reconnect))
        .route("/v1/instances/{id}/dirty-rate", post(dirty_rate))
        .route("/v1/disks", post(prepare_disk))
        .route("/v1/disks/delete", post(delete_disk))
        .route("/v1/disks/measure", post(measure_image))
        .route("/v1/disks/checksum", post(checksum_image))
        .route("/v1/copies/{mid}/cleanup", post(cleanup_copies))
        .route("/v1/copies/{mid}/{disk}", get(copy_status))
        .route("/v1/copies/{mid}/{disk}/receive", post(receive_copy))
        .route("/v1/copies/{mid}/{disk}/send", post(send_copy))
        .route("/v1/copies/{mid}/{disk}/finish", post(finish_copy))
        .route("/v1/copies/{mid}/{disk}/commit", post(commit_copy))
        .route("/v1/copies/{mid}/{disk}/abort", post(abort_copy))
        .route("/v1/probe/listen", post(probe_listen))
        .route("/v1/probe/connect", post(probe_connect))
        .route("/v1/cpu-models/{model}", get(cpu_model))
        .route("/v1/tls/csr", post(new_csr))
        .route("/v1/tls/certificate", post(install_certificate))
        .fallback(not_found)
        .with_state(agent)
}

/// Parses an id from the path; a malformed one is a 400, not axum's plain-text rejection.
fn uuid(s: &str) -> Result<Uuid, AgentError> {
    s.parse()
        .map_err(|_| AgentError::BadRequest(format!("'{s}' is not a UUID")))
}

/// A JSON body, or a 400 saying what is wrong with it.
fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, AgentError> {
    b.map(|Json(t)| t)
        .map_err(|e| AgentError::BadRequest(e.body_text()))
}

async fn not_found(uri: axum::http::Uri) -> AgentError {
    AgentError::NoSuchEndpoint(uri.path().to_string())
}

/// Rotation, first half: a new key (kept here, never sent) and its CSR for the server to sign.
async fn new_csr(
    State(agent): State<Arc<Agent>>,
) -> ApiResult<ferry_api::agent::CertificateSigningRequest> {
    let (key, csr) = ferry_pki::generate_key_and_csr(&agent.config.name)
        .map_err(|e| AgentError::Internal(format!("cannot make a key: {e}")))?;
    *agent.pending_key.lock().unwrap_or_else(|p| p.into_inner()) = Some(key);
    Ok(Json(ferry_api::agent::CertificateSigningRequest { csr }))
}

/// Rotation, second half: the signed certificate for the pending key is stored and served
/// from the next connection on (connections open now finish with the old one).
async fn install_certificate(
    State(agent): State<Arc<Agent>>,
    Json(req): Json<ferry_api::agent::InstallCertificate>,
) -> ApiResult<()> {
    let key = agent
        .pending_key
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or_else(|| AgentError::BadRequest("no certificate request is pending".into()))?;
    // Refuses a certificate that is not for the pending key.
    let config = ferry_pki::tls::agent_server_config(&req.certificate, &key, &req.ca_pem)
        .map_err(|e| AgentError::BadRequest(format!("unusable certificate: {e}")))?;
    crate::tls::install_certificate(&agent.config.state_dir, &key, &req.certificate, &req.ca_pem)?;
    agent.tls.set(config);
    *agent.pending_key.lock().unwrap_or_else(|p| p.into_inner()) = None;
    tracing::info!("agent certificate rotated");
    Ok(Json(()))
}

async fn facts(State(agent): State<Arc<Agent>>) -> ApiResult<HostFacts> {
    Ok(Json(agent.host_facts().await?))
}

async fn list_instances(State(agent): State<Arc<Agent>>) -> ApiResult<Vec<AgentInstance>> {
    Ok(Json(agent.list_instances().await))
}

async fn get_instance(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> ApiResult<AgentInstance> {
    let id = uuid(&id)?;
    let mut slot = agent.lock_slot(&id).await?;
    Ok(Json(agent.describe(&mut slot).await))
}

async fn define_instance(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    req: Result<Json<DefineInstance>, JsonRejection>,
) -> ApiResult<AgentInstance> {
    let id = uuid(&id)?;
    let req = body(req)?;
    checks::warm_cpu_models(&agent, vec![req.spec.cpu_model.clone()]);
    Ok(Json(agent.define(id, req).await?))
}

async fn start_instance(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> ApiResult<AgentInstance> {
    Ok(Json(agent.start_instance(uuid(&id)?).await?))
}

async fn fence_instance(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> ApiResult<AgentInstance> {
    Ok(Json(agent.fence_instance(uuid(&id)?).await?))
}

async fn console(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    q: Result<Query<ConsoleQuery>, QueryRejection>,
) -> ApiResult<Vec<ConsoleSegment>> {
    let Query(q) = q.map_err(|e| AgentError::BadRequest(e.body_text()))?;
    Ok(Json(agent.console(&uuid(&id)?, q.budget())?))
}

async fn delete_console(State(agent): State<Arc<Agent>>, Path(id): Path<String>) -> ApiResult<()> {
    agent.delete_console(&uuid(&id)?).await?;
    Ok(Json(()))
}

async fn migration_settings(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> ApiResult<ferry_migrate::QemuSettings> {
    Ok(Json(agent.migration_settings(uuid(&id)?).await?))
}

async fn stop_instance(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    q: Result<Query<StopOptions>, QueryRejection>,
) -> ApiResult<AgentInstance> {
    let Query(opts) = q.map_err(|e| AgentError::BadRequest(e.body_text()))?;
    Ok(Json(agent.stop_instance(uuid(&id)?, opts).await?))
}

async fn delete_instance(State(agent): State<Arc<Agent>>, Path(id): Path<String>) -> ApiResult<()> {
    agent.delete_instance(uuid(&id)?).await?;
    Ok(Json(()))
}

/// `?after=SEQ&wait_ms=MS` of the status poll.
#[derive(Debug, Deserialize)]
struct After {
    #[serde(default)]
    after: u64,
    /// Wait this long for news (at most 10 s) before answering with none.
    #[serde(default)]
    wait_ms: u64,
}

/// `?wait=false` of a cancel: answer once the cancel is accepted, not once QEMU confirmed it.
#[derive(Debug, Deserialize)]
struct CancelQuery {
    #[serde(default = "yes")]
    wait: bool,
}

/// `?destination_gone=true` of a resume.
#[derive(Debug, Deserialize)]
struct ResumeQuery {
    #[serde(default)]
    destination_gone: bool,
}

fn yes() -> bool {
    true
}

async fn source_status(
    State(agent): State<Arc<Agent>>,
    Path(mid): Path<String>,
    q: Result<Query<After>, QueryRejection>,
) -> ApiResult<SourceStatus> {
    let mid = uuid(&mid)?;
    let Query(q) = q.map_err(|e| AgentError::BadRequest(e.body_text()))?;
    let wait = std::time::Duration::from_millis(q.wait_ms.min(10_000));
    Ok(Json(agent.source_status(mid, q.after, wait).await))
}

async fn prepare_incoming(
    State(agent): State<Arc<Agent>>,
    Path(mid): Path<String>,
    req: Result<Json<PrepareIncoming>, JsonRejection>,
) -> ApiResult<IncomingReady> {
    let mid = uuid(&mid)?;
    let req = body(req)?;
    // The guest's next migration starts from here: its checks expand this model.
    checks::warm_cpu_models(&agent, vec![req.spec.cpu_model.clone()]);
    Ok(Json(agent.prepare_incoming(mid, req).await?))
}

async fn launch_incoming(
    State(agent): State<Arc<Agent>>,
    Path(mid): Path<String>,
    req: Result<Json<LaunchIncoming>, JsonRejection>,
) -> ApiResult<serde_json::Value> {
    let mid = uuid(&mid)?;
    agent.launch_incoming(mid, body(req)?).await?;
    Ok(Json(serde_json::json!({})))
}

/// `?keep_images=true` on removing a destination.
#[derive(Debug, Default, Deserialize)]
struct KeepImages {
    #[serde(default)]
    keep_images: bool,
}

async fn remove_incoming(
    State(agent): State<Arc<Agent>>,
    Path(mid): Path<String>,
    q: Result<Query<KeepImages>, QueryRejection>,
) -> ApiResult<RemovedIncoming> {
    let Query(q) = q.map_err(|e| AgentError::BadRequest(e.body_text()))?;
    Ok(Json(
        agent.remove_incoming(uuid(&mid)?, q.keep_images).await?,
    ))
}

async fn confirm(
    State(agent): State<Arc<Agent>>,
    Path(mid): Path<String>,
) -> ApiResult<AgentInstance> {
    Ok(Json(agent.confirm_incoming(uuid(&mid)?).await?))
}

async fn start_source(
    State(agent): State<Arc<Agent>>,
    Path(mid): Path<String>,
    req: Result<Json<StartSource>, JsonRejection>,
) -> ApiResult<SourceStatus> {
    let mid = uuid(&mid)?;
    Ok(Json(agent.start_source(mid, body(req)?).await?))
}

async fn start_incoming(
    State(agent): State<Arc<Agent>>,
    Path(mid): Path<String>,
) -> ApiResult<AgentInstance> {
    Ok(Json(agent.start_incoming(uuid(&mid)?).await?))
}

async fn cancel(
    State(agent): State<Arc<Agent>>,
    Path(mid): Path<String>,
    q: Result<Query<CancelQuery>, QueryRejection>,
) -> ApiResult<SourceStatus> {
    let Query(q) = q.map_err(|e| AgentError::BadRequest(e.body_text()))?;
    Ok(Json(agent.cancel_source(uuid(&mid)?, q.wait).await?))
}

async fn finish(State(agent): State<Arc<Agent>>, Path(mid): Path<String>) -> ApiResult<()> {
    agent.finish_source(uuid(&mid)?).await?;
    Ok(Json(()))
}

async fn resume(
    State(agent): State<Arc<Agent>>,
    Path(mid): Path<String>,
    q: Result<Query<ResumeQuery>, QueryRejection>,
) -> ApiResult<AgentInstance> {
    let Query(q) = q.map_err(|e| AgentError::BadRequest(e.body_text()))?;
    Ok(Json(
        agent.resume_source(uuid(&mid)?, q.destination_gone).await?,
    ))
}

async fn set_params(
    State(agent): State<Arc<Agent>>,
    Path(mid): Path<String>,
    req: Result<Json<SetSourceParams>, JsonRejection>,
) -> ApiResult<()> {
    agent.set_source_params(uuid(&mid)?, body(req)?).await?;
    Ok(Json(()))
}

async fn postcopy(State(agent): State<Arc<Agent>>, Path(mid): Path<String>) -> ApiResult<()> {
    agent.start_postcopy(uuid(&mid)?).await?;
    Ok(Json(()))
}

async fn recover(
    State(agent): State<Arc<Agent>>,
    Path(mid): Path<String>,
) -> ApiResult<IncomingReady> {
    Ok(Json(agent.recover_destination(uuid(&mid)?).await?))
}

async fn reconnect(
    State(agent): State<Arc<Agent>>,
    Path(mid): Path<String>,
    Json(req): Json<ReconnectSource>,
) -> ApiResult<SourceStatus> {
    Ok(Json(agent.reconnect_source(uuid(&mid)?, req).await?))
}

async fn dirty_rate(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> ApiResult<DirtyRate> {
    Ok(Json(agent.measure_dirty_rate(uuid(&id)?).await?))
}

async fn prepare_disk(
    State(agent): State<Arc<Agent>>,
    req: Result<Json<PrepareDisk>, JsonRejection>,
) -> ApiResult<PreparedDisk> {
    Ok(Json(agent.prepare_disk(body(req)?).await?))
}

async fn delete_disk(
    State(agent): State<Arc<Agent>>,
    req: Result<Json<ImageRef>, JsonRejection>,
) -> ApiResult<()> {
    agent.delete_disk(body(req)?).await?;
    Ok(Json(()))
}

async fn probe_listen(State(agent): State<Arc<Agent>>) -> ApiResult<ProbeListening> {
    Ok(Json(checks::probe_listen(&agent).await?))
}

async fn probe_connect(
    State(agent): State<Arc<Agent>>,
    req: Result<Json<ProbeConnect>, JsonRejection>,
) -> ApiResult<ProbeResult> {
    Ok(Json(checks::probe_connect(&agent, body(req)?).await?))
}

async fn cpu_model(
    State(agent): State<Arc<Agent>>,
    Path(model): Path<String>,
) -> ApiResult<CpuModelFeatures> {
    Ok(Json(checks::cpu_model_features(&agent, &model).await?))
}

/// `?wait_ms=MS&after_done=BYTES` of a copy's status poll.
#[derive(Debug, Deserialize)]
struct CopyQuery {
    #[serde(default)]
    wait_ms: u64,
    #[serde(default)]
    after_done: Option<u64>,
}

async fn measure_image(
    State(agent): State<Arc<Agent>>,
    req: Result<Json<MeasureImage>, JsonRejection>,
) -> ApiResult<ImageMeasure> {
    Ok(Json(agent.measure_image(body(req)?).await?))
}

async fn checksum_image(
    State(agent): State<Arc<Agent>>,
    req: Result<Json<ChecksumImage>, JsonRejection>,
) -> ApiResult<ChecksumStatus> {
    Ok(Json(agent.checksum_image(body(req)?).await?))
}

async fn cleanup_copies(
    State(agent): State<Arc<Agent>>,
    Path(mid): Path<String>,
    req: Result<Json<CleanupCopies>, JsonRejection>,
) -> ApiResult<CleanedUp> {
    let mid = uuid(&mid)?;
    Ok(Json(agent.cleanup_copies(mid, body(req)?).await?))
}

async fn copy_status(
    State(agent): State<Arc<Agent>>,
    Path((mid, disk)): Path<(String, String)>,
    q: Result<Query<CopyQuery>, QueryRejection>,
) -> ApiResult<CopyStatus> {
    let mid = uuid(&mid)?;
    let Query(q) = q.map_err(|e| AgentError::BadRequest(e.body_text()))?;
    let wait = std::time::Duration::from_millis(q.wait_ms);
    Ok(Json(
        agent.copy_status(mid, &disk, wait, q.after_done).await,
    ))
}

async fn receive_copy(
    State(agent): State<Arc<Agent>>,
    Path((mid, disk)): Path<(String, String)>,
    req: Result<Json<ReceiveCopy>, JsonRejection>,
) -> ApiResult<CopyReceiving> {
    let mid = uuid(&mid)?;
    Ok(Json(agent.receive_copy(mid, disk, body(req)?).await?))
}

async fn send_copy(
    State(agent): State<Arc<Agent>>,
    Path((mid, disk)): Path<(String, String)>,
    req: Result<Json<SendCopy>, JsonRejection>,
) -> ApiResult<CopyStatus> {
    let mid = uuid(&mid)?;
    Ok(Json(agent.send_copy(mid, disk, body(req)?).await?))
}

async fn finish_copy(
    State(agent): State<Arc<Agent>>,
    Path((mid, disk)): Path<(String, String)>,
) -> ApiResult<CopyStatus> {
    Ok(Json(agent.finish_copy(uuid(&mid)?, &disk).await?))
}

async fn commit_copy(
    State(agent): State<Arc<Agent>>,
    Path((mid, disk)): Path<(String, String)>,
) -> ApiResult<()> {
    agent.commit_copy(uuid(&mid)?, &disk).await?;
    Ok(Json(()))
}

async fn abort_copy(
    State(agent): State<Arc<Agent>>,
    Path((mid, disk)): Path<(String, String)>,
) -> ApiResult<()> {
    agent.abort_copy(uuid(&mid)?, &disk).await?;
    Ok(Json(()))
}
