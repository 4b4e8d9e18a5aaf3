//! `ferry demo`: the embedded default. Two lab hosts, one busy guest, one live migration, a
//! report of what the guest and its client saw.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use ferry_api::instances::{DiskRequest, Instance};
use ferry_api::migrations::{Migration, MigrationOptions, MigrationState, Policy};
use ferry_api::ErrorBody;
use ferry_bench::local_cluster::{HostStorage, LocalCluster};
use ferry_cli::commands::migrate::follow;
use ferry_cli::commands::Ctx;
use ferry_cli::error::CliError;
use ferry_lab::guest_client::{self, tcp_echo_roundtrip, EchoProbe};
use ferry_lab::guest_config::{Fill, GuestConfig, GuestDisk, CONTROL_PORT, ECHO_PORT};
use ferry_lab::image::ensure_image;
use ferry_lab::net::{tcp_connect_in, udp_bind_in};
use ferry_lab::serial::{heartbeat_gap, HostBeats, SerialMonitor};
use ferry_lab::LabError;
use ferry_qemu::AccelChoice;
use serde::Serialize;

use crate::image_cmd::ImageArgs;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Print the report as one JSON object on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// Guest memory.
    #[arg(long, default_value_t = 512)]
    memory_mib: u32,
    /// The guest's memory writer: working set size.
    #[arg(long, default_value_t = 64)]
    wss_mib: u32,
    /// The guest's memory writer: MiB rewritten per second (0: fill once, then idle).
    #[arg(long, default_value_t = 32)]
    rate_mib_s: u32,
    /// Page content: pattern (compressible) or random.
    #[arg(long, default_value = "pattern", value_parser = parse_fill)]
    fill: Fill,
    /// Migration bandwidth cap in MiB/s (default: unlimited).
    #[arg(long)]
    bandwidth_mib_s: Option<u64>,
    /// Downtime target in ms (under auto, the ceiling its controller may raise it to).
    #[arg(long)]
    downtime_ms: Option<u64>,
    /// Migration policy: auto (measure, plan, adapt) or manual (exactly the options given).
    #[arg(long, value_parser = ferry_cli::commands::migrate::parse_policy, default_value = "auto")]
    policy: Policy,
    /// Accelerator: auto (probe), kvm or tcg.
    #[arg(long, env = "FERRY_ACCEL", default_value = "auto")]
    accel: String,
    /// Which guest moves: `lab` (Ferry's test guest, which verifies its own memory and disk)
    /// or `debian` (a real Debian 12 booted from its disk, watched through its guest agent).
    #[arg(long, default_value = "lab", value_parser = ["lab", "debian"])]
    guest: String,
    /// Give the guest a disk of this size on the datastore `--storage` names; the guest
    /// writes self-checking blocks to it and verifies every one after the move.
    #[arg(long, value_name = "N")]
    disk_mib: Option<u32>,
    /// Where the `--disk-mib` disk lives: `shared` (a datastore both lab hosts mount, so only
    /// memory moves) or `local` (a datastore of each host's own, so the disk is copied live
    /// with the guest: block migration).
    #[arg(long, value_enum, default_value = "shared")]
    storage: Storage,
    /// The guest's disk writer: durable 4 KiB writes per second.
    #[arg(long, default_value_t = 100, requires = "disk_mib")]
    disk_rate: u32,
    /// Lab name (namespaces ferry-NAME-*); a stale lab of that name is removed first.
    #[arg(long, default_value = "demo")]
    lab_name: String,
    #[command(flatten)]
    image: ImageArgs,
}

/// Where the demo guest's disk lives; it decides whether the disk moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Storage {
    Shared,
    Local,
}

impl Storage {
    fn as_str(self) -> &'static str {
        match self {
            Storage::Shared => "shared",
            Storage::Local => "local",
        }
    }
}

/// How the demo's client watches the guest, as the job records it.
const ECHO_OBSERVER: &str = "the lab's UDP echo client, every 5 ms";

