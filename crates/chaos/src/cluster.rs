//! The cluster a chaos run migrates on: two lab hosts, a `ferry server` and one `ferry agent`
//! per host as separate processes (so each can be killed with SIGKILL and started again, as
//! a crash would and an operator then does), in one lab directory.
//!
//! Dropping a [`ChaosLab`] kills its daemons, removes the namespaces (and with them every QEMU
//! and tap) and the directory, so neither an error nor Ctrl-C (which drops the run's future)
//! leaves anything behind; [`ChaosLab::keep_logs`] keeps the directory of a failed run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use ferry_api::hosts::{Host, HostState};
use ferry_api::{ApiClient, ApiError};
use ferry_lab::image::{ensure_image, GuestImage, ImageOptions};
use ferry_lab::net::{free_local_ports, validate_lab_name, LabNet};
use ferry_lab::LabError;
use ferry_server::config::Limits;
use uuid::Uuid;

use crate::daemons::{
    random_token, server_config, spawn_daemon, teardown, to_toml, write, write_agent_configs,
    MARKER,
};
use crate::error::ChaosError;

/// How long hosts may take to join and report online.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until at least `n` hosts report online, polling the server every 200 ms: how every
/// lab cluster (daemons or in one process) knows it is ready.
pub async fn wait_hosts_online(
    api: &ApiClient,
    n: usize,
    timeout: Duration,
) -> Result<(), ChaosError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(list) = api.get::<Vec<Host>>("/v1/hosts").await {
            if list.iter().filter(|h| h.state == HostState::Online).count() >= n {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(ChaosError::Timeout(format!("{n} hosts online")));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Which daemon a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    Server,
    /// The agent of host index 0 (hv1) or 1 (hv2).
    Agent(usize),
}

/// How to start a [`ChaosLab`].
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// Lab name (namespaces `ferry-<name>-*`); a stale lab of this name is removed first.
    pub name: String,
    /// The `ferry` binary the daemons run (the CLI passes itself; tests pass Cargo's path).
    pub ferry_binary: PathBuf,
    /// Accelerator: "auto", "kvm" or "tcg".
    pub accel: String,
}

pub struct ChaosLab {
    pub api: ApiClient,
    pub net: LabNet,
    pub image: GuestImage,
    pub accel: String,
    spec: LabSpec,
    name: String,
    dir: PathBuf,
    exe: PathBuf,
    server: Option<Child>,
    agents: Vec<Option<Child>>,
    keep: bool,
    /// Set once shut down: dropping it then does nothing.
    down: bool,
}

impl ChaosLab {
    pub async fn start(spec: &LabSpec) -> Result<ChaosLab, ChaosError> {
        validate_lab_name(&spec.name)?;
        let dir = crate::daemons::lab_dir(&spec.name);
        {
            let (n, d) = (spec.name.clone(), dir.clone());
            blocking(move || teardown(&n, &d)).await?;
        }
        ferry_lab::private_fs::create_dir(&dir)
            .map_err(|e| ChaosError::io(dir.display().to_string(), e))?;
        write(&dir.join(MARKER), &spec.name)?;
        let n = spec.name.clone();
        // Owned until the lab value exists (an error before removes the namespaces); then the
        // lab value removes them itself, by name, exactly once (see `shutdown`).
        let net = blocking(move || LabNet::create(&n, 2)).await??;
        let image_opts = ImageOptions::default();
        let cache_dir = image_opts.cache_dir.clone();
        let (image, _) = blocking(move || ensure_image(&image_opts))
            .await?
            .map_err(LabError::from)?;
        let choice = spec
            .accel
            .parse()
            .map_err(|_| ChaosError::Invalid(format!("unknown accelerator {}", spec.accel)))?;
        let accel =
            ferry_lab::choose_accel(choice, Path::new("qemu-system-x86_64"), &cache_dir, &image)
                .await?
                .name()
                .to_string();
        let ports = free_local_ports(3).map_err(|e| ChaosError::io("a free loopback port", e))?;
        let url = format!("https://127.0.0.1:{}", ports[0]);
        let ca_pem = crate::daemons::prepare_ca(&dir)?;
        let admin = random_token()?;
        let join = random_token()?;
        let mut server = server_config(
            SocketAddr::from(([127, 0, 0, 1], ports[0])),
            dir.join("ferry.db"),
            &admin,
            &join,
        );
        // Cells run one at a time, but a job a fault left stuck keeps its slot until the lab
        // is rebuilt; the queue's limits must never be what a cell measures.
        server.limits = Limits {
            per_host_outbound: 64,
            per_host_inbound: 64,
            cluster: 64,
        };
        write(&dir.join("server.toml"), &to_toml(&server)?)?;
        write_agent_configs(
            &dir,
            &net.hosts,
            &ports[1..],
            &url,
            &join,
            &accel,
            &cache_dir,
        )?;
        let mut lab = ChaosLab {
            spec: spec.clone(),
            api: ApiClient::new(&url, Some(admin)).with_tls(&ferry_api::TlsOptions::ca(ca_pem))?,
            net: net.into_persistent(),
            image,
            accel,
            name: spec.name.clone(),
            dir,
            exe: spec.ferry_binary.clone(),
            server: None,
            agents: vec![None, None],
            keep: false,
            down: false,
        };
        lab.restart(Daemon::Server)?;
        lab.restart(Daemon::Agent(0))?;
        lab.restart(Daemon::Agent(1))?;
        lab.wait_online().await?;
        Ok(lab)
    }

