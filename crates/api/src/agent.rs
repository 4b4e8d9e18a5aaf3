//! The agent API: what the server asks of each host's agent, and what agents tell the server.
//!
//! Agent endpoints (all under the agent's URL, bearer = the agent's credential):
//! - `GET  /v1/facts` -> [`crate::hosts::HostFacts`]
//! - `GET  /v1/instances` -> `Vec<AgentInstance>`
//! - `PUT  /v1/instances/{id}` [`DefineInstance`] -> [`AgentInstance`] (idempotent)
//! - `POST /v1/instances/{id}/start` | `/stop` -> [`AgentInstance`]
//! - `POST /v1/instances/{id}/fence` -> [`AgentInstance`] (pause a copy that another host runs)
//! - `GET  /v1/instances/{id}/console[?bytes=N]` -> `Vec<ConsoleSegment>` (the guest's serial
//!   output on this host, one segment per QEMU process, oldest first, the newest N bytes of
//!   them together; also after the instance left this host)
//! - `DELETE /v1/instances/{id}/console` -> `()` (forget that output; 409 while it runs here)
//! - `GET  /v1/instances/{id}/migration-settings` -> [`ferry_migrate::QemuSettings`] (the
//!   migration capabilities and parameters its QEMU has now; 409 `source-not-running` without
//!   one)
//! - `DELETE /v1/instances/{id}` -> `()` (refused while running)
//! - `POST /v1/migrations/{mid}/incoming` [`PrepareIncoming`] -> [`IncomingReady`] (with
//!   `disks`: creates the block migration's images first and exports them over NBD;
//!   refusals `disk-exists`, `image-in-use`, `no-room`)
//! - `DELETE /v1/migrations/{mid}/incoming` -> `()` (refused once the guest runs there; removes
//!   the images a block migration made here)
//! - `POST /v1/migrations/{mid}/confirm` -> [`AgentInstance`] (destination: the whole guest
//!   arrived; QEMU keeps it paused until `/start`)
//! - `POST /v1/migrations/{mid}/start` -> [`AgentInstance`] (destination: the server committed
//!   the guest here; run it)
//! - `POST /v1/migrations/{mid}/source` [`StartSource`] -> [`SourceStatus`] (with `disks`:
//!   mirrors them into the destination's exports before the memory moves)
//! - `incoming`, `incoming/launch` and `source` take an optional `tls`: that half's
//!   per-migration credentials ([`ferry_migrate::TlsCredentials`]); every stream of the
//!   migration (memory, multifd, post-copy recovery, NBD) then runs over TLS, and the files
//!   are removed when the half ends; the cold copy's `receive` and `send` take one too (the
//!   NBD export and `qemu-img` then copy over TLS)
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
//! - `POST /v1/disks/measure` [`MeasureImage`] -> [`ImageMeasure`] (virtual size and the room
//!   a copy of it needs; for the pre-flight check of a cold migration)
//! - `POST /v1/disks/checksum` [`ChecksumImage`] -> [`ChecksumStatus`] (SHA-256 of the
//!   guest-visible content; starts the work, or joins it when it runs, and answers when done
//!   or after `wait_ms`: repeat until `done`)
//! - Cold migration copies, one per disk (`{disk}` is the disk id, or `nvram`):
//!   - `POST /v1/copies/{mid}/{disk}/receive` [`ReceiveCopy`] -> [`CopyReceiving`]
//!     (destination: create the empty image and export it on the migration network;
//!     idempotent while it runs)
//!   - `POST /v1/copies/{mid}/{disk}/send` [`SendCopy`] -> [`CopyStatus`] (source: start
//!     copying into that export; idempotent)
//!   - `GET  /v1/copies/{mid}/{disk}[?wait_ms=MS&after_done=BYTES]` -> [`CopyStatus`] (state
//!     `unknown` when this agent has no such copy, e.g. after a restart; with `wait_ms`,
//!     answers as soon as the state or the bytes done change)
//!   - `POST /v1/copies/{mid}/{disk}/finish` -> [`CopyStatus`] (destination: stop the export,
//!     flushed, and keep the image, still removable by `abort`; source: forget the finished
//!     copy)
//!   - `POST /v1/copies/{mid}/{disk}/commit` -> `()` (destination: the image now belongs to
//!     the instance defined here; `abort` no longer touches it)
//!   - `POST /v1/copies/{mid}/{disk}/abort` -> `()` (source: stop sending; destination: stop
//!     the export and remove the uncommitted image; 404 when there is nothing to abort)
//!   - `POST /v1/copies/{mid}/cleanup` [`CleanupCopies`] -> [`CleanedUp`] (source, after
//!     the migration completed: remove the source images kept until cleanup; refused for an
//!     image an instance defined on this host uses)
//! - `POST /v1/probe/listen`, `POST /v1/probe/connect`, `GET /v1/cpu-models/{model}`: the
//!   agent's part of the pre-flight checks, see [`crate::checks`]
//!
//! Server endpoints for agents (bearer = join token for join, then the agent credential):
//! - `POST /v1/tls/csr` -> [`CertificateSigningRequest`] (a new key, for rotation)
//! - `POST /v1/tls/certificate` [`InstallCertificate`] -> `()`
//! - `POST /v1/agents/join` [`JoinRequest`] -> [`JoinResponse`]
//! - `POST /v1/agents/renew` [`RenewRequest`] -> [`InstallCertificate`]
//! - `POST /v1/agents/heartbeat` [`Heartbeat`] -> `()`

