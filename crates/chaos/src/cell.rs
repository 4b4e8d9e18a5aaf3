//! One cell: a fresh guest on hv1, a live migration to hv2, one fault in one phase (or at one
//! instant), and the checks. A fresh guest per cell, because a fault may legitimately lose the
//! guest (its only QEMU killed), and one cell's leftovers must not judge the next.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferry_api::instances::{CreateInstance, Instance, InstanceState};
use ferry_api::migrations::{CreateMigration, Migration, MigrationOptions, MigrationState, Policy};
use ferry_lab::guest_client;
use ferry_lab::guest_config::{GuestConfig, CONTROL_PORT};
use ferry_lab::instance::guest_instance_spec;
use uuid::Uuid;

use crate::cluster::ChaosLab;
use crate::error::ChaosError;
use crate::inject::{inflict, Injected};
use crate::matrix::{CellSpec, Fault, Phase};
use crate::observe::{describe, point, rank_of};
use crate::report::CellResult;
use crate::watch::Watcher;

/// The guest and migration every cell uses. The defaults make a copy take several rounds
/// and some seconds on a TCG guest, so that each phase lasts long enough to be hit.
#[derive(Debug, Clone)]
pub struct CellOptions {
    pub memory_mib: u32,
    /// The guest's memory writer: working set and rate. Its dirtying makes the copy take
    /// several rounds.
    pub wss_mib: u32,
    pub rate_mib_s: u32,
    /// The migration's bandwidth cap, so phases last long enough to hit.
    pub bandwidth_mib_s: u64,
    /// How long after the fault cleared the job must be over.
    pub job_bound: Duration,
    /// How long after the fault cleared the record must name where the guest runs.
    pub record_bound: Duration,
}

impl Default for CellOptions {
    fn default() -> CellOptions {
        CellOptions {
            memory_mib: 192,
            wss_mib: 24,
            rate_mib_s: 2,
            bandwidth_mib_s: 8,
            job_bound: Duration::from_secs(180),
            record_bound: Duration::from_secs(60),
        }
    }
}

/// How fast the record is polled while waiting for a phase: short phases (switchover,
/// completing) last a few hundred ms.
const PHASE_POLL: Duration = Duration::from_millis(20);
/// How long after the job ended the record may take to agree with the heartbeats.
const FINAL_RECORD_WAIT: Duration = Duration::from_secs(30);
/// How long the record and the heartbeats must agree before the record counts as true.
const RECORD_STABLE: Duration = Duration::from_secs(2);
/// The downtime target of pre-switchover cells, ms.
const PRE_SWITCHOVER_DOWNTIME_MS: u64 = 4000;
/// How long a guest may take to boot and answer on its control port (TCG is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs cell `spec` as cell number `n` (which picks the guest's name, address and MAC).
pub async fn run_cell(
    lab: &mut ChaosLab,
    spec: CellSpec,
    n: u8,
    opts: &CellOptions,
) -> Result<CellResult, ChaosError> {
    let started = Instant::now();
    let name = format!("chaos-{n}");
    let addr = SocketAddr::from((lab.net.guest_addr(n), CONTROL_PORT));
    let vm = create_guest(lab, &name, n, opts).await?;
    let watcher = Watcher::start([
        lab.run_dir(0, vm.id).join("serial.sock"),
        lab.run_dir(1, vm.id).join("serial.sock"),
    ]);
    let mut result = empty_result(spec);
    let outcome = drive(lab, spec, &vm, addr, opts, &watcher, &mut result).await;
    // Keep watching a moment after the checks, so a copy that starts late is still seen.
    tokio::time::sleep(Duration::from_secs(1)).await;
    result.watch = watcher.stop().await;
    result.two_copies = result.watch.two_copies;
    if let Err(e) = outcome {
        result.error = Some(format!("runner: {}", e.body()));
    }
    if result.two_copies {
        let why = format!(
            "TWO COPIES: both ran for {} ms, {} counters on both hosts",
            result.watch.both_running_ms, result.watch.shared_counters
        );
        result.error = Some(match result.error.take() {
            Some(e) => format!("{why}; {e}"),
            None => why,
        });
    }
    result.ok = result.error.is_none();
    result.seconds = started.elapsed().as_secs_f64();
    remove_guest(lab, &vm).await;
    Ok(result)
}

