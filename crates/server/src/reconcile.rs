//! The record follows the truth: every agent's heartbeat says which instances have a QEMU on
//! its host and in which state, and the server compares that with the store. An instance's host
//! is corrected from what the agents report (never from the server's own last belief); two
//! hosts running one guest raise an alarm and the copy that is not the owner is paused.
//!
//! A running migration is its driver's business: nothing here touches an instance while its
//! job is unfinished.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_api::agent::AgentInstance;
use ferry_api::instances::{Instance, InstanceState};
use ferry_api::migrations::{Event, MigrationState};
use tracing::{error, info, warn};
use uuid::Uuid;

use crate::agents::agent_client;
use crate::server::AppState;
use crate::ServerError;

/// What each host's agent reported last, and when.
///
/// A heartbeat is collected on the agent a moment before the server reads it, so one taken
/// during a migration can arrive after the job ended: its "running" on the source would look
/// like a second copy (or move the record back). When a job ends, [`Reports::settle`] marks
/// the reports of its hosts that may predate the end, and they no longer count for that
/// instance until a heartbeat collected after it arrives.
#[derive(Debug, Default)]
pub struct Reports {
    by_host: Mutex<HashMap<String, HostReport>>,
    /// (instance, host) -> the last heartbeat number of that host that may have been
    /// collected before the instance's migration ended.
    settled: Mutex<HashMap<(Uuid, String), u64>>,
}

#[derive(Debug)]
struct HostReport {
    at: Instant,
    /// Heartbeats received from this host so far, this one included.
    seq: u64,
    instances: Vec<AgentInstance>,
}

impl Reports {
    pub fn record(&self, host: &str, instances: Vec<AgentInstance>) {
        let mut by_host = self.lock();
        let seq = by_host.get(host).map(|r| r.seq + 1).unwrap_or(1);
        by_host.insert(
            host.to_string(),
            HostReport {
                at: Instant::now(),
                seq,
                instances,
            },
        );
        drop(by_host);
        self.settled_lock()
            .retain(|(_, h), last_stale| h != host || *last_stale >= seq);
    }

    /// A migration of `id` between `hosts` ends now: the report each host last sent, and the
    /// one it may be sending (collected before now), no longer speak for `id`.
    pub fn settle(&self, id: Uuid, hosts: &[&str]) {
        let by_host = self.lock();
        let mut settled = self.settled_lock();
        for host in hosts {
            let seq = by_host.get(*host).map(|r| r.seq).unwrap_or(0);
            settled.insert((id, host.to_string()), seq + 1);
        }
    }

    /// Whether `host`'s last report may speak for `id` (it was collected after any migration
    /// of `id` that involved `host` ended).
    fn speaks_for(&self, id: Uuid, host: &str, report: &HostReport) -> bool {
        self.settled_lock()
            .get(&(id, host.to_string()))
            .is_none_or(|last_stale| report.seq > *last_stale)
    }