use ferry_migrate::{Decision, MigrationParams, Progress, SourceOutcome};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::hosts::HostFacts;
use crate::instances::{
    BackingRef, DiskFormat, GuestInfo, ImageRef, InstanceSpec, InstanceState, StopMethod,
};
use crate::ErrorBody;

/// An agent introduces itself with the cluster's join token. `Debug` leaves the token out.
#[derive(Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    pub join_token: String,
    pub name: String,
    /// Where the server reaches this agent's API.
    pub agent_url: String,
    pub facts: HostFacts,
    /// A PEM certificate signing request for the key the agent made (the key stays on the
    /// host); the server signs it for the agent's API.
    pub csr: String,
}

impl std::fmt::Debug for JoinRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinRequest")
            .field("join_token", &"<redacted>")
            .field("name", &self.name)
            .field("agent_url", &self.agent_url)
            .field("facts", &self.facts)
            .finish()
    }
}

/// What a joined agent holds from then on: its credential for calling the server, and its
/// certificate. `Debug` leaves the credential out.
#[derive(Clone, Serialize, Deserialize)]
pub struct JoinResponse {
    /// The agent's credential for calling the server (heartbeats).
    pub agent_token: String,
    /// The agent's certificate followed by the cluster CA (PEM), for its API.
    pub certificate: String,
    /// The cluster CA (PEM): only clients it signed for the server's identity may call the
    /// agent.
    pub ca_pem: String,
}

/// `POST /v1/tls/csr` answer: the agent made a new key (kept until its certificate arrives)
/// and asks for a certificate for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateSigningRequest {
    pub csr: String,
}

/// `POST /v1/tls/certificate`: the signed certificate for the pending key; the agent serves
/// it from the next connection on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstallCertificate {
    /// The agent's certificate followed by the cluster CA (PEM).
    pub certificate: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for JoinResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinResponse")
            .field("agent_token", &"<redacted>")
            .field(
                "certificate",
                &format_args!("<{} bytes>", self.certificate.len()),
            )
            .finish_non_exhaustive()
    }
}

/// `POST /v1/agents/renew` (agent -> server, with the agent's credential): a certificate for
/// a new key before the current one expires. Answered with an [`InstallCertificate`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenewRequest {
    pub name: String,
    pub csr: String,
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
    /// The spec as it will be here: local disks already mapped to this host's datastores.
    pub spec: InstanceSpec,
    pub params: MigrationParams,
    /// Block migration: the images to create here (empty, sparse) and export over NBD for
    /// the source's mirrors. Removed again when the destination is removed before it ran.
    #[serde(default)]
    pub disks: Vec<IncomingDisk>,
    /// This half's TLS credentials for the migration's streams (destination: server
    /// certificate and the source's identity; source: client certificate and the
    /// destination's host name). Written 0600 into the migration's directory on the agent and
    /// removed when the half ends; `None` streams in the clear. `Debug` redacts the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ferry_migrate::TlsCredentials>,
}

/// `POST /v1/migrations/{mid}/incoming/launch`: start the instance's QEMU in incoming mode
/// here before the plan exists (while the source measures); `/incoming` then only listens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchIncoming {
    pub instance_id: Uuid,
    pub name: String,
    /// The spec as it will be here.
    pub spec: InstanceSpec,
    /// This half's TLS credentials for the migration's streams (destination: server
    /// certificate and the source's identity; source: client certificate and the
    /// destination's host name). Written 0600 into the migration's directory on the agent and
    /// removed when the half ends; `None` streams in the clear. `Debug` redacts the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ferry_migrate::TlsCredentials>,
}

/// One image a block migration creates on the destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingDisk {
    /// The disk's id in the spec.
    pub disk: String,
    /// Where the new image goes; it must not exist.
    pub image: ImageRef,
    pub format: DiskFormat,
    pub size_bytes: u64,
    /// An overlay's base, on storage both hosts share: only the top image is copied.
    #[serde(default)]
    pub backing: Option<BackingRef>,
    /// Room the copy needs on the datastore; refused (`no-room`) when there is less.
    #[serde(default)]
    pub required_bytes: u64,
    /// The image is there already, kept from a failed attempt to resume from: used as it is
    /// when it still matches, made anew otherwise. The answer's export says which
    /// ([`ferry_migrate::MirrorTarget::resume`]).
    #[serde(default)]
    pub reuse: bool,
}

