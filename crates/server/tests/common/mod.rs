//! A real cluster for tests: lab namespaces, a server on a temporary SQLite file, one agent
//! per lab host (in-process), and the lab guest image.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferry_agent::{AgentConfig, AgentHandle, DatastoreConfig, NetworkConfig};
use ferry_api::hosts::{Host, HostState};
use ferry_api::instances::{CreateInstance, Instance, InstanceSpec, InstanceState};
use ferry_api::migrations::{CreateMigration, Migration, MigrationOptions};
use ferry_api::ApiClient;
use ferry_lab::guest_client::{self, VerifyReport};
use ferry_lab::guest_config::{GuestConfig, CONTROL_PORT};
use ferry_lab::image::{ensure_image, GuestImage, ImageOptions};
use ferry_lab::instance::guest_instance_spec;
use ferry_lab::net::{remove_orphan_test_labs, unique_test_lab_name, LabNet};
use ferry_server::config::Limits;
use ferry_server::{ServerConfig, ServerHandle};

pub const ADMIN: &str = "admin-token-for-tests-0123456789";
pub const JOIN: &str = "join-token-for-tests-0123456789";

pub struct Cluster {
    pub server: ServerHandle,
    pub agents: Vec<Option<AgentHandle>>,
    pub agent_configs: Vec<AgentConfig>,
    pub admin: ApiClient,
    pub image: GuestImage,
    // Dropped last: namespaces go, and with them every QEMU the agents started.
    pub lab: LabNet,
    pub dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    ferry_lab::net::free_local_ports(1).expect("a free loopback port")[0]
}

/// Gives the agent of `config` a datastore `local` of its own, at `base/HOST` (no identity:
/// not shared with any other host).
pub fn add_local_datastore(config: &mut AgentConfig, base: &std::path::Path) {
    let dir = base.join(&config.name);
    std::fs::create_dir_all(&dir).unwrap();
    config.datastores.push(DatastoreConfig {
        name: "local".into(),
        path: dir,
        identity: None,
    });
}

impl Cluster {
    pub async fn start(hosts: usize, limits: Limits) -> Cluster {
        Self::start_with(hosts, limits, |_| {}).await
    }

    /// Like [`Cluster::start`], with `tweak` applied to each agent's configuration before it
    /// starts (match on `config.name` to change one host).
    pub async fn start_with(
        hosts: usize,
        limits: Limits,
        tweak: impl Fn(&mut AgentConfig),
    ) -> Cluster {
        Self::start_with_server(hosts, limits, tweak, |_| {}).await
    }

