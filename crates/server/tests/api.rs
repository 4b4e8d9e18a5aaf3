//! The REST API against a real server on a temporary SQLite file, with fake agents (small HTTP
//! servers that answer like agents and count what they are asked): no lab, no QEMU, no root.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use chrono::Utc;
use ferry_api::agent::{AgentInstance, DefineInstance};
use ferry_api::checks::{Candidate, CpuModelFeatures, ProbeListening, ProbeResult};
use ferry_api::hosts::{DatastoreFacts, HostFacts};
use ferry_api::instances::{BootSpec, InstanceSpec, InstanceState};
use ferry_api::ApiClient;
use ferry_server::store::Role;
use ferry_server::{ServerConfig, ServerHandle};
use uuid::Uuid;

const ADMIN: &str = "admin-token-for-api-tests-0123456";
const JOIN: &str = "join-token-for-api-tests-01234567";
const IMAGES: &str = "/srv/ferry/images";

/// What a fake agent was asked.
#[derive(Default)]
struct Calls {
    probe_listen: AtomicU64,
    probe_connect: AtomicU64,
    define: AtomicU64,
    /// Probe listeners open at this moment, and the most ever open at once.
    listening: Mutex<(u64, u64)>,
}

struct FakeAgent {
    url: String,
    calls: Arc<Calls>,
}

fn facts(name: &str) -> HostFacts {
    HostFacts {
        name: name.into(),
        cpu_vendor: "GenuineIntel".into(),
        cpu_model: "test".into(),
        cpu_flags: vec!["sse2".into(), "lm".into()],
        cores: 4,
        ram_total_mib: 24 * 1024,
        ram_free_mib: 16 * 1024,
        ram_reserve_mib: 0,
        accel: "tcg".into(),
        qemu_version: "9.2.0".into(),
        machine_types: vec!["pc".into(), "q35".into(), "pc-i440fx-9.2".into()],
        firmware: vec!["bios".into()],
        datastores: vec![DatastoreFacts {
            name: "images".into(),
            path: IMAGES.into(),
            total_bytes: 1 << 40,
            free_bytes: 1 << 39,
            identity: Some("shared-images".into()),
        }],
        networks: vec![],
        migration_addr: "127.0.0.1".into(),
        migration_ports: "49152-49215".into(),
        agent_version: "0.1.0".into(),
    }
}

