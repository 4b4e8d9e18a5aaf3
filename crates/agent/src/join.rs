//! Joining the cluster and heartbeating to the server.
//!
//! An agent without a credential introduces itself with the join token until the server
//! answers (retrying every 2 s, logging once a minute), stores the credential, and from then on
//! reports its facts and instances every `heartbeat_ms`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::agent::{Heartbeat, JoinRequest, JoinResponse};
use ferry_api::{ApiClient, TlsOptions};
use tracing::{debug, info, warn};

use crate::{auth, Agent};

/// Pause between join attempts.
const JOIN_RETRY: Duration = Duration::from_secs(2);
/// How often the agent looks at its certificate's expiry.
const RENEW_CHECK: Duration = Duration::from_secs(3600);
/// Repeated failures are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Logs a repeated failure once per [`LOG_EVERY`], at debug level in between.
struct Throttle(Option<Instant>);

impl Throttle {
    fn should_log(&mut self) -> bool {
        let now = Instant::now();
        if self.0.is_none_or(|t| now.duration_since(t) >= LOG_EVERY) {
            self.0 = Some(now);
            true
        } else {
            false
        }
    }
}

/// Joins when needed, then heartbeats forever; returns at once for a standalone agent.
pub(crate) async fn join_and_heartbeat(agent: Arc<Agent>, advertise_url: String) {
    let Some(server) = agent.config.server_url.clone() else {
        return;
    };
    let trust = match crate::tls::server_trust(&agent.config) {
        Ok(t) => t,
        Err(e) => {
            warn!(error = %e, "cannot read the server's CA; not joining");
            return;
        }
    };
    if agent.credential().is_none() || agent.tls.get().is_none() {
        join(&agent, &server, &advertise_url, &trust).await;
    }
    let Some(credential) = agent.credential() else {
        return;
    };
    let client = match ApiClient::new(&server, Some(credential)).with_tls(&trust) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot verify the server; not heartbeating");
            return;
        }
    };
    let mut throttle = Throttle(None);
    let mut ticker = tokio::time::interval(Duration::from_millis(agent.config.heartbeat_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_renewal_check = Instant::now();
    loop {
        ticker.tick().await;
        if Instant::now() >= next_renewal_check {
            // Hourly: renew the API's certificate when a third of its lifetime is left.
            next_renewal_check = Instant::now() + RENEW_CHECK;
            if crate::tls::needs_renewal(&agent.config.state_dir, std::time::SystemTime::now()) {
                match crate::tls::renew(&agent, &client).await {
                    Ok(()) => info!("renewed the agent's certificate"),
                    Err(e) => {
                        warn!(error = %e, "cannot renew the agent's certificate; retrying in an hour")
                    }
                }
            }
        }
        let facts = match agent.host_facts().await {
            Ok(f) => f,
            Err(e) => {
                warn!(error = %e, "fact collection failed");
                continue;
            }
        };
        let beat = Heartbeat {
            name: agent.config.name.clone(),
            facts,
            instances: agent.list_instances().await,
        };
        match client
            .post::<_, serde_json::Value>("/v1/agents/heartbeat", &beat)
            .await
        {
            Ok(_) => debug!("heartbeat sent"),
            Err(e) if throttle.should_log() => warn!(error = %e, "heartbeat failed"),
            Err(e) => debug!(error = %e, "heartbeat failed"),
        }
    }
}

/// Tries to join until it works, then stores and installs the credential and the API's
/// certificate (a key made here, the CSR signed by the server).
async fn join(agent: &Agent, server: &str, advertise_url: &str, trust: &TlsOptions) {
    let token = agent.config.join_token.clone().unwrap_or_default();
    let client = match ApiClient::new(server, Some(token.clone())).with_tls(trust) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot verify the server; not joining");
            return;
        }
    };
    let (key_pem, csr) = match ferry_pki::generate_key_and_csr(&agent.config.name) {
        Ok(k) => k,
        Err(e) => {
            warn!(error = %e, "cannot make the agent's key; not joining");
            return;
        }
    };
    let mut throttle = Throttle(None);
    loop {
        let request = JoinRequest {
            join_token: token.clone(),
            name: agent.config.name.clone(),
            agent_url: advertise_url.to_string(),
            facts: agent.facts.current(&agent.config, agent.guest_ram_mib()),
            csr: csr.clone(),
        };
        match client
            .post::<_, JoinResponse>("/v1/agents/join", &request)
            .await
        {
            Ok(resp) => {
                // Served first (in memory), stored after: the heartbeat that brings the host
                // online comes only after this, so the server never calls an agent without
                // its certificate.
                match ferry_pki::tls::agent_server_config(&resp.certificate, &key_pem, &resp.ca_pem)
                {
                    Ok(config) => agent.tls.set(config),
                    Err(e) => {
                        warn!(error = %e, "the server's certificate for this agent is unusable")
                    }
                }
                let state_dir = &agent.config.state_dir;
                if let Err(e) = auth::store_credential(state_dir, &resp.agent_token) {
                    warn!(error = %e, "joined, but cannot store the credential; it lasts until restart");
                }
                agent.set_credential(resp.agent_token);
                if let Err(e) = crate::tls::install_certificate(
                    state_dir,
                    &key_pem,
                    &resp.certificate,
                    &resp.ca_pem,
                ) {
                    warn!(error = %e, "joined, but cannot store the certificate; it lasts until restart");
                }
                info!(%server, "joined the cluster");
                return;
            }
            Err(e) if throttle.should_log() => {
                warn!(%server, error = %e, "cannot join yet; retrying every 2 s")
            }
            Err(e) => debug!(error = %e, "join failed"),
        }
        tokio::time::sleep(JOIN_RETRY).await;
    }
}
