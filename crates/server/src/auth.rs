//! Who is calling: API tokens (admin or read-only) and agent credentials.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::server::AppState;
use crate::store::Role;
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

/// Any valid API token: reads are open to read-only tokens.
#[derive(Debug, Clone)]
pub struct Reader;

/// Any valid API token, with its name and role: for `GET /v1/whoami`.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// An admin token: required for every change, so each change has an accountable actor.
#[derive(Debug, Clone)]
pub struct Admin {
    pub name: String,
}

/// An admin token used to read what only admins may see (the audit log names every actor and
/// what they did). Refused read-only tokens are told what needed the admin token.
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

async fn api_role(parts: &Parts, state: &AppState) -> Result<(String, Role), ServerError> {
    let secret = bearer(parts).ok_or_else(ServerError::unauthorized)?;
    let info = state
        .store
        .authenticate(secret)
        .await?
        .ok_or_else(ServerError::unauthorized)?;
    Ok((info.name, info.role))
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

impl FromRequestParts<AppState> for Admin {
    type Rejection = ServerError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ServerError> {
        match api_role(parts, state).await? {
            (name, Role::Admin) => Ok(Admin { name }),
            _ => Err(ServerError::forbidden()),
        }
    }
}

impl FromRequestParts<AppState> for AuditReader {
    type Rejection = ServerError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ServerError> {
        match api_role(parts, state).await? {
            (_, Role::Admin) => Ok(AuditReader),
            _ => Err(ServerError::forbidden_read("reading the audit log")),
        }
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
