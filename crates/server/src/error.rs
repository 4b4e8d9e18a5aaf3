//! Errors the API answers with: an HTTP status and an [`ErrorBody`] (code, sentence, hint).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferry_api::{ApiError, ErrorBody};

use crate::store::StoreError;

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

    pub fn forbidden() -> Self {
        Self::new(
            403,
            "forbidden",
            "this token is read-only and the request changes something",
            "use an admin token",
        )
    }

    /// A read-only token asking for something only admins may read; `what` names it, e.g.
    /// "reading the audit log" (saying the request "changes something" would be untrue).
    pub fn forbidden_read(what: &str) -> Self {
        Self::new(
            403,
            "forbidden",
            format!("{what} needs an admin token; this token is read-only"),
            "use an admin token",
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
