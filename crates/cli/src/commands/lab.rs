//! `ferry lab`: a whole Ferry cluster on this machine. Lab hosts are network namespaces; a
//! `ferry server` and one `ferry agent` per host run as background daemons of this same binary,
//! with their configuration, database, logs and pid files in one lab directory, so that
//! `ferry lab down` (or the next `lab up` of the same name) can find and remove everything even
//! after the shell that started it is gone.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Subcommand;
use ferry_agent::{AgentConfig, DatastoreConfig, NetworkConfig};
use ferry_api::hosts::{Host, HostState};
use ferry_api::instances::{Instance, InstanceState};
use ferry_api::ApiError;
use ferry_api::ErrorBody;
use ferry_lab::image::{ensure_image, GuestImage, ImageOptions};
use ferry_lab::net::{
    destroy_lab, free_local_ports, list_labs, validate_lab_name, LabHostNet, LabNet, MAX_HOSTS,
};
use ferry_lab::LabError;
use ferry_server::ServerConfig;
use serde::Serialize;

use super::instance::{create_request, wait_for_state, CreateArgs, LabImage, LAB_NETWORK};
use super::Ctx;
use crate::config::ClientConfig;
use crate::error::{exit, CliError};
use crate::output::OutputFormat;
use crate::private_fs;

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum LabCommand {
    /// Start a lab cluster: hosts hv1..N as namespaces, a server and one agent per host as
    /// daemons, and (unless --no-instance) a running test guest `vm1` on hv1. A stale lab of
    /// the same name is removed first. Prints `export FERRY_URL=... FERRY_TOKEN=...` lines, so
    /// `eval "$(ferry lab up)"` points the CLI at it.
    Up {
        #[arg(long, default_value = "lab")]
        name: String,
        #[arg(long, default_value_t = 2)]
        hosts: usize,
        /// Do not create the test instance vm1.
        #[arg(long)]
        no_instance: bool,
    },
    /// Stop a lab's daemons and guests, remove its namespaces and its directory.
    Down {
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// List the labs present on this machine.
    List,
}

/// How long hosts may take to join and report online.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a daemon gets between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);
/// Marks a directory as created by `ferry lab up`: only such a directory is ever removed
/// whole, so a mistaken `$FERRY_LAB_DIR=/` cannot cost anything.
const MARKER: &str = ".ferry-lab";
/// The test guest `lab up` creates, and its address.
const LAB_VM: &str = "vm1";
const LAB_VM_IP: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 77, 0, 100), 24);

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
pub fn agent_config(
    h: &LabHostNet,
    listen: SocketAddr,
    server_url: &str,
    join_token: &str,
    state_dir: PathBuf,
    accel: &str,
    datastores: Vec<DatastoreConfig>,
) -> AgentConfig {
    AgentConfig {
        name: h.name.clone(),
        listen,
        advertise_url: None,
        server_url: Some(server_url.to_string()),
        join_token: Some(join_token.to_string()),
        credential: None,
        state_dir,
        netns: Some(h.netns.clone()),
        migration_addr: h.migration_addr.into(),
        migration_ports: "49152-49215".into(),
        qemu_binary: "qemu-system-x86_64".into(),
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
    }
}

/// A config as TOML; both config types serialize without fail.
pub fn to_toml<T: Serialize>(value: &T) -> Result<String, CliError> {
    toml::to_string(value).map_err(|e| {
        CliError::Local(ErrorBody::new(
            "config-write",
            e.to_string(),
            "report this bug",
        ))
    })
}

