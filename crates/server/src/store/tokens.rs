use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use ferry_api::tokens::TokenRole;
use serde::{Deserialize, Serialize};
use sqlx::sqlite::SqliteRow;
use utoipa::ToSchema;

use super::secrets::{self, Principal, Verified};
use super::{
    col, enum_col, is_unique_violation, ms, now, opt_time_col, time_col, Store, StoreError,
};

/// The row id and lookup key of the token from the server's configuration (`admin_token`):
/// one fixed row, so a changed configured secret replaces the old one instead of adding a
/// second token that keeps working.
pub const CONFIG_TOKEN_ID: &str = "config";

/// What an API token may do; see [`TokenRole`] for the API's spelling.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Only reading calls: for dashboards and monitoring that must not move anything.
    #[serde(alias = "read_only")]
    Reader,
    /// Starting, stopping and migrating guests; no host, token or definition changes.
    Operator,
    /// Every call, including changes to hosts, tokens and instance definitions.
    Admin,
}

impl Role {
    /// The name stored in the database and shown to users.
    pub fn as_str(self) -> &'static str {
        self.api().as_str()
    }

    /// The same role as the API types spell it.
    pub fn api(self) -> TokenRole {
        match self {
            Role::Reader => TokenRole::Reader,
            Role::Operator => TokenRole::Operator,
            Role::Admin => TokenRole::Admin,
        }
    }

    /// The store's role for an API role.
    pub fn from_api(role: TokenRole) -> Role {
        match role {
            TokenRole::Reader => Role::Reader,
            TokenRole::Operator => Role::Operator,
            TokenRole::Admin => Role::Admin,
        }
    }

    /// Whether this role includes everything `needed` may do.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is none of `admin`, `operator`, `reader` (or the older `read_only`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?} (expected admin, operator or reader)")]
pub struct ParseRoleError(pub String);

impl FromStr for Role {
    type Err = ParseRoleError;

    fn from_str(s: &str) -> Result<Role, ParseRoleError> {
        match s {
            "admin" => Ok(Role::Admin),
            "operator" => Ok(Role::Operator),
            "reader" | "read_only" => Ok(Role::Reader),
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
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

impl TokenInfo {
    /// The token as the API lists it.
    pub fn api(&self) -> ferry_api::tokens::Token {
        ferry_api::tokens::Token {
            id: self.id.clone(),
            name: self.name.clone(),
            role: self.role.api(),
            created_at: self.created_at,
            expires_at: self.expires_at,
            last_used_at: self.last_used_at,
            from_config: self.id == CONFIG_TOKEN_ID,
        }
    }
}

/// What a presented API token turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authenticated {
    /// A live token: its id, name and role.
    Valid {
        id: String,
        name: String,
        role: Role,
    },
    /// A real token past its expiry.
    Expired { name: String, at: DateTime<Utc> },
    /// No token has this secret (never had, or revoked).
    Unknown,
}

const TOKEN_COLUMNS: &str = "id, name, role, created_at, expires_at, last_used_at";

fn token_from_row(row: &SqliteRow) -> Result<TokenInfo, StoreError> {
    Ok(TokenInfo {
        id: col(row, "id")?,
        name: col(row, "name")?,
        role: enum_col(row, "role")?,
        created_at: time_col(row, "created_at")?,
        expires_at: opt_time_col(row, "expires_at")?,
        last_used_at: opt_time_col(row, "last_used_at")?,
    })
}

/// Runs argon2 off the async workers: it takes tens of milliseconds of CPU on purpose.
pub(super) async fn hash_blocking(secret: &str) -> Result<String, StoreError> {
    let secret = secret.to_string();
    tokio::task::spawn_blocking(move || secrets::hash(&secret))
        .await
        .map_err(|e| StoreError::Hash(e.to_string()))?
        .map_err(|e| StoreError::Hash(e.to_string()))
}

/// [`secrets::verify`] off the async workers.
pub(super) async fn verify_blocking(stored: &str, presented: &str) -> Verified {
    let (stored, presented) = (stored.to_string(), presented.to_string());
    tokio::task::spawn_blocking(move || secrets::verify(&stored, &presented))
        .await
        .unwrap_or(Verified::No)
}

fn outcome(
    id: String,
    name: String,
    role: Role,
    expires_at: Option<DateTime<Utc>>,
) -> Authenticated {
    match expires_at {
        Some(at) if at <= Utc::now() => Authenticated::Expired { name, at },
        _ => Authenticated::Valid { id, name, role },
    }
}

impl Store {
    /// Creates a token with a fresh random secret and returns the secret: this is the only
    /// time it is available, since only a salted argon2 hash is stored. Fails with
    /// [`StoreError::Conflict`] (`token-name-taken`) if a live token has this name, so that a
    /// name names one token in the audit log and in `ferry token revoke`.
    pub async fn create_token(
        &self,
        name: &str,
        role: Role,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<(TokenInfo, String), StoreError> {
        let made = secrets::new_secret();
        let hash = hash_blocking(&made.secret).await?;
        let info = TokenInfo {
            id: made.id.clone(),
            name: name.to_string(),
            role,
            created_at: now(),
            expires_at,
            last_used_at: None,
        };
        let mut tx = self.write_tx().await?;
        let taken = sqlx::query("SELECT id FROM api_tokens WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        if taken.is_some() {
            return Err(StoreError::conflict(
                "token-name-taken",
                format!("a token named {name:?} exists"),
            ));
        }
        sqlx::query(
            "INSERT INTO api_tokens (id, name, role, lookup, secret_hash, created_at, expires_at)
             VALUES ($1, $2, $3, $1, $4, $5, $6)",
        )
        .bind(&info.id)
        .bind(&info.name)
        .bind(role.as_str())
        .bind(&hash)
        .bind(ms(info.created_at))
        .bind(expires_at.map(ms))
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::conflict("token-exists", "a token with this id already exists")
            } else {
                StoreError::Db(e)
            }
        })?;
        tx.commit().await?;
        Ok((info, made.secret))
    }