/// A fake agent serves like a real one: mutual TLS with a certificate from the cluster CA.
async fn fake_agent(name: &str, ca: &ferry_pki::ClusterCa) -> FakeAgent {
    let calls = Arc::new(Calls::default());
    let facts = facts(name);
    let router = Router::new()
        .route("/v1/facts", get(move || async move { Json(facts) }))
        .route(
            "/v1/cpu-models/{model}",
            get(|Path(model): Path<String>| async move {
                Json(CpuModelFeatures {
                    model,
                    features: vec!["sse2".into()],
                })
            }),
        )
        .route(
            "/v1/probe/listen",
            post(|State(c): State<Arc<Calls>>| async move {
                c.probe_listen.fetch_add(1, Ordering::SeqCst);
                {
                    let mut l = c.listening.lock().unwrap();
                    l.0 += 1;
                    l.1 = l.1.max(l.0);
                }
                // A listener stays open while the source connects.
                tokio::time::sleep(Duration::from_millis(200)).await;
                c.listening.lock().unwrap().0 -= 1;
                Json(ProbeListening {
                    addr: "127.0.0.1:49215".into(),
                    token: "t".into(),
                })
            }),
        )
        .route(
            "/v1/probe/connect",
            post(|State(c): State<Arc<Calls>>| async move {
                c.probe_connect.fetch_add(1, Ordering::SeqCst);
                Json(ProbeResult {
                    connected: true,
                    latency_ms: Some(0.2),
                    bandwidth_mbit_s: Some(9000.0),
                    error: None,
                })
            }),
        )
        .route(
            "/v1/instances/{id}",
            put(
                |State(c): State<Arc<Calls>>,
                 Path(id): Path<Uuid>,
                 Json(req): Json<DefineInstance>| async move {
                    c.define.fetch_add(1, Ordering::SeqCst);
                    Json(AgentInstance {
                        id,
                        name: req.name,
                        state: InstanceState::Stopped,
                        qemu_state: None,
                        pid: None,
                        incoming: None,
                        guest: None,
                        stopped_by: None,
                    })
                },
            ),
        )
        .with_state(calls.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let mut spec =
        ferry_pki::LeafSpec::new(name, ferry_pki::Usage::Server, Duration::from_secs(3600));
    spec.ips.push([127, 0, 0, 1].into());
    let cert = ca.issue(&spec).unwrap();
    let tls =
        ferry_pki::tls::agent_server_config(&cert.chain_pem, &cert.key_pem, ca.ca_pem()).unwrap();
    let listener =
        ferry_pki::TlsListener::new(listener, ferry_pki::ServerConfigSlot::new(Some(tls))).unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    FakeAgent { url, calls }
}

struct Api {
    server: ServerHandle,
    agents: HashMap<String, FakeAgent>,
    admin: ApiClient,
    read_only: String,
    _dir: tempfile::TempDir,
}

/// A server with hosts hv1 and hv2 (fake agents, online) and a read-only token.
async fn api() -> Api {
    let dir = tempfile::tempdir().unwrap();
    let server = ferry_server::start(ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        database: dir.path().join("ferry.db"),
        admin_token: Some(ADMIN.into()),
        join_token: JOIN.into(),
        heartbeat_timeout_s: 600,
        limits: Default::default(),
        preflight: Default::default(),
        progress_poll_ms: 250,
        cold_cleanup_after_s: 0,
        tls: Default::default(),
    })
    .await
    .expect("server starts");
    let store = &server.state.store;
    let mut agents = HashMap::new();
    for name in ["hv1", "hv2"] {
        let agent = fake_agent(name, &server.state.pki.ca).await;
        store
            .join_host(name, &agent.url, &format!("secret-{name}"), &facts(name))
            .await
            .unwrap();
        store
            .record_heartbeat(name, &facts(name), Utc::now())
            .await
            .unwrap();
        agents.insert(name.to_string(), agent);
    }
    let (_, read_only) = store
        .create_token("viewer", Role::Reader, None)
        .await
        .unwrap();
    let admin = server.client(Some(ADMIN.into()));
    Api {
        server,
        agents,
        admin,
        read_only,
        _dir: dir,
    }
}

fn spec() -> InstanceSpec {
    InstanceSpec {
        memory_mib: 256,
        vcpus: 1,
        cpu_model: "qemu64".into(),
        machine: "pc".into(),
        boot: BootSpec {
            kernel: Some(format!("{IMAGES}/vmlinuz")),
            initrd: Some(format!("{IMAGES}/initrd")),
            cmdline: "console=ttyS0".into(),
            ..BootSpec::default()
        },
        disks: vec![],
        nics: vec![],
    }
}

/// Sends `body` to `path` and returns status and JSON answer.
async fn send(
    api: &Api,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Vec<u8>>,
) -> (u16, serde_json::Value) {
    let mut req = https_client(&api.server)
        .request(
            method.parse().unwrap(),
            format!("{}{path}", api.server.url()),
        )
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let resp = req.send().await.expect("the server answers");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
    (status, json)
}