pub async fn run(cmd: LabCommand) -> Result<u8, CliError> {
    match cmd {
        LabCommand::Up {
            name,
            hosts,
            no_instance,
        } => up(&name, hosts, no_instance).await,
        LabCommand::Down { name } => {
            validate_lab_name(&name).map_err(LabError::from)?;
            let dir = lab_dir(&name);
            let known = dir.join(MARKER).exists() || list_labs().contains(&name);
            blocking(move || teardown(&name, &dir)).await?;
            if !known {
                eprintln!("no lab found; nothing to do");
            }
            Ok(exit::OK)
        }
        LabCommand::List => {
            for lab in list_labs() {
                crate::outln!("{lab}");
            }
            Ok(exit::OK)
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, CliError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CliError::new("internal", format!("background task failed: {e}"), ""))
}

async fn up(name: &str, hosts: usize, no_instance: bool) -> Result<u8, CliError> {
    validate_lab_name(name).map_err(LabError::from)?;
    if !(1..=MAX_HOSTS).contains(&hosts) {
        return Err(CliError::new(
            "invalid-request",
            format!("a lab has 1 to {MAX_HOSTS} hosts, not {hosts}"),
            "pick --hosts in range",
        ));
    }
    let dir = lab_dir(name);
    {
        let (n, d) = (name.to_string(), dir.clone());
        blocking(move || teardown(&n, &d)).await?;
    }
    // The directory holds tokens, agent credentials and the database: the owner's only.
    private_fs::create_dir(&dir).map_err(|e| io_err(&dir, e))?;
    write(&dir.join(MARKER), name)?;
    match start(name, hosts, no_instance, &dir).await {
        Ok((cfg, summary)) => {
            crate::outln!("export FERRY_URL={}", cfg.url);
            crate::outln!("export FERRY_TOKEN={}", cfg.token.unwrap_or_default());
            eprintln!("{summary}");
            Ok(exit::OK)
        }
        Err(e) => {
            // Leave nothing running, but keep the directory: its logs explain the failure.
            let (n, d) = (name.to_string(), dir.clone());
            blocking(move || {
                stop_daemons(&d);
                destroy_lab(&n);
            })
            .await?;
            let mut body = e.body();
            let tail = log_tails(&dir);
            if !tail.is_empty() {
                body.message.push_str(&format!("\n{tail}"));
            }
            body.hint = format!(
                "{}; logs are in {} (`ferry lab down --name {name}` removes it)",
                body.hint,
                dir.display()
            );
            Err(CliError::Local(body))
        }
    }
}

/// Everything of `lab up` after the directory exists; on error the caller cleans up.
async fn start(
    name: &str,
    hosts: usize,
    no_instance: bool,
    dir: &Path,
) -> Result<(ClientConfig, String), CliError> {
    let n = name.to_string();
    let net = blocking(move || LabNet::create(&n, hosts))
        .await?
        .map_err(LabError::from)?;
    let host_nets = net.hosts.clone();
    net.leak();

    let image_opts = ImageOptions::default();
    let cache_dir = image_opts.cache_dir.clone();
    let (image, _) = blocking(move || ensure_image(&image_opts))
        .await?
        .map_err(LabError::from)?;
    let choice = std::env::var("FERRY_ACCEL")
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or_default();
    let accel =
        ferry_lab::choose_accel(choice, Path::new("qemu-system-x86_64"), &cache_dir, &image)
            .await?
            .name()
            .to_string();

    let ports = free_local_ports(1 + hosts).map_err(|e| {
        CliError::new(
            "no-free-port",
            format!("cannot bind a local port: {e}"),
            "free some loopback ports",
        )
    })?;
    let server_url = format!("http://127.0.0.1:{}", ports[0]);
    let admin_token = random_token()?;
    let join_token = random_token()?;
    let listen = SocketAddr::from(([127, 0, 0, 1], ports[0]));
    let server = server_config(listen, dir.join("ferry.db"), &admin_token, &join_token);
    write(&dir.join("server.toml"), &to_toml(&server)?)?;
    let datastore_dir = image_datastore(&image, &cache_dir);
    for (i, h) in host_nets.iter().enumerate() {
        let agent = agent_config(
            h,
            SocketAddr::from(([127, 0, 0, 1], ports[i + 1])),
            &server_url,
            &join_token,
            dir.join("agents").join(&h.name),
            &accel,
            vec![DatastoreConfig {
                name: "images".into(),
                path: datastore_dir.clone(),
            }],
        );
        write(&dir.join(format!("{}.toml", h.name)), &to_toml(&agent)?)?;
    }

    let cfg = ClientConfig {
        url: server_url.clone(),
        token: Some(admin_token),
    };
    let ctx = &Ctx::from_config(&cfg, OutputFormat::Table);
    spawn_daemon(dir, "server", "server", &dir.join("server.toml"))?;
    wait_until(
        Duration::from_secs(30),
        "the server to answer",
        move || async move {
            match ctx.client.get::<Vec<Host>>("/v1/hosts").await {
                Ok(_) => Ok(true),
                Err(ApiError::Unreachable { .. }) => Ok(false),
                Err(e) => Err(CliError::Api(e)),
            }
        },
    )
    .await?;
    for h in &host_nets {
        spawn_daemon(dir, &h.name, "agent", &dir.join(format!("{}.toml", h.name)))?;
    }
    let names: Vec<String> = host_nets.iter().map(|h| h.name.clone()).collect();
    wait_hosts_online(ctx, names.len()).await?;

    let mut summary = format!(
        "lab {name}: {hosts} host(s) online ({}), accelerator {accel}\n  server {server_url}\n  dir    {}",
        names.join(", "),
        dir.display()
    );
    if !no_instance {
        let args = CreateArgs {
            name: LAB_VM.into(),
            memory_mib: None,
            vcpus: 1,
            host: Some("hv1".into()),
            kernel: None,
            initrd: None,
            cmdline: None,
            nics: Vec::new(),
            start: true,
            lab_guest: true,
            ip: Some(LAB_VM_IP),
        };
        let lab_image = LabImage {
            kernel: image.kernel.to_string_lossy().into_owned(),
            initrd: image.initrd.to_string_lossy().into_owned(),
        };
        let req = create_request(&args, Some(&lab_image))?;
        let _: Instance = ctx.post("/v1/instances", &req).await?;
        wait_for_state(ctx, LAB_VM, InstanceState::Running, ONLINE_TIMEOUT).await?;
        summary.push_str(&format!(
            "\n  instance {LAB_VM} running on hv1 at {}/{}",
            LAB_VM_IP.0, LAB_VM_IP.1
        ));
    }
    summary.push_str(&format!(
        "\nnext: ferry migrate {LAB_VM} --to hv2 --watch; remove it with `ferry lab down --name {name}`"
    ));
    Ok((cfg, summary))
}

/// The datastore agents expose for the guest image: the cache directory holding it, so the
/// kernel and initramfs paths in instance specs lie inside a datastore every host has.
fn image_datastore(_image: &GuestImage, cache_dir: &Path) -> PathBuf {
    cache_dir.to_path_buf()
}

/// Waits until `n` hosts report online (agents joined and heartbeating).
pub async fn wait_hosts_online(ctx: &Ctx, n: usize) -> Result<(), CliError> {
    wait_until(
        ONLINE_TIMEOUT,
        "every host to be online",
        move || async move {
            let list: Vec<Host> = ctx.get("/v1/hosts").await?;
            Ok(list.iter().filter(|h| h.state == HostState::Online).count() >= n)
        },
    )
    .await
}

/// 32 hex characters from the kernel's CSPRNG.
fn random_token() -> Result<String, CliError> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| CliError::new("no-randomness", format!("/dev/urandom: {e}"), ""))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn io_err(path: &Path, e: std::io::Error) -> CliError {
    CliError::new(
        "lab-dir",
        format!("{}: {e}", path.display()),
        "run as root, or set FERRY_LAB_DIR to a writable directory",
    )
}