/// A result with nothing checked yet: also what a cell the runner could not even start
/// reports.
pub(crate) fn empty_result(spec: CellSpec) -> CellResult {
    CellResult {
        fault: spec.fault.as_str().into(),
        phase: spec.phase.map(|p| p.as_str()).unwrap_or("random").into(),
        hit: false,
        two_copies: false,
        ok: false,
        job_state: "not-started".into(),
        job_error: None,
        record_host: None,
        record_state: None,
        running_on: "none".into(),
        record_matched_s: None,
        verify_checked: None,
        verify_errors: None,
        at_fault: None,
        note: String::new(),
        watch: Default::default(),
        migration: None,
        seconds: 0.0,
        delay_ms: spec.delay_ms,
        error: None,
        logs: None,
    }
}

/// Everything between the guest's boot and the checks; fills `r`. An `Err` is the runner
/// failing (the server unreachable for good), recorded in the cell.
async fn drive(
    lab: &mut ChaosLab,
    spec: CellSpec,
    vm: &Instance,
    addr: SocketAddr,
    opts: &CellOptions,
    watcher: &Watcher,
    r: &mut CellResult,
) -> Result<(), ChaosError> {
    if watcher.wait_running(BOOT_TIMEOUT).await.is_none() {
        r.error = Some("the guest never printed a heartbeat".into());
        return Ok(());
    }
    guest_client::control_in_within(&lab.net.client_netns, addr, "status", BOOT_TIMEOUT)
        .await
        .map_err(|e| ChaosError::Timeout(format!("the guest's control port: {e}")))?;
    let post_copy = spec.phase == Some(Phase::PostCopy);
    let m: Migration = lab
        .api
        .post(
            "/v1/migrations",
            &CreateMigration {
                instance: vm.name.clone(),
                destination: Some(lab.host_name(1).to_string()),
                options: MigrationOptions {
                    bandwidth_mib_s: Some(opts.bandwidth_mib_s),
                    // QEMU sends the last pages unthrottled, so the switchover lasts only as
                    // long as there is much left: a generous downtime target makes QEMU
                    // switch over earlier, with more left, and the phase long enough to hit.
                    downtime_ms: (spec.phase == Some(Phase::PreSwitchover))
                        .then_some(PRE_SWITCHOVER_DOWNTIME_MS),
                    post_copy,
                    policy: Policy::Manual,
                    ..Default::default()
                },
                kind: None,
            },
        )
        .await?;
    r.migration = Some(m.id.to_string());

    let at = match (spec.phase, spec.delay_ms) {
        (Some(phase), _) => reach(lab, m.id, vm.id, spec.fault, phase).await?,
        (None, delay) => {
            tokio::time::sleep(Duration::from_millis(delay.unwrap_or(0))).await;
            let now = get_migration(lab, m.id).await?;
            r.phase = point(&now).label.to_string();
            Reached::Hit(now)
        }
    };
    let cleared = match at {
        Reached::Hit(now) => {
            r.at_fault = Some(describe(&now));
            let Injected { landed, note } = inflict(lab, spec.fault, &now, vm.id).await?;
            r.hit = landed;
            r.note = note;
            Instant::now()
        }
        Reached::Missed(now) => {
            r.at_fault = Some(describe(&now));
            r.note = format!("phase not hit (job was {}); no fault", describe(&now));
            Instant::now()
        }
    };

    // Within the bound after the fault cleared the record must name where the guest runs,
    // whether or not the job has ended by then (a copy slowed by a long outage still runs on
    // its source, and the record must say so).
    match record_agrees(lab, vm.id, watcher, cleared, cleared + opts.record_bound, r).await {
        Some(after) => r.record_matched_s = Some(after),
        None => {
            let e = format!(
                "{} s after the fault cleared the record says {}, the guest runs on {}",
                opts.record_bound.as_secs(),
                record_words(r),
                r.running_on
            );
            add_error(r, e)
        }
    }
    let end = wait_end(lab, m.id, cleared + opts.job_bound).await;
    r.job_state = end.state.as_str().into();
    r.job_error = end.error.as_ref().map(|e| e.code.clone());
    if !end.state.is_terminal() {
        let e = format!(
            "job still {} {} s after the fault cleared",
            describe(&end),
            opts.job_bound.as_secs()
        );
        add_error(r, e);
    }
    // And once the job is over, the record must still (or now) be true.
    let settle = Instant::now() + FINAL_RECORD_WAIT;
    if record_agrees(lab, vm.id, watcher, cleared, settle, r)
        .await
        .is_none()
    {
        let e = format!(
            "after the job ended the record says {}, the guest runs on {}",
            record_words(r),
            r.running_on
        );
        add_error(r, e);
    }
    if r.running_on != "none" {
        verify(lab, addr, r).await;
    } else if !spec.fault.kills_qemu() {
        add_error(r, "the guest runs nowhere, yet no QEMU was killed".into());
    }
    Ok(())
}

