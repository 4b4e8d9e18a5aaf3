//! The control plane with real agents and real QEMU guests in lab hosts.

mod common;

use std::time::Duration;

use common::{Cluster, ADMIN};
use ferry_api::instances::{CreateInstance, Instance, InstanceState};
use ferry_api::migrations::{
    CreateMigration, Event, LogLine, Migration, MigrationKind, MigrationOptions, MigrationState,
    SamplePage, SAMPLES_PAGE_MAX,
};
use ferry_server::config::Limits;

fn slow() -> MigrationOptions {
    MigrationOptions {
        bandwidth_mib_s: Some(4),
        ..MigrationOptions::default()
    }
}

async fn metrics(c: &Cluster) -> String {
    c.admin.get_text("/metrics").await.expect("metrics")
}

/// A counter's or gauge's value, or a histogram's count, of the series with these labels.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    ferry_server::metrics::scraped_value(text, name, labels)
        .unwrap_or_else(|| panic!("no {name} {labels:?} in the metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_through_the_api_with_progress_logs_and_events() {
    let c = Cluster::start(2, Limits::default()).await;
    let vm = c.running_vm("web-1", "hv1", 0).await;
    assert_eq!(vm.host, "hv1");
    assert_eq!(vm.generation, 0);

    // Watch the cluster's events while the migration runs.
    let watcher = c.server.client(Some(ADMIN.into()));
    let events = tokio::spawn(async move {
        let mut seen = Vec::new();
        let _ = watcher
            .follow_events("/v1/events", |kind, data| {
                let e: Event = serde_json::from_str(data).unwrap();
                let end =
                    matches!(&e, Event::Migration { migration } if migration.state.is_terminal());
                seen.push((kind.to_string(), e));
                !end
            })
            .await;
        seen
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let metrics_before = metrics(&c).await;

    let m = c.migrate("web-1", "hv2", MigrationOptions::default()).await;
    assert_eq!(m.state, MigrationState::Pending);
    let m = c.wait_end(m.id, Duration::from_secs(120)).await;
    assert_eq!(m.state, MigrationState::Completed, "{m:?}");
    // The fleet's metrics, as Prometheus parses them, moved by this migration.
    let metrics_after = metrics(&c).await;
    let moved = |name: &str, labels: &[(&str, &str)]| {
        sample(&metrics_after, name, labels) - sample(&metrics_before, name, labels)
    };
    let live = [("kind", "live")];
    assert_eq!(
        moved(
            "ferry_migrations_finished_total",
            &[("state", "completed"), ("kind", "live")]
        ),
        1.0
    );
    assert_eq!(
        moved("ferry_migration_transferred_bytes_total", &live),
        m.stats.as_ref().expect("stats").bytes_transferred as f64
    );
    assert_eq!(moved("ferry_migration_duration_seconds", &live), 1.0);
    assert_eq!(moved("ferry_migration_qemu_pause_seconds", &[]), 1.0);
    assert_eq!(
        sample(&metrics_after, "ferry_hosts", &[("state", "online")]),
        2.0
    );
    assert!(m.preparing_at.is_some() && m.migrating_at.is_some() && m.completing_at.is_some());
    assert!(m.finished_at >= m.completing_at);
    let stats = m.stats.clone().expect("stats recorded");
    assert!(stats.bytes_transferred > 0 && stats.total_ms > 0);
    assert!(m.progress.is_some(), "latest progress recorded");

    let vm = c.instance("web-1").await;
    assert_eq!(
        (vm.host.as_str(), vm.generation, vm.state),
        ("hv2", 1, InstanceState::Running)
    );
    assert_eq!(vm.migration, None);
    assert_eq!(c.qemus_on("hv1"), 0, "the source QEMU is gone");
    assert_eq!(c.qemus_on("hv2"), 1);
    let report = c.verify(0).await;
    assert_eq!(report.errors, 0, "{report:?}");
    assert_eq!(report.checked, 16 * 256);

    let logs: Vec<LogLine> = c
        .admin
        .get(&format!("/v1/migrations/{}/logs", m.id))
        .await
        .unwrap();
    assert!(logs.len() >= 4, "{logs:?}");
    assert!(logs.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(logs.iter().any(|l| l.message.contains("completed")));
    assert!(
        logs.iter()
            .any(|l| l.message.starts_with("qemu: ") && l.message.contains(" round ")),
        "what QEMU reported is logged: {logs:?}"
    );
    assert!(
        logs.iter().any(|l| l.message.contains("with a pause of")),
        "{logs:?}"
    );
    // The streams ran over TLS with this migration's own certificates, whose files are gone
    // from both agents now that the job ended.
    assert!(
        logs.iter()
            .any(|l| l.message.starts_with("streams encrypted: TLS")),
        "{logs:?}"
    );
    for config in &c.agent_configs {
        let dir = config.state_dir.join("migrations");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(
            left.iter()
                .all(|p| p.extension().is_none_or(|e| e != "tls")),
            "credentials left on {}: {left:?}",
            config.name
        );
    }

    // The progress history, for charts opened after the fact: a read-only token reads it,
    // numbered from 1, in time order, ending at the completed sample; paged by `after`.
    let (_, viewer) = c
        .server
        .state
        .store
        .create_token("chart-viewer", ferry_server::store::Role::Reader, None)
        .await
        .unwrap();
    let reader = c.server.client(Some(viewer));
    let all: SamplePage = reader
        .get(&format!("/v1/migrations/{}/samples", m.id))
        .await
        .unwrap();
    let n = all.samples.len();
    assert!(n >= 3, "a copy sampled every 200 ms: {n} samples");
    assert_eq!(all.next_after, None, "one page holds them all");
    assert!(
        all.samples
            .iter()
            .enumerate()
            .all(|(i, s)| s.seq == i as u64 + 1),
        "seq from 1 without gaps"
    );
    assert!(all.samples.windows(2).all(|w| w[0].at <= w[1].at));
    assert!(
        all.samples
            .windows(2)
            .all(|w| w[0].progress.transferred_bytes <= w[1].progress.transferred_bytes),
        "the copy only grows"
    );
    assert!(all.samples[n - 1].progress.transferred_bytes > 0);
    let first: SamplePage = reader
        .get(&format!("/v1/migrations/{}/samples?limit=2", m.id))
        .await
        .unwrap();
    assert_eq!(first.samples, all.samples[..2]);
    assert_eq!(first.next_after, Some(2));
    let rest: SamplePage = reader
        .get(&format!("/v1/migrations/{}/samples?after=2", m.id))
        .await
        .unwrap();
    assert_eq!(rest.samples, all.samples[2..]);
    assert_eq!(rest.next_after, None);
    let none: SamplePage = reader
        .get(&format!("/v1/migrations/{}/samples?after={n}", m.id))
        .await
        .unwrap();
    assert!(none.samples.is_empty() && none.next_after.is_none());
    let err = reader
        .get::<SamplePage>(&format!("/v1/migrations/{}/samples?limit=0", m.id))
        .await
        .unwrap_err();
    common::assert_refused(&err, 400, "bad-query");
    let err = reader
        .get::<SamplePage>(&format!(
            "/v1/migrations/{}/samples?limit={}",
            m.id,
            SAMPLES_PAGE_MAX + 1
        ))
        .await
        .unwrap_err();
    common::assert_refused(&err, 400, "bad-query");
    for missing in [uuid::Uuid::new_v4().to_string(), "not-a-uuid".to_string()] {
        let err = reader
            .get::<SamplePage>(&format!("/v1/migrations/{missing}/samples"))
            .await
            .unwrap_err();
        common::assert_refused(&err, 404, "migration-not-found");
    }

    let seen = tokio::time::timeout(Duration::from_secs(10), events)
        .await
        .unwrap()
        .unwrap();
    let states: Vec<MigrationState> = seen
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Migration { migration } if migration.id == m.id => Some(migration.state),
            _ => None,
        })
        .collect();
    for s in [
        MigrationState::Pending,
        MigrationState::Preparing,
        MigrationState::Migrating,
        MigrationState::Completing,
        MigrationState::Completed,
    ] {
        assert!(states.contains(&s), "missing {s:?} in {states:?}");
    }
    assert!(
        seen.iter().any(|(kind, _)| kind == "progress"),
        "progress events streamed"
    );

    // The per-migration stream of a finished job: its record, then the end.
    let mut per_job = Vec::new();
    c.admin
        .follow_events(&format!("/v1/migrations/{}/events", m.id), |_, data| {
            per_job.push(serde_json::from_str::<Event>(data).unwrap());
            true
        })
        .await
        .unwrap();
    assert_eq!(per_job.len(), 1);

    // And back.
    let back = c.migrate("web-1", "hv1", MigrationOptions::default()).await;
    let back = c.wait_end(back.id, Duration::from_secs(120)).await;
    assert_eq!(back.state, MigrationState::Completed, "{back:?}");
    let vm = c.instance("web-1").await;
    assert_eq!((vm.host.as_str(), vm.generation), ("hv1", 2));
    assert_eq!(c.verify(0).await.errors, 0);

    // The first job taught the server what QEMU gets through hv1 -> hv2; the next plan there
    // uses that, not the probe.
    assert!(
        logs.iter()
            .any(|l| l.message.starts_with("learned: QEMU got through")),
        "{logs:?}"
    );
    let again = c.migrate("web-1", "hv2", MigrationOptions::default()).await;
    let again = c.wait_end(again.id, Duration::from_secs(120)).await;
    assert_eq!(again.state, MigrationState::Completed, "{again:?}");
    let plan = again.plan.expect("auto planned").plan;
    assert!(
        plan.reasons
            .iter()
            .any(|r| r.contains("in earlier migrations between these hosts")),
        "{:?}",
        plan.reasons
    );
    let first = m.plan.expect("auto planned").plan;
    assert!(
        first
            .reasons
            .iter()
            .any(|r| r.contains("no earlier migration")),
        "{:?}",
        first.reasons
    );
    assert_ne!(plan.prediction.rate_bps, first.prediction.rate_bps);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_honours_limits_in_order_and_one_migration_per_instance() {
    let c = Cluster::start(
        2,
        Limits {
            per_host_outbound: 1,
            per_host_inbound: 2,
            cluster: 5,
        },
    )
    .await;
    c.running_vm("a", "hv1", 0).await;
    c.running_vm("b", "hv1", 1).await;
    let first = c.migrate("a", "hv2", slow()).await;
    let second = c.migrate("b", "hv2", MigrationOptions::default()).await;
    c.wait_state(first.id, MigrationState::Migrating).await;
    assert_eq!(
        c.migration(second.id).await.state,
        MigrationState::Pending,
        "hv1's only outbound slot is taken"
    );

    let again = c
        .try_migrate("a", "hv2", MigrationOptions::default())
        .await
        .unwrap_err();
    assert_eq!(again.status(), Some(409));
    assert_eq!(again.code(), "migration-in-progress");

    // Let the first finish quickly: cancel it, then the second starts.
    let cancelled: Migration = c
        .admin
        .post(&format!("/v1/migrations/{}/cancel", first.id), &())
        .await
        .unwrap();
    assert!(cancelled.cancel_requested);
    let first = c.wait_end(first.id, Duration::from_secs(60)).await;
    assert_eq!(first.state, MigrationState::Cancelled);
    let second = c.wait_end(second.id, Duration::from_secs(120)).await;
    assert_eq!(second.state, MigrationState::Completed, "{second:?}");
    assert!(
        second.preparing_at.unwrap() >= first.finished_at.unwrap(),
        "FIFO: the second waited for the slot"
    );
    assert_eq!(c.instance("a").await.host, "hv1");
    assert_eq!(c.instance("b").await.host, "hv2");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_in_pending_preparing_and_migrating_leaves_the_guest_on_the_source() {
    let mut c = Cluster::start(
        2,
        Limits {
            per_host_outbound: 1,
            per_host_inbound: 2,
            cluster: 5,
        },
    )
    .await;
    c.running_vm("busy", "hv1", 0).await;
    c.running_vm("waiting", "hv1", 1).await;

    // Migrating: a slow copy, cancelled mid-way.
    let running = c.migrate("busy", "hv2", slow()).await;
    let pending = c.migrate("waiting", "hv2", slow()).await;
    let m = c.wait_state(running.id, MigrationState::Migrating).await;
    assert_eq!(m.state, MigrationState::Migrating);

    // Pending: ends at once.
    let p: Migration = c
        .admin
        .post(&format!("/v1/migrations/{}/cancel", pending.id), &())
        .await
        .unwrap();
    assert_eq!(p.state, MigrationState::Cancelled);

    let _: Migration = c
        .admin
        .post(&format!("/v1/migrations/{}/cancel", running.id), &())
        .await
        .unwrap();
    let m = c.wait_end(running.id, Duration::from_secs(60)).await;
    assert_eq!(m.state, MigrationState::Cancelled, "{m:?}");
    let logs: Vec<LogLine> = c
        .admin
        .get(&format!("/v1/migrations/{}/logs", m.id))
        .await
        .unwrap();
    assert!(
        logs.iter().any(|l| l.message.contains("cancel")),
        "{logs:?}"
    );

    // Preparing: with hv2's agent down, the job stays in Preparing (the server retries the
    // destination) until the cancel arrives.
    let agent2 = c.agents[1].take().unwrap();
    agent2.shutdown().await;
    let prep = c.migrate("busy", "hv2", slow()).await;
    let seen = c.wait_state(prep.id, MigrationState::Preparing).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(c.migration(seen.id).await.state, MigrationState::Preparing);
    let _: Migration = c
        .admin
        .post(&format!("/v1/migrations/{}/cancel", seen.id), &())
        .await
        .unwrap();
    c.agents[1] = Some(
        ferry_agent::start(c.agent_configs[1].clone())
            .await
            .unwrap(),
    );
    let prep = c.wait_end(prep.id, Duration::from_secs(60)).await;
    assert_eq!(prep.state, MigrationState::Cancelled, "{prep:?}");

    for (name, k) in [("busy", 0), ("waiting", 1)] {
        let vm = c.instance(name).await;
        assert_eq!(
            (vm.host.as_str(), vm.state, vm.generation),
            ("hv1", InstanceState::Running, 0)
        );
        assert_eq!(c.verify(k).await.errors, 0);
    }
    assert_eq!(c.qemus_on("hv2"), 0, "nothing left on the destination");
    assert_eq!(c.qemus_on("hv1"), 2);

    // A finished job cannot be cancelled.
    let err = c
        .admin
        .post::<_, Migration>(&format!("/v1/migrations/{}/cancel", m.id), &())
        .await
        .unwrap_err();
    common::assert_refused(&err, 409, "cannot-cancel");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_4xx_with_code_and_hint_and_change_nothing() {
    let c = Cluster::start(2, Limits::default()).await;
    c.running_vm("vm", "hv1", 0).await;
    let stopped = CreateInstance {
        name: "cold".into(),
        host: Some("hv1".into()),
        spec: c.guest_spec(1, 128, Cluster::small_guest()),
        disks: vec![],
        start: false,
    };
    let _: Instance = c.admin.post("/v1/instances", &stopped).await.unwrap();

    let (_, ro) = c
        .server
        .state
        .store
        .create_token("viewer", ferry_server::store::Role::Reader, None)
        .await
        .unwrap();
    let ro_client = c.server.client(Some(ro.clone()));
    let hosts: Vec<serde_json::Value> = ro_client.get("/v1/hosts").await.unwrap();
    assert_eq!(hosts.len(), 2, "read-only tokens can read");

    let migrate = |instance: &str, to: &str, options: &str| {
        format!(r#"{{"instance":"{instance}","destination":"{to}","options":{options}}}"#)
    };
    let admin = Some(ADMIN.to_string());
    /// method, path, JSON body, token, expected status, expected code
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<String>,
        Option<String>,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/v1/migrations",
            Some(migrate("nope", "hv2", "{}")),
            admin.clone(),
            404,
            "instance-not-found",
        ),
        (
            "POST",
            "/v1/migrations",
            Some(migrate("vm", "hv9", "{}")),
            admin.clone(),
            404,
            "host-not-found",
        ),
        (
            "POST",
            "/v1/migrations",
            Some(migrate("vm", "hv1", "{}")),
            admin.clone(),
            400,
            "same-host",
        ),
        (
            "POST",
            "/v1/migrations",
            Some("{not json".into()),
            admin.clone(),
            400,
            "malformed-json",
        ),
        (
            "POST",
            "/v1/migrations",
            Some(migrate("vm", "hv2", r#"{"bandwidth_mib_s":-5}"#)),
            admin.clone(),
            400,
            "malformed-json",
        ),
        (
            "POST",
            "/v1/migrations",
            Some(migrate("vm", "hv2", r#"{"downtime_ms":0}"#)),
            admin.clone(),
            400,
            "invalid-migration-options",
        ),
        (
            "POST",
            "/v1/migrations",
            Some(migrate("cold", "hv2", "{}")),
            admin.clone(),
            409,
            "instance-not-running",
        ),
        (
            "POST",
            "/v1/migrations",
            Some(migrate("vm", "hv2", "{}")),
            None,
            401,
            "unauthorized",
        ),
        (
            "POST",
            "/v1/migrations",
            Some(migrate("vm", "hv2", "{}")),
            Some("wrong-token".into()),
            401,
            "unauthorized",
        ),
        (
            "POST",
            "/v1/migrations",
            Some(migrate("vm", "hv2", "{}")),
            Some(ro),
            403,
            "forbidden",
        ),
        (
            "GET",
            "/v1/migrations/not-a-uuid",
            None,
            admin.clone(),
            404,
            "migration-not-found",
        ),
        (
            "GET",
            "/v1/migrations?state=bogus",
            None,
            admin.clone(),
            400,
            "bad-query",
        ),
        (
            "POST",
            "/v1/instances",
            Some(
                r#"{"name":"x","spec":{"memory_mib":0,"boot":{"kernel":"k","initrd":"i"}}}"#.into(),
            ),
            admin.clone(),
            400,
            "invalid-instance",
        ),
        (
            "DELETE",
            "/v1/instances/vm",
            None,
            admin.clone(),
            409,
            "instance-running",
        ),
    ];
    let http = reqwest::Client::builder()
        .use_preconfigured_tls((*c.server.client_tls()).clone())
        .build()
        .unwrap();
    for (method, path, body, token, status, code) in cases {
        let mut req = http.request(method.parse().unwrap(), format!("{}{path}", c.server.url()));
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{method} {path}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["code"], code, "{body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        assert!(
            body["hint"].as_str().is_some_and(|h| !h.is_empty()),
            "{body}"
        );
    }

    let all: Vec<Migration> = c.admin.get("/v1/migrations").await.unwrap();
    assert!(all.is_empty(), "no bad request created a job: {all:?}");
    let vm = c.instance("vm").await;
    assert_eq!(
        (vm.host.as_str(), vm.generation, vm.state),
        ("hv1", 0, InstanceState::Running)
    );
    let doc: serde_json::Value = c.admin.get("/v1/openapi.json").await.unwrap();
    assert!(
        doc["paths"]["/v1/migrations"]["post"].is_object(),
        "OpenAPI documents the API"
    );
    let audit: Vec<serde_json::Value> = c.admin.get("/v1/audit").await.unwrap();
    assert!(
        audit.iter().any(|a| a["action"] == "instance.create"),
        "{audit:?}"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_migration_moves_a_stopped_instance() {
    let c = Cluster::start(2, Limits::default()).await;
    let req = CreateInstance {
        name: "parked".into(),
        host: Some("hv1".into()),
        spec: c.guest_spec(0, 128, Cluster::small_guest()),
        disks: vec![],
        start: false,
    };
    let _: Instance = c.admin.post("/v1/instances", &req).await.unwrap();
    let m: Migration = c
        .admin
        .post(
            "/v1/migrations",
            &CreateMigration {
                instance: "parked".into(),
                destination: Some("hv2".into()),
                options: MigrationOptions::default(),
                kind: Some(MigrationKind::Cold),
            },
        )
        .await
        .unwrap();
    let m = c.wait_end(m.id, Duration::from_secs(60)).await;
    assert_eq!(m.state, MigrationState::Completed, "{m:?}");
    let vm = c.instance("parked").await;
    assert_eq!(
        (vm.host.as_str(), vm.generation, vm.state),
        ("hv2", 1, InstanceState::Stopped)
    );
    let started: Instance = c
        .admin
        .post("/v1/instances/parked/start", &())
        .await
        .unwrap();
    assert_eq!(started.state, InstanceState::Running);
    c.guest_control(0, "status", Duration::from_secs(90)).await;
    assert_eq!(c.qemus_on("hv2"), 1);
    assert_eq!(c.qemus_on("hv1"), 0);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandwidth_change_during_the_copy_takes_effect() {
    let c = Cluster::start(2, Limits::default()).await;
    c.running_vm("paced", "hv1", 0).await;
    // 4 MiB/s is below the guest's 8 MiB/s dirty rate: this copy would never converge.
    let m = c.migrate("paced", "hv2", slow()).await;
    c.wait_state(m.id, MigrationState::Migrating).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = c.migration(m.id).await;
    let rate = before.progress.as_ref().expect("sampled").throughput_bps;
    assert!(rate < 6.0 * 1048576.0, "capped at 4 MiB/s: {rate}");

    let bad = c
        .admin
        .patch::<_, Migration>(
            &format!("/v1/migrations/{}", m.id),
            &ferry_api::migrations::UpdateMigration {
                bandwidth_mib_s: None,
                downtime_ms: Some(0),
            },
        )
        .await
        .unwrap_err();
    common::assert_refused(&bad, 400, "invalid-migration-options");

    let changed: Migration = c
        .admin
        .patch(
            &format!("/v1/migrations/{}", m.id),
            &ferry_api::migrations::UpdateMigration {
                bandwidth_mib_s: Some(0),
                downtime_ms: Some(500),
            },
        )
        .await
        .unwrap();
    assert_eq!(changed.options.bandwidth_mib_s, None, "0 means unlimited");
    assert_eq!(changed.options.downtime_ms, Some(500));
    let done = c.wait_end(m.id, Duration::from_secs(60)).await;
    assert_eq!(
        done.state,
        MigrationState::Completed,
        "the uncapped copy converges: {done:?}"
    );
    assert_eq!(c.verify(0).await.errors, 0);
    let logs: Vec<LogLine> = c
        .admin
        .get(&format!("/v1/migrations/{}/logs", m.id))
        .await
        .unwrap();
    assert!(
        logs.iter().any(|l| l.message.contains("pacing changed")),
        "{logs:?}"
    );
    let late = c
        .admin
        .patch::<_, Migration>(
            &format!("/v1/migrations/{}", m.id),
            &ferry_api::migrations::UpdateMigration {
                bandwidth_mib_s: Some(10),
                downtime_ms: None,
            },
        )
        .await
        .unwrap_err();
    common::assert_refused(&late, 409, "cannot-update");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_plans_and_post_copy_is_opt_in_and_switchable_by_the_operator() {
    let c = Cluster::start(2, Limits::default()).await;
    c.running_vm("pc", "hv1", 0).await;

    // Without post-copy permitted the switch is refused and nothing changes.
    let auto = || MigrationOptions {
        policy: ferry_api::migrations::Policy::Auto,
        ..slow()
    };
    let m = c.migrate("pc", "hv2", auto()).await;
    let m = c.wait_state(m.id, MigrationState::Migrating).await;
    let plan = m.plan.clone().expect("auto planned before copying");
    // The user's 4 MiB/s cap is the rate the plan works with, and the guest writes 8 MiB/s.
    assert!(plan.plan.prediction.rate_bps <= 4.0 * 1048576.0, "{plan:?}");
    assert!(!plan.plan.prediction.converges, "{plan:?}");
    assert!(plan.params.auto_converge && !plan.params.postcopy);
    let refused = c
        .admin
        .post::<_, Migration>(&format!("/v1/migrations/{}/postcopy", m.id), &())
        .await
        .unwrap_err();
    common::assert_refused(&refused, 409, "postcopy-not-permitted");
    let _: Migration = c
        .admin
        .post(&format!("/v1/migrations/{}/cancel", m.id), &())
        .await
        .unwrap();
    let m = c.wait_end(m.id, Duration::from_secs(60)).await;
    assert_eq!(m.state, MigrationState::Cancelled, "{m:?}");
    assert_eq!(c.instance("pc").await.host, "hv1");

    // Permitted: the operator switches a copy that cannot converge, and it completes.
    let m = c
        .migrate(
            "pc",
            "hv2",
            MigrationOptions {
                post_copy: true,
                ..auto()
            },
        )
        .await;
    c.wait_state(m.id, MigrationState::Migrating).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _: Migration = c
        .admin
        .post(&format!("/v1/migrations/{}/postcopy", m.id), &())
        .await
        .expect("post-copy switch accepted");
    // Post-copy handed the guest over: a cancel now is refused, and the job completes.
    let late = c
        .admin
        .post::<_, Migration>(&format!("/v1/migrations/{}/cancel", m.id), &())
        .await
        .unwrap_err();
    common::assert_refused(&late, 409, "too-late-to-cancel");
    let m = c.wait_end(m.id, Duration::from_secs(120)).await;
    assert_eq!(m.state, MigrationState::Completed, "{m:?}");
    assert_eq!(c.instance("pc").await.host, "hv2");
    assert_eq!(c.verify(0).await.errors, 0);
    let logs: Vec<LogLine> = c
        .admin
        .get(&format!("/v1/migrations/{}/logs", m.id))
        .await
        .unwrap();
    for needle in ["plan: ", "dirties", "switched to post-copy by"] {
        assert!(
            logs.iter().any(|l| l.message.contains(needle)),
            "{needle:?} not in {logs:?}"
        );
    }
    c.shutdown().await;
}

/// Runs a command in lab host `host`'s namespace and insists that it works.
fn in_host(c: &Cluster, host: &str, args: &[&str]) {
    let ns = &c.lab.host(host).unwrap().netns;
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_post_copy_stream_is_reconnected_through_the_agents() {
    let c = Cluster::start(2, Limits::default()).await;
    // Incompressible content: post-copy must send all of it, which takes long enough.
    let full = ferry_lab::guest_config::GuestConfig {
        wss_mib: 128,
        fill: ferry_lab::guest_config::Fill::Random,
        ..Cluster::small_guest()
    };
    let req = ferry_api::instances::CreateInstance {
        name: "pc".into(),
        host: Some("hv1".into()),
        spec: c.guest_spec(0, 192, full),
        disks: vec![],
        start: true,
    };
    let _: ferry_api::instances::Instance = c.admin.post("/v1/instances", &req).await.unwrap();
    c.guest_control(0, "status", Duration::from_secs(90)).await;
    let m = c
        .migrate(
            "pc",
            "hv2",
            MigrationOptions {
                post_copy: true,
                policy: ferry_api::migrations::Policy::Manual,
                ..slow()
            },
        )
        .await;
    c.wait_state(m.id, MigrationState::Migrating).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Slow hv1's migration link so that post-copy runs long enough to be broken. A page the
    // guest faults on waits behind the background pages already queued, so the guest takes
    // tens of seconds to answer below; its 128 MiB of content take about a minute more.
    in_host(
        &c,
        "hv1",
        &[
            "tc", "qdisc", "replace", "dev", "mig0", "root", "tbf", "rate", "16mbit", "burst",
            "32kb", "latency", "400ms",
        ],
    );
    let _: Migration = c
        .admin
        .post(&format!("/v1/migrations/{}/postcopy", m.id), &())
        .await
        .expect("post-copy switch accepted");
    // Break the link only once the guest runs on hv2: before that the destination is still
    // loading the switchover package, and a broken stream then ends it. Once the source
    // reports post-copy it is stopped, so the guest's answer comes from hv2.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now: Migration = c
            .admin
            .get(&format!("/v1/migrations/{}", m.id))
            .await
            .unwrap();
        if now.progress.as_ref().map(|p| p.phase) == Some(ferry_migrate::Phase::Postcopy) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never in post-copy: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.guest_control(0, "status", Duration::from_secs(60)).await;
    // A failing link: reset every TCP connection from hv1 to hv2's migration address.
    let dest = c.lab.host("hv2").unwrap().migration_addr.to_string();
    in_host(&c, "hv1", &["ss", "-K", "dst", &dest]);
    let admin = c.admin.clone();
    let logs_of = move |id: uuid::Uuid| {
        let admin = admin.clone();
        async move {
            admin
                .get::<Vec<LogLine>>(&format!("/v1/migrations/{id}/logs"))
                .await
                .unwrap()
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !logs_of(m.id)
        .await
        .iter()
        .any(|l| l.message.contains("reconnects the post-copy stream"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no reconnect logged: {:?}",
            logs_of(m.id).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A reconnected post-copy stream is past the point of no return like the first one.
    let late = c
        .admin
        .post::<_, Migration>(&format!("/v1/migrations/{}/cancel", m.id), &())
        .await
        .unwrap_err();
    common::assert_refused(&late, 409, "too-late-to-cancel");
    in_host(&c, "hv1", &["tc", "qdisc", "del", "dev", "mig0", "root"]);
    let m = c.wait_end(m.id, Duration::from_secs(120)).await;
    assert_eq!(m.state, MigrationState::Completed, "{m:?}");
    assert_eq!(c.instance("pc").await.host, "hv2");
    assert_eq!(c.verify(0).await.errors, 0);
    assert!(logs_of(m.id)
        .await
        .iter()
        .any(|l| l.message.contains("post-copy stream broke")));
    c.shutdown().await;
}

/// A guest that ignores the power button (the lab guest booted with `acpi=off` has no power
/// button device, and it runs no guest agent) is powered off by QEMU once the graceful stop's
/// timeout has passed: the stop returns after the timeout, not before and not much later,
/// says so (`stopped_by` timeout in the audit), and leaves no QEMU behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_ignores_the_shutdown_request_is_stopped_hard_after_the_timeout() {
    let c = Cluster::start(1, Limits::default()).await;
    let mut spec = c.guest_spec(0, 192, Cluster::small_guest());
    spec.boot.cmdline.push_str(" acpi=off");
    let req = CreateInstance {
        name: "deaf".into(),
        host: Some("hv1".into()),
        spec,
        disks: vec![],
        start: true,
    };
    let vm: Instance = c.admin.post("/v1/instances", &req).await.expect("created");
    assert_eq!(vm.state, InstanceState::Running);
    c.guest_control(0, "status", Duration::from_secs(90)).await;
    assert_eq!(c.qemus_on("hv1"), 1);

    let asked = std::time::Instant::now();
    let stopped: Instance = c
        .admin
        .post("/v1/instances/deaf/stop?timeout_s=3", &())
        .await
        .expect("stopped");
    let took = asked.elapsed();
    assert_eq!(stopped.state, InstanceState::Stopped);
    assert!(
        took >= Duration::from_secs(3),
        "the guest had its 3 s to shut down: {took:?}"
    );
    assert!(
        took < Duration::from_secs(20),
        "then QEMU was stopped at once: {took:?}"
    );
    let audit: Vec<serde_json::Value> = c.admin.get("/v1/audit").await.unwrap();
    let stop = audit
        .iter()
        .find(|e| e["action"] == "instance.stop" && e["target"] == "deaf")
        .expect("the stop is audited");
    assert_eq!(stop["detail"]["stopped_by"], "timeout", "{stop}");
    assert_eq!(c.qemus_on("hv1"), 0, "no QEMU left");
    // It is stopped, not gone: it starts again.
    let again: Instance = c
        .admin
        .post("/v1/instances/deaf/start", &())
        .await
        .expect("starts again");
    assert_eq!(again.state, InstanceState::Running);
    let _: serde_json::Value = c
        .admin
        .post("/v1/instances/deaf/stop?force=true", &())
        .await
        .expect("forced stop");
    let _: serde_json::Value = c.admin.delete("/v1/instances/deaf").await.expect("deleted");
    c.shutdown().await;
}
