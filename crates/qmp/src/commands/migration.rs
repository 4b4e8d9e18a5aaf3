//! Migration commands and statistics (qapi/migration.json; QEMU 7.2 to 10.0).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{commands, lenient_enum};

lenient_enum! {
    /// QEMU's `MigrationStatus`, reported by `query-migrate` and the `MIGRATION` event.
    pub enum MigrationStatus {
        /// No migration has been started.
        None => "none",
        /// Setting up (connecting, negotiating).
        Setup => "setup",
        /// `migrate_cancel` was issued; winding down.
        Cancelling => "cancelling",
        /// Cancelled; the source keeps running.
        Cancelled => "cancelled",
        /// Pre-copy in progress.
        Active => "active",
        /// Post-copy in progress: the destination runs, pages are pulled on demand.
        PostcopyActive => "postcopy-active",
        /// Post-copy interrupted by a network failure; recoverable with `migrate-recover`.
        PostcopyPaused => "postcopy-paused",
        /// Post-copy recovering after a pause.
        PostcopyRecover => "postcopy-recover",
        /// Post-copy recovery reconnecting its channels (QEMU 9.1 and later).
        PostcopyRecoverSetup => "postcopy-recover-setup",
        /// Finished successfully.
        Completed => "completed",
        /// Failed; see `error-desc`.
        Failed => "failed",
        /// In COLO fault-tolerance mode.
        Colo => "colo",
        /// Paused before switchover (`pause-before-switchover` capability); waiting for
        /// `migrate-continue`.
        PreSwitchover => "pre-switchover",
        /// Device state is being migrated after RAM.
        Device => "device",
        /// Waiting for unplug of devices that cannot migrate (failover NICs).
        WaitUnplug => "wait-unplug",
    }
}

impl MigrationStatus {
    /// True once the migration is over and will not change state on its own: `completed`,
    /// `failed` or `cancelled`. Pollers stop here. (`postcopy-paused` is not terminal: it
    /// can be recovered.)
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }
}

/// RAM (or block) transfer statistics from `query-migrate` (QAPI `MigrationStats`).
/// Everything is optional because members come and go between QEMU versions
/// (`precopy-bytes` appeared in 7.0, `dirty-sync-missed-zero-copy` in 7.1, for instance).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    /// Bytes sent so far.
    pub transferred: Option<u64>,
    /// Bytes left to send in this pass.
    pub remaining: Option<u64>,
    /// Total guest RAM in bytes.
    pub total: Option<u64>,
    /// Zero pages found (sent as a marker only).
    pub duplicate: Option<u64>,
    /// Deprecated, always 0.
    pub skipped: Option<u64>,
    /// Pages sent in full.
    pub normal: Option<u64>,
    /// Bytes of pages sent in full.
    pub normal_bytes: Option<u64>,
    /// Pages dirtied per second by the guest: the number the convergence controller needs.
    pub dirty_pages_rate: Option<u64>,
    /// Throughput in megabits per second.
    pub mbps: Option<f64>,
    /// Number of dirty-bitmap syncs (pre-copy passes).
    pub dirty_sync_count: Option<u64>,
    /// Page requests from the destination during post-copy.
    pub postcopy_requests: Option<u64>,
    /// Target page size in bytes.
    pub page_size: Option<u64>,
    /// Bytes sent over multifd channels.
    pub multifd_bytes: Option<u64>,
    /// Pages sent per second.
    pub pages_per_second: Option<u64>,
    /// Bytes sent during pre-copy (QEMU >= 7.0).
    pub precopy_bytes: Option<u64>,
    /// Bytes sent while the guest was stopped (QEMU >= 7.0).
    pub downtime_bytes: Option<u64>,
    /// Bytes sent during post-copy (QEMU >= 7.0).
    pub postcopy_bytes: Option<u64>,
    /// Zero-copy sends that missed (QEMU >= 7.1).
    pub dirty_sync_missed_zero_copy: Option<u64>,
    /// Members this code does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// XBZRLE cache statistics (QAPI `XBZRLECacheStats`), present when the `xbzrle`
