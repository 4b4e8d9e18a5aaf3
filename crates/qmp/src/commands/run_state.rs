//! VM run state and lifecycle commands (qapi/run-state.json, qapi/misc.json).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{commands, lenient_enum};

lenient_enum! {
    /// QEMU's `RunState`: what the VM is doing. The migration engine watches it to know,
    /// for example, that a destination is still `inmigrate` or that a source reached
    /// `postmigrate` after switchover.
    pub enum RunState {
        /// QEMU is waiting for a debugger.
        Debug => "debug",
        /// Destination waiting for an incoming migration.
        Inmigrate => "inmigrate",
        /// An internal error stopped the VM.
        InternalError => "internal-error",
        /// A disk I/O error stopped the VM.
        IoError => "io-error",
        /// Stopped by `stop` (or at a migration switchover before completion).
        Paused => "paused",
        /// Source after a completed migration; the VM now runs elsewhere.
        Postmigrate => "postmigrate",
        /// Started with `-S`, never run yet.
        Prelaunch => "prelaunch",
        /// Migration switchover in progress: the guest is stopped.
        FinishMigrate => "finish-migrate",
        /// Loading a snapshot.
        RestoreVm => "restore-vm",
        /// The guest is running.
        Running => "running",
        /// Saving a snapshot.
        SaveVm => "save-vm",
        /// The guest shut down (QEMU kept alive by `-no-shutdown`).
        Shutdown => "shutdown",
        /// The guest is suspended (ACPI S3).
        Suspended => "suspended",
        /// The watchdog fired and paused the guest.
        Watchdog => "watchdog",
        /// The guest panicked.
        GuestPanicked => "guest-panicked",
        /// COLO fault-tolerance mode.
        Colo => "colo",
    }
}

/// Reply of `query-status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct StatusInfo {
    /// Whether the vCPUs are running.
    pub running: bool,
    /// The detailed run state.
    pub status: RunState,
    /// Members this code does not model (e.g. `singlestep`, removed in later QEMU).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `query-status`: the VM's run state.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryStatus;

/// `cont`: resume the vCPUs (e.g. on the destination after a migration with
/// `-S`, or the source after a failed one).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Cont;

/// `stop`: pause the vCPUs.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Stop;

/// `quit`: make QEMU exit. QEMU may close the socket before or right after replying; see
/// [`crate::Qmp::quit`] which treats that as success.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Quit;

/// `system_powerdown`: ask the guest to shut down (ACPI power button).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SystemPowerdown;

commands! {
    QueryStatus => "query-status" -> StatusInfo;
    Cont => "cont" -> ();
    Stop => "stop" -> ();
    Quit => "quit" -> ();
    SystemPowerdown => "system_powerdown" -> ();
}
