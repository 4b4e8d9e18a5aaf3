use chrono::{DateTime, Utc};
use ferry_migrate::plan::LEARN_WEIGHT;
use sqlx::sqlite::SqliteRow;

use super::{col, ms, now, time_col, u64_col, Store, StoreError};

/// What QEMU got through per second between two hosts, learned from completed migrations.
#[derive(Debug, Clone, PartialEq)]
pub struct SendRate {
    pub rate_bps: f64,
    /// How many migrations it was learned from.
    pub migrations: u64,
    pub updated_at: DateTime<Utc>,
    /// QEMU's pause past its last pages (device state, hand-over), milliseconds.
    pub switchover_ms: Option<f64>,
}

fn send_rate_from_row(row: &SqliteRow) -> Result<SendRate, StoreError> {
    Ok(SendRate {
        rate_bps: col(row, "rate_bps")?,
        migrations: u64_col(row, "migrations")?,
        updated_at: time_col(row, "updated_at")?,
        switchover_ms: col(row, "switchover_ms")?,
    })
}

impl Store {
    /// The learned rate of `source` -> `destination`, if a migration between them completed.
    pub async fn send_rate(
        &self,
        source: &str,
        destination: &str,
    ) -> Result<Option<SendRate>, StoreError> {
        let row = sqlx::query(
            "SELECT rate_bps, migrations, updated_at, switchover_ms FROM send_rates
             WHERE source = $1 AND destination = $2",
        )
        .bind(source)
        .bind(destination)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(send_rate_from_row).transpose()
    }

    /// The fastest rate learned from `source` to any host: its QEMU's own sending ceiling,
    /// which bounds the plan of a pair that has no history yet.
    pub async fn source_send_rate(&self, source: &str) -> Result<Option<f64>, StoreError> {
        let row = sqlx::query("SELECT MAX(rate_bps) AS rate FROM send_rates WHERE source = $1")
            .bind(source)
            .fetch_one(&self.pool)
            .await?;
        col(&row, "rate")
    }

    /// Folds the rate one completed migration showed into the pair's, in one statement (so
    /// two migrations ending at once both count): the first one is the rate, each later one
    /// moves it by [`LEARN_WEIGHT`] of the difference, as `ferry_migrate::plan::learn_rate`
    /// does (a unit test keeps the two equal).
    pub async fn learn_send_rate(
        &self,
        source: &str,
        destination: &str,
        observed_bps: f64,
    ) -> Result<SendRate, StoreError> {
        let row = sqlx::query(
            "INSERT INTO send_rates (source, destination, rate_bps, migrations, updated_at)
             VALUES ($1, $2, $3, 1, $4)
             ON CONFLICT (source, destination) DO UPDATE SET
                 rate_bps = send_rates.rate_bps + $5 * (excluded.rate_bps - send_rates.rate_bps),
                 migrations = send_rates.migrations + 1,
                 updated_at = excluded.updated_at
             RETURNING rate_bps, migrations, updated_at, switchover_ms",
        )
        .bind(source)
        .bind(destination)
        .bind(observed_bps)
        .bind(ms(now()))
        .bind(LEARN_WEIGHT)
        .fetch_one(&self.pool)
        .await?;
        send_rate_from_row(&row)
    }

    /// Folds the switchover one completed migration showed into its pair's (which a learned
    /// rate must exist for), weighted as the rate is.
    pub async fn learn_switchover(
        &self,
        source: &str,
        destination: &str,
        observed_ms: f64,
    ) -> Result<Option<f64>, StoreError> {
        let row = sqlx::query(
            "UPDATE send_rates SET switchover_ms = CASE
                 WHEN switchover_ms IS NULL THEN $3
                 ELSE switchover_ms + $4 * ($3 - switchover_ms) END
             WHERE source = $1 AND destination = $2
             RETURNING switchover_ms",
        )
        .bind(source)
        .bind(destination)
        .bind(observed_ms)
        .bind(LEARN_WEIGHT)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| col(&row, "switchover_ms")).transpose()
    }
}
