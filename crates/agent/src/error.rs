//! The agent's one error type and how each error reaches an HTTP caller.

use std::path::PathBuf;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ferry_api::ErrorBody;
use ferry_migrate::MigrateError;
use ferry_qemu::QemuError;
use ferry_storage::qemu_img::QemuImgError;
use uuid::Uuid;

/// Everything the agent can fail with, at start-up or on a request.
///
/// Each variant maps to one HTTP status ([`AgentError::status`]) and carries a stable code
/// and a hint, so the server can show an operator why a host refused, not just that it did.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration file is unusable; the agent does not start.
    #[error("configuration {file}: {message}")]
    Config { file: String, message: String },
    /// The request is malformed (bad JSON, bad id, unknown network, ...).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// No or a wrong bearer credential.
    #[error("missing or wrong credential")]
    Unauthorized,
    /// The agent has not joined the cluster yet, so it has no credential to check against.
    #[error("the agent has not joined the cluster yet")]
    NotJoined,
    /// No instance with this id on this host.
    #[error("instance {0} is not defined on this host")]
    InstanceNotFound(Uuid),
    /// No endpoint at this path (or not with this method).
    #[error("no endpoint {0}")]
    NoSuchEndpoint(String),
    /// No migration with this id known to this host.
    #[error("migration {0} is not known on this host")]
    MigrationNotFound(Uuid),
    /// No copy of this disk for this migration on this host (never started, ended, or lost in
    /// an agent restart).
    #[error("this host has no copy of disk {disk} for migration {mid}")]
    CopyNotFound { mid: Uuid, disk: String },
    /// QEMU does not know this CPU model.
    #[error("QEMU on this host does not know CPU model '{0}'")]
    CpuModelUnknown(String),
    /// The request contradicts the current state (running guest, migration in flight, ...).
    #[error("{message}")]
    Conflict {
        code: &'static str,
        message: String,
        hint: &'static str,
    },
    /// A well-formed request this host cannot carry out as asked: an unknown datastore, a
    /// path outside every datastore, no room, an unreadable image. Nothing was changed.
    #[error("{message}")]
    Refused {
        code: &'static str,
        message: String,
        hint: &'static str,
    },
    /// An image operation (`qemu-img`, `qemu-nbd`, a checksum or copy) failed on this host.
    #[error("{message}")]
    Storage {
        code: &'static str,
        message: String,
        hint: &'static str,
    },
    /// A QEMU process could not be described, started or stopped.
    #[error(transparent)]
    Qemu(#[from] QemuError),
    /// A migration half failed.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    /// `qemu-img` could not create, read or copy an image.
    #[error(transparent)]
    Image(#[from] QemuImgError),
    /// A QEMU monitor command failed.
    #[error(transparent)]
    Qmp(#[from] ferry_qmp::QmpError),
    /// A host network command (`ip ...`) failed.
    #[error("`{cmdline}` failed: {stderr}")]
    Net { cmdline: String, stderr: String },
    /// A file of the state directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The API port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// Anything else: a bug or an unexpected host condition.
    #[error("internal error: {0}")]
    Internal(String),
}

impl AgentError {
    /// Shorthand for a [`AgentError::Conflict`].
    pub fn conflict(code: &'static str, message: impl Into<String>, hint: &'static str) -> Self {
        AgentError::Conflict {
            code,
            message: message.into(),
            hint,
        }
    }

    /// Shorthand for a [`AgentError::Refused`].
    pub fn refused(code: &'static str, message: impl Into<String>, hint: &'static str) -> Self {
        AgentError::Refused {
            code,
            message: message.into(),
            hint,
        }
    }

    /// Wraps an I/O error with the path it concerns, for `map_err`.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> AgentError {
        let path = path.into();
        move |source| AgentError::Io { path, source }
    }

    /// A stable, kebab-case identifier of the error kind.
    pub fn code(&self) -> &'static str {
        match self {
            AgentError::Config { .. } => "agent-config-invalid",
            AgentError::BadRequest(_) => "bad-request",
            AgentError::Unauthorized => "unauthorized",
            AgentError::NotJoined => "agent-not-joined",
            AgentError::InstanceNotFound(_) => "instance-not-found",
            AgentError::MigrationNotFound(_) => "migration-not-found",
            AgentError::NoSuchEndpoint(_) => "no-such-endpoint",
            AgentError::CpuModelUnknown(_) => "cpu-model-unknown",
            AgentError::CopyNotFound { .. } => "copy-not-found",
            AgentError::Conflict { code, .. }
            | AgentError::Refused { code, .. }
            | AgentError::Storage { code, .. } => code,
            AgentError::Qemu(e) => e.code(),
            AgentError::Migrate(e) => e.code(),
            AgentError::Image(e) => e.code(),
            AgentError::Qmp(_) => "qmp-failed",
            AgentError::Net { .. } => "host-network-failed",
            AgentError::Io { .. } => "agent-state-io",
            AgentError::Listen { .. } => "agent-listen-failed",
            AgentError::Internal(_) => "agent-internal",
        }
    }

    /// What the caller or the operator can do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            AgentError::Config { .. } => "fix the named field of the agent's configuration file",
            AgentError::BadRequest(_) => "fix the request; the message names what is wrong",
            AgentError::Unauthorized => {
                "send `Authorization: Bearer <agent credential>` (the server does this itself)"
            }
            AgentError::NotJoined => {
                "wait until the agent has joined; check its join token and the server URL"
            }
            AgentError::InstanceNotFound(_) => "list the host's instances; define it first",
            AgentError::MigrationNotFound(_) => {
                "the migration never reached this host, or its record was removed"
            }
            AgentError::NoSuchEndpoint(_) => "see ferry_api::agent for the agent's endpoints",
            AgentError::CpuModelUnknown(_) => {
                "names are case-sensitive; `qemu-system-x86_64 -cpu help` lists this host's models"
            }
            AgentError::CopyNotFound { .. } => {
                "nothing to do for it here; a lost copy is started again by the server"
            }
            AgentError::Conflict { hint, .. }
            | AgentError::Refused { hint, .. }
            | AgentError::Storage { hint, .. } => hint,
            AgentError::Qemu(e) => e.hint(),
            AgentError::Migrate(e) => e.hint(),
            AgentError::Image(e) => e.hint(),
            AgentError::Qmp(_) => "QEMU stopped answering its monitor; check that it still runs",
            AgentError::Net { .. } => "check the bridge named in the agent's network configuration",
            AgentError::Io { .. } => {
                "check permissions and free space of the agent's state directory"
            }
            AgentError::Listen { .. } => "pick a free address for `listen` or stop the other agent",
            AgentError::Internal(_) => "retry; if it persists, report it with the agent's log",
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            AgentError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AgentError::Unauthorized => StatusCode::UNAUTHORIZED,
            AgentError::NotJoined => StatusCode::SERVICE_UNAVAILABLE,
            AgentError::InstanceNotFound(_)
            | AgentError::MigrationNotFound(_)
            | AgentError::NoSuchEndpoint(_)
            | AgentError::CpuModelUnknown(_)
            | AgentError::CopyNotFound { .. } => StatusCode::NOT_FOUND,
            AgentError::Conflict { .. } => StatusCode::CONFLICT,
            AgentError::Refused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            AgentError::Qemu(QemuError::InvalidSpec { .. } | QemuError::UnknownAccel(_)) => {
                StatusCode::BAD_REQUEST
            }
            AgentError::Migrate(MigrateError::InvalidParams(_)) => StatusCode::BAD_REQUEST,
            AgentError::Image(QemuImgError::Exists { .. } | QemuImgError::Locked { .. }) => {
                StatusCode::CONFLICT
            }
            AgentError::Image(
                QemuImgError::NotFound { .. }
                | QemuImgError::Unreadable { .. }
                | QemuImgError::NoSpace { .. },
            ) => StatusCode::UNPROCESSABLE_ENTITY,
            AgentError::Migrate(
                MigrateError::PortUnavailable { .. }
                | MigrateError::SourceNotRunning(_)
                | MigrateError::TooLateToCancel
                | MigrateError::HandedOver,
            ) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body the caller sees.
    pub fn body(&self) -> ErrorBody {
        ErrorBody::new(self.code(), self.to_string(), self.hint())
    }
}