/// The demo's result; `--json` prints exactly this.
#[derive(Debug, Serialize)]
struct DemoReport {
    status: &'static str,
    /// `lab` or `debian`.
    guest: String,
    source: String,
    destination: String,
    memory_mib: u32,
    accel: String,
    /// QEMU's: from its migrate command, so without a block migration's disk copy before it.
    total_ms: Option<u64>,
    /// QEMU's pause at switchover (QEMU's `downtime`).
    qemu_pause_ms: Option<u64>,
    /// Longest gap between UDP echo replies seen by a client probing every 5 ms.
    observed_gap_ms: Option<f64>,
    /// Longest gap between heartbeat lines on the serial ports (source, then destination).
    heartbeat_gap_ms: Option<f64>,
    heartbeat_continuous: Option<bool>,
    tcp_echo_survived: Option<bool>,
    bytes_transferred: Option<u64>,
    iterations: Option<u64>,
    echo_sent: Option<u64>,
    echo_lost: Option<u64>,
    memory_verified: bool,
    memory_pages_checked: Option<u64>,
    memory_errors: Option<u64>,
    /// The guest's disk (with `--disk-mib`): every block it wrote read back as written.
    #[serde(skip_serializing_if = "Option::is_none")]
    disk_verified: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disk_blocks_checked: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disk_errors: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disk_writes: Option<u64>,
    /// `shared` or `local` (with `--disk-mib`): whether the disk had to move.
    #[serde(skip_serializing_if = "Option::is_none")]
    disk_storage: Option<&'static str>,
    /// `--storage local`: each disk's copy, as the job recorded it and the demo timed it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    disk_copies: Vec<blocks::DiskCopyReport>,
    /// `--storage local`: bytes the destination received on its migration interface from the
    /// end of the pre-flight checks to the end of the job, memory and disks together.
    #[serde(skip_serializing_if = "Option::is_none")]
    migration_rx_bytes: Option<u64>,
    /// `--storage local`: what removes the images the guest left on the source.
    #[serde(skip_serializing_if = "Option::is_none")]
    cleanup_command: Option<String>,
    /// Debian: `PRETTY_NAME` as its guest agent reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    guest_os: Option<String>,
    /// Debian: seconds from the create request to the guest agent's first answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    boot_s: Option<f64>,
    /// Debian: writes of the guest's shell loop missing from its log after the move.
    #[serde(skip_serializing_if = "Option::is_none")]
    writes_lost: Option<u64>,
    /// Debian: lines of the loop's log that repeat or go back (a stale disk would show so).
    #[serde(skip_serializing_if = "Option::is_none")]
    writes_out_of_order: Option<u64>,
    /// Debian: longest time between two of the loop's writes, by the guest's clock.
    #[serde(skip_serializing_if = "Option::is_none")]
    longest_write_gap_ms: Option<f64>,
    /// Debian: a 4 MiB file written before the move read back identical after it.
    #[serde(skip_serializing_if = "Option::is_none")]
    file_intact: Option<bool>,
    /// Debian: `e2fsck -fn` of the root filesystem after a clean shutdown found nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    fsck_clean: Option<bool>,
    /// What the auto policy measured, predicted and chose.
    plan: Option<String>,
    error: Option<serde_json::Value>,
    /// Whether the server accepted the migration: before that there is nothing to report.
    #[serde(skip)]
    migration_started: bool,
}

