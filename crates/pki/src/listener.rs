//! Serving axum over TLS with `axum::serve` (so graceful shutdown works as for plain TCP).
//!
//! Handshakes run in their own tasks, so a slow or hostile client cannot hold up the others,
//! and each connection takes the configuration current when it arrives: a renewed or rotated
//! certificate is used from the next connection on, without a restart.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tracing::debug;

/// How long a client has to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS configuration new connections get; empty (connections closed at once) until a
/// certificate exists, e.g. an agent before it joined.
#[derive(Debug, Clone, Default)]
pub struct ServerConfigSlot(Arc<RwLock<Option<Arc<ServerConfig>>>>);

impl ServerConfigSlot {
    pub fn new(config: Option<Arc<ServerConfig>>) -> ServerConfigSlot {
        ServerConfigSlot(Arc::new(RwLock::new(config)))
    }

    /// Replaces the configuration for connections from now on.
    pub fn set(&self, config: Arc<ServerConfig>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(config);
    }

    pub fn get(&self) -> Option<Arc<ServerConfig>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A TCP listener whose accepted connections have completed a TLS handshake.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accept: JoinHandle<()>,
}

impl TlsListener {
    /// Starts accepting on `tcp` with the configuration in `slot`.
    pub fn new(tcp: TcpListener, slot: ServerConfigSlot) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let accept = tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(config) = slot.get() else {
                    debug!(%peer, "no certificate yet; connection closed");
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake refused"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { rx, local, accept })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept task only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
