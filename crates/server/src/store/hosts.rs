use chrono::{DateTime, Utc};
use ferry_api::hosts::{Host, HostFacts, HostState};
use sqlx::sqlite::SqliteRow;

use super::secrets::{self, Principal, Verified};
use super::tokens::{hash_blocking, verify_blocking};
use super::{
    col, is_unique_violation, ms, now, opt_json_col, opt_time_col, to_json, u64_col, Store,
    StoreError,
};

const HOST_SELECT: &str = "SELECT h.name, h.agent_url, h.enabled, h.last_heartbeat, h.facts,
        (SELECT COUNT(*) FROM instances i WHERE i.host = h.name) AS instance_count
    FROM hosts h";

fn host_from_row(
    row: &SqliteRow,
    offline_after: chrono::Duration,
    now: DateTime<Utc>,
) -> Result<Host, StoreError> {
    let last_heartbeat = opt_time_col(row, "last_heartbeat")?;
    let state = match last_heartbeat {
        Some(at) if now.signed_duration_since(at) <= offline_after => HostState::Online,
        _ => HostState::Offline,
    };
    let instances = u64_col(row, "instance_count")?;
    Ok(Host {
        name: col(row, "name")?,
        agent_url: col(row, "agent_url")?,
        enabled: col(row, "enabled")?,
        state,
        last_heartbeat,
        facts: opt_json_col::<HostFacts>(row, "facts")?,
        instances: u32::try_from(instances).unwrap_or(u32::MAX),
    })
}

