//! What a benchmark run can fail with. A migration that does not converge, a guest that does
//! not verify or a cell that measures badly is not an error here: it is a result, reported in
//! the table with its reason. These errors are for the bench itself not getting that far (the
//! lab, its cluster or a file failed).

use ferry_api::{ApiError, ErrorBody};
use ferry_chaos::ChaosError;
use ferry_lab::LabError;
use ferry_migrate::MigrateError;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A call to the local cluster's server or an agent failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Namespaces, the guest image, QEMU or the accelerator probe failed.
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    #[error(transparent)]
    Qmp(#[from] ferry_qmp::QmpError),
    /// A guest's qemu-guest-agent did not answer as asked.
    #[error(transparent)]
    GuestAgent(#[from] ferry_qmp::GuestAgentError),
    /// The lab guest's control protocol, or the Debian guest's shell, failed.
    #[error(transparent)]
    Guest(#[from] ferry_lab::guest_client::GuestError),
    #[error(transparent)]
    DebianGuest(#[from] ferry_lab::debian_guest::DebianGuestError),
    /// The local cluster's daemons could not be started or waited for.
    #[error(transparent)]
    Chaos(#[from] ChaosError),
    /// A server or agent of the local cluster refused to start, with its code and hint.
    #[error("{}", .0.message)]
    Daemon(ErrorBody),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A blocking helper (namespaces, image builder, a transfer) panicked or was cancelled.
    #[error(transparent)]
    Join(#[from] tokio::task::JoinError),
    /// The bench was asked for something it cannot do (a bad argument).
    #[error("{0}")]
    Invalid(String),
    /// A step of a run did not happen as it must (a guest that never filled its memory, a
    /// counter that is not there).
    #[error("{0}")]
    Failed(String),
    /// What the bench was doing when `source` happened.
    #[error("{context}")]
    Context {
        context: String,
        #[source]
        source: Box<BenchError>,
    },
}

impl From<ferry_lab::net::NetError> for BenchError {
    fn from(e: ferry_lab::net::NetError) -> BenchError {
        BenchError::Lab(e.into())
    }
}

impl From<ferry_lab::image::ImageError> for BenchError {
    fn from(e: ferry_lab::image::ImageError) -> BenchError {
        BenchError::Lab(e.into())
    }
}

impl BenchError {
    /// The whole story in one line: every context, then the error under them.
    pub fn chain(&self) -> String {
        match self {
            BenchError::Context { context, source } => format!("{context}: {}", source.chain()),
            e => e.to_string(),
        }
    }
}

/// `.context()` and `.with_context()` on results and options, as the bench reads best: each
/// failure says what was being done.
pub(crate) trait Context<T> {
    fn context(self, context: impl Into<String>) -> Result<T, BenchError>;
    fn with_context<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T, BenchError>;
}

impl<T, E: Into<BenchError>> Context<T> for Result<T, E> {
    fn context(self, context: impl Into<String>) -> Result<T, BenchError> {
        self.with_context(|| context)
    }

    fn with_context<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T, BenchError> {
        self.map_err(|e| BenchError::Context {
            context: context().into(),
            source: Box::new(e.into()),
        })
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, context: impl Into<String>) -> Result<T, BenchError> {
        self.ok_or_else(|| BenchError::Failed(context.into()))
    }

    fn with_context<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T, BenchError> {
        self.ok_or_else(|| BenchError::Failed(context().into()))
    }
}

/// `bail!` for [`BenchError::Failed`].
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::BenchError::Failed(format!($($arg)*)))
    };
}
pub(crate) use bail;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_names_every_context_once() {
        let inner: Result<(), BenchError> = Err(BenchError::Failed("no counter".into()));
        let e = inner.context("reading mig0").context("run 1").unwrap_err();
        assert_eq!(e.chain(), "run 1: reading mig0: no counter");
        assert_eq!(e.to_string(), "run 1", "Display is the outer context alone");
        let none: Option<u8> = None;
        assert_eq!(none.context("gone").unwrap_err().chain(), "gone");
    }
}
