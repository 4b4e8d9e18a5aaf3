//! A whole Ferry cluster inside this process: lab namespaces as hosts, `ferry server` on a
//! fresh SQLite file and one agent per host, all talking over their real HTTP APIs. The demo
//! and the benches through the server run on it; dropping it removes every namespace (and so
//! every guest) and its directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_agent::{AgentConfig, AgentHandle, DatastoreConfig};
use ferry_api::instances::{CreateInstance, DiskRequest, ImageRef, Instance};
use ferry_api::migrations::{CreateMigration, Migration, MigrationOptions};
use ferry_api::ApiClient;
use ferry_chaos::daemons::{agent_config, server_config};
use ferry_lab::guest_config::GuestConfig;
use ferry_lab::image::GuestImage;
use ferry_lab::instance::guest_instance_spec;
use ferry_lab::net::LabNet;
use ferry_qemu::MacAddr;
use ferry_server::ServerHandle;
use uuid::Uuid;

use crate::error::BenchError;

/// Tokens of a cluster that lives only as long as this process.
const ADMIN_TOKEN: &str = "local-cluster-admin-token-0000000";
const JOIN_TOKEN: &str = "local-cluster-join-token-00000000";

/// Whether each host of a local cluster also has storage no other host sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostStorage {
    /// Only datastores every host mounts: a running guest's disks stay where they are when
    /// it moves.
    #[default]
    Shared,
    /// Also a datastore [`LocalCluster::LOCAL_DATASTORE`] per host, a directory of its own
    /// without an identity: a running guest's disk there moves by block migration.
    Local,
}

/// How long the hosts of a new cluster may take to report online.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(60);

pub struct LocalCluster {
    /// The server's API, with the admin token.
    pub api: ApiClient,
    pub server: Option<ServerHandle>,
    pub agents: Vec<AgentHandle>,
    pub agent_configs: Vec<AgentConfig>,
    pub net: LabNet,
    dir: PathBuf,
}

impl LocalCluster {
    /// A datastore every host of the local cluster mounts (one directory, with an identity
    /// file): disks on it need no copy when their guest moves.
    pub const SHARED_DATASTORE: &'static str = "shared";
    /// The datastore each host has alone with [`HostStorage::Local`].
    pub const LOCAL_DATASTORE: &'static str = "local";

    /// Creates lab `name` with `hosts` hosts (a stale lab of that name is removed first),
    /// starts the server and the agents, and waits until every host is online. Every agent
    /// offers `datastores`; the server accepts instance files only inside one of them. One
    /// counts as shared storage when it carries an identity file (the image cache does, see
    /// [`images_datastore`]) or its config names an identity.
    pub async fn start(
        name: &str,
        hosts: usize,
        accel: &str,
        datastores: Vec<DatastoreConfig>,
    ) -> Result<LocalCluster, BenchError> {
        Self::start_with(name, hosts, accel, datastores, HostStorage::Shared).await
    }

