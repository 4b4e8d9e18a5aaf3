//! Starting and stopping the server: store, bootstrap token, API, scheduler, recovery.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Notify};
use tracing::{info, warn};
use uuid::Uuid;

use crate::events::EventBus;
use crate::store::{Role, Store};
use crate::{api, driver, scheduler, ServerConfig, ServerError};

/// What every request handler and background task shares.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub config: Arc<ServerConfig>,
    pub events: EventBus,
    /// Wakes the scheduler when the queue or the slots change.
    pub queue: Arc<Notify>,
    /// Cancel signals of the migrations being driven, by id.
    pub cancels: Arc<Mutex<HashMap<Uuid, watch::Sender<bool>>>>,
    /// Connectivity probes between hosts, reused and one at a time per destination.
    pub probes: Arc<crate::preflight::ProbeCache>,
    /// What each agent reported last: where every copy of every guest really is.
    pub reports: Arc<crate::reconcile::Reports>,
    /// Images claimed by instance creates in flight (see [`crate::disks::claim`]).
    pub disk_claims: Arc<crate::disks::DiskClaims>,
    /// The cluster CA and the server's certificates.
    pub pki: Arc<crate::pki::ServerPki>,
}

impl AppState {
    /// Signals a driven migration to cancel; false if this server is not driving it.
    pub fn signal_cancel(&self, id: Uuid) -> bool {
        let cancels = self.cancels.lock().unwrap_or_else(|e| e.into_inner());
        cancels
            .get(&id)
            .map(|tx| tx.send(true).is_ok())
            .unwrap_or(false)
    }
}

/// A running server. Dropping it does not stop it; call [`ServerHandle::shutdown`].
pub struct ServerHandle {
    pub addr: SocketAddr,
    pub state: AppState,
    plain: bool,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// `https://ADDR` (`http://` only with `tls.plain_http_for_labs`).
    pub fn url(&self) -> String {
        let scheme = if self.plain { "http" } else { "https" };
        format!("{scheme}://{}", self.addr)
    }

    /// The cluster CA's certificate (PEM): what clients and agents trust.
    pub fn ca_pem(&self) -> String {
        self.state.pki.ca.ca_pem().to_string()
    }

    /// The file the CA's certificate is in (`STATE/pki/ca.pem`).
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.state.pki.ca.ca_file()
    }

    /// An API client for this server that trusts its CA.
    pub fn client(&self, token: Option<String>) -> ferry_api::ApiClient {
        ferry_api::ApiClient::new(&self.url(), token).with_tls_config(self.client_tls())
    }

    /// A client TLS configuration trusting this server's CA.
    pub fn client_tls(&self) -> Arc<rustls::ClientConfig> {
        // The CA's own PEM always parses: it was just loaded or made.
        ferry_pki::tls::client_config(self.state.pki.ca.ca_pem(), None)
            .expect("the cluster CA makes a client configuration")
    }

    /// Stops accepting requests and stops the background tasks. Migrations in flight keep
    /// running on the agents; a restarted server picks them up.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Opens the store, makes sure an admin token exists, and serves the API.
pub async fn start(config: ServerConfig) -> Result<ServerHandle, ServerError> {
    config.validate()?;
    let store = Store::open(&config.database).await?;
    bootstrap_admin(&store, &config).await?;
    let pki = Arc::new(crate::pki::ServerPki::open(&config, &store).await?);
    let plain = config.tls.plain_http_for_labs;
    if plain {
        warn!("serving the API over plain HTTP (tls.plain_http_for_labs): for a test lab only");
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| {
            ServerError::new(
                500,
                "listen-failed",
                format!("cannot listen on {}: {e}", config.listen),
                "pick a free address in `listen`",
            )
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServerError::internal(e.to_string()))?;
    let state = AppState {
        store,
        config: Arc::new(config),
        events: EventBus::default(),
        queue: Arc::new(Notify::new()),
        cancels: Arc::new(Mutex::new(HashMap::new())),
        probes: Arc::default(),
        reports: Arc::default(),
        disk_claims: Arc::default(),
        pki: pki.clone(),
    };
    let (stop, stop_rx) = watch::channel(false);
    driver::recover(&state).await;
    tokio::spawn(scheduler::run(state.clone(), stop_rx.clone()));
    tokio::spawn(crate::cold::run_auto_cleanup(
        state.clone(),
        stop_rx.clone(),
    ));
    // The web panel at `/` renders from the same API router, called in process.
    let api = api::router(state.clone());
    let app = ferry_panel::router(api.clone()).merge(api);
    tokio::spawn(crate::pki::run_renewal(pki.clone(), stop_rx.clone()));
    let mut stop_http = stop_rx.clone();
    let shutdown = async move {
        let _ = stop_http.wait_for(|s| *s).await;
    };
    let task = if plain {
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                warn!(error = %e, "API server stopped");
            }
        })
    } else {
        let tls = ferry_pki::TlsListener::new(listener, pki.https.clone())
            .map_err(|e| ServerError::internal(format!("cannot serve HTTPS: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = axum::serve(tls, app).with_graceful_shutdown(shutdown).await {
                warn!(error = %e, "API server stopped");
            }
        })
    };
    info!(%addr, tls = !plain, fingerprint = %pki.ca.fingerprint(), "ferry server listening");
    Ok(ServerHandle {
        addr,
        state,
        plain,
        stop,
        task,
    })
}

/// `ferry server`: start, then serve until SIGINT or SIGTERM.
pub async fn run(config: ServerConfig) -> Result<(), ServerError> {
    let handle = start(config).await?;
    eprintln!(
        "ferry server listening on {} (CA {}, fingerprint {})",
        handle.url(),
        handle.ca_file().display(),
        handle.state.pki.ca.fingerprint()
    );
    shutdown_signal().await;
    handle.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The configured admin token is always valid; without one, the first start creates a token
/// and writes it next to the database (mode 0600), so a fresh server is usable at once.
async fn bootstrap_admin(store: &Store, config: &ServerConfig) -> Result<(), ServerError> {
    if let Some(secret) = &config.admin_token {
        store
            .insert_token_secret("admin", Role::Admin, secret)
            .await?;
        return Ok(());
    }
    if !store.list_tokens().await?.is_empty() {
        return Ok(());
    }
    let (_, secret) = store.create_token("admin", Role::Admin, None).await?;
    let path = config.admin_token_file();
    write_private(&path, &secret)
        .map_err(|e| ServerError::internal(format!("cannot write {}: {e}", path.display())))?;
    info!(path = %path.display(), "created the first admin token");
    Ok(())
}

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}
