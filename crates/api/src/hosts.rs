//! Hosts and what their agents report about them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Facts an agent measures on its host and reports with every heartbeat: what the pre-flight
/// checks and the destination ranking are computed from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostFacts {
    pub name: String,
    pub cpu_vendor: String,
    pub cpu_model: String,
    pub cpu_flags: Vec<String>,
    pub cores: u32,
    pub ram_total_mib: u64,
    pub ram_free_mib: u64,
    /// RAM the host keeps for itself; a destination needs instance RAM plus this free.
    #[serde(default)]
    pub ram_reserve_mib: u64,
    /// `kvm` or `tcg`: what this host's guests run with.
    pub accel: String,
    pub qemu_version: String,
    pub machine_types: Vec<String>,
    /// Firmware this host can boot (`bios` always; `uefi` when OVMF is installed).
    #[serde(default)]
    pub firmware: Vec<String>,
    pub datastores: Vec<DatastoreFacts>,
    pub networks: Vec<NetworkFacts>,
    /// Where this host receives migration streams.
    pub migration_addr: String,
    pub migration_ports: String,
    pub agent_version: String,
}

/// A storage location for disks and images, as seen from one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DatastoreFacts {
    pub name: String,
    pub path: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// Content of the datastore's identity file: equal on two hosts means the same shared
    /// storage, not merely the same path.
    pub identity: Option<String>,
}

/// A network a host can attach guests to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkFacts {
    pub name: String,
    pub bridge: String,
    pub subnet: Option<String>,
}

/// A host's networks for an error message, `lab (bridge br0), prod (bridge br1)`, or `none`:
/// whoever misspelt a network name needs the right ones, and the bridges tell which agent
/// configuration to look at. Server and agents word it the same way.
pub fn networks_list<'a>(networks: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let names: Vec<String> = networks
        .into_iter()
        .map(|(name, bridge)| format!("{name} (bridge {bridge})"))
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// Whether the server hears from a host's agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    Online,
    /// No heartbeat for longer than the server's timeout.
    Offline,
}

/// A host as the server knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Host {
    pub name: String,
    /// The agent's API address.
    pub agent_url: String,
    /// Disabled hosts receive no new instances or migrations.
    pub enabled: bool,
    pub state: HostState,
    pub last_heartbeat: Option<DateTime<Utc>>,
    pub facts: Option<HostFacts>,
    pub instances: u32,
}

/// A datastore across the fleet: one storage, and the hosts that mount it. Hosts reporting
/// the same identity share it; one without an identity file is local to its host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Datastore {
    pub name: String,
    pub identity: Option<String>,
    /// Mounted by more than one host, so a guest's disks on it need not be copied when it
    /// moves between them.
    pub shared: bool,
    /// Space as the most recently reporting host measured it.
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub mounts: Vec<DatastoreMount>,
    /// Set when hosts disagree about the storage, e.g. one identity under two names: disks
    /// name datastores, so a shared datastore must have one name on every host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Where one host mounts a datastore.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DatastoreMount {
    pub host: String,
    pub path: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// A network across the fleet: which hosts attach to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Network {
    pub name: String,
    pub subnet: Option<String>,
    pub host_names: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_are_listed_with_their_bridges() {
        assert_eq!(networks_list([]), "none");
        assert_eq!(
            networks_list([("lab", "br0"), ("prod", "br1")]),
            "lab (bridge br0), prod (bridge br1)"
        );
    }
}
