use std::net::IpAddr;

/// Why a migration (or one of its halves) did not complete.
///
/// Every variant says where the guest is left, which is what an operator needs first.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The request itself is unusable; nothing was started.
    #[error("invalid migration parameter: {0}")]
    InvalidParams(String),
    /// The source guest is not running, so there is nothing to live-migrate.
    #[error("the source guest is not running (state {0})")]
    SourceNotRunning(String),
    /// Every port of the destination's migration range is taken.
    #[error("no free migration port on {addr} in {first}-{last}; the guest stays on the source")]
    PortUnavailable { addr: IpAddr, first: u16, last: u16 },
    /// QEMU reported the migration failed; the guest stays on the source.
    #[error("QEMU failed the migration: {0}; the guest stays on the source")]
    Failed(String),
    /// The migration was aborted on request before switchover; the guest stays on the source.
    #[error("migration cancelled; the guest stays on the source")]
    Cancelled,
    /// The migration ran past its completion budget and was aborted.
    #[error(
        "migration did not complete within {0} s and was aborted; the guest stays on the source"
    )]
    Timeout(u64),
    /// The post-copy stream broke; both sides wait, paused, for it to be recovered over a new
    /// connection. The source must not be resumed.
    #[error("post-copy stream interrupted: {0}; the guest is paused on the destination until the stream is recovered")]
    PostcopyPaused(String),
    /// The stream failed after post-copy started: the guest's newest state is on the
    /// destination, which keeps it paused; the source must not be resumed.
    #[error("post-copy failed: {0}; the guest is held paused on the destination")]
    PostcopyFailed(String),
    /// The source's outgoing migration completed (QEMU `postmigrate`): it handed its guest
    /// over and is not resumed unless the destination is proven gone before the commit.
    #[error("the source has handed its guest over and is not resumed")]
    HandedOver,
    /// A cancel arrived after the source let QEMU switch over: the guest is on its way to the
    /// destination.
    #[error("too late to cancel: the source has switched over and the guest is moving to the destination")]
    TooLateToCancel,
    /// The guest was committed to the destination (the record names it) but could not be
    /// started there; it stays paused there and the source is never resumed.
    #[error("the guest is committed to the destination but did not start there: {0}; it stays paused there")]
    NotStarted(String),
    /// The destination did not take over after switchover.
    #[error("destination did not start the guest: {0}")]
    DestinationNotRunning(String),
    /// The destination side could not be prepared (process, tap, ...).
    #[error("destination preparation failed: {0}")]
    Destination(String),
    /// A disk's block mirror failed before switchover; the guest stays on the source with its
    /// own disks. `reason` is the stable code: `no-space`, `link-lost` or `disk-copy-failed`.
    #[error(
        "the copy of disk {disk} failed: {message}; the guest stays on the source with its disks"
    )]
    DiskCopy {
        disk: String,
        reason: DiskCopyFailure,
        message: String,
    },
    /// The source QEMU process ended while the migration ran: the guest is gone from the
    /// source too, so the operator needs QEMU's own last words, not "connection closed".
    #[error("the source QEMU ended during the migration ({status}); its last output: {output}")]
    SourceExited { status: String, output: String },
    /// The migration's TLS credentials could not be written or given to QEMU; nothing was
    /// sent.
    #[error("{0}; the guest stays on the source")]
    Tls(#[from] crate::tls::TlsError),
    /// A QMP command failed.
    #[error(transparent)]
    Qmp(#[from] ferry_qmp::QmpError),
}

impl MigrateError {
    /// A stable, kebab-case identifier of the error kind.
    pub fn code(&self) -> &'static str {
        match self {
            MigrateError::InvalidParams(_) => "invalid-migration-params",
            MigrateError::SourceNotRunning(_) => "source-not-running",
            MigrateError::PortUnavailable { .. } => "migration-port-unavailable",
            MigrateError::Failed(_) => "migration-failed",
            MigrateError::Cancelled => "migration-cancelled",
            MigrateError::Timeout(_) => "migration-timeout",
            MigrateError::PostcopyFailed(_) => "postcopy-failed",
            MigrateError::PostcopyPaused(_) => "postcopy-paused",
            MigrateError::HandedOver => "source-handed-over",
            MigrateError::TooLateToCancel => "too-late-to-cancel",
            MigrateError::NotStarted(_) => "destination-not-started",
            MigrateError::DestinationNotRunning(_) => "destination-not-running",
            MigrateError::Destination(_) => "destination-prepare-failed",
            MigrateError::DiskCopy { reason, .. } => reason.code(),
            MigrateError::SourceExited { .. } => "source-qemu-exited",
            MigrateError::Tls(_) => "migration-tls-failed",
            MigrateError::Qmp(_) => "qmp-failed",
        }
    }

    /// What the operator can do next.
    pub fn hint(&self) -> &'static str {
        match self {
            MigrateError::InvalidParams(_) => "fix the named parameter and try again",
            MigrateError::SourceNotRunning(_) => "start the instance first, or use a cold migration",
            MigrateError::PortUnavailable { .. } => {
                "free a port in the destination's migration range or widen the range"
            }
            MigrateError::Failed(_) => {
                "check that the destination's migration address is reachable from the source, then retry"
            }
            MigrateError::Cancelled => "start the migration again when ready",
            MigrateError::Timeout(_) => {
                "raise the bandwidth or the downtime target, or enable auto-converge, then retry"
            }
            MigrateError::PostcopyPaused(_) => {
                "restore the migration network; Ferry reconnects the stream by itself"
            }
            MigrateError::PostcopyFailed(_) => {
                "restore the migration network, then recover the stream; never restart the source copy"
            }
            MigrateError::HandedOver => {
                "the guest belongs to the destination; read the migration's log for where it runs"
            }
            MigrateError::TooLateToCancel => {
                "wait for the migration to complete, then migrate the instance back if needed"
            }
            MigrateError::NotStarted(_) => {
                "check the destination host's agent and QEMU; `ferry instance start` resumes it there"
            }
            MigrateError::DestinationNotRunning(_) => {
                "read the destination's QEMU log; the source was resumed if the destination is gone"
            }
            MigrateError::Destination(_) => "check the destination host's QEMU and network setup",
            MigrateError::DiskCopy { reason, .. } => reason.hint(),
            MigrateError::SourceExited { .. } => {
                "the instance is stopped (crashed) on the source; read QEMU's output above, then `ferry instance start` it"
            }
            MigrateError::Tls(_) => {
                "retry: each migration gets fresh credentials; if it fails again, check the hosts' clocks and the agent's run directory"
            }
            MigrateError::Qmp(_) => "a QEMU process stopped answering; check that it still runs",
        }
    }
}

