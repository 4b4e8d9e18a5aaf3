//! What each half of a migration gets to encrypt its streams: the pair of short-lived
//! certificates the migration CA issues for this migration and these two hosts' migration
//! addresses, as the agents' requests carry them (issue 12: a migration can be received by
//! nothing but the destination QEMU prepared for it, and sent by nothing but its source).

use std::net::IpAddr;
use std::time::Duration;

use chrono::Utc;
use ferry_api::migrations::Migration;
pub use ferry_migrate::HalvesTls;

use crate::server::AppState;
use crate::ServerError;

/// How long a migration's certificates last at least: QEMU checks them when a stream
/// connects, and the last connections (post-copy recovery, a retried disk export) may come
/// well after the start.
const MIN_LIFETIME: Duration = Duration::from_secs(30 * 60);
/// Beyond the job's own budget, when it has one.
const BUDGET_MARGIN: Duration = Duration::from_secs(15 * 60);

/// A host's migration address as its agent reported it.
async fn migration_addr(state: &AppState, host: &str) -> Result<IpAddr, ServerError> {
    let offline_after = chrono::Duration::seconds(state.config.heartbeat_timeout_s as i64);
    let facts = state
        .store
        .get_host(host, offline_after, Utc::now())
        .await?
        .and_then(|h| h.facts)
        .ok_or_else(|| ServerError::not_found("host", host))?;
    facts.migration_addr.parse().map_err(|_| {
        ServerError::new(
            500,
            "bad-migration-address",
            format!(
                "host {host} reports the migration address {:?}, which is not an IP address",
                facts.migration_addr
            ),
            "check migration_addr in the host's agent configuration",
        )
    })
}

/// The credentials of `m`'s two halves: issued at the first call, the same at every later
/// one (the destination launched ahead, then prepared, then the source), until the job ends.
pub async fn for_migration(state: &AppState, m: &Migration) -> Result<HalvesTls, ServerError> {
    let source_addr = migration_addr(state, &m.source).await?;
    let destination_addr = migration_addr(state, &m.destination).await?;
    let lifetime = m
        .options
        .budget_s
        .map(|b| Duration::from_secs(b) + BUDGET_MARGIN)
        .unwrap_or_default()
        .max(MIN_LIFETIME);
    let creds = state
        .pki
        .stream_credentials(m.id, source_addr, destination_addr, lifetime)?;
    Ok(HalvesTls::from_pair(
        &creds.ca_pem,
        (creds.source.cert_pem, creds.source.key_pem),
        (creds.destination.cert_pem, creds.destination.key_pem),
        &creds.source_dn,
        destination_addr,
    ))
}

/// Forgets an ended job's credentials (the agents remove their files themselves).
pub fn forget(state: &AppState, m: uuid::Uuid) {
    state.pki.forget_stream_credentials(m);
}
