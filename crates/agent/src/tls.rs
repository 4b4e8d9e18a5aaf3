//! The agent's certificate and its API's mutual TLS.
//!
//! At join the agent makes its key (kept in `STATE/tls/agent.key`, mode 0600), sends a CSR,
//! and stores the certificate chain and the cluster CA the server returns. Its API then admits
//! only the server's client identity. A standalone agent (tests) is given the same files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_api::TlsOptions;
use ferry_pki::files::{ensure_private_dir, read_text, write_private};

use crate::{AgentConfig, AgentError};

/// Where the agent keeps its key, certificate chain and the cluster CA.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub key: PathBuf,
    pub cert: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// The files inside `state_dir`.
    pub fn in_state_dir(state_dir: &Path) -> TlsFiles {
        let dir = state_dir.join("tls");
        TlsFiles {
            key: dir.join("agent.key"),
            cert: dir.join("agent.pem"),
            ca: dir.join("ca.pem"),
        }
    }

    /// Whether all three files exist.
    pub fn exist(&self) -> bool {
        self.key.exists() && self.cert.exists() && self.ca.exists()
    }
}

fn pki_err(path: &Path) -> impl FnOnce(ferry_pki::PkiError) -> AgentError + '_ {
    move |e| AgentError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Stores a key, its certificate chain and the cluster CA (all 0600, in a 0700 directory):
/// what a join returns, or what a test gives a standalone agent.
pub fn install_certificate(
    state_dir: &Path,
    key_pem: &str,
    chain_pem: &str,
    ca_pem: &str,
) -> Result<(), AgentError> {
    let files = TlsFiles::in_state_dir(state_dir);
    let dir = state_dir.join("tls");
    ensure_private_dir(&dir).map_err(pki_err(&dir))?;
    // Key first: a certificate without its key would be loaded and refused.
    write_private(&files.key, key_pem.as_bytes()).map_err(pki_err(&files.key))?;
    write_private(&files.ca, ca_pem.as_bytes()).map_err(pki_err(&files.ca))?;
    write_private(&files.cert, chain_pem.as_bytes()).map_err(pki_err(&files.cert))
}

/// The API's TLS configuration from the stored files, `None` when the agent has none yet.
pub(crate) fn load_server_config(
    state_dir: &Path,
) -> Result<Option<Arc<rustls::ServerConfig>>, AgentError> {
    let files = TlsFiles::in_state_dir(state_dir);
    if !files.exist() {
        return Ok(None);
    }
    let key = read_text(&files.key).map_err(pki_err(&files.key))?;
    let cert = read_text(&files.cert).map_err(pki_err(&files.cert))?;
    let ca = read_text(&files.ca).map_err(pki_err(&files.ca))?;
    ferry_pki::tls::agent_server_config(&cert, &key, &ca)
        .map(Some)
        .map_err(pki_err(&files.cert))
}

/// How the agent verifies the server it joins and heartbeats to: the CA file in `server_ca`,
/// else the pin in `server_ca_fingerprint`. The validated config has one of them for an
/// `https` server.
pub(crate) fn server_trust(config: &AgentConfig) -> Result<TlsOptions, AgentError> {
    if let Some(path) = &config.server_ca {
        let pem = read_text(path).map_err(pki_err(path))?;
        return Ok(TlsOptions::ca(pem));
    }
    if let Some(pin) = &config.server_ca_fingerprint {
        return Ok(TlsOptions::pinned(pin.clone()));
    }
    Ok(TlsOptions::default())
}