impl DemoReport {
    fn new(args: &DemoArgs) -> DemoReport {
        DemoReport {
            status: "failed",
            guest: args.guest.clone(),
            source: "hv1".into(),
            destination: "hv2".into(),
            memory_mib: args.memory_mib,
            accel: String::new(),
            total_ms: None,
            qemu_pause_ms: None,
            observed_gap_ms: None,
            heartbeat_gap_ms: None,
            heartbeat_continuous: None,
            tcp_echo_survived: None,
            bytes_transferred: None,
            iterations: None,
            echo_sent: None,
            echo_lost: None,
            memory_verified: false,
            memory_pages_checked: None,
            memory_errors: None,
            disk_verified: None,
            disk_blocks_checked: None,
            disk_errors: None,
            disk_writes: None,
            disk_storage: args.disk_mib.map(|_| args.storage.as_str()),
            disk_copies: Vec::new(),
            migration_rx_bytes: None,
            cleanup_command: None,
            guest_os: None,
            boot_s: None,
            writes_lost: None,
            writes_out_of_order: None,
            longest_write_gap_ms: None,
            file_intact: None,
            fsck_clean: None,
            plan: None,
            error: None,
            migration_started: false,
        }
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let mut report = DemoReport::new(&args);
    // Ctrl-C or SIGTERM drops the demo future: the local cluster it owns removes every
    // namespace (and with them every QEMU process and tap) and its directory on drop.
    let outcome = tokio::select! {
        r = demo(&args, &mut report) => r,
        _ = ferry_cli::commands::shutdown_signal() => {
            eprintln!("interrupted: cleaning up the lab");
            return Ok(ExitCode::from(130));
        }
    };
    let end = conclude(&mut report, outcome, args.json);
    if let Some(out) = &end.stdout {
        ferry_cli::output::emit(out);
    }
    if let Some(err) = &end.stderr {
        eprintln!("{err}");
    }
    Ok(ExitCode::from(end.code))
}

/// What the demo prints at its end, and its exit code.
#[derive(Debug)]
struct Conclusion {
    stdout: Option<String>,
    stderr: Option<String>,
    code: u8,
}

/// The end of a demo run. A report describes a migration, so it is printed only once one was
/// started: a demo that failed before (bad input, not root, no image, no lab) prints its
/// error alone, as `error[code]` and one hint line, and not a report full of dashes and a
/// "memory verification FAILED" about a guest that never moved. `--json` always prints the
/// report object, with the error in it, because scripts parse stdout.
fn conclude(report: &mut DemoReport, outcome: Result<(), CliError>, json: bool) -> Conclusion {
    let error = outcome.err();
    if let Some(e) = &error {
        report.status = "failed";
        report.error = serde_json::to_value(e.body()).ok();
    }
    let stdout = if json {
        Some(serde_json::to_string(&report).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")))
    } else if report.migration_started {
        Some(render_report(report))
    } else {
        None
    };
    let stderr = match &error {
        Some(e) if !json => Some(e.render()),
        _ => None,
    };
    let verified = if report.guest == "debian" {
        report.file_intact == Some(true)
            && report.writes_lost == Some(0)
            && report.writes_out_of_order == Some(0)
            && report.fsck_clean == Some(true)
    } else {
        report.memory_verified && report.disk_verified != Some(false)
    };
    let code = match (&error, verified) {
        (Some(_), _) => 1,
        (None, true) => 0,
        (None, false) => 2,
    };
    Conclusion {
        stdout,
        stderr,
        code,
    }
}

fn say(args: &DemoArgs, msg: &str) {
    if !args.json || std::io::stderr().is_terminal() {
        eprintln!("{msg}");
    }
}

fn guest_err(detail: String) -> CliError {
    CliError::new(
        "guest-unresponsive",
        detail,
        "read the guest's serial log in the agent's run directory",
    )
}

pub(crate) mod blocks;
mod debian;

/// The guest's address in the demo lab, and its name.
const VM: &str = "demo-vm";
/// The serial of the demo guest's disk, by which the guest program finds it.
const DISK_SERIAL: &str = "ferry-data";

/// `--storage local` moves the lab guest's `--disk-mib` disk: without that disk it would move
/// nothing and the demo would claim a block migration that never happened.
fn check_storage(args: &DemoArgs) -> Result<(), CliError> {
    if args.storage == Storage::Shared {
        return Ok(());
    }
    if args.guest == "debian" {
        return Err(CliError::new(
            "invalid-storage",
            "--storage local moves the lab guest's --disk-mib disk; the Debian guest boots \
             from a disk on shared storage",
            "drop --storage local, or run the lab guest: `ferry demo --disk-mib 16 --storage local`",
        ));
    }
    if args.disk_mib.is_none() {
        return Err(CliError::new(
            "invalid-storage",
            "--storage local needs a disk to move, and the guest has none without --disk-mib",
            "give the guest a disk: `ferry demo --disk-mib 16 --storage local`",
        ));
    }
    Ok(())
}

async fn demo(args: &DemoArgs, report: &mut DemoReport) -> Result<(), CliError> {
    let config = GuestConfig {
        wss_mib: args.wss_mib,
        rate_mib_s: args.rate_mib_s,
        fill: args.fill,
        disk: args.disk_mib.map(|mib| GuestDisk {
            rate_blocks_s: args.disk_rate,
            blocks: Some(u64::from(mib) * 256),
            ..GuestDisk::new(DISK_SERIAL)
        }),
        ..GuestConfig::default()
    };
    if let Some(mib) = args.disk_mib {
        if !(1..=64).contains(&mib) {
            return Err(CliError::new(
                "invalid-disk-size",
                format!("--disk-mib {mib} is out of range (1 to 64)"),
                "the guest verifies every block after the move; 64 MiB is its limit",
            ));
        }
    }
    check_storage(args)?;
    // Refuse bad input before anything is created.
    ferry_qemu::InstanceSpec::check_memory(args.memory_mib).map_err(LabError::from)?;
    config
        .validate(args.memory_mib)
        .map_err(|e| LabError::InvalidRequest(format!("guest: {e}")))?;
    let options = MigrationOptions {
        bandwidth_mib_s: args.bandwidth_mib_s,
        downtime_ms: args.downtime_ms,
        policy: args.policy,
        ..MigrationOptions::default()
    };
    options.validate().map_err(CliError::Local)?;
    let choice: AccelChoice = args.accel.parse().map_err(LabError::from)?;
    // SAFETY: geteuid(2) cannot fail and has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(CliError::new(
            "needs-root",
            "the demo creates network namespaces, bridges and taps, which only root may do",
            "run it as root, e.g. `sudo ferry demo`",
        ));
    }

    say(
        args,
        "preparing: guest image, accelerator, lab hosts hv1 and hv2",
    );
    let image_opts = args.image.options();
    let cache_dir = image_opts.cache_dir.clone();
    let (image, _) = tokio::task::spawn_blocking(move || ensure_image(&image_opts))
        .await
        .map_err(|e| CliError::new("internal", e.to_string(), ""))?
        .map_err(LabError::from)?;
    let accel =
        ferry_lab::choose_accel(choice, Path::new("qemu-system-x86_64"), &cache_dir, &image)
            .await?;
    report.accel = accel.name().into();
    say(args, "starting ferry server and an agent per host");
    // The image's cache directory is a datastore of every host, as in `ferry lab up`: the
    // server accepts kernel and initrd paths only inside a datastore.
    let images = ferry_bench::local_cluster::images_datastore(&cache_dir)?;
    let storage = match args.storage {
        Storage::Shared => HostStorage::Shared,
        Storage::Local => HostStorage::Local,
    };
    let cluster =
        LocalCluster::start_with(&args.lab_name, 2, accel.name(), vec![images], storage).await?;
    if args.guest == "debian" {
        let result = debian::run(args, &cluster, &cache_dir, &options, report).await;
        cluster.shutdown().await;
        return result;
    }
    let disks = match args.disk_mib {
        None => vec![],
        Some(mib) => vec![demo_disk(args, mib)],
    };

    say(
        args,
        &format!(
            "booting a {} MiB guest on hv1 ({}; writer {} MiB at {} MiB/s)",
            args.memory_mib,
            accel.name(),
            args.wss_mib,
            args.rate_mib_s
        ),
    );
    let vm = cluster
        .create_lab_guest(&image, config, args.memory_mib, VM, disks)
        .await?;
    let result = migrate_and_measure(args, &cluster, &vm, &options, report).await;
    cluster.shutdown().await;
    result
}

