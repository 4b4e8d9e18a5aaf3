//! The convergence engine on real QEMU guests: the auto policy against a guest that writes
//! faster than the link, pacing changes while copying, post-copy, and the budget's abort.
//! Assertions are about outcomes (converged, verified, where the guest runs, throughput
//! following a cap), never about durations.

use std::time::Duration;

use ferry_lab::guest_config::GuestConfig;
use ferry_lab::net::unique_test_lab_name;
use ferry_lab::{GuestRequest, Lab, LabError, LabOptions, LabVm};
use ferry_migrate::plan::{self, PlanInputs};
use ferry_migrate::{
    AbortHandle, Action, Bandwidth, ControlPolicy, MigrateError, MigrationParams, Phase, Progress,
    SourceEvent, TimeoutAction,
};
use ferry_qmp::commands::{MigratePause, MigrateSetParameters, MigrationStatus, QueryMigrate};

async fn lab() -> Lab {
    ferry_lab::net::remove_orphan_test_labs();
    Lab::start(LabOptions::new(&unique_test_lab_name(), 2))
        .await
        .expect("lab starts")
}

/// 256 MiB of RAM, a 64 MiB working set rewritten at `rate` MiB/s.
fn writer_guest(rate: u32) -> GuestRequest {
    GuestRequest {
        name: "c-vm".into(),
        memory_mib: 256,
        vcpus: 1,
        disks: vec![],
        config: GuestConfig {
            wss_mib: 64,
            rate_mib_s: rate,
            ..GuestConfig::default()
        },
    }
}

async fn assert_intact(lab: &Lab, vm: &LabVm) {
    // A guest that was throttled hard stalls for a while after switchover on TCG (seconds,
    // over 10 s once under full-suite load) and misses the client's ARP requests meanwhile;
    // allow a minute (a known issue, see docs/PERFORMANCE.md).
    let report = vm
        .verify_within(lab, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("verify answers: {e}"));
    assert_eq!(report.errors, 0, "{report:?}");
    assert_eq!(report.checked, 64 * 256, "{report:?}");
}

