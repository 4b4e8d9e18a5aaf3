//! Migrations: the jobs that move instances.

use chrono::{DateTime, Utc};
use ferry_migrate::{Bandwidth, MigrationParams, Plan, Progress, QemuSettings, TimeoutAction};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::instances::{DiskFormat, ImageRef};
use crate::ErrorBody;

/// A migration's life. Terminal: Completed, Failed, Cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    /// Waiting for a slot (limits per host and cluster).
    Pending,
    /// Checks, destination start, stream setup.
    Preparing,
    /// Memory is being copied.
    Migrating,
    /// Switchover done; the destination is being confirmed and the source torn down.
    Completing,
    Completed,
    Failed,
    Cancelled,
}

impl MigrationState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            MigrationState::Completed | MigrationState::Failed | MigrationState::Cancelled
        )
    }

    /// Holds a concurrency slot.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            MigrationState::Preparing | MigrationState::Migrating | MigrationState::Completing
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MigrationState::Pending => "pending",
            MigrationState::Preparing => "preparing",
            MigrationState::Migrating => "migrating",
            MigrationState::Completing => "completing",
            MigrationState::Completed => "completed",
            MigrationState::Failed => "failed",
            MigrationState::Cancelled => "cancelled",
        }
    }

    /// Every state, in the order a job goes through them: for filters that offer each.
    pub const ALL: [MigrationState; 7] = [
        MigrationState::Pending,
        MigrationState::Preparing,
        MigrationState::Migrating,
        MigrationState::Completing,
        MigrationState::Completed,
        MigrationState::Failed,
        MigrationState::Cancelled,
    ];

    pub fn parse(s: &str) -> Option<MigrationState> {
        Self::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

/// Live (the guest keeps running) or cold (a stopped instance's definition moves).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationKind {
    Live,
    Cold,
}

/// What the user may choose per migration. Absent fields take Ferry's defaults; unknown ones
/// are refused, so a misspelt option (`bandwith_mib_s`) is an error instead of a silent
/// default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrationOptions {
    /// Cap in MiB/s; default unlimited.
    pub bandwidth_mib_s: Option<u64>,
    /// Downtime target in ms; default 300.
    pub downtime_ms: Option<u64>,
    #[serde(default)]
    pub auto_converge: bool,
    /// Send pages compressed (parallel zstd streams).
    #[serde(default)]
    pub compress: bool,
    /// Allow post-copy (opt-in: a network failure during post-copy loses the guest's state
    /// that only the destination has).
    #[serde(default)]
    pub post_copy: bool,
    /// Start even though pre-flight checks documented as overridable fail.
    #[serde(default)]
    pub force: bool,
    /// `auto` (default): measure, predict and steer; `manual`: exactly the options given.
    #[serde(default)]
    pub policy: Policy,
    /// Completion budget in seconds; default under auto: 60 s per GiB of RAM (at least 30 s,
    /// and at least three times the predicted copy time).
    pub budget_s: Option<u64>,
    /// What happens when the budget runs out: `abort` (default) or `postcopy` (needs
    /// `post_copy`).
    #[schema(value_type = Option<String>)]
    pub timeout_action: Option<TimeoutAction>,
    /// XBZRLE delta compression with this cache in MiB.
    pub xbzrle_cache_mib: Option<u64>,
    /// Parallel (multifd) streams.
    pub parallel: Option<u8>,
    /// Block migration: the destination datastore of each local disk, by disk id. Disks not
    /// named go to the destination's datastore with the most free room that holds them;
    /// disks on storage the destination shares stay where they are.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub disk_map: std::collections::BTreeMap<String, String>,
}

/// How a migration's parameters are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Measure the dirty rate and link, predict, choose the strategy, and escalate on stalls:
    /// the default, because a busy guest then still finishes within its budget.
    #[default]
    Auto,
    /// Run with exactly the options given; only the budget applies.
    Manual,
}

/// One `DISK=DATASTORE` of a disk map (`--map-disk`, the candidates query's `map_disk`).
/// Which disks and datastores exist only the server knows; this checks the form.
pub fn parse_disk_mapping(s: &str) -> Result<(String, String), String> {
    const FORM: &str = "give DISK=DATASTORE, e.g. disk0=local2";
    let Some((disk, datastore)) = s.split_once('=') else {
        return Err(format!("{s:?} has no '='; {FORM}"));
    };
    if disk.is_empty() {
        return Err(format!("{s:?} names no disk; {FORM}"));
    }
    if datastore.is_empty() {
        return Err(format!("{s:?} names no datastore; {FORM}"));
    }
    Ok((disk.to_string(), datastore.to_string()))
}

/// A disk map from `DISK=DATASTORE` pairs. A disk named twice is refused even with the same
/// datastore: with two different ones, keeping either would move the disk somewhere the user
/// may not have meant. The error is a sentence without its subject ("names disk d twice ...").
pub fn disk_map(
    pairs: impl IntoIterator<Item = (String, String)>,
) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut map = std::collections::BTreeMap::new();
    for (disk, datastore) in pairs {
        if let Some(first) = map.insert(disk.clone(), datastore.clone()) {
            return Err(format!(
                "names disk {disk} twice ({disk}={first} and {disk}={datastore})"
            ));
        }
    }
    Ok(map)
}

