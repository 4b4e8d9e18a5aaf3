//! The control plane's persistent state: tokens, hosts, instances, migration jobs, their
//! progress history and logs, and the audit trail.
//!
//! Everything the server must remember across a restart goes through [`Store`], and all SQL of
//! the server lives in this module, so moving from the SQLite file used today to PostgreSQL
//! means touching only here. The queries are written to run on both: numbered placeholders
//! (`$1`), UUIDs as TEXT, timestamps as BIGINT unix milliseconds, JSON as TEXT, no
//! SQLite-only functions. Statements that must not interleave with other writers run in one
//! transaction and start with their write, so SQLite takes the write lock up front (waiting on
//! the busy timeout) instead of failing a read-to-write upgrade.

mod audit;
mod error;
mod hosts;
mod instances;
mod links;
mod migrations;
pub mod secrets;
mod send_rates;
mod tokens;

#[cfg(test)]
mod tests;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;
#[cfg(test)]
use sha2::{Digest, Sha256};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
};
use sqlx::Row;

pub use audit::AuditEntry;
pub use error::{codes, StoreError};
pub use links::LinkMeasure;
pub use migrations::{MigrationFilter, NewMigration};
pub use send_rates::SendRate;
pub use tokens::{Authenticated, ParseRoleError, Role, TokenInfo, CONFIG_TOKEN_ID};

/// How long a statement waits for another connection's write lock before failing: long
/// enough to ride out a burst of heartbeats and progress samples, short enough that a stuck
/// writer surfaces as an error instead of a hung API call.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections to a database file. SQLite serialises writers anyway; a few connections let
/// reads (API listings) proceed while a write waits.
const MAX_CONNECTIONS: u32 = 8;

/// The schema, in order. A version, once released, never changes: fixes go in a new file.
const SCHEMA: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/0001_initial.sql")),
    (2, include_str!("../../migrations/0002_plan.sql")),
    (3, include_str!("../../migrations/0003_copies.sql")),
    (4, include_str!("../../migrations/0004_dest_spec.sql")),
    (5, include_str!("../../migrations/0005_impact.sql")),
    (6, include_str!("../../migrations/0006_qemu_settings.sql")),
    (7, include_str!("../../migrations/0007_send_rates.sql")),
    (8, include_str!("../../migrations/0008_links.sql")),
    (9, include_str!("../../migrations/0009_secrets_roles.sql")),
    (10, include_str!("../../migrations/0010_agent_certs.sql")),
];

/// Migration states that end a job, as an SQL list. Kept equal to
/// [`ferry_api::migrations::MigrationState::is_terminal`] by a unit test, and to the partial
/// index in `0001_initial.sql`.
const TERMINAL_STATES_SQL: &str = "('completed', 'failed', 'cancelled')";

/// Migration states that hold a concurrency slot, as an SQL list. Kept equal to
/// [`ferry_api::migrations::MigrationState::is_active`] by a unit test.
const ACTIVE_STATES_SQL: &str = "('preparing', 'migrating', 'completing')";

/// Creates `dir` (and missing parents) readable by the owner only: the database (the
/// cluster's record, with secrets' hashes) and the cluster CA's keys (`pki/`) live there.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Creates the database file with mode 0600 before SQLite opens it (SQLite would create it
/// 0644 under the usual umask, and its WAL and SHM files after it), or makes an existing
/// one 0600.
fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    set_mode(path, 0o600)
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// The control plane's database handle. Cheap to clone (it wraps a connection pool), so every
/// handler and task keeps its own copy.
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
    /// Secrets verified recently, shared by every clone so a revoke through one handle is
    /// seen by all at once.
    verified: std::sync::Arc<secrets::VerifiedCache>,
}

