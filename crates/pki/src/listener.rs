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
///
/// The listener owns its TCP socket (no background task does): when the server stops and
/// drops it, the port is free at once, so a restarted agent can bind it again immediately.
pub struct TlsListener {
    tcp: TcpListener,
    slot: ServerConfigSlot,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `tcp` with the configuration in `slot`.
    pub fn new(tcp: TcpListener, slot: ServerConfigSlot) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        Ok(TlsListener {
            tcp,
            slot,
            tx,
            rx,
            local,
        })
    }

    /// Starts the handshake of one accepted connection in its own task.
    fn handshake(&self, stream: TcpStream, peer: SocketAddr) {
        let Some(config) = self.slot.get() else {
            debug!(%peer, "no certificate yet; connection closed");
            return;
        };
        let tx = self.tx.clone();
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
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                Some(conn) = self.rx.recv() => return conn,
                accepted = self.tcp.accept() => match accepted {
                    Ok((stream, peer)) => self.handshake(stream, peer),
                    Err(e) => {
                        debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
