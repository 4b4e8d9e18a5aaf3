//! `ferry datastore list` and `ferry instance create` through the real binary, against a
//! server and an agent started in this process (no lab network, no root beyond qemu-img's
//! files): the table and JSON output, a disk that exists afterwards, a refusal's
//! `error[code]` line with exit code 1, and what create says about networks (a NIC-less
//! instance's warning, an unknown network's list of the host's networks).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use ferry_agent::{AgentConfig, AgentHandle, DatastoreConfig, NetworkConfig};
use ferry_api::hosts::{Host, HostState};
use ferry_server::{ServerConfig, ServerHandle};

const ADMIN: &str = "admin-token-for-cli-disk-tests-01";
const JOIN: &str = "join-token-for-cli-disk-tests-012";

/// The CA file of each test server, by URL (tests run in parallel, each with its own server).
fn cas() -> &'static std::sync::Mutex<std::collections::HashMap<String, PathBuf>> {
    static CAS: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, PathBuf>>> =
        std::sync::OnceLock::new();
    CAS.get_or_init(Default::default)
}

/// Runs `ferry ARGS` against `url` with the admin token, trusting that server's CA.
async fn ferry(url: &str, args: &[&str]) -> Output {
    let ca = cas()
        .lock()
        .unwrap()
        .get(url)
        .cloned()
        .expect("a test server's URL");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.args(args)
        .env("FERRY_CA", ca)
        .env("FERRY_URL", url)
        .env("FERRY_TOKEN", ADMIN)
        .env("FERRY_CONFIG", "/nonexistent/cli.toml");
    cmd.output().await.unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A server and agent `hv1` in this process, the agent online with datastore `local` and a
/// network `lab` on bridge `br-none` (never created: nothing here starts a guest).
struct Cluster {
    server: ServerHandle,
    agent: AgentHandle,
    url: String,
    store: PathBuf,
    _dir: tempfile::TempDir,
}

async fn cluster() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("local");
    std::fs::create_dir(&store).unwrap();
    let server = ferry_server::start(ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        database: dir.path().join("ferry.db"),
        admin_token: Some(ADMIN.into()),
        join_token: JOIN.into(),
        heartbeat_timeout_s: 10,
        limits: Default::default(),
        preflight: Default::default(),
        progress_poll_ms: 200,
        cold_cleanup_after_s: 0,
        tls: Default::default(),
    })
    .await
    .unwrap();
    let url = server.url();
    cas().lock().unwrap().insert(url.clone(), server.ca_file());
    let agent = ferry_agent::start(AgentConfig {
        name: "hv1".into(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        advertise_url: None,
        server_url: Some(url.clone()),
        server_ca: Some(server.ca_file()),
        server_ca_fingerprint: None,
        join_token: Some(JOIN.into()),
        credential: None,
        state_dir: dir.path().join("state"),
        netns: None,
        migration_addr: [127, 0, 0, 1].into(),
        migration_ports: "49152-49215".into(),
        qemu_binary: "qemu-system-x86_64".into(),
        ovmf_code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
        ovmf_vars: "/usr/share/OVMF/OVMF_VARS_4M.fd".into(),
        accel: "tcg".into(),
        datastores: vec![DatastoreConfig {
            name: "local".into(),
            path: store.clone(),
            identity: None,
        }],
        networks: vec![NetworkConfig {
            name: "lab".into(),
            bridge: "br-none".into(),
            subnet: None,
        }],
        heartbeat_ms: 300,
        reserve_mib: 0,
        ram_capacity_mib: None,
        cpu_flags_mask: vec![],
    })
    .await
    .unwrap();
    // Online, and the agent holds its credential (stored once the join was answered).
    let admin = server.client(Some(ADMIN.into()));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let hosts: Vec<Host> = admin.get("/v1/hosts").await.unwrap();
        let answers = match ferry_server::agents::agent_client(&server.state, "hv1").await {
            Ok(agent) => agent.get::<serde_json::Value>("/v1/facts").await.is_ok(),
            Err(_) => false,
        };
        if answers && hosts.iter().any(|h| h.state == HostState::Online) {
            break;
        }
        assert!(Instant::now() < deadline, "hv1 never came online");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Cluster {
        server,
        agent,
        url,
        store,
        _dir: dir,
    }
}

