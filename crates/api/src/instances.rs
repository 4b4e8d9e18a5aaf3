//! Instances: virtual machines the fleet runs.

use chrono::{DateTime, Utc};
pub use ferry_qemu::{CacheMode, DiskBus, DiskFormat};
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
    #[serde(default)]
    pub boot: BootSpec,
    /// The disks, in the order the guest sees them; with `boot.from = disk` the first one
    /// is the boot disk. Written by the server when the instance is created (from
    /// [`CreateInstance::disks`]); never given directly.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
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

/// How the instance boots: a kernel from files every host can read (a shared datastore or an
/// image cache), or its first disk through the firmware.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BootSpec {
    #[serde(default)]
    pub from: BootFrom,
    #[serde(default)]
    pub firmware: FirmwareKind,
    /// Kernel image, for `from = kernel`: a path inside a datastore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default)]
    pub cmdline: String,
    /// The UEFI variable store (the guest's NVRAM): created by the server next to the first
    /// disk for `firmware = uefi`, and moved with the instance like a disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvram: Option<ImageRef>,
}

/// What the machine boots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BootFrom {
    /// Direct kernel boot (`boot.kernel`, `boot.initrd`, `boot.cmdline`).
    #[default]
    Kernel,
    /// The firmware boots the first disk, as real hardware does.
    Disk,
}

impl BootFrom {
    pub fn as_str(self) -> &'static str {
        match self {
            BootFrom::Kernel => "kernel",
            BootFrom::Disk => "disk",
        }
    }
}

/// The firmware of the machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FirmwareKind {
    /// SeaBIOS, shipped with QEMU.
    #[default]
    Bios,
    /// OVMF, from Debian's `ovmf` package on every host that runs the instance.
    Uefi,
}

impl FirmwareKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FirmwareKind::Bios => "bios",
            FirmwareKind::Uefi => "uefi",
        }
    }
}

/// A file on a datastore, named the same way on every host that mounts the datastore.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageRef {
    pub datastore: String,
    /// Path relative to the datastore's root, without `..`.
    pub file: String,
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.datastore, self.file)
    }
}

/// One disk of an instance, as recorded: where its image is and how the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Stable id (`disk0`, ...): the guest device's id and the stem of QEMU's node names,
    /// which block jobs and storage mappings refer to.
    pub id: String,
    pub image: ImageRef,
    #[schema(value_type = String, example = "qcow2")]
    pub format: DiskFormat,
    /// Virtual size: what the guest sees.
    pub size_bytes: u64,
    #[serde(default)]
    #[schema(value_type = String, example = "virtio-blk")]
    pub bus: DiskBus,
    #[serde(default)]
    #[schema(value_type = String, example = "none")]
    pub cache: CacheMode,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The read-only base image under a qcow2 overlay (on a shared datastore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<BackingRef>,
    /// Ferry created (or copied) this image, so deleting the instance deletes it; an image
    /// Ferry was only given is never deleted.
    #[serde(default)]
    pub managed: bool,
}

/// A base image and its format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackingRef {
    pub image: ImageRef,
    #[schema(value_type = String, example = "qcow2")]
    pub format: DiskFormat,
}

/// A disk to create or attach with a new instance (`POST /v1/instances`, `disks`).
/// Exactly one of `size_bytes` (a new empty image, or an overlay's size), `image` (an existing
/// image) or `backing` alone (a new overlay of the base's size) says where its content comes
/// from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskRequest {
    /// Default: `disk0`, `disk1`, ... in order.
    #[serde(default)]
    pub id: Option<String>,
    /// Where a new or copied image goes. Default: the instance host's datastore with the most
    /// free room (shared ones first); for an image attached in place, the one holding it.
    #[serde(default)]
    pub datastore: Option<String>,
    /// A new empty image of this virtual size.
    #[serde(default)]
    pub size_bytes: Option<u64>,
    /// An existing image: an absolute path on the instance's host, inside a datastore.
    #[serde(default)]
    pub image: Option<String>,
    /// Copy `image` onto the datastore (Ferry then owns the copy) instead of using it in place.
    #[serde(default)]
    pub copy: bool,
    /// Format of a new image (default qcow2) or of a copy (default: the source's when qcow2
    /// or raw, else qcow2); for an image attached in place it must match what `qemu-img info`
    /// finds.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "qcow2")]
    pub format: Option<DiskFormat>,
    /// A new qcow2 overlay on this base image (an absolute path on a shared datastore).
    #[serde(default)]
    pub backing: Option<String>,
    #[serde(default)]
    #[schema(value_type = String, example = "virtio-blk")]
    pub bus: DiskBus,
    #[serde(default)]
    #[schema(value_type = String, example = "none")]
    pub cache: CacheMode,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub serial: Option<String>,
}

/// A NIC on one of the fleet's networks. The MAC stays with the instance across migrations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    pub network: String,
    pub mac: String,
    /// A static address for the guest on this NIC, `ADDR/PREFIX` (e.g. `10.77.0.50/24`),
    /// handed to the guest by QEMU as an SMBIOS OEM string so a disk-booted OS can configure
    /// itself without DHCP (Ferry's Debian image does). `None`: the guest's own choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "10.77.0.50/24")]
    pub ipv4: Option<String>,
    /// The guest's router on this NIC, inside `ipv4`'s subnet; only with `ipv4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "10.77.0.1")]
    pub gateway: Option<String>,
}