/// capability is on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct XbzrleStats {
    /// Cache size in bytes.
    pub cache_size: Option<u64>,
    /// Bytes sent XBZRLE-encoded.
    pub bytes: Option<u64>,
    /// Pages sent XBZRLE-encoded.
    pub pages: Option<u64>,
    /// Cache misses.
    pub cache_miss: Option<u64>,
    /// Cache miss rate (0..1).
    pub cache_miss_rate: Option<f64>,
    /// Encoding rate (raw bytes / encoded bytes).
    pub encoding_rate: Option<f64>,
    /// Encoding overflows (page sent in full).
    pub overflow: Option<u64>,
    /// Members this code does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Reply of `query-migrate` (QAPI `MigrationInfo`). Before any migration QEMU returns
/// `{}`, so even `status` is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// Current state; absent before the first migration.
    pub status: Option<MigrationStatus>,
    /// Milliseconds since the migration started (or its total duration once complete).
    pub total_time: Option<u64>,
    /// Actual downtime in milliseconds, once complete.
    pub downtime: Option<u64>,
    /// QEMU's estimate of the downtime in milliseconds if it switched over now.
    pub expected_downtime: Option<u64>,
    /// Milliseconds spent in setup.
    pub setup_time: Option<u64>,
    /// RAM transfer statistics.
    pub ram: Option<RamStats>,
    /// Block migration statistics (`migrate` with `blk`), same shape as `ram`.
    pub disk: Option<RamStats>,
    /// XBZRLE cache statistics.
    pub xbzrle_cache: Option<XbzrleStats>,
    /// Current auto-converge throttle in percent.
    pub cpu_throttle_percentage: Option<u64>,
    /// Why the migration failed, when `status` is `failed`.
    pub error_desc: Option<String>,
    /// Why migration is currently blocked (QEMU >= 6.0), e.g. a non-migratable device.
    pub blocked_reasons: Option<Vec<String>>,
    /// Where an incoming QEMU listens: the port it picked from a `port,to=last` range.
    pub socket_address: Option<Vec<ListenAddress>>,
    /// Members this code does not model (`postcopy-blocktime`, `compression`, `vfio`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One address an incoming QEMU listens on (QAPI `SocketAddress`); only `inet` carries a
/// host and port.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListenAddress {
    /// `inet`, `unix`, `vsock` or `fd`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The address QEMU bound, for `inet`.
    pub host: Option<String>,
    /// The port QEMU bound, for `inet` (QAPI sends it as a string).
    pub port: Option<String>,
}

/// `query-migrate`: progress and statistics of the current or last migration.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryMigrate;

/// Names of migration capabilities as QEMU spells them, for use with [`CapabilityState`].
pub mod capability {
    /// Delta-compress re-sent pages against a cache.
    pub const XBZRLE: &str = "xbzrle";
    /// Throttle the guest's vCPUs when the migration does not converge.
    pub const AUTO_CONVERGE: &str = "auto-converge";
    /// Emit `MIGRATION` and `MIGRATION_PASS` events.
    pub const EVENTS: &str = "events";
    /// Allow switching to post-copy with `migrate-start-postcopy`.
    pub const POSTCOPY_RAM: &str = "postcopy-ram";
    /// Several parallel channels for RAM.
    pub const MULTIFD: &str = "multifd";
    /// Stop in `pre-switchover` until `migrate-continue`.
    pub const PAUSE_BEFORE_SWITCHOVER: &str = "pause-before-switchover";
    /// Destination-to-source return path (needed by post-copy).
    pub const RETURN_PATH: &str = "return-path";
    /// Check that source and destination VM UUIDs match.
    pub const VALIDATE_UUID: &str = "validate-uuid";
    /// Activate block devices late on the destination.
    pub const LATE_BLOCK_ACTIVATE: &str = "late-block-activate";
}

/// One migration capability and whether it is on. The name is a plain string so that
/// capabilities unknown to this code (older or newer QEMU) pass through unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityState {
    /// QEMU's capability name, see [`capability`].
    pub capability: String,
    /// Whether it is enabled.
    pub state: bool,
}

impl CapabilityState {
    /// Shorthand for `CapabilityState { capability: name.into(), state }`.
    pub fn new(capability: impl Into<String>, state: bool) -> Self {
        CapabilityState {
            capability: capability.into(),
            state,
        }
    }
}

/// `migrate-set-capabilities`. Both sides of a migration must get the same set before
/// `migrate-incoming`/`migrate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MigrateSetCapabilities {
    /// The capabilities to change; others keep their current state.
    pub capabilities: Vec<CapabilityState>,
}

/// `query-migrate-capabilities`: every capability this QEMU knows and its state.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryMigrateCapabilities;

