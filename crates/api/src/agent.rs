//! The agent API: what the server asks of each host's agent, and what agents tell the server.
//!
//! Agent endpoints (all under the agent's URL, bearer = the agent's credential):
//! - `GET  /v1/facts` -> [`crate::hosts::HostFacts`]
//! - `GET  /v1/instances` -> `Vec<AgentInstance>`
//! - `PUT  /v1/instances/{id}` [`DefineInstance`] -> [`AgentInstance`] (idempotent)
//! - `POST /v1/instances/{id}/start` | `/stop` -> [`AgentInstance`]
//! - `POST /v1/instances/{id}/fence` -> [`AgentInstance`] (pause a copy that another host runs)
//! - `DELETE /v1/instances/{id}` -> `()` (refused while running)
//! - `POST /v1/migrations/{mid}/incoming` [`PrepareIncoming`] -> [`IncomingReady`]
//! - `DELETE /v1/migrations/{mid}/incoming` -> `()` (refused once the guest runs there)
//! - `POST /v1/migrations/{mid}/confirm` -> [`AgentInstance`] (destination: the whole guest
//!   arrived; QEMU keeps it paused until `/start`)
//! - `POST /v1/migrations/{mid}/start` -> [`AgentInstance`] (destination: the server committed
//!   the guest here; run it)
//! - `POST /v1/migrations/{mid}/source` [`StartSource`] -> [`SourceStatus`]
//! - `GET  /v1/migrations/{mid}?after=SEQ[&wait_ms=MS]` -> [`SourceStatus`] (with `wait_ms`,
//!   answers as soon as there is news, or after that long)
//! - `POST /v1/migrations/{mid}/cancel[?wait=false]` -> [`SourceStatus`] (409
//!   `too-late-to-cancel` once the source switched over)
//! - `POST /v1/migrations/{mid}/finish` -> `()` (source: stop the handed-over QEMU)
//! - `POST /v1/migrations/{mid}/resume[?destination_gone=true]` -> [`AgentInstance`] (source:
//!   make sure it runs; a handed-over source only with `destination_gone`)
//! - `POST /v1/migrations/{mid}/params` [`SetSourceParams`] -> `()` (source: change bandwidth
//!   and downtime target of the running stream)
//! - `POST /v1/migrations/{mid}/postcopy` -> `()` (source: switch to post-copy now)
//! - `POST /v1/instances/{id}/dirty-rate` -> [`DirtyRate`] (measured over one second)
//! - `POST /v1/disks` [`PrepareDisk`] -> [`PreparedDisk`] (create, copy or inspect one image
//!   on a datastore of this host; nothing is left behind when it fails; refusals:
//!   `unknown-datastore`, `datastore-unavailable`, `no-datastore`, `no-room`, `disk-exists`,
//!   `path-outside-datastores`, `image-not-found`, `image-unreadable`, `format-mismatch`,
//!   `unsupported-format`, `wrong-datastore`, `uefi-unavailable`, `disk-in-use` (a copy
//!   source a QEMU writes to))
//! - `POST /v1/disks/delete` [`ImageRef`] -> `()` (the server sends only images Ferry created;
//!   409 `disk-in-use` while an instance on this host names the image; a missing file is
//!   success, so a delete can be retried)
//! - `POST /v1/probe/listen`, `POST /v1/probe/connect`, `GET /v1/cpu-models/{model}`: the
//!   agent's part of the pre-flight checks, see [`crate::checks`]
//!
//! Server endpoints for agents (bearer = join token for join, then the agent credential):
//! - `POST /v1/agents/join` [`JoinRequest`] -> [`JoinResponse`]
//! - `POST /v1/agents/heartbeat` [`Heartbeat`] -> `()`

use ferry_migrate::{Decision, MigrationParams, Progress, SourceOutcome};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::hosts::HostFacts;
use crate::instances::{
    BackingRef, DiskFormat, GuestInfo, ImageRef, InstanceSpec, InstanceState, StopMethod,
};
use crate::ErrorBody;

/// An agent introduces itself with the cluster's join token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    pub join_token: String,
    pub name: String,
    /// Where the server reaches this agent's API.
    pub agent_url: String,
    pub facts: HostFacts,
}

/// The agent's own credential, used both ways from then on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinResponse {
    pub agent_token: String,
}

/// Sent every few seconds; the server marks a silent host offline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    pub name: String,
    pub facts: HostFacts,
    pub instances: Vec<AgentInstance>,
}

/// `PUT /v1/instances/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DefineInstance {
    pub name: String,
    pub spec: InstanceSpec,
}

