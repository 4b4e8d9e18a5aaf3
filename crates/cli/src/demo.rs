//! `ferry demo`: the embedded default. Two lab hosts, one busy guest, one live migration, a
//! report of what the guest and its client saw.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use ferry_lab::guest_client::{tcp_echo_roundtrip, EchoProbe};
use ferry_lab::guest_config::{Fill, GuestConfig, ECHO_PORT};
use ferry_lab::net::{tcp_connect_in, udp_bind_in};
use ferry_lab::{GuestRequest, Lab, LabError, LabOptions, LabVm};
use ferry_migrate::{AbortHandle, Bandwidth, MigrationParams, Progress};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::image_cmd::ImageArgs;
use crate::report::error_json;

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
    /// Downtime target in ms.
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// Accelerator: auto (probe), kvm or tcg.
    #[arg(long, env = "FERRY_ACCEL", default_value = "auto")]
    accel: String,
    /// Lab name (namespaces ferry-NAME-*); a stale lab of that name is removed first.
    #[arg(long, default_value = "demo")]
    lab_name: String,
    #[command(flatten)]
    image: ImageArgs,
}

/// The demo's result; `--json` prints exactly this.
#[derive(Debug, Serialize)]
struct DemoReport {
    status: &'static str,
    source: String,
    destination: String,
    memory_mib: u32,
    accel: String,
    total_ms: Option<u64>,
    qemu_downtime_ms: Option<u64>,
    /// Longest gap between UDP echo replies seen by a client probing every 5 ms.
    guest_downtime_ms: Option<f64>,
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
    error: Option<serde_json::Value>,
}