impl MigrationOptions {
    /// Checks the values a user typed, naming the bad one.
    pub fn validate(&self) -> Result<(), ErrorBody> {
        if self.budget_s == Some(0) {
            return Err(ErrorBody::new(
                "invalid-migration-options",
                "budget_s 0 leaves no time to migrate; it must be at least 1 s",
                "give budget_s of 1 or more seconds, or leave it out for the default",
            ));
        }
        self.to_params().validate().map_err(|e| {
            ErrorBody::new(
                "invalid-migration-options",
                e.to_string(),
                "fix the named option and retry",
            )
        })
    }

    /// The engine's parameters for these options.
    pub fn to_params(&self) -> MigrationParams {
        let defaults = MigrationParams::default();
        MigrationParams {
            bandwidth: self
                .bandwidth_mib_s
                .map(|m| Bandwidth::Limited(m.saturating_mul(1 << 20)))
                .unwrap_or(Bandwidth::Unlimited),
            downtime_limit_ms: self.downtime_ms.unwrap_or(defaults.downtime_limit_ms),
            auto_converge: self.auto_converge,
            postcopy: self.post_copy,
            multifd_channels: self.parallel.or(if self.compress { Some(2) } else { None }),
            multifd_compression: if self.compress {
                Some("zstd".into())
            } else {
                None
            },
            completion_timeout: self.budget_s.map(std::time::Duration::from_secs),
            timeout_action: self.timeout_action.unwrap_or_default(),
            xbzrle_cache_bytes: self.xbzrle_cache_mib.map(|m| m.saturating_mul(1 << 20)),
            ..defaults
        }
    }
}

/// `PATCH /v1/migrations/{id}`: change the pacing of a job, also while it copies.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateMigration {
    /// New cap in MiB/s; `0` means unlimited.
    pub bandwidth_mib_s: Option<u64>,
    /// New downtime target in ms.
    pub downtime_ms: Option<u64>,
}

/// `POST /v1/migrations`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateMigration {
    /// Instance name or id.
    pub instance: String,
    /// Destination host; required until pre-flight ranking picks one.
    pub destination: Option<String>,
    #[serde(default)]
    pub options: MigrationOptions,
    /// `cold` for a stopped instance; default `live`.
    pub kind: Option<MigrationKind>,
}

/// What QEMU measured at the end of a live migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MigrationStats {
    pub total_ms: u64,
    /// QEMU's pause at switchover (QEMU calls it downtime); the gap the guest's users saw is
    /// in the job's `impact`, when someone observed it.
    #[serde(alias = "downtime_ms")]
    pub qemu_pause_ms: u64,
    pub bytes_transferred: u64,
    pub iterations: u64,
}

/// A migration job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Migration {
    pub id: Uuid,
    pub instance_id: Uuid,
    pub instance_name: String,
    pub kind: MigrationKind,
    pub source: String,
    pub destination: String,
    pub state: MigrationState,
    pub options: MigrationOptions,
    pub created_at: DateTime<Utc>,
    pub preparing_at: Option<DateTime<Utc>>,
    pub migrating_at: Option<DateTime<Utc>>,
    pub completing_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<ErrorBody>,
    /// The latest progress sample.
    #[schema(value_type = Option<Object>)]
    pub progress: Option<Progress>,
    pub stats: Option<MigrationStats>,
    /// Set when a user asked to cancel; the job ends Cancelled unless switchover already
    /// happened.
    pub cancel_requested: bool,
    /// What the auto policy measured, predicted and chose; set once the job is prepared.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub plan: Option<MigrationPlan>,
    /// Cold migration: the images copied to the destination, one per disk not on storage the
    /// destination shares, with their progress, checksum and whether the source's copy is
    /// still kept. Empty when nothing is copied.
    #[serde(default)]
    pub copies: Vec<DiskCopy>,
    /// When `ferry migration cleanup` (or the automatic cleanup) removed the source copies.
    #[serde(default)]
    pub cleaned_up_at: Option<DateTime<Utc>>,
    /// Live migration: what the guest lived through (vCPU throttle history, peak and CPU
    /// taken, QEMU's pause, the gaps outside observers saw), kept current while it runs.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub impact: Option<ferry_migrate::GuestImpact>,
    /// Live: the migration capabilities and parameters the source QEMU ran with, read back
    /// from it when its memory stream started (the plan and QEMU's own defaults included,
    /// which the request's options do not show). Unset before then and for cold jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub qemu_settings: Option<QemuSettings>,
}

/// Where one disk's copy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiskCopyState {
    /// Not started yet.
    Pending,
    /// The content is moving.
    Copying,
    /// Both sides are being checksummed.
    Verifying,
    /// Copied and the checksums agree.
    Copied,
    /// Failed or cancelled; the destination's partial image was removed.
    Failed,
}

