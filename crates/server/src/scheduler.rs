//! The queue: Pending migrations start in arrival order as slots free up.
//!
//! Limits per source host (outbound), per destination host (inbound) and per cluster. A
//! pending migration that does not fit waits; one behind it that needs other hosts may start,
//! which never overtakes an earlier job competing for the same slot.

use std::collections::HashMap;
use std::time::Duration;

use ferry_api::migrations::{Migration, MigrationState};
use tokio::sync::watch;
use tracing::warn;

use crate::config::Limits;
use crate::driver;
use crate::server::AppState;
use crate::ServerError;

/// Runs until `stop` turns true: schedules whenever woken, and at least twice a second.
pub async fn run(state: AppState, mut stop: watch::Receiver<bool>) {
    loop {
        if let Err(e) = schedule_once(&state).await {
            warn!(error = %e, "scheduling failed; retrying");
        }
        tokio::select! {
            _ = state.queue.notified() => {},
            _ = tokio::time::sleep(Duration::from_millis(500)) => {},
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Counts of active migrations per slot kind.
#[derive(Debug, Default)]
pub struct Slots {
    outbound: HashMap<String, u32>,
    inbound: HashMap<String, u32>,
    total: u32,
}

impl Slots {
    pub fn from_active(active: &[Migration]) -> Slots {
        let mut s = Slots::default();
        for m in active {
            s.take(m);
        }
        s
    }

    pub fn fits(&self, m: &Migration, limits: &Limits) -> bool {
        self.total < limits.cluster
            && self.outbound.get(&m.source).copied().unwrap_or(0) < limits.per_host_outbound
            && self.inbound.get(&m.destination).copied().unwrap_or(0) < limits.per_host_inbound
    }

    pub fn take(&mut self, m: &Migration) {
        *self.outbound.entry(m.source.clone()).or_default() += 1;
        *self.inbound.entry(m.destination.clone()).or_default() += 1;
        self.total += 1;
    }
}

async fn schedule_once(state: &AppState) -> Result<(), ServerError> {
    let active = state.store.active_migrations().await?;
    let mut slots = Slots::from_active(&active);
    for m in state.store.pending_in_order().await? {
        if !slots.fits(&m, &state.config.limits) {
            continue;
        }
        slots.take(&m);
        // Preparing before the task starts: a second pass can never start it twice.
        let m = state
            .store
            .set_migration_state(m.id, MigrationState::Preparing, None)
            .await?;
        driver::publish_migration(state, &m);
        driver::spawn(state.clone(), m.id, false);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::migration as m;

    #[test]
    fn per_host_and_cluster_limits() {
        let limits = Limits {
            per_host_outbound: 2,
            per_host_inbound: 1,
            cluster: 3,
        };
        let mut slots = Slots::from_active(&[m("a", "b")]);
        assert!(
            !slots.fits(&m("c", "b"), &limits),
            "b's inbound slot is taken"
        );
        assert!(slots.fits(&m("a", "c"), &limits));
        slots.take(&m("a", "c"));
        assert!(
            !slots.fits(&m("a", "d"), &limits),
            "a's two outbound slots are taken"
        );
        assert!(slots.fits(&m("d", "e"), &limits));
        slots.take(&m("d", "e"));
        assert!(!slots.fits(&m("f", "g"), &limits), "the cluster is full");
    }
}
