//! `ferry lab`: a whole Ferry cluster on this machine. Lab hosts are network namespaces; a
//! `ferry server` and one `ferry agent` per host run as background daemons of this same binary,
//! with their configuration, database, logs and pid files in one lab directory, so that
//! `ferry lab down` (or the next `lab up` of the same name) can find and remove everything even
//! after the shell that started it is gone.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use clap::Subcommand;
use ferry_api::hosts::{Host, HostState};
use ferry_api::instances::{Instance, InstanceState};
use ferry_api::ApiError;
use ferry_chaos::daemons::{
    lab_dir, log_tails, random_token, spawn_daemon, stop_daemons, teardown, write,
    write_agent_configs, MARKER,
};
use ferry_chaos::ChaosError;
use ferry_lab::image::{ensure_image, ImageOptions};
use ferry_lab::net::{
    destroy_lab, free_local_ports, list_labs, validate_lab_name, LabNet, MAX_HOSTS,
};
use ferry_lab::LabError;

use super::instance::{create_request, wait_for_state, CreateArgs, LabImage};
use super::Ctx;
use crate::config::ClientConfig;
use crate::error::{exit, CliError};
use crate::output::OutputFormat;

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum LabCommand {
    /// Start a lab cluster: hosts hv1..N as namespaces, a server and one agent per host as
    /// daemons, and (unless --no-instance) a running test guest `vm1` on hv1. A stale lab of
    /// the same name is removed first. Prints `export FERRY_URL=... FERRY_TOKEN=... FERRY_CA=...` lines, so
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
/// The daemons' configuration, shared with the fault matrix and the tests.
pub use ferry_chaos::daemons::{agent_config, server_config, to_toml};

/// The test guest `lab up` creates, and its address.
const LAB_VM: &str = "vm1";
const LAB_VM_IP: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 77, 0, 100), 24);

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
                println!("{lab}");
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
    ferry_lab::private_fs::create_dir(&dir)
        .map_err(|e| ChaosError::io(dir.display().to_string(), e))?;
    write(&dir.join(MARKER), name)?;
    match start(name, hosts, no_instance, &dir).await {
        Ok((cfg, summary)) => {
            println!("export FERRY_URL={}", cfg.url);
            println!("export FERRY_TOKEN={}", cfg.token.unwrap_or_default());
            if let Some(ca) = &cfg.ca {
                println!("export FERRY_CA={}", ca.display());
            }
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
    let server_url = format!("https://127.0.0.1:{}", ports[0]);
    // The CA exists before the server starts, so agents and this client trust it from the
    // first request.
    ferry_chaos::daemons::prepare_ca(dir)?;
    let admin_token = random_token()?;
    let join_token = random_token()?;
    let listen = SocketAddr::from(([127, 0, 0, 1], ports[0]));
    let server = server_config(listen, dir.join("ferry.db"), &admin_token, &join_token);
    write(&dir.join("server.toml"), &to_toml(&server)?)?;
    write_agent_configs(
        dir,
        &host_nets,
        &ports[1..],
        &server_url,
        &join_token,
        &accel,
        &cache_dir,
    )?;

    let cfg = ClientConfig {
        url: server_url.clone(),
        token: Some(admin_token),
        ca: Some(ferry_chaos::daemons::ca_file(dir)),
        fingerprint: None,
    };
    let ctx = &Ctx::from_config(&cfg, OutputFormat::Table)?;
    let exe = super::this_program()?;
    spawn_daemon(&exe, dir, "server", "server", &dir.join("server.toml"))?;
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
        spawn_daemon(
            &exe,
            dir,
            &h.name,
            "agent",
            &dir.join(format!("{}.toml", h.name)),
        )?;
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
            ..CreateArgs::default()
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
    summary.push_str(&next_steps(name, hosts, no_instance));
    Ok((cfg, summary))
}

/// What `lab up` suggests doing next: migrating vm1 needs vm1 (and a second host), so without
/// them the first step is making a guest.
pub fn next_steps(name: &str, hosts: usize, no_instance: bool) -> String {
    let down = format!("remove it with `ferry lab down --name {name}`");
    if no_instance {
        format!(
            "\nnext: ferry instance create {LAB_VM} --lab-guest --ip {}/{} --host hv1 --start; {down}",
            LAB_VM_IP.0, LAB_VM_IP.1
        )
    } else if hosts < 2 {
        format!("\nnext: ferry instance show {LAB_VM}; {down}")
    } else {
        format!("\nnext: ferry migrate {LAB_VM} --to hv2 --watch; {down}")
    }
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
