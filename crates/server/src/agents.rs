//! Reaching agents: each host's URL comes from the store; the server proves itself with its
//! client certificate and checks the agent's against the cluster CA.

use std::future::Future;
use std::time::{Duration, Instant};

use ferry_api::{ApiClient, ApiError};
use tokio::sync::watch;

use crate::server::AppState;
use crate::ServerError;

/// An API client for `host`'s agent over mutual TLS: the server's client identity, the
/// agent's certificate verified against the cluster CA (revoked ones refused).
pub async fn agent_client(state: &AppState, host: &str) -> Result<ApiClient, ServerError> {
    let url = state
        .store
        .agent_url(host)
        .await?
        .ok_or_else(|| ServerError::not_found("host", host))?;
    Ok(ApiClient::new(&url, None).with_tls_config(state.pki.agents_tls()))
}

/// How long a job keeps calling an agent it cannot reach (a restart, a network blip) before
/// it gives up on that call.
pub(crate) const AGENT_RETRY: Duration = Duration::from_secs(60);

/// Calls an agent, retrying every second while it cannot be reached, up to [`AGENT_RETRY`];
/// the first failure is reported once through `warn`. With `cancel`, a cancel request ends
/// the retries at once, so cancelling a job works while one of its hosts is down.
pub(crate) async fn retry_unreachable<T, F, Fut, W, WFut>(
    host: &str,
    mut cancel: Option<watch::Receiver<bool>>,
    warn: W,
    mut call: F,
) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
    W: FnOnce(String) -> WFut,
    WFut: Future<Output = ()>,
{
    let deadline = Instant::now() + AGENT_RETRY;
    let mut warn = Some(warn);
    loop {
        match call().await {
            Err(ApiError::Unreachable { .. })
                if Instant::now() < deadline && !cancel.as_ref().is_some_and(|c| *c.borrow()) =>
            {
                if let Some(w) = warn.take() {
                    w(format!(
                        "agent on {host} unreachable; retrying for up to {} s",
                        AGENT_RETRY.as_secs()
                    ))
                    .await;
                }
                match cancel.as_mut() {
                    Some(c) => tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {},
                        _ = c.changed() => {},
                    },
                    None => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            }
            other => return other,
        }
    }
}
