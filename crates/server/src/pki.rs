//! The server's side of the cluster PKI: its CA, its HTTPS certificate and its client identity
//! for calling agents (both renewed when a third of their lifetime is left), agents'
//! certificates signed at join, and the serials of replaced agent certificates.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use std::collections::HashMap;

use ferry_pki::{ClusterCa, ExternalCa, Issued, MigrationCreds, RevokedSerials, ServerConfigSlot};
use tokio::sync::watch;
use tracing::{info, warn};
use uuid::Uuid;

use crate::store::Store;
use crate::{ServerConfig, ServerError};

/// How often the renewal task looks at the server's certificates.
const RENEW_CHECK: Duration = Duration::from_secs(3600);

impl From<ferry_pki::PkiError> for ServerError {
    fn from(e: ferry_pki::PkiError) -> ServerError {
        ServerError::new(500, e.code(), e.to_string(), e.hint())
    }
}

/// The certificates the server holds and the TLS configurations made from them.
pub struct ServerPki {
    pub ca: ClusterCa,
    /// What new HTTPS connections get; swapped on renewal.
    pub https: ServerConfigSlot,
    /// The issued HTTPS certificate (`None`: the operator's own, never renewed here).
    https_cert: Mutex<Option<Issued>>,
    /// The client identity and the client configuration for agents made from it.
    identity: Mutex<(Issued, Arc<rustls::ClientConfig>)>,
    pub revoked: RevokedSerials,
    names: Vec<String>,
    ips: Vec<IpAddr>,
    agent_validity: Duration,
    /// Each running migration's stream credentials, issued at its first use and forgotten
    /// when the job ends; only in memory, so they never reach the database.
    streams: Mutex<HashMap<Uuid, MigrationCreds>>,
}

impl std::fmt::Debug for ServerPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerPki").field("ca", &self.ca).finish()
    }
}

impl ServerPki {
    /// Loads or creates the CA in `STATE/pki` (or takes the operator's), issues the server's
    /// certificates, and loads the revoked agent serials.
    pub async fn open(config: &ServerConfig, store: &Store) -> Result<ServerPki, ServerError> {
        let external = match (&config.tls.ca_cert, &config.tls.ca_key) {
            (Some(cert), Some(key)) => Some(ExternalCa {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        };
        let ca = ClusterCa::load_or_create(&config.pki_dir(), external.as_ref())?;
        if ca.created() {
            info!(fingerprint = %ca.fingerprint(), file = %ca.ca_file().display(), "created the cluster CA");
            eprintln!(
                "ferry: created the cluster CA; its certificate is {} and its fingerprint\n  {}\n\
                 give the file to CLIs (FERRY_CA) and agents (server_ca), or compare the \
                 fingerprint when they ask",
                ca.ca_file().display(),
                ca.fingerprint()
            );
        }
        let mut names = config.tls.names.clone();
        let mut ips = config.tls.addresses.clone();
        if !config.listen.ip().is_unspecified() {
            ips.push(config.listen.ip());
        }
        if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            let host = host.trim().to_string();
            // Only a name a certificate can carry; anything else is left to `tls.names`.
            let valid = host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if valid && !host.is_empty() && !names.contains(&host) {
                names.push(host);
            }
        }
        let (https, https_cert) = match (&config.tls.cert, &config.tls.key) {
            (Some(cert), Some(key)) => {
                let chain = ferry_pki::files::read_text(cert)?;
                let key = ferry_pki::files::read_text(key)?;
                (ferry_pki::tls::server_config(&chain, &key)?, None)
            }
            _ => {
                let issued = ca.issue_server_cert(&names, &ips, ferry_pki::SERVER_CERT_VALIDITY)?;
                let tls = ferry_pki::tls::server_config(&issued.chain_pem, &issued.key_pem)?;
                (tls, Some(issued))
            }
        };
        let revoked = RevokedSerials::default();
        for serial in store.revoked_agent_serials().await? {
            revoked.revoke(&serial);
        }
        let identity = ca.issue_server_client_identity(ferry_pki::SERVER_CERT_VALIDITY)?;
        let agents_tls = agents_tls(&ca, &identity, &revoked)?;
        Ok(ServerPki {
            https: ServerConfigSlot::new(Some(https)),
            https_cert: Mutex::new(https_cert),
            identity: Mutex::new((identity, agents_tls)),
            revoked,
            names,
            ips,
            agent_validity: Duration::from_secs(u64::from(config.tls.agent_cert_days) * 86400),
            streams: Mutex::new(HashMap::new()),
            ca,
        })
    }

    /// The migration's stream credentials (both halves'), issued by the migration CA at the
    /// first call and the same at every later one, so the destination launched ahead and the
    /// one prepared later hold the pair the source gets.
    pub fn stream_credentials(
        &self,
        migration: Uuid,
        source: IpAddr,
        destination: IpAddr,
        ttl: Duration,
    ) -> Result<MigrationCreds, ServerError> {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = streams.get(&migration) {
            return Ok(c.clone());
        }
        let creds = self
            .ca
            .issue_migration_pair(migration, source, destination, ttl)?;
        streams.insert(migration, creds.clone());
        Ok(creds)
    }

    /// Drops a finished migration's stream credentials (the agents delete their copies).
    pub fn forget_stream_credentials(&self, migration: Uuid) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.remove(&migration);
    }