impl Cluster {
    async fn shutdown(self) {
        self.agent.shutdown().await;
        self.server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datastores_are_listed_and_disks_made_through_the_cli() {
    let c = cluster().await;
    let (url, store) = (c.url.clone(), c.store.clone());

    let out = ferry(&url, &["datastore", "list"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(table.starts_with("NAME   SHARED  FREE/TOTAL"), "{table}");
    assert!(
        table.contains(&format!("hv1:{}", store.display())),
        "{table}"
    );
    let out = ferry(&url, &["datastore", "list", "-o", "json"]).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["name"], "local");
    assert_eq!(json[0]["shared"], false);

    let out = ferry(
        &url,
        &[
            "instance",
            "create",
            "vm1",
            "--memory-mib",
            "128",
            "--host",
            "hv1",
            "--disk",
            "64M@local,serial=D1",
            "-o",
            "json",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let vm: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let disk = &vm["spec"]["disks"][0];
    assert_eq!(disk["size_bytes"], 64 << 20);
    assert_eq!(disk["serial"], "D1");
    assert_eq!(vm["spec"]["boot"]["from"], "disk");
    assert!(Path::new(&store.join("vm1-disk0.qcow2")).is_file());

    // `instance show` lists the disk.
    let out = ferry(&url, &["instance", "show", "vm1"]).await;
    assert!(
        text(&out.stdout).contains("disk0 local:vm1-disk0.qcow2 qcow2 64 MiB"),
        "{}",
        text(&out.stdout)
    );

    // Refused by the server: its code on stderr, exit 1, nothing made.
    let out = ferry(
        &url,
        &[
            "instance",
            "create",
            "vm2",
            "--memory-mib",
            "128",
            "--disk",
            "1G@elsewhere",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.starts_with("error[unknown-datastore]"), "{err}");
    assert!(err.contains("hint:"), "{err}");
    // Refused by the command line itself: exit 1 too.
    let out = ferry(
        &url,
        &[
            "instance",
            "create",
            "vm3",
            "--memory-mib",
            "128",
            "--disk",
            "1.5G",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is not a size"),
        "{}",
        text(&out.stderr)
    );

    let out = ferry(&url, &["instance", "delete", "vm1"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let left: Vec<_> = std::fs::read_dir(&store).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");

    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_warns_without_a_nic_and_lists_the_networks_of_an_unknown_one() {
    let c = cluster().await;
    let url = c.url.clone();
    let make = |name: &'static str, extra: &'static [&'static str]| {
        let url = url.clone();
        async move {
            let mut args = vec![
                "instance",
                "create",
                name,
                "--memory-mib",
                "128",
                "--host",
                "hv1",
                "--disk",
                "1M@local",
            ];
            args.extend_from_slice(extra);
            ferry(&url, &args).await
        }
    };

    // No NIC: created, with a warning on stderr and in the JSON answer.
    let out = make("quiet", &["-o", "json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("warning[no-network]: quiet has no NIC"),
        "{err}"
    );
    assert!(err.contains("\n  hint: ") && err.contains("--nic"), "{err}");
    let vm: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(vm["warnings"][0]["code"], "no-network", "{vm}");
    // Only the answer to the create carries it.
    let out = ferry(&url, &["instance", "show", "quiet", "-o", "json"]).await;
    let vm: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(vm.get("warnings").is_none(), "{vm}");

    // A NIC: no warning.
    let out = make("wired", &["--nic", "lab"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("warning"),
        "{}",
        text(&out.stderr)
    );

    // An unknown network: refused, naming the networks the host has; nothing made.
    let out = make("lost", &["--nic", "lab0"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.starts_with(
            "error[unknown-network]: network 'lab0' is not configured on host hv1; its \
             networks: lab (bridge br-none)"
        ),
        "{err}"
    );
    assert!(err.contains("hint: "), "{err}");
    assert!(!c.store.join("lost-disk0.qcow2").exists());

    for name in ["quiet", "wired"] {
        let out = ferry(&url, &["instance", "delete", name]).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    c.shutdown().await;
}
