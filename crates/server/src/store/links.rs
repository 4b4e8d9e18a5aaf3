use chrono::{DateTime, Utc};

use super::{col, ms, now, time_col, Store, StoreError};

/// A link bandwidth the pre-flight probe measured, kept across restarts (see
/// `0008_links.sql`).
#[derive(Debug, Clone, PartialEq)]
pub struct LinkMeasure {
    pub bandwidth_mbit_s: f64,
    pub measured_at: DateTime<Utc>,
}

impl Store {
    /// The last measured bandwidth of `source` -> `destination`.
    pub async fn link(
        &self,
        source: &str,
        destination: &str,
    ) -> Result<Option<LinkMeasure>, StoreError> {
        let row = sqlx::query(
            "SELECT bandwidth_mbit_s, measured_at FROM links
             WHERE source = $1 AND destination = $2",
        )
        .bind(source)
        .bind(destination)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(LinkMeasure {
                bandwidth_mbit_s: col(&row, "bandwidth_mbit_s")?,
                measured_at: time_col(&row, "measured_at")?,
            })
        })
        .transpose()
    }

    /// Records a measurement of `source` -> `destination`, replacing the last one.
    pub async fn record_link(
        &self,
        source: &str,
        destination: &str,
        bandwidth_mbit_s: f64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO links (source, destination, bandwidth_mbit_s, measured_at)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (source, destination) DO UPDATE SET
                 bandwidth_mbit_s = excluded.bandwidth_mbit_s,
                 measured_at = excluded.measured_at",
        )
        .bind(source)
        .bind(destination)
        .bind(bandwidth_mbit_s)
        .bind(ms(now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
