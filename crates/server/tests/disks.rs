//! Disks through the REST API, with a real server and real agents (in-process, no lab network)
//! whose datastores are temporary directories, and real images made by qemu-img: what a
//! create makes, what a delete removes, and that every refused request leaves no image and no
//! record behind.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_agent::{AgentConfig, AgentHandle, DatastoreConfig};
use ferry_api::hosts::{Datastore, Host, HostState};
use ferry_api::instances::{
    BootFrom, BootSpec, CreateInstance, DiskFormat, DiskRequest, FirmwareKind, Instance,
    InstanceSpec, InstanceState,
};
use ferry_api::ApiClient;
use ferry_server::{ServerConfig, ServerHandle};

const ADMIN: &str = "admin-token-for-disk-tests-012345";
const JOIN: &str = "join-token-for-disk-tests-0123456";
const MIB: u64 = 1 << 20;

struct Env {
    server: ServerHandle,
    agents: Vec<Option<AgentHandle>>,
    configs: Vec<AgentConfig>,
    admin: ApiClient,
    dir: tempfile::TempDir,
}

impl Env {
    /// hv1 and hv2, each with a local datastore `local` of its own and the datastore `shared`
    /// (one directory with an identity file, as an NFS export would be). `tweak` changes an
    /// agent's config before it starts.
    async fn start(tweak: impl Fn(&mut AgentConfig)) -> Env {
        let dir = tempfile::tempdir().unwrap();
        for d in ["hv1-local", "hv2-local", "shared"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        std::fs::write(dir.path().join("shared/.ferry-datastore-id"), "nfs-test\n").unwrap();
        let server = ferry_server::start(ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            database: dir.path().join("ferry.db"),
            admin_token: Some(ADMIN.into()),
            join_token: JOIN.into(),
            // Short, so that a test can see a host go offline.
            heartbeat_timeout_s: 3,
            limits: Default::default(),
            preflight: Default::default(),
            progress_poll_ms: 200,
            cold_cleanup_after_s: 0,
            tls: Default::default(),
        })
        .await
        .expect("server starts");
        let mut agents = Vec::new();
        let mut configs = Vec::new();
        for name in ["hv1", "hv2"] {
            let mut config = AgentConfig {
                name: name.into(),
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                advertise_url: None,
                server_url: Some(server.url()),
                server_ca: Some(server.ca_file()),
                server_ca_fingerprint: None,
                join_token: Some(JOIN.into()),
                credential: None,
                state_dir: dir.path().join(format!("{name}-state")),
                netns: None,
                migration_addr: [127, 0, 0, 1].into(),
                migration_ports: "49152-49215".into(),
                qemu_binary: "qemu-system-x86_64".into(),
                ovmf_code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
                ovmf_vars: "/usr/share/OVMF/OVMF_VARS_4M.fd".into(),
                accel: "tcg".into(),
                datastores: vec![
                    DatastoreConfig {
                        name: "local".into(),
                        path: dir.path().join(format!("{name}-local")),
                        identity: None,
                    },
                    DatastoreConfig {
                        name: "shared".into(),
                        path: dir.path().join("shared"),
                        identity: None,
                    },
                ],
                networks: vec![],
                heartbeat_ms: 300,
                reserve_mib: 0,
                ram_capacity_mib: None,
                cpu_flags_mask: vec![],
            };
            tweak(&mut config);
            agents.push(Some(
                ferry_agent::start(config.clone())
                    .await
                    .expect("agent starts"),
            ));
            configs.push(config);
        }
        let admin = server.client(Some(ADMIN.into()));
        let env = Env {
            server,
            agents,
            configs,
            admin,
            dir,
        };
        env.wait_online(2).await;
        env
    }

