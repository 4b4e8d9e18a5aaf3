//! Pre-flight checks with real agents: each lab host made unfit on its own (memory, CPU
//! features, network, disabled, storage), the candidates' ranking, and jobs that fail in
//! Preparing with the check's code and hint while the guest keeps running on the source.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::Cluster;
use ferry_agent::DatastoreConfig;
use ferry_api::checks::{Candidate, CheckStatus};
use ferry_api::instances::InstanceState;
use ferry_api::migrations::{
    CreateMigration, LogLine, Migration, MigrationOptions, MigrationState,
};
use ferry_server::config::Limits;

fn failing(c: &Candidate) -> BTreeSet<String> {
    c.checks
        .iter()
        .filter(|k| k.status == CheckStatus::Fail)
        .map(|k| k.name.clone())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

async fn candidates(c: &Cluster, instance: &str, query: &str) -> Vec<Candidate> {
    c.admin
        .get(&format!(
            "/v1/instances/{instance}/migration-candidates{query}"
        ))
        .await
        .expect("candidates")
}

async fn migrations(c: &Cluster) -> Vec<Migration> {
    c.admin.get("/v1/migrations").await.unwrap()
}

/// A job refused by a pre-flight check: Failed in Preparing with the check's name as code and
/// its hint; nothing ran on the destination; the guest still runs on `source`.
async fn assert_refused(c: &Cluster, m: &Migration, code: &str, source: &str, k: u8) {
    let m = c.wait_end(m.id, Duration::from_secs(60)).await;
    assert_eq!(m.state, MigrationState::Failed, "{m:?}");
    let err = m.error.clone().expect("error recorded");
    assert_eq!(err.code, code, "{err:?}");
    assert!(!err.hint.is_empty(), "{err:?}");
    assert!(
        m.preparing_at.is_some() && m.migrating_at.is_none(),
        "{m:?}"
    );
    let vm = c.instance(&m.instance_name).await;
    assert_eq!(
        (vm.host.as_str(), vm.state, vm.migration),
        (source, InstanceState::Running, None)
    );
    assert_eq!(
        c.qemus_on(&m.destination),
        0,
        "nothing started on the destination"
    );
    let logs: Vec<LogLine> = c
        .admin
        .get(&format!("/v1/migrations/{}/logs", m.id))
        .await
        .unwrap();
    assert!(
        logs.iter()
            .any(|l| l.message.starts_with(&format!("check {code}: fail"))),
        "{logs:?}"
    );
    assert!(
        logs.iter()
            .any(|l| l.message.starts_with("check network: ")),
        "every verdict is logged: {logs:?}"
    );
    c.guest_control(k, "status", Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_unfit_host_is_explained_and_refused_and_the_fit_one_is_picked() {
    // hv2: too little RAM; hv3: lacks cx16 (qemu64 needs it); hv4: not on the lab network;
    // hv5: disabled; hv6: fit.
    let c = Cluster::start_with(6, Limits::default(), |a| match a.name.as_str() {
        "hv2" => a.ram_capacity_mib = Some(300),
        "hv3" => a.cpu_flags_mask = vec!["cx16".into()],
        "hv4" => a.networks.clear(),
        _ => {}
    })
    .await;
    let _: ferry_api::hosts::Host = c.admin.post("/v1/hosts/hv5/disable", &()).await.unwrap();
    c.running_vm("vm", "hv1", 0).await;

    let all = candidates(&c, "vm", "").await;
    let by: Vec<(&str, u32, bool)> = all
        .iter()
        .map(|x| (x.host.as_str(), x.rank, x.fit))
        .collect();
    assert_eq!(by.len(), 5, "every other host: {all:#?}");
    assert_eq!(by[0], ("hv6", 1, true), "{all:#?}");
    assert!(by[1..].iter().all(|(_, _, fit)| !fit), "{all:#?}");
    assert!(all.windows(2).all(|w| w[0].rank + 1 == w[1].rank));
    let find = |h: &str| all.iter().find(|x| x.host == h).unwrap();
    assert_eq!(failing(find("hv2")), set(&["memory"]), "{:#?}", find("hv2"));
    assert_eq!(
        failing(find("hv3")),
        set(&["cpu-features"]),
        "{:#?}",
        find("hv3")
    );
    assert_eq!(
        failing(find("hv4")),
        set(&["network"]),
        "{:#?}",
        find("hv4")
    );
    assert_eq!(
        failing(find("hv5")),
        set(&["host-enabled"]),
        "{:#?}",
        find("hv5")
    );
    let mem = find("hv2")
        .checks
        .iter()
        .find(|k| k.name == "memory")
        .unwrap();
    assert!(mem.overridable && !mem.hint.is_empty());
    assert_eq!(mem.values["needed_mib"], 192);
    let cpu = find("hv3")
        .checks
        .iter()
        .find(|k| k.name == "cpu-features")
        .unwrap();
    assert!(!cpu.overridable);
    assert_eq!(cpu.values["missing"], serde_json::json!(["cx16"]));
    assert!(cpu.hint.contains("cx16"), "{cpu:?}");
    // The fit host was probed: the source reached its migration port.
    let port = find("hv6")
        .checks
        .iter()
        .find(|k| k.name == "migration-port-reachable")
        .expect("probed");
    assert_eq!(port.status, CheckStatus::Pass, "{port:?}");
    assert!(port.values["latency_ms"].is_number(), "{port:?}");
    // Unfit hosts are not probed.
    assert!(!find("hv2")
        .checks
        .iter()
        .any(|k| k.name == "migration-port-reachable"));

    // One destination, no probe; asking changes nothing.
    let one = candidates(&c, "vm", "?destination=hv2&probe=false").await;
    assert_eq!(one.len(), 1);
    assert_eq!((one[0].host.as_str(), one[0].fit), ("hv2", false));
    assert!(migrations(&c).await.is_empty(), "a check creates no job");

    // Jobs to unfit hosts fail in Preparing with the check's code and hint.
    let m = c.migrate("vm", "hv3", MigrationOptions::default()).await;
    assert_refused(&c, &m, "cpu-features", "hv1", 0).await;
    let m = c.migrate("vm", "hv4", MigrationOptions::default()).await;
    assert_refused(&c, &m, "network", "hv1", 0).await;
    // --force does not override a check that is not overridable.
    let forced = MigrationOptions {
        force: true,
        ..MigrationOptions::default()
    };
    let m = c.migrate("vm", "hv3", forced.clone()).await;
    assert_refused(&c, &m, "cpu-features", "hv1", 0).await;
    // A disabled host is refused at once.
    let err = c
        .try_migrate("vm", "hv5", MigrationOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "host-disabled");

    // Without a destination, the best fit host is picked.
    let m: Migration = c
        .admin
        .post(
            "/v1/migrations",
            &CreateMigration {
                instance: "vm".into(),
                destination: None,
                options: MigrationOptions::default(),
                kind: None,
            },
        )
        .await
        .expect("auto-picked");
    assert_eq!(m.destination, "hv6");
    let m = c.wait_end(m.id, Duration::from_secs(120)).await;
    assert_eq!(m.state, MigrationState::Completed, "{m:?}");
    assert_eq!(c.verify(0).await.errors, 0);

    // Memory: refused, then forced.
    let m = c.migrate("vm", "hv2", MigrationOptions::default()).await;
    assert_refused(&c, &m, "memory", "hv6", 0).await;
    let m = c.migrate("vm", "hv2", forced).await;
    let m = c.wait_end(m.id, Duration::from_secs(120)).await;
    assert_eq!(m.state, MigrationState::Completed, "{m:?}");
    let logs: Vec<LogLine> = c
        .admin
        .get(&format!("/v1/migrations/{}/logs", m.id))
        .await
        .unwrap();
    assert!(
        logs.iter().any(|l| l
            .message
            .starts_with("check memory: fail, overridden by --force")),
        "{logs:?}"
    );
    assert_eq!(c.instance("vm").await.host, "hv2");
    assert_eq!(c.verify(0).await.errors, 0);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_on_the_source_only_makes_no_host_fit() {
    // The guest image's directory is a datastore of hv1 only.
    let (image, _) = tokio::task::spawn_blocking(|| {
        ferry_lab::image::ensure_image(&ferry_lab::image::ImageOptions::default())
    })
    .await
    .unwrap()
    .expect("guest image");
    let dir = image.kernel.parent().unwrap().to_path_buf();
    let c = Cluster::start_with(2, Limits::default(), move |a| {
        if a.name == "hv1" {
            a.datastores = vec![DatastoreConfig {
                name: "images".into(),
                path: dir.clone(),
                identity: None,
            }];
        } else {
            a.datastores.clear();
        }
    })
    .await;
    c.running_vm("vm", "hv1", 0).await;

    let all = candidates(&c, "vm", "?probe=false").await;
    assert_eq!(all.len(), 1);
    assert!(!all[0].fit);
    assert_eq!(failing(&all[0]), set(&["storage"]), "{all:#?}");
    let storage = all[0].checks.iter().find(|k| k.name == "storage").unwrap();
    assert!(storage.message.contains("images"), "{storage:?}");

    let err = c
        .admin
        .post::<_, Migration>(
            "/v1/migrations",
            &CreateMigration {
                instance: "vm".into(),
                destination: None,
                options: MigrationOptions::default(),
                kind: None,
            },
        )
        .await
        .unwrap_err();
    common::assert_refused(&err, 409, "no-fit-destination");
    assert!(err.to_string().contains("hv2: storage"), "{err}");
    assert!(migrations(&c).await.is_empty());

    let m = c
        .migrate(
            "vm",
            "hv2",
            MigrationOptions {
                force: true,
                ..MigrationOptions::default()
            },
        )
        .await;
    assert_refused(&c, &m, "storage", "hv1", 0).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_migration_network_is_found_before_anything_starts() {
    let c = Cluster::start(2, Limits::default()).await;
    c.running_vm("cut", "hv1", 0).await;
    let baseline: ferry_api::checks::CpuBaseline = c.admin.get("/v1/cpu-baseline").await.unwrap();
    assert_eq!(baseline.hosts.len(), 2);
    assert!(
        baseline.model.is_some(),
        "every host runs at least qemu64: {baseline:?}"
    );

    let ok = candidates(&c, "cut", "?destination=hv2").await;
    assert!(ok[0].fit, "{ok:?}");
    let probe = ok[0]
        .checks
        .iter()
        .find(|k| k.name == "migration-port-reachable")
        .expect("probed");
    assert!(probe.values["latency_ms"].as_f64().is_some(), "{probe:?}");

    // hv1's link to the migration network goes down: the source cannot reach hv2's ports.
    let ns = c.lab.host("hv1").unwrap().netns.clone();
    let down = std::process::Command::new("ip")
        .args(["-n", &ns, "link", "set", "mig0", "down"])
        .status()
        .unwrap();
    assert!(down.success());
    // Past the probe cache's window (1 s in the test cluster), the next check probes again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let cut = candidates(&c, "cut", "?destination=hv2").await;
    assert!(!cut[0].fit);
    assert_eq!(
        failing(&cut[0]),
        set(&["migration-port-reachable"]),
        "{cut:?}"
    );
    let probe_off = candidates(&c, "cut", "?destination=hv2&probe=false").await;
    assert!(
        probe_off[0].fit,
        "without the probe only the cheap checks run"
    );

    let m = c
        .migrate(
            "cut",
            "hv2",
            MigrationOptions {
                force: true,
                ..Default::default()
            },
        )
        .await;
    assert_refused(&c, &m, "migration-port-reachable", "hv1", 0).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_whose_agent_is_down_is_not_fit() {
    let mut c = Cluster::start(2, Limits::default()).await;
    c.running_vm("alone", "hv1", 0).await;
    c.agents[1].take().unwrap().shutdown().await;
    let down = candidates(&c, "alone", "?destination=hv2").await;
    assert!(!down[0].fit, "{down:?}");
    assert!(failing(&down[0]).contains("agent-reachable"), "{down:?}");
    let check = down[0]
        .checks
        .iter()
        .find(|k| k.name == "agent-reachable")
        .unwrap();
    assert!(!check.hint.is_empty() && !check.overridable, "{check:?}");
    assert!(migrations(&c).await.is_empty(), "asking changed nothing");
    c.shutdown().await;
}

/// What hv2's migration interface received during one candidates request for `vm` to hv2.
async fn bytes_of_a_check(c: &Cluster, vm: &str) -> (u64, Option<f64>) {
    let netns = c.lab.host("hv2").unwrap().netns.clone();
    let before = ferry_lab::net::migration_rx_bytes(&netns).unwrap();
    let found = candidates(c, vm, "?destination=hv2").await;
    let after = ferry_lab::net::migration_rx_bytes(&netns).unwrap();
    let probe = found[0]
        .checks
        .iter()
        .find(|k| k.name == "migration-port-reachable")
        .expect("probed");
    (after - before, probe.values["bandwidth_mbit_s"].as_f64())
}

/// A host pair's link bandwidth is measured (data pushed for `bandwidth_probe_ms`) until a
/// migration between them has completed; from then on the checks only connect and reuse the
/// stored measurement, also once `link_cache_s` has passed, so a migration starts at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_that_has_migrated_is_not_measured_again() {
    let c = Cluster::start_with_server(
        2,
        Limits::default(),
        |_| {},
        |s| s.preflight.link_cache_s = 1,
    )
    .await;
    c.running_vm("linked", "hv1", 0).await;
    let pushed = 4 << 20;
    let (first, bandwidth) = bytes_of_a_check(&c, "linked").await;
    assert!(first > pushed, "the first check measures: {first} bytes");
    assert!(bandwidth.is_some());
    // Past the link cache and with no migration yet: measured again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (second, _) = bytes_of_a_check(&c, "linked").await;
    assert!(
        second > pushed,
        "no migration yet: measured again ({second} bytes)"
    );

    for to in ["hv2", "hv1"] {
        let m = c.migrate("linked", to, MigrationOptions::default()).await;
        let m = c.wait_end(m.id, Duration::from_secs(120)).await;
        assert_eq!(m.state, MigrationState::Completed, "{:?}", m.error);
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (later, reused) = bytes_of_a_check(&c, "linked").await;
    assert!(
        later < 1 << 20,
        "after a completed migration the check only connects: {later} bytes"
    );
    assert!(reused.is_some(), "the stored measurement is reported");
    c.shutdown().await;
}
