use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use rand::rngs::OsRng;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sqlx::sqlite::SqliteRow;
use utoipa::ToSchema;

use super::{col, enum_col, is_unique_violation, ms, now, sha256_hex, time_col, Store, StoreError};

/// What an API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Every call, including changes.
    Admin,
    /// Only reading calls: for dashboards and monitoring that must not move anything.
    ReadOnly,
}

impl Role {
    /// The name stored in the database and shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::ReadOnly => "read_only",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is neither `admin` nor `read_only`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?} (expected admin or read_only)")]
pub struct ParseRoleError(pub String);

impl FromStr for Role {
    type Err = ParseRoleError;

    fn from_str(s: &str) -> Result<Role, ParseRoleError> {
        match s {
            "admin" => Ok(Role::Admin),
            "read_only" => Ok(Role::ReadOnly),
            other => Err(ParseRoleError(other.to_string())),
        }
    }
}

/// An API token as listed: everything but the secret, which the server never keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
}

fn token_from_row(row: &SqliteRow) -> Result<TokenInfo, StoreError> {
    Ok(TokenInfo {
        id: col(row, "id")?,
        name: col(row, "name")?,
        role: enum_col(row, "role")?,
        created_at: time_col(row, "created_at")?,
    })
}

impl Store {
    /// Creates a token with a fresh random secret (32 bytes from the OS, hex-encoded) and
    /// returns the secret: this is the only time it is available, since only its SHA-256 is
    /// stored.
    pub async fn create_token(
        &self,
        name: &str,
        role: Role,
    ) -> Result<(TokenInfo, String), StoreError> {
        let mut bytes = [0u8; 32];
        OsRng.fill_bytes(&mut bytes);
        let secret = hex::encode(bytes);
        let info = TokenInfo {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.to_string(),
            role,
            created_at: now(),
        };
        sqlx::query(
            "INSERT INTO api_tokens (id, name, role, secret_sha256, created_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&info.id)
        .bind(&info.name)
        .bind(role.as_str())
        .bind(sha256_hex(&secret))
        .bind(ms(info.created_at))
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::conflict("token-exists", "a token with this secret already exists")
            } else {
                StoreError::Db(e)
            }
        })?;
        Ok((info, secret))
    }

    /// Registers a secret chosen elsewhere (the server's config file, for the first admin).
    ///
    /// Idempotent: called on every start with the same secret it keeps the token's id and
    /// creation time, and takes the name and role from the call, so the config file stays
    /// the authority on them.
    pub async fn insert_token_secret(
        &self,
        name: &str,
        role: Role,
        secret: &str,
    ) -> Result<TokenInfo, StoreError> {
        let hash = sha256_hex(secret);
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO api_tokens (id, name, role, secret_sha256, created_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (secret_sha256) DO UPDATE SET name = excluded.name, role = excluded.role",
        )
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(name)
        .bind(role.as_str())
        .bind(&hash)
        .bind(ms(now()))
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(
            "SELECT id, name, role, created_at FROM api_tokens WHERE secret_sha256 = $1",
        )
        .bind(&hash)
        .fetch_one(&mut *tx)
        .await?;
        let info = token_from_row(&row)?;
        tx.commit().await?;
        Ok(info)
    }

    /// The token a request's bearer secret belongs to, or `None` for an unknown secret.
    ///
    /// Looks up by hash, so the secret is never compared in the clear.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<TokenInfo>, StoreError> {
        if secret.is_empty() {
            return Ok(None);
        }
        let row = sqlx::query(
            "SELECT id, name, role, created_at FROM api_tokens WHERE secret_sha256 = $1",
        )
        .bind(sha256_hex(secret))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    /// All tokens, oldest first.
    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, role, created_at FROM api_tokens ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(token_from_row).collect()
    }

    /// Deletes a token so its secret stops working. Returns whether it existed.
    pub async fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM api_tokens WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}