    /// The client configuration for calling agents: the server's identity, the cluster CA,
    /// revoked serials refused.
    pub fn agents_tls(&self) -> Arc<rustls::ClientConfig> {
        self.identity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// Signs a joining agent's CSR for its host name and the host (name or address) of the
    /// URL the server will call it at.
    pub fn sign_agent(
        &self,
        csr: &str,
        host: &str,
        agent_url: &str,
    ) -> Result<Issued, ServerError> {
        let url_host = url_host(agent_url);
        let (mut names, mut ips) = (vec![], vec![]);
        match url_host.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) if !url_host.is_empty() => names.push(url_host),
            Err(_) => {}
        }
        self.ca
            .sign_agent_csr(csr, host, &names, &ips, self.agent_validity)
            .map_err(|e| {
                ServerError::bad_request(
                    "csr-invalid",
                    format!("cannot sign the agent's certificate request: {e}"),
                    "run the same Ferry version on the agent and the server",
                )
            })
    }

    /// Renews the HTTPS certificate and the client identity when a third of their lifetime
    /// is left; connections from then on use the new ones.
    pub fn renew_if_due(&self, now: SystemTime) -> Result<(), ServerError> {
        let mut https = self.https_cert.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(current) = https.as_ref() {
            if current.needs_renewal(now) {
                let issued = self.ca.issue_server_cert(
                    &self.names,
                    &self.ips,
                    ferry_pki::SERVER_CERT_VALIDITY,
                )?;
                self.https.set(ferry_pki::tls::server_config(
                    &issued.chain_pem,
                    &issued.key_pem,
                )?);
                info!(serial = %issued.serial, "renewed the server's HTTPS certificate");
                *https = Some(issued);
            }
        }
        drop(https);
        let mut identity = self.identity.lock().unwrap_or_else(|p| p.into_inner());
        if identity.0.needs_renewal(now) {
            let issued = self
                .ca
                .issue_server_client_identity(ferry_pki::SERVER_CERT_VALIDITY)?;
            let tls = agents_tls(&self.ca, &issued, &self.revoked)?;
            info!(serial = %issued.serial, "renewed the server's client identity");
            *identity = (issued, tls);
        }
        Ok(())
    }
}

fn agents_tls(
    ca: &ClusterCa,
    identity: &Issued,
    revoked: &RevokedSerials,
) -> Result<Arc<rustls::ClientConfig>, ServerError> {
    Ok(ferry_pki::tls::agents_client_config(
        ca.ca_pem(),
        &identity.chain_pem,
        &identity.key_pem,
        revoked.clone(),
    )?)
}

/// The host part of `https://HOST:PORT/...` (brackets of an IPv6 address removed).
fn url_host(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or("");
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or("").to_string();
    }
    authority
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(authority)
        .to_string()
}

/// Renews the server's certificates until the server stops.
pub async fn run_renewal(pki: Arc<ServerPki>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RENEW_CHECK) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(e) = pki.renew_if_due(SystemTime::now()) {
            warn!(error = %e, "cannot renew the server's certificates");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::url_host;

    #[test]
    fn the_host_of_an_agent_url() {
        assert_eq!(url_host("https://10.0.0.5:7411"), "10.0.0.5");
        assert_eq!(url_host("https://hv1.example:7411/x"), "hv1.example");
        assert_eq!(url_host("https://[fd00::5]:7411"), "fd00::5");
        assert_eq!(url_host("hv1"), "hv1");
    }
}