/// `DELETE /v1/migrations/{mid}/incoming[?keep_images=true]`: what became of the images a
/// block migration made there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedIncoming {
    /// The images stay for a retry: asked for, and the incoming QEMU quit cleanly (its
    /// writes are in the files). Otherwise they were removed.
    pub kept_images: bool,
    /// Why images that were asked to stay were removed instead, for the job's log: a retry
    /// then copies the whole disks again, and the operator should know why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_kept: Option<String>,
}

/// Where the destination listens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingReady {
    pub addr: String,
    /// Block migration: the NBD export of each new image, for the source's mirrors.
    #[serde(default)]
    pub disks: Vec<ferry_migrate::MirrorTarget>,
}

/// `POST /v1/migrations/{mid}/source`: start migrating this host's instance to `destination`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartSource {
    pub instance_id: Uuid,
    pub destination: String,
    pub params: MigrationParams,
    /// Block migration: the local disks to mirror into the destination's exports first.
    #[serde(default)]
    pub disks: Vec<ferry_migrate::MirrorTarget>,
    /// This half's TLS credentials for the migration's streams (destination: server
    /// certificate and the source's identity; source: client certificate and the
    /// destination's host name). Written 0600 into the migration's directory on the agent and
    /// removed when the half ends; `None` streams in the clear. `Debug` redacts the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ferry_migrate::TlsCredentials>,
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

/// `POST /v1/disks/measure`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeasureImage {
    pub image: ImageRef,
    pub format: DiskFormat,
}

/// An image's sizes, for the free-space check before a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeasure {
    /// Virtual size.
    pub size_bytes: u64,
    /// What the file takes on its datastore: about what a sparse copy needs.
    pub allocated_bytes: u64,
}

/// `POST /v1/disks/checksum`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChecksumImage {
    pub image: ImageRef,
    pub format: DiskFormat,
    /// Wait this long for the result (at most 30 s) before answering `running`.
    #[serde(default)]
    pub wait_ms: u64,
}

/// Where a checksum is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChecksumState {
    Running,
    Done,
    Failed,
}

/// A checksum's progress or result. A finished result is handed out once: the next request
/// for the same image computes afresh, so it never describes an image that changed since.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChecksumStatus {
    pub state: ChecksumState,
    /// Bytes hashed so far.
    pub done_bytes: u64,
    /// Virtual size, once known.
    pub size_bytes: u64,
    /// Lower-case hex SHA-256 of the guest-visible content, when done.
    pub sha256: Option<String>,
    pub elapsed_ms: u64,
    pub error: Option<ErrorBody>,
}

/// `POST /v1/copies/{mid}/{disk}/receive`: the image to create here and fill from the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveCopy {
    /// Where the new image goes; it must not exist.
    pub image: ImageRef,
    /// Format of the new image (`raw` for a file copied byte for byte).
    pub format: DiskFormat,
    /// Virtual size of the new image.
    pub size_bytes: u64,
    /// Room the copy needs on the datastore; refused (`no-room`) when there is less.
    #[serde(default)]
    pub required_bytes: u64,
    /// The destination's TLS credentials for the copy: the migration's CA, the destination's
    /// server certificate (valid for its migration address) and key, and
    /// [`TlsPeer::Client`](ferry_migrate::TlsPeer::Client) naming the source's identity, the
    /// only client the export lets in. Written 0600 into the agent's state directory while
    /// the export runs; `None` copies in the clear. `Debug` redacts the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ferry_migrate::TlsCredentials>,
}

/// Where the source sends the copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyReceiving {
    /// `IP:PORT` on the destination's migration address.
    pub addr: String,
    /// The export name: a random token the sender must present.
    pub export: String,
}

/// `POST /v1/copies/{mid}/{disk}/send`: copy this host's image into the receiver's export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendCopy {
    pub image: ImageRef,
    /// How the image is read (`raw` copies the file byte for byte).
    pub format: DiskFormat,
    /// [`CopyReceiving::addr`].
    pub destination: String,
    /// [`CopyReceiving::export`].
    pub export: String,
    /// Bytes per second; absent: unlimited.
    #[serde(default)]
    pub rate_limit_bps: Option<u64>,
    /// The source's TLS credentials for the copy: the migration's CA, the source's client
    /// certificate and key, and [`TlsPeer::Server`](ferry_migrate::TlsPeer::Server) naming
    /// the destination's migration address, which the export's certificate must be valid
    /// for. Written 0600 into the agent's state directory while `qemu-img` sends; `None`
    /// copies in the clear. `Debug` redacts the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ferry_migrate::TlsCredentials>,
}