/// Defines `MigrateSetParameters` (all optional, unset ones not sent) and
/// `MigrationParameters` (the reply, plus `extra`) from one field list, so that the two can
/// never drift apart.
macro_rules! migration_parameters {
    ( $( $(#[$doc:meta])* $field:ident : $ty:ty, )* ) => {
        /// `migrate-set-parameters`. Only the fields that are `Some` are sent; the others keep
        /// their current value in QEMU. Build it with `..Default::default()`.
        #[derive(Debug, Clone, Default, PartialEq, Serialize)]
        #[serde(rename_all = "kebab-case")]
        pub struct MigrateSetParameters {
            $(
                $(#[$doc])*
                #[serde(skip_serializing_if = "Option::is_none")]
                pub $field: Option<$ty>,
            )*
        }

        /// Reply of `query-migrate-parameters` (QAPI `MigrationParameters`).
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        #[serde(rename_all = "kebab-case")]
        pub struct MigrationParameters {
            $(
                $(#[$doc])*
                pub $field: Option<$ty>,
            )*
            /// Members this code does not model (newer QEMU).
            #[serde(flatten)]
            pub extra: Map<String, Value>,
        }

        impl MigrationParameters {
            /// The modelled parameters as a `migrate-set-parameters` command, e.g. to copy a
            /// source's settings to a destination. Unknown members in `extra` are not copied.
            pub fn to_set(&self) -> MigrateSetParameters {
                MigrateSetParameters { $( $field: self.$field.clone(), )* }
            }
        }
    };
}

migration_parameters! {
    /// Initial delay in ms before the first self-announce (RARP/GARP) after switchover.
    announce_initial: u64,
    /// Maximum delay in ms between announcements.
    announce_max: u64,
    /// Number of announcements.
    announce_rounds: u64,
    /// Increase in ms of the delay between announcements.
    announce_step: u64,
    /// zlib level for the (legacy) `compress` capability, 0-9.
    compress_level: u64,
    /// Compression threads for the `compress` capability.
    compress_threads: u64,
    /// Whether to wait for a free compression thread.
    compress_wait_thread: bool,
    /// Decompression threads for the `compress` capability.
    decompress_threads: u64,
    /// Dirty-rate percentage above which auto-converge throttles.
    throttle_trigger_threshold: u64,
    /// First auto-converge throttle in percent.
    cpu_throttle_initial: u64,
    /// Throttle increment in percent per step.
    cpu_throttle_increment: u64,
    /// Make the throttle increment smaller in the tail stage.
    cpu_throttle_tailslow: bool,
    /// ID of a `tls-creds` object; empty string disables TLS.
    tls_creds: String,
    /// Hostname to validate the destination's TLS certificate against.
    tls_hostname: String,
    /// ID of an authz object checking the TLS client's identity.
    tls_authz: String,
    /// Bandwidth cap in bytes per second. QEMU's default is 128 MiB/s, so an
    /// "unlimited" migration must set this explicitly.
    max_bandwidth: u64,
    /// Largest acceptable downtime in milliseconds (default 300).
    downtime_limit: u64,
    /// COLO checkpoint period in milliseconds.
    x_checkpoint_delay: u64,
    /// Incremental block migration.
    block_incremental: bool,
    /// Number of multifd channels.
    multifd_channels: u64,
    /// XBZRLE cache size in bytes.
    xbzrle_cache_size: u64,
    /// Bandwidth cap in bytes per second during post-copy (0 = unlimited).
    max_postcopy_bandwidth: u64,
    /// Maximum auto-converge throttle in percent.
    max_cpu_throttle: u64,
    /// multifd compression method: `none`, `zlib` or `zstd`.
    multifd_compression: String,
    /// zlib level for multifd, 0-9.
    multifd_zlib_level: u64,
    /// zstd level for multifd, 0-20.
    multifd_zstd_level: u64,
    /// Block dirty bitmap aliases (QAPI `BitmapMigrationNodeAlias` list), kept raw.
    block_bitmap_mapping: Value,
}

/// `query-migrate-parameters`: current migration parameters.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryMigrateParameters;

/// `migrate`: start an outgoing migration to `uri` (`tcp:host:port`, `unix:path`,
/// `exec:cmd`, `fd:name`). Returns at once; poll `query-migrate` or watch events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Migrate {
    /// Destination URI.
    pub uri: String,
    /// Resume a paused post-copy migration over a new connection (destination after
    /// `migrate-recover`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume: Option<bool>,
}

impl Migrate {
    /// Shorthand for `Migrate { uri: uri.into(), resume: None }`.
    pub fn new(uri: impl Into<String>) -> Self {
        Migrate {
            uri: uri.into(),
            resume: None,
        }
    }
}

/// `migrate-recover`: on a destination whose post-copy is paused, listen at `uri` for the
/// source's resumed stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrateRecover {
    /// Where to listen, e.g. `tcp:10.0.0.2:49153`.
    pub uri: String,
}

/// `migrate-pause`: pause a post-copy migration (shut its stream down), e.g. when the network
/// is known to be broken but the sockets have not noticed yet.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MigratePause;

/// `migrate-incoming`: start listening for a migration on a QEMU started with
/// `-incoming defer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrateIncoming {
    /// URI to listen on (`tcp:0.0.0.0:port`, `unix:path`, ...).
    pub uri: String,
    /// False: a failed stream leaves QEMU running (QEMU 9.1 and later; default true, exit).
    #[serde(rename = "exit-on-error", skip_serializing_if = "Option::is_none")]
    pub exit_on_error: Option<bool>,
}

impl MigrateIncoming {
    /// Shorthand for `MigrateIncoming { uri: uri.into(), exit_on_error: None }`.
    pub fn new(uri: impl Into<String>) -> Self {
        MigrateIncoming {
            uri: uri.into(),
            exit_on_error: None,
        }
    }
}

/// `migrate_cancel` (spelled with an underscore): cancel the outgoing migration.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MigrateCancel;

/// `migrate-start-postcopy`: switch a running pre-copy to post-copy (needs the
/// `postcopy-ram` capability on both sides).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MigrateStartPostcopy;

/// `migrate-continue`: leave a pause state such as `pre-switchover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrateContinue {
    /// The state we expect the migration to be paused in.
    pub state: MigrationStatus,
}