    /// Like [`Cluster::start_with`], with `server_tweak` applied to the server's
    /// configuration before it starts.
    pub async fn start_with_server(
        hosts: usize,
        limits: Limits,
        tweak: impl Fn(&mut AgentConfig),
        server_tweak: impl FnOnce(&mut ServerConfig),
    ) -> Cluster {
        remove_orphan_test_labs();
        let dir = tempfile::tempdir().unwrap();
        let (image, _) = tokio::task::spawn_blocking(|| ensure_image(&ImageOptions::default()))
            .await
            .unwrap()
            .expect("guest image");
        let lab_name = unique_test_lab_name();
        let lab = tokio::task::spawn_blocking(move || LabNet::create(&lab_name, hosts))
            .await
            .unwrap()
            .expect("lab network");
        let mut server_config = ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            database: dir.path().join("ferry.db"),
            admin_token: Some(ADMIN.into()),
            join_token: JOIN.into(),
            heartbeat_timeout_s: 10,
            limits,
            // Probe results are reused for a second only, so a test can change the network
            // and see the next check probe again.
            preflight: ferry_server::config::Preflight {
                probe_cache_s: 1,
                ..Default::default()
            },
            progress_poll_ms: 200,
            cold_cleanup_after_s: 0,
            tls: Default::default(),
        };
        server_tweak(&mut server_config);
        let server = ferry_server::start(server_config)
            .await
            .expect("server starts");
        let mut agents = Vec::new();
        let mut agent_configs = Vec::new();
        for h in &lab.hosts {
            let port = free_port();
            let mut config = AgentConfig {
                name: h.name.clone(),
                listen: SocketAddr::from(([127, 0, 0, 1], port)),
                advertise_url: None,
                server_url: Some(server.url()),
                server_ca: Some(server.ca_file()),
                server_ca_fingerprint: None,
                join_token: Some(JOIN.into()),
                credential: None,
                state_dir: dir.path().join(&h.name),
                netns: Some(h.netns.clone()),
                migration_addr: h.migration_addr.into(),
                migration_ports: "49152-49215".into(),
                qemu_binary: "qemu-system-x86_64".into(),
                ovmf_code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
                ovmf_vars: "/usr/share/OVMF/OVMF_VARS_4M.fd".into(),
                accel: "tcg".into(),
                // The server accepts kernel and initrd only inside a datastore of the host.
                datastores: vec![DatastoreConfig {
                    name: "images".into(),
                    path: image.kernel.parent().expect("image dir").to_path_buf(),
                    identity: None,
                }],
                networks: vec![NetworkConfig {
                    name: "lab".into(),
                    bridge: "br0".into(),
                    subnet: Some("10.77.0.0/24".into()),
                }],
                heartbeat_ms: 500,
                reserve_mib: 256,
                ram_capacity_mib: None,
                cpu_flags_mask: vec![],
            };
            tweak(&mut config);
            agents.push(Some(
                ferry_agent::start(config.clone())
                    .await
                    .expect("agent starts"),
            ));
            agent_configs.push(config);
        }
        let admin = server.client(Some(ADMIN.into()));
        let cluster = Cluster {
            server,
            agents,
            agent_configs,
            admin,
            image,
            lab,
            dir,
        };
        cluster.wait_hosts_online(hosts).await;
        cluster
    }

    pub async fn wait_hosts_online(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let hosts: Vec<Host> = self.admin.get("/v1/hosts").await.unwrap();
            if hosts
                .iter()
                .filter(|h| h.state == HostState::Online)
                .count()
                == n
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "hosts did not come online: {hosts:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A lab guest spec: guest index `k` gets address 10.77.0.(100+k).
    pub fn guest_spec(&self, k: u8, memory_mib: u32, config: GuestConfig) -> InstanceSpec {
        let config = GuestConfig {
            ip: Some((self.lab.guest_addr(k), 24)),
            ..config
        };
        guest_instance_spec(
            &self.image,
            &config,
            memory_mib,
            &format!("52:54:00:aa:00:{k:02x}"),
        )
    }

    pub fn small_guest() -> GuestConfig {
        GuestConfig {
            wss_mib: 16,
            rate_mib_s: 8,
            ..GuestConfig::default()
        }
    }

    /// Creates and starts an instance on `host`, waits until its services answer.
    pub async fn running_vm(&self, name: &str, host: &str, k: u8) -> Instance {
        let req = CreateInstance {
            name: name.into(),
            host: Some(host.into()),
            spec: self.guest_spec(k, 192, Self::small_guest()),
            disks: vec![],
            start: true,
        };
        let i: Instance = self
            .admin
            .post("/v1/instances", &req)
            .await
            .expect("instance created");
        assert_eq!(i.state, InstanceState::Running);
        self.guest_control(k, "status", Duration::from_secs(90))
            .await;
        i
    }

    /// Sends a control command to guest `k` from the lab's client namespace, retrying until
    /// it answers or `patience` runs out.
    pub async fn guest_control(&self, k: u8, command: &str, patience: Duration) -> String {
        let addr = SocketAddr::from((self.lab.guest_addr(k), CONTROL_PORT));
        guest_client::control_in_within(&self.lab.client_netns, addr, command, patience)
            .await
            .unwrap_or_else(|e| panic!("guest {k} does not answer '{command}': {e}"))
    }

    pub async fn verify(&self, k: u8) -> VerifyReport {
        let reply = self
            .guest_control(k, "verify", Duration::from_secs(10))
            .await;
        guest_client::parse_verify(&reply).unwrap()
    }

    /// Asks for a live migration; the server's answer, accepted or not.
    pub async fn try_migrate(
        &self,
        instance: &str,
        to: &str,
        options: MigrationOptions,
    ) -> Result<Migration, ferry_api::ApiError> {
        self.admin
            .post(
                "/v1/migrations",
                &CreateMigration {
                    instance: instance.into(),
                    destination: Some(to.into()),
                    options,
                    kind: None,
                },
            )
            .await
    }

    pub async fn migrate(&self, instance: &str, to: &str, options: MigrationOptions) -> Migration {
        self.try_migrate(instance, to, options)
            .await
            .expect("migration accepted")
    }

    pub async fn migration(&self, id: uuid::Uuid) -> Migration {
        self.admin
            .get(&format!("/v1/migrations/{id}"))
            .await
            .unwrap()
    }

    /// Waits until the migration reaches a terminal state.
    pub async fn wait_end(&self, id: uuid::Uuid, patience: Duration) -> Migration {
        let deadline = Instant::now() + patience;
        loop {
            let m = self.migration(id).await;
            if m.state.is_terminal() {
                return m;
            }
            assert!(Instant::now() < deadline, "migration did not end: {m:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until job `id` satisfies `reached`; panics if it ends first or within 120 s.
    pub async fn wait_until(
        &self,
        id: uuid::Uuid,
        reached: impl Fn(&Migration) -> bool,
    ) -> Migration {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let now = self.migration(id).await;
            if reached(&now) {
                return now;
            }
            assert!(
                !now.state.is_terminal(),
                "the job ended before the moment waited for: {now:?}"
            );
            assert!(Instant::now() < deadline, "never reached: {now:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_state(
        &self,
        id: uuid::Uuid,
        want: ferry_api::migrations::MigrationState,
    ) -> Migration {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let m = self.migration(id).await;
            if m.state == want {
                return m;
            }
            assert!(
                !m.state.is_terminal() || want.is_terminal(),
                "ended before {want:?}: {m:?}"
            );
            assert!(Instant::now() < deadline, "never reached {want:?}: {m:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The check `name` of `instance`'s candidate `to`, as `ferry migrate --check` gets it;
    /// `query` adds query parameters (`&map_disk=...`).
    pub async fn check(
        &self,
        instance: &str,
        to: &str,
        query: &str,
        name: &str,
    ) -> ferry_api::checks::CheckResult {
        let candidates: Vec<ferry_api::checks::Candidate> = self
            .admin
            .get(&format!(
                "/v1/instances/{instance}/migration-candidates?destination={to}{query}"
            ))
            .await
            .unwrap();
        candidates[0]
            .checks
            .iter()
            .find(|k| k.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no check {name}: {candidates:?}"))
    }

    /// Job `id`'s log, a line per entry: level and message.
    pub async fn logs(&self, id: uuid::Uuid) -> String {
        let lines: Vec<ferry_api::migrations::LogLine> = self
            .admin
            .get(&format!("/v1/migrations/{id}/logs"))
            .await
            .unwrap();
        lines
            .iter()
            .map(|l| format!("{} {}", l.level, l.message))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub async fn instance(&self, name: &str) -> Instance {
        self.admin
            .get(&format!("/v1/instances/{name}"))
            .await
            .unwrap()
    }

    /// QEMU processes running in a lab host's namespace.
    pub fn qemus_on(&self, host: &str) -> usize {
        let ns = &self.lab.host(host).unwrap().netns;
        let out = std::process::Command::new("ip")
            .args(["netns", "pids", ns])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .count()
    }

    pub async fn shutdown(mut self) {
        for a in self.agents.iter_mut() {
            if let Some(a) = a.take() {
                a.shutdown().await;
            }
        }
        let Cluster { server, .. } = self;
        server.shutdown().await;
    }
}

/// Asserts that an API call was refused with this HTTP status and stable error code.
pub fn assert_refused(err: &ferry_api::ApiError, status: u16, code: &str) {
    assert_eq!(
        (err.status(), err.code().as_str()),
        (Some(status), code),
        "{err}"
    );
}
