//! Secrets stay secret: a scenario with a real server and a real agent (token creation, the
//! agent's join and heartbeats, calls with wrong and revoked tokens) while every log line of
//! both (at TRACE), every event of the cluster, every API answer and the audit log are
//! captured; none of them, nor the database file, holds a token, the join token or the
//! agent's credential.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_agent::{AgentConfig, NetworkConfig};
use ferry_api::agent::{Heartbeat, JoinRequest};
use ferry_api::hosts::{Host, HostState};
use ferry_server::ServerConfig;

const ADMIN: &str = "configured-admin-SECRET-0f1e2d3c4b5a";
const JOIN: &str = "join-token-SECRET-a1b2c3d4e5f60718";

/// Every formatted log line of this test process.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn agent_config(state_dir: &std::path::Path, server: &ferry_server::ServerHandle) -> AgentConfig {
    AgentConfig {
        server_ca: Some(server.ca_file()),
        server_ca_fingerprint: None,
        name: "hv9".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise_url: None,
        server_url: Some(server.url()),
        join_token: Some(JOIN.into()),
        credential: None,
        state_dir: state_dir.to_path_buf(),
        netns: None,
        migration_addr: Ipv4Addr::LOCALHOST.into(),
        migration_ports: "49152-49215".into(),
        qemu_binary: "qemu-system-x86_64".into(),
        ovmf_code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
        ovmf_vars: "/usr/share/OVMF/OVMF_VARS_4M.fd".into(),
        accel: "tcg".into(),
        datastores: vec![],
        networks: vec![NetworkConfig {
            name: "lab".into(),
            bridge: "br0".into(),
            subnet: None,
        }],
        heartbeat_ms: 200,
        reserve_mib: 0,
        ram_capacity_mib: None,
        cpu_flags_mask: vec![],
    }
}

