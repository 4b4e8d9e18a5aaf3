//! Version, machine types and CPU models (qapi/misc.json, qapi/machine.json,
//! qapi/machine-target.json): the host facts the agent reports for pre-flight checks.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::commands;

/// A QEMU version triple as QAPI sends it (`{"major": 7, "minor": 2, "micro": 22}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VersionTriple {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro (patch) version.
    pub micro: u32,
}

/// Reply of `query-version` and the `version` member of the greeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// Upstream version.
    pub qemu: VersionTriple,
    /// Distribution package string, e.g. `Debian 1:7.2+dfsg-7+deb12u18+b3`; may be empty.
    pub package: String,
}

/// QEMU's version flattened for easy comparison (`version.major >= 8`) and display.
/// Taken from the greeting, so it costs no round trip.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QemuVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro (patch) version.
    pub micro: u32,
    /// Distribution package string; may be empty.
    pub package: String,
}

impl QemuVersion {
    /// True when this QEMU is at least `major.minor`, to gate features by version.
    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

impl From<VersionInfo> for QemuVersion {
    fn from(v: VersionInfo) -> Self {
        QemuVersion {
            major: v.qemu.major,
            minor: v.qemu.minor,
            micro: v.qemu.micro,
            package: v.package,
        }
    }
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        if !self.package.is_empty() {
            write!(f, " ({})", self.package)?;
        }
        Ok(())
    }
}

/// `query-version`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryVersion;

/// How `query-cpu-model-expansion` expands a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuModelExpansionType {
    /// Expand to a migration-safe static base model plus property changes.
    Static,
    /// Expand to every property with its value: what we compare between hosts.
    Full,
}

/// A CPU model name plus property overrides (QAPI `CpuModelInfo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuModelInfo {
    /// Model name, e.g. `EPYC`, `Skylake-Server`, `host`, `base`.
    pub name: String,
    /// Properties (feature flags as bools, `family`, `model-id`, ...). Not sent when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub props: Option<Map<String, Value>>,
}

impl CpuModelInfo {
    /// A model by name without property overrides.
    pub fn named(name: impl Into<String>) -> Self {
        CpuModelInfo {
            name: name.into(),
            props: None,
        }
    }
}

/// `query-cpu-model-expansion`: what a CPU model means on this host (x86 has no
/// comparison/baseline commands, so compatibility is computed from expansions).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueryCpuModelExpansion {
    /// Expansion type, sent as `type`.
    #[serde(rename = "type")]
    pub type_: CpuModelExpansionType,
    /// The model to expand.
    pub model: CpuModelInfo,
}

impl QueryCpuModelExpansion {
    /// Expand the named model with the given expansion type.
    pub fn new(type_: CpuModelExpansionType, model: impl Into<String>) -> Self {
        QueryCpuModelExpansion {
            type_,
            model: CpuModelInfo::named(model),
        }
    }
}

/// Reply of `query-cpu-model-expansion`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuModelExpansionInfo {
    /// The expanded model.
    pub model: CpuModelInfo,
    /// Members this code does not model (e.g. `deprecated-props` in newer QEMU).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `query-machines`: machine types this QEMU supports (a destination must support the
/// source's versioned machine type, e.g. `pc-q35-7.2`).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryMachines;

/// One entry of `query-machines` (QAPI `MachineInfo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MachineInfo {
    /// Machine type name, e.g. `pc-q35-7.2`.
    pub name: String,
    /// Alias, e.g. `q35` for the newest q35 type.
    pub alias: Option<String>,
    /// Whether this is the default machine type.
    pub is_default: Option<bool>,
    /// Maximum number of vCPUs.
    pub cpu_max: u64,
    /// Whether vCPUs can be hot-plugged.
    pub hotpluggable_cpus: Option<bool>,
    /// Whether NUMA memory (`-numa node,mem=`) is supported.
    pub numa_mem_supported: Option<bool>,
    /// Whether the type is deprecated.
    pub deprecated: Option<bool>,
    /// Default CPU type (QOM type name).
    pub default_cpu_type: Option<String>,
    /// Default RAM backend id.
    pub default_ram_id: Option<String>,
    /// Members this code does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `object-add` of a `tls-creds-x509` object: the certificates QEMU reads from `dir` (its
/// fixed file names `ca-cert.pem`, `server-cert.pem`/`server-key.pem` or
/// `client-cert.pem`/`client-key.pem`) for a TLS stream (qapi/qom.json,
/// `TlsCredsX509Properties`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ObjectAddTlsCredsX509 {
    /// Always `tls-creds-x509`.
    pub qom_type: &'static str,
    /// The object's id, which `tls-creds` parameters name.
    pub id: String,
    /// The directory holding the PEM files.
    pub dir: String,
    /// `server` (accepts the stream) or `client` (opens it).
    pub endpoint: &'static str,
    /// Require and check the peer's certificate (QEMU's default only for clients).
    pub verify_peer: bool,
}

impl ObjectAddTlsCredsX509 {
    /// Credentials for the given endpoint (`server` or `client`) that always verify the peer.
    pub fn new(id: impl Into<String>, dir: impl Into<String>, endpoint: &'static str) -> Self {
        ObjectAddTlsCredsX509 {
            qom_type: "tls-creds-x509",
            id: id.into(),
            dir: dir.into(),
            endpoint,
            verify_peer: true,
        }
    }
}

/// `object-add` of an `authz-simple` object: exactly one identity (a TLS client's
/// distinguished name) is allowed (qapi/authz.json, `AuthZSimpleProperties`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ObjectAddAuthzSimple {
    /// Always `authz-simple`.
    pub qom_type: &'static str,
    /// The object's id, which `tls-authz` parameters name.
    pub id: String,
    /// The one identity allowed, e.g. `CN=ferry-migration-ID-source`.
    pub identity: String,
}

impl ObjectAddAuthzSimple {
    /// An authz object that allows `identity` only.
    pub fn new(id: impl Into<String>, identity: impl Into<String>) -> Self {
        ObjectAddAuthzSimple {
            qom_type: "authz-simple",
            id: id.into(),
            identity: identity.into(),
        }
    }
}

/// `object-del`: remove a user-created object (credentials outliving their migration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectDel {
    /// The object's id.
    pub id: String,
}

commands! {
    ObjectAddTlsCredsX509 => "object-add" -> ();
    ObjectAddAuthzSimple => "object-add" -> ();
    ObjectDel => "object-del" -> ();
    QueryVersion => "query-version" -> VersionInfo;
    QueryCpuModelExpansion => "query-cpu-model-expansion" -> CpuModelExpansionInfo;
    QueryMachines => "query-machines" -> Vec<MachineInfo>;
}
