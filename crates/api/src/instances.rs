//! Instances: virtual machines the fleet runs.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// What a VM is, independent of where it runs; the agent turns it into a QEMU command line.
/// This and the other request types refuse unknown fields: a misspelt field must be an error,
/// not a silently applied default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    pub memory_mib: u32,
    #[serde(default = "one")]
    pub vcpus: u32,
    #[serde(default = "default_cpu_model")]
    pub cpu_model: String,
    #[serde(default = "default_machine")]
    pub machine: String,
    pub boot: BootSpec,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
}

fn one() -> u32 {
    1
}
fn default_cpu_model() -> String {
    "qemu64".into()
}
fn default_machine() -> String {
    "pc".into()
}

/// Direct kernel boot from files every host can read (a shared datastore or an image cache).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BootSpec {
    pub kernel: String,
    pub initrd: String,
    #[serde(default)]
    pub cmdline: String,
}

/// A NIC on one of the fleet's networks. The MAC stays with the instance across migrations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    pub network: String,
    pub mac: String,
}

/// `POST /v1/instances`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInstance {
    pub name: String,
    /// Host to define it on; default: the enabled online host with the most free RAM.
    pub host: Option<String>,
    pub spec: InstanceSpec,
    /// Start it right away.
    #[serde(default)]
    pub start: bool,
}

/// What an instance is doing, as far as the server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Stopped,
    Running,
    /// QEMU holds the guest but does not run it: an incoming copy waiting for its commit, a
    /// handed-over source, a copy fenced because another host runs the guest.
    Paused,
    /// QEMU ended by itself with an error, or the guest panicked: not a stop anyone asked for.
    Crashed,
    /// QEMU is in a state Ferry does not expect.
    Error,
    /// The host's agent has not reported it recently.
    Unknown,
}

impl InstanceState {
    pub const ALL: [InstanceState; 6] = [
        InstanceState::Stopped,
        InstanceState::Running,
        InstanceState::Paused,
        InstanceState::Crashed,
        InstanceState::Error,
        InstanceState::Unknown,
    ];

    /// The name in JSON, in the store and in the CLI's tables.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Stopped => "stopped",
            InstanceState::Running => "running",
            InstanceState::Paused => "paused",
            InstanceState::Crashed => "crashed",
            InstanceState::Error => "error",
            InstanceState::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<InstanceState> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// An instance and where it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Instance {
    pub id: Uuid,
    pub name: String,
    /// The one host it runs on or is defined on.
    pub host: String,
    pub state: InstanceState,
    /// Incremented every time the instance moves; lets a caller detect a move it missed.
    pub generation: u64,
    pub spec: InstanceSpec,
    /// The migration in flight, if any.
    pub migration: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}
