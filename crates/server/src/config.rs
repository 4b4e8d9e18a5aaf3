//! `ferry server --config FILE`: a TOML file, every field but the tokens with a default.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ServerError;

/// How many migrations may run at once, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Outgoing migrations per source host.
    pub per_host_outbound: u32,
    /// Incoming migrations per destination host.
    pub per_host_inbound: u32,
    /// Migrations in the whole cluster.
    pub cluster: u32,
}

impl Default for Limits {
    /// Two each way per host and five in all: a migration saturates a host's link, and more
    /// in parallel only makes each slower and less likely to converge.
    fn default() -> Self {
        Limits {
            per_host_outbound: 2,
            per_host_inbound: 2,
            cluster: 5,
        }
    }
}

/// Which QEMU versions may receive a stream from which.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QemuVersionRule {
    /// The destination runs the same or a newer major.minor (QEMU loads older streams).
    #[default]
    SameOrNewer,
    /// Exactly the same major.minor on both sides.
    SameMinor,
    /// No version check (the operator knows the versions are compatible).
    Any,
}

/// Settings of the pre-flight checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Preflight {
    pub qemu_version_rule: QemuVersionRule,
    /// How long the connectivity probe pushes data to estimate bandwidth; 0 turns the
    /// bandwidth probe off (the TCP connect and latency are always checked).
    pub bandwidth_probe_ms: u64,
    /// How long a probe's result between two hosts is reused. Probes open a listener on the
    /// destination and push bulk data; any token (readers too) may ask for candidates,
    /// so without reuse a burst of requests would be a burst of probes.
    pub probe_cache_s: u64,
    /// How long a measured bandwidth between two hosts is reused. Within it a probe only
    /// connects (a few milliseconds) instead of pushing data for `bandwidth_probe_ms`, so a
    /// migration starts at once; links change slowly. A pair that has completed a migration
    /// (it has a learned send rate, which the plan goes by) reuses its last stored
    /// measurement whatever its age.
    pub link_cache_s: u64,
}

impl Default for Preflight {
    fn default() -> Self {
        Preflight {
            qemu_version_rule: QemuVersionRule::SameOrNewer,
            bandwidth_probe_ms: 300,
            probe_cache_s: 15,
            link_cache_s: 600,
        }
    }
}

/// HTTPS: what the server's certificate names, and the operator's own CA or certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Host names agents and CLIs reach the server by, added to its certificate (with
    /// `localhost`).
    pub names: Vec<String>,
    /// Addresses added to the certificate (with 127.0.0.1 and the `listen` address).
    pub addresses: Vec<IpAddr>,
    /// The operator's own CA certificate (PEM), which signs instead of a CA the server makes;
    /// needs `ca_key`.
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    /// The operator's own certificate chain for the API (PEM), served as is instead of one
    /// the cluster CA issues; needs `key`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Serve the API over plain HTTP. For a test lab only: tokens then cross the network in
    /// the clear. Agents' APIs keep mutual TLS.
    pub plain_http_for_labs: bool,
    /// How long an agent's certificate lasts (days).
    #[serde(default = "default_agent_cert_days")]
    pub agent_cert_days: u32,
}

fn default_agent_cert_days() -> u32 {
    90
}

impl Default for TlsConfig {
    /// HTTPS with a certificate from the server's own CA; agents' certificates last 90 days.
    fn default() -> Self {
        TlsConfig {
            names: vec![],
            addresses: vec![],
            ca_cert: None,
            ca_key: None,
            cert: None,
            key: None,
            plain_http_for_labs: false,
            agent_cert_days: default_agent_cert_days(),
        }
    }
}

/// The server's configuration. `Debug` leaves the tokens out.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Where the REST API listens.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The SQLite database file.
    pub database: PathBuf,
    /// An admin API token accepted from the first start on (stored hashed). Without it the
    /// server creates one and writes it to `admin.token` next to the database.
    pub admin_token: Option<String>,
    /// The token agents present to join.
    pub join_token: String,
    /// A host without a heartbeat for this long is offline.
    #[serde(default = "default_heartbeat_timeout")]
    pub heartbeat_timeout_s: u64,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub preflight: Preflight,
    /// How often the server polls a source agent for progress.
    #[serde(default = "default_poll_ms")]
    pub progress_poll_ms: u64,
    /// A completed cold migration keeps the source's copies of the disks it copied, so that
    /// nothing is lost if the destination's copy turns out bad ("data preserved on both ends
    /// until cleanup"). After this many seconds the server removes them by itself; 0 (the
    /// default) keeps them until `ferry migration cleanup ID`.
    #[serde(default)]
    pub cold_cleanup_after_s: u64,
    #[serde(default)]
    pub tls: TlsConfig,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use ferry_api::redact::secret_field;
        f.debug_struct("ServerConfig")
            .field("listen", &self.listen)
            .field("database", &self.database)
            .field("admin_token", &secret_field(&self.admin_token))
            .field("join_token", &"<redacted>")
            .field("heartbeat_timeout_s", &self.heartbeat_timeout_s)
            .field("limits", &self.limits)
            .field("preflight", &self.preflight)
            .finish_non_exhaustive()
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7400))
}
fn default_heartbeat_timeout() -> u64 {
    10
}
fn default_poll_ms() -> u64 {
    250
}

