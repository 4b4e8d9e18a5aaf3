//! Hosts, and the datastores and networks their agents report.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::Json;
use chrono::Utc;
use ferry_api::checks::CpuBaseline;
use ferry_api::hosts::{Datastore, DatastoreFacts, DatastoreMount, Host, HostState, Network};

use crate::agents::agent_client;
use ferry_api::migrations::Event;

use crate::auth::{Admin, Reader};
use crate::server::AppState;
use crate::ServerError;

fn offline_after(state: &AppState) -> chrono::Duration {
    chrono::Duration::seconds(state.config.heartbeat_timeout_s as i64)
}

pub(crate) async fn all_hosts(state: &AppState) -> Result<Vec<Host>, ServerError> {
    Ok(state
        .store
        .list_hosts(offline_after(state), Utc::now())
        .await?)
}

pub(crate) async fn one_host(state: &AppState, name: &str) -> Result<Host, ServerError> {
    state
        .store
        .get_host(name, offline_after(state), Utc::now())
        .await?
        .ok_or_else(|| ServerError::not_found("host", name))
}

/// Every host with its state and latest facts.
#[utoipa::path(get, path = "/v1/hosts", responses((status = 200, body = Vec<Host>)))]
pub async fn list(
    State(state): State<AppState>,
    _r: Reader,
) -> Result<Json<Vec<Host>>, ServerError> {
    Ok(Json(all_hosts(&state).await?))
}

#[utoipa::path(get, path = "/v1/hosts/{name}", params(("name" = String, Path, description = "host name")), responses((status = 200, body = Host), (status = 404, description = "no such host", body = ferry_api::ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    _r: Reader,
    Path(name): Path<String>,
) -> Result<Json<Host>, ServerError> {
    Ok(Json(one_host(&state, &name).await?))
}

async fn set_enabled(
    state: &AppState,
    who: &Admin,
    name: &str,
    enabled: bool,
) -> Result<Json<Host>, ServerError> {
    if !state.store.set_host_enabled(name, enabled).await? {
        return Err(ServerError::not_found("host", name));
    }
    let action = if enabled {
        "host.enable"
    } else {
        "host.disable"
    };
    state
        .store
        .audit(&who.name, action, name, &serde_json::json!({}))
        .await?;
    state.events.publish(Event::Host {
        name: name.to_string(),
    });
    state.queue.notify_one();
    Ok(Json(one_host(state, name).await?))
}

/// Lets the host receive instances and migrations again.
#[utoipa::path(post, path = "/v1/hosts/{name}/enable", params(("name" = String, Path, description = "host name")), responses((status = 200, body = Host), (status = 404, description = "no such host", body = ferry_api::ErrorBody)))]
pub async fn enable(
    State(state): State<AppState>,
    who: Admin,
    Path(name): Path<String>,
) -> Result<Json<Host>, ServerError> {
    set_enabled(&state, &who, &name, true).await
}

/// Stops new instances and migrations from landing on the host.
#[utoipa::path(post, path = "/v1/hosts/{name}/disable", params(("name" = String, Path, description = "host name")), responses((status = 200, body = Host), (status = 404, description = "no such host", body = ferry_api::ErrorBody)))]
pub async fn disable(
    State(state): State<AppState>,
    who: Admin,
    Path(name): Path<String>,
) -> Result<Json<Host>, ServerError> {
    set_enabled(&state, &who, &name, false).await
}

/// Gives the host's agent a new key and certificate: the agent makes the key and a CSR, the
/// cluster CA signs it, the agent serves it from its next connection, and the old
/// certificate is revoked.
#[utoipa::path(post, path = "/v1/hosts/{name}/rotate-cert", params(("name" = String, Path, description = "host name")), responses((status = 200, body = Host), (status = 404, description = "no such host", body = ferry_api::ErrorBody), (status = 502, description = "the agent could not be reached", body = ferry_api::ErrorBody)))]
pub async fn rotate_cert(
    State(state): State<AppState>,
    who: Admin,
    Path(name): Path<String>,
) -> Result<Json<Host>, ServerError> {
    let host = one_host(&state, &name).await?;
    let agent = crate::agents::agent_client(&state, &name).await?;
    let req: ferry_api::agent::CertificateSigningRequest = agent
        .post("/v1/tls/csr", &())
        .await
        .map_err(|e| ServerError::from_agent(&name, e))?;
    let issued = state.pki.sign_agent(&req.csr, &name, &host.agent_url)?;
    // Installed while the old certificate is still accepted: this call goes over it.
    agent
        .post::<_, ()>(
            "/v1/tls/certificate",
            &ferry_api::agent::InstallCertificate {
                certificate: issued.chain_pem.clone(),
                ca_pem: state.pki.ca.ca_pem().to_string(),
            },
        )
        .await
        .map_err(|e| ServerError::from_agent(&name, e))?;
    let not_after = chrono::DateTime::<chrono::Utc>::from(issued.not_after);
    let revoked = state
        .store
        .record_agent_cert(&name, &issued.serial, not_after)
        .await?;
    for old in &revoked {
        state.pki.revoked.revoke(old);
    }
    state
        .store
        .audit(
            &who.name,
            "host.rotate-cert",
            &name,
            &serde_json::json!({"serial": issued.serial, "revoked": revoked}),
        )
        .await?;
    Ok(Json(one_host(&state, &name).await?))
}