/// The guest's `--disk-mib` disk on the datastore `--storage` names.
fn demo_disk(args: &DemoArgs, mib: u32) -> DiskRequest {
    let (datastore, where_) = match args.storage {
        Storage::Shared => (LocalCluster::SHARED_DATASTORE, "shared by hv1 and hv2"),
        Storage::Local => (
            LocalCluster::LOCAL_DATASTORE,
            "hv1's own; hv2 has another: the disk is copied live with the guest",
        ),
    };
    say(
        args,
        &format!(
            "the guest gets a disk of {mib} MiB on datastore {datastore} ({where_}), written \
             at {} blocks/s",
            args.disk_rate
        ),
    );
    DiskRequest {
        datastore: Some(datastore.into()),
        size_bytes: Some(u64::from(mib) << 20),
        serial: Some(DISK_SERIAL.into()),
        ..DiskRequest::default()
    }
}

async fn migrate_and_measure(
    args: &DemoArgs,
    cluster: &LocalCluster,
    vm: &Instance,
    options: &MigrationOptions,
    report: &mut DemoReport,
) -> Result<(), CliError> {
    let ip = cluster.net.guest_addr(0);
    let client_ns = cluster.net.client_netns.clone();
    let control = SocketAddr::from((ip, CONTROL_PORT));
    let source_serial =
        SerialMonitor::connect(&cluster.serial_socket(0, vm.id), Duration::from_secs(10))
            .await
            .map_err(|e| guest_err(format!("cannot read the guest's serial port: {e}")))?;
    guest_client::control_in_within(&client_ns, control, "status", Duration::from_secs(120))
        .await
        .map_err(|e| {
            guest_err(format!(
                "the guest at {ip} did not answer within 120 s: {e}"
            ))
        })?;

    let echo_addr = SocketAddr::from((ip, ECHO_PORT));
    let ns = client_ns.clone();
    let (udp, mut tcp) = tokio::task::spawn_blocking(move || {
        let udp = udp_bind_in(&ns, "0.0.0.0:0".parse().expect("literal address"))?;
        let tcp = tcp_connect_in(&ns, echo_addr, Duration::from_secs(5))?;
        Ok::<_, std::io::Error>((udp, tcp))
    })
    .await
    .map_err(|e| guest_err(e.to_string()))?
    .map_err(|e| guest_err(format!("cannot reach the echo service at {echo_addr}: {e}")))?;
    tcp_echo_roundtrip(&mut tcp, b"before migration")
        .map_err(|e| guest_err(format!("TCP echo before migration: {e}")))?;
    let probe = EchoProbe::start(udp, echo_addr, Duration::from_millis(5))
        .map_err(|e| guest_err(format!("cannot start the echo probe: {e}")))?;
    // The destination's serial socket appears when its agent starts QEMU in incoming mode;
    // the reader connects as soon as it exists, well before switchover.
    let dest_socket = cluster.serial_socket(1, vm.id);
    let dest_serial = tokio::spawn(async move {
        SerialMonitor::connect(&dest_socket, Duration::from_secs(300)).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let m = migrate_to_hv2(args, cluster, options, report).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let echo = probe.stop();
    report.echo_sent = Some(echo.sent);
    report.echo_lost = Some(echo.lost);
    report.observed_gap_ms = Some(echo.longest_gap_ms);
    // The job keeps what the client saw, next to QEMU's pause.
    let seen = ferry_migrate::Observation {
        by: ECHO_OBSERVER.into(),
        longest_gap_ms: echo.longest_gap_ms.round() as u64,
        probes_sent: echo.sent,
        probes_lost: echo.lost,
    };
    let path = format!("/v1/migrations/{}/observations", m.id);
    if let Err(e) = cluster.api.post::<_, Migration>(&path, &seen).await {
        say(
            args,
            &format!("the server did not keep the echo client's figures: {e}"),
        );
    }
    if let Err(e) = record_completion(&m, report) {
        dest_serial.abort();
        return Err(e);
    }
    // A guest that lost the connection must not hang the demo: give the echo 10 s.
    let tcp_ok = tokio::task::spawn_blocking(move || {
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        tcp_echo_roundtrip(&mut tcp, b"after migration")
    })
    .await
    .map(|r| r.is_ok())
    .unwrap_or(false);
    report.tcp_echo_survived = Some(tcp_ok);
    if let Ok(Ok(dest)) = dest_serial.await {
        // The source's QEMU has quit with the completed job: read its port to the end.
        let source = source_serial.finish(Duration::from_secs(5)).await;
        let gap = heartbeat_gap(&[
            HostBeats::new("hv1", source),
            HostBeats::new("hv2", dest.beats()),
        ]);
        report.heartbeat_gap_ms = Some(gap.longest_gap.as_secs_f64() * 1000.0);
        report.heartbeat_continuous = Some(gap.continuous);
    }
    say(args, "verifying guest memory on hv2");
    let reply = guest_client::control_in(&client_ns, control, "verify")
        .await
        .map_err(|e| guest_err(format!("verify: {e}")))?;
    let verify = guest_client::parse_verify(&reply).map_err(|e| guest_err(e.to_string()))?;
    report.memory_pages_checked = Some(verify.checked);
    report.memory_errors = Some(verify.errors);
    report.memory_verified = verify.errors == 0 && verify.checked > 0;
    if args.disk_mib.is_some() {
        say(args, "verifying every block of the guest's disk on hv2");
        let reply = guest_client::control_in(&client_ns, control, "disk-verify")
            .await
            .map_err(|e| guest_err(format!("disk-verify: {e}")))?;
        let disk = guest_client::parse_disk_verify(&reply).map_err(|e| guest_err(e.to_string()))?;
        report.disk_blocks_checked = Some(disk.blocks_checked);
        report.disk_errors = Some(disk.errors);
        report.disk_writes = Some(disk.writes);
        report.disk_verified = Some(disk.ok && disk.blocks_checked > 0);
    }
    Ok(())
}

/// Asks the server to move the demo guest to hv2 and follows the job (with a progress bar
/// on a terminal) until it ends.
async fn migrate_to_hv2(
    args: &DemoArgs,
    cluster: &LocalCluster,
    options: &MigrationOptions,
    report: &mut DemoReport,
) -> Result<Migration, CliError> {
    say(args, "migrating hv1 -> hv2 through the server");
    let m = cluster.create_migration_to_hv2(VM, options).await?;
    report.migration_started = true;
    let bar = !args.json || std::io::stderr().is_terminal();
    if args.storage == Storage::Shared {
        return follow(&ctx(cluster), m.id, bar).await;
    }
    let (m, watched) = blocks::follow_counting(cluster, &ctx(cluster), m.id, bar).await?;
    blocks::record(&m, &watched, cluster, report);
    Ok(m)
}

/// The CLI's view of the local cluster's server, for the commands' own followers.
fn ctx(cluster: &LocalCluster) -> Ctx {
    Ctx::with_client(cluster.api.clone())
}

/// The job's ending into the report: its figures when it completed, else its error.
fn record_completion(m: &Migration, report: &mut DemoReport) -> Result<(), CliError> {
    if m.state != MigrationState::Completed {
        return Err(CliError::Local(m.error.clone().unwrap_or_else(|| {
            ErrorBody::new(
                "migration-failed",
                format!("migration ended {}", m.state.as_str()),
                "see `ferry migration logs`",
            )
        })));
    }
    report.status = "completed";
    report.plan = m.plan.as_ref().map(|p| p.plan.summary());
    if let Some(stats) = &m.stats {
        report.total_ms = Some(stats.total_ms);
        report.qemu_pause_ms = Some(stats.qemu_pause_ms);
        report.bytes_transferred = Some(stats.bytes_transferred);
        report.iterations = Some(stats.iterations);
    }
    Ok(())
}

fn parse_fill(s: &str) -> Result<Fill, String> {
    match s {
        "pattern" => Ok(Fill::Pattern),
        "random" => Ok(Fill::Random),
        _ => Err(format!("'{s}' is not a fill; use pattern or random")),
    }
}

/// The report as the text `ferry demo` prints.
fn render_report(r: &DemoReport) -> String {
    use std::fmt::Write;
    if r.guest == "debian" {
        return debian::render(r);
    }
    let mut out = String::new();
    let ms = |v: Option<u64>| v.map(|v| format!("{v} ms")).unwrap_or_else(|| "-".into());
    let fms = |v: Option<f64>| {
        v.map(|v| format!("{v:.1} ms"))
            .unwrap_or_else(|| "-".into())
    };
    let _ = writeln!(
        out,
        "\nFerry demo: {} -> {} ({} MiB guest, {})",
        r.source, r.destination, r.memory_mib, r.accel
    );
    let _ = writeln!(out, "  status                   {}", r.status);
    if let Some(plan) = &r.plan {
        let _ = writeln!(out, "  {plan}");
    }
    if r.disk_copies.is_empty() {
        let _ = writeln!(out, "  total time               {}", ms(r.total_ms));
    } else {
        // QEMU counts from its migrate command, which comes after the disk copy.
        let _ = writeln!(
            out,
            "  memory migration time    {} (QEMU's, after the disk copy)",
            ms(r.total_ms)
        );
    }
    let _ = writeln!(out, "  QEMU's pause             {}", ms(r.qemu_pause_ms));
    let _ = writeln!(
        out,
        "  longest gap, echo client {} (UDP echo every 5 ms; {} of {} lost)",
        fms(r.observed_gap_ms),
        r.echo_lost.unwrap_or(0),
        r.echo_sent.unwrap_or(0)
    );
    let _ = writeln!(
        out,
        "  longest heartbeat gap    {} (counter continuous: {})",
        fms(r.heartbeat_gap_ms),
        r.heartbeat_continuous
            .map(|c| if c { "yes" } else { "NO" })
            .unwrap_or("-")
    );
    let _ = writeln!(
        out,
        "  TCP echo connection      {}",
        r.tcp_echo_survived
            .map(|c| if c { "survived" } else { "BROKEN" })
            .unwrap_or("-")
    );
    let _ = writeln!(
        out,
        "  memory transferred       {}",
        r.bytes_transferred
            .map(|b| format!("{:.1} MiB", b as f64 / (1 << 20) as f64))
            .unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(
        out,
        "  iterations               {}",
        r.iterations
            .map(|i| i.to_string())
            .unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(
        out,
        "  memory verification      {} ({} pages checked, {} errors)",
        if r.memory_verified { "OK" } else { "FAILED" },
        r.memory_pages_checked.unwrap_or(0),
        r.memory_errors
            .map(|e| e.to_string())
            .unwrap_or_else(|| "-".into())
    );
    if let Some(ok) = r.disk_verified {
        let _ = writeln!(
            out,
            "  disk verification        {} ({} blocks checked, {} errors, {} writes)",
            if ok { "OK" } else { "FAILED" },
            r.disk_blocks_checked.unwrap_or(0),
            r.disk_errors
                .map(|e| e.to_string())
                .unwrap_or_else(|| "-".into()),
            r.disk_writes.unwrap_or(0)
        );
    }
    blocks::render(r, &r.destination, &mut out);
    out.truncate(out.trim_end_matches('\n').len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        demo: DemoArgs,
    }

    fn parse(extra: &[&str]) -> Result<DemoArgs, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("ferry").chain(extra.iter().copied())).map(|c| c.demo)
    }

    fn args(json: bool) -> DemoArgs {
        parse(if json { &["--json"] } else { &[] }).unwrap()
    }

    #[test]
    fn storage_is_shared_unless_local_is_asked_for_and_local_needs_the_lab_guests_disk() {
        assert_eq!(args(false).storage, Storage::Shared);
        let local = parse(&["--disk-mib", "16", "--storage", "local"]).unwrap();
        assert_eq!(local.storage, Storage::Local);
        assert!(check_storage(&local).is_ok());
        assert_eq!(
            DemoReport::new(&local).disk_storage,
            Some("local"),
            "the report says where the disk was"
        );
        assert!(parse(&["--storage", "nfs"]).is_err());

        for argv in [
            &["--storage", "local"][..],
            &[
                "--guest",
                "debian",
                "--disk-mib",
                "16",
                "--storage",
                "local",
            ][..],
        ] {
            let err = check_storage(&parse(argv).unwrap()).expect_err("refused");
            let text = err.render();
            assert!(text.starts_with("error[invalid-storage]: "), "{text}");
            assert_eq!(text.matches("hint:").count(), 1, "{text}");
        }
    }

    /// The text report of a block migration names each figure for what it measures and
    /// prints the command that removes the source's image.
    #[test]
    fn a_block_migration_report_shows_the_copy_the_wire_and_the_cleanup() {
        let mut report =
            DemoReport::new(&parse(&["--disk-mib", "16", "--storage", "local"]).unwrap());
        report.migration_started = true;
        report.status = "completed";
        report.memory_verified = true;
        report.disk_verified = Some(true);
        report.total_ms = Some(551);
        report.migration_rx_bytes = Some(168 << 20);
        report.cleanup_command = Some("ferry migration cleanup 352fd622".into());
        report.disk_copies = vec![blocks::DiskCopyReport {
            disk: "disk0".into(),
            state: "copied".into(),
            size_bytes: 16 << 20,
            progressed_bytes: 16 << 20,
            copy_ms: Some(500),
            copy_sample_gap_ms: Some(250),
            target: "local:demo-vm-disk0.qcow2".into(),
            source_host: "hv1".into(),
            source_image: "local:demo-vm-disk0.qcow2".into(),
            source_path: Some("/tmp/x/local/hv1/demo-vm-disk0.qcow2".into()),
            source_kept: true,
            source_present: true,
        }];
        let out = conclude(&mut report, Ok(()), false).stdout.unwrap();
        for needle in [
            "memory migration time    551 ms (QEMU's, after the disk copy)",
            "disk disk0 copy          copied to local:demo-vm-disk0.qcow2 on hv2",
            "copy progressed        16.0 MiB of a 16.0 MiB disk",
            "disk copy time         250-500 ms",
            "kept on hv1 at /tmp/x/local/hv1/demo-vm-disk0.qcow2 until the cleanup",
            "`ferry migration cleanup 352fd622` removes the source images",
            "received on the wire     168.0 MiB by hv2's migration interface",
        ] {
            assert!(out.contains(needle), "{needle:?} missing:\n{out}");
        }
        assert!(!out.contains("total time"), "{out}");

        report.disk_copies[0].source_present = false;
        let out = render_report(&report);
        assert!(out.contains("is MISSING"), "{out}");
    }

    /// A demo that fails before its migration started (here: not root) prints the error once,
    /// with its hint once, and no report.
    #[test]
    fn a_demo_that_never_migrated_prints_only_its_error() {
        let mut report = DemoReport::new(&args(false));
        let err = CliError::new(
            "needs-root",
            "the demo creates network namespaces, which only root may do",
            "run it as root, e.g. `sudo ferry demo`",
        );
        let end = conclude(&mut report, Err(err), false);
        assert_eq!(end.code, 1);
        assert_eq!(end.stdout, None, "no report for a run that never started");
        let stderr = end.stderr.expect("the error");
        assert!(stderr.starts_with("error[needs-root]: "), "{stderr}");
        assert_eq!(stderr.matches("hint:").count(), 1, "{stderr}");
        assert!(!stderr.contains("verification"), "{stderr}");

        // An image error's hint used to be in its message too, and so printed twice.
        let image = ferry_lab::image::ensure_image(&ferry_lab::image::ImageOptions {
            cache_dir: std::path::PathBuf::from("/proc/ferry-no-such-dir"),
            kernel_package: None,
            busybox: std::path::PathBuf::from("/proc/ferry-no-busybox"),
            offline: true,
        })
        .expect_err("no image can be built in /proc");
        let mut report = DemoReport::new(&args(false));
        let end = conclude(&mut report, Err(LabError::from(image).into()), false);
        let stderr = end.stderr.expect("the error");
        assert_eq!(stderr.matches("hint").count(), 1, "{stderr}");
        assert_eq!(end.stdout, None);
    }

    #[test]
    fn json_always_prints_the_report_object() {
        let mut report = DemoReport::new(&args(true));
        let end = conclude(
            &mut report,
            Err(CliError::new("needs-root", "not root", "use sudo")),
            true,
        );
        assert_eq!(end.code, 1);
        assert_eq!(end.stderr, None);
        let v: serde_json::Value = serde_json::from_str(&end.stdout.unwrap()).unwrap();
        assert_eq!(v["status"], "failed");
        assert_eq!(v["error"]["code"], "needs-root");
    }

    #[test]
    fn a_started_migration_is_reported() {
        let mut report = DemoReport::new(&args(false));
        report.migration_started = true;
        report.status = "completed";
        report.memory_verified = true;
        report.memory_pages_checked = Some(10);
        report.memory_errors = Some(0);
        let end = conclude(&mut report, Ok(()), false);
        assert_eq!(end.code, 0);
        assert_eq!(end.stderr, None);
        let out = end.stdout.unwrap();
        assert!(out.contains("memory verification      OK"), "{out}");

        let mut failed = DemoReport::new(&args(false));
        failed.migration_started = true;
        let err = CliError::new("migration-failed", "migration ended failed", "see the logs");
        let end = conclude(&mut failed, Err(err), false);
        assert_eq!(end.code, 1);
        assert!(end
            .stdout
            .unwrap()
            .contains("status                   failed"));
        assert_eq!(end.stderr.unwrap().matches("hint:").count(), 1);
    }
}
