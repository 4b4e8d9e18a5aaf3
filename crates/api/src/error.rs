use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every error a user sees: a stable code for scripts, one sentence, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable, kebab-case (`instance-not-found`, `cpu-incompatible`, ...).
    pub code: String,
    pub message: String,
    pub hint: String,
}

impl ErrorBody {
    pub fn new(code: &str, message: impl Into<String>, hint: impl Into<String>) -> ErrorBody {
        ErrorBody {
            code: code.to_string(),
            message: message.into(),
            hint: hint.into(),
        }
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// What a call through [`crate::ApiClient`] can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The other side answered with an error body.
    #[error("{body} (HTTP {status})")]
    Status { status: u16, body: ErrorBody },
    /// The other side could not be reached or the connection broke.
    #[error("cannot reach {url}: {detail}")]
    Unreachable { url: String, detail: String },
    /// The answer was not what the API promises.
    #[error("unexpected answer from {url}: {detail}")]
    Decode { url: String, detail: String },
    /// The other side's certificate is not trusted: not from the given CA, not for this
    /// name, expired, or (`changed`) not the one pinned on first use.
    #[error("the certificate of {url} is not trusted: {detail}")]
    Untrusted {
        url: String,
        detail: String,
        changed: bool,
    },
}

impl ApiError {
    /// The error as the user should see it, with a code and hint even for transport errors.
    pub fn body(&self) -> ErrorBody {
        match self {
            ApiError::Status { body, .. } => body.clone(),
            ApiError::Unreachable { .. } => ErrorBody::new(
                "unreachable",
                self.to_string(),
                "check the URL and that the process there runs",
            ),
            ApiError::Decode { .. } => ErrorBody::new(
                "bad-response",
                self.to_string(),
                "check that both sides run the same Ferry version",
            ),
            ApiError::Untrusted { changed: true, .. } => ErrorBody::new(
                "server-certificate-changed",
                self.to_string(),
                "the server no longer presents the certificate pinned for it: if its CA was \
                 replaced on purpose, compare the new fingerprint with the one the server printed \
                 and run `ferry login --accept-fingerprint sha256:...` again; otherwise do not \
                 use this connection",
            ),
            ApiError::Untrusted { .. } => ErrorBody::new(
                "server-certificate-untrusted",
                self.to_string(),
                "give the cluster's CA with FERRY_CA=/path/to/ca.pem (the server writes it to \
                 STATE/pki/ca.pem), or pin it with `ferry login --accept-fingerprint sha256:...`",
            ),
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn code(&self) -> String {
        self.body().code
    }
}