enum Reached {
    Hit(Migration),
    Missed(Migration),
}

/// Polls the record until the job is in `phase` (then the fault is due) or past it. For
/// post-copy, switches the job to post-copy once its first round copies. For a QEMU kill, the
/// QEMU must exist too (the destination's starts during Preparing).
async fn reach(
    lab: &ChaosLab,
    id: Uuid,
    vm: Uuid,
    fault: Fault,
    phase: Phase,
) -> Result<Reached, ChaosError> {
    let mut switched = false;
    loop {
        let m = get_migration(lab, id).await?;
        let mut p = point(&m);
        if phase == Phase::PostCopy && !switched && p.phase == Some(Phase::FirstRound) {
            let r: Result<Migration, _> = lab
                .api
                .post(&format!("/v1/migrations/{id}/postcopy"), &())
                .await;
            match r {
                Ok(_) => switched = true,
                Err(e) => tracing::warn!(error = %e, "switching to post-copy failed"),
            }
        }
        if switched && m.state == MigrationState::Completing {
            // Switched over after our post-copy request: post-copy started, even if no sample
            // says "postcopy" yet (the record's phase is then the switchover's).
            p.phase = Some(Phase::PostCopy);
        }
        let qemu_ready = match fault {
            Fault::KillDestinationQemu => lab
                .qemu_pid(lab.host_index(&m.destination).unwrap_or(1), vm)
                .is_some(),
            _ => true,
        };
        if p.phase == Some(phase) && qemu_ready {
            return Ok(Reached::Hit(m));
        }
        if p.rank > rank_of(phase) || (p.rank == rank_of(phase) && p.phase != Some(phase)) {
            return Ok(Reached::Missed(m));
        }
        tokio::time::sleep(PHASE_POLL).await;
    }
}

async fn get_migration(lab: &ChaosLab, id: Uuid) -> Result<Migration, ChaosError> {
    Ok(lab.api.get(&format!("/v1/migrations/{id}")).await?)
}