/// Asserts the project's error style: the code, one sentence, a hint.
fn assert_error(status: u16, body: &serde_json::Value, want_status: u16, code: &str) {
    assert_eq!(
        (status, body["code"].as_str()),
        (want_status, Some(code)),
        "{body}"
    );
    let message = body["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{body}");
    assert!(
        !message.contains('\0'),
        "control characters escaped: {body}"
    );
    assert!(
        body["hint"].as_str().is_some_and(|h| !h.is_empty()),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whoami_names_the_token_and_its_role() {
    let api = api().await;
    let (status, body) = send(&api, "GET", "/v1/whoami", ADMIN, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["role"], "admin", "{body}");
    let (status, body) = send(&api, "GET", "/v1/whoami", &api.read_only, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["name"].as_str(), body["role"].as_str()),
        (Some("viewer"), Some("reader"))
    );
    let (status, body) = send(&api, "GET", "/v1/whoami", "wrong", None).await;
    assert_error(status, &body, 401, "unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plan_preview_refuses_what_create_refuses() {
    let api = api().await;
    let req = serde_json::json!({"instance": "nope", "destination": "hv2"});
    let body = serde_json::to_vec(&req).unwrap();
    let (status, answer) = send(
        &api,
        "POST",
        "/v1/migrations/preview",
        &api.read_only,
        Some(body),
    )
    .await;
    assert_error(status, &answer, 404, "instance-not-found");
    let bad = serde_json::json!({"instance": "nope", "options": {"bandwith_mib_s": 3}});
    let body = serde_json::to_vec(&bad).unwrap();
    let (status, answer) = send(&api, "POST", "/v1/migrations/preview", ADMIN, Some(body)).await;
    assert_error(status, &answer, 400, "unknown-field");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_the_audit_log_needs_an_admin_token_and_says_so() {
    let api = api().await;
    let (status, body) = send(&api, "GET", "/v1/audit", &api.read_only, None).await;
    assert_error(status, &body, 403, "forbidden");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("reading the audit log"), "{body}");
    assert!(!message.contains("changes"), "{body}");
    let (status, _) = send(&api, "GET", "/v1/audit", ADMIN, None).await;
    assert_eq!(status, 200);
    // Changes by a reader say what was asked and which role it needs.
    let (status, body) = send(&api, "POST", "/v1/hosts/hv1/disable", &api.read_only, None).await;
    assert_error(status, &body, 403, "forbidden");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("POST /v1/hosts/hv1/disable needs the admin role"),
        "{body}"
    );
    api.server.shutdown().await;
}

/// Requests QEMU would refuse when the instance starts (a 502 then) are refused at create
/// with a 400, and nothing reaches the agent or the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_instances_are_refused_at_create() {
    let api = api().await;
    let create = |name: &str, spec: InstanceSpec| {
        serde_json::to_vec(&serde_json::json!({
            "name": name, "host": "hv1", "spec": spec, "start": false
        }))
        .unwrap()
    };
    let with = |f: &dyn Fn(&mut InstanceSpec)| {
        let mut s = spec();
        f(&mut s);
        s
    };
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (create("vm", with(&|s| s.vcpus = 256)), 400, "invalid-instance"),
        (
            create("vm", with(&|s| s.machine = "bogus".into())),
            400,
            "unknown-machine-type",
        ),
        // Known to QEMU in general, but not offered by this host's QEMU.
        (
            create("vm", with(&|s| s.machine = "pc-q35-2.0".into())),
            400,
            "unknown-machine-type",
        ),
        (create("v\0m", spec()), 400, "invalid-instance"),
        (
            create("vm", with(&|s| s.boot.cmdline = "console=ttyS0\u{1b}[2J".into())),
            400,
            "invalid-instance",
        ),
        (
            create("vm", with(&|s| s.memory_mib = 1 << 20)),
            400,
            "memory-exceeds-host",
        ),
        (
            create("vm", with(&|s| s.boot.kernel = Some("/etc/shadow".into()))),
            400,
            "path-outside-datastores",
        ),
        (
            create("vm", with(&|s| s.boot.initrd = Some(format!("{IMAGES}/../../../etc/shadow")))),
            400,
            "invalid-instance",
        ),
        (
            br#"{"name":"vm","host":"hv1","spec":{"memory_mib":256,"boot":{"kernel":"/srv/ferry/images/k","initrd":"/srv/ferry/images/i"}},"colour":"blue"}"#.to_vec(),
            400,
            "unknown-field",
        ),
        (
            br#"{"name":"vm","host":"hv1","spec":{"memory_mib":256,"vpcus":4,"boot":{"kernel":"/srv/ferry/images/k","initrd":"/srv/ferry/images/i"}}}"#.to_vec(),
            400,
            "unknown-field",
        ),
    ];
    for (body, want, code) in cases {
        let (status, answer) = send(&api, "POST", "/v1/instances", ADMIN, Some(body)).await;
        assert_error(status, &answer, want, code);
    }
    // A 10 MiB body is too large, answered as the API's error JSON.
    let mut huge = br#"{"name":"vm","spec":{"memory_mib":256,"boot":{"kernel":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'a', 10 << 20));
    huge.extend(br#"","initrd":"/i"}}}"#);
    let (status, answer) = send(&api, "POST", "/v1/instances", ADMIN, Some(huge)).await;
    assert_error(status, &answer, 413, "body-too-large");

    assert_eq!(api.agents["hv1"].calls.define.load(Ordering::SeqCst), 0);
    let listed: Vec<serde_json::Value> = api.admin.get("/v1/instances").await.unwrap();
    assert!(listed.is_empty(), "{listed:?}");

    // The good spec passes every check and reaches the agent.
    let (status, answer) = send(
        &api,
        "POST",
        "/v1/instances",
        ADMIN,
        Some(create("vm", spec())),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(api.agents["hv1"].calls.define.load(Ordering::SeqCst), 1);
    api.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_migration_options_are_refused() {
    let api = api().await;
    let id = Uuid::new_v4();
    api.server
        .state
        .store
        .insert_instance(id, "vm", "hv1", &spec(), InstanceState::Running)
        .await
        .unwrap();
    let migrate = |options: &str| {
        format!(r#"{{"instance":"vm","destination":"hv2","options":{options}}}"#).into_bytes()
    };
    for (options, code) in [
        (r#"{"budget_s":0}"#, "invalid-migration-options"),
        // QEMU 10.0 refuses post-copy beside multifd; said at the request, not when it starts.
        (
            r#"{"post_copy":true,"parallel":2}"#,
            "invalid-migration-options",
        ),
        (
            r#"{"post_copy":true,"compress":true}"#,
            "invalid-migration-options",
        ),
        (r#"{"bandwith_mib_s":100}"#, "unknown-field"),
    ] {
        let (status, answer) = send(
            &api,
            "POST",
            "/v1/migrations",
            ADMIN,
            Some(migrate(options)),
        )
        .await;
        assert_error(status, &answer, 400, code);
    }
    let (status, answer) = send(
        &api,
        "POST",
        "/v1/migrations",
        ADMIN,
        Some(br#"{"instance":"vm","destination":"hv2","priority":1}"#.to_vec()),
    )
    .await;
    assert_error(status, &answer, 400, "unknown-field");
    let all: Vec<serde_json::Value> = api.admin.get("/v1/migrations").await.unwrap();
    assert!(all.is_empty(), "{all:?}");
    api.server.shutdown().await;
}

/// Seventy read-only candidate requests at once cost the pair of hosts one probe: the result
/// is shared and reused, probes to a destination run one at a time, and the next request
/// within the cache window probes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidate_requests_share_one_probe_per_host_pair() {
    let api = api().await;
    let id = Uuid::new_v4();
    api.server
        .state
        .store
        .insert_instance(id, "vm", "hv1", &spec(), InstanceState::Running)
        .await
        .unwrap();
    let viewer = api.server.client(Some(api.read_only.clone()));
    let answers = futures_util::future::join_all((0..70).map(|_| {
        let viewer = viewer.clone();
        async move {
            viewer
                .get::<Vec<Candidate>>("/v1/instances/vm/migration-candidates")
                .await
        }
    }))
    .await;
    for a in &answers {
        let candidates = a.as_ref().expect("candidates");
        assert_eq!(candidates.len(), 1);
        let probe = candidates[0]
            .checks
            .iter()
            .find(|c| c.name == "migration-port-reachable")
            .unwrap_or_else(|| panic!("probed: {candidates:#?}"));
        assert!(probe.values["latency_ms"].as_f64().is_some(), "{probe:?}");
    }
    let dst = &api.agents["hv2"].calls;
    assert_eq!(dst.probe_listen.load(Ordering::SeqCst), 1, "one listener");
    assert_eq!(dst.listening.lock().unwrap().1, 1, "never two at once");
    assert_eq!(
        api.agents["hv1"].calls.probe_connect.load(Ordering::SeqCst),
        1
    );
    assert_eq!(api.server.state.probes.runs(), 1);

    // Within the cache window, again: no new probe.
    let again: Vec<Candidate> = viewer
        .get("/v1/instances/vm/migration-candidates?destination=hv2")
        .await
        .unwrap();
    assert!(again[0].fit, "{again:#?}");
    assert_eq!(dst.probe_listen.load(Ordering::SeqCst), 1);
    api.server.shutdown().await;
}

/// A token of `role` made through the API by the admin; returns its secret.
async fn token_via_api(api: &Api, name: &str, role: &str, expires: Option<&str>) -> String {
    let req = serde_json::json!({"name": name, "role": role, "expires_in": expires});
    let (status, body) = send(
        api,
        "POST",
        "/v1/tokens",
        ADMIN,
        Some(serde_json::to_vec(&req).unwrap()),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["token"]["role"], role, "{body}");
    body["secret"].as_str().expect("secret").to_string()
}

/// The role refusal: 403 `forbidden`, naming the role the request needed and the token's.
fn assert_needs(status: u16, body: &serde_json::Value, needed: &str, have: &str) {
    assert_error(status, body, 403, "forbidden");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("needs the {needed} role"))
            && message.contains(&format!("role is {have}")),
        "{body}"
    );
    assert!(
        body["hint"]
            .as_str()
            .unwrap()
            .contains(&format!("--role {needed}")),
        "{body}"
    );
}

/// A reader reads but cannot migrate, start or stop; an operator migrates (the job is queued
/// and audited with the operator as actor) but cannot touch hosts, tokens, instance
/// definitions or the audit log; an admin can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_reader_operator_admin_each_get_what_their_role_allows() {
    let api = api().await;
    let id = Uuid::new_v4();
    api.server
        .state
        .store
        .insert_instance(id, "vm", "hv1", &spec(), InstanceState::Running)
        .await
        .unwrap();
    let operator = token_via_api(&api, "ops", "operator", None).await;
    let reader = &api.read_only;
    let migrate =
        serde_json::to_vec(&serde_json::json!({"instance": "vm", "destination": "hv2"})).unwrap();

    // Reads are open to every role.
    for token in [reader.as_str(), operator.as_str(), ADMIN] {
        for path in ["/v1/hosts", "/v1/instances", "/v1/migrations", "/v1/whoami"] {
            let (status, body) = send(&api, "GET", path, token, None).await;
            assert_eq!(status, 200, "{path}: {body}");
        }
    }
    // A reader cannot migrate, start or stop.
    let (status, body) = send(
        &api,
        "POST",
        "/v1/migrations",
        reader,
        Some(migrate.clone()),
    )
    .await;
    assert_needs(status, &body, "operator", "reader");
    for path in ["/v1/instances/vm/stop", "/v1/instances/vm/start"] {
        let (status, body) = send(&api, "POST", path, reader, None).await;
        assert_needs(status, &body, "operator", "reader");
    }
    assert!(api
        .server
        .state
        .store
        .list_migrations(&Default::default())
        .await
        .unwrap()
        .is_empty());

    // An operator cannot change hosts, tokens or definitions, nor read the audit log.
    let refused: [(&str, &str, Option<Vec<u8>>); 7] = [
        ("POST", "/v1/hosts/hv1/disable", None),
        ("POST", "/v1/hosts/hv1/enable", None),
        ("GET", "/v1/tokens", None),
        (
            "POST",
            "/v1/tokens",
            Some(br#"{"name": "mine", "role": "admin"}"#.to_vec()),
        ),
        ("DELETE", "/v1/tokens/viewer", None),
        ("DELETE", "/v1/instances/vm", None),
        ("GET", "/v1/audit", None),
    ];
    for (method, path, body) in refused {
        let (status, answer) = send(&api, method, path, &operator, body).await;
        assert_error(status, &answer, 403, "forbidden");
        assert!(
            answer["message"].as_str().unwrap().contains("admin role"),
            "{method} {path}: {answer}"
        );
    }
    let hosts: Vec<ferry_api::hosts::Host> = api.admin.get("/v1/hosts").await.unwrap();
    assert!(hosts.iter().all(|h| h.enabled), "no host was disabled");

    // An operator migrates.
    let (status, body) = send(&api, "POST", "/v1/migrations", &operator, Some(migrate)).await;
    assert_eq!(status, 202, "{body}");
    let audit: Vec<serde_json::Value> = api.admin.get("/v1/audit").await.unwrap();
    assert!(
        audit
            .iter()
            .any(|e| e["actor"] == "ops" && e["action"] == "migration.create"),
        "{audit:#?}"
    );
    // The admin can do what the operator could not.
    let (status, body) = send(&api, "POST", "/v1/hosts/hv1/disable", ADMIN, None).await;
    assert_eq!(status, 200, "{body}");
    api.server.shutdown().await;
}

/// Tokens through the API: created with a role and a lifetime (the secret shown once),
/// listed without secrets, revoked by name and refused at once, even though they were
/// verified a moment before (the cache forgets them); every change audited with its actor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_tokens_are_created_listed_and_revoked_at_once() {
    let api = api().await;
    let ci = token_via_api(&api, "ci", "operator", Some("30d")).await;
    assert!(ci.starts_with("ferry_"), "{ci}");
    let (status, body) = send(&api, "GET", "/v1/whoami", &ci, None).await;
    assert_eq!(
        (status, body["role"].as_str()),
        (200, Some("operator")),
        "{body}"
    );

    let (status, list) = send(&api, "GET", "/v1/tokens", ADMIN, None).await;
    assert_eq!(status, 200, "{list}");
    let text = list.to_string();
    assert!(
        !text.contains(&ci) && !text.contains(ADMIN),
        "no secret listed: {text}"
    );
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ci")
        .unwrap_or_else(|| panic!("{list}"));
    let expires: chrono::DateTime<Utc> =
        serde_json::from_value(entry["expires_at"].clone()).unwrap();
    let days = (expires - Utc::now()).num_hours() as f64 / 24.0;
    assert!((29.9..=30.0).contains(&days), "{entry}");
    assert!(entry["last_used_at"].is_string(), "{entry}");
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "admin" && t["from_config"] == true),
        "{list}"
    );

    // Refusals with their codes.
    for (req, status_want, code) in [
        (
            serde_json::json!({"name": "ci", "role": "reader"}),
            409,
            "token-name-taken",
        ),
        (
            serde_json::json!({"name": "x", "role": "reader", "expires_in": "30"}),
            400,
            "invalid-expiry",
        ),
        (
            serde_json::json!({"name": "has space", "role": "reader"}),
            400,
            "invalid-token-name",
        ),
        (
            serde_json::json!({"name": "x", "role": "root"}),
            400,
            "malformed-json",
        ),
    ] {
        let (status, body) = send(
            &api,
            "POST",
            "/v1/tokens",
            ADMIN,
            Some(serde_json::to_vec(&req).unwrap()),
        )
        .await;
        assert_error(status, &body, status_want, code);
    }
    let (status, body) = send(&api, "DELETE", "/v1/tokens/admin", ADMIN, None).await;
    assert_error(status, &body, 409, "token-from-config");
    let (status, body) = send(&api, "DELETE", "/v1/tokens/nobody", ADMIN, None).await;
    assert_error(status, &body, 404, "token-not-found");

    // Revoked: refused on the very next call.
    let (status, body) = send(&api, "DELETE", "/v1/tokens/ci", ADMIN, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["revoked"][0]["name"], "ci", "{body}");
    let (status, body) = send(&api, "GET", "/v1/whoami", &ci, None).await;
    assert_error(status, &body, 401, "unauthorized");
    let (status, body) = send(&api, "GET", "/v1/hosts", &ci, None).await;
    assert_error(status, &body, 401, "unauthorized");

    let audit: Vec<serde_json::Value> = api.admin.get("/v1/audit").await.unwrap();
    for action in ["token.create", "token.revoke"] {
        assert!(
            audit
                .iter()
                .any(|e| e["actor"] == "admin" && e["action"] == action && e["target"] == "ci"),
            "{action}: {audit:#?}"
        );
    }
    assert!(!serde_json::to_string(&audit).unwrap().contains(&ci));
    api.server.shutdown().await;
}

