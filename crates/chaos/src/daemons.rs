//! A lab cluster's daemons as separate processes: their configuration, their start, and their
//! removal. `ferry lab up` and the fault matrix both run a real `ferry server` and one
//! `ferry agent` per lab host this way, so a lab is always set up one way; the matrix also
//! kills and restarts them, which is why these are processes rather than tasks.
//!
//! Everything a lab leaves lives in one lab directory (configs, database, logs, pid files),
//! marked as created by us, so a later run or `ferry lab down` can remove it even after the
//! process that started it is gone.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_agent::{AgentConfig, DatastoreConfig, NetworkConfig};
use ferry_lab::instance::LAB_NETWORK;
use ferry_lab::net::{destroy_lab, LabHostNet};
use ferry_server::ServerConfig;
use serde::Serialize;

use crate::error::ChaosError;

/// Marks a directory as created by a lab: only such a directory is ever removed whole, so a
/// mistaken `$FERRY_LAB_DIR=/` cannot cost anything.
pub const MARKER: &str = ".ferry-lab";
/// How long a daemon gets between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// `$FERRY_LAB_DIR`, else `/var/tmp/ferry-lab/<name>` (survives reboots' /tmp cleaning, so
/// logs of a crashed lab stay readable).
pub fn lab_dir(name: &str) -> PathBuf {
    match std::env::var_os("FERRY_LAB_DIR").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from("/var/tmp/ferry-lab").join(name),
    }
}

/// The configuration of lab host `h`'s agent: the lab runs agents in the root namespace and
/// their QEMUs inside the host's namespace. Shared with the tests that start agents
/// themselves, so a lab is always configured one way.
/// Where a lab's agents find the server: its URL, the CA file to verify it with, and the join
/// token.
#[derive(Debug, Clone, Copy)]
pub struct ServerRef<'a> {
    pub url: &'a str,
    pub ca: &'a Path,
    pub join_token: &'a str,
}

pub fn agent_config(
    h: &LabHostNet,
    listen: SocketAddr,
    server: ServerRef<'_>,
    state_dir: PathBuf,
    accel: &str,
    datastores: Vec<DatastoreConfig>,
) -> AgentConfig {
    AgentConfig {
        name: h.name.clone(),
        listen,
        advertise_url: None,
        server_url: Some(server.url.to_string()),
        server_ca: Some(server.ca.to_path_buf()),
        server_ca_fingerprint: None,
        join_token: Some(server.join_token.to_string()),
        credential: None,
        state_dir,
        netns: Some(h.netns.clone()),
        migration_addr: h.migration_addr.into(),
        migration_ports: "49152-49215".into(),
        qemu_binary: "qemu-system-x86_64".into(),
        ovmf_code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
        ovmf_vars: "/usr/share/OVMF/OVMF_VARS_4M.fd".into(),
        accel: accel.to_string(),
        datastores,
        networks: vec![NetworkConfig {
            name: LAB_NETWORK.into(),
            bridge: h.guest_bridge.clone(),
            subnet: Some("10.77.0.0/24".into()),
        }],
        heartbeat_ms: 1000,
        reserve_mib: 2048,
        ram_capacity_mib: None,
        cpu_flags_mask: Vec::new(),
    }
}

/// The lab server's configuration.
pub fn server_config(
    listen: SocketAddr,
    database: PathBuf,
    admin_token: &str,
    join_token: &str,
) -> ServerConfig {
    ServerConfig {
        listen,
        database,
        admin_token: Some(admin_token.to_string()),
        join_token: join_token.to_string(),
        heartbeat_timeout_s: 10,
        limits: Default::default(),
        preflight: Default::default(),
        progress_poll_ms: 250,
        cold_cleanup_after_s: 0,
        tls: Default::default(),
    }
}

/// Creates the lab server's cluster CA in `<dir>/pki` before the server first starts (the
/// server loads it from there, next to its database `<dir>/ferry.db`), so that agents' configs
/// and the lab's client can name and trust it from the start. Returns the CA's PEM.
pub fn prepare_ca(dir: &Path) -> Result<String, ChaosError> {
    let ca = ferry_pki::ClusterCa::load_or_create(&dir.join("pki"), None)
        .map_err(|e| ChaosError::Invalid(format!("the lab's CA: {e}")))?;
    Ok(ca.ca_pem().to_string())
}

/// The lab CA's file, as agents' `server_ca` and `FERRY_CA` name it.
pub fn ca_file(dir: &Path) -> PathBuf {
    dir.join("pki").join("ca.pem")
}

/// A config as TOML; both config types serialize without fail.
pub fn to_toml<T: Serialize>(value: &T) -> Result<String, ChaosError> {
    toml::to_string(value).map_err(|e| ChaosError::Invalid(format!("config as TOML: {e}")))
}