/// An instance as one agent sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentInstance {
    pub id: Uuid,
    pub name: String,
    pub state: InstanceState,
    /// QEMU's run state (`running`, `paused`, `inmigrate`, `postmigrate`, ...), if a process
    /// exists.
    pub qemu_state: Option<String>,
    pub pid: Option<i32>,
    /// Set while this host is the destination of a migration that has not been confirmed.
    pub incoming: Option<Uuid>,
    /// What the guest's agent last said, when the guest runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestInfo>,
    /// How the instance went down, in the answer to a stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_by: Option<StopMethod>,
}

/// `POST /v1/migrations/{mid}/incoming`: start the instance in incoming mode here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrepareIncoming {
    pub instance_id: Uuid,
    pub name: String,
    pub spec: InstanceSpec,
    pub params: MigrationParams,
}

/// Where the destination listens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingReady {
    pub addr: String,
}

/// `POST /v1/migrations/{mid}/source`: start migrating this host's instance to `destination`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartSource {
    pub instance_id: Uuid,
    pub destination: String,
    pub params: MigrationParams,
}

/// `POST /v1/migrations/{mid}/reconnect` on the source agent: resume a broken post-copy
/// stream to where the destination listens again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReconnectSource {
    pub destination: String,
}

/// The source half's state as the source agent knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceState {
    Running,
    Completed,
    Failed,
    Cancelled,
    /// The post-copy stream broke: both QEMUs hold the guest paused until the destination
    /// listens again (`/recover`) and the source reconnects (`/reconnect`).
    PostcopyPaused,
    /// The agent has no record of this migration.
    Unknown,
}

/// Progress of the source half since a sequence number, and its end.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceStatus {
    pub state: SourceState,
    /// The source let QEMU switch over (or start post-copy): cancels are refused from now.
    #[serde(default)]
    pub switched_over: bool,
    /// `(seq, sample)`, in order, after the `after` the caller gave.
    pub samples: Vec<(u64, Progress)>,
    /// `(seq, decision)` of the convergence controller, numbered with the samples.
    #[serde(default)]
    pub decisions: Vec<(u64, Decision)>,
    pub outcome: Option<SourceOutcome>,
    pub error: Option<ErrorBody>,
}

/// `POST /v1/migrations/{mid}/params`: new pacing for a running source; absent fields stay.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetSourceParams {
    pub bandwidth: Option<ferry_migrate::Bandwidth>,
    pub downtime_limit_ms: Option<u64>,
}

/// `POST /v1/instances/{id}/dirty-rate`: distinct bytes dirtied per second, QEMU's estimate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DirtyRate {
    pub dirty_rate_bps: f64,
    pub period_ms: u64,
}

/// `POST /v1/disks`: one disk image for an instance being created on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareDisk {
    /// The instance's name and the disk's id name a new file: `NAME-ID.FORMAT`.
    pub instance: String,
    pub id: String,
    /// Where a new or copied image goes; the agent picks the datastore with the most free
    /// room (shared ones first) when absent.
    #[serde(default)]
    pub datastore: Option<String>,
    pub source: DiskSource,
}

/// Where a disk's content comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DiskSource {
    /// A new image: empty, or a qcow2 overlay on `backing` (an absolute path inside a
    /// datastore). `size_bytes` may be absent only for an overlay (the base's size).
    New {
        #[serde(default)]
        size_bytes: Option<u64>,
        format: DiskFormat,
        #[serde(default)]
        backing: Option<String>,
    },
    /// An existing image (an absolute path inside a datastore) used in place, never deleted
    /// by Ferry. `format`, when given, must be what `qemu-img info` finds.
    Existing {
        path: String,
        #[serde(default)]
        format: Option<DiskFormat>,
    },
    /// An existing image (an absolute path inside a datastore) copied onto the datastore,
    /// its backing chain flattened; the copy is Ferry's. `format` is the copy's format
    /// (default: the source's when qcow2 or raw, else qcow2).
    Copy {
        path: String,
        #[serde(default)]
        format: Option<DiskFormat>,
    },
    /// A fresh UEFI variable store from this host's OVMF template, as `NAME-VARS.fd` (raw;
    /// the request's `id` is not used).
    UefiVars,
}

/// The image as it now exists on the datastore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedDisk {
    pub image: ImageRef,
    pub format: DiskFormat,
    /// Virtual size.
    pub size_bytes: u64,
    /// Bytes the image takes on the datastore now.
    pub allocated_bytes: u64,
    pub backing: Option<BackingRef>,
    /// Whether the agent created the file (and so Ferry owns it).
    pub created: bool,
}
