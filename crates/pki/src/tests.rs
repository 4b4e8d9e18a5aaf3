//! Handshakes between in-memory rustls connections with the certificates the CA makes.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

use crate::tls::{
    agent_server_config, agents_client_config, certs_from_pem, client_config, pinned_client_config,
    server_config, PIN_MISMATCH,
};
use crate::*;

const DAY: Duration = Duration::from_secs(86400);

/// Runs a handshake to its end; the first error either side reports.
fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    name: &str,
) -> Result<(), rustls::Error> {
    let mut c = ClientConnection::new(client, ServerName::try_from(name.to_string()).unwrap())?;
    let mut s = ServerConnection::new(server)?;
    for _ in 0..20 {
        let mut buf = Vec::new();
        c.write_tls(&mut buf).unwrap();
        let mut rd = &buf[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
        }
        s.process_new_packets()?;
        let mut buf = Vec::new();
        s.write_tls(&mut buf).unwrap();
        let mut rd = &buf[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
        }
        c.process_new_packets()?;
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() {
            return Ok(());
        }
    }
    panic!("the handshake made no progress");
}

fn new_ca() -> (tempfile::TempDir, ClusterCa) {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::load_or_create(&dir.path().join("pki"), None).unwrap();
    (dir, ca)
}

/// An agent's certificate as it gets one: key and CSR on the agent, signed by the CA.
fn agent_cert(ca: &ClusterCa, host: &str) -> (String, String) {
    let (key, csr) = generate_key_and_csr(host).unwrap();
    let issued = ca
        .sign_agent_csr(
            &csr,
            host,
            &[],
            &[IpAddr::from([10, 0, 0, 7])],
            AGENT_CERT_VALIDITY,
        )
        .unwrap();
    (issued.chain_pem, key)
}

