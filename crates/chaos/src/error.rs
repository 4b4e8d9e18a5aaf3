//! What setting up or running the fault matrix can fail with. A cell whose *product* behaviour
//! is wrong is not an error here: it is a result (`ok: false`) with its reason, so one bad cell
//! never hides the others. These errors are for the runner itself failing.

use ferry_api::{ApiError, ErrorBody};
use ferry_lab::net::NetError;
use ferry_lab::LabError;

#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    /// A call to the lab's server failed where the runner cannot go on without it.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Namespaces, the guest image or the accelerator probe failed.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// A file of the lab directory, a daemon's spawn or a signal failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Something the runner waited for never happened.
    #[error("gave up waiting for {0}")]
    Timeout(String),
    /// A bad request to the runner (unknown fault or phase name, empty selection).
    #[error("{0}")]
    Invalid(String),
}

impl From<NetError> for ChaosError {
    fn from(e: NetError) -> ChaosError {
        ChaosError::Lab(e.into())
    }
}

impl ChaosError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> ChaosError {
        ChaosError::Io {
            what: what.into(),
            source,
        }
    }

    /// The code, sentence and hint a user sees, in the shape every Ferry error has.
    pub fn body(&self) -> ErrorBody {
        match self {
            ChaosError::Api(e) => e.body(),
            ChaosError::Lab(e) => ErrorBody::new(e.code(), e.to_string(), e.hint()),
            ChaosError::Io { .. } => ErrorBody::new(
                "chaos-io",
                self.to_string(),
                "run as root, or set FERRY_LAB_DIR to a writable directory",
            ),
            ChaosError::Timeout(_) => ErrorBody::new(
                "chaos-timeout",
                self.to_string(),
                "read the daemon logs in the lab directory",
            ),
            ChaosError::Invalid(_) => ErrorBody::new(
                "invalid-request",
                self.to_string(),
                "see `ferry chaos --help`",
            ),
        }
    }
}
