//! The agent API end to end: two standalone agents on two lab hosts drive real QEMU guests
//! through define/start, a live migration exactly as the server would, and agent restarts
//! (needs root and QEMU).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_api::agent::{
    AgentInstance, DefineInstance, IncomingReady, LaunchIncoming, PrepareIncoming, SourceState,
    SourceStatus, StartSource,
};
use ferry_api::hosts::HostFacts;
use ferry_api::instances::{BootSpec, InstanceSpec, InstanceState, NicSpec};
use ferry_api::{ApiClient, ApiError};
use ferry_lab::guest_client::{control_in, control_in_within, parse_verify};
use ferry_lab::guest_config::{GuestConfig, CONTROL_PORT};
use ferry_lab::image::{ensure_image, ImageOptions};
use ferry_lab::instance::guest_instance_spec;
use ferry_lab::net::{remove_orphan_test_labs, unique_test_lab_name, LabNet};
use ferry_migrate::{Bandwidth, MigrationParams};
use uuid::Uuid;

mod common;

use common::{client, config};

fn status_of(e: &ApiError) -> (Option<u16>, String) {
    (e.status(), e.code())
}

/// Kills every QEMU the agents left (they are detached on purpose) when the test ends, also on
/// failure; the lab's own drop then removes the namespaces.
struct Reaper(Vec<PathBuf>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for state in &self.0 {
            let Ok(dirs) = std::fs::read_dir(state.join("run")) else {
                continue;
            };
            for d in dirs.flatten() {
                if let Some(pid) = std::fs::read_to_string(d.path().join("qemu.pid"))
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    if pid > 1 {
                        // SAFETY: kill(2) has no memory-safety preconditions.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
    }
}

fn tap_exists(netns: &str, tap: &str) -> bool {
    std::process::Command::new("ip")
        .args(["-n", netns, "link", "show", "dev", tap])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

async fn guest_control(lab: &LabNet, ip: Ipv4Addr, cmd: &str) -> Result<String, String> {
    let addr = SocketAddr::from((ip, CONTROL_PORT));
    control_in(&lab.client_netns, addr, cmd)
        .await
        .map_err(|e| e.to_string())
}

async fn wait_guest_answers(lab: &LabNet, ip: Ipv4Addr) {
    let addr = SocketAddr::from((ip, CONTROL_PORT));
    control_in_within(&lab.client_netns, addr, "status", Duration::from_secs(120))
        .await
        .expect("guest answers");
}

async fn assert_guest_intact(lab: &LabNet, ip: Ipv4Addr) {
    let reply = guest_control(lab, ip, "verify")
        .await
        .expect("verify answers");
    let report = parse_verify(&reply).expect("verify parses");
    assert!(report.checked > 0, "{report:?}");
    assert_eq!(report.errors, 0, "{report:?}");
}

async fn instances(c: &ApiClient) -> Vec<AgentInstance> {
    c.get("/v1/instances").await.expect("list instances")
}

async fn wait_state(c: &ApiClient, id: Uuid, want: InstanceState) -> AgentInstance {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = instances(c).await.into_iter().find(|i| i.id == id);
        if let Some(i) = &found {
            if i.state == want {
                return i.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "instance never {want:?}: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls the source until its half ends; returns the final status and every sample seq.
async fn poll_until_done(c: &ApiClient, mid: Uuid, mut after: u64) -> (SourceStatus, Vec<u64>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seqs = Vec::new();
    loop {
        let st: SourceStatus = c
            .get(&format!("/v1/migrations/{mid}?after={after}"))
            .await
            .expect("status");
        for (seq, _) in &st.samples {
            assert!(*seq > after, "samples come after {after}");
            after = *seq;
            seqs.push(*seq);
        }
        if st.state != SourceState::Running {
            return (st, seqs);
        }
        assert!(Instant::now() < deadline, "migration never ended");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_bad_requests_with_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = ferry_agent::start(config("solo", tmp.path(), None, Ipv4Addr::LOCALHOST))
        .await
        .expect("agent starts");
    let c = client(&agent);
    let facts: HostFacts = c.get("/v1/facts").await.unwrap();
    assert_eq!(facts.name, "solo");
    assert_eq!(facts.accel, "tcg");
    assert!(facts.cores > 0 && facts.ram_total_mib > 0);
    assert!(instances(&c).await.is_empty());

    let unknown = Uuid::new_v4();
    let e = c
        .post::<_, AgentInstance>(&format!("/v1/instances/{unknown}/start"), &())
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), (Some(404), "instance-not-found".into()));
    let e = c
        .delete::<()>(&format!("/v1/instances/{unknown}"))
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), (Some(404), "instance-not-found".into()));
    let e = c
        .post::<_, AgentInstance>("/v1/instances/not-a-uuid/start", &())
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), (Some(400), "bad-request".into()));
    let e = c
        .put::<_, AgentInstance>(
            &format!("/v1/instances/{unknown}"),
            &serde_json::json!({"name": 3}),
        )
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), (Some(400), "bad-request".into()));
    let bad_net = DefineInstance {
        name: "x".into(),
        spec: InstanceSpec {
            memory_mib: 128,
            vcpus: 1,
            cpu_model: "qemu64".into(),
            machine: "pc".into(),
            boot: BootSpec {
                kernel: Some("/nonexistent".into()),
                initrd: Some("/nonexistent".into()),
                cmdline: String::new(),
                ..BootSpec::default()
            },
            disks: vec![],
            nics: vec![NicSpec {
                network: "nowhere".into(),
                mac: "52:54:00:00:00:01".into(),
                ipv4: None,
                gateway: None,
            }],
        },
    };
    let e = c
        .put::<_, AgentInstance>(&format!("/v1/instances/{unknown}"), &bad_net)
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), (Some(422), "unknown-network".into()), "{e}");
    let message = e.body().message;
    assert!(
        message.contains("'nowhere'") && message.contains("its networks: lab (bridge "),
        "the refusal names the host's networks: {message}"
    );

    let e = c.get::<()>("/v1/nothing-here").await.unwrap_err();
    assert_eq!(status_of(&e), (Some(404), "no-such-endpoint".into()));
    let st: SourceStatus = c.get(&format!("/v1/migrations/{unknown}")).await.unwrap();
    assert_eq!(st.state, SourceState::Unknown);
    let e = c
        .post::<_, SourceStatus>(&format!("/v1/migrations/{unknown}/cancel"), &())
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), (Some(404), "migration-not-found".into()));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_migration_through_two_agents_survives_agent_restarts() {
    remove_orphan_test_labs();
    let lab = LabNet::create(&unique_test_lab_name(), 2).expect("lab");
    let (image, _) = ensure_image(&ImageOptions::default()).expect("guest image");
    let tmp = tempfile::tempdir().unwrap();
    let (dir1, dir2) = (tmp.path().join("a1"), tmp.path().join("a2"));
    let _reaper = Reaper(vec![dir1.clone(), dir2.clone()]);
    let h1 = lab.host("hv1").unwrap().clone();
    let h2 = lab.host("hv2").unwrap().clone();
    let cfg1 = config("hv1", &dir1, Some(h1.netns.clone()), h1.migration_addr);
    let cfg2 = config("hv2", &dir2, Some(h2.netns.clone()), h2.migration_addr);
    let mut a1 = ferry_agent::start(cfg1.clone()).await.expect("agent 1");
    let mut a2 = ferry_agent::start(cfg2.clone()).await.expect("agent 2");
    let (mut c1, mut c2) = (client(&a1), client(&a2));

    // Define and start on hv1.
    let ip = lab.guest_addr(0);
    let id = Uuid::new_v4();
    let name = "agent-vm".to_string();
    let config = GuestConfig {
        ip: Some((ip, 24)),
        wss_mib: 16,
        rate_mib_s: 8,
        ..GuestConfig::default()
    };
    let spec = guest_instance_spec(&image, &config, 128, "52:54:00:a9:00:01");
    let define = DefineInstance {
        name: name.clone(),
        spec: spec.clone(),
    };
    let path = format!("/v1/instances/{id}");
    let defined: AgentInstance = c1.put(&path, &define).await.expect("define");
    assert_eq!(defined.state, InstanceState::Stopped);
    let again: AgentInstance = c1.put(&path, &define).await.expect("define is idempotent");
    assert_eq!(again, defined);
    let _: AgentInstance = c1.post(&format!("{path}/start"), &()).await.expect("start");
    let running = wait_state(&c1, id, InstanceState::Running).await;
    wait_guest_answers(&lab, ip).await;

    let e = c1.delete::<()>(&path).await.unwrap_err();
    assert_eq!(status_of(&e), (Some(409), "instance-running".into()));
    let e = c1
        .post::<_, AgentInstance>(&format!("{path}/start"), &())
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(409));

    // Restart agent 1: the guest keeps running and is re-adopted.
    a1.shutdown().await;
    assert!(
        guest_control(&lab, ip, "status").await.is_ok(),
        "guest survives the agent"
    );
    a1 = ferry_agent::start(cfg1.clone())
        .await
        .expect("agent 1 restarts");
    c1 = client(&a1);
    let adopted = wait_state(&c1, id, InstanceState::Running).await;
    assert_eq!(adopted.pid, running.pid, "the same QEMU was re-adopted");

    // Live migration hv1 -> hv2, driven as the server would.
    let mid = Uuid::new_v4();
    let params = MigrationParams::default();
    let ready: IncomingReady = c2
        .post(
            &format!("/v1/migrations/{mid}/incoming"),
            &PrepareIncoming {
                instance_id: id,
                name: name.clone(),
                spec: spec.clone(),
                params: params.clone(),
                disks: Vec::new(),
                tls: None,
            },
        )
        .await
        .expect("incoming");
    assert!(
        ready.addr.starts_with(&h2.migration_addr.to_string()),
        "{}",
        ready.addr
    );
    let incoming = instances(&c2).await;
    assert_eq!(incoming[0].incoming, Some(mid));
    let started: SourceStatus = c1
        .post(
            &format!("/v1/migrations/{mid}/source"),
            &StartSource {
                instance_id: id,
                destination: ready.addr.clone(),
                params: params.clone(),
                disks: Vec::new(),
                tls: None,
            },
        )
        .await
        .expect("source starts");
    assert_eq!(started.state, SourceState::Running);
    let (done, seqs) = poll_until_done(&c1, mid, 0).await;
    assert_eq!(done.state, SourceState::Completed, "{:?}", done.error);
    assert!(!seqs.is_empty(), "progress was sampled");
    assert!(done.outcome.as_ref().unwrap().transferred_bytes > 0);
    // The completed source never runs again by itself, and cannot be cancelled any more.
    let e = c1
        .post::<_, SourceStatus>(&format!("/v1/migrations/{mid}/cancel"), &())
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), (Some(409), "too-late-to-cancel".into()));
    let e = c1
        .post::<_, AgentInstance>(&format!("/v1/migrations/{mid}/resume"), &())
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), (Some(409), "source-handed-over".into()));
    assert_eq!(
        instances(&c1).await[0].qemu_state.as_deref(),
        Some("postmigrate")
    );
    // The destination holds the whole guest but keeps it paused until the server commits.
    let ready: AgentInstance = c2
        .post(&format!("/v1/migrations/{mid}/confirm"), &())
        .await
        .expect("confirm");
    assert_eq!(ready.qemu_state.as_deref(), Some("paused"));
    assert_eq!(ready.incoming, Some(mid));
    let confirmed: AgentInstance = c2
        .post(&format!("/v1/migrations/{mid}/start"), &())
        .await
        .expect("start");
    assert_eq!(confirmed.state, InstanceState::Running);
    assert_eq!(confirmed.incoming, None);
    let e = c2
        .delete::<ferry_api::agent::RemovedIncoming>(&format!("/v1/migrations/{mid}/incoming"))
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), (Some(409), "guest-running-here".into()));
    let _: () = c1
        .post(&format!("/v1/migrations/{mid}/finish"), &())
        .await
        .expect("finish");
    assert!(instances(&c1).await.is_empty(), "gone from hv1");
    assert!(
        !tap_exists(&h1.netns, &ferry_agent::tap_name(&id, 0)),
        "hv1 tap removed"
    );
    assert!(
        tap_exists(&h2.netns, &ferry_agent::tap_name(&id, 0)),
        "hv2 tap exists"
    );
    let on2 = instances(&c2).await;
    assert_eq!(on2.len(), 1);
    assert_eq!((on2[0].id, on2[0].state), (id, InstanceState::Running));
    assert_guest_intact(&lab, ip).await;

    // A slow migration hv2 -> hv1, with the source agent restarted mid-way, then cancelled.
    let mid2 = Uuid::new_v4();
    let slow = MigrationParams {
        bandwidth: Bandwidth::Limited(4 << 20),
        ..MigrationParams::default()
    };
    // Started ahead, as the server does while the source measures the dirty rate: QEMU
    // waits in incoming mode, then listens with the parameters. A launch that fails leaves
    // nothing behind, so the preparation reports the same error and not a known migration.
    let launch_path = format!("/v1/migrations/{mid2}/incoming/launch");
    let broken = LaunchIncoming {
        instance_id: id,
        name: name.clone(),
        spec: InstanceSpec {
            boot: BootSpec {
                kernel: Some("/nonexistent/vmlinuz".into()),
                ..spec.boot.clone()
            },
            ..spec.clone()
        },
        tls: None,
    };
    let e = c1
        .post::<_, serde_json::Value>(&launch_path, &broken)
        .await
        .unwrap_err();
    let failed_launch = status_of(&e);
    assert!(
        instances(&c1).await.is_empty(),
        "nothing left: {failed_launch:?}"
    );
    let e = c1
        .post::<_, IncomingReady>(
            &format!("/v1/migrations/{mid2}/incoming"),
            &PrepareIncoming {
                instance_id: id,
                name: name.clone(),
                spec: broken.spec.clone(),
                params: slow.clone(),
                disks: Vec::new(),
                tls: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), failed_launch);
    let mid2 = Uuid::new_v4();
    let launch_path = format!("/v1/migrations/{mid2}/incoming/launch");
    let launch = LaunchIncoming {
        instance_id: id,
        name: name.clone(),
        spec: spec.clone(),
        tls: None,
    };
    let _: serde_json::Value = c1.post(&launch_path, &launch).await.expect("launch");
    let _: serde_json::Value = c1
        .post(&launch_path, &launch)
        .await
        .expect("launch is idempotent");
    let launched = instances(&c1).await;
    assert_eq!(launched.len(), 1);
    assert_eq!(launched[0].incoming, Some(mid2));
    assert_eq!(launched[0].qemu_state.as_deref(), Some("inmigrate"));
    let ready: IncomingReady = c1
        .post(
            &format!("/v1/migrations/{mid2}/incoming"),
            &PrepareIncoming {
                instance_id: id,
                name: name.clone(),
                spec: spec.clone(),
                params: slow.clone(),
                disks: Vec::new(),
                tls: None,
            },
        )
        .await
        .expect("incoming on hv1");
    assert_eq!(
        instances(&c1).await[0].pid,
        launched[0].pid,
        "the QEMU launched ahead"
    );
    let _: SourceStatus = c2
        .post(
            &format!("/v1/migrations/{mid2}/source"),
            &StartSource {
                instance_id: id,
                destination: ready.addr.clone(),
                params: slow.clone(),
                disks: Vec::new(),
                tls: None,
            },
        )
        .await
        .expect("slow source starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last_seq = 0;
    while last_seq < 3 {
        let st: SourceStatus = c2.get(&format!("/v1/migrations/{mid2}")).await.unwrap();
        assert_eq!(st.state, SourceState::Running, "{:?}", st.error);
        last_seq = st.samples.last().map(|s| s.0).unwrap_or(0);
        assert!(Instant::now() < deadline, "no samples");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pid_on2 = instances(&c2).await[0].pid;
    a2.shutdown().await;
    a2 = ferry_agent::start(cfg2.clone())
        .await
        .expect("agent 2 restarts");
    c2 = client(&a2);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let st: SourceStatus = c2
        .get(&format!("/v1/migrations/{mid2}?after={last_seq}"))
        .await
        .unwrap();
    assert_eq!(st.state, SourceState::Running, "{:?}", st.error);
    assert!(
        st.samples.iter().all(|(s, _)| *s > last_seq) && !st.samples.is_empty(),
        "sampling goes on after the restart with later seqs: {:?}",
        st.samples.iter().map(|s| s.0).collect::<Vec<_>>()
    );
    let cancelled: SourceStatus = c2
        .post(&format!("/v1/migrations/{mid2}/cancel"), &())
        .await
        .expect("cancel");
    assert_eq!(
        cancelled.state,
        SourceState::Cancelled,
        "{:?}",
        cancelled.error
    );
    let back = wait_state(&c2, id, InstanceState::Running).await;
    assert_eq!(back.pid, pid_on2, "still the same QEMU on hv2");
    let removed: ferry_api::agent::RemovedIncoming = c1
        .delete(&format!("/v1/migrations/{mid2}/incoming"))
        .await
        .expect("remove incoming");
    assert!(!removed.kept_images, "no disks, nothing kept");
    assert!(instances(&c1).await.is_empty());
    assert_guest_intact(&lab, ip).await;

    // Stop (the guest powers off on the ACPI button, well before the timeout) and delete.
    let asked = std::time::Instant::now();
    let stopped: AgentInstance = c2
        .post(&format!("{path}/stop?timeout_s=40"), &())
        .await
        .expect("stop");
    assert_eq!(stopped.state, InstanceState::Stopped);
    assert_eq!(
        stopped.stopped_by,
        Some(ferry_api::instances::StopMethod::Acpi),
        "the guest powered off by itself in {:?}",
        asked.elapsed()
    );
    let _: () = c2.delete(&path).await.expect("delete");
    assert!(instances(&c2).await.is_empty());
    assert!(
        !tap_exists(&h2.netns, &ferry_agent::tap_name(&id, 0)),
        "hv2 tap removed"
    );
    let e = c2.delete::<()>(&path).await.unwrap_err();
    assert_eq!(status_of(&e), (Some(404), "instance-not-found".into()));
    a1.shutdown().await;
    a2.shutdown().await;
}

/// A stand-in for the server's two agent endpoints: refuses the first joins, then issues a
/// credential, and records heartbeats.
#[derive(Clone, Default)]
struct FakeServer {
    joins: std::sync::Arc<std::sync::atomic::AtomicU32>,
    beats: std::sync::Arc<std::sync::Mutex<Vec<ferry_api::agent::Heartbeat>>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_with_the_token_then_heartbeats() {
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    use ferry_api::agent::{Heartbeat, JoinRequest, JoinResponse};
    use std::sync::atomic::Ordering;

    let fake = FakeServer::default();
    let app = axum::Router::new()
        .route(
            "/v1/agents/join",
            post(
                |axum::extract::State(f): axum::extract::State<FakeServer>,
                 headers: HeaderMap,
                 axum::Json(req): axum::Json<JoinRequest>| async move {
                    let n = f.joins.fetch_add(1, Ordering::SeqCst);
                    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok());
                    if n == 0 || bearer != Some("Bearer jt") || req.join_token != "jt" {
                        return Err(StatusCode::SERVICE_UNAVAILABLE);
                    }
                    let ca = common::test_ca();
                    let issued = ca
                        .sign_agent_csr(
                            &req.csr,
                            &req.name,
                            &[],
                            &[Ipv4Addr::LOCALHOST.into()],
                            ferry_pki::AGENT_CERT_VALIDITY,
                        )
                        .map_err(|_| StatusCode::BAD_REQUEST)?;
                    Ok(axum::Json(JoinResponse {
                        agent_token: format!("issued-{}", req.name),
                        certificate: issued.chain_pem,
                        ca_pem: ca.ca_pem().to_string(),
                    }))
                },
            ),
        )
        .route(
            "/v1/agents/heartbeat",
            post(
                |axum::extract::State(f): axum::extract::State<FakeServer>,
                 headers: HeaderMap,
                 axum::Json(beat): axum::Json<Heartbeat>| async move {
                    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok());
                    if bearer != Some("Bearer issued-hvj") {
                        return Err(StatusCode::UNAUTHORIZED);
                    }
                    f.beats.lock().unwrap().push(beat);
                    Ok(axum::Json(()))
                },
            ),
        )
        .with_state(fake.clone());
    // The fake server speaks HTTPS with a certificate from the test CA, like the real one.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_url = format!("https://{}", listener.local_addr().unwrap());
    let cert = common::test_ca()
        .issue_server_cert(&[], &[], Duration::from_secs(3600))
        .unwrap();
    let tls = ferry_pki::tls::server_config(&cert.chain_pem, &cert.key_pem).unwrap();
    let listener =
        ferry_pki::TlsListener::new(listener, ferry_pki::ServerConfigSlot::new(Some(tls))).unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config("hvj", tmp.path(), None, Ipv4Addr::LOCALHOST);
    // Nothing but what a fresh host has: no certificate, no credential.
    std::fs::remove_dir_all(tmp.path().join("tls")).unwrap();
    cfg.credential = None;
    cfg.server_url = Some(server_url);
    cfg.server_ca = Some(common::test_ca().ca_file());
    cfg.join_token = Some("jt".into());
    cfg.heartbeat_ms = 200;
    let agent = ferry_agent::start(cfg.clone()).await.expect("agent starts");
    // Before joining it has no certificate: no caller completes a handshake.
    let e = client(&agent)
        .get::<HostFacts>("/v1/facts")
        .await
        .unwrap_err();
    assert_eq!(e.status(), None, "{e}");

    let deadline = Instant::now() + Duration::from_secs(15);
    while fake.beats.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no heartbeat after joining");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        fake.joins.load(Ordering::SeqCst) >= 2,
        "the refused join was retried"
    );
    let beat = fake.beats.lock().unwrap()[0].clone();
    assert_eq!(
        (beat.name.as_str(), beat.facts.name.as_str()),
        ("hvj", "hvj")
    );
    let facts: HostFacts = client(&agent)
        .get("/v1/facts")
        .await
        .expect("the signed certificate serves the server's identity");
    assert_eq!(facts.migration_ports, "49152-49215");
    agent.shutdown().await;
    let key_mode = std::fs::metadata(tmp.path().join("tls/agent.key"))
        .unwrap()
        .permissions();
    assert_eq!(key_mode.mode() & 0o777, 0o600);

    // The stored credential is reused: no second join.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(tmp.path().join("credential"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let joins = fake.joins.load(Ordering::SeqCst);
    let agent = ferry_agent::start(cfg).await.expect("agent restarts");
    let facts: HostFacts = client(&agent)
        .get("/v1/facts")
        .await
        .expect("the stored certificate serves at once");
    assert_eq!(facts.name, "hvj");
    assert_eq!(fake.joins.load(Ordering::SeqCst), joins);
    agent.shutdown().await;
    server.abort();
}

