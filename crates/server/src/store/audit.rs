use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::sqlite::SqliteRow;
use utoipa::ToSchema;

use super::{col, insert_with_seq, json_col, ms, now, time_col, to_json, Store, StoreError};

/// One change made through the API: kept so an operator can answer "who moved this VM".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub at: DateTime<Utc>,
    /// The token name (or agent host) that made the change.
    pub actor: String,
    /// What was done, e.g. `migration.create`.
    pub action: String,
    /// What it was done to (a name or id).
    pub target: String,
    /// The request's relevant fields.
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

fn audit_from_row(row: &SqliteRow) -> Result<AuditEntry, StoreError> {
    Ok(AuditEntry {
        at: time_col(row, "at")?,
        actor: col(row, "actor")?,
        action: col(row, "action")?,
        target: col(row, "target")?,
        detail: json_col(row, "detail")?,
    })
}

impl Store {
    /// Appends an entry to the audit trail (never edited or deleted by Ferry).
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let detail = to_json(detail, "audit detail")?;
        let at = ms(now());
        insert_with_seq(|| {
            sqlx::query(
                "INSERT INTO audit_log (seq, at, actor, action, target, detail)
                 SELECT COALESCE(MAX(seq), 0) + 1, $1, $2, $3, $4, $5 FROM audit_log",
            )
            .bind(at)
            .bind(actor)
            .bind(action)
            .bind(target)
            .bind(detail.as_str())
            .execute(&self.pool)
        })
        .await?;
        Ok(())
    }

    /// The latest `limit` audit entries, newest first.
    pub async fn list_audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT at, actor, action, target, detail FROM audit_log ORDER BY seq DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(audit_from_row).collect()
    }
}