    /// [`LocalCluster::start`], with each host's own datastore when `storage` asks for it.
    pub async fn start_with(
        name: &str,
        hosts: usize,
        accel: &str,
        datastores: Vec<DatastoreConfig>,
        storage: HostStorage,
    ) -> Result<LocalCluster, BenchError> {
        let n = name.to_string();
        let net = tokio::task::spawn_blocking(move || LabNet::create(&n, hosts)).await??;
        let dir = std::env::temp_dir().join(format!("ferry-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // Holds the database and the agents' credentials: the owner's only.
        ferry_lab::private_fs::create_dir(&dir).map_err(|e| cannot_create(&dir, e))?;
        let shared = dir.join(Self::SHARED_DATASTORE);
        std::fs::create_dir_all(&shared)
            .and_then(|()| {
                std::fs::write(
                    shared.join(".ferry-datastore-id"),
                    format!("lab-{name}-shared\n"),
                )
            })
            .map_err(|e| cannot_create(&shared, e))?;
        let mut datastores = datastores;
        datastores.push(DatastoreConfig {
            name: Self::SHARED_DATASTORE.into(),
            path: shared,
            identity: None,
        });
        let mut cluster = LocalCluster {
            api: ApiClient::new("", None),
            server: None,
            agents: Vec::new(),
            agent_configs: Vec::new(),
            net,
            dir,
        };
        let server = ferry_server::start(server_config(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            cluster.dir.join("ferry.db"),
            ADMIN_TOKEN,
            JOIN_TOKEN,
        ))
        .await
        .map_err(|e| BenchError::Daemon(e.body))?;
        let url = server.url();
        cluster.api = server.client(Some(ADMIN_TOKEN.into()));
        let server_ca = server.ca_file();
        cluster.server = Some(server);
        for h in cluster.net.hosts.clone() {
            let mut own = datastores.clone();
            if storage == HostStorage::Local {
                own.push(cluster.local_datastore(&h.name)?);
            }
            let config = agent_config(
                &h,
                SocketAddr::from(([127, 0, 0, 1], 0)),
                ferry_chaos::daemons::ServerRef {
                    url: &url,
                    ca: &server_ca,
                    join_token: JOIN_TOKEN,
                },
                cluster.dir.join(&h.name),
                accel,
                own,
            );
            let agent = ferry_agent::start(config.clone())
                .await
                .map_err(|e| BenchError::Daemon(e.body()))?;
            cluster.agents.push(agent);
            cluster.agent_configs.push(config);
        }
        ferry_chaos::cluster::wait_hosts_online(&cluster.api, hosts, ONLINE_TIMEOUT).await?;
        Ok(cluster)
    }

    /// Host `host`'s own datastore: a directory under the cluster's, so it goes with the
    /// cluster, and without an identity, so no other host counts it as the same storage.
    fn local_datastore(&self, host: &str) -> Result<DatastoreConfig, BenchError> {
        let path = self.dir.join(Self::LOCAL_DATASTORE).join(host);
        std::fs::create_dir_all(&path).map_err(|e| cannot_create(&path, e))?;
        Ok(DatastoreConfig {
            name: Self::LOCAL_DATASTORE.into(),
            path,
            identity: None,
        })
    }

    /// The serial socket of instance `id` on host `index` (0-based): the agent keeps each
    /// QEMU's run directory under its state dir, named by the id's first 8 hex digits.
    pub fn serial_socket(&self, index: usize, id: Uuid) -> PathBuf {
        self.run_dir(index, id).join("serial.sock")
    }

    /// Creates an instance through the server, patient with disk copies: a create that
    /// copies an image onto a datastore lasts as long as its data takes to move, which can
    /// be more than a request's usual minute on a busy machine.
    pub async fn create_instance(&self, req: &CreateInstance) -> Result<Instance, BenchError> {
        Ok(self
            .api
            .clone()
            .with_timeout(Duration::from_secs(600))
            .post("/v1/instances", req)
            .await?)
    }

    /// The host end of the guest agent's channel of instance `id` on host `index`.
    pub fn guest_agent_socket(&self, index: usize, id: Uuid) -> PathBuf {
        self.run_dir(index, id).join("qga.sock")
    }

    /// Where host `index` keeps instance `id`'s serial logs: one per QEMU process, which QEMU
    /// writes every byte of the console to from its start, whether or not a reader is
    /// connected to the socket, and which the agent keeps after the QEMU is gone (see
    /// [`ferry_agent::console`]; the newest is [`newest_serial_log`]).
    pub fn console_dir(&self, index: usize, id: Uuid) -> PathBuf {
        ferry_agent::console::console_dir(&self.agent_configs[index].state_dir, &id)
    }

    fn run_dir(&self, index: usize, id: Uuid) -> PathBuf {
        let short: String = id.simple().to_string().chars().take(8).collect();
        self.agent_configs[index].state_dir.join("run").join(short)
    }

    /// Where datastore `name` of host `index` is.
    pub fn datastore_path(&self, index: usize, name: &str) -> Option<PathBuf> {
        self.agent_configs[index]
            .datastores
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.path.clone())
    }

    /// Where `image` is on host `host`'s file system, if the host has its datastore.
    pub fn image_path(&self, host: &str, image: &ImageRef) -> Option<PathBuf> {
        let index = self.agent_configs.iter().position(|c| c.name == host)?;
        Some(
            self.datastore_path(index, &image.datastore)?
                .join(&image.file),
        )
    }

    /// The static address the Debian guest gets from Ferry (its NIC's `ipv4`): the lab's
    /// first guest address, which the client namespace reaches; the lab has no DHCP server.
    pub fn debian_address(&self) -> ferry_qemu::Ipv4Cidr {
        ferry_qemu::Ipv4Cidr {
            addr: self.net.guest_addr(0),
            prefix: LabNet::GUEST_PREFIX,
        }
    }

    /// Creates and starts lab guest `name` on hv1, at the lab's first guest address.
    pub async fn create_lab_guest(
        &self,
        image: &GuestImage,
        config: GuestConfig,
        memory_mib: u32,
        name: &str,
        disks: Vec<DiskRequest>,
    ) -> Result<Instance, BenchError> {
        let config = GuestConfig {
            ip: Some((self.net.guest_addr(0), LabNet::GUEST_PREFIX)),
            ..config
        };
        let mac = MacAddr::for_nic(name, 0).to_string();
        let spec = guest_instance_spec(image, &config, memory_mib, &mac);
        let req = CreateInstance {
            name: name.into(),
            host: Some("hv1".into()),
            spec,
            disks,
            start: true,
        };
        Ok(self.api.post("/v1/instances", &req).await?)
    }

    /// Asks the server to live-migrate `instance` to hv2; the job runs on.
    pub async fn create_migration_to_hv2(
        &self,
        instance: &str,
        options: &MigrationOptions,
    ) -> Result<Migration, BenchError> {
        let req = CreateMigration {
            instance: instance.into(),
            destination: Some("hv2".into()),
            options: options.clone(),
            kind: None,
        };
        Ok(self.api.post("/v1/migrations", &req).await?)
    }

    /// Stops agents and server in order; guests go with the namespaces on drop.
    pub async fn shutdown(mut self) {
        for a in self.agents.drain(..) {
            a.shutdown().await;
        }
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}

/// The guest image cache as datastore `images`, with the identity file that makes it the
/// same storage on every host of a local cluster ([`ferry_lab::image::image_store`]), so the
/// pre-flight checks pass kernel and initrd without a storage warning.
pub fn images_datastore(cache_dir: &Path) -> Result<DatastoreConfig, BenchError> {
    let path = ferry_lab::image::image_store(cache_dir).map_err(ferry_lab::LabError::from)?;
    Ok(DatastoreConfig {
        name: "images".into(),
        path,
        identity: None,
    })
}

/// The newest serial log in a console directory ([`LocalCluster::console_dir`]), if any.
pub fn newest_serial_log(dir: &Path) -> Option<PathBuf> {
    ferry_agent::console::segments(dir)
        .pop()
        .map(|(_, path)| path)
}

fn cannot_create(path: &Path, e: std::io::Error) -> BenchError {
    BenchError::Daemon(ferry_api::ErrorBody::new(
        "io",
        format!("cannot create {}: {e}", path.display()),
        "check /tmp",
    ))
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.net.destroy();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What a bench through the server starts from: a local cluster of hv1 and hv2, each with
/// its own datastore, the lab guest image and the accelerator its guests run under, and the
/// machine's load before the first run.
pub(crate) struct BenchCluster {
    pub cluster: LocalCluster,
    pub image: GuestImage,
    pub accel: ferry_qemu::Accel,
    pub load_before: String,
}

/// Starts [`BenchCluster`] lab `lab` for bench `what` (named in the errors and the first
/// line it prints), as root.
pub(crate) async fn start_bench_cluster(
    what: &str,
    lab: &str,
    args: &crate::BenchArgs,
    image: &ferry_lab::image::ImageOptions,
) -> Result<BenchCluster, BenchError> {
    use crate::error::{bail, Context as _};
    // SAFETY: geteuid(2) cannot fail and has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the {what} bench creates network namespaces and bridges: run it as root");
    }
    let choice = crate::accel_choice(&args.accel)?;
    let image_opts = image.clone();
    let cache_dir = image_opts.cache_dir.clone();
    let image = tokio::task::spawn_blocking(move || ferry_lab::image::ensure_image(&image_opts))
        .await?
        .context("lab guest image")?
        .0;
    let accel =
        ferry_lab::choose_accel(choice, Path::new("qemu-system-x86_64"), &cache_dir, &image)
            .await?;
    let load_before = crate::loadavg();
    crate::say(&format!(
        "starting a server and agents on lab hosts hv1 and hv2, each with its own datastore ({}; load {load_before})",
        accel.name()
    ));
    let images = images_datastore(&cache_dir)?;
    let cluster =
        LocalCluster::start_with(lab, 2, accel.name(), vec![images], HostStorage::Local).await?;
    Ok(BenchCluster {
        cluster,
        image,
        accel,
        load_before,
    })
}