impl Store {
    /// Opens (creating it and its parent directory if missing) the database file at `path`
    /// and brings its schema up to date.
    ///
    /// WAL journaling lets readers run while a writer commits; foreign keys are enforced;
    /// writers wait up to 5 s for the lock. Any failure, including a failed schema migration,
    /// is reported as [`StoreError::Open`] naming the path.
    pub async fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |source: sqlx::Error| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !parent.exists() {
                private_dir(parent).map_err(|e| open_err(sqlx::Error::Io(e)))?;
            }
        }
        private_file(path).map_err(|e| open_err(sqlx::Error::Io(e)))?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .foreign_keys(true)
            // Deleted rows (revoked tokens, replaced hashes, the tables a schema migration
            // rebuilds) are overwritten, not left readable in free pages of the file.
            .pragma("secure_delete", "ON")
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .connect_with(options)
            .await
            .map_err(open_err)?;
        let store = Store::with_schema(pool, open_err).await?;
        // SQLite gives the WAL and shared-memory files the main file's mode; making sure
        // covers files left by an older version that created them readable by all.
        for suffix in ["-wal", "-shm"] {
            let mut side = path.as_os_str().to_owned();
            side.push(suffix);
            let side = std::path::PathBuf::from(side);
            if side.exists() {
                set_mode(&side, 0o600).map_err(|e| open_err(sqlx::Error::Io(e)))?;
            }
        }
        Ok(store)
    }

    /// Brings a new pool's database to the current schema; a failure is reported as an open
    /// failure of that database.
    async fn with_schema(
        pool: sqlx::SqlitePool,
        open_err: impl Fn(sqlx::Error) -> StoreError,
    ) -> Result<Store, StoreError> {
        let store = Store {
            pool,
            verified: Default::default(),
        };
        store.apply_schema().await.map_err(|e| match e {
            StoreError::Db(source) => open_err(source),
            other => other,
        })?;
        Ok(store)
    }

    /// A fresh, private in-memory database with the full schema, for unit tests.
    ///
    /// The pool holds exactly one connection that never expires: each SQLite connection to
    /// `:memory:` is its own database, so a second connection would see empty tables.
    pub async fn open_memory() -> Result<Store, StoreError> {
        let open_err = |source: sqlx::Error| StoreError::Open {
            path: ":memory:".into(),
            source,
        };
        let options = SqliteConnectOptions::new()
            .in_memory(true)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(open_err)?;
        Store::with_schema(pool, open_err).await
    }

    /// A transaction that holds the write lock from its start (`BEGIN IMMEDIATE`). SQLite's
    /// default deferred transaction takes it at its first write, and one that read first is
    /// then refused outright ("database is locked", which the busy timeout does not wait
    /// out) when another connection wrote meanwhile: a cleanup or a state change would
    /// fail under load. Waiting for the lock up front queues it behind the busy timeout.
    pub(crate) async fn write_tx(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Closes every connection, checkpointing the WAL into the main file. Call on shutdown;
    /// the store must not be used afterwards.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Applies the schema versions this database lacks, each in its own transaction.
    ///
    /// Each transaction starts by claiming its version in `schema_migrations`, so two servers
    /// opening the same file cannot both apply it. A database written by a newer Ferry (a
    /// version we do not know) is refused rather than used with a schema we cannot read.
    async fn apply_schema(&self) -> Result<(), StoreError> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version BIGINT PRIMARY KEY,
                 applied_at BIGINT NOT NULL
             )",
        )
        .execute(&self.pool)
        .await?;
        let newest: Option<i64> = col(
            &sqlx::query("SELECT MAX(version) AS newest FROM schema_migrations")
                .fetch_one(&self.pool)
                .await?,
            "newest",
        )?;
        let known = SCHEMA.last().map(|(v, _)| *v).unwrap_or(0);
        if let Some(newest) = newest.filter(|n| *n > known) {
            return Err(StoreError::Corrupt(format!(
                "the database has schema version {newest}, newer than this server's {known}"
            )));
        }
        for (version, sql) in SCHEMA {
            let mut tx = self.write_tx().await?;
            let claimed = sqlx::query(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)
                 ON CONFLICT (version) DO NOTHING",
            )
            .bind(version)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if claimed == 0 {
                tx.rollback().await?;
                continue;
            }
            sqlx::raw_sql(sql).execute(&mut *tx).await?;
            tx.commit().await?;
            tracing::info!(version, "applied database schema migration");
        }
        Ok(())
    }
}

