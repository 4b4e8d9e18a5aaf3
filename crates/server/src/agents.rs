//! Reaching agents: the URL and credential of each host come from the store.

use ferry_api::ApiClient;

use crate::store::Store;
use crate::ServerError;

/// An API client for `host`'s agent, authenticated with that agent's credential.
pub async fn agent_client(store: &Store, host: &str) -> Result<ApiClient, ServerError> {
    let (url, secret) = store
        .agent_credential(host)
        .await?
        .ok_or_else(|| ServerError::not_found("host", host))?;
    Ok(ApiClient::new(&url, Some(secret)))
}