    /// Registers the secret of the server's configuration (the first admin) as the token
    /// [`CONFIG_TOKEN_ID`].
    ///
    /// Idempotent: called on every start with the same secret it keeps the token's creation
    /// time and its hash (one argon2 check instead of a new hash), and takes the name and role
    /// from the call, so the config file stays the authority on them. A changed secret
    /// replaces the old one, which stops working at once.
    pub async fn insert_token_secret(
        &self,
        name: &str,
        role: Role,
        secret: &str,
    ) -> Result<TokenInfo, StoreError> {
        let stored: Option<String> =
            sqlx::query("SELECT secret_hash FROM api_tokens WHERE id = $1")
                .bind(CONFIG_TOKEN_ID)
                .fetch_optional(&self.pool)
                .await?
                .map(|r| col(&r, "secret_hash"))
                .transpose()?;
        let same = match &stored {
            Some(h) => verify_blocking(h, secret).await == Verified::Yes,
            None => false,
        };
        let hash = if same {
            None
        } else {
            Some(hash_blocking(secret).await?)
        };
        let mut tx = self.write_tx().await?;
        // A configured secret written by an older Ferry is a row of its own under the legacy
        // key; the fixed row replaces it.
        sqlx::query("DELETE FROM api_tokens WHERE lookup = $1 AND id <> $2")
            .bind(secrets::legacy_lookup_key(secret))
            .bind(CONFIG_TOKEN_ID)
            .execute(&mut *tx)
            .await?;
        // A configured secret of Ferry's own shape (a created token copied into the config)
        // is found by its id like any other; any other string under the fixed key.
        let lookup = if secrets::is_new_format(secret) {
            secrets::lookup_key(secret)
        } else {
            CONFIG_TOKEN_ID.to_string()
        };
        sqlx::query(
            "INSERT INTO api_tokens (id, name, role, lookup, secret_hash, created_at)
             VALUES ($1, $2, $3, $6, COALESCE($4, ''), $5)
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, role = excluded.role,
                 lookup = excluded.lookup,
                 secret_hash = COALESCE($4, api_tokens.secret_hash), expires_at = NULL",
        )
        .bind(CONFIG_TOKEN_ID)
        .bind(name)
        .bind(role.as_str())
        .bind(hash)
        .bind(ms(now()))
        .bind(lookup)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE id = $1"
        ))
        .bind(CONFIG_TOKEN_ID)
        .fetch_one(&mut *tx)
        .await?;
        let info = token_from_row(&row)?;
        tx.commit().await?;
        self.verified.forget_token(CONFIG_TOKEN_ID);
        Ok(info)
    }

    /// Who a request's bearer secret belongs to.
    ///
    /// A secret verified in the last minute is answered from memory (its expiry is still
    /// checked); else its row is found by lookup key and one argon2 hash is verified. A row
    /// from before salted hashes is re-hashed on its first successful use, and every full
    /// check records the token's last use.
    pub async fn authenticate(&self, secret: &str) -> Result<Authenticated, StoreError> {
        if secret.is_empty() {
            return Ok(Authenticated::Unknown);
        }
        if let Some(Principal::Token {
            id,
            name,
            role,
            expires_at,
        }) = self.verified.get(secret)
        {
            return Ok(outcome(id, name, role, expires_at));
        }
        // Candidates: the row of the lookup key, and for a secret of no Ferry shape also the
        // configured admin token (any string an operator chose).
        let key = secrets::lookup_key(secret);
        let rows = if secrets::is_new_format(secret) {
            sqlx::query(&format!(
                "SELECT {TOKEN_COLUMNS}, secret_hash FROM api_tokens WHERE lookup = $1"
            ))
            .bind(&key)
            .fetch_all(&self.pool)
            .await?
        } else {
            sqlx::query(&format!(
                "SELECT {TOKEN_COLUMNS}, secret_hash FROM api_tokens
                 WHERE lookup = $1 OR lookup = $2 ORDER BY lookup = $2"
            ))
            .bind(&key)
            .bind(CONFIG_TOKEN_ID)
            .fetch_all(&self.pool)
            .await?
        };
        for row in &rows {
            let stored: String = col(row, "secret_hash")?;
            let verified = verify_blocking(&stored, secret).await;
            if verified == Verified::No {
                continue;
            }
            let info = token_from_row(row)?;
            // Hashed before the write lock is taken: argon2 takes tens of milliseconds.
            let rehash = match verified {
                Verified::YesLegacy => Some(hash_blocking(secret).await?),
                _ => None,
            };
            let mut tx = self.write_tx().await?;
            if let Some(hash) = rehash {
                sqlx::query("UPDATE api_tokens SET secret_hash = $2 WHERE id = $1")
                    .bind(&info.id)
                    .bind(hash)
                    .execute(&mut *tx)
                    .await?;
                tracing::info!(token = %info.name, "re-hashed an API token stored by an older Ferry");
            }
            sqlx::query("UPDATE api_tokens SET last_used_at = $2 WHERE id = $1")
                .bind(&info.id)
                .bind(ms(now()))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            self.verified.put(
                secret,
                Principal::Token {
                    id: info.id.clone(),
                    name: info.name.clone(),
                    role: info.role,
                    expires_at: info.expires_at,
                },
            );
            return Ok(outcome(info.id, info.name, info.role, info.expires_at));
        }
        Ok(Authenticated::Unknown)
    }

    /// All tokens, oldest first.
    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(token_from_row).collect()
    }

    /// Deletes a token so its secret stops working at once (also in this process's cache of
    /// verified secrets). Returns whether it existed.
    pub async fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM api_tokens WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        self.verified.forget_token(id);
        Ok(done.rows_affected() > 0)
    }

    /// Deletes every token with this name (one, unless older Ferry versions made several) but
    /// never the configured one, and forgets them at once. Returns what was revoked.
    pub async fn revoke_tokens_named(&self, name: &str) -> Result<Vec<TokenInfo>, StoreError> {
        let mut tx = self.write_tx().await?;
        let rows = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE name = $1 AND id <> $2"
        ))
        .bind(name)
        .bind(CONFIG_TOKEN_ID)
        .fetch_all(&mut *tx)
        .await?;
        let gone = rows
            .iter()
            .map(token_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        sqlx::query("DELETE FROM api_tokens WHERE name = $1 AND id <> $2")
            .bind(name)
            .bind(CONFIG_TOKEN_ID)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        for t in &gone {
            self.verified.forget_token(&t.id);
        }
        Ok(gone)
    }
}