    /// Every host that reported instance `id` within `fresh` (with a QEMU or without, e.g.
    /// crashed): (host, what it said).
    pub fn copies(&self, id: Uuid, fresh: Duration) -> Vec<(String, AgentInstance)> {
        let mut out: Vec<_> = self
            .lock()
            .iter()
            .filter(|(host, r)| r.at.elapsed() <= fresh && self.speaks_for(id, host, r))
            .flat_map(|(host, r)| {
                r.instances
                    .iter()
                    .filter(|i| i.id == id)
                    .map(|i| (host.clone(), i.clone()))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// What the guest agent of instance `id` on `host` last said, from that host's latest
    /// report (the guest's facts are as fresh as the agent's round, about 10 s).
    pub fn guest(&self, id: Uuid, host: &str) -> Option<ferry_api::instances::GuestInfo> {
        self.lock()
            .get(host)
            .and_then(|r| r.instances.iter().find(|i| i.id == id))
            .and_then(|i| i.guest.clone())
    }

    /// True when `host` reported within `fresh`.
    pub fn is_fresh(&self, host: &str, fresh: Duration) -> bool {
        self.lock()
            .get(host)
            .is_some_and(|r| r.at.elapsed() <= fresh)
    }

    /// True when `host` reported within `fresh`, in a report that speaks for `id`.
    pub fn is_fresh_for(&self, id: Uuid, host: &str, fresh: Duration) -> bool {
        self.lock()
            .get(host)
            .is_some_and(|r| r.at.elapsed() <= fresh && self.speaks_for(id, host, r))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HostReport>> {
        self.by_host.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn settled_lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Uuid, String), u64>> {
        self.settled.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the server does about one instance after comparing the store with the reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The guest runs on exactly one host, which is not the recorded one, and the recorded
    /// host reported recently without running it: the record moves there.
    Move {
        to: String,
    },
    /// Several hosts run the guest: alarm, and pause every copy but the owner's (all of them
    /// if the owner runs none: a paused guest is recoverable, two running ones are not).
    Fence {
        hosts: Vec<String>,
    },
    /// The record's state differs from what its own host reports.
    SetState(InstanceState),
    Nothing,
}

/// What a reported copy really is: an incoming copy whose migration ended without completing
/// (a post-copy destination whose source went away) lacks the pages it never received, so
/// however QEMU calls it, its guest cannot go on.
pub fn effective_state(reported: InstanceState, incoming_job_ended: bool) -> InstanceState {
    match (reported, incoming_job_ended) {
        (InstanceState::Running | InstanceState::Paused, true) => InstanceState::Error,
        (s, _) => s,
    }
}

/// The pure decision, for one instance not being migrated: `owner` is the recorded host,
/// `owner_fresh` whether it reported recently, `copies` what the hosts report.
pub fn decide(
    owner: &str,
    recorded: InstanceState,
    owner_fresh: bool,
    copies: &[(String, InstanceState)],
) -> Verdict {
    let running: Vec<&String> = copies
        .iter()
        .filter(|(_, s)| *s == InstanceState::Running)
        .map(|(h, _)| h)
        .collect();
    if running.len() > 1 {
        let owner_runs = running.iter().any(|h| *h == owner);
        let hosts = running
            .into_iter()
            .filter(|h| !owner_runs || *h != owner)
            .cloned()
            .collect();
        return Verdict::Fence { hosts };
    }
    if let [host] = running.as_slice() {
        if *host != owner {
            // An owner that did not report recently may still run the guest unseen: wait.
            return if owner_fresh {
                Verdict::Move {
                    to: (*host).clone(),
                }
            } else {
                Verdict::Nothing
            };
        }
    }
    if !owner_fresh {
        return Verdict::Nothing;
    }
    let own = copies
        .iter()
        .find(|(h, _)| h == owner)
        .map(|(_, s)| *s)
        .unwrap_or(match recorded {
            // No process on the owner: a crash stays visible until someone starts or stops it.
            InstanceState::Crashed => InstanceState::Crashed,
            _ => InstanceState::Stopped,
        });
    if own != recorded {
        Verdict::SetState(own)
    } else {
        Verdict::Nothing
    }
}

/// Runs after every heartbeat of `host`: reconciles each instance it or the store knows of on
/// that host, and removes incoming copies left behind by jobs that ended.
pub async fn after_heartbeat(state: &AppState, host: &str, reported: &[AgentInstance]) {
    let fresh = Duration::from_secs(state.config.heartbeat_timeout_s);
    let mut ids: Vec<Uuid> = reported.iter().map(|i| i.id).collect();
    if let Ok(owned) = state.store.list_instances(Some(host)).await {
        ids.extend(owned.iter().map(|i| i.id));
    }
    ids.sort();
    ids.dedup();
    for r in reported {
        if let Some(mid) = r.incoming {
            remove_if_stale_incoming(state, host, r, mid).await;
        }
    }
    for id in ids {
        if let Err(e) = reconcile_one(state, id, fresh).await {
            warn!(%id, error = %e.body.message, "reconciliation failed");
        }
    }
}

/// An incoming copy whose job ended without a commit never ran (it starts paused): the agent
/// is asked to remove it. A destination agent that was away during the job's end learns it
/// this way.
async fn remove_if_stale_incoming(state: &AppState, host: &str, r: &AgentInstance, mid: Uuid) {
    let ended = matches!(
        state.store.get_migration(mid).await,
        Ok(Some(m)) if matches!(m.state, MigrationState::Failed | MigrationState::Cancelled)
            && m.destination == host
    );
    if !ended || r.state == InstanceState::Running {
        return;
    }
    let Ok(agent) = agent_client(state, host).await else {
        return;
    };
    match agent
        .delete::<serde_json::Value>(&format!("/v1/migrations/{mid}/incoming"))
        .await
    {
        Ok(_) => {
            let message = format!(
                "the incoming copy of {} left on {host} by ended migration {mid} was removed",
                r.name
            );
            crate::driver::log(state, mid, "info", &message).await;
        }
        Err(e) => warn!(%mid, %host, error = %e, "stale incoming copy not removed yet"),
    }
}

async fn reconcile_one(state: &AppState, id: Uuid, fresh: Duration) -> Result<(), ServerError> {
    let Some(instance) = state.store.get_instance(&id.to_string()).await? else {
        return Ok(());
    };
    if instance.migration.is_some() {
        return Ok(());
    }
    let copies = state.reports.copies(id, fresh);
    let mut seen = Vec::new();
    let mut lost = None;
    for (host, copy) in &copies {
        let ended = match copy.incoming {
            Some(mid) => matches!(
                state.store.get_migration(mid).await?,
                Some(m) if matches!(m.state, MigrationState::Failed | MigrationState::Cancelled)
            ),
            None => false,
        };
        let s = effective_state(copy.state, ended);
        if s != copy.state {
            lost = Some((host.clone(), copy.incoming));
        }
        seen.push((host.clone(), s));
    }
    let owner_fresh = state.reports.is_fresh_for(id, &instance.host, fresh);
    match decide(&instance.host, instance.state, owner_fresh, &seen) {
        Verdict::Nothing => {}
        Verdict::SetState(s) => {
            state.store.set_instance_state(id, s).await?;
            if let Some((host, Some(mid))) = lost.filter(|_| s == InstanceState::Error) {
                let message = format!(
                    "{} on {host} never received all of its memory (migration {mid} ended in post-copy): the guest cannot go on; stop it and start it again",
                    instance.name
                );
                error!(instance = %instance.name, "{message}");
                alarm(state, &instance, "guest-lost", &message).await;
            }
            publish(state, id).await;
        }
        Verdict::Move { to } => {
            let from = instance.host.clone();
            state.store.move_instance_to(id, &to).await?;
            state
                .store
                .set_instance_state(id, InstanceState::Running)
                .await?;
            let message = format!(
                "record corrected: {} runs on {to}, not on {from} (reported by the agents)",
                instance.name
            );
            warn!(instance = %instance.name, %from, %to, "{message}");
            alarm(state, &instance, "record-corrected", &message).await;
            publish(state, id).await;
        }
        Verdict::Fence { hosts } => {
            let running: Vec<&str> = seen.iter().map(|(h, _)| h.as_str()).collect();
            let message = format!(
                "{} runs on several hosts ({}); pausing the copies on {} (owner {})",
                instance.name,
                running.join(", "),
                hosts.join(", "),
                instance.host
            );
            error!(instance = %instance.name, "{message}");
            alarm(state, &instance, "two-copies", &message).await;
            for host in hosts {
                fence(state, &host, id).await;
            }
        }
    }
    Ok(())
}

async fn fence(state: &AppState, host: &str, id: Uuid) {
    let result = match agent_client(state, host).await {
        Ok(agent) => agent
            .post::<_, AgentInstance>(&format!("/v1/instances/{id}/fence"), &())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.body.message),
    };
    match result {
        Ok(()) => info!(%id, %host, "copy paused (fenced)"),
        Err(e) => error!(%id, %host, error = %e, "copy could not be fenced"),
    }
}

/// An alarm: in the server's log, the audit log and the event stream.
async fn alarm(state: &AppState, instance: &Instance, code: &str, message: &str) {
    let detail = serde_json::json!({ "code": code, "message": message });
    if let Err(e) = state
        .store
        .audit("server", "instance.reconcile", &instance.name, &detail)
        .await
    {
        warn!(error = %e, "cannot write the alarm to the audit log");
    }
    state.events.publish(Event::Alarm {
        instance_id: instance.id,
        code: code.to_string(),
        message: message.to_string(),
    });
}

async fn publish(state: &AppState, id: Uuid) {
    if let Ok(Some(i)) = state.store.get_instance(&id.to_string()).await {
        state.events.publish(Event::Instance {
            instance: Box::new(i),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use InstanceState::*;

    fn copies(list: &[(&str, InstanceState)]) -> Vec<(String, InstanceState)> {
        list.iter().map(|(h, s)| (h.to_string(), *s)).collect()
    }

    fn report(id: Uuid, state: InstanceState) -> Vec<AgentInstance> {
        vec![AgentInstance {
            id,
            name: "vm".into(),
            state,
            qemu_state: None,
            pid: Some(1),
            incoming: None,
            guest: None,
            stopped_by: None,
        }]
    }

    /// The bench's false alarm: hv1's heartbeat, collected while the guest still ran there,
    /// arrives after the job moved it to hv2. Neither it nor the one stored before the end
    /// may speak for the instance; the first heartbeat after them does.
    #[test]
    fn heartbeats_from_before_a_job_ended_do_not_speak_for_its_instance() {
        let (id, other) = (Uuid::new_v4(), Uuid::new_v4());
        let fresh = Duration::from_secs(10);
        let r = Reports::default();
        r.record("hv1", report(id, Running));
        r.record("hv2", report(id, Paused));
        r.settle(id, &["hv1", "hv2"]);
        assert!(r.copies(id, fresh).is_empty(), "stored before the end");
        assert!(!r.is_fresh_for(id, "hv2", fresh));
        r.record("hv1", report(id, Running)); // collected before the end, read after
        assert!(r.copies(id, fresh).is_empty(), "in flight at the end");
        r.record("hv2", report(id, Running));
        r.record("hv2", report(id, Running));
        assert_eq!(r.copies(id, fresh).len(), 1, "hv2 collected after the end");
        assert!(r.is_fresh_for(id, "hv2", fresh));
        r.record("hv1", vec![]);
        assert_eq!(
            r.copies(id, fresh)
                .iter()
                .map(|(h, _)| h.as_str())
                .collect::<Vec<_>>(),
            ["hv2"]
        );
        // Other instances were never held back.
        r.record("hv1", report(other, Running));
        assert_eq!(r.copies(other, fresh).len(), 1);
        assert!(r.settled_lock().is_empty(), "barriers go once passed");
    }

    #[test]
    fn two_running_copies_pause_the_one_that_is_not_the_owner() {
        let v = decide(
            "hv1",
            Running,
            true,
            &copies(&[("hv1", Running), ("hv2", Running)]),
        );
        assert_eq!(
            v,
            Verdict::Fence {
                hosts: vec!["hv2".into()]
            }
        );
    }

    #[test]
    fn two_running_copies_neither_the_owner_are_both_paused() {
        let v = decide(
            "hv3",
            Stopped,
            true,
            &copies(&[("hv1", Running), ("hv2", Running)]),
        );
        assert_eq!(
            v,
            Verdict::Fence {
                hosts: vec!["hv1".into(), "hv2".into()]
            }
        );
    }

    /// The case: the record stayed on the source (in error) while the destination ran
    /// the guest. The record moves to where it runs.
    #[test]
    fn the_record_moves_to_the_only_host_that_runs_the_guest() {
        let v = decide(
            "hv1",
            Error,
            true,
            &copies(&[("hv1", Paused), ("hv2", Running)]),
        );
        assert_eq!(v, Verdict::Move { to: "hv2".into() });
        let v = decide("hv1", Running, true, &copies(&[("hv2", Running)]));
        assert_eq!(v, Verdict::Move { to: "hv2".into() });
    }

    #[test]
    fn an_owner_that_has_not_reported_may_still_run_it_so_nothing_moves() {
        let v = decide("hv1", Running, false, &copies(&[("hv2", Running)]));
        assert_eq!(v, Verdict::Nothing);
    }

    /// The chaos matrix's case: the source QEMU killed during post-copy. The destination's
    /// QEMU still says running, but it never got all of its memory: the record says error.
    #[test]
    fn a_post_copy_destination_whose_job_ended_is_in_error_not_running() {
        assert_eq!(effective_state(Running, true), Error);
        assert_eq!(effective_state(Running, false), Running);
        assert_eq!(effective_state(Crashed, true), Crashed);
        let seen = copies(&[("hv2", effective_state(Running, true))]);
        assert_eq!(
            decide("hv2", Running, true, &seen),
            Verdict::SetState(Error)
        );
    }

    #[test]
    fn the_owner_s_own_report_sets_the_state() {
        assert_eq!(
            decide("hv1", Error, true, &copies(&[("hv1", Running)])),
            Verdict::SetState(Running)
        );
        assert_eq!(
            decide("hv1", Running, true, &copies(&[("hv1", Crashed)])),
            Verdict::SetState(Crashed)
        );
        assert_eq!(
            decide("hv1", Running, true, &copies(&[])),
            Verdict::SetState(Stopped)
        );
        assert_eq!(decide("hv1", Crashed, true, &copies(&[])), Verdict::Nothing);
        assert_eq!(
            decide("hv1", Running, true, &copies(&[("hv1", Running)])),
            Verdict::Nothing
        );
    }
}
