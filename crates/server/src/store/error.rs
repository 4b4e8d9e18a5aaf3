use std::path::PathBuf;

use ferry_api::migrations::MigrationState;
use ferry_api::ErrorBody;

/// Stable codes of conflicts that the API may also detect before asking the store; both
/// places use these, so one situation always has one code.
pub mod codes {
    /// The instance has an unfinished migration.
    pub const MIGRATION_IN_PROGRESS: &str = "migration-in-progress";
    /// An instance of that name (or id) exists.
    pub const INSTANCE_EXISTS: &str = "instance-exists";
}

/// What a [`super::Store`] call can fail with, split by what the caller does about it:
/// `Conflict`, `NotFound` and `InvalidTransition` are the user's or the scheduler's business
/// (HTTP 409/404), the others are the operator's (HTTP 500).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or its schema could not be brought up to date.
    #[error("cannot open the database {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    /// A statement failed for a reason other than the ones below (I/O, lock timeout, ...).
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// The change collides with existing state (duplicate name, a second running migration).
    /// `code` is the same stable code the API uses when it finds the same collision before
    /// asking the store (e.g. `migration-in-progress`), so that a race between two requests
    /// never changes the code a script sees.
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// The row the call refers to does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A migration job cannot go from `from` to `to` (it already ended).
    #[error("migration cannot go from {} to {}", from.as_str(), to.as_str())]
    InvalidTransition {
        from: MigrationState,
        to: MigrationState,
    },
    /// A secret could not be hashed (argon2 or the OS's random source failed).
    #[error("cannot hash a secret: {0}")]
    Hash(String),
    /// A row holds a value Ferry cannot read (bad JSON, unknown enum value, negative count).
    #[error("corrupt database row: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// A [`StoreError::Conflict`] with its stable code.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> StoreError {
        StoreError::Conflict {
            code,
            message: message.into(),
        }
    }

    /// Stable kebab-case code for API error bodies and scripts.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Open { .. } => "database-unavailable",
            StoreError::Db(_) => "database-error",
            StoreError::Conflict { code, .. } => code,
            StoreError::NotFound(_) => "not-found",
            StoreError::InvalidTransition { .. } => "invalid-transition",
            StoreError::Corrupt(_) => "database-corrupt",
            StoreError::Hash(_) => "hash-failed",
        }
    }

    /// What the reader of the error should do next.
    pub fn hint(&self) -> &'static str {
        match self {
            StoreError::Open { .. } => {
                "check that the directory exists and is writable by the server, and that the \
                 file is a Ferry database"
            }
            StoreError::Db(_) => "retry; if it persists, check the server log and the disk",
            StoreError::Conflict { code, .. } if *code == codes::MIGRATION_IN_PROGRESS => {
                "wait for the migration to end or cancel it"
            }
            StoreError::Conflict { code, .. } if *code == codes::INSTANCE_EXISTS => {
                "pick another name"
            }
            StoreError::Conflict { .. } => "check the current state (list or show it) and retry",
            StoreError::NotFound(_) => "check the name or id (list them to see what exists)",
            StoreError::InvalidTransition { .. } => {
                "the migration has already ended; start a new one if needed"
            }
            StoreError::Hash(_) => "retry; if it persists, check the server's memory and log",
            StoreError::Corrupt(_) => {
                "the database holds data this server cannot read: check the server version \
                 and restore from a backup if needed"
            }
        }
    }

    /// The error as an API error body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody::new(self.code(), self.to_string(), self.hint())
    }
}
