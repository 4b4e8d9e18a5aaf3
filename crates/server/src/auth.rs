//! Who is calling: API tokens (admin, operator or reader) and agent credentials.
//!
//! Each handler names the role it needs by the extractor it takes: [`Reader`] for reads,
//! [`Operator`] for running guests (start, stop, migrate, cancel), [`Admin`] for changes to
//! hosts, tokens and instance definitions. A refusal says which role was needed.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::server::AppState;
use crate::store::{Authenticated, Role};
use crate::ServerError;

fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Any valid API token: reads are open to every role.
#[derive(Debug, Clone)]
pub struct Reader;

/// Any valid API token, with its name and role: for `GET /v1/whoami`.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// An operator or admin token: for what runs guests (start, stop, migrate, cancel), so an
/// operator's token cannot touch hosts, tokens or definitions. The name is the audited actor.
#[derive(Debug, Clone)]
pub struct Operator {
    pub name: String,
}

/// An admin token: required for changes to hosts, tokens and instance definitions, so each
/// has an accountable actor with the widest trust.
#[derive(Debug, Clone)]
pub struct Admin {
    pub name: String,
}

/// An admin token used to read what only admins may see (the audit log names every actor and
/// what they did).
#[derive(Debug, Clone)]
pub struct AuditReader;

/// An agent, authenticated by the credential it got at join.
#[derive(Debug, Clone)]
pub struct AgentCaller {
    pub host: String,
}

/// A caller presenting the cluster's join token.
#[derive(Debug, Clone)]
pub struct Joiner;

/// The caller's token name and role; an unknown or revoked token is `unauthorized`, an
/// expired one `token-expired`. The secret itself never appears in the answer or a log.
async fn api_role(parts: &Parts, state: &AppState) -> Result<(String, Role), ServerError> {
    let secret = bearer(parts).ok_or_else(ServerError::unauthorized)?;
    match state.store.authenticate(secret).await? {
        Authenticated::Valid { name, role, .. } => Ok((name, role)),
        Authenticated::Expired { name, at } => Err(ServerError::token_expired(&name, at)),
        Authenticated::Unknown => Err(ServerError::unauthorized()),
    }
}

/// The caller's name if its role includes `needed`; else a 403 naming the needed role and
/// `what` was asked.
async fn require(
    parts: &Parts,
    state: &AppState,
    needed: Role,
    what: &str,
) -> Result<String, ServerError> {
    let (name, role) = api_role(parts, state).await?;
    if role.allows(needed) {
        Ok(name)
    } else {
        Err(ServerError::role_required(what, needed, role))
    }
}

/// What a request asks for, in words, for a refusal: "POST /v1/hosts/hv1/disable".
fn what(parts: &Parts) -> String {
    format!("{} {}", parts.method, parts.uri.path())
}

impl FromRequestParts<AppState> for Reader {
    type Rejection = ServerError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ServerError> {
        api_role(parts, state).await?;
        Ok(Reader)
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ServerError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ServerError> {
        let (name, role) = api_role(parts, state).await?;
        Ok(Caller { name, role })
    }
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = ServerError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ServerError> {
        let name = require(parts, state, Role::Operator, &what(parts)).await?;
        Ok(Operator { name })
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ServerError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ServerError> {
        let name = require(parts, state, Role::Admin, &what(parts)).await?;
        Ok(Admin { name })
    }
}

impl FromRequestParts<AppState> for AuditReader {
    type Rejection = ServerError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ServerError> {
        require(parts, state, Role::Admin, "reading the audit log").await?;
        Ok(AuditReader)
    }
}

impl FromRequestParts<AppState> for AgentCaller {
    type Rejection = ServerError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ServerError> {
        let secret = bearer(parts).ok_or_else(ServerError::unauthorized)?;
        let host = state
            .store
            .host_for_agent_secret(secret)
            .await?
            .ok_or_else(ServerError::unauthorized)?;
        Ok(AgentCaller { host })
    }
}

impl FromRequestParts<AppState> for Joiner {
    type Rejection = ServerError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ServerError> {
        let secret = bearer(parts).ok_or_else(ServerError::unauthorized)?;
        if constant_time_eq(secret.as_bytes(), state.config.join_token.as_bytes()) {
            Ok(Joiner)
        } else {
            Err(ServerError::unauthorized())
        }
    }
}

/// Compares secrets without leaking, through timing, how much of a guess was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
