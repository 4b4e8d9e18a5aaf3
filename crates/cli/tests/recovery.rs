//! Crash recovery with real processes: `ferry server` and `ferry agent` are killed with
//! SIGKILL in the middle of a live migration and started again. Every job must end, the guest
//! must run on exactly one host, and the recorded host must be that one.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_api::hosts::{Host, HostState};
use ferry_api::instances::{CreateInstance, Instance, InstanceState};
use ferry_api::migrations::{CreateMigration, Migration, MigrationOptions, MigrationState};
use ferry_api::ApiClient;
use ferry_cli::commands::lab::{agent_config, server_config};
use ferry_lab::guest_client;
use ferry_lab::guest_config::{GuestConfig, CONTROL_PORT};
use ferry_lab::image::{ensure_image, ImageOptions};
use ferry_lab::instance::guest_instance_spec;
use ferry_lab::net::{remove_orphan_test_labs, unique_test_lab_name, LabNet};

const ADMIN: &str = "admin-token-recovery-0123456789";
const JOIN: &str = "join-token-recovery-0123456789";

fn free_port() -> u16 {
    ferry_lab::net::free_local_ports(1).expect("a free loopback port")[0]
}

/// Server and agents as real child processes of the `ferry` binary.
struct Procs {
    dir: tempfile::TempDir,
    server: Option<Child>,
    agents: Vec<Option<Child>>,
    api: ApiClient,
    /// The migration a crash test followed to its end.
    last: Option<Migration>,
    // Last: removing the namespaces also kills the QEMUs the agents left.
    lab: LabNet,
}

