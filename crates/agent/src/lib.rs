//! The Ferry host agent.
//!
//! One agent runs on every hypervisor host, next to its QEMU processes. It reports what the
//! host offers ([`facts`]), runs instances from their spec ([`instances`]), performs this
//! host's half of each live migration ([`migrations`]), prepares and removes disk images on
//! its datastores (`disks`), and answers the server over an authenticated HTTP API (see
//! `ferry_api::agent` for the endpoint list).
//!
//! Guests never depend on the agent being up: QEMU runs in its own process group, the agent
//! keeps every instance and migration record on disk, and a restarted agent re-adopts the
//! running QEMU processes and re-derives in-flight migrations from QEMU itself.

mod api;
mod auth;
mod block_incoming;
pub mod checks;
pub mod config;
pub mod console;
pub mod datastores;
mod disk_copy;
mod disks;
mod error;
pub mod facts;
mod guest_info;
mod instances;
mod join;
mod migrations;
mod net;
pub mod tls;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ferry_migrate::PortRange;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};
use uuid::Uuid;

pub use config::{AgentConfig, DatastoreConfig, NetworkConfig};
pub use error::AgentError;
pub use net::tap_name;

use facts::StaticFacts;
use instances::Slot;
use migrations::MigrationEntry;

/// The agent's shared state, behind one `Arc` used by the HTTP handlers and the background
/// tasks.
pub(crate) struct Agent {
    pub(crate) config: AgentConfig,
    pub(crate) facts: StaticFacts,
    pub(crate) port_range: PortRange,
    credential: RwLock<Option<String>>,
    /// The API's TLS configuration; empty until joined, replaced when the certificate is.
    pub(crate) tls: ferry_pki::ServerConfigSlot,
    /// Per-instance locks serialise operations on one instance (start, stop, migration
    /// steps) without blocking the others.
    pub(crate) instances: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<Slot>>>>,
    pub(crate) migrations: Mutex<HashMap<Uuid, Arc<MigrationEntry>>>,
    /// Migration tasks, aborted at shutdown so that no monitor connection outlives the agent.
    pub(crate) tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Required features per CPU model (cpuinfo spelling), from QEMU's static expansion.
    pub(crate) cpu_models: Mutex<HashMap<String, Vec<String>>>,
    /// Held while this host's one probe listener is open.
    pub(crate) probe_gate: Arc<checks::ProbeGate>,
    /// What running guests' agents last reported, by instance.
    pub(crate) guests: Mutex<HashMap<Uuid, ferry_api::instances::GuestInfo>>,
    /// Room held on datastores by disks being written, so that two requests never both
    /// pass a room check for the same free space.
    pub(crate) disk_room: disks::Reservations,
    /// Disk copies of cold migrations and image checksums.
    pub(crate) copies: disk_copy::Copies,
    /// A key made for a certificate rotation, until the server's signed certificate arrives.
    pub(crate) pending_key: Mutex<Option<String>>,
}

impl Agent {
    /// The credential requests must carry; `None` until joined.
    pub(crate) fn credential(&self) -> Option<String> {
        self.credential
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn set_credential(&self, credential: String) {
        *self.credential.write().unwrap_or_else(|p| p.into_inner()) = Some(credential);
    }

    /// A snapshot of the instance slots, so the map's lock is not held across awaits.
    pub(crate) fn slots(&self) -> Vec<Arc<tokio::sync::Mutex<Slot>>> {
        self.instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// RAM (MiB) of the instances that have a QEMU process here. An instance whose lock is
    /// held (an operation in progress) cannot be looked at without waiting and is left out;
    /// the next report counts it.
    pub(crate) fn guest_ram_mib(&self) -> u64 {
        self.slots()
            .iter()
            .map(|slot| match slot.try_lock() {
                Ok(s) if s.deleted || s.process.is_none() => 0,
                Ok(s) => u64::from(s.record.spec.memory_mib),
                Err(_) => 0,
            })
            .sum()
    }

    /// The host's facts now (blocking file reads run off the async threads).
    pub(crate) async fn host_facts(
        self: &Arc<Self>,
    ) -> Result<ferry_api::hosts::HostFacts, AgentError> {
        let guest_ram = self.guest_ram_mib();
        let a = self.clone();
        tokio::task::spawn_blocking(move || a.facts.current(&a.config, guest_ram))
            .await
            .map_err(|e| AgentError::Internal(format!("fact collection panicked: {e}")))
    }

    /// Remembers a background task so that shutdown can stop it.
    pub(crate) fn track(&self, task: JoinHandle<()>) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }
}

/// A running agent: its API server and background tasks.
///
/// Dropping or shutting it down never stops guests; they keep running and the next agent
/// started with the same state directory re-adopts them.
pub struct AgentHandle {
    url: String,
    agent: Arc<Agent>,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
}

impl AgentHandle {
    /// The API's URL as bound (with the real port when `listen` asked for port 0).
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Stops the HTTP server and background tasks, and lets go of the QEMU processes without
    /// stopping them.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in &self.background {
            task.abort();
        }
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.agent.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in &tasks {
            task.abort();
        }
        for task in self.background.into_iter().chain(tasks) {
            let _ = task.await;
        }
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(5), &mut server)
            .await
            .is_err()
        {
            warn!("API server did not stop within 5 s; aborting it");
            server.abort();
            let _ = server.await;
        }
        self.agent.release_all().await;
        info!(name = %self.agent.config.name, "agent stopped; guests keep running");
    }
}