/// Sends a request and returns the status and the answer's text.
async fn call(
    server: &ferry_server::ServerHandle,
    method: &str,
    path: &str,
    token: &str,
    body: Option<serde_json::Value>,
) -> (u16, String) {
    let client = reqwest::Client::builder()
        .use_preconfigured_tls((*server.client_tls()).clone())
        .build()
        .unwrap();
    let mut req = client
        .request(method.parse().unwrap(), format!("{}{path}", server.url()))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("the server answers");
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_no_secret_reaches_logs_events_answers_audit_or_the_database() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let dir = tempfile::tempdir().unwrap();
    let server = ferry_server::start(ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        database: dir.path().join("db").join("ferry.db"),
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
    let mut events = server.state.events.subscribe();
    let mut answers = Vec::new();

    // Tokens through the API; the creation answers are the one place their secrets appear.
    let mut secrets = vec![ADMIN.to_string(), JOIN.to_string()];
    for (name, role) in [("ops", "operator"), ("viewer", "reader")] {
        let (status, text) = call(
            &server,
            "POST",
            "/v1/tokens",
            ADMIN,
            Some(serde_json::json!({"name": name, "role": role, "expires_in": "12h"})),
        )
        .await;
        assert_eq!(status, 201, "{text}");
        let made: serde_json::Value = serde_json::from_str(&text).unwrap();
        secrets.push(made["secret"].as_str().unwrap().to_string());
    }
    let (ops, viewer) = (secrets[2].clone(), secrets[3].clone());

    // A real agent joins with the join token and heartbeats with its credential.
    let agent_dir = tempfile::tempdir().unwrap();
    let agent = ferry_agent::start(agent_config(agent_dir.path(), &server))
        .await
        .expect("agent starts");
    let credential_file = agent_dir.path().join("credential");
    let deadline = Instant::now() + Duration::from_secs(30);
    let credential = loop {
        if let Ok(c) = std::fs::read_to_string(&credential_file) {
            if !c.trim().is_empty() {
                break c.trim().to_string();
            }
        }
        assert!(Instant::now() < deadline, "the agent did not join");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    secrets.push(credential.clone());
    tokio::time::sleep(Duration::from_millis(800)).await; // a few heartbeats
    let (status, text) = call(&server, "GET", "/v1/hosts/hv9", &ops, None).await;
    let host: Host = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{status} {text}"));
    assert_eq!(host.state, HostState::Online);
    answers.push(text);

    // Wrong, altered, misused and revoked secrets: each refused, none echoed.
    let altered_ops = format!("{}x", &ops[..ops.len() - 1]);
    let wrong = [
        "ferry_0000000000000000_notatoken".to_string(),
        altered_ops.clone(),
        "plainly-wrong-token".to_string(),
        credential.clone(), // an agent credential is no API token
    ];
    for token in &wrong {
        let (status, text) = call(&server, "GET", "/v1/hosts", token, None).await;
        assert_eq!(status, 401, "{text}");
        answers.push(text);
    }
    secrets.push(altered_ops);
    let facts = host.facts.clone().expect("facts");
    let beat = serde_json::to_value(Heartbeat {
        name: "hv9".into(),
        facts: facts.clone(),
        instances: vec![],
    })
    .unwrap();
    for token in [ops.as_str(), "ferry_0123456789abcdef_forged", JOIN] {
        let (status, text) = call(
            &server,
            "POST",
            "/v1/agents/heartbeat",
            token,
            Some(beat.clone()),
        )
        .await;
        assert_eq!(status, 401, "{token}: {text}");
        answers.push(text);
    }
    let wrong_join = serde_json::to_value(JoinRequest {
        join_token: "wrong-join-token-value-000000".into(),
        name: "hv8".into(),
        agent_url: "https://127.0.0.1:9".into(),
        facts,
        csr: String::new(),
    })
    .unwrap();
    let (status, text) = call(
        &server,
        "POST",
        "/v1/agents/join",
        &viewer,
        Some(wrong_join),
    )
    .await;
    assert_eq!(status, 401, "{text}");
    answers.push(text);
    let (status, text) = call(&server, "POST", "/v1/hosts/hv9/disable", &viewer, None).await;
    assert_eq!(status, 403, "{text}");
    answers.push(text);
    let (status, text) = call(&server, "DELETE", "/v1/tokens/viewer", ADMIN, None).await;
    assert_eq!(status, 200, "{text}");
    answers.push(text);
    let (status, text) = call(&server, "GET", "/v1/whoami", &viewer, None).await;
    assert_eq!(status, 401, "{text}");
    answers.push(text);
    for path in [
        "/v1/tokens",
        "/v1/audit?limit=1000",
        "/v1/hosts",
        "/v1/whoami",
    ] {
        let (status, text) = call(&server, "GET", path, ADMIN, None).await;
        assert_eq!(status, 200, "{path}: {text}");
        answers.push(text);
    }
    let audit = answers[answers.len() - 3].clone();
    for action in ["token.create", "token.revoke", "host.join"] {
        assert!(audit.contains(action), "{action} audited: {audit}");
    }

    let mut seen_events = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen_events.push(serde_json::to_string(&e).unwrap());
    }
    assert!(!seen_events.is_empty(), "the host's events were captured");

    agent.shutdown().await;
    server.shutdown().await;
    let log_text = logs.text();
    assert!(
        log_text.contains("joined the cluster"),
        "the agent's logs were captured"
    );
    assert!(
        log_text.contains("created an API token"),
        "the server's logs were captured"
    );

    // The database: every file of it, after the server closed it.
    let db_dir = dir.path().join("db");
    let database = database_text(&db_dir);
    assert!(database.contains("$argon2id$"), "hashes are stored");
    let places = [
        ("log", log_text.as_str()),
        ("event", &seen_events.join("\n")),
        ("answer", &answers.join("\n")),
        ("database", &database),
    ];
    for secret in &secrets {
        // The secret part alone (after the id) must not appear either.
        let tail = secret.rsplit('_').next().unwrap_or(secret);
        for (place, text) in places {
            assert!(
                !text.contains(secret.as_str()),
                "a secret is in the {place}s"
            );
            assert!(
                tail.len() < 16 || !text.contains(tail),
                "a secret's tail is in the {place}s"
            );
        }
    }
}

fn database_text(dir: &std::path::Path) -> String {
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            continue; // pki/: the cluster CA, no token
        }
        match std::fs::read(path) {
            Ok(b) => bytes.extend(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}