#[test]
fn the_server_certificate_chains_to_the_ca_for_its_names() {
    let (_d, ca) = new_ca();
    let cert = ca
        .issue_server_cert(
            &["ferry.example".into()],
            &[IpAddr::from([10, 1, 2, 3])],
            DAY,
        )
        .unwrap();
    let server = server_config(&cert.chain_pem, &cert.key_pem).unwrap();
    let client = client_config(ca.ca_pem(), None).unwrap();
    for name in ["ferry.example", "10.1.2.3", "127.0.0.1", "localhost"] {
        handshake(client.clone(), server.clone(), name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let err = handshake(client, server, "other.example").unwrap_err();
    assert!(err.to_string().contains("not valid for name"), "{err}");
}

#[test]
fn a_certificate_from_another_ca_is_refused() {
    let (_d, ca) = new_ca();
    let (_d2, other) = new_ca();
    let cert = other.issue_server_cert(&[], &[], DAY).unwrap();
    let server = server_config(&cert.chain_pem, &cert.key_pem).unwrap();
    let err = handshake(
        client_config(ca.ca_pem(), None).unwrap(),
        server,
        "localhost",
    )
    .unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
}

#[test]
fn an_expired_certificate_is_refused() {
    let (_d, ca) = new_ca();
    let mut spec = LeafSpec::new("ferry-server-api", Usage::Server, DAY);
    spec.dns_names.push("localhost".into());
    spec.not_before = SystemTime::now() - 10 * DAY;
    spec.not_after = SystemTime::now() - DAY;
    let cert = ca.issue(&spec).unwrap();
    let server = server_config(&cert.chain_pem, &cert.key_pem).unwrap();
    let err = handshake(
        client_config(ca.ca_pem(), None).unwrap(),
        server,
        "localhost",
    )
    .unwrap_err();
    assert!(err.to_string().contains("xpired"), "{err}");
}

#[test]
fn an_agent_accepts_only_the_servers_client_identity() {
    let (_d, ca) = new_ca();
    let (chain, key) = agent_cert(&ca, "hv1");
    let agent = agent_server_config(&chain, &key, ca.ca_pem()).unwrap();
    let identity = ca.issue_server_client_identity(DAY).unwrap();
    let revoked = RevokedSerials::default();
    let server_client = agents_client_config(
        ca.ca_pem(),
        &identity.chain_pem,
        &identity.key_pem,
        revoked.clone(),
    )
    .unwrap();
    handshake(server_client.clone(), agent.clone(), "hv1").unwrap();
    handshake(server_client.clone(), agent.clone(), "10.0.0.7").unwrap();

    // No client certificate at all.
    let anonymous = client_config(ca.ca_pem(), None).unwrap();
    assert!(handshake(anonymous, agent.clone(), "hv1").is_err());

    // Another agent's certificate (serverAuth only) cannot call an agent.
    let (chain2, key2) = agent_cert(&ca, "hv2");
    let as_agent = client_config(ca.ca_pem(), Some((&chain2, &key2))).unwrap();
    let err = handshake(as_agent, agent.clone(), "hv1").unwrap_err();
    assert!(
        err.to_string().contains("Purpose") || err.to_string().contains("usage"),
        "{err}"
    );

    // A client certificate from the cluster CA that is not the server's.
    let other_client = ca
        .issue(&LeafSpec::new("someone-else", Usage::Client, DAY))
        .unwrap();
    let as_other = client_config(
        ca.ca_pem(),
        Some((&other_client.chain_pem, &other_client.key_pem)),
    )
    .unwrap();
    assert!(handshake(as_other, agent.clone(), "hv1").is_err());

    // The server's identity from another CA.
    let (_d2, other) = new_ca();
    let foreign = other.issue_server_client_identity(DAY).unwrap();
    let as_foreign =
        client_config(ca.ca_pem(), Some((&foreign.chain_pem, &foreign.key_pem))).unwrap();
    assert!(handshake(as_foreign, agent.clone(), "hv1").is_err());

    // An expired server identity.
    let mut spec = LeafSpec::new(SERVER_CLIENT_CN, Usage::Client, DAY);
    spec.not_before = SystemTime::now() - 10 * DAY;
    spec.not_after = SystemTime::now() - DAY;
    let expired = ca.issue(&spec).unwrap();
    let as_expired =
        client_config(ca.ca_pem(), Some((&expired.chain_pem, &expired.key_pem))).unwrap();
    assert!(handshake(as_expired, agent.clone(), "hv1").is_err());

    // A revoked agent certificate is refused by the server.
    let serial = tls::serial_of(&certs_from_pem(&chain).unwrap()[0]).unwrap();
    revoked.revoke(&serial);
    let err = handshake(server_client, agent, "hv1").unwrap_err();
    assert!(err.to_string().contains("Revoked"), "{err}");
}

#[test]
fn the_servers_https_certificate_cannot_act_as_a_client() {
    let (_d, ca) = new_ca();
    let (chain, key) = agent_cert(&ca, "hv1");
    let agent = agent_server_config(&chain, &key, ca.ca_pem()).unwrap();
    let https = ca.issue_server_cert(&[], &[], DAY).unwrap();
    let as_https = client_config(ca.ca_pem(), Some((&https.chain_pem, &https.key_pem))).unwrap();
    assert!(handshake(as_https, agent, "hv1").is_err());
}

#[test]
fn a_pin_trusts_its_ca_or_leaf_and_nothing_else() {
    let (_d, ca) = new_ca();
    let cert = ca.issue_server_cert(&[], &[], DAY).unwrap();
    let server = server_config(&cert.chain_pem, &cert.key_pem).unwrap();
    handshake(
        pinned_client_config(&ca.fingerprint(), None).unwrap(),
        server.clone(),
        "localhost",
    )
    .unwrap();
    let leaf = fingerprint(&certs_from_pem(&cert.chain_pem).unwrap()[0]);
    handshake(
        pinned_client_config(&leaf, None).unwrap(),
        server.clone(),
        "localhost",
    )
    .unwrap();
    // The CA pin still checks the name, like a CA file would.
    assert!(handshake(
        pinned_client_config(&ca.fingerprint(), None).unwrap(),
        server.clone(),
        "other.example"
    )
    .is_err());
    let (_d2, other) = new_ca();
    let err = handshake(
        pinned_client_config(&other.fingerprint(), None).unwrap(),
        server,
        "localhost",
    )
    .unwrap_err();
    assert!(err.to_string().contains(PIN_MISMATCH), "{err}");
    assert!(pinned_client_config("sha256:12:34", None).is_err());
}

#[test]
fn fingerprints_round_trip() {
    let (_d, ca) = new_ca();
    let fp = ca.fingerprint();
    assert!(
        fp.starts_with("sha256:") && fp.len() == 7 + 32 * 3 - 1,
        "{fp}"
    );
    let bytes = parse_fingerprint(&fp).unwrap();
    assert!(parse_fingerprint("sha256:zz").is_err());
    assert_eq!(
        parse_fingerprint(&format!("sha256:{}", hex::encode(bytes))).unwrap(),
        bytes
    );
}

#[test]
fn the_ca_is_created_once_with_private_files_and_loaded_after() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let first = ClusterCa::load_or_create(&pki, None).unwrap();
    assert!(first.created());
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&pki), 0o700);
    for f in ["ca.pem", "ca.key", "migration-ca.pem", "migration-ca.key"] {
        assert_eq!(mode(&pki.join(f)), 0o600, "{f}");
    }
    let second = ClusterCa::load_or_create(&pki, None).unwrap();
    assert!(!second.created());
    assert_eq!(first.fingerprint(), second.fingerprint());
    assert_ne!(first.ca_pem(), first.migration_ca_pem());
    // A certificate the reloaded CA signs chains to the first one's certificate.
    let cert = second.issue_server_cert(&[], &[], DAY).unwrap();
    let server = server_config(&cert.chain_pem, &cert.key_pem).unwrap();
    handshake(
        client_config(first.ca_pem(), None).unwrap(),
        server,
        "localhost",
    )
    .unwrap();
}

