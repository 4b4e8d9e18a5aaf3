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

/// Whether the stored certificate has a third of its lifetime or less left (or cannot be
/// read): time to ask the server for a new one.
pub(crate) fn needs_renewal(state_dir: &Path, now: std::time::SystemTime) -> bool {
    let files = TlsFiles::in_state_dir(state_dir);
    let Ok(pem) = read_text(&files.cert) else {
        return false;
    };
    let Some((not_before, not_after)) = ferry_pki::tls::certs_from_pem(&pem)
        .ok()
        .and_then(|c| c.first().and_then(|d| ferry_pki::tls::validity_of(d)))
    else {
        return true;
    };
    let life = not_after.duration_since(not_before).unwrap_or_default();
    match not_after.duration_since(now) {
        Ok(left) => left <= life / 3,
        Err(_) => true,
    }
}

/// Renews the agent's certificate through the server (`POST /v1/agents/renew`, with the
/// agent's credential): a new key made here, the CSR signed there, served from the next
/// connection on.
pub(crate) async fn renew(
    agent: &crate::Agent,
    client: &ferry_api::ApiClient,
) -> Result<(), String> {
    let (key, csr) =
        ferry_pki::generate_key_and_csr(&agent.config.name).map_err(|e| e.to_string())?;
    let answer: ferry_api::agent::InstallCertificate = client
        .post(
            "/v1/agents/renew",
            &ferry_api::agent::RenewRequest {
                name: agent.config.name.clone(),
                csr,
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    let config = ferry_pki::tls::agent_server_config(&answer.certificate, &key, &answer.ca_pem)
        .map_err(|e| e.to_string())?;
    install_certificate(
        &agent.config.state_dir,
        &key,
        &answer.certificate,
        &answer.ca_pem,
    )
    .map_err(|e| e.to_string())?;
    agent.tls.set(config);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    #[test]
    fn renewal_is_due_when_a_third_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = tempfile::tempdir().unwrap();
        let ca = ferry_pki::ClusterCa::load_or_create(&ca_dir.path().join("pki"), None).unwrap();
        let (key, csr) = ferry_pki::generate_key_and_csr("hv1").unwrap();
        let day = Duration::from_secs(86400);
        let issued = ca.sign_agent_csr(&csr, "hv1", &[], &[], 90 * day).unwrap();
        super::install_certificate(dir.path(), &key, &issued.chain_pem, ca.ca_pem()).unwrap();
        let now = SystemTime::now();
        assert!(!super::needs_renewal(dir.path(), now));
        assert!(!super::needs_renewal(dir.path(), now + 55 * day));
        assert!(super::needs_renewal(dir.path(), now + 61 * day));
        assert!(super::load_server_config(dir.path()).unwrap().is_some());
    }
}