impl Store {
    /// Registers an agent's host, or re-registers it: an agent that lost its state joins
    /// again with a new secret and possibly a new URL, which replace the old ones (the old
    /// credential stops working at once). The enabled flag (an operator's choice) survives a
    /// re-join; a new host starts enabled. A joined host is online from its first heartbeat,
    /// which its agent sends once it serves the certificate it was given (before, the server
    /// could not call it yet).
    ///
    /// Only a salted argon2 hash of the credential is kept, found by the credential's lookup
    /// id: the server calls agents with its client certificate, so it never needs the
    /// credential itself. Fails with [`StoreError::Conflict`] if another host already uses
    /// the same credential id.
    pub async fn join_host(
        &self,
        name: &str,
        agent_url: &str,
        agent_secret: &str,
        facts: &HostFacts,
    ) -> Result<(), StoreError> {
        let at = ms(now());
        let hash = hash_blocking(agent_secret).await?;
        sqlx::query(
            "INSERT INTO hosts (name, agent_url, agent_secret_sha256, agent_lookup,
                                agent_secret_hash, enabled, facts, last_heartbeat, joined_at)
             VALUES ($1, $2, 'retired:' || $1, $3, $4, $5, $6, NULL, $7)
             ON CONFLICT (name) DO UPDATE SET
                 agent_url = excluded.agent_url,
                 agent_lookup = excluded.agent_lookup,
                 agent_secret_hash = excluded.agent_secret_hash,
                 facts = excluded.facts,
                 last_heartbeat = excluded.last_heartbeat,
                 joined_at = excluded.joined_at",
        )
        .bind(name)
        .bind(agent_url)
        .bind(secrets::lookup_key(agent_secret))
        .bind(hash)
        .bind(true)
        .bind(to_json(facts, "host facts")?)
        .bind(at)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::conflict(
                    "agent-secret-in-use",
                    format!("another host already uses this agent credential (joining {name})"),
                )
            } else {
                StoreError::Db(e)
            }
        })?;
        self.verified.forget_agent(name);
        Ok(())
    }

    /// The host whose agent holds `secret`: how the server authenticates agent calls
    /// (heartbeats). Found by the credential's lookup id, verified against its argon2 hash,
    /// then remembered for a minute so heartbeats do not pay argon2 each time. A credential
    /// stored by an older Ferry (unsalted SHA-256) is re-hashed at its first use.
    pub async fn host_for_agent_secret(&self, secret: &str) -> Result<Option<String>, StoreError> {
        if secret.is_empty() {
            return Ok(None);
        }
        if let Some(Principal::Agent { host }) = self.verified.get(secret) {
            return Ok(Some(host));
        }
        let row = sqlx::query("SELECT name, agent_secret_hash FROM hosts WHERE agent_lookup = $1")
            .bind(secrets::lookup_key(secret))
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let name: String = col(&row, "name")?;
        let stored: Option<String> = col(&row, "agent_secret_hash")?;
        let verified = match stored {
            Some(h) => verify_blocking(&h, secret).await,
            None => Verified::No,
        };
        match verified {
            Verified::No => return Ok(None),
            Verified::YesLegacy => {
                let hash = hash_blocking(secret).await?;
                sqlx::query("UPDATE hosts SET agent_secret_hash = $2 WHERE name = $1")
                    .bind(&name)
                    .bind(hash)
                    .execute(&self.pool)
                    .await?;
                tracing::info!(host = %name, "re-hashed an agent credential stored by an older Ferry");
            }
            Verified::Yes => {}
        }
        self.verified
            .put(secret, Principal::Agent { host: name.clone() });
        Ok(Some(name))
    }

    /// Where the server calls `host`'s agent (authenticated by the server's client
    /// certificate, not by a secret).
    pub async fn agent_url(&self, host: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT agent_url FROM hosts WHERE name = $1")
            .bind(host)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(|r| col(r, "agent_url")).transpose()
    }

    /// Records a certificate the cluster CA signed for `host`'s agent, and revokes the ones it
    /// had before (an agent that joins again made a new key); returns the revoked serials.
    pub async fn record_agent_cert(
        &self,
        host: &str,
        serial: &str,
        not_after: DateTime<Utc>,
    ) -> Result<Vec<String>, StoreError> {
        let at = ms(now());
        // Read then write: the write lock from the start, or two agents joining at once
        // fail with "database is locked".
        let mut tx = self.write_tx().await?;
        let old =
            sqlx::query("SELECT serial FROM agent_certs WHERE host = $1 AND revoked_at IS NULL")
                .bind(host)
                .fetch_all(&mut *tx)
                .await?;
        let old = old
            .iter()
            .map(|r| col::<String>(r, "serial"))
            .collect::<Result<Vec<_>, _>>()?;
        sqlx::query(
            "UPDATE agent_certs SET revoked_at = $2 WHERE host = $1 AND revoked_at IS NULL",
        )
        .bind(host)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO agent_certs (serial, host, issued_at, not_after) VALUES ($1, $2, $3, $4)",
        )
        .bind(serial)
        .bind(host)
        .bind(at)
        .bind(ms(not_after))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(old)
    }

    /// Every revoked agent certificate's serial, for the verifier of agents.
    pub async fn revoked_agent_serials(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT serial FROM agent_certs WHERE revoked_at IS NOT NULL")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| col(r, "serial")).collect()
    }

    /// Records a heartbeat: the host's latest facts and when they arrived. Fails with
    /// [`StoreError::NotFound`] for a host that never joined (the agent must join first).
    pub async fn record_heartbeat(
        &self,
        host: &str,
        facts: &HostFacts,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE hosts SET facts = $2, last_heartbeat = $3 WHERE name = $1")
            .bind(host)
            .bind(to_json(facts, "host facts")?)
            .bind(ms(at))
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("host {host}")));
        }
        Ok(())
    }

    /// All hosts by name. A host is online if its last heartbeat is at most `offline_after`
    /// before `now` (both passed in so the caller's clock and timeout rule, and tests can
    /// fix them).
    pub async fn list_hosts(
        &self,
        offline_after: chrono::Duration,
        now: DateTime<Utc>,
    ) -> Result<Vec<Host>, StoreError> {
        let rows = sqlx::query(&format!("{HOST_SELECT} ORDER BY h.name"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| host_from_row(r, offline_after, now))
            .collect()
    }

    /// One host, with its state computed as in [`Store::list_hosts`].
    pub async fn get_host(
        &self,
        name: &str,
        offline_after: chrono::Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<Host>, StoreError> {
        let row = sqlx::query(&format!("{HOST_SELECT} WHERE h.name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref()
            .map(|r| host_from_row(r, offline_after, now))
            .transpose()
    }

    /// Enables or disables a host (disabled hosts get no new instances or migrations).
    /// Returns whether the host exists.
    pub async fn set_host_enabled(&self, name: &str, enabled: bool) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE hosts SET enabled = $2 WHERE name = $1")
            .bind(name)
            .bind(enabled)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}