/// Now, truncated to what the database keeps (milliseconds), so a value returned by an insert
/// equals the one read back later.
fn now() -> DateTime<Utc> {
    to_time(now_ms()).unwrap_or_else(Utc::now)
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn ms(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

fn to_time(ms: i64) -> Option<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp_millis(ms)
}

/// Reads a column, reporting a value of the wrong type as a corrupt row (not a panic, and not
/// a generic database error: the database works, its content is wrong).
fn col<'r, T>(row: &'r SqliteRow, name: &str) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
{
    row.try_get::<T, _>(name).map_err(|e| match e {
        sqlx::Error::ColumnDecode { .. } => {
            StoreError::Corrupt(format!("column {name} has an unreadable value: {e}"))
        }
        other => StoreError::Db(other),
    })
}

/// A timestamp column (unix milliseconds).
fn time_col(row: &SqliteRow, name: &str) -> Result<DateTime<Utc>, StoreError> {
    let v: i64 = col(row, name)?;
    to_time(v).ok_or_else(|| StoreError::Corrupt(format!("column {name}: bad timestamp {v}")))
}

/// A nullable timestamp column.
fn opt_time_col(row: &SqliteRow, name: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
    let v: Option<i64> = col(row, name)?;
    v.map(|v| {
        to_time(v).ok_or_else(|| StoreError::Corrupt(format!("column {name}: bad timestamp {v}")))
    })
    .transpose()
}

/// A non-negative integer column.
fn u64_col(row: &SqliteRow, name: &str) -> Result<u64, StoreError> {
    let v: i64 = col(row, name)?;
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("column {name}: negative value {v}")))
}

/// A UUID stored as text.
fn uuid_col(row: &SqliteRow, name: &str) -> Result<uuid::Uuid, StoreError> {
    let v: String = col(row, name)?;
    uuid::Uuid::parse_str(&v)
        .map_err(|_| StoreError::Corrupt(format!("column {name}: bad uuid {v:?}")))
}

/// A JSON column.
fn json_col<T: DeserializeOwned>(row: &SqliteRow, name: &str) -> Result<T, StoreError> {
    let v: String = col(row, name)?;
    parse_json(&v, name)
}

/// A nullable JSON column.
fn opt_json_col<T: DeserializeOwned>(row: &SqliteRow, name: &str) -> Result<Option<T>, StoreError> {
    let v: Option<String> = col(row, name)?;
    v.map(|v| parse_json(&v, name)).transpose()
}

/// An enum stored as its text name.
fn enum_col<T: FromStr>(row: &SqliteRow, name: &str) -> Result<T, StoreError> {
    let v: String = col(row, name)?;
    v.parse()
        .map_err(|_| StoreError::Corrupt(format!("column {name}: unknown value {v:?}")))
}

fn parse_json<T: DeserializeOwned>(text: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Corrupt(format!("column {what} holds invalid JSON: {e}")))
}

fn to_json<T: Serialize + ?Sized>(value: &T, what: &str) -> Result<String, StoreError> {
    serde_json::to_string(value)
        .map_err(|e| StoreError::Corrupt(format!("cannot encode {what} as JSON: {e}")))
}

/// Lower-case hex SHA-256, for tests that look for what older versions stored.
#[cfg(test)]
fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Runs an insert that allocates its sequence number as `MAX(seq) + 1`, retrying if another
/// writer took the same number first. Never retries on SQLite, whose writers are serialised;
/// kept so the same statements are safe on PostgreSQL.
async fn insert_with_seq<F, Fut>(mut insert: F) -> Result<(), sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<sqlx::sqlite::SqliteQueryResult, sqlx::Error>>,
{
    const ATTEMPTS: usize = 3;
    let mut attempt = 1;
    loop {
        match insert().await {
            Ok(_) => return Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() && attempt < ATTEMPTS => {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether an error is a violated UNIQUE or PRIMARY KEY constraint.
fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// Whether an error is a violated foreign key (a referenced host or migration is missing).
fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_foreign_key_violation())
}
