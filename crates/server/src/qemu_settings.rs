//! What a live job's source QEMU actually runs with: read back from it through its agent when
//! the memory stream starts, stored with the job, and logged. The request's options and even
//! the plan's parameters are only what was asked; `migration show` prints this instead.

use ferry_api::ApiClient;
use ferry_migrate::{Phase, QemuSettings};
use uuid::Uuid;

use crate::server::AppState;

/// Whether a sample is of the memory stream, by which time the source has set every
/// capability and parameter (a block migration's disk copy comes first, with the memory
/// parameters not yet set).
pub(crate) fn is_memory(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::Precopy | Phase::Switchover | Phase::Postcopy | Phase::Completed
    )
}

/// Reads the source QEMU's settings from `src` (the source agent), stores them with job
/// `mid`, and returns the job's log line about it (level, message). A failure is logged,
/// never fatal: the migration itself does not depend on it.
pub(crate) async fn record(
    state: &AppState,
    mid: Uuid,
    src: &ApiClient,
    instance: Uuid,
) -> (&'static str, String) {
    let path = format!("/v1/instances/{instance}/migration-settings");
    let settings: QemuSettings = match src.get(&path).await {
        Ok(s) => s,
        Err(e) => {
            return (
                "warn",
                format!("cannot read the source QEMU's migration settings: {e}"),
            )
        }
    };
    if let Err(e) = state.store.set_qemu_settings(mid, &settings).await {
        return ("warn", format!("QEMU's migration settings not stored: {e}"));
    }
    ("info", format!("qemu runs with {}", settings.summary()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_memory_phases_have_the_parameters_set() {
        for p in [
            Phase::Precopy,
            Phase::Switchover,
            Phase::Postcopy,
            Phase::Completed,
        ] {
            assert!(is_memory(p), "{p:?}");
        }
        for p in [
            Phase::Setup,
            Phase::DiskCopy,
            Phase::Failed,
            Phase::Cancelled,
        ] {
            assert!(!is_memory(p), "{p:?}");
        }
    }
}