/// An agent refuses every call about an instance it does not run (start, stop, fence,
/// migrate out, its settings, dirty rate, console, delete) with `instance-not-found`, and acts
/// on none: nothing is defined, no migration is recorded, no console or run directory appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_calls_about_an_instance_not_run_here_are_refused_and_not_acted_on() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = ferry_agent::start(config("solo", tmp.path(), None, Ipv4Addr::LOCALHOST))
        .await
        .expect("agent starts");
    let c = client(&agent);
    let other = Uuid::new_v4();
    let mid = Uuid::new_v4();
    let mut refusals = Vec::new();
    for path in ["start", "stop", "stop?force=true", "fence", "dirty-rate"] {
        refusals.push((
            format!("POST {path}"),
            c.post::<_, serde_json::Value>(&format!("/v1/instances/{other}/{path}"), &())
                .await
                .map(|_| ()),
        ));
    }
    for path in ["", "/migration-settings", "/console"] {
        refusals.push((
            format!("GET {path}"),
            c.get::<serde_json::Value>(&format!("/v1/instances/{other}{path}"))
                .await
                .map(|_| ()),
        ));
    }
    refusals.push((
        "DELETE".into(),
        c.delete::<serde_json::Value>(&format!("/v1/instances/{other}"))
            .await
            .map(|_| ()),
    ));
    let migrate_out = StartSource {
        instance_id: other,
        destination: "127.0.0.1:49152".into(),
        params: MigrationParams::default(),
        disks: vec![],
        tls: None,
    };
    refusals.push((
        "POST migration source".into(),
        c.post::<_, SourceStatus>(&format!("/v1/migrations/{mid}/source"), &migrate_out)
            .await
            .map(|_| ()),
    ));
    for (what, answer) in refusals {
        let e = answer.expect_err(&what);
        assert_eq!(
            status_of(&e),
            (Some(404), "instance-not-found".into()),
            "{what}: {e}"
        );
        assert!(e.body().message.contains(&other.to_string()), "{what}: {e}");
    }
    assert!(instances(&c).await.is_empty());
    let st: SourceStatus = c.get(&format!("/v1/migrations/{mid}")).await.unwrap();
    assert_eq!(st.state, SourceState::Unknown, "no migration was recorded");
    for dir in ["consoles", "run"] {
        assert!(
            !tmp.path().join(dir).join(other.to_string()).exists(),
            "{dir}/{other} was created"
        );
    }
    agent.shutdown().await;
}