/// Writes a file of the lab directory, mode 0600: configs carry tokens, and logs may quote
/// them.
fn write(path: &Path, text: &str) -> Result<(), CliError> {
    private_fs::write_file(path, text).map_err(|e| io_err(path, e))
}

/// Starts `ferry <role> --config <config>` detached: its own process group (a Ctrl-C in the
/// shell does not reach it), output to `<dir>/<name>.log`, pid to `<dir>/<name>.pid`.
fn spawn_daemon(dir: &Path, name: &str, role: &str, config: &Path) -> Result<(), CliError> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| {
        CliError::new(
            "no-executable",
            format!("cannot find this program: {e}"),
            "",
        )
    })?;
    let log_path = dir.join(format!("{name}.log"));
    let log = private_fs::create_file(&log_path).map_err(|e| io_err(&log_path, e))?;
    let log2 = log.try_clone().map_err(|e| io_err(&log_path, e))?;
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
        .map_err(|e| {
            CliError::new(
                "spawn-failed",
                format!("cannot start ferry {role}: {e}"),
                "",
            )
        })?;
    write(
        &dir.join(format!("{name}.pid")),
        &format!("{}\n", child.id()),
    )
}

/// Polls `check` every 250 ms until it says yes, or fails with what was awaited.
async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<(), CliError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, CliError>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e.body().to_string()),
        }
        if Instant::now() >= deadline {
            return Err(CliError::new(
                "lab-timeout",
                format!(
                    "gave up waiting for {what} after {} s{}",
                    timeout.as_secs(),
                    last_err
                        .map(|e| format!(" (last error: {e})"))
                        .unwrap_or_default()
                ),
                "read the daemon logs below",
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The last lines of every daemon log, for error messages.
fn log_tails(dir: &Path) -> String {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect()
        })
        .unwrap_or_default();
    logs.sort();
    let mut out = Vec::new();
    for p in logs {
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
/// Idempotent; used by `lab down` and before `lab up`.
fn teardown(name: &str, dir: &Path) {
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
fn stop_daemons(dir: &Path) {
    let pidfiles: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "pid"))
                .collect()
        })
        .unwrap_or_default();
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

/// Whether `pid` is a live (not zombie) ferry daemon started with a config in `dir`.
fn is_lab_daemon(pid: i32, dir: &Path) -> bool {
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