/// An expired token is refused with its own code and a hint, from the first call and also
/// after it was accepted while still valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_an_expired_token_is_refused_with_token_expired() {
    let api = api().await;
    let store = &api.server.state.store;
    let (_, old) = store
        .create_token(
            "old",
            Role::Admin,
            Some(Utc::now() - chrono::Duration::minutes(5)),
        )
        .await
        .unwrap();
    let (status, body) = send(&api, "GET", "/v1/hosts", &old, None).await;
    assert_error(status, &body, 401, "token-expired");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("\"old\" expired at"),
        "{body}"
    );
    assert!(
        body["hint"]
            .as_str()
            .unwrap()
            .contains("ferry token create"),
        "{body}"
    );

    let (_, brief) = store
        .create_token(
            "brief",
            Role::Reader,
            Some(Utc::now() + chrono::Duration::milliseconds(800)),
        )
        .await
        .unwrap();
    let (status, body) = send(&api, "GET", "/v1/hosts", &brief, None).await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(900)).await;
    let (status, body) = send(&api, "GET", "/v1/hosts", &brief, None).await;
    assert_error(status, &body, 401, "token-expired");
    api.server.shutdown().await;
}

/// A plain reqwest client that trusts the server's CA (for requests `ApiClient` would not send).
fn https_client(server: &ServerHandle) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls((*server.client_tls()).clone())
        .build()
        .unwrap()
}
