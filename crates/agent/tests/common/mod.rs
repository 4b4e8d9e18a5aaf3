//! What the agent tests share: a standalone agent's config (no server; a certificate from a
//! test cluster CA installed in its state directory) and a client that presents the server's
//! client identity from that CA, as the real server does.

#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferry_agent::{AgentConfig, AgentHandle, NetworkConfig};
use ferry_api::ApiClient;

pub const CREDENTIAL: &str = "test-credential";

/// The tests' cluster CA (one per test process; its directory lives as long as the process).
pub fn test_ca() -> &'static ferry_pki::ClusterCa {
    static CA: OnceLock<(tempfile::TempDir, ferry_pki::ClusterCa)> = OnceLock::new();
    &CA.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let ca = ferry_pki::ClusterCa::load_or_create(&dir.path().join("pki"), None).unwrap();
        (dir, ca)
    })
    .1
}

/// Gives a standalone agent what a join would: a key made here, the CSR signed by the test
/// CA for `name` and 127.0.0.1, and the CA.
pub fn install_agent_cert(name: &str, state_dir: &Path) {
    let ca = test_ca();
    let (key, csr) = ferry_pki::generate_key_and_csr(name).unwrap();
    let issued = ca
        .sign_agent_csr(
            &csr,
            name,
            &[],
            &[Ipv4Addr::LOCALHOST.into()],
            ferry_pki::AGENT_CERT_VALIDITY,
        )
        .unwrap();
    ferry_agent::tls::install_certificate(state_dir, &key, &issued.chain_pem, ca.ca_pem()).unwrap();
}

/// The client configuration the server uses for agents: its identity from the test CA.
pub fn server_identity_tls() -> Arc<rustls::ClientConfig> {
    let ca = test_ca();
    let identity = ca
        .issue_server_client_identity(Duration::from_secs(3600))
        .unwrap();
    ferry_pki::tls::agents_client_config(
        ca.ca_pem(),
        &identity.chain_pem,
        &identity.key_pem,
        ferry_pki::RevokedSerials::default(),
    )
    .unwrap()
}

pub fn config(name: &str, state_dir: &Path, netns: Option<String>, mig: Ipv4Addr) -> AgentConfig {
    install_agent_cert(name, state_dir);
    AgentConfig {
        name: name.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise_url: None,
        server_url: None,
        server_ca: None,
        server_ca_fingerprint: None,
        join_token: None,
        credential: Some(CREDENTIAL.into()),
        state_dir: state_dir.to_path_buf(),
        netns,
        migration_addr: mig.into(),
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
        heartbeat_ms: 2000,
        reserve_mib: 2048,
        ram_capacity_mib: None,
        cpu_flags_mask: vec![],
    }
}

/// A client for `agent` as the server calls it.
pub fn client(agent: &AgentHandle) -> ApiClient {
    ApiClient::new(&agent.url(), None).with_tls_config(server_identity_tls())
}