/// Datastores across the fleet: hosts that report the same identity share one datastore;
/// a datastore without an identity is local to its host.
#[utoipa::path(get, path = "/v1/datastores", responses((status = 200, body = Vec<Datastore>)))]
pub async fn datastores(
    State(state): State<AppState>,
    _r: Reader,
) -> Result<Json<Vec<Datastore>>, ServerError> {
    let hosts = all_hosts(&state).await?;
    let reports = hosts.iter().flat_map(|h| {
        h.facts
            .iter()
            .flat_map(|f| f.datastores.iter())
            .map(move |d| (h.name.as_str(), d))
    });
    Ok(Json(group_datastores(reports)))
}

/// One [`Datastore`] per storage: grouped by identity, or by host when there is none.
pub(crate) fn group_datastores<'a>(
    reports: impl Iterator<Item = (&'a str, &'a DatastoreFacts)>,
) -> Vec<Datastore> {
    let mut groups: BTreeMap<(String, String), Datastore> = BTreeMap::new();
    for (host, ds) in reports {
        let key = match &ds.identity {
            Some(id) => (format!("id:{id}"), String::new()),
            None => (format!("local:{}", ds.name), host.to_string()),
        };
        let entry = groups.entry(key).or_insert_with(|| Datastore {
            name: ds.name.clone(),
            identity: ds.identity.clone(),
            shared: false,
            total_bytes: ds.total_bytes,
            free_bytes: ds.free_bytes,
            mounts: Vec::new(),
            problem: None,
        });
        if entry.name != ds.name {
            entry.problem = Some(format!(
                "hosts name this storage differently ('{}' and '{}' on {host}); disks name \
                 their datastore, so give it one name on every host",
                entry.name, ds.name
            ));
        }
        entry.mounts.push(DatastoreMount {
            host: host.to_string(),
            path: ds.path.clone(),
            total_bytes: ds.total_bytes,
            free_bytes: ds.free_bytes,
        });
        entry.shared = entry.mounts.len() > 1;
        entry.free_bytes = entry.free_bytes.min(ds.free_bytes);
    }
    let mut out: Vec<Datastore> = groups.into_values().collect();
    out.sort_by(|a, b| {
        a.name
            .cmp(&b.name)
            .then(a.mounts[0].host.cmp(&b.mounts[0].host))
    });
    out
}

/// Networks by name, with the hosts attached to each.
#[utoipa::path(get, path = "/v1/networks", responses((status = 200, body = Vec<Network>)))]
pub async fn networks(
    State(state): State<AppState>,
    _r: Reader,
) -> Result<Json<Vec<Network>>, ServerError> {
    let mut by_name: BTreeMap<String, Network> = BTreeMap::new();
    for host in all_hosts(&state).await? {
        for n in host.facts.iter().flat_map(|f| f.networks.iter()) {
            by_name
                .entry(n.name.clone())
                .or_insert_with(|| Network {
                    name: n.name.clone(),
                    subnet: n.subnet.clone(),
                    host_names: Vec::new(),
                })
                .host_names
                .push(host.name.clone());
        }
    }
    Ok(Json(by_name.into_values().collect()))
}

/// The newest named CPU model every online host can run: what new instances should use so
/// that they can migrate anywhere in the cluster.
#[utoipa::path(get, path = "/v1/cpu-baseline", responses((status = 200, body = CpuBaseline)))]
pub async fn cpu_baseline(
    State(state): State<AppState>,
    _r: Reader,
) -> Result<Json<CpuBaseline>, ServerError> {
    let online: Vec<Host> = all_hosts(&state)
        .await?
        .into_iter()
        .filter(|h| h.state == HostState::Online && h.facts.is_some())
        .collect();
    let Some(first) = online.first() else {
        return Ok(Json(CpuBaseline {
            model: None,
            hosts: Vec::new(),
        }));
    };
    let expander = agent_client(&state, &first.name).await?;
    let flags: Vec<Vec<String>> = online
        .iter()
        .filter_map(|h| h.facts.as_ref().map(|f| f.cpu_flags.clone()))
        .collect();
    Ok(Json(CpuBaseline {
        model: crate::preflight::baseline_model(&expander, &flags).await,
        hosts: online.into_iter().map(|h| h.name).collect(),
    }))
}