impl ServerConfig {
    /// Reads and checks a config file; errors name the file and the problem.
    pub fn from_toml_file(path: &Path) -> Result<ServerConfig, ServerError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ServerError::config(format!("cannot read {}: {e}", path.display())))?;
        let config: ServerConfig = toml::from_str(&text).map_err(|e: toml::de::Error| {
            let message = ferry_api::redact::config_error(e.message(), e.span(), &text);
            ServerError::config(format!("{}: {message}", path.display()))
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ServerError> {
        if self.join_token.len() < 16 {
            return Err(ServerError::config(
                "join_token must be at least 16 characters".into(),
            ));
        }
        if self.admin_token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(ServerError::config(
                "admin_token must be at least 16 characters".into(),
            ));
        }
        let l = self.limits;
        if l.per_host_inbound == 0 || l.per_host_outbound == 0 || l.cluster == 0 {
            return Err(ServerError::config("limits must be at least 1".into()));
        }
        if self.preflight.bandwidth_probe_ms > 2000 {
            return Err(ServerError::config(
                "preflight.bandwidth_probe_ms must be at most 2000".into(),
            ));
        }
        if !(1..=3600).contains(&self.preflight.probe_cache_s) {
            return Err(ServerError::config(
                "preflight.probe_cache_s must be between 1 and 3600 (probes are always reused for a while)"
                    .into(),
            ));
        }
        if !(1..=86400).contains(&self.preflight.link_cache_s) {
            return Err(ServerError::config(
                "preflight.link_cache_s must be between 1 and 86400".into(),
            ));
        }
        if self.tls.ca_cert.is_some() != self.tls.ca_key.is_some() {
            return Err(ServerError::config(
                "tls.ca_cert and tls.ca_key go together (the operator's own CA)".into(),
            ));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(ServerError::config(
                "tls.cert and tls.key go together (the operator's own certificate)".into(),
            ));
        }
        if !(1..=3650).contains(&self.tls.agent_cert_days) {
            return Err(ServerError::config(
                "tls.agent_cert_days must be between 1 and 3650".into(),
            ));
        }
        if !(50..=1000).contains(&self.progress_poll_ms) {
            return Err(ServerError::config(
                "progress_poll_ms must be between 50 and 1000".into(),
            ));
        }
        Ok(())
    }

    /// The directory of the cluster CA and the migration CA (`pki/` next to the database).
    pub fn pki_dir(&self) -> PathBuf {
        self.database.parent().unwrap_or(Path::new(".")).join("pki")
    }

    /// The file an auto-created admin token is written to.
    pub fn admin_token_file(&self) -> PathBuf {
        self.database
            .parent()
            .unwrap_or(Path::new("."))
            .join("admin.token")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_takes_defaults() {
        let c: ServerConfig =
            toml::from_str("database = \"/tmp/f.db\"\njoin_token = \"0123456789abcdef\"").unwrap();
        c.validate().unwrap();
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.listen.port(), 7400);
        assert_eq!(
            c.cold_cleanup_after_s, 0,
            "source copies stay until cleanup"
        );
        let timed: ServerConfig = toml::from_str(
            "database = \"/tmp/f.db\"\njoin_token = \"0123456789abcdef\"\ncold_cleanup_after_s = 86400",
        )
        .unwrap();
        assert_eq!(timed.cold_cleanup_after_s, 86400);
        assert!(!c.tls.plain_http_for_labs, "HTTPS unless told otherwise");
        assert_eq!(c.tls.agent_cert_days, 90);
    }

    #[test]
    fn tls_settings_parse_and_pairs_are_checked() {
        let c: ServerConfig = toml::from_str(
            "database = \"/tmp/f.db\"\njoin_token = \"0123456789abcdef\"\n[tls]\nnames = [\"ferry.example\"]\naddresses = [\"10.0.0.1\"]\nplain_http_for_labs = true",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.tls.names, ["ferry.example"]);
        assert!(c.tls.plain_http_for_labs);
        assert_eq!(c.pki_dir(), PathBuf::from("/tmp/pki"));
        let mut half = c.clone();
        half.tls.ca_cert = Some("/etc/ca.pem".into());
        assert!(half.validate().unwrap_err().to_string().contains("ca_key"));
    }

    #[test]
    fn preflight_settings_parse_and_are_checked() {
        let c: ServerConfig = toml::from_str(
            "database = \"/tmp/f.db\"\njoin_token = \"0123456789abcdef\"\n[preflight]\nqemu_version_rule = \"same_minor\"\nbandwidth_probe_ms = 0",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.preflight.qemu_version_rule, QemuVersionRule::SameMinor);
        assert_eq!(c.preflight.bandwidth_probe_ms, 0);
        let mut slow = c.clone();
        slow.preflight.bandwidth_probe_ms = 5000;
        assert!(slow
            .validate()
            .unwrap_err()
            .to_string()
            .contains("bandwidth_probe_ms"));
        assert!(toml::from_str::<ServerConfig>(
            "database = \"/tmp/f.db\"\njoin_token = \"0123456789abcdef\"\n[preflight]\nqemu_version_rule = \"newest\"",
        )
        .is_err());
    }

    #[test]
    fn bad_configs_are_named() {
        let short: ServerConfig =
            toml::from_str("database = \"/tmp/f.db\"\njoin_token = \"short\"").unwrap();
        assert!(short
            .validate()
            .unwrap_err()
            .to_string()
            .contains("join_token"));
        let unknown = toml::from_str::<ServerConfig>(
            "database = \"/tmp/f.db\"\njoin_token = \"0123456789abcdef\"\nlisten_port = 3",
        );
        assert!(unknown.unwrap_err().to_string().contains("listen_port"));
    }
}
