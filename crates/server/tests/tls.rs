//! The server over HTTPS: plain HTTP refused, clients that do not trust its CA refused, a pin
//! on first use accepted and a changed certificate refused with its own code, the CA's files
//! private, and the server's certificate renewed in place.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use ferry_api::{ApiClient, TlsOptions};
use ferry_server::{ServerConfig, ServerHandle};

const ADMIN: &str = "admin-token-for-tests-0123456789";

async fn server(dir: &std::path::Path, tweak: impl FnOnce(&mut ServerConfig)) -> ServerHandle {
    let mut config = ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        database: dir.join("ferry.db"),
        admin_token: Some(ADMIN.into()),
        join_token: "join-token-for-tests-0123456789".into(),
        heartbeat_timeout_s: 10,
        limits: Default::default(),
        preflight: Default::default(),
        progress_poll_ms: 250,
        cold_cleanup_after_s: 0,
        tls: Default::default(),
    };
    tweak(&mut config);
    ferry_server::start(config).await.expect("server starts")
}

async fn whoami(client: &ApiClient) -> Result<serde_json::Value, ferry_api::ApiError> {
    client.get::<serde_json::Value>("/v1/whoami").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_https_only_and_trusted_only_through_its_ca_or_pin() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), |_| {}).await;
    assert!(s.url().starts_with("https://"), "{}", s.url());

    // The CA it made: private files, and the fingerprint pins it.
    let pki = dir.path().join("pki");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&pki), 0o700);
    for f in ["ca.pem", "ca.key", "migration-ca.pem", "migration-ca.key"] {
        assert_eq!(mode(&pki.join(f)), 0o600, "{f}");
    }
    assert_eq!(s.ca_file(), pki.join("ca.pem"));

    // Trusting its CA works.
    whoami(&s.client(Some(ADMIN.into())))
        .await
        .expect("CA-verified call");

    // Plain HTTP to the HTTPS port gets no answer.
    let plain = ApiClient::new(&s.url().replace("https://", "http://"), Some(ADMIN.into()));
    let e = whoami(&plain).await.unwrap_err();
    assert_eq!(e.status(), None, "plain HTTP was answered: {e}");

    // No trust given: the public roots do not know this cluster's CA.
    let e = whoami(&ApiClient::new(&s.url(), Some(ADMIN.into())))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "server-certificate-untrusted", "{e}");

    // Another CA.
    let other_dir = tempfile::tempdir().unwrap();
    let other = ferry_pki::ClusterCa::load_or_create(&other_dir.path().join("pki"), None).unwrap();
    let wrong_ca = ApiClient::new(&s.url(), Some(ADMIN.into()))
        .with_tls(&TlsOptions::ca(other.ca_pem()))
        .unwrap();
    let e = whoami(&wrong_ca).await.unwrap_err();
    assert_eq!(e.code(), "server-certificate-untrusted", "{e}");

    // Trust on first use: what the server presents is its CA, and the pin works...
    let addr = s.addr.to_string();
    let chain = ferry_pki::tls::probe_server_chain(&addr, "127.0.0.1")
        .await
        .unwrap();
    let presented = ferry_pki::fingerprint(chain.last().unwrap());
    assert_eq!(presented, s.state.pki.ca.fingerprint());
    let pinned = ApiClient::new(&s.url(), Some(ADMIN.into()))
        .with_tls(&TlsOptions::pinned(presented))
        .unwrap();
    whoami(&pinned).await.expect("pinned call");
    // ...and a pin of another certificate is refused as a changed certificate.
    let changed = ApiClient::new(&s.url(), Some(ADMIN.into()))
        .with_tls(&TlsOptions::pinned(other.fingerprint()))
        .unwrap();
    let e = whoami(&changed).await.unwrap_err();
    assert_eq!(e.code(), "server-certificate-changed", "{e}");
    assert!(
        e.body().hint.contains("--accept-fingerprint"),
        "{}",
        e.body().hint
    );
    let first_ca = s.ca_pem();
    s.shutdown().await;

    // A restart loads the same CA: clients keep trusting it.
    let again = server(dir.path(), |_| {}).await;
    assert_eq!(again.ca_pem(), first_ca);
    whoami(&again.client(Some(ADMIN.into())))
        .await
        .expect("same CA after restart");
    again.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_only_when_the_lab_flag_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), |c| c.tls.plain_http_for_labs = true).await;
    assert!(s.url().starts_with("http://"), "{}", s.url());
    whoami(&ApiClient::new(&s.url(), Some(ADMIN.into())))
        .await
        .expect("plain HTTP in a lab");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_certificate_is_renewed_in_place_when_a_third_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), |c| c.tls.names = vec!["ferry.test".into()]).await;
    let addr = s.addr.to_string();
    let before = ferry_pki::tls::probe_server_chain(&addr, "localhost")
        .await
        .unwrap();
    // Not due yet: nothing changes.
    s.state.pki.renew_if_due(SystemTime::now()).unwrap();
    let same = ferry_pki::tls::probe_server_chain(&addr, "localhost")
        .await
        .unwrap();
    assert_eq!(before[0], same[0]);
    // Two thirds of 90 days later: a new certificate, served without a restart.
    s.state
        .pki
        .renew_if_due(SystemTime::now() + Duration::from_secs(61 * 86400))
        .unwrap();
    let after = ferry_pki::tls::probe_server_chain(&addr, "localhost")
        .await
        .unwrap();
    assert_ne!(before[0], after[0], "the certificate was renewed");
    assert_eq!(before[1], after[1], "by the same CA");
    let pinned = ApiClient::new(
        &s.url().replace("127.0.0.1", "localhost"),
        Some(ADMIN.into()),
    )
    .with_tls(&TlsOptions::ca(s.ca_pem()))
    .unwrap();
    whoami(&pinned)
        .await
        .expect("the renewed certificate verifies");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_joins_over_mutual_tls_and_its_certificate_rotates_live() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), |_| {}).await;
    let agent = ferry_agent::start(ferry_agent::AgentConfig {
        name: "hv1".into(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        advertise_url: None,
        server_url: Some(s.url()),
        server_ca: Some(s.ca_file()),
        server_ca_fingerprint: None,
        join_token: Some("join-token-for-tests-0123456789".into()),
        credential: None,
        state_dir: dir.path().join("hv1"),
        netns: None,
        migration_addr: [127, 0, 0, 1].into(),
        migration_ports: "49152-49215".into(),
        qemu_binary: "qemu-system-x86_64".into(),
        ovmf_code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
        ovmf_vars: "/usr/share/OVMF/OVMF_VARS_4M.fd".into(),
        accel: "tcg".into(),
        datastores: vec![],
        networks: vec![],
        heartbeat_ms: 300,
        reserve_mib: 0,
        ram_capacity_mib: None,
        cpu_flags_mask: vec![],
    })
    .await
    .expect("agent starts");
    let agent_addr = agent.url().trim_start_matches("https://").to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let old = loop {
        if let Ok(chain) = ferry_pki::tls::probe_server_chain(&agent_addr, "127.0.0.1").await {
            break chain;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never got its certificate"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let old_serial = ferry_pki::tls::serial_of(&old[0]).unwrap();
    // The server reaches it with its client identity; the agent's key stayed on the agent.
    let facts: serde_json::Value = ferry_server::agents::agent_client(&s.state, "hv1")
        .await
        .unwrap()
        .get("/v1/facts")
        .await
        .expect("the server calls the agent over mutual TLS");
    assert_eq!(facts["name"], "hv1");
    let key = dir.path().join("hv1/tls/agent.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let admin = s.client(Some(ADMIN.into()));
    let _: serde_json::Value = admin
        .post("/v1/hosts/hv1/rotate-cert", &())
        .await
        .expect("rotation");
    let new = ferry_pki::tls::probe_server_chain(&agent_addr, "127.0.0.1")
        .await
        .unwrap();
    assert_ne!(
        old[0], new[0],
        "a new certificate is served without a restart"
    );
    assert!(
        s.state.pki.revoked.contains(&old_serial),
        "the old one is revoked"
    );
    let facts: serde_json::Value = ferry_server::agents::agent_client(&s.state, "hv1")
        .await
        .unwrap()
        .get("/v1/facts")
        .await
        .expect("the server calls the agent with its new certificate");
    assert_eq!(facts["name"], "hv1");

    // Renewal by the agent itself (what it does when a third of the lifetime is left): with
    // its own credential, for its own name only.
    let credential = std::fs::read_to_string(dir.path().join("hv1/credential")).unwrap();
    let as_agent = s.client(Some(credential.trim().to_string()));
    let (_, csr) = ferry_pki::generate_key_and_csr("hv1").unwrap();
    let other = ferry_api::agent::RenewRequest {
        name: "hv2".into(),
        csr: csr.clone(),
    };
    let e = as_agent
        .post::<_, ferry_api::agent::InstallCertificate>("/v1/agents/renew", &other)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    let renewed: ferry_api::agent::InstallCertificate = as_agent
        .post(
            "/v1/agents/renew",
            &ferry_api::agent::RenewRequest {
                name: "hv1".into(),
                csr,
            },
        )
        .await
        .expect("renewal");
    assert_eq!(renewed.ca_pem, s.ca_pem());
    let rotated_serial = ferry_pki::tls::serial_of(&new[0]).unwrap();
    assert!(
        s.state.pki.revoked.contains(&rotated_serial),
        "the replaced one is revoked"
    );
    agent.shutdown().await;
    s.shutdown().await;
}