    /// Waits until `n` hosts are online with facts, and their agents accept the server's
    /// credential (an agent stores it only after its join was answered).
    async fn wait_online(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let hosts: Vec<Host> = self.admin.get("/v1/hosts").await.unwrap();
            let mut online = 0;
            for h in &hosts {
                if h.state == HostState::Online
                    && h.facts.is_some()
                    && self
                        .agent(&h.name)
                        .await
                        .get::<serde_json::Value>("/v1/facts")
                        .await
                        .is_ok()
                {
                    online += 1;
                }
            }
            if online == n {
                return;
            }
            assert!(Instant::now() < deadline, "not {n} hosts online: {hosts:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn path_str(&self, rel: &str) -> String {
        self.path(rel).display().to_string()
    }

    /// Files in the datastores (as `dir/name`), sorted, without the identity file.
    fn files(&self) -> Vec<String> {
        let mut out = Vec::new();
        for d in ["hv1-local", "hv2-local", "shared"] {
            for e in std::fs::read_dir(self.path(d)).unwrap() {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                if name != ".ferry-datastore-id" {
                    out.push(format!("{d}/{name}"));
                }
            }
        }
        out.sort();
        out
    }

    async fn create(
        &self,
        name: &str,
        host: &str,
        disks: Vec<DiskRequest>,
    ) -> Result<Instance, ferry_api::ApiError> {
        self.create_with(name, host, disks, |_| {}).await
    }

    async fn create_with(
        &self,
        name: &str,
        host: &str,
        disks: Vec<DiskRequest>,
        tweak: impl Fn(&mut CreateInstance),
    ) -> Result<Instance, ferry_api::ApiError> {
        let mut req = CreateInstance {
            name: name.into(),
            host: Some(host.into()),
            spec: InstanceSpec {
                memory_mib: 128,
                vcpus: 1,
                cpu_model: "qemu64".into(),
                machine: "pc".into(),
                boot: BootSpec {
                    from: BootFrom::Disk,
                    ..BootSpec::default()
                },
                disks: vec![],
                nics: vec![],
            },
            disks,
            start: false,
        };
        tweak(&mut req);
        self.admin.post("/v1/instances", &req).await
    }

    async fn delete(&self, name: &str) -> Result<Instance, ferry_api::ApiError> {
        self.admin.delete(&format!("/v1/instances/{name}")).await
    }

    async fn instances(&self) -> Vec<Instance> {
        self.admin.get("/v1/instances").await.unwrap()
    }

    /// A client for `host`'s agent as the server calls it (its client certificate).
    async fn agent(&self, host: &str) -> ApiClient {
        ferry_server::agents::agent_client(&self.server.state, host)
            .await
            .unwrap()
    }

    async fn shutdown(self) {
        for a in self.agents.into_iter().flatten() {
            a.shutdown().await;
        }
        self.server.shutdown().await;
    }
}

/// `qemu-img info` of a file: (format, virtual size, backing file as written).
fn qemu_img_info(path: &Path) -> (String, u64, Option<String>) {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        v["format"].as_str().unwrap().to_string(),
        v["virtual-size"].as_u64().unwrap(),
        v["backing-filename"].as_str().map(String::from),
    )
}

