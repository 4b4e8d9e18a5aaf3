//! The agent's configuration: a TOML file, with defaults for everything a lab or a small
//! host does not need to say.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ferry_migrate::PortRange;
use serde::{Deserialize, Serialize};

use crate::AgentError;

/// How one agent runs: who it is, where it listens, where it keeps state, and what the host
/// offers (datastores, networks, migration address). `Debug` leaves the tokens out.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Host name, e.g. "hv1"; what the server and operators call this host.
    pub name: String,
    /// Address of the agent API, e.g. 127.0.0.1:7411 (port 0 picks a free port).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where the server reaches the API; default `https://{listen}` (with the bound port).
    #[serde(default)]
    pub advertise_url: Option<String>,
    /// The control plane; `None` runs standalone (tests), which needs its certificate in
    /// `STATE/tls/` already.
    #[serde(default)]
    pub server_url: Option<String>,
    /// The cluster CA's certificate (the server's `pki/ca.pem`), to verify the server on join
    /// and heartbeat.
    #[serde(default)]
    pub server_ca: Option<PathBuf>,
    /// Instead of `server_ca`: the CA's (or the server certificate's) SHA-256 fingerprint as
    /// the server printed it (`sha256:AB:CD:...`).
    #[serde(default)]
    pub server_ca_fingerprint: Option<String>,
    /// The cluster's join token, used once to obtain the agent credential.
    #[serde(default)]
    pub join_token: Option<String>,
    /// A preset agent credential (standalone agents, tests); skips joining.
    #[serde(default)]
    pub credential: Option<String>,
    /// Instances, migration records and the credential live here.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Lab only: run QEMU and taps inside this network namespace.
    #[serde(default)]
    pub netns: Option<String>,
    /// Where this host receives migration streams.
    #[serde(default = "default_migration_addr")]
    pub migration_addr: IpAddr,
    /// Ports a destination may listen on, "first-last".
    #[serde(default = "default_migration_ports")]
    pub migration_ports: String,
    #[serde(default = "default_qemu_binary")]
    pub qemu_binary: PathBuf,
    /// UEFI firmware code (OVMF, read-only, shared by every guest); from Debian's `ovmf`.
    #[serde(default = "default_ovmf_code")]
    pub ovmf_code: PathBuf,
    /// The empty UEFI variable store copied for each new UEFI instance.
    #[serde(default = "default_ovmf_vars")]
    pub ovmf_vars: PathBuf,
    /// `auto`, `kvm` or `tcg`; the `FERRY_ACCEL` environment variable overrides it.
    #[serde(default = "default_accel")]
    pub accel: String,
    #[serde(default)]
    pub datastores: Vec<DatastoreConfig>,
    #[serde(default)]
    pub networks: Vec<NetworkConfig>,
    /// Interval between heartbeats to the server.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// RAM (MiB) kept for the host itself and never planned for guests; reported as
    /// `ram_reserve_mib` so the server subtracts it from the free RAM.
    #[serde(default = "default_reserve_mib")]
    pub reserve_mib: u64,
    /// Lab only: pretend the host has this much RAM (MiB). Reported as the total, and the free
    /// RAM becomes `min(real free, capacity - RAM of the guests running here)`, so lab hosts on
    /// one machine can be given honestly different sizes.
    #[serde(default)]
    pub ram_capacity_mib: Option<u64>,
    /// Lab only: CPU flags (cpuinfo spelling, e.g. `avx2`) left out of the reported flags, so a
    /// lab host can pretend to lack them.
    #[serde(default)]
    pub cpu_flags_mask: Vec<String>,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use ferry_api::redact::secret_field;
        f.debug_struct("AgentConfig")
            .field("name", &self.name)
            .field("listen", &self.listen)
            .field("advertise_url", &self.advertise_url)
            .field("server_url", &self.server_url)
            .field("join_token", &secret_field(&self.join_token))
            .field("credential", &secret_field(&self.credential))
            .field("state_dir", &self.state_dir)
            .field("netns", &self.netns)
            .field("migration_addr", &self.migration_addr)
            .finish_non_exhaustive()
    }
}