/// `calc-dirty-rate`: start measuring the guest's dirty rate (before migrating, to pick a
/// strategy). Read the result with [`QueryDirtyRate`] after `calc_time` seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CalcDirtyRate {
    /// Measurement period, in `calc_time_unit`s.
    pub calc_time: u64,
    /// `second` (default) or `millisecond` (QEMU 8.2 and later; at least 50 ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calc_time_unit: Option<&'static str>,
    /// Pages sampled per GiB in `page-sampling` mode (default 512).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_pages: Option<u64>,
    /// `page-sampling` (default), `dirty-ring` or `dirty-bitmap`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// `query-dirty-rate`: result of the last `calc-dirty-rate`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryDirtyRate;

/// Reply of `query-dirty-rate` (QAPI `DirtyRateInfo`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DirtyRateInfo {
    /// Dirty rate in MB/s; present only once `status` is `measured`.
    pub dirty_rate: Option<i64>,
    /// `unstarted`, `measuring` or `measured`.
    pub status: String,
    /// When the measurement started, in seconds (QEMU's clock).
    pub start_time: i64,
    /// Measurement period in seconds.
    pub calc_time: u64,
    /// Pages sampled per GiB (QEMU >= 6.1).
    pub sample_pages: Option<u64>,
    /// Measurement mode (QEMU >= 6.2).
    pub mode: Option<String>,
    /// Members this code does not model (`vcpu-dirty-rate`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

commands! {
    QueryMigrate => "query-migrate" -> MigrationInfo;
    MigrateSetCapabilities => "migrate-set-capabilities" -> ();
    QueryMigrateCapabilities => "query-migrate-capabilities" -> Vec<CapabilityState>;
    MigrateSetParameters => "migrate-set-parameters" -> ();
    QueryMigrateParameters => "query-migrate-parameters" -> MigrationParameters;
    Migrate => "migrate" -> ();
    MigrateIncoming => "migrate-incoming" -> ();
    MigrateRecover => "migrate-recover" -> ();
    MigratePause => "migrate-pause" -> ();
    MigrateCancel => "migrate_cancel" -> ();
    MigrateStartPostcopy => "migrate-start-postcopy" -> ();
    MigrateContinue => "migrate-continue" -> ();
    CalcDirtyRate => "calc-dirty-rate" -> ();
    QueryDirtyRate => "query-dirty-rate" -> DirtyRateInfo;
}