impl From<ferry_storage::copy::CopyError> for AgentError {
    fn from(e: ferry_storage::copy::CopyError) -> Self {
        use ferry_storage::copy::CopyError;
        let (code, hint, message) = (e.code(), e.hint(), e.to_string());
        match e {
            CopyError::TargetExists(_) | CopyError::NoFreePort { .. } => AgentError::Conflict {
                code,
                message,
                hint,
            },
            CopyError::Invalid(_) | CopyError::Tls(ferry_migrate::TlsError::Invalid(_)) => {
                AgentError::BadRequest(message)
            }
            _ => AgentError::Storage {
                code,
                message,
                hint,
            },
        }
    }
}

impl From<ferry_storage::checksum::ChecksumError> for AgentError {
    fn from(e: ferry_storage::checksum::ChecksumError) -> Self {
        use ferry_storage::checksum::ChecksumError;
        let (code, hint, message) = (e.code(), e.hint(), e.to_string());
        match e {
            ChecksumError::NotFound(_) => AgentError::Refused {
                code,
                message,
                hint,
            },
            _ => AgentError::Storage {
                code,
                message,
                hint,
            },
        }
    }
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(code = self.code(), error = %self, "request failed");
        }
        (status, axum::Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_documented_statuses() {
        let id = Uuid::nil();
        let cases: Vec<(AgentError, u16, &str)> = vec![
            (AgentError::BadRequest("x".into()), 400, "bad-request"),
            (AgentError::Unauthorized, 401, "unauthorized"),
            (AgentError::NotJoined, 503, "agent-not-joined"),
            (AgentError::InstanceNotFound(id), 404, "instance-not-found"),
            (
                AgentError::MigrationNotFound(id),
                404,
                "migration-not-found",
            ),
            (
                AgentError::conflict("instance-running", "running", "stop it"),
                409,
                "instance-running",
            ),
            (
                AgentError::Migrate(MigrateError::PortUnavailable {
                    addr: "10.0.0.1".parse().unwrap(),
                    first: 1,
                    last: 2,
                }),
                409,
                "migration-port-unavailable",
            ),
            (
                AgentError::Migrate(MigrateError::InvalidParams("x".into())),
                400,
                "invalid-migration-params",
            ),
            (
                AgentError::Qemu(QemuError::InvalidSpec {
                    field: "name",
                    reason: "bad".into(),
                }),
                400,
                "invalid-instance-spec",
            ),
            (AgentError::Internal("x".into()), 500, "agent-internal"),
            (
                AgentError::CpuModelUnknown("nope".into()),
                404,
                "cpu-model-unknown",
            ),
            (
                AgentError::CopyNotFound {
                    mid: id,
                    disk: "disk0".into(),
                },
                404,
                "copy-not-found",
            ),
            (
                AgentError::Storage {
                    code: "storage-tool-failed",
                    message: "x".into(),
                    hint: "h",
                },
                500,
                "storage-tool-failed",
            ),
            (
                AgentError::Qmp(ferry_qmp::QmpError::Closed),
                500,
                "qmp-failed",
            ),
        ];
        for (err, status, code) in cases {
            assert_eq!(err.status().as_u16(), status, "{err}");
            assert_eq!(err.code(), code);
            let body = err.body();
            assert_eq!(body.code, code);
            assert!(!body.hint.is_empty());
        }
    }
}
