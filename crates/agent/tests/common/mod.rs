//! What the agent tests share: a standalone agent's config (no server, preset credential) and
//! a client that presents that credential.

#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::Path;

use ferry_agent::{AgentConfig, AgentHandle, NetworkConfig};
use ferry_api::ApiClient;

pub const CREDENTIAL: &str = "test-credential";

pub fn config(name: &str, state_dir: &Path, netns: Option<String>, mig: Ipv4Addr) -> AgentConfig {
    AgentConfig {
        name: name.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise_url: None,
        server_url: None,
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

pub fn client(agent: &AgentHandle) -> ApiClient {
    ApiClient::new(&agent.url(), Some(CREDENTIAL.into()))
}