/// Runs a migration to hv2, collecting samples and decisions.
async fn migrate(
    lab: &Lab,
    vm: &mut LabVm,
    params: &MigrationParams,
) -> (
    Result<ferry_migrate::MigrationOutcome, LabError>,
    Vec<Progress>,
    Vec<ferry_migrate::Decision>,
) {
    let (mut samples, mut decisions) = (Vec::new(), Vec::new());
    let (_abort, signal) = AbortHandle::new();
    let result = lab
        .migrate(
            vm,
            "hv2",
            params,
            &mut |e| match e {
                SourceEvent::Progress(p) => samples.push(p.clone()),
                SourceEvent::Decision(d) => decisions.push(d.clone()),
            },
            signal,
        )
        .await;
    (result, samples, decisions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_writing_faster_than_the_link_converges_under_auto_within_its_budget() {
    let lab = lab().await;
    // The "link" is a 16 MiB/s cap; the guest rewrites 32 MiB/s: plain pre-copy never ends.
    let link = 16.0 * 1048576.0;
    let mut vm = lab.boot_guest("hv1", &writer_guest(32)).await.unwrap();
    let dirty = ferry_migrate::dirty_rate::measure(vm.qemu.qmp(), Duration::from_secs(1))
        .await
        .unwrap();
    assert!(
        dirty > link,
        "the guest dirties {dirty} B/s, more than the link"
    );
    let inputs = PlanInputs {
        ram_bytes: 256 << 20,
        dirty_rate_bps: Some(dirty),
        link_bps: Some(link),
        host_cpus: 2,
        guest_vcpus: vm.qemu.spec().vcpus,
        downtime_ms: None,
        postcopy_permitted: false,
        budget: None,
        budget_scale: 1.0,
        timeout_action: TimeoutAction::Abort,
        disk_bytes: 0,
        // QEMU sent what the cap lets through before.
        learned_rate_bps: Some(link),
        learned_switchover_ms: None,
        source_rate_bps: None,
    };
    let base = MigrationParams {
        bandwidth: Bandwidth::Limited(16 << 20),
        ..MigrationParams::default()
    };
    let (params, plan) = plan::plan(&inputs, &base);
    assert!(!plan.prediction.converges, "{}", plan.summary());
    assert!(params.auto_converge, "{}", plan.summary());
    let (result, samples, decisions) = migrate(&lab, &mut vm, &params).await;
    let out = result.unwrap_or_else(|e| panic!("auto converges: {e}; decisions {decisions:?}"));
    assert_eq!(vm.host, "hv2");
    assert!(
        out.source.total_time_ms < params.completion_timeout.unwrap().as_millis() as u64,
        "within the budget"
    );
    // The plan arms auto-converge at the throttle that slows the writer below the link from
    // the first throttled round; the controller escalates only when that is not enough,
    // which depends on how fast this machine runs the guest, so either is fine here.
    let peak = samples
        .iter()
        .filter_map(|p| p.cpu_throttle_percent)
        .max()
        .unwrap_or(0);
    let escalated = decisions.iter().any(|d| {
        matches!(
            d.action,
            Action::SetThrottleCeiling { .. } | Action::SetDowntime { .. }
        )
    });
    assert!(
        peak >= u64::from(params.throttle_initial_pct) || escalated,
        "the guest was throttled as planned ({}%) or the controller escalated: peak {peak}%, {decisions:?}",
        params.throttle_initial_pct
    );
    assert_intact(&lab, &vm).await;
    lab.stop_guest(vm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandwidth_change_during_the_copy_is_followed() {
    let lab = lab().await;
    let mut vm = lab.boot_guest("hv1", &writer_guest(0)).await.unwrap();
    let params = MigrationParams {
        bandwidth: Bandwidth::Limited(8 << 20),
        ..MigrationParams::default()
    };
    // What the agent does on `ferry migration set`: migrate-set-parameters on the source.
    let qmp = vm.qemu.qmp().clone();
    let raise = tokio::spawn(async move {
        // 3 s into the copy by QEMU's own clock (the samples' clock): counted from when this
        // task starts, a slow destination start would move the raise into the capped window.
        loop {
            let info = qmp.execute(&QueryMigrate).await?;
            let ended = matches!(
                info.status,
                Some(MigrationStatus::Completed | MigrationStatus::Failed)
            );
            if info.total_time.unwrap_or(0) >= 3000 || ended {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        qmp.execute(&MigrateSetParameters {
            max_bandwidth: Some(64 << 20),
            ..Default::default()
        })
        .await
    });
    let (result, samples, _) = migrate(&lab, &mut vm, &params).await;
    result.expect("completes after the raise");
    raise
        .await
        .unwrap()
        .expect("the change is accepted while copying");
    let rate = |from: u64, to: u64| {
        let w: Vec<&Progress> = samples
            .iter()
            .filter(|p| p.phase == Phase::Precopy && p.elapsed_ms >= from && p.elapsed_ms < to)
            .collect();
        let (a, b) = (w.first().unwrap(), w.last().unwrap());
        (b.transferred_bytes - a.transferred_bytes) as f64 * 1000.0
            / (b.elapsed_ms - a.elapsed_ms) as f64
            / 1048576.0
    };
    let before = rate(1000, 2900);
    let after_ms = samples.last().unwrap().elapsed_ms;
    let after = rate(3500, after_ms.max(3800));
    assert!(before < 11.0, "capped at 8 MiB/s, measured {before:.1}");
    assert!(
        after > 2.0 * before,
        "raised to 64 MiB/s: {before:.1} -> {after:.1} MiB/s"
    );
    assert_intact(&lab, &vm).await;
    lab.stop_guest(vm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_copy_by_timeout_action_completes_and_the_guest_verifies() {
    let lab = lab().await;
    let mut vm = lab.boot_guest("hv1", &writer_guest(32)).await.unwrap();
    // 16 MiB/s against a 32 MiB/s writer never converges; after 2 s the budget's action
    // switches to post-copy, which always finishes.
    let params = MigrationParams {
        bandwidth: Bandwidth::Limited(16 << 20),
        postcopy: true,
        completion_timeout: Some(Duration::from_secs(2)),
        timeout_action: TimeoutAction::Postcopy,
        policy: ControlPolicy::Fixed,
        ..MigrationParams::default()
    };
    let (result, samples, decisions) = migrate(&lab, &mut vm, &params).await;
    result.unwrap_or_else(|e| panic!("post-copy completes: {e}"));
    assert_eq!(vm.host, "hv2");
    assert!(
        decisions.iter().any(|d| d.action == Action::StartPostcopy),
        "{decisions:?}"
    );
    // Pre-copy alone could not have finished: the writer outpaces the cap.
    assert!(samples
        .iter()
        .all(|p| p.phase != Phase::Completed || p.iteration >= 1));
    assert_intact(&lab, &vm).await;
    lab.stop_guest(vm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_abort_timeout_action_leaves_the_guest_running_on_the_source() {
    let lab = lab().await;
    let mut vm = lab.boot_guest("hv1", &writer_guest(32)).await.unwrap();
    let params = MigrationParams {
        bandwidth: Bandwidth::Limited(4 << 20),
        completion_timeout: Some(Duration::from_secs(2)),
        timeout_action: TimeoutAction::Abort,
        ..MigrationParams::default()
    };
    let (result, _, decisions) = migrate(&lab, &mut vm, &params).await;
    let err = result.expect_err("the budget runs out");
    assert!(
        matches!(err, LabError::Migrate(MigrateError::Timeout(_))),
        "{err}"
    );
    assert_eq!(err.code(), "migration-timeout");
    assert!(decisions
        .iter()
        .any(|d| d.action == Action::Abort { timeout: true }));
    assert_eq!(vm.host, "hv1");
    assert_intact(&lab, &vm).await;
    lab.stop_guest(vm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_post_copy_stream_is_reconnected_and_the_guest_verifies() {
    let lab = lab().await;
    let mut vm = lab.boot_guest("hv1", &writer_guest(32)).await.unwrap();
    // Switch to post-copy after 1 s, then send the rest slowly so that the stream can be
    // broken while it runs.
    let params = MigrationParams {
        bandwidth: Bandwidth::Limited(16 << 20),
        postcopy: true,
        postcopy_bandwidth: Some(4 << 20),
        completion_timeout: Some(Duration::from_secs(1)),
        timeout_action: TimeoutAction::Postcopy,
        ..MigrationParams::default()
    };
    // Break the stream from the source's side once post-copy runs, as a failing link would.
    let qmp = vm.qemu.qmp().clone();
    let breaker = tokio::spawn(async move {
        for _ in 0..600 {
            let info = qmp.execute(&QueryMigrate {}).await?;
            if info.status == Some(MigrationStatus::PostcopyActive) {
                tokio::time::sleep(Duration::from_millis(300)).await;
                qmp.execute(&MigratePause {}).await?;
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok::<_, ferry_qmp::QmpError>(false)
    });
    let (result, samples, _) = migrate(&lab, &mut vm, &params).await;
    assert!(
        breaker.await.unwrap().expect("QMP answers"),
        "the stream was broken"
    );
    result.unwrap_or_else(|e| panic!("recovered and completed: {e}"));
    assert_eq!(vm.host, "hv2");
    assert!(samples.iter().any(|p| p.phase == Phase::Postcopy));
    assert_intact(&lab, &vm).await;
    lab.stop_guest(vm).await;
}

/// The controller predicts again at the start of every round after the first, from what
/// QEMU shows: the samples carry the revision from then on, and a policy without a plan
/// announces its first prediction in the log (a decision that changes nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_round_revises_the_prediction_and_the_first_is_announced() {
    let lab = lab().await;
    let mut vm = lab.boot_guest("hv1", &writer_guest(8)).await.unwrap();
    // Capped well above the writer: several rounds, each smaller than the one before.
    let params = MigrationParams {
        bandwidth: Bandwidth::Limited(32 << 20),
        downtime_limit_ms: 50,
        sample_interval: Duration::from_millis(100),
        ..MigrationParams::default()
    };
    let (result, samples, decisions) = migrate(&lab, &mut vm, &params).await;
    let out = result.unwrap_or_else(|e| panic!("converges: {e}; {decisions:?}"));
    let rounds = out.source.iterations;
    assert!(rounds >= 3, "several rounds: {rounds}");
    let revised: Vec<&Progress> = samples.iter().filter(|p| p.revision.is_some()).collect();
    let first = revised.first().expect("a revision once round 2 began");
    let r = first.revision.as_ref().unwrap();
    assert!(r.round >= 2 && r.round <= first.iteration, "{r:?}");
    assert!(
        r.total_ms.is_some(),
        "a guest writing below the cap has an end: {r:?}"
    );
    assert!(
        samples
            .iter()
            .filter(|p| p.phase == Phase::Precopy && p.iteration < 2)
            .all(|p| p.revision.is_none()),
        "none during the first pass"
    );
    let notices: Vec<_> = decisions
        .iter()
        .filter(|d| matches!(d.action, Action::Revise { .. }))
        .collect();
    assert!(!notices.is_empty(), "{decisions:?}");
    assert!(
        notices[0].reason.starts_with("prediction revised at round"),
        "{}",
        notices[0].reason
    );
    assert_intact(&lab, &vm).await;
    lab.stop_guest(vm).await;
}