fn qemu_img_create(path: &Path, format: &str, size: u64) {
    let ok = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(path)
        .arg(size.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

fn sized(size: u64) -> DiskRequest {
    DiskRequest {
        size_bytes: Some(size),
        ..DiskRequest::default()
    }
}

fn at(mut d: DiskRequest, datastore: &str) -> DiskRequest {
    d.datastore = Some(datastore.into());
    d
}

fn image(path: String) -> DiskRequest {
    DiskRequest {
        image: Some(path),
        ..DiskRequest::default()
    }
}

fn assert_refused(r: Result<Instance, ferry_api::ApiError>, status: u16, code: &str) {
    let err = r.expect_err("refused");
    assert_eq!(
        (err.status(), err.code().as_str()),
        (Some(status), code),
        "{err}"
    );
    let body = err.body();
    assert!(
        !body.message.is_empty() && !body.hint.is_empty(),
        "{body:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_are_created_copied_overlaid_or_attached_and_deleted_only_when_ferry_made_them() {
    let env = Env::start(|_| {}).await;

    // One shared datastore with two mounts, and each host's local one on its own.
    let stores: Vec<Datastore> = env.admin.get("/v1/datastores").await.unwrap();
    let shared: Vec<&Datastore> = stores.iter().filter(|d| d.shared).collect();
    assert_eq!(shared.len(), 1, "{stores:?}");
    assert_eq!(shared[0].name, "shared");
    assert_eq!(shared[0].identity.as_deref(), Some("nfs-test"));
    let mut mounts: Vec<&str> = shared[0].mounts.iter().map(|m| m.host.as_str()).collect();
    mounts.sort();
    assert_eq!(mounts, ["hv1", "hv2"]);
    let locals: Vec<(&str, &str)> = stores
        .iter()
        .filter(|d| !d.shared)
        .map(|d| (d.name.as_str(), d.mounts[0].host.as_str()))
        .collect();
    assert_eq!(locals, [("local", "hv1"), ("local", "hv2")], "{stores:?}");

    // Images the operator brings: a raw golden image, a qcow2 one, and a base for overlays.
    qemu_img_create(&env.path("shared/golden.raw"), "raw", 8 * MIB);
    qemu_img_create(&env.path("shared/golden.qcow2"), "qcow2", 24 * MIB);
    qemu_img_create(&env.path("shared/base.qcow2"), "qcow2", 32 * MIB);
    let given = [
        "shared/base.qcow2",
        "shared/golden.qcow2",
        "shared/golden.raw",
    ];

    let vm1 = env
        .create(
            "vm1",
            "hv1",
            vec![
                at(sized(64 * MIB), "local"),
                image(env.path_str("shared/golden.raw")),
                DiskRequest {
                    copy: true,
                    datastore: Some("local".into()),
                    ..image(env.path_str("shared/golden.qcow2"))
                },
                DiskRequest {
                    backing: Some(env.path_str("shared/base.qcow2")),
                    datastore: Some("shared".into()),
                    ..DiskRequest::default()
                },
                DiskRequest {
                    id: Some("scratch".into()),
                    format: Some(DiskFormat::Raw),
                    ..sized(16 * MIB)
                },
            ],
        )
        .await
        .expect("vm1 created");
    let d = &vm1.spec.disks;
    assert_eq!(d.len(), 5);
    let ids: Vec<&str> = d.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["disk0", "disk1", "disk2", "disk3", "scratch"]);

    // A new qcow2 of the asked virtual size, on the named datastore.
    assert_eq!(
        (d[0].image.datastore.as_str(), d[0].image.file.as_str()),
        ("local", "vm1-disk0.qcow2")
    );
    assert!(d[0].managed);
    assert_eq!(
        qemu_img_info(&env.path("hv1-local/vm1-disk0.qcow2")),
        ("qcow2".into(), 64 * MIB, None)
    );
    // Attached in place: where it is, its own size and format, not Ferry's.
    assert_eq!(
        (d[1].image.datastore.as_str(), d[1].image.file.as_str()),
        ("shared", "golden.raw")
    );
    assert_eq!(
        (d[1].format, d[1].size_bytes, d[1].managed),
        (DiskFormat::Raw, 8 * MIB, false)
    );
    // A copy: Ferry's.
    assert_eq!(d[2].image.file, "vm1-disk2.qcow2");
    assert!(d[2].managed);
    assert_eq!(
        qemu_img_info(&env.path("hv1-local/vm1-disk2.qcow2")),
        ("qcow2".into(), 24 * MIB, None)
    );
    // An overlay: the base's size, the base named relative to it, the base recorded.
    assert_eq!(d[3].image.file, "vm1-disk3.qcow2");
    let base = d[3].backing.as_ref().expect("backing recorded");
    assert_eq!(
        (base.image.datastore.as_str(), base.image.file.as_str()),
        ("shared", "base.qcow2")
    );
    assert_eq!(
        qemu_img_info(&env.path("shared/vm1-disk3.qcow2")),
        ("qcow2".into(), 32 * MIB, Some("base.qcow2".into()))
    );
    // Without a datastore: the shared one goes first.
    assert_eq!(
        (d[4].image.datastore.as_str(), d[4].image.file.as_str()),
        ("shared", "vm1-scratch.raw")
    );
    assert_eq!(
        qemu_img_info(&env.path("shared/vm1-scratch.raw")).1,
        16 * MIB
    );

    // A second overlay on the same base (read-only sharing) is fine, from the other host.
    let vm2 = env
        .create(
            "vm2",
            "hv2",
            vec![DiskRequest {
                backing: Some(env.path_str("shared/base.qcow2")),
                size_bytes: Some(48 * MIB),
                ..DiskRequest::default()
            }],
        )
        .await
        .expect("vm2 created");
    assert_eq!(vm2.spec.disks[0].size_bytes, 48 * MIB);
    assert_eq!(vm2.spec.disks[0].image.datastore, "shared");

    // Deleting removes exactly what Ferry made.
    env.delete("vm1").await.expect("vm1 deleted");
    let mut left = given.to_vec();
    left.push("shared/vm2-disk0.qcow2");
    left.sort();
    assert_eq!(env.files(), left);
    env.delete("vm2").await.expect("vm2 deleted");
    assert_eq!(env.files(), given);
    assert!(env.instances().await.is_empty());

    let audit: Vec<serde_json::Value> = env.admin.get("/v1/audit").await.unwrap();
    let actions: Vec<&str> = audit.iter().filter_map(|a| a["action"].as_str()).collect();
    assert!(
        actions.contains(&"instance.create") && actions.contains(&"instance.delete"),
        "{actions:?}"
    );
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_disk_requests_are_refused_and_leave_no_image_and_no_record() {
    // hv2 has no UEFI firmware.
    let env = Env::start(|c| {
        if c.name == "hv2" {
            c.ovmf_code = "/nonexistent/OVMF_CODE.fd".into();
        }
    })
    .await;
    qemu_img_create(&env.path("shared/golden.raw"), "raw", 8 * MIB);
    std::fs::write(env.path("shared/notes.txt"), "not a disk\n").unwrap();
    std::os::unix::fs::symlink("/etc/hostname", env.path("shared/escape.raw")).unwrap();
    std::fs::write(env.path("hv1-local/taken-disk0.qcow2"), "precious").unwrap();
    let before = env.files();

    // Attached in place by another instance: the base case for disk-in-use.
    env.create(
        "owner",
        "hv1",
        vec![image(env.path_str("shared/golden.raw"))],
    )
    .await
    .expect("owner created");

    let cases: Vec<(&str, &str, Vec<DiskRequest>, u16, &str)> = vec![
        (
            "a",
            "hv1",
            vec![at(sized(64 * MIB), "nope")],
            422,
            "unknown-datastore",
        ),
        // 64 TiB is a valid size, but no temporary directory has that much room.
        (
            "b",
            "hv1",
            vec![at(sized(64 << 40), "local")],
            422,
            "no-room",
        ),
        (
            "c",
            "hv1",
            vec![image("/etc/hostname".into())],
            422,
            "path-outside-datastores",
        ),
        // Inside a datastore by name, outside by a symlink: the agent follows it.
        (
            "d",
            "hv1",
            vec![image(env.path_str("shared/escape.raw"))],
            422,
            "path-outside-datastores",
        ),
        (
            "e",
            "hv1",
            vec![image(env.path_str("shared/notes.txt"))],
            422,
            "image-unreadable",
        ),
        (
            "f",
            "hv1",
            vec![image(env.path_str("shared/missing.qcow2"))],
            422,
            "image-not-found",
        ),
        (
            "g",
            "hv1",
            vec![DiskRequest {
                format: Some(DiskFormat::Qcow2),
                ..image(env.path_str("shared/golden.raw"))
            }],
            422,
            "format-mismatch",
        ),
        // In use by `owner`, from the same host and through the shared datastore's other mount.
        (
            "h",
            "hv1",
            vec![image(env.path_str("shared/golden.raw"))],
            409,
            "disk-in-use",
        ),
        (
            "i",
            "hv2",
            vec![image(env.path_str("shared/golden.raw"))],
            409,
            "disk-in-use",
        ),
        // An overlay on a disk another instance writes to.
        (
            "j",
            "hv1",
            vec![DiskRequest {
                backing: Some(env.path_str("shared/golden.raw")),
                ..DiskRequest::default()
            }],
            409,
            "disk-in-use",
        ),
        ("k", "hv1", vec![sized(0)], 400, "invalid-disk-size"),
        ("l", "hv1", vec![sized(1000)], 400, "invalid-disk-size"),
        (
            "m",
            "hv1",
            vec![sized((64 << 40) + 512)],
            400,
            "invalid-disk-size",
        ),
        (
            "n",
            "hv1",
            vec![DiskRequest::default()],
            400,
            "invalid-disk",
        ),
        (
            "o",
            "hv1",
            vec![DiskRequest {
                size_bytes: Some(MIB),
                ..image(env.path_str("shared/golden.raw"))
            }],
            400,
            "invalid-disk",
        ),
        // A file of that name exists: never overwritten.
        (
            "taken",
            "hv1",
            vec![at(sized(MIB), "local")],
            409,
            "disk-exists",
        ),
        // The first disk is made, the second refused: the first is removed again.
        (
            "p",
            "hv1",
            vec![
                at(sized(64 * MIB), "local"),
                at(sized(64 * MIB), "shared"),
                image(env.path_str("shared/notes.txt")),
            ],
            422,
            "image-unreadable",
        ),
        // Made, then found in use: removed again.
        (
            "q",
            "hv1",
            vec![
                at(sized(MIB), "local"),
                image(env.path_str("shared/golden.raw")),
            ],
            409,
            "disk-in-use",
        ),
        (
            "r",
            "hv1",
            vec![DiskRequest {
                copy: true,
                ..image("/etc/hostname".into())
            }],
            422,
            "path-outside-datastores",
        ),
    ];
    for (name, host, disks, status, code) in cases {
        let r = env.create(name, host, disks).await;
        assert_refused(r, status, code);
        assert_eq!(env.files(), before, "after {name} ({code})");
    }
    // UEFI on a host without OVMF (server-side, from its facts), and boot from disk without one.
    let uefi = env
        .create_with("u", "hv2", vec![at(sized(MIB), "local")], |r| {
            r.spec.boot.firmware = FirmwareKind::Uefi
        })
        .await;
    assert_refused(uefi, 422, "uefi-unavailable");
    assert_refused(
        env.create("v", "hv1", vec![]).await,
        400,
        "invalid-instance",
    );
    assert_eq!(env.files(), before);
    let names: Vec<String> = env.instances().await.into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["owner"]);
    assert_eq!(
        std::fs::read(env.path("hv1-local/taken-disk0.qcow2")).unwrap(),
        b"precious"
    );

    // The owner's delete leaves the image it was given.
    env.delete("owner").await.unwrap();
    assert_eq!(env.files(), before);
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uefi_guests_get_their_nvram_beside_the_first_disk_and_lose_it_with_the_instance() {
    assert!(
        Path::new("/usr/share/OVMF/OVMF_VARS_4M.fd").is_file(),
        "OVMF is missing: scripts/setup installs the ovmf package"
    );
    let env = Env::start(|_| {}).await;
    let vm = env
        .create_with("efi", "hv1", vec![at(sized(32 * MIB), "local")], |r| {
            r.spec.boot.firmware = FirmwareKind::Uefi
        })
        .await
        .expect("created");
    let nvram = vm.spec.boot.nvram.clone().expect("nvram");
    assert_eq!(
        (nvram.datastore.as_str(), nvram.file.as_str()),
        ("local", "efi-VARS.fd")
    );
    let template = std::fs::read("/usr/share/OVMF/OVMF_VARS_4M.fd").unwrap();
    assert_eq!(
        std::fs::read(env.path("hv1-local/efi-VARS.fd")).unwrap(),
        template
    );
    env.delete("efi").await.unwrap();
    assert!(env.files().is_empty(), "{:?}", env.files());
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_of_a_running_guest_is_neither_deleted_nor_copied() {
    let env = Env::start(|_| {}).await;
    // SeaBIOS finds nothing to boot on an empty disk and waits: QEMU runs and holds it.
    let vm = env
        .create_with("busy", "hv1", vec![at(sized(16 * MIB), "local")], |r| {
            r.start = true
        })
        .await
        .expect("created and started");
    assert_eq!(vm.state, InstanceState::Running);
    let image = vm.spec.disks[0].image.clone();

    // The agent refuses to delete it, whoever asks.
    let agent = env.agent("hv1").await;
    let err = agent
        .post::<_, serde_json::Value>("/v1/disks/delete", &image)
        .await
        .unwrap_err();
    assert_eq!(
        (err.status(), err.code().as_str()),
        (Some(409), "disk-in-use"),
        "{err}"
    );
    assert_refused(env.delete("busy").await, 409, "instance-running");
    // A copy of it would be torn: QEMU's lock refuses it, and nothing is left.
    let copy = env
        .create(
            "clone",
            "hv1",
            vec![DiskRequest {
                copy: true,
                ..image_at(&env, "hv1-local/busy-disk0.qcow2")
            }],
        )
        .await;
    assert_refused(copy, 409, "disk-in-use");
    assert_eq!(env.files(), ["hv1-local/busy-disk0.qcow2"]);

    env.admin
        .post::<_, Instance>("/v1/instances/busy/stop", &())
        .await
        .unwrap();
    env.delete("busy").await.expect("deleted once stopped");
    assert!(env.files().is_empty(), "{:?}", env.files());
    // Deleting a file that is gone is not an error: a retried delete finishes.
    agent
        .post::<_, serde_json::Value>("/v1/disks/delete", &image)
        .await
        .unwrap();
    env.shutdown().await;
}

fn image_at(env: &Env, rel: &str) -> DiskRequest {
    image(env.path_str(rel))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_with_images_on_an_offline_host_is_deleted_only_once_the_host_is_back() {
    let mut env = Env::start(|_| {}).await;
    let vm = env
        .create("far", "hv2", vec![at(sized(MIB), "local")])
        .await
        .expect("created");
    assert!(vm.spec.disks[0].managed);
    // Its image is Ferry's, and only hv2's agent can remove it: with hv2 down, the delete is
    // refused rather than forgetting the image.
    let hv2 = env.agents[1].take().unwrap();
    // The restarted agent must listen where the server knows it.
    let url = hv2.url();
    env.configs[1].listen = url.trim_start_matches("https://").parse().unwrap();
    hv2.shutdown().await;
    // Before the server notices, the agent just does not answer: refused, nothing changed.
    assert_refused(env.delete("far").await, 503, "host-unreachable");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let host: Host = env.admin.get("/v1/hosts/hv2").await.unwrap();
        if host.state == HostState::Offline {
            break;
        }
        assert!(Instant::now() < deadline, "hv2 never went offline");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_refused(env.delete("far").await, 409, "host-offline");
    assert_eq!(env.files(), ["hv2-local/far-disk0.qcow2"]);
    assert_eq!(env.instances().await.len(), 1);
    // Back online (the agent keeps its credential), the delete finishes.
    env.agents[1] = Some(
        ferry_agent::start(env.configs[1].clone())
            .await
            .expect("agent restarts"),
    );
    env.wait_online(2).await;
    env.delete("far").await.expect("deleted");
    assert!(env.files().is_empty(), "{:?}", env.files());
    assert!(env.instances().await.is_empty());
    env.shutdown().await;
}

/// `--copy` of an existing image onto a datastore too small for it (an 8 MiB tmpfs) is
/// refused with `no-room` before anything is written: no partial copy on the small datastore,
/// no record, the source untouched. An image that fits is copied there, so the refusal is
/// about room and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_onto_a_datastore_without_room_is_refused_and_leaves_nothing() {
    let mnt = tempfile::tempdir().unwrap();
    let tiny = mnt.path().join("tiny");
    std::fs::create_dir(&tiny).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&tiny)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount a tmpfs at {}", tiny.display());
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    // Declared after `mnt`: unmounted before the directory is removed.
    let _unmount = Unmount(tiny.clone());
    let t = tiny.clone();
    let env = Env::start(move |c| {
        if c.name == "hv1" {
            c.datastores.push(DatastoreConfig {
                name: "tiny".into(),
                path: t.clone(),
                identity: None,
            });
        }
    })
    .await;
    qemu_img_create(&env.path("shared/big.raw"), "raw", 64 * MIB);
    qemu_img_create(&env.path("shared/small.raw"), "raw", 4 * MIB);
    let before = env.files();
    let tiny_files = || {
        let mut v: Vec<String> = std::fs::read_dir(&tiny)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let copy_of = |file: &str| {
        at(
            DiskRequest {
                copy: true,
                ..image(env.path_str(file))
            },
            "tiny",
        )
    };

    let r = env
        .create("big", "hv1", vec![copy_of("shared/big.raw")])
        .await;
    let err = r.as_ref().expect_err("refused").body();
    assert!(err.message.contains("tiny"), "names the datastore: {err:?}");
    assert_refused(r, 422, "no-room");
    assert!(
        tiny_files().is_empty(),
        "no partial copy: {:?}",
        tiny_files()
    );
    assert_eq!(
        env.files(),
        before,
        "the source and the other datastores unchanged"
    );
    assert!(env.instances().await.is_empty(), "no record");

    // What fits is copied onto the same datastore, and goes with its instance.
    let small = env
        .create("small", "hv1", vec![copy_of("shared/small.raw")])
        .await
        .expect("a copy that fits");
    let disk = &small.spec.disks[0];
    assert_eq!(disk.image.datastore, "tiny");
    assert!(disk.managed);
    assert_eq!(tiny_files(), std::slice::from_ref(&disk.image.file));
    env.delete("small").await.expect("deleted");
    assert!(
        tiny_files().is_empty(),
        "the copy is deleted with its instance"
    );
    assert_eq!(env.files(), before);
    env.shutdown().await;
}