/// Whether a call to `agent` presenting `tls` is refused before any request is read.
async fn refused(
    agent: &ferry_agent::AgentHandle,
    tls: std::sync::Arc<rustls::ClientConfig>,
) -> bool {
    match ApiClient::new(&agent.url(), None)
        .with_tls_config(tls)
        .get::<HostFacts>("/v1/facts")
        .await
    {
        Ok(_) => false,
        Err(e) => e.status().is_none(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_servers_client_certificate_may_call_an_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = ferry_agent::start(config("solo", tmp.path(), None, Ipv4Addr::LOCALHOST))
        .await
        .expect("agent starts");
    let ca = common::test_ca();
    let day = Duration::from_secs(86400);
    let with = |chain: &str, key: &str| {
        ferry_pki::tls::client_config(ca.ca_pem(), Some((chain, key))).unwrap()
    };
    // The server's identity is accepted.
    assert!(!refused(&agent, common::server_identity_tls()).await);
    // No client certificate.
    assert!(
        refused(
            &agent,
            ferry_pki::tls::client_config(ca.ca_pem(), None).unwrap()
        )
        .await
    );
    // The server's identity, but from another CA.
    let other_dir = tempfile::tempdir().unwrap();
    let other = ferry_pki::ClusterCa::load_or_create(&other_dir.path().join("pki"), None).unwrap();
    let foreign = other.issue_server_client_identity(day).unwrap();
    assert!(refused(&agent, with(&foreign.chain_pem, &foreign.key_pem)).await);
    // The server's identity, expired.
    let mut spec =
        ferry_pki::LeafSpec::new(ferry_pki::SERVER_CLIENT_CN, ferry_pki::Usage::Client, day);
    spec.not_before = std::time::SystemTime::now() - 10 * day;
    spec.not_after = std::time::SystemTime::now() - day;
    let expired = ca.issue(&spec).unwrap();
    assert!(refused(&agent, with(&expired.chain_pem, &expired.key_pem)).await);
    // Another agent's own certificate (serverAuth only).
    let peer_dir = tempfile::tempdir().unwrap();
    common::install_agent_cert("peer", peer_dir.path());
    let files = ferry_agent::tls::TlsFiles::in_state_dir(peer_dir.path());
    let peer_chain = std::fs::read_to_string(&files.cert).unwrap();
    let peer_key = std::fs::read_to_string(&files.key).unwrap();
    assert!(refused(&agent, with(&peer_chain, &peer_key)).await);
    // A client certificate of the cluster CA that is not the server's.
    let someone = ca
        .issue(&ferry_pki::LeafSpec::new(
            "someone",
            ferry_pki::Usage::Client,
            day,
        ))
        .unwrap();
    assert!(refused(&agent, with(&someone.chain_pem, &someone.key_pem)).await);
    // And the agent is verified too: a client trusting another CA refuses it.
    let wrong_trust = ferry_pki::tls::agents_client_config(
        other.ca_pem(),
        &foreign.chain_pem,
        &foreign.key_pem,
        ferry_pki::RevokedSerials::default(),
    )
    .unwrap();
    assert!(refused(&agent, wrong_trust).await);
    agent.shutdown().await;
}