/// Polls the job until it is terminal or `deadline`; tolerates a server that is down for a
/// moment. Returns the newest record.
async fn wait_end(lab: &ChaosLab, id: Uuid, deadline: Instant) -> Migration {
    let mut last = None;
    loop {
        if let Ok(m) = get_migration(lab, id).await {
            if m.state.is_terminal() {
                return m;
            }
            last = Some(m);
        }
        if Instant::now() >= deadline {
            if let Some(m) = last {
                return m;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Polls until the record and the heartbeats agree, and have for [`RECORD_STABLE`]: the
/// record names the host whose copy runs (state running), or, if none runs, is not running.
/// Returns the seconds after `cleared` when the agreement began, or `None` at `deadline`.
/// Leaves the newest record and where the guest runs in `r`.
async fn record_agrees(
    lab: &ChaosLab,
    vm: Uuid,
    watcher: &Watcher,
    cleared: Instant,
    deadline: Instant,
    r: &mut CellResult,
) -> Option<f64> {
    // A copy counts as running for one window after its last beat, and the record may lag
    // the same way: agreement counts once it has held for RECORD_STABLE.
    let mut since: Option<Instant> = None;
    loop {
        let running = watcher.running();
        let record: Option<Instance> = lab.api.get(&format!("/v1/instances/{vm}")).await.ok();
        r.running_on = match running.as_slice() {
            [] => "none".into(),
            [h] => lab.host_name(*h).into(),
            _ => "both".into(),
        };
        let agrees = record.as_ref().is_some_and(|i| {
            r.record_host = Some(i.host.clone());
            r.record_state = Some(InstanceState::as_str(i.state).into());
            match running.as_slice() {
                [] => i.state != InstanceState::Running,
                [h] => i.host == lab.host_name(*h) && i.state == InstanceState::Running,
                _ => false,
            }
        });
        if !agrees {
            since = None;
        } else if since.get_or_insert_with(Instant::now).elapsed() >= RECORD_STABLE {
            return since.map(|t| t.saturating_duration_since(cleared).as_secs_f64());
        }
        if Instant::now() >= deadline && since.is_none() {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Adds one reason a cell is not ok to those found before.
fn add_error(r: &mut CellResult, e: String) {
    r.error = Some(match r.error.take() {
        Some(before) => format!("{before}; {e}"),
        None => e,
    });
}

fn record_words(r: &CellResult) -> String {
    format!(
        "{} {}",
        r.record_host.as_deref().unwrap_or("?"),
        r.record_state.as_deref().unwrap_or("?")
    )
}

async fn verify(lab: &ChaosLab, addr: SocketAddr, r: &mut CellResult) {
    let reply =
        guest_client::control_in_within(&lab.net.client_netns, addr, "verify", VERIFY_PATIENCE)
            .await;
    match reply.and_then(|s| guest_client::parse_verify(&s)) {
        Ok(v) => {
            r.verify_checked = Some(v.checked);
            r.verify_errors = Some(v.errors);
            if v.errors > 0 {
                let e = format!(
                    "memory verification: {} bad pages (first {:?})",
                    v.errors, v.first_error
                );
                add_error(r, e);
            }
        }
        Err(e) => add_error(r, format!("the running guest does not verify: {e}")),
    }
}

/// How long a guest that just moved may take to answer `verify`.
const VERIFY_PATIENCE: Duration = Duration::from_secs(30);

/// A fresh lab guest on hv1, started.
async fn create_guest(
    lab: &ChaosLab,
    name: &str,
    n: u8,
    opts: &CellOptions,
) -> Result<Instance, ChaosError> {
    let config = GuestConfig {
        ip: Some((lab.net.guest_addr(n), 24)),
        wss_mib: opts.wss_mib,
        rate_mib_s: opts.rate_mib_s,
        ..GuestConfig::default()
    };
    let req = CreateInstance {
        name: name.to_string(),
        host: Some(lab.host_name(0).to_string()),
        spec: guest_instance_spec(
            &lab.image,
            &config,
            opts.memory_mib,
            &format!("52:54:00:cc:00:{n:02x}"),
        ),
        disks: vec![],
        start: true,
    };
    Ok(lab.api.post("/v1/instances", &req).await?)
}

/// Stops and deletes the cell's guest; QEMUs the API cannot stop (a stuck job's) are killed
/// from their pidfiles, so no cell's guest eats the next one's CPU.
async fn remove_guest(lab: &ChaosLab, vm: &Instance) {
    let path = format!("/v1/instances/{}", vm.id);
    let _: Result<Instance, _> = lab.api.post(&format!("{path}/stop"), &()).await;
    for h in 0..2 {
        if let Some(pid) = lab.qemu_pid(h, vm.id) {
            // SAFETY: kill(2) has no memory-safety preconditions; pid is this instance's QEMU.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _: Result<Instance, _> = lab.api.delete(&path).await;
}
