//! The endpoints agents call: join and heartbeat.

use axum::extract::State;
use axum::Json;
use chrono::Utc;
use ferry_api::agent::{Heartbeat, InstallCertificate, JoinRequest, JoinResponse, RenewRequest};
use ferry_api::migrations::Event;

use super::ApiJson;
use crate::auth::{AgentCaller, Joiner};
use crate::server::AppState;
use crate::ServerError;

/// An agent with the join token gets a credential of its own and a certificate for its API
/// (its CSR signed by the cluster CA). Joining again (an agent that lost its state) replaces
/// the old credential and revokes the old certificate.
pub async fn join(
    State(state): State<AppState>,
    _j: Joiner,
    ApiJson(req): ApiJson<JoinRequest>,
) -> Result<Json<JoinResponse>, ServerError> {
    let name_ok = !req.name.is_empty()
        && req.name.len() <= 40
        && req
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !name_ok {
        return Err(ServerError::bad_request(
            "invalid-host-name",
            format!("'{}' is not a host name", req.name),
            "use letters, digits, '-' and '.'",
        ));
    }
    let issued = state.pki.sign_agent(&req.csr, &req.name, &req.agent_url)?;
    // Recorded (and the certificate it replaces revoked) before anything else: the host is
    // online only from its first heartbeat, which the agent sends once it serves this one.
    let not_after = chrono::DateTime::<Utc>::from(issued.not_after);
    for old in state
        .store
        .record_agent_cert(&req.name, &issued.serial, not_after)
        .await?
    {
        state.pki.revoked.revoke(&old);
    }
    let secret = crate::store::secrets::new_secret().secret;
    state
        .store
        .join_host(&req.name, &req.agent_url, &secret, &req.facts)
        .await?;
    state
        .store
        .audit(
            &format!("agent:{}", req.name),
            "host.join",
            &req.name,
            &serde_json::json!({"agent_url": req.agent_url, "certificate_serial": issued.serial}),
        )
        .await?;
    state.events.publish(Event::Host {
        name: req.name.clone(),
    });
    state.queue.notify_one();
    Ok(Json(JoinResponse {
        agent_token: secret,
        certificate: issued.chain_pem,
        ca_pem: state.pki.ca.ca_pem().to_string(),
    }))
}

/// Facts and instance states, every few seconds.
pub async fn heartbeat(
    State(state): State<AppState>,
    caller: AgentCaller,
    ApiJson(hb): ApiJson<Heartbeat>,
) -> Result<Json<()>, ServerError> {
    if hb.name != caller.host {
        return Err(ServerError::forbidden());
    }
    state
        .store
        .record_heartbeat(&hb.name, &hb.facts, Utc::now())
        .await?;
    // Where every copy really is: the record follows the agents' reports.
    state.reports.record(&hb.name, hb.instances.clone());
    crate::reconcile::after_heartbeat(&state, &hb.name, &hb.instances).await;
    Ok(Json(()))
}

/// An agent renewing its certificate before it expires: its new key's CSR signed, the old
/// certificate revoked.
pub async fn renew(
    State(state): State<AppState>,
    caller: AgentCaller,
    ApiJson(req): ApiJson<RenewRequest>,
) -> Result<Json<InstallCertificate>, ServerError> {
    if req.name != caller.host {
        return Err(ServerError::forbidden());
    }
    let url = state
        .store
        .agent_url(&req.name)
        .await?
        .ok_or_else(|| ServerError::not_found("host", &req.name))?;
    let issued = state.pki.sign_agent(&req.csr, &req.name, &url)?;
    let not_after = chrono::DateTime::<Utc>::from(issued.not_after);
    let revoked = state
        .store
        .record_agent_cert(&req.name, &issued.serial, not_after)
        .await?;
    for old in &revoked {
        state.pki.revoked.revoke(old);
    }
    state
        .store
        .audit(
            &format!("agent:{}", req.name),
            "host.renew-cert",
            &req.name,
            &serde_json::json!({"serial": issued.serial, "revoked": revoked}),
        )
        .await?;
    Ok(Json(InstallCertificate {
        certificate: issued.chain_pem,
        ca_pem: state.pki.ca.ca_pem().to_string(),
    }))
}
