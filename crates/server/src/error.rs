//! Errors the API answers with: an HTTP status and an [`ErrorBody`] (code, sentence, hint).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferry_api::{ApiError, ErrorBody};

use crate::store::{Role, StoreError};

/// An error with the status it is answered with. Every failure the server reports, from bad
/// JSON to an agent that refused, ends up here, so every answer has the same shape.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{body}")]
pub struct ServerError {
    pub status: u16,
    pub body: ErrorBody,
}

impl ServerError {
    pub fn new(
        status: u16,
        code: &str,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        ServerError {
            status,
            body: ErrorBody::new(code, message, hint),
        }
    }

    pub fn bad_request(code: &str, message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::new(400, code, message, hint)
    }

    pub fn conflict(code: &str, message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::new(409, code, message, hint)
    }

    pub fn not_found(kind: &str, id: &str) -> Self {
        Self::new(
            404,
            &format!("{kind}-not-found"),
            format!("there is no {kind} '{id}'"),
            format!("list them with `ferry {kind} list`"),
        )
    }

    pub fn unauthorized() -> Self {
        Self::new(
            401,
            "unauthorized",
            "a valid API token is required",
            "pass --token or set FERRY_TOKEN",
        )
    }

    /// An agent credential used for another host than its own.
    pub fn forbidden() -> Self {
        Self::new(
            403,
            "forbidden",
            "this agent credential belongs to another host",
            "each agent reports only for the host it joined as",
        )
    }

    /// A token whose role does not include what the request needs: says what was asked,
    /// which role it needs and which the token has (code `forbidden`, kept from when the only
    /// refusal was a read-only token's).
    pub fn role_required(what: &str, needed: Role, have: Role) -> Self {
        let name = needed.as_str();
        Self::new(
            403,
            "forbidden",
            format!("{what} needs the {name} role; this token's role is {have}"),
            format!(
                "use a token with role {name}{} (an admin creates one with \
                 `ferry token create NAME --role {name}`)",
                if needed == Role::Admin {
                    ""
                } else {
                    " or admin"
                }
            ),
        )
    }

    /// A token past its expiry: refused with its own code, so a script can tell an expired
    /// token (get a new one) from a wrong one.
    pub fn token_expired(name: &str, at: chrono::DateTime<chrono::Utc>) -> Self {
        Self::new(
            401,
            "token-expired",
            format!(
                "the API token {name:?} expired at {}",
                at.format("%Y-%m-%d %H:%M:%S UTC")
            ),
            "ask an admin for a new token (`ferry token create NAME --expires 30d`)",
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            500,
            "internal",
            message,
            "see the server log; report it if it repeats",
        )
    }

    pub fn config(message: String) -> Self {
        Self::new(400, "invalid-config", message, "fix the configuration file")
    }

    /// An agent's refusal or unreachability, as the caller should see it: an agent's own
    /// 4xx keeps its code; a host that cannot be reached is a 503.
    pub fn from_agent(host: &str, e: ApiError) -> Self {
        match e {
            ApiError::Status { status, body } if (400..500).contains(&status) => {
                ServerError { status, body }
            }
            ApiError::Status { body, .. } => Self::new(
                502,
                &body.code,
                format!("host {host}: {}", body.message),
                body.hint,
            ),
            other => Self::new(
                503,
                "host-unreachable",
                format!("host {host} did not answer: {other}"),
                "check that the agent on that host runs (`ferry host list`)",
            ),
        }
    }
}

impl From<StoreError> for ServerError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::Conflict { .. } | StoreError::InvalidTransition { .. } => 409,
            StoreError::NotFound(_) => 404,
            _ => 500,
        };
        Self::new(status, e.code(), e.to_string(), e.hint())
    }
}

impl IntoResponse for ServerError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.body)).into_response()
    }
}