/// A storage location guests' files live in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatastoreConfig {
    pub name: String,
    pub path: PathBuf,
    /// The datastore's identity when it has no `.ferry-datastore-id` file but is known to
    /// be one storage for several hosts: the hosts of a lab that share one machine's
    /// directory. The file, when present, wins.
    #[serde(default)]
    pub identity: Option<String>,
}

/// A fleet network and the host bridge that carries it here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    pub name: String,
    pub bridge: String,
    #[serde(default)]
    pub subnet: Option<String>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7411))
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/ferry/agent")
}
fn default_migration_addr() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}
fn default_migration_ports() -> String {
    "49152-49215".into()
}
fn default_qemu_binary() -> PathBuf {
    PathBuf::from("qemu-system-x86_64")
}
fn default_ovmf_code() -> PathBuf {
    PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.fd")
}
fn default_ovmf_vars() -> PathBuf {
    PathBuf::from("/usr/share/OVMF/OVMF_VARS_4M.fd")
}
fn default_accel() -> String {
    "auto".into()
}
fn default_heartbeat_ms() -> u64 {
    2000
}
fn default_reserve_mib() -> u64 {
    2048
}

impl AgentConfig {
    /// Reads and checks a TOML configuration file; errors name the file and the field.
    pub fn from_toml_file(path: &Path) -> Result<Self, AgentError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| AgentError::Config {
            file: file.clone(),
            message: format!("cannot read: {e}"),
        })?;
        Self::from_toml_str(&text, &file)
    }

    /// Parses TOML text; `file` names its origin in errors.
    pub fn from_toml_str(text: &str, file: &str) -> Result<Self, AgentError> {
        let config: AgentConfig = toml::from_str(text).map_err(|e| AgentError::Config {
            file: file.to_string(),
            message: ferry_api::redact::config_error(e.message(), e.span(), text),
        })?;
        config.validate(file)?;
        Ok(config)
    }

    /// Checks what serde cannot: value ranges and combinations. `origin` names the file (or
    /// "config" for a value built in code).
    pub fn validate(&self, origin: &str) -> Result<(), AgentError> {
        let bad = |field: &str, message: String| AgentError::Config {
            file: origin.to_string(),
            message: format!("field `{field}`: {message}"),
        };
        if self.name.trim().is_empty() {
            return Err(bad("name", "must not be empty".into()));
        }
        self.port_range()
            .map_err(|e| bad("migration_ports", e.to_string()))?;
        crate::facts::parse_accel_choice(&self.accel).map_err(|e| bad("accel", e.to_string()))?;
        if self.heartbeat_ms < 100 {
            return Err(bad(
                "heartbeat_ms",
                format!("{} ms is below 100 ms", self.heartbeat_ms),
            ));
        }
        if let Some(url) = &self.server_url {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(bad(
                    "server_url",
                    format!("'{url}' does not start with https:// (or http:// for a lab)"),
                ));
            }
            if url.starts_with("https://")
                && self.server_ca.is_none()
                && self.server_ca_fingerprint.is_none()
            {
                return Err(bad(
                    "server_ca",
                    "give `server_ca` (the server's pki/ca.pem) or `server_ca_fingerprint` \
                     (as the server printed it), so the agent can verify the server"
                        .into(),
                ));
            }
        }
        if let Some(pin) = &self.server_ca_fingerprint {
            ferry_pki::parse_fingerprint(pin)
                .map_err(|e| bad("server_ca_fingerprint", e.to_string()))?;
        }
        for n in &self.networks {
            if n.bridge.is_empty() || n.bridge.len() > 15 || n.bridge.contains('/') {
                return Err(bad(
                    "networks.bridge",
                    format!("'{}' is not an interface name", n.bridge),
                ));
            }
        }
        Ok(())
    }

    /// The migration port range.
    pub fn port_range(&self) -> Result<PortRange, ferry_migrate::MigrateError> {
        self.migration_ports.parse()
    }

    /// The network named `name`, if this host carries it.
    pub fn network(&self, name: &str) -> Option<&NetworkConfig> {
        self.networks.iter().find(|n| n.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_file_gets_defaults() {
        let c = AgentConfig::from_toml_str(
            "name = \"hv1\"\nserver_url = \"https://10.0.0.1:7400\"\nserver_ca = \"/etc/ferry/ca.pem\"\njoin_token = \"t\"\n",
            "agent.toml",
        )
        .unwrap();
        assert_eq!(c.listen, default_listen());
        assert_eq!(c.heartbeat_ms, 2000);
        assert_eq!(c.accel, "auto");
        assert_eq!(c.migration_ports, "49152-49215");
        assert!(c.networks.is_empty());
        assert_eq!(c.reserve_mib, 2048);
        assert_eq!(c.ram_capacity_mib, None);
        assert!(c.cpu_flags_mask.is_empty());
    }

    #[test]
    fn full_file_parses() {
        let c = AgentConfig::from_toml_str(
            r#"
name = "hv2"
listen = "0.0.0.0:7411"
credential = "secret"
state_dir = "/tmp/x"
netns = "ferry-lab-hv2"
migration_addr = "10.78.0.12"
migration_ports = "5000-5010"
accel = "tcg"
heartbeat_ms = 500
reserve_mib = 512
ram_capacity_mib = 4096
cpu_flags_mask = ["avx2", "avx512f"]
[[datastores]]
name = "local"
path = "/srv/ferry"
[[networks]]
name = "lab"
bridge = "br0"
subnet = "10.77.0.0/24"
"#,
            "agent.toml",
        )
        .unwrap();
        assert_eq!(c.netns.as_deref(), Some("ferry-lab-hv2"));
        assert_eq!(c.port_range().unwrap().last, 5010);
        assert_eq!(c.network("lab").unwrap().bridge, "br0");
        assert_eq!(c.datastores[0].path, PathBuf::from("/srv/ferry"));
        assert_eq!(c.reserve_mib, 512);
        assert_eq!(c.ram_capacity_mib, Some(4096));
        assert_eq!(c.cpu_flags_mask, ["avx2", "avx512f"]);
    }

    #[test]
    fn bad_files_name_the_file_and_field() {
        let cases = [
            ("listen = \"x\"\nname = \"a\"\ncredential = \"c\"", "listen"),
            (
                "name = \"a\"\ncredential = \"c\"\nmigration_ports = \"9-1\"",
                "migration_ports",
            ),
            ("name = \"a\"\ncredential = \"c\"\naccel = \"hvf\"", "accel"),
            (
                "name = \"a\"\nserver_url = \"https://s:7400\"\njoin_token = \"t\"",
                "server_ca",
            ),
            (
                "name = \"a\"\nserver_url = \"https://s:7400\"\nserver_ca_fingerprint = \"x\"",
                "server_ca_fingerprint",
            ),
            ("name = \"a\"\ncredential = \"c\"\ntypo = 1", "typo"),
            ("credential = \"c\"", "name"),
            (
                "name = \"a\"\ncredential = \"c\"\nheartbeat_ms = 1",
                "heartbeat_ms",
            ),
        ];
        for (text, field) in cases {
            let err = AgentConfig::from_toml_str(text, "/etc/ferry/agent.toml").unwrap_err();
            let msg = err.to_string();
            assert_eq!(err.code(), "agent-config-invalid");
            assert!(msg.contains("/etc/ferry/agent.toml"), "{msg}");
            assert!(msg.contains(field), "{field} not in {msg}");
        }
    }

    #[test]
    fn missing_file_is_a_config_error() {
        let err = AgentConfig::from_toml_file(Path::new("/nonexistent/agent.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/agent.toml"));
    }
}