/// Starts an agent: binds the API, loads state, re-adopts running guests and in-flight
/// migrations, and starts joining/heartbeating when a server is configured.
pub async fn start(config: AgentConfig) -> Result<AgentHandle, AgentError> {
    config.validate("config")?;
    let port_range = config.port_range()?;
    prepare_state_dir(&config.state_dir)?;
    let credential = match &config.credential {
        Some(c) => Some(c.clone()),
        None => auth::load_credential(&config.state_dir)?,
    };
    let tls_config = tls::load_server_config(&config.state_dir)?;
    if config.server_url.is_some() {
        // An unreadable CA file is a configuration error now, not a join that never happens.
        tls::server_trust(&config)?;
    }
    if config.server_url.is_none() && tls_config.is_none() {
        return Err(AgentError::Config {
            file: "config".into(),
            message: format!(
                "a standalone agent (no `server_url`) needs its certificate in {} \
                 (agent.key, agent.pem, ca.pem)",
                config.state_dir.join("tls").display()
            ),
        });
    }
    if config.server_url.is_some()
        && (credential.is_none() || tls_config.is_none())
        && config.join_token.is_none()
    {
        return Err(AgentError::Config {
            file: "config".into(),
            message: "field `join_token`: needed to join the server (no stored credential or certificate)".into(),
        });
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| AgentError::Listen {
            addr: config.listen.to_string(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| AgentError::Listen {
        addr: config.listen.to_string(),
        source,
    })?;
    let measure_config = config.clone();
    let facts = tokio::task::spawn_blocking(move || StaticFacts::measure(&measure_config))
        .await
        .map_err(|e| AgentError::Internal(format!("fact collection panicked: {e}")))??;
    info!(name = %config.name, accel = facts.accel.name(), qemu = %facts.qemu_version, "host facts measured");

    let agent = Arc::new(Agent {
        config,
        facts,
        port_range,
        credential: RwLock::new(credential),
        tls: ferry_pki::ServerConfigSlot::new(tls_config),
        instances: Mutex::new(HashMap::new()),
        migrations: Mutex::new(HashMap::new()),
        tasks: Mutex::new(Vec::new()),
        cpu_models: Mutex::new(HashMap::new()),
        probe_gate: Arc::default(),
        guests: Mutex::new(HashMap::new()),
        disk_room: disks::Reservations::default(),
        copies: disk_copy::Copies::default(),
        pending_key: Mutex::new(None),
    });
    agent.readopt_instances().await;
    let models = agent.cpu_models_in_use();
    checks::warm_cpu_models(&agent, models);
    agent.load_copies().await;
    agent.load_migrations().await;
    agent.prune_migration_records();

    let url = format!("https://{local}");
    let advertise = agent.config.advertise_url.clone().unwrap_or(url.clone());
    let (stop, mut stop_rx) = watch::channel(false);
    let router = api::router(agent.clone());
    let listener = ferry_pki::TlsListener::new(listener, agent.tls.clone()).map_err(|source| {
        AgentError::Listen {
            addr: local.to_string(),
            source,
        }
    })?;
    let server = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            warn!(error = %e, "agent API server failed");
        }
    });
    let background = vec![
        tokio::spawn(join::join_and_heartbeat(agent.clone(), advertise)),
        tokio::spawn(guest_info::follow_guests(agent.clone())),
    ];
    info!(name = %agent.config.name, %url, "agent listening");
    Ok(AgentHandle {
        url,
        agent,
        stop,
        server,
        background,
    })
}

/// Creates the state directory and its parts, the state directory itself mode 0700 (also when
/// it existed): it holds the agent credential and the QEMU monitor sockets, which no other
/// local user may read or connect to.
fn prepare_state_dir(state_dir: &std::path::Path) -> Result<(), AgentError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .and_then(|()| std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(AgentError::io(state_dir))?;
    for sub in ["instances", "run", "migrations", "copies"] {
        let dir = state_dir.join(sub);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(AgentError::io(&dir))?;
    }
    Ok(())
}

/// Runs an agent until SIGINT or SIGTERM, then shuts it down (guests keep running). This is
/// `ferry agent`.
pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    use tokio::signal::unix::{signal, SignalKind};
    let handle = start(config).await?;
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| AgentError::Internal(format!("cannot watch SIGTERM: {e}")))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
        _ = term.recv() => info!("SIGTERM received"),
    }
    handle.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_state_directory_is_the_owners_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("agent");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        super::prepare_state_dir(&dir).unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for sub in ["instances", "run", "migrations", "copies"] {
            assert_eq!(mode(&dir.join(sub)), 0o700, "{sub}");
        }
        super::auth::store_credential(&dir, "secret").unwrap();
        assert_eq!(mode(&super::auth::credential_path(&dir)), 0o600);
    }
}