    /// The lab directory: configs, database, daemon logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Host names, hv1 first.
    pub fn host_name(&self, index: usize) -> &str {
        &self.net.hosts[index].name
    }

    pub fn host_index(&self, name: &str) -> Option<usize> {
        self.net.hosts.iter().position(|h| h.name == name)
    }

    /// Keep the lab directory (its logs) when this value is dropped; namespaces and
    /// processes go regardless.
    pub fn keep_logs(&mut self) {
        self.keep = true;
    }

    /// Waits until both hosts report online.
    pub async fn wait_online(&self) -> Result<(), ChaosError> {
        wait_hosts_online(&self.api, 2, ONLINE_TIMEOUT)
            .await
            .map_err(|_| {
                ChaosError::Timeout(format!(
                    "both hosts online (logs in {})",
                    self.dir.display()
                ))
            })
    }

    /// Waits until the server answers at all (after its restart).
    pub async fn wait_server(&self, timeout: Duration) -> Result<(), ChaosError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.api.get::<Vec<Host>>("/v1/hosts").await {
                Ok(_) => return Ok(()),
                Err(ApiError::Unreachable { .. }) if Instant::now() < deadline => {}
                Err(ApiError::Unreachable { .. }) => {
                    return Err(ChaosError::Timeout("the server to answer".into()))
                }
                Err(e) => return Err(e.into()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILLs a daemon and reaps it: the crash, with no chance to clean up.
    pub fn kill9(&mut self, which: Daemon) {
        if let Some(mut c) = self.slot(which).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a daemon (again), as an operator or systemd would after a crash.
    pub fn restart(&mut self, which: Daemon) -> Result<(), ChaosError> {
        let (name, role) = match which {
            Daemon::Server => ("server".to_string(), "server"),
            Daemon::Agent(i) => (self.net.hosts[i].name.clone(), "agent"),
        };
        let config = self.dir.join(format!("{name}.toml"));
        let child = spawn_daemon(&self.exe, &self.dir, &name, role, &config)?;
        *self.slot(which) = Some(child);
        Ok(())
    }

    fn slot(&mut self, which: Daemon) -> &mut Option<Child> {
        match which {
            Daemon::Server => &mut self.server,
            Daemon::Agent(i) => &mut self.agents[i],
        }
    }

    /// The run directory the agent of host `index` gives instance `id`'s QEMU: named by the
    /// id's first 8 hex digits under its state dir (see the agent's instances.rs).
    pub fn run_dir(&self, index: usize, id: Uuid) -> PathBuf {
        let short: String = id.simple().to_string().chars().take(8).collect();
        self.dir
            .join("agents")
            .join(&self.net.hosts[index].name)
            .join("run")
            .join(short)
    }

    /// The pid of instance `id`'s QEMU on host `index`, if one runs there now.
    pub fn qemu_pid(&self, index: usize, id: Uuid) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.run_dir(index, id).join("qemu.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        qemu_alive(pid).then_some(pid)
    }

    /// The lab's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A fresh lab in place of this one (same name and spec): after a cell left a job stuck
    /// or the lab broken, so the next cell starts from a clean cluster.
    pub async fn rebuild(&mut self) -> Result<(), ChaosError> {
        let spec = self.spec.clone();
        // Remove the old lab (daemons, namespaces, directory) before the new one takes its
        // names; the old value's drop then does nothing.
        self.keep = false;
        self.shutdown();
        *self = ChaosLab::start(&spec).await?;
        Ok(())
    }

    /// Copies the lab directory (daemon logs, database) to `<dir>-cells/<label>`, for the
    /// reproduction of a failed cell; returns where.
    pub fn save_logs(&self, label: &str) -> Option<PathBuf> {
        let mut name = self.dir.file_name()?.to_os_string();
        name.push("-cells");
        let to = self.dir.with_file_name(name).join(label);
        let _ = std::fs::remove_dir_all(&to);
        std::fs::create_dir_all(to.parent()?).ok()?;
        let ok = std::process::Command::new("cp")
            .arg("-a")
            .arg(&self.dir)
            .arg(&to)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(to)
    }
}

/// Whether `pid` is a live (not zombie) QEMU: a pidfile outlives its process.
pub fn qemu_alive(pid: i32) -> bool {
    if pid <= 1 {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((comm, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    comm.contains("qemu") && !rest.trim_start().starts_with('Z')
}

impl ChaosLab {
    /// Kills the daemons, removes the namespaces (every QEMU and tap with them) and, unless
    /// told to keep it, the directory. Idempotent.
    pub fn shutdown(&mut self) {
        if self.down {
            return;
        }
        self.down = true;
        for c in self
            .agents
            .iter_mut()
            .chain(std::iter::once(&mut self.server))
            .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.net.destroy();
        if self.keep {
            eprintln!("chaos: lab logs kept in {}", self.dir.display());
        } else {
            teardown(&self.name, &self.dir);
        }
    }
}

impl Drop for ChaosLab {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ChaosError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ChaosError::Invalid(format!("background task failed: {e}")))
}