/// Why a disk copy failed, as far as QEMU's message tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskCopyFailure {
    /// The destination's datastore filled up.
    NoSpace,
    /// The connection to the destination's export broke.
    LinkLost,
    /// Anything else QEMU reported.
    Other,
}

impl DiskCopyFailure {
    /// Classifies a block job's error text (QEMU passes the errno's message on).
    pub fn from_message(message: &str) -> DiskCopyFailure {
        let m = message.to_ascii_lowercase();
        if m.contains("no space") || m.contains("enospc") || m.contains("quota") {
            DiskCopyFailure::NoSpace
        } else if m.contains("connection")
            || m.contains("broken pipe")
            || m.contains("input/output error")
            || m.contains("timed out")
            || m.contains("unreachable")
            || m.contains("reset by peer")
        {
            DiskCopyFailure::LinkLost
        } else {
            DiskCopyFailure::Other
        }
    }

    /// The stable error code.
    pub fn code(self) -> &'static str {
        match self {
            DiskCopyFailure::NoSpace => "no-space",
            DiskCopyFailure::LinkLost => "link-lost",
            DiskCopyFailure::Other => "disk-copy-failed",
        }
    }

    /// What the operator can do next.
    pub fn hint(self) -> &'static str {
        match self {
            DiskCopyFailure::NoSpace => {
                "free room on the destination datastore or map the disk to another one (--map-disk), then retry"
            }
            DiskCopyFailure::LinkLost => {
                "check the migration network between the hosts, then retry"
            }
            DiskCopyFailure::Other => "read the migration's log and the source QEMU's log, then retry",
        }
    }
}