impl DiskCopyState {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskCopyState::Pending => "pending",
            DiskCopyState::Copying => "copying",
            DiskCopyState::Verifying => "verifying",
            DiskCopyState::Copied => "copied",
            DiskCopyState::Failed => "failed",
        }
    }
}

/// One image a cold migration copies: the same datastore name and file on both hosts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DiskCopy {
    /// The disk's id, or `nvram` for the UEFI variable store.
    pub disk: String,
    pub image: ImageRef,
    /// Where the copy goes on the destination, when not to the same datastore and file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<ImageRef>,
    /// How the content is read and written: the disk's format, or `raw` for a file copied byte
    /// for byte (a qcow2 overlay, whose base stays on shared storage; the NVRAM file).
    #[schema(value_type = String, example = "qcow2")]
    pub format: DiskFormat,
    /// Virtual size: what `done_bytes` runs up to.
    pub size_bytes: u64,
    pub state: DiskCopyState,
    pub done_bytes: u64,
    pub remaining_bytes: u64,
    /// Bytes per second, recent.
    pub rate_bps: f64,
    pub elapsed_ms: u64,
    /// SHA-256 of the guest-visible content, equal on both hosts once copied.
    pub sha256: Option<String>,
    /// The source host still has its image: true from the copy until the cleanup removes it.
    pub source_kept: bool,
    /// Live copy that failed: the destination keeps its partial image for a retry to resume
    /// from (the next migration to the same host and datastore sends only what it lacks).
    /// Removed by `ferry migration cleanup`, or when the next migration goes elsewhere.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub target_kept: bool,
    /// Live copy: the dirty bitmap on the source's disk that records what the destination
    /// image lacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
}

/// `POST /v1/migrations/preview`: what a `POST /v1/migrations` with the same body would do,
/// without doing it: the destination it would take, that host's checks, and the auto
/// policy's plan with its prediction. Shown before Start so nobody starts blind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationPreview {
    pub instance: String,
    pub kind: MigrationKind,
    pub source: String,
    /// The destination given, or the best fit host ("auto").
    pub destination: String,
    /// The destination's pre-flight checks.
    pub candidate: crate::checks::Candidate,
    /// The plan (strategy, prediction, reasons); absent for a cold job and under the manual
    /// policy, where nothing is planned.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub plan: Option<MigrationPlan>,
    /// What the preview could not measure or why there is no plan, one sentence each.
    #[serde(default)]
    pub notes: Vec<String>,
}

/// The auto policy's plan and the engine parameters both halves run with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationPlan {
    pub plan: Plan,
    pub params: MigrationParams,
}

/// One line of a migration's log: what Ferry did and what QEMU reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LogLine {
    pub seq: u64,
    pub at: DateTime<Utc>,
    pub level: String,
    pub message: String,
}

/// One stored progress sample of a migration: its place in the job's history (`seq`, from 1),
/// when the server stored it, and the sample as it was shown live. Kept so that charts of a
/// job opened mid-way or after it ended still show its whole course.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Sample {
    pub seq: u64,
    pub at: DateTime<Utc>,
    #[schema(value_type = Object)]
    pub progress: Progress,
}

/// `GET /v1/migrations/{id}/samples`: a page of the job's progress history, oldest first.
/// At most [`SAMPLES_PAGE_MAX`] samples a page, so that a long migration's history cannot
/// make one answer unbounded; `next_after` is the `after` of the next page while more remain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SamplePage {
    pub samples: Vec<Sample>,
    /// Pass as `?after=` to read on; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<u64>,
}

/// The most samples one `GET /v1/migrations/{id}/samples` answers, and its default `limit`.
/// Progress is sampled a few times a second, so this covers about ten minutes of a copy.
pub const SAMPLES_PAGE_MAX: u32 = 2000;

/// A live event, as sent on the SSE streams (`event:` is [`Event::kind`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// A migration changed state (or was created).
    Migration { migration: Box<Migration> },
    /// A progress sample of a running migration.
    Progress {
        migration_id: Uuid,
        #[schema(value_type = Object)]
        progress: Progress,
    },
    /// An instance changed (state, host).
    Instance { instance: Box<Instance> },
    /// A host changed (online/offline, enabled).
    Host { name: String },
    /// Something an operator must know at once: two hosts running one guest, a record
    /// corrected from the agents' reports.
    Alarm {
        instance_id: Uuid,
        code: String,
        message: String,
    },
}

impl Event {
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Migration { .. } => "migration",
            Event::Progress { .. } => "progress",
            Event::Instance { .. } => "instance",
            Event::Host { .. } => "host",
            Event::Alarm { .. } => "alarm",
        }
    }

    pub fn migration_id(&self) -> Option<Uuid> {
        match self {
            Event::Migration { migration } => Some(migration.id),
            Event::Progress { migration_id, .. } => Some(*migration_id),
            _ => None,
        }
    }
}

use crate::instances::Instance;