impl DemoReport {
    fn new(args: &DemoArgs) -> DemoReport {
        DemoReport {
            status: "failed",
            source: "hv1".into(),
            destination: "hv2".into(),
            memory_mib: args.memory_mib,
            accel: String::new(),
            total_ms: None,
            qemu_downtime_ms: None,
            guest_downtime_ms: None,
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
            error: None,
        }
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let mut report = DemoReport::new(&args);
    // Ctrl-C or SIGTERM drops the demo future: every QEMU process, tap and namespace it
    // created is owned by a value whose Drop removes it.
    let outcome = tokio::select! {
        r = demo(&args, &mut report) => r,
        _ = shutdown_signal() => {
            eprintln!("interrupted: cleaning up the lab");
            return Ok(ExitCode::from(130));
        }
    };
    if let Err(e) = &outcome {
        report.status = "failed";
        report.error = Some(error_json(e));
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    if let Err(e) = outcome {
        if !args.json {
            eprintln!("error[{}]: {e}\n  hint: {}", e.code(), e.hint());
        }
        return Ok(ExitCode::from(1));
    }
    Ok(if report.memory_verified {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

fn say(args: &DemoArgs, msg: &str) {
    if !args.json || std::io::stderr().is_terminal() {
        eprintln!("{msg}");
    }
}

async fn demo(args: &DemoArgs, report: &mut DemoReport) -> Result<(), LabError> {
    let config = GuestConfig {
        wss_mib: args.wss_mib,
        rate_mib_s: args.rate_mib_s,
        fill: args.fill,
        ..GuestConfig::default()
    };
    // Refuse bad input before anything is created.
    ferry_qemu::InstanceSpec::check_memory(args.memory_mib)?;
    config
        .validate(args.memory_mib)
        .map_err(|e| LabError::InvalidRequest(format!("guest: {e}")))?;
    let params = MigrationParams {
        bandwidth: args
            .bandwidth_mib_s
            .map(|m| Bandwidth::Limited(m.saturating_mul(1 << 20)))
            .unwrap_or(Bandwidth::Unlimited),
        downtime_limit_ms: args.downtime_ms,
        ..MigrationParams::default()
    };
    params.validate()?;
    let mut opts = LabOptions::new(&args.lab_name, 2);
    opts.image = args.image.options();
    opts.accel = args.accel.parse()?;

    say(
        args,
        "preparing: guest image, accelerator, lab hosts hv1 and hv2",
    );
    let lab = Lab::start(opts).await?;
    report.accel = lab.accel.name().into();
    say(
        args,
        &format!(
            "booting a {} MiB guest on hv1 ({}; writer {} MiB at {} MiB/s)",
            args.memory_mib,
            lab.accel.name(),
            args.wss_mib,
            args.rate_mib_s
        ),
    );
    let req = GuestRequest {
        name: "demo-vm".into(),
        memory_mib: args.memory_mib,
        vcpus: 1,
        config,
    };
    let mut vm = lab.boot_guest("hv1", &req).await?;
    let result = migrate_and_measure(args, &lab, &mut vm, &params, report).await;
    lab.stop_guest(vm).await;
    result
}

async fn migrate_and_measure(
    args: &DemoArgs,
    lab: &Lab,
    vm: &mut LabVm,
    params: &MigrationParams,
    report: &mut DemoReport,
) -> Result<(), LabError> {
    let guest_err = |detail: String| LabError::Guest {
        name: vm.name.clone(),
        detail,
    };
    let echo_addr = SocketAddr::from((vm.ip, ECHO_PORT));
    let client_ns = lab.net.client_netns.clone();
    let (udp, mut tcp) = tokio::task::spawn_blocking(move || {
        let udp = udp_bind_in(&client_ns, "0.0.0.0:0".parse().expect("literal address"))?;
        let tcp = tcp_connect_in(&client_ns, echo_addr, Duration::from_secs(5))?;
        Ok::<_, std::io::Error>((udp, tcp))
    })
    .await
    .map_err(|e| guest_err(e.to_string()))?
    .map_err(|e| guest_err(format!("cannot reach the echo service at {echo_addr}: {e}")))?;
    tcp_echo_roundtrip(&mut tcp, b"before migration")
        .map_err(|e| guest_err(format!("TCP echo before migration: {e}")))?;
    let probe = EchoProbe::start(udp, echo_addr, Duration::from_millis(5))
        .map_err(|e| guest_err(format!("cannot start the echo probe: {e}")))?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    say(args, "migrating hv1 -> hv2");
    let bar = progress_bar(args.json && !std::io::stderr().is_terminal());
    let (_abort, signal) = AbortHandle::new();
    let mut observe = |p: &Progress| {
        bar.set_position(p.percent as u64);
        bar.set_message(format!(
            "{:<10} iter {:>2}  {:>7.1} MiB/s  {:>6} MiB left  ETA {}",
            p.phase.as_str(),
            p.iteration,
            p.throughput_bps / (1 << 20) as f64,
            p.remaining_bytes >> 20,
            p.eta_ms
                .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
        ));
    };
    let migrated = lab.migrate(vm, "hv2", params, &mut observe, signal).await;
    bar.finish_and_clear();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let echo = probe.stop();
    report.echo_sent = Some(echo.sent);
    report.echo_lost = Some(echo.lost);
    report.guest_downtime_ms = Some(echo.longest_gap_ms);
    let outcome = migrated?;
    report.status = "completed";
    report.total_ms = Some(outcome.source.total_time_ms);
    report.qemu_downtime_ms = Some(outcome.source.downtime_ms);
    report.bytes_transferred = Some(outcome.source.transferred_bytes);
    report.iterations = Some(outcome.source.iterations);
    let tcp_ok =
        tokio::task::spawn_blocking(move || tcp_echo_roundtrip(&mut tcp, b"after migration"))
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false);
    report.tcp_echo_survived = Some(tcp_ok);
    let gap = vm.heartbeat_gap();
    report.heartbeat_gap_ms = Some(gap.longest_gap.as_secs_f64() * 1000.0);
    report.heartbeat_continuous = Some(gap.continuous);
    say(args, "verifying guest memory on hv2");
    let verify = vm.verify(lab).await?;
    report.memory_pages_checked = Some(verify.checked);
    report.memory_errors = Some(verify.errors);
    report.memory_verified = verify.errors == 0 && verify.checked > 0;
    Ok(())
}

fn parse_fill(s: &str) -> Result<Fill, String> {
    match s {
        "pattern" => Ok(Fill::Pattern),
        "random" => Ok(Fill::Random),
        _ => Err(format!("'{s}' is not a fill; use pattern or random")),
    }
}

fn progress_bar(hidden: bool) -> ProgressBar {
    let bar = ProgressBar::new(100);
    if hidden {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("  [{bar:30}] {pos:>3}%  {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

fn print_report(r: &DemoReport) {
    let ms = |v: Option<u64>| v.map(|v| format!("{v} ms")).unwrap_or_else(|| "-".into());
    let fms = |v: Option<f64>| {
        v.map(|v| format!("{v:.1} ms"))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "\nFerry demo: {} -> {} ({} MiB guest, {})",
        r.source, r.destination, r.memory_mib, r.accel
    );
    println!("  status                   {}", r.status);
    println!("  total time               {}", ms(r.total_ms));
    println!("  QEMU downtime            {}", ms(r.qemu_downtime_ms));
    println!(
        "  guest-observed downtime  {} (UDP echo every 5 ms; {} of {} lost)",
        fms(r.guest_downtime_ms),
        r.echo_lost.unwrap_or(0),
        r.echo_sent.unwrap_or(0)
    );
    println!(
        "  longest heartbeat gap    {} (counter continuous: {})",
        fms(r.heartbeat_gap_ms),
        r.heartbeat_continuous
            .map(|c| if c { "yes" } else { "NO" })
            .unwrap_or("-")
    );
    println!(
        "  TCP echo connection      {}",
        r.tcp_echo_survived
            .map(|c| if c { "survived" } else { "BROKEN" })
            .unwrap_or("-")
    );
    println!(
        "  transferred              {}",
        r.bytes_transferred
            .map(|b| format!("{:.1} MiB", b as f64 / (1 << 20) as f64))
            .unwrap_or_else(|| "-".into())
    );
    println!(
        "  iterations               {}",
        r.iterations
            .map(|i| i.to_string())
            .unwrap_or_else(|| "-".into())
    );
    println!(
        "  memory verification      {} ({} pages checked, {} errors)",
        if r.memory_verified { "OK" } else { "FAILED" },
        r.memory_pages_checked.unwrap_or(0),
        r.memory_errors
            .map(|e| e.to_string())
            .unwrap_or_else(|| "-".into())
    );
}