impl Procs {
    fn spawn(&self, role: &str) -> Child {
        let log = std::fs::File::create(self.dir.path().join(format!("{role}.log"))).unwrap();
        let config = self.dir.path().join(format!("{role}.toml"));
        let kind = if role == "server" { "server" } else { "agent" };
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args([kind, "--config"])
            .arg(&config)
            .env("FERRY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    async fn start() -> Procs {
        remove_orphan_test_labs();
        let dir = tempfile::tempdir().unwrap();
        let name = unique_test_lab_name();
        let lab = tokio::task::spawn_blocking(move || LabNet::create(&name, 2))
            .await
            .unwrap()
            .unwrap();
        let port = free_port();
        let server = server_config(
            SocketAddr::from(([127, 0, 0, 1], port)),
            dir.path().join("ferry.db"),
            ADMIN,
            JOIN,
        );
        std::fs::write(
            dir.path().join("server.toml"),
            toml::to_string(&server).unwrap(),
        )
        .unwrap();
        let server_url = format!("https://127.0.0.1:{port}");
        // The CA exists before the server process starts, as in `ferry lab up`.
        let ca_pem = ferry_chaos::daemons::prepare_ca(dir.path()).unwrap();
        let ca_file = ferry_chaos::daemons::ca_file(dir.path());
        for h in &lab.hosts {
            let agent = agent_config(
                h,
                SocketAddr::from(([127, 0, 0, 1], free_port())),
                ferry_chaos::daemons::ServerRef {
                    url: &server_url,
                    ca: &ca_file,
                    join_token: JOIN,
                },
                dir.path().join(&h.name),
                "tcg",
                // The server accepts kernel and initrd only inside a datastore of the host.
                vec![ferry_agent::DatastoreConfig {
                    name: "images".into(),
                    path: ImageOptions::default().cache_dir,
                    identity: None,
                }],
            );
            std::fs::write(
                dir.path().join(format!("{}.toml", h.name)),
                toml::to_string(&agent).unwrap(),
            )
            .unwrap();
        }
        let mut p = Procs {
            api: ApiClient::new(&server_url, Some(ADMIN.into()))
                .with_tls(&ferry_api::TlsOptions::ca(ca_pem))
                .unwrap(),
            dir,
            server: None,
            agents: vec![None, None],
            last: None,
            lab,
        };
        p.server = Some(p.spawn("server"));
        for i in 0..2 {
            p.agents[i] = Some(p.spawn(&format!("hv{}", i + 1)));
        }
        p.wait_online().await;
        p
    }

    async fn wait_online(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(hosts) = self.api.get::<Vec<Host>>("/v1/hosts").await {
                if hosts
                    .iter()
                    .filter(|h| h.state == HostState::Online)
                    .count()
                    == 2
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "cluster did not come up; see {}",
                self.dir.path().display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn kill9(child: &mut Option<Child>) {
        let mut c = child.take().expect("process runs");
        c.kill().unwrap(); // SIGKILL
        c.wait().unwrap();
    }

    fn qemus_on(&self, host: &str) -> usize {
        let ns = &self.lab.host(host).unwrap().netns;
        let out = Command::new("ip")
            .args(["netns", "pids", ns])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .count()
    }

    async fn vm(&self) -> Instance {
        let image = tokio::task::spawn_blocking(|| ensure_image(&ImageOptions::default()))
            .await
            .unwrap()
            .unwrap()
            .0;
        let config = GuestConfig {
            ip: Some((self.lab.guest_addr(0), 24)),
            wss_mib: 16,
            rate_mib_s: 1,
            ..GuestConfig::default()
        };
        let req = CreateInstance {
            name: "survivor".into(),
            host: Some("hv1".into()),
            spec: guest_instance_spec(&image, &config, 192, "52:54:00:bb:00:01"),
            disks: vec![],
            start: true,
        };
        let vm: Instance = self.api.post("/v1/instances", &req).await.unwrap();
        self.guest("status", Duration::from_secs(90)).await;
        vm
    }

    async fn guest(&self, command: &str, patience: Duration) -> String {
        let addr = SocketAddr::from((self.lab.guest_addr(0), CONTROL_PORT));
        guest_client::control_in_within(&self.lab.client_netns, addr, command, patience)
            .await
            .unwrap_or_else(|e| panic!("guest does not answer {command}: {e}"))
    }

    /// A copy capped at 6 MiB/s: slow enough (about ten seconds) to crash something in the
    /// middle, and above the guest's 1 MiB/s dirty rate, so it converges.
    async fn start_slow_migration(&self) -> Migration {
        let m: Migration = self
            .api
            .post(
                "/v1/migrations",
                &CreateMigration {
                    instance: "survivor".into(),
                    destination: Some("hv2".into()),
                    options: MigrationOptions {
                        bandwidth_mib_s: Some(6),
                        ..Default::default()
                    },
                    kind: None,
                },
            )
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now: Migration = self
                .api
                .get(&format!("/v1/migrations/{}", m.id))
                .await
                .unwrap();
            if now.state == MigrationState::Migrating
                && now
                    .progress
                    .as_ref()
                    .is_some_and(|p| p.transferred_bytes > 1 << 20)
            {
                return now;
            }
            assert!(!now.state.is_terminal(), "ended early: {now:?}");
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_end(&self, id: uuid::Uuid) -> Migration {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Ok(m) = self
                .api
                .get::<Migration>(&format!("/v1/migrations/{id}"))
                .await
            {
                if m.state.is_terminal() {
                    return m;
                }
            }
            assert!(
                Instant::now() < deadline,
                "migration never ended; logs in {}",
                self.dir.path().display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The invariant after any crash: one running copy, where the server says it is, intact.
    async fn assert_one_copy_where_recorded(&self) {
        // Give heartbeats a moment to report the final states.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let vm: Instance = self.api.get("/v1/instances/survivor").await.unwrap();
        let (on1, on2) = (self.qemus_on("hv1"), self.qemus_on("hv2"));
        assert_eq!(on1 + on2, 1, "exactly one QEMU: hv1 {on1}, hv2 {on2}");
        let actual = if on1 == 1 { "hv1" } else { "hv2" };
        assert_eq!(vm.host, actual, "recorded host matches reality");
        assert_eq!(vm.state, InstanceState::Running);
        let verify =
            guest_client::parse_verify(&self.guest("verify", Duration::from_secs(20)).await)
                .unwrap();
        assert_eq!(verify.errors, 0, "{verify:?}");
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in self
            .agents
            .iter_mut()
            .chain(std::iter::once(&mut self.server))
            .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            // Keep the server and agent logs of a failed run for the report.
            let kept = std::env::temp_dir().join(format!(
                "ferry-recovery-{}",
                self.dir
                    .path()
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
            ));
            let _ = Command::new("cp")
                .arg("-r")
                .arg(self.dir.path())
                .arg(&kept)
                .status();
            eprintln!("server and agent logs copied to {}", kept.display());
        }
    }
}

/// Which process a crash test kills: `None` the server, `Some(i)` agent `i` (0: the source).
async fn crash_mid_migration(agent: Option<usize>) -> Procs {
    let mut p = Procs::start().await;
    p.vm().await;
    let m = p.start_slow_migration().await;
    match agent {
        None => Procs::kill9(&mut p.server),
        Some(i) => Procs::kill9(&mut p.agents[i]),
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    match agent {
        None => p.server = Some(p.spawn("server")),
        Some(i) => p.agents[i] = Some(p.spawn(&format!("hv{}", i + 1))),
    }
    let m = p.wait_end(m.id).await;
    assert!(
        matches!(m.state, MigrationState::Completed | MigrationState::Failed),
        "{m:?}"
    );
    p.assert_one_copy_where_recorded().await;
    p.last = Some(m);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_migration_finishes_the_job_after_restart() {
    let p = crash_mid_migration(None).await;
    let m = p.last.clone().unwrap();
    let logs: Vec<ferry_api::migrations::LogLine> = p
        .api
        .get(&format!("/v1/migrations/{}/logs", m.id))
        .await
        .unwrap();
    assert!(
        logs.iter().any(|l| l.message.contains("re-attaching")),
        "{logs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_agent_killed_mid_migration_ends_cleanly_and_readopts() {
    crash_mid_migration(Some(0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_agent_killed_mid_migration_ends_cleanly_and_readopts() {
    crash_mid_migration(Some(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restart_readopts_running_guests() {
    let mut p = Procs::start().await;
    let vm = p.vm().await;
    let before = p.qemus_on("hv1");
    Procs::kill9(&mut p.agents[0]);
    assert_eq!(p.qemus_on("hv1"), before, "the guest survives its agent");
    let restarted = chrono::Utc::now();
    p.agents[0] = Some(p.spawn("hv1"));
    // The server still counts hv1 online from its last heartbeat before the kill: wait for a
    // heartbeat of the restarted agent.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let host: Host = p.api.get("/v1/hosts/hv1").await.unwrap();
        if host.last_heartbeat.is_some_and(|t| t > restarted) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted agent never reported"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let again: Instance = p
        .api
        .get(&format!("/v1/instances/{}", vm.id))
        .await
        .unwrap();
    assert_eq!(again.state, InstanceState::Running);
    // The restarted agent controls the guest again: stop it through the API.
    let stopped: Instance = p
        .api
        .post("/v1/instances/survivor/stop", &())
        .await
        .unwrap();
    assert_eq!(stopped.state, InstanceState::Stopped);
    assert_eq!(p.qemus_on("hv1"), 0);
}