#[test]
fn an_operators_own_ca_signs_and_a_mismatched_key_is_refused() {
    let (d, own) = new_ca();
    let ext = ExternalCa {
        cert: d.path().join("pki/ca.pem"),
        key: d.path().join("pki/ca.key"),
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::load_or_create(&dir.path().join("pki"), Some(&ext)).unwrap();
    assert_eq!(ca.fingerprint(), own.fingerprint());
    let cert = ca.issue_server_cert(&[], &[], DAY).unwrap();
    let server = server_config(&cert.chain_pem, &cert.key_pem).unwrap();
    handshake(
        client_config(own.ca_pem(), None).unwrap(),
        server,
        "localhost",
    )
    .unwrap();

    let bad = ExternalCa {
        cert: d.path().join("pki/ca.pem"),
        key: d.path().join("pki/migration-ca.key"),
    };
    let err = ClusterCa::load_or_create(&dir.path().join("pki2"), Some(&bad)).unwrap_err();
    assert!(err.to_string().contains("does not belong"), "{err}");
}

#[test]
fn a_migration_pair_binds_the_destination_and_separates_the_roots() {
    let (_d, ca) = new_ca();
    let id = uuid::Uuid::new_v4();
    let src: IpAddr = [10, 78, 0, 11].into();
    let dst: IpAddr = [10, 78, 0, 12].into();
    let creds = ca
        .issue_migration_pair(id, src, dst, Duration::ZERO)
        .unwrap();
    assert_eq!(creds.source_dn, format!("CN=ferry-migration-{id}-source"));
    assert_eq!(
        creds.destination_dn,
        format!("CN=ferry-migration-{id}-destination")
    );
    let left = creds.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(left <= MIGRATION_CREDS_TTL && left > MIGRATION_CREDS_TTL - Duration::from_secs(60));
    let cn = |pem: &str| tls::common_name_of(&certs_from_pem(pem).unwrap()[0]).unwrap();
    assert_eq!(
        format!("CN={}", cn(&creds.source.cert_pem)),
        creds.source_dn
    );
    assert_eq!(
        certs_from_pem(&creds.source.cert_pem).unwrap().len(),
        1,
        "leaf only"
    );

    let dest_server = {
        let chain = format!("{}{}", creds.destination.cert_pem, creds.ca_pem);
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
            {
                let mut r = rustls::RootCertStore::empty();
                r.add(certs_from_pem(&creds.ca_pem).unwrap().remove(0))
                    .unwrap();
                Arc::new(r)
            },
            tls::provider(),
        )
        .build()
        .unwrap();
        Arc::new(
            ServerConfig::builder_with_provider(tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(inner)
                .with_single_cert(
                    certs_from_pem(&chain).unwrap(),
                    tls::key_from_pem(&creds.destination.key_pem).unwrap(),
                )
                .unwrap(),
        )
    };
    let source = client_config(
        &creds.ca_pem,
        Some((&creds.source.cert_pem, &creds.source.key_pem)),
    )
    .unwrap();
    handshake(source.clone(), dest_server.clone(), "10.78.0.12").unwrap();
    // Bound to the destination's address.
    assert!(handshake(source, dest_server.clone(), "10.78.0.13").is_err());
    // The cluster CA does not trust migration certificates, and the reverse.
    let via_cluster = client_config(
        ca.ca_pem(),
        Some((&creds.source.cert_pem, &creds.source.key_pem)),
    )
    .unwrap();
    assert!(handshake(via_cluster, dest_server, "10.78.0.12").is_err());
    let identity = ca.issue_server_client_identity(DAY).unwrap();
    let (chain, key) = agent_cert(&ca, "hv1");
    let agent = agent_server_config(&chain, &key, ca.ca_pem()).unwrap();
    let with_migration_ca = agents_client_config(
        &creds.ca_pem,
        &identity.chain_pem,
        &identity.key_pem,
        RevokedSerials::default(),
    )
    .unwrap();
    assert!(handshake(with_migration_ca, agent, "hv1").is_err());
    // The key never shows in debug output.
    assert!(!format!("{:?}", creds.source).contains("PRIVATE KEY"));
}

#[test]
fn renewal_starts_when_a_third_is_left() {
    let (_d, ca) = new_ca();
    let cert = ca
        .issue_server_cert(&[], &[], Duration::from_secs(90 * 86400))
        .unwrap();
    assert!(!cert.needs_renewal(SystemTime::now()));
    assert!(!cert.needs_renewal(SystemTime::now() + 55 * DAY));
    assert!(cert.needs_renewal(SystemTime::now() + 61 * DAY));
    assert!(cert.needs_renewal(SystemTime::now() + 100 * DAY));
}

#[tokio::test]
async fn a_served_listener_hands_out_handshaken_connections_and_probing_sees_the_chain() {
    let (_d, ca) = new_ca();
    let cert = ca.issue_server_cert(&[], &[], DAY).unwrap();
    let slot = ServerConfigSlot::new(Some(server_config(&cert.chain_pem, &cert.key_pem).unwrap()));
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let listener = TlsListener::new(tcp, slot).unwrap();
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
    let (stop, mut stop_rx) = tokio::sync::watch::channel(false);
    let serve = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            })
            .await
    });
    let chain = tls::probe_server_chain(&addr.to_string(), "localhost")
        .await
        .unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(fingerprint(&chain[1]), ca.fingerprint());
    // Plain HTTP gets no answer.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("hi"));
    let _ = stop.send(true);
    serve.await.unwrap().unwrap();
}
