//! What a migration cost the guest: a capped lab guest that dirties its memory faster than
//! the link sends gets throttled by auto-converge, and the job records and shows the
//! throttle's history, its peak, the CPU it took and QEMU's pause; an observer outside the
//! guest adds what it saw. Real agents, real QEMU, the lab's migration network.

mod common;

use std::time::Duration;

use common::Cluster;
use ferry_api::instances::{CreateInstance, Instance};
use ferry_api::migrations::{Migration, MigrationOptions, MigrationState};
use ferry_lab::guest_config::GuestConfig;
use ferry_migrate::Observation;
use ferry_server::config::Limits;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_throttled_migration_records_and_shows_the_throttle_and_what_observers_saw() {
    let c = Cluster::start(2, Limits::default()).await;
    // 64 MiB rewritten at 48 MiB/s against a link capped at 16 MiB/s: pre-copy alone does
    // not converge, so the plan turns auto-converge on.
    let busy = GuestConfig {
        wss_mib: 64,
        rate_mib_s: 48,
        ..Cluster::small_guest()
    };
    let req = CreateInstance {
        name: "busy".into(),
        host: Some("hv1".into()),
        spec: c.guest_spec(31, 192, busy),
        disks: vec![],
        start: true,
    };
    let _: Instance = c.admin.post("/v1/instances", &req).await.unwrap();
    c.guest_control(31, "status", Duration::from_secs(90)).await;
    let capped = MigrationOptions {
        bandwidth_mib_s: Some(16),
        ..Default::default()
    };
    let m = c.migrate("busy", "hv2", capped).await;
    let m = c.wait_end(m.id, Duration::from_secs(300)).await;
    let log = c.logs(m.id).await;
    assert_eq!(m.state, MigrationState::Completed, "{:?}\n{log}", m.error);

    let impact = m
        .impact
        .clone()
        .expect("the job records what the guest lived through");
    assert!(impact.throttle_peak_percent > 0, "{impact:?}\n{log}");
    assert!(!impact.throttle.is_empty(), "{impact:?}");
    assert_eq!(
        impact.throttle.last().map(|s| s.percent),
        Some(0),
        "the throttle ends released: {impact:?}"
    );
    assert!(impact.cpu_lost_ms > 0, "{impact:?}");
    assert_eq!(
        impact.qemu_pause_ms,
        m.stats.as_ref().map(|s| s.qemu_pause_ms),
        "QEMU's pause is QEMU's downtime figure"
    );
    let first = impact.throttle[0];
    assert!(
        log.contains(&format!(
            "auto-converge throttles the guest's vCPUs to {} %",
            first.percent
        )),
        "{log}"
    );
    assert!(log.contains("guest: QEMU's pause"), "{log}");
    assert!(log.contains("vCPU throttle peak"), "{log}");

    // An observer outside the guest reports what it saw; the job keeps it by observer.
    let seen = Observation {
        by: "test probe".into(),
        longest_gap_ms: 120,
        probes_sent: 1000,
        probes_lost: 20,
    };
    let path = format!("/v1/migrations/{}/observations", m.id);
    let after: Migration = c.admin.post(&path, &seen).await.unwrap();
    let kept = after.impact.expect("impact");
    assert_eq!(kept.observed, vec![seen.clone()]);
    assert_eq!(kept.throttle, impact.throttle, "the throttle history stays");
    assert!(c
        .logs(m.id)
        .await
        .contains("observed by test probe: longest gap 120 ms, 20 of 1000 probes lost"));
    // Nonsense is refused with a code and changes nothing.
    let bad = Observation {
        probes_lost: 2000,
        ..seen
    };
    let e = c
        .admin
        .post::<_, Migration>(&path, &bad)
        .await
        .expect_err("refused");
    assert_eq!(e.code(), "invalid-observation", "{e}");
    let now = c.migration(m.id).await;
    assert_eq!(now.impact.unwrap().observed[0].probes_lost, 20);
    c.shutdown().await;
}
