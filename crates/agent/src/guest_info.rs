//! What the guests' own agents (qemu-guest-agent) say: OS and addresses, refreshed in the
//! background, and a clean shutdown through them.
//!
//! Every instance has the guest agent's virtio-serial channel (see `ferry_qemu::qemu_args`);
//! a guest that runs no agent simply never answers, which costs one short timeout per round.
//! QEMU serves the channel to one client at a time, so every use opens its own short
//! connection and closes it: the poller never blocks a stop.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use ferry_api::instances::{GuestInfo, GuestInterface};
use ferry_qmp::guest_agent::ShutdownMode;
use ferry_qmp::GuestAgent;
use tracing::debug;
use uuid::Uuid;

use crate::Agent;

/// Pause between two rounds over every running instance.
const ROUND: Duration = Duration::from_secs(10);
/// How long one guest agent may take to answer a call before the guest counts as having none.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// A report older than this is dropped: the agent stopped answering (or the guest changed).
const STALE: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// Asks every running guest's agent for its facts, forever (a background task). The guests
/// are asked all at once: one without an agent costs a timeout, which must not delay the
/// others.
pub(crate) async fn follow_guests(agent: Arc<Agent>) {
    loop {
        let mut asks = tokio::task::JoinSet::new();
        for slot in agent.slots() {
            // An instance busy with an operation is looked at next round.
            let Ok(slot) = slot.try_lock() else { continue };
            let Some(process) = slot.process.as_ref() else {
                agent.forget_guest(&slot.record.id);
                continue;
            };
            let (id, path) = (slot.record.id, process.paths().qga_socket.clone());
            drop(slot);
            let agent = agent.clone();
            asks.spawn(async move {
                match ask(&GuestAgent::new(path).with_timeout(CALL_TIMEOUT)).await {
                    Some(info) => agent.remember_guest(id, info),
                    None => agent.drop_stale_guest(&id),
                }
            });
        }
        asks.join_all().await;
        tokio::time::sleep(ROUND).await;
    }
}

/// One round of questions to one guest agent; `None` when it does not answer.
async fn ask(ga: &GuestAgent) -> Option<GuestInfo> {
    if let Err(e) = ga.ping().await {
        debug!(path = %ga.path().display(), error = %e, "no guest agent answers");
        return None;
    }
    let version = ga.info().await.ok().map(|i| i.version);
    let os = ga.get_osinfo().await.ok();
    let interfaces = ga
        .network_get_interfaces()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.name != "lo")
        .map(|n| GuestInterface {
            name: n.name,
            mac: n.hardware_address,
            addresses: n
                .ip_addresses
                .iter()
                .map(|a| format!("{}/{}", a.ip_address, a.prefix))
                .collect(),
        })
        .collect();
    Some(GuestInfo {
        os: os
            .as_ref()
            .and_then(|o| o.pretty_name.clone().or(o.name.clone())),
        os_id: os.as_ref().and_then(|o| o.id.clone()),
        kernel: os.as_ref().and_then(|o| o.kernel_release.clone()),
        agent_version: version,
        interfaces,
        seen_at: Utc::now(),
    })
}

/// Asks the guest OS to power off through its agent; false when no agent took the request.
pub(crate) async fn power_off(path: &std::path::Path) -> bool {
    let ga = GuestAgent::new(path).with_timeout(CALL_TIMEOUT);
    if ga.ping().await.is_err() {
        return false;
    }
    match ga.shutdown(ShutdownMode::Powerdown).await {
        Ok(()) => true,
        Err(e) => {
            debug!(path = %path.display(), error = %e, "guest-shutdown failed");
            false
        }
    }
}

impl Agent {
    pub(crate) fn guest(&self, id: &Uuid) -> Option<GuestInfo> {
        self.guests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn remember_guest(&self, id: Uuid, info: GuestInfo) {
        self.guests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, info);
    }

    pub(crate) fn forget_guest(&self, id: &Uuid) {
        self.guests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    fn drop_stale_guest(&self, id: &Uuid) {
        let mut guests = self.guests.lock().unwrap_or_else(|p| p.into_inner());
        if guests
            .get(id)
            .is_some_and(|g| Utc::now() - g.seen_at > STALE)
        {
            guests.remove(id);
        }
    }
}