/// `POST /v1/instances`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInstance {
    pub name: String,
    /// Host to define it on; default: the enabled online host with the most free RAM.
    pub host: Option<String>,
    pub spec: InstanceSpec,
    /// Disks to create or attach; they become `spec.disks`.
    #[serde(default)]
    pub disks: Vec<DiskRequest>,
    /// Start it right away.
    #[serde(default)]
    pub start: bool,
}

/// What the guest's own agent (qemu-guest-agent) says about it: seen only for guests that
/// run one, and as of `seen_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GuestInfo {
    /// `PRETTY_NAME` of the guest OS, e.g. "Debian GNU/Linux 12 (bookworm)".
    pub os: Option<String>,
    /// `ID` of the guest OS, e.g. "debian".
    pub os_id: Option<String>,
    pub kernel: Option<String>,
    pub agent_version: Option<String>,
    pub interfaces: Vec<GuestInterface>,
    pub seen_at: DateTime<Utc>,
}

/// One network interface inside the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GuestInterface {
    pub name: String,
    pub mac: Option<String>,
    /// Addresses with prefix length, e.g. `10.77.0.100/24`.
    pub addresses: Vec<String>,
}

/// Query of a stop (`POST /v1/instances/{id}/stop`, on the server and on the agent).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::IntoParams,
)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StopOptions {
    /// Power off at once (QEMU quits) instead of asking the guest to shut down.
    #[serde(default)]
    pub force: bool,
    /// How long the guest may take to shut down before it is powered off (default 30 s,
    /// at most [`StopOptions::MAX_TIMEOUT_S`]).
    #[serde(default)]
    pub timeout_s: Option<u32>,
}

impl StopOptions {
    /// A guest gets this long to shut down unless the caller says otherwise.
    pub const DEFAULT_TIMEOUT_S: u32 = 30;
    /// Callers wait for the stop in one HTTP request (60 s), so a guest gets at most this.
    pub const MAX_TIMEOUT_S: u32 = 45;

    /// The query string for this stop, e.g. `?force=true`.
    pub fn query(&self) -> String {
        match (self.force, self.timeout_s) {
            (true, _) => "?force=true".into(),
            (false, Some(t)) => format!("?timeout_s={t}"),
            (false, None) => String::new(),
        }
    }
}

/// One stretch of a guest's serial output: what it printed while one QEMU process on one host
/// ran it (from a start, or from arriving by migration, to its stop or departure).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ConsoleSegment {
    pub host: String,
    /// When that QEMU process was started, by its host's clock: segments of several hosts are
    /// put in order by it.
    pub started_at: DateTime<Utc>,
    /// Everything the guest printed in this segment; `text` may hold only its end.
    pub size_bytes: u64,
    /// The output as printed (invalid UTF-8 replaced), its last `size_bytes` or fewer bytes.
    pub text: String,
}

impl ConsoleSegment {
    /// Bytes of the segment left out of `text` (its beginning).
    pub fn omitted_bytes(&self) -> u64 {
        self.size_bytes.saturating_sub(self.text.len() as u64)
    }
}

/// `GET /v1/instances/{id}/console`: the guest's serial output from every host that ran it,
/// oldest first, so a migration does not cut the console in two.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InstanceConsole {
    pub instance: Uuid,
    pub segments: Vec<ConsoleSegment>,
    /// Hosts that ran the instance but did not answer: their segments are missing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<String>,
}

/// Query of `GET /v1/instances/{id}/console` (server and agent).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::IntoParams,
)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ConsoleQuery {
    /// At most this many bytes of output, the newest (default
    /// [`ConsoleQuery::DEFAULT_BYTES`], at most [`ConsoleQuery::MAX_BYTES`]).
    #[serde(default)]
    pub bytes: Option<u64>,
}

impl ConsoleQuery {
    /// Enough for a boot and what followed it, small enough for one answer.
    pub const DEFAULT_BYTES: u64 = 256 << 10;
    /// A guest that prints without pause fills megabytes an hour; one answer carries at most
    /// this much of it.
    pub const MAX_BYTES: u64 = 16 << 20;

    /// The byte budget asked for, or the default.
    pub fn budget(&self) -> u64 {
        self.bytes.unwrap_or(Self::DEFAULT_BYTES)
    }
}

/// How a stopped guest went down, as the agent saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum StopMethod {
    /// The guest agent asked the OS to power off, and it did.
    GuestAgent,
    /// The ACPI power button was pressed, and the OS powered off.
    Acpi,
    /// The guest did not power off within the timeout; QEMU was stopped.
    Timeout,
    /// Powered off at once, as asked.
    Forced,
    /// It was not running.
    AlreadyStopped,
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
    /// What the guest agent of the running copy last reported (OS, addresses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestInfo>,
    /// What the request that made this answer did that works but is likely a mistake (an
    /// instance without a NIC): only in the answer to that request, not stored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<Warning>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A request that succeeded but probably not as meant. Shaped like an error (a stable code,
/// one sentence, a hint) so that clients print both the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Warning {
    pub code: String,
    pub message: String,
    pub hint: String,
}