/// Writes `<dir>/<host>.toml` for every lab host: agent i listens on loopback `ports[i]`,
/// keeps its state under `<dir>/agents/<host>`, and has the guest images as datastore
/// `images` and `<dir>/shared` as datastore `shared`, for disks that move without a copy.
/// Both directories are one storage for every lab host (one directory of this machine) and
/// say so with an identity file, as shared storage of real hosts does: the image cache's
/// ([`ferry_lab::image::image_store`]) and one naming this lab's `shared`.
pub fn write_agent_configs(
    dir: &Path,
    hosts: &[LabHostNet],
    ports: &[u16],
    server_url: &str,
    join_token: &str,
    accel: &str,
    images: &Path,
) -> Result<(), ChaosError> {
    let images = ferry_lab::image::image_store(images).map_err(ferry_lab::LabError::from)?;
    let shared = dir.join("shared");
    let shared_id = shared.join(ferry_lab::image::DATASTORE_ID_FILE);
    std::fs::create_dir_all(&shared)
        .and_then(|()| std::fs::write(&shared_id, format!("lab-shared {}\n", dir.display())))
        .map_err(|e| ChaosError::io(shared_id.display().to_string(), e))?;
    for (h, port) in hosts.iter().zip(ports) {
        let agent = agent_config(
            h,
            SocketAddr::from(([127, 0, 0, 1], *port)),
            ServerRef {
                url: server_url,
                ca: &ca_file(dir),
                join_token,
            },
            dir.join("agents").join(&h.name),
            accel,
            // One directory of this machine for every lab host: one storage.
            vec![
                DatastoreConfig {
                    name: "images".into(),
                    path: images.clone(),
                    identity: None,
                },
                DatastoreConfig {
                    name: "shared".into(),
                    path: shared.clone(),
                    identity: None,
                },
            ],
        );
        write(&dir.join(format!("{}.toml", h.name)), &to_toml(&agent)?)?;
    }
    Ok(())
}

/// Writes `text` to `path`, saying which file failed.
pub fn write(path: &Path, text: &str) -> Result<(), ChaosError> {
    // Configs carry tokens and credentials: the owner's only.
    ferry_lab::private_fs::write_file(path, text)
        .map_err(|e| ChaosError::io(path.display().to_string(), e))
}

/// 32 hex characters from the kernel's CSPRNG: lab tokens are real credentials on a
/// loopback port every local user can reach.
pub fn random_token() -> Result<String, ChaosError> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| ChaosError::io("/dev/urandom", e))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Starts `<exe> <role> --config <config>` detached: its own process group (a Ctrl-C in the
/// shell does not reach it, so the caller decides when it ends), output to
/// `<dir>/<name>.log` (appended, so a restarted daemon's log follows its predecessor's), pid to
/// `<dir>/<name>.pid`. The caller may keep the child to reap it, or drop it.
pub fn spawn_daemon(
    exe: &Path,
    dir: &Path,
    name: &str,
    role: &str,
    config: &Path,
) -> Result<Child, ChaosError> {
    use std::os::unix::process::CommandExt;
    let log_path = dir.join(format!("{name}.log"));
    let log = ferry_lab::private_fs::append_file(&log_path)
        .map_err(|e| ChaosError::io(log_path.display().to_string(), e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| ChaosError::io(log_path.display().to_string(), e))?;
    let level = std::env::var("FERRY_LOG").unwrap_or_else(|_| "info".into());
    let child = Command::new(exe)
        .arg("--log")
        .arg(level)
        .arg(role)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(|e| ChaosError::io(format!("start {} {role}", exe.display()), e))?;
    write(
        &dir.join(format!("{name}.pid")),
        &format!("{}\n", child.id()),
    )?;
    Ok(child)
}

/// The last lines of every daemon log, for error messages.
pub fn log_tails(dir: &Path) -> String {
    let mut out = Vec::new();
    for p in files_with_extension(dir, "log") {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(10)..];
        if tail.is_empty() {
            continue;
        }
        out.push(format!("--- {} (last {} lines)", p.display(), tail.len()));
        out.extend(tail.iter().map(|l| format!("    {l}")));
    }
    out.join("\n")
}

/// Removes lab `name`: its daemons, its namespaces (and with them every QEMU), its directory.
/// Idempotent; used by `lab down`, before `lab up` and around a chaos run.
pub fn teardown(name: &str, dir: &Path) {
    stop_daemons(dir);
    destroy_lab(name);
    if dir.join(MARKER).exists() {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the lab directory");
        }
    }
}

/// SIGTERMs the daemons named by `<dir>/*.pid`, SIGKILLs what still runs after the grace time.
/// A pid is only signalled if its command line still names this lab's directory, so a pid
/// reused by an unrelated process after a reboot is never touched.
pub fn stop_daemons(dir: &Path) {
    let pidfiles = files_with_extension(dir, "pid");
    let ours: Vec<i32> = pidfiles
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<i32>().ok())
        .filter(|&pid| is_lab_daemon(pid, dir))
        .collect();
    for &pid in &ours {
        // SAFETY: kill(2) has no memory-safety preconditions; pid was checked to be ours.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + TERM_GRACE;
    while ours.iter().any(|&p| is_lab_daemon(p, dir)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    for &pid in &ours {
        if is_lab_daemon(pid, dir) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for p in pidfiles {
        let _ = std::fs::remove_file(p);
    }
}

fn files_with_extension(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == ext))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Whether `pid` is a live (not zombie) ferry daemon started with a config in `dir`.
pub fn is_lab_daemon(pid: i32, dir: &Path) -> bool {
    if pid <= 1 {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    if zombie {
        return false;
    }
    let mut cmdline = Vec::new();
    if std::fs::File::open(format!("/proc/{pid}/cmdline"))
        .and_then(|mut f| f.read_to_end(&mut cmdline))
        .is_err()
    {
        return false;
    }
    let cmdline = String::from_utf8_lossy(&cmdline);
    let dir = dir.to_string_lossy();
    cmdline
        .split('\0')
        .any(|a| a.starts_with(dir.as_ref()) && a.ends_with(".toml"))
}