/// A copy's half on one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyState {
    /// Destination: the new image is exported, waiting for or taking the data.
    Receiving,
    /// Destination: the export stopped cleanly; the image is complete but not committed.
    Received,
    /// Source: `qemu-img` is sending.
    Sending,
    /// Source: everything was sent.
    Sent,
    Failed,
    Cancelled,
    /// This agent has no such copy (never started, or lost in an agent restart).
    Unknown,
}

/// One copy as one agent sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CopyStatus {
    pub state: CopyState,
    /// Virtual bytes processed (zero ranges count without being sent).
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Over the last seconds.
    pub rate_bps: f64,
    pub elapsed_ms: u64,
    pub error: Option<ErrorBody>,
}

impl CopyStatus {
    /// What an agent answers for a copy it does not know.
    pub fn unknown() -> CopyStatus {
        CopyStatus {
            state: CopyState::Unknown,
            done_bytes: 0,
            total_bytes: 0,
            rate_bps: 0.0,
            elapsed_ms: 0,
            error: None,
        }
    }
}

/// `POST /v1/copies/{mid}/cleanup`: the source images a completed cold migration kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CleanupCopies {
    pub images: Vec<ImageRef>,
}

/// What a cleanup did; repeating it finds everything `missing`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanedUp {
    pub removed: Vec<ImageRef>,
    pub missing: Vec<ImageRef>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_migrate::{TlsCredentials, TlsPeer};

    fn start(tls: Option<TlsCredentials>) -> StartSource {
        StartSource {
            instance_id: Uuid::nil(),
            destination: "10.78.0.12:49152".into(),
            params: MigrationParams::default(),
            disks: Vec::new(),
            tls,
        }
    }

    /// A request carrying credentials can be logged: its key never shows. A request from a
    /// server that sends none (the field is optional) still parses, and sends no `tls`.
    #[test]
    fn tls_is_optional_and_its_key_never_shows_in_debug() {
        let req = start(Some(TlsCredentials {
            ca_pem: "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".into(),
            cert_pem: "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----\nTOP-SECRET\n-----END PRIVATE KEY-----\n".into(),
            peer: TlsPeer::Server {
                hostname: "10.78.0.12".into(),
            },
        }));
        assert!(!format!("{req:?}").contains("TOP-SECRET"));
        let json = serde_json::to_value(&req).unwrap();
        assert_eq!(json["tls"]["peer"]["server"]["hostname"], "10.78.0.12");
        let back: StartSource = serde_json::from_value(json).unwrap();
        assert_eq!(back.tls, req.tls);

        let plain = serde_json::to_value(start(None)).unwrap();
        assert!(plain.get("tls").is_none());
        let back: StartSource = serde_json::from_value(plain).unwrap();
        assert!(back.tls.is_none());
    }

    /// The copy requests carry credentials the same way: optional, absent when none, the key
    /// never in `Debug` (they are `deny_unknown_fields`, so an old agent refuses them loudly
    /// rather than copying in the clear).
    #[test]
    fn copy_requests_take_optional_tls() {
        let creds = TlsCredentials {
            ca_pem: "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".into(),
            cert_pem: "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----\nTOP-SECRET\n-----END PRIVATE KEY-----\n".into(),
            peer: TlsPeer::Client {
                identity: "CN=ferry-migration-x-source".into(),
            },
        };
        let image = ImageRef {
            datastore: "local".into(),
            file: "vm/disk0.qcow2".into(),
        };
        let receive = ReceiveCopy {
            image: image.clone(),
            format: DiskFormat::Qcow2,
            size_bytes: 1 << 30,
            required_bytes: 0,
            tls: Some(creds.clone()),
        };
        assert!(!format!("{receive:?}").contains("TOP-SECRET"));
        let json = serde_json::to_value(&receive).unwrap();
        assert_eq!(
            json["tls"]["peer"]["client"]["identity"],
            "CN=ferry-migration-x-source"
        );
        assert_eq!(
            serde_json::from_value::<ReceiveCopy>(json).unwrap(),
            receive
        );
        let send = SendCopy {
            image,
            format: DiskFormat::Qcow2,
            destination: "10.78.0.12:49152".into(),
            export: "ferry-0123".into(),
            rate_limit_bps: None,
            tls: None,
        };
        let json = serde_json::to_value(&send).unwrap();
        assert!(json.get("tls").is_none());
        assert_eq!(serde_json::from_value::<SendCopy>(json).unwrap(), send);
        let with = SendCopy {
            tls: Some(TlsCredentials {
                peer: TlsPeer::Server {
                    hostname: "10.78.0.12".into(),
                },
                ..creds
            }),
            ..send
        };
        assert!(!format!("{with:?}").contains("TOP-SECRET"));
    }
}
