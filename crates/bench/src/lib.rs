//! `ferry bench`: the configurations operators use today against Ferry's auto policy, side by
//! side in one run, on real lab guests.
//!
//! Each cell boots a fresh guest on hv1, lets its writer run at the scenario's rate, and
//! live-migrates it to hv2 with one configuration, measuring what QEMU reports, what a client
//! probing the guest over UDP sees, and the bytes that crossed hv1's migration interface.
//! The raw TCP throughput of the same link is measured in the same run, so ratios compare
//! like with like on a shared, noisy machine.
//!
//! `--debian` ([`debian`]) measures instead the boot of the Debian guest and one
//! shared-storage live migration of it per run, through the real server and agents.
//!
//! `--disks` ([`disks`]) measures live migrations of a lab guest whose disk is on hv1's own
//! datastore, so it is copied live with the guest (block migration).
//!
//! The benches through the server run on a [`local_cluster::LocalCluster`] (the demo's too);
//! [`blocks`] times a block migration's disk copy and counts its bytes on the wire. The
//! `ferry` binary parses the arguments ([`BenchArgs`]), calls [`run`] and prints what it
//! returns.

pub mod blocks;
mod ceiling;
mod configs;
mod debian;
mod disks;
mod error;
pub mod local_cluster;
mod predict;
mod render;
mod start;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Args;
use ferry_lab::guest_client::{EchoProbe, GuestStatus};
use ferry_lab::guest_config::{Fill, GuestConfig, ECHO_PORT, KERNEL_RESERVE_MIB};
use ferry_lab::image::ImageOptions;
use ferry_lab::net::{tcp_throughput, udp_bind_in};
use ferry_lab::{GuestRequest, Lab, LabMigrateOptions, LabOptions, LabTls, LabVm};
use ferry_migrate::{plan, AbortHandle, SourceEvent};
use serde::Serialize;

use configs::{Config, Context};
pub use error::BenchError;
use error::{bail, Context as _};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The reduced matrix: one run per cell, 512 MiB, idle and 200 % scenarios, every
    /// configuration; well under ten minutes.
    #[arg(long)]
    quick: bool,
    /// Print the cells as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Runs per cell (the median is reported); default 3, with --disks 1.
    #[arg(long)]
    runs: Option<usize>,
    /// Instead of the policy matrix: boot the Debian guest (`ferry image build --debian`)
    /// under the lab's accelerator and live-migrate it hv1 -> hv2 on shared storage through
    /// the server, --runs times, with a disk writer inside; writes debian.json and debian.md.
    #[arg(long, conflicts_with_all = ["quick", "configs", "sizes", "loads", "link_mbit", "time_scale", "disks"])]
    debian: bool,
    /// Instead of the policy matrix: live-migrate a lab guest with a 1 GiB qcow2 disk on hv1's
    /// own datastore (64 MiB of it written) hv1 -> hv2 by block migration through the server,
    /// idle and writing, unlimited and capped; writes disks.json and disks.md.
    #[arg(long, conflicts_with_all = ["quick", "configs", "sizes", "loads", "link_mbit", "time_scale"])]
    disks: bool,
    /// Instead of the policy matrix: move an idle lab guest hv1 <-> hv2 through the server
    /// --runs times (default 20) and report the time from the request to the first bytes on
    /// the destination's migration interface (p50, p95, max); writes start.json and start.md.
    #[arg(long, conflicts_with_all = ["quick", "configs", "sizes", "loads", "link_mbit", "time_scale", "disks", "debian"])]
    start: bool,
    /// Only these configurations (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    configs: Vec<String>,
    /// Guest sizes in MiB (default 512 and 2048; 512 with --quick).
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<u32>,
    /// Only these loads: idle, 25, 100, 200 (writer rate in % of the link).
    #[arg(long, value_delimiter = ',', value_parser = parse_load)]
    loads: Vec<f64>,
    /// Rate of the shaped migration link for the writer scenarios, Mbit/s: a TCG guest cannot
    /// outwrite an unshaped link between namespaces, a real guest outwrites a real NIC.
    #[arg(long, default_value_t = 1000)]
    link_mbit: u64,
    /// Platforms' per-GiB budgets are multiplied by this in the lab (copying a lab guest takes
    /// seconds, not minutes).
    #[arg(long, default_value_t = 0.05)]
    time_scale: f64,
    /// Where bench.json, bench.md and remaining.svg (with --debian: debian.json and
    /// debian.md; with --disks: disks.json and disks.md) go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Accelerator: auto (probe), kvm or tcg.
    #[arg(long, env = "FERRY_ACCEL", default_value = "auto")]
    accel: String,
    /// Skip each scenario's paused migrations (the ceiling), to compare configurations in a
    /// shorter run; the ceiling ratio is then not reported.
    #[arg(long)]
    no_ceiling: bool,
}

/// A workload and the link it runs over.
#[derive(Debug, Clone, Serialize)]
struct Scenario {
    name: String,
    memory_mib: u32,
    fill: Fill,
    /// Writer rate as a share of the link's raw TCP throughput; 0 = filled, then idle.
    writer_share: f64,
    /// Over the shaped link (writer scenarios) or the unshaped one (idle scenarios).
    shaped: bool,
}

/// A `--loads` value as a writer share of the link.
fn parse_load(s: &str) -> Result<f64, String> {
    match s.trim_end_matches('%') {
        "idle" | "0" => Ok(0.0),
        "25" => Ok(0.25),
        "100" => Ok(1.0),
        "200" => Ok(2.0),
        _ => Err(format!("{s:?} is not a load (idle, 25, 100, 200)")),
    }
}

fn scenarios(quick: bool, sizes: &[u32], loads: &[f64]) -> Vec<Scenario> {
    let mut out = Vec::new();
    let sizes: &[u32] = match (sizes, quick) {
        ([], true) => &[512],
        ([], false) => &[512, 2048],
        (s, _) => s,
    };
    let shares: &[f64] = match (loads, quick) {
        ([], true) => &[0.0, 2.0],
        ([], false) => &[0.0, 0.25, 1.0, 2.0],
        (l, _) => l,
    };
    for &memory_mib in sizes {
        for &share in shares {
            let fills: &[Fill] = if quick && share > 0.0 {
                &[Fill::Pattern]
            } else if quick {
                &[Fill::Random]
            } else {
                &[Fill::Pattern, Fill::Random]
            };
            for &fill in fills {
                let load = if share == 0.0 {
                    "idle".to_string()
                } else {
                    format!("{:.0}%", share * 100.0)
                };
                out.push(Scenario {
                    name: format!("{memory_mib}M {load} {}", fill.as_str()),
                    memory_mib,
                    fill,
                    writer_share: share,
                    shaped: share > 0.0,
                });
            }
        }
    }
    out
}

/// One migration of one cell.
#[derive(Debug, Clone, Serialize)]
struct Run {
    converged: bool,
    verified: bool,
    total_ms: Option<u64>,
    qemu_downtime_ms: Option<u64>,
    guest_downtime_ms: Option<f64>,
    bytes_on_wire: u64,
    nonzero_ram_bytes: Option<u64>,
    /// The guest's writer in the second before the migration (what it does unhindered)...
    writer_mib_s: f64,
    /// ...and from just before `migrate` to just after it returned, by the guest's own count
    /// of page writes: what throttling (or post-copy's page faults) left of it. `None` when
    /// the guest did not answer.
    writer_during_mib_s: Option<f64>,
    /// The highest vCPU throttle auto-converge reached (QEMU's `cpu-throttle-percentage`).
    max_throttle_pct: Option<u64>,
    dirty_rate_mib_s: Option<f64>,
    plan: Option<String>,
    decisions: Vec<String>,
    error: Option<String>,
    /// (seconds, MiB remaining).
    remaining: Vec<(f64, f64)>,
    /// What the plan and the controller predicted.
    prediction: predict::Predicted,
    /// What QEMU got through per second (`ferry_migrate::plan::observed_rate`), for the
    /// migrations the server would learn from (completed, no bandwidth cap).
    learned_from_bps: Option<f64>,
    /// How far QEMU's pause ran past its last pages (`plan::observed_switchover_ms`), from
    /// the same migrations.
    learned_switchover_ms: Option<f64>,
}

/// The median of a cell's runs, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
struct Cell {
    scenario: String,
    config: String,
    runs: usize,
    converged: bool,
    converged_runs: usize,
    /// Runs whose guest verified every page afterwards (a failed run verifies on the source).
    verified_runs: usize,
    total_ms: Option<u64>,
    qemu_downtime_ms: Option<u64>,
    guest_downtime_ms: Option<f64>,
    bytes_transferred: Option<u64>,
    bytes_per_nonzero_byte: Option<f64>,
    /// Non-zero RAM per second of total time, against the link's raw TCP throughput...
    link_ratio: Option<f64>,
    link_raw_tcp_mbit_s: f64,
    /// ...and against what QEMU sent for the same guest paused (the scenario's ceiling).
    ceiling_ratio: Option<f64>,
    ceiling_mbit_s: Option<f64>,
    budget_ms: Option<u64>,
    /// The writer before the migration and during it (see [`Run`]).
    writer_mib_s: f64,
    writer_during_mib_s: Option<f64>,
    max_throttle_pct: Option<u64>,
    /// Predicted against actual total time and QEMU pause (see [`predict`]).
    prediction: predict::CellPrediction,
    detail: Vec<Run>,
}

#[derive(Debug, Serialize)]
struct Report {
    /// The command, accelerator, QEMU and how busy the machine was.
    #[serde(flatten)]
    machine: Machine,
    link_mbit_shaped: u64,
    raw_tcp_unshaped_mbit_s: f64,
    raw_tcp_shaped_mbit_s: f64,
    time_scale: f64,
    /// Per scenario, the same guest migrated paused: what QEMU can send here.
    ceilings: Vec<ceiling::Ceiling>,
    cells: Vec<Cell>,
    /// The median absolute errors of the predictions across cells.
    prediction_errors: predict::Errors,
}

/// How a bench ended: the exit code (0, or 2 when a `--debian` or `--disks` run did not
/// complete and verify), and what it prints on stdout (`--json`), which the binary writes:
/// it knows what a closed stdout means.
#[derive(Debug)]
pub struct Outcome {
    pub exit_code: u8,
    pub stdout: Option<String>,
}

impl Outcome {
    fn new(ok: bool, json: Option<String>) -> Outcome {
        Outcome {
            exit_code: if ok { 0 } else { 2 },
            stdout: json,
        }
    }
}

/// Runs the bench `args` ask for, with lab guests built from `image`. The table goes to
/// stderr, the files to `--out`. Dropping the future (Ctrl-C) drops the lab or local cluster
/// with it, which removes every namespace, QEMU process and tap it made.
pub async fn run(args: &BenchArgs, image: &ImageOptions) -> Result<Outcome, BenchError> {
    if args.debian {
        debian::bench(args, image).await
    } else if args.disks {
        disks::bench(args, image).await
    } else if args.start {
        start::bench(args, image).await
    } else {
        bench(args, image).await
    }
}

/// The machine a bench through the server ran on, and how busy it was.
#[derive(Debug, Clone, Serialize)]
struct Machine {
    command: String,
    accel: String,
    /// CPUs this process may use (shared with whatever else runs on the machine).
    host_cpus: usize,
    qemu: String,
    /// /proc/loadavg before the first and after the last run: how busy the machine was.
    load_before: String,
    load_after: String,
}

impl Machine {
    /// After the last run, with the load read before the first.
    fn after_runs(accel: &str, load_before: String) -> Machine {
        Machine {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            accel: accel.into(),
            host_cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            qemu: qemu_version(),
            load_before,
            load_after: loadavg(),
        }
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn qemu_version() -> String {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// How a run ended, for its progress line.
fn outcome(converged: bool) -> &'static str {
    if converged {
        "converged"
    } else {
        "did not converge"
    }
}

/// `: ERROR` after a progress line, or nothing.
fn error_suffix(error: &Option<String>) -> String {
    error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
}

fn say(msg: &str) {
    eprintln!("{msg}");
}

async fn bench(args: &BenchArgs, image: &ImageOptions) -> Result<Outcome, BenchError> {
    let configs: Vec<Config> = if args.configs.is_empty() {
        configs::ALL.to_vec()
    } else {
        args.configs
            .iter()
            .map(|c| {
                Config::parse(c).ok_or_else(|| {
                    BenchError::Invalid(format!(
                        "unknown configuration {c:?}; use {}",
                        configs::ALL
                            .into_iter()
                            .chain(configs::EXPERIMENTS)
                            .map(Config::name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })
            })
            .collect::<Result<_, _>>()?
    };
    let runs = if args.quick {
        1
    } else {
        args.runs.unwrap_or(3).max(1)
    };
    if !(0.001..=1.0).contains(&args.time_scale) {
        return Err(BenchError::Invalid(
            "--time-scale must be between 0.001 and 1".into(),
        ));
    }
    ferry_lab::net::destroy_lab("bench");
    let load_before = loadavg();
    let mut opts = LabOptions::new("bench", 2);
    opts.image = image.clone();
    opts.accel = accel_choice(&args.accel)?;
    say("starting the lab (2 hosts)...");
    let lab = Lab::start(opts).await?;
    let hv1 = lab.net.host("hv1")?.clone();
    let hv2 = lab.net.host("hv2")?.clone();

    let measure_link = || {
        let (a, b, to) = (hv1.netns.clone(), hv2.netns.clone(), hv2.migration_addr);
        async move {
            tokio::task::spawn_blocking(move || {
                tcp_throughput(&a, &b, to, Duration::from_millis(1500))
            })
            .await?
            .context("raw TCP throughput between hv1 and hv2")
        }
    };
    let raw_unshaped = measure_link().await?;
    shape(&hv1.netns, Some(args.link_mbit))?;
    let raw_shaped = measure_link().await?;
    shape(&hv1.netns, None)?;
    say(&format!(
        "raw TCP hv1 -> hv2: {:.0} Mbit/s unshaped, {:.0} Mbit/s shaped to {} Mbit/s; accel {}",
        raw_unshaped * 8e-6,
        raw_shaped * 8e-6,
        args.link_mbit,
        lab.accel.name()
    ));

    let mut cells = Vec::new();
    if let Some(bad) = args.sizes.iter().find(|s| !(256..=8192).contains(*s)) {
        return Err(BenchError::Invalid(format!(
            "--sizes: {bad} MiB is outside 256..8192"
        )));
    }
    let mut ceilings = Vec::new();
    // What QEMU got through on each link (unshaped, shaped) in this run's completed,
    // uncapped migrations, learned as the server learns it per host pair; over TLS (as every
    // Ferry migration) and in the clear (the plain column) apart, since encryption is part of
    // what QEMU gets through.
    let mut learned_per_link: [[Option<f64>; 2]; 2] = [[None, None], [None, None]];
    let mut learned_switchover: [[Option<f64>; 2]; 2] = [[None, None], [None, None]];
    for sc in scenarios(args.quick, &args.sizes, &args.loads) {
        let link = if sc.shaped { raw_shaped } else { raw_unshaped };
        shape(&hv1.netns, sc.shaped.then_some(args.link_mbit))?;
        // The ceiling is taken before and after the scenario's cells (the machine is shared:
        // one paused migration can fall on a busy moment); the faster one counts.
        // They teach the learned rate nothing: the server only ever sees real jobs.
        let mut paused = Vec::new();
        if !args.no_ceiling {
            paused.push(ceiling::measure(&lab, &sc, link, "before").await?);
        }
        let mut scenario_runs = Vec::new();
        for &config in &configs {
            let tls = usize::from(config.encrypted());
            // What the source reached on the other link: with this link's own, the source's
            // fastest, as the server keeps it per source host.
            let other_link = learned_per_link[tls][usize::from(!sc.shaped)];
            let learned = &mut learned_per_link[tls][usize::from(sc.shaped)];
            let learned_switchover = &mut learned_switchover[tls][usize::from(sc.shaped)];
            let mut detail = Vec::new();
            let mut budget_ms = None;
            for i in 0..runs {
                say(&format!(
                    "{} / {} (run {} of {runs})...",
                    sc.name,
                    config.name(),
                    i + 1
                ));
                let ctx = Context {
                    ram_bytes: u64::from(sc.memory_mib) << 20,
                    link_bps: link,
                    dirty_rate_bps: None,
                    host_cpus: std::thread::available_parallelism()
                        .map(|n| n.get() as u32)
                        .unwrap_or(1),
                    guest_vcpus: 1,
                    time_scale: args.time_scale,
                    learned_rate_bps: *learned,
                    learned_switchover_ms: *learned_switchover,
                    source_rate_bps: [*learned, other_link]
                        .into_iter()
                        .flatten()
                        .reduce(f64::max),
                };
                let (run, budget) = run_cell(&lab, &sc, config, ctx).await?;
                if let Some(seen) = run.learned_from_bps {
                    *learned = Some(plan::learn_rate(*learned, seen));
                }
                if let Some(seen) = run.learned_switchover_ms {
                    *learned_switchover = Some(plan::learn_rate(*learned_switchover, seen));
                }
                budget_ms = budget;
                say(&format!("  {}", run_line(&run)));
                detail.push(run);
            }
            scenario_runs.push((config, budget_ms, detail));
        }
        if !args.no_ceiling {
            paused.push(ceiling::measure(&lab, &sc, link, "after").await?);
        }
        let best = ceiling::best(&paused).cloned();
        for (config, budget_ms, detail) in scenario_runs {
            cells.push(cell(&sc, config, link, best.as_ref(), budget_ms, detail));
        }
        ceilings.extend(paused);
    }
    shape(&hv1.netns, None)?;

    let report = Report {
        machine: Machine::after_runs(lab.accel.name(), load_before),
        link_mbit_shaped: args.link_mbit,
        raw_tcp_unshaped_mbit_s: raw_unshaped * 8e-6,
        raw_tcp_shaped_mbit_s: raw_shaped * 8e-6,
        time_scale: args.time_scale,
        ceilings,
        prediction_errors: predict::Errors::of(cells.iter().map(|c| &c.prediction)),
        cells,
    };
    drop(lab);
    write_outputs(args, &report)?;
    let json = match args.json {
        true => Some(serde_json::to_string_pretty(&report.cells)?),
        false => None,
    };
    Ok(Outcome::new(true, json))
}

/// `--accel`.
fn accel_choice(accel: &str) -> Result<ferry_qemu::AccelChoice, BenchError> {
    accel
        .parse()
        .map_err(|e| BenchError::Invalid(format!("--accel: {e}")))
}

fn run_line(r: &Run) -> String {
    format!(
        "{} in {} ms, pause {} ms (guest saw {}), {:.1} MiB on the wire{}",
        outcome(r.converged),
        r.total_ms.map(|v| v.to_string()).unwrap_or("-".into()),
        r.qemu_downtime_ms
            .map(|v| v.to_string())
            .unwrap_or("-".into()),
        r.guest_downtime_ms
            .map(|v| format!("{v:.0} ms"))
            .unwrap_or("-".into()),
        r.bytes_on_wire as f64 / 1048576.0,
        error_suffix(&r.error)
    )
}

/// Limits hv1's egress on the migration interface to `mbit` (token bucket), or removes it.
fn shape(netns: &str, mbit: Option<u64>) -> Result<(), BenchError> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, "tc", "qdisc"]);
    match mbit {
        Some(m) => {
            let rate = format!("{m}mbit");
            // A burst of ~4 ms at the rate and a 50 ms queue, like a switch port's.
            let burst = format!("{}", (m * 1_000_000 / 8 / 250).max(16 * 1024));
            cmd.args([
                "replace", "dev", "mig0", "root", "tbf", "rate", &rate, "burst", &burst, "latency",
                "50ms",
            ]);
        }
        None => {
            cmd.args(["del", "dev", "mig0", "root"]);
        }
    }
    let out = cmd.output().context("running tc")?;
    // Deleting a qdisc that is not there is fine.
    if !out.status.success() && mbit.is_some() {
        bail!("tc failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Bytes sent by hv1's migration interface so far.
fn tx_bytes(netns: &str) -> Result<u64, BenchError> {
    let out = Command::new("ip")
        .args(["-n", netns, "-s", "-j", "link", "show", "dev", "mig0"])
        .output()
        .context("running ip")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v.get(0)
        .and_then(|l| l.pointer("/stats64/tx/bytes"))
        .and_then(|b| b.as_u64())
        .context("no tx byte counter on mig0")
}

/// Boots the scenario's guest on hv1 with its writer at `rate_mib_s` and waits until the
/// first pass has filled the working set, so that every cell (and the ceiling) starts from the
/// same memory.
async fn boot_filled(
    lab: &Lab,
    sc: &Scenario,
    rate_mib_s: u32,
) -> Result<(LabVm, GuestStatus), BenchError> {
    let wss_mib = sc.memory_mib - KERNEL_RESERVE_MIB - 32;
    let req = GuestRequest {
        name: "bench".into(),
        memory_mib: sc.memory_mib,
        vcpus: 1,
        disks: vec![],
        config: GuestConfig {
            wss_mib,
            rate_mib_s,
            fill: sc.fill,
            ..GuestConfig::default()
        },
    };
    let vm = lab.boot_guest("hv1", &req).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut status = vm.status(lab).await?;
    while status.writes < status.pages {
        if Instant::now() > deadline {
            lab.stop_guest(vm).await;
            bail!("the guest did not fill its working set within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        status = vm.status(lab).await?;
    }
    Ok((vm, status))
}

/// The credentials of one encrypted lab migration to `to`, from a migration CA made for it,
/// as the server issues them for a job.
fn stream_tls(lab: &Lab, from: &str, to: &str) -> Result<LabTls, BenchError> {
    let dir = tempfile::tempdir()?;
    let pki = |e: ferry_pki::PkiError| BenchError::Failed(format!("migration credentials: {e}"));
    let ca = ferry_pki::ClusterCa::load_or_create(&dir.path().join("pki"), None).map_err(pki)?;
    let source = std::net::IpAddr::V4(lab.net.host(from)?.migration_addr);
    let destination = std::net::IpAddr::V4(lab.net.host(to)?.migration_addr);
    let c = ca
        .issue_migration_pair(uuid::Uuid::new_v4(), source, destination, Duration::ZERO)
        .map_err(pki)?;
    let halves = ferry_migrate::HalvesTls::from_pair(
        &c.ca_pem,
        (c.source.cert_pem, c.source.key_pem),
        (c.destination.cert_pem, c.destination.key_pem),
        &c.source_dn,
        destination,
    );
    Ok(LabTls {
        source: Some(halves.source),
        destination: Some(halves.destination),
    })
}

/// One migration of one cell; `ctx` is the scenario's (the dirty rate is measured here, for
/// Ferry auto).
async fn run_cell(
    lab: &Lab,
    sc: &Scenario,
    config: Config,
    ctx: Context,
) -> Result<(Run, Option<u64>), BenchError> {
    let link_bps = ctx.link_bps;
    let rate_mib_s = (link_bps * sc.writer_share / 1048576.0).round() as u32;
    let (mut vm, status) = boot_filled(lab, sc, rate_mib_s).await?;
    // Then measure what the writer does.
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = vm.status(lab).await?;
    let writer_mib_s =
        (after.writes - status.writes) as f64 * 4096.0 / 1048576.0 / t0.elapsed().as_secs_f64();

    let dirty_rate_bps = if config.is_ferry() {
        Some(ferry_migrate::dirty_rate::measure(vm.qemu.qmp(), Duration::from_secs(1)).await?)
    } else {
        None
    };
    let ctx = Context {
        dirty_rate_bps,
        guest_vcpus: vm.qemu.spec().vcpus,
        ..ctx
    };
    let (mut params, plan) = config.params(&ctx);
    // What the same plan says from the probe alone (no history on this link).
    let probe_only = ctx.learned_rate_bps.or(ctx.source_rate_bps).and_then(|_| {
        let alone = Context {
            learned_rate_bps: None,
            learned_switchover_ms: None,
            source_rate_bps: None,
            ..ctx
        };
        config.params(&alone).1
    });
    let mut prediction = predict::Predicted::planned(
        plan.as_ref(),
        probe_only.as_ref(),
        ctx.learned_rate_bps.is_some(),
    );
    params.sample_interval = Duration::from_millis(50);
    // Configurations without a budget would run forever on a guest they cannot move; the
    // bench gives up on them (not converged) after this long.
    let copy_once = ctx.ram_bytes as f64 / link_bps;
    let budget = params.completion_timeout.map(|b| b.as_millis() as u64);
    let cap = Duration::from_secs_f64((6.0 * copy_once).max(30.0))
        .max(params.completion_timeout.unwrap_or_default());
    if params.completion_timeout.is_none_or(|b| b > cap) {
        params.completion_timeout = Some(cap);
        params.timeout_action = ferry_migrate::TimeoutAction::Abort;
    }

    let echo = SocketAddr::from((vm.ip, ECHO_PORT));
    let ns = lab.net.client_netns.clone();
    let udp = tokio::task::spawn_blocking(move || udp_bind_in(&ns, "0.0.0.0:0".parse().unwrap()))
        .await??;
    let probe = EchoProbe::start(udp, echo, Duration::from_millis(5))?;
    let hv1 = lab.net.host("hv1")?.netns.clone();
    let tx_before = tx_bytes(&hv1)?;
    let writes_before = writes_now(lab, &vm).await;
    let mut max_throttle: Option<u64> = None;
    let mut remaining = Vec::new();
    let mut decisions = Vec::new();
    let (_abort, signal) = AbortHandle::new();
    let opts = LabMigrateOptions {
        tls: if config.encrypted() {
            stream_tls(lab, &vm.host, "hv2")?
        } else {
            LabTls::default()
        },
        copy_disks: false,
    };
    let result = lab
        .migrate_with(
            &mut vm,
            "hv2",
            &params,
            &opts,
            &mut |e| match e {
                SourceEvent::Progress(p) => {
                    prediction.saw(p.revision.as_ref());
                    max_throttle = max_throttle.max(p.cpu_throttle_percent);
                    remaining.push((
                        p.elapsed_ms as f64 / 1000.0,
                        p.remaining_bytes as f64 / 1048576.0,
                    ))
                }
                SourceEvent::Decision(d) => decisions.push(format!(
                    "{:.1} s: {}",
                    d.elapsed_ms as f64 / 1000.0,
                    d.reason
                )),
            },
            signal,
        )
        .await;
    let writes_after = writes_now(lab, &vm).await;
    let writer_during_mib_s = match (writes_before, writes_after) {
        (Some((t0, w0)), Some((t1, w1))) if t1 > t0 => {
            Some(w1.saturating_sub(w0) as f64 * 4096.0 / 1048576.0 / (t1 - t0).as_secs_f64())
        }
        _ => None,
    };
    // Let the probe see the guest answer again before it stops.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let echo_report = probe.stop();
    let bytes_on_wire = tx_bytes(&hv1)?.saturating_sub(tx_before);
    let mut run = Run {
        converged: false,
        verified: false,
        total_ms: None,
        qemu_downtime_ms: None,
        guest_downtime_ms: None,
        bytes_on_wire,
        nonzero_ram_bytes: None,
        writer_mib_s,
        writer_during_mib_s,
        max_throttle_pct: max_throttle,
        dirty_rate_mib_s: dirty_rate_bps.map(|d| d / 1048576.0),
        plan: plan.map(|p| p.summary()),
        decisions,
        error: None,
        remaining,
        prediction,
        learned_from_bps: None,
        learned_switchover_ms: None,
    };
    match result {
        Ok(out) => {
            let s = out.source;
            run.converged = true;
            // As the server: a capped migration shows what its cap let through, a compressed
            // one what compression made of the pages.
            if params.bandwidth == ferry_migrate::Bandwidth::Unlimited
                && params
                    .multifd_compression
                    .as_deref()
                    .is_none_or(|c| c == "none")
            {
                run.learned_from_bps = plan::observed_rate(&s);
                run.learned_switchover_ms = plan::observed_switchover_ms(&s);
            }
            // QEMU has been seen to report a total time of 0 for a completed multifd
            // migration; the sampled elapsed time is the fallback.
            run.total_ms = Some(if s.total_time_ms > 0 {
                s.total_time_ms
            } else {
                s.final_progress.elapsed_ms
            });
            run.qemu_downtime_ms = Some(s.downtime_ms);
            run.guest_downtime_ms = Some(echo_report.longest_gap_ms);
            run.nonzero_ram_bytes = Some(s.final_progress.total_bytes.saturating_sub(s.zero_bytes));
            // A guest throttled hard on the source may have missed the client's ARP
            // requests; give the neighbour entry time to recover before calling it lost.
            match vm.verify_within(lab, Duration::from_secs(60)).await {
                Ok(v) => run.verified = v.errors == 0,
                Err(_) => run.error = Some("the guest did not answer verify within 60 s".into()),
            }
        }
        Err(e) => run.error = Some(e.to_string()),
    }
    lab.stop_guest(vm).await;
    Ok((run, budget))
}

/// When the guest answered `status`, and its count of page writes then; `None` if it did not
/// answer within 5 s (a guest throttled hard, or just moved, may be slow to).
async fn writes_now(lab: &Lab, vm: &LabVm) -> Option<(Instant, u64)> {
    let addr = SocketAddr::from((vm.ip, ferry_lab::guest_config::CONTROL_PORT));
    let line = ferry_lab::guest_client::control_in_within(
        &lab.net.client_netns,
        addr,
        "status",
        Duration::from_secs(5),
    )
    .await
    .ok()?;
    let status = ferry_lab::guest_client::parse_status(&line).ok()?;
    Some((Instant::now(), status.writes))
}

fn median_u64(mut v: Vec<u64>) -> Option<u64> {
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

fn median_f64(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn cell(
    sc: &Scenario,
    config: Config,
    link_bps: f64,
    ceiling: Option<&ceiling::Ceiling>,
    budget_ms: Option<u64>,
    detail: Vec<Run>,
) -> Cell {
    let ok: Vec<&Run> = detail.iter().filter(|r| r.converged).collect();
    let converged_runs = ok.len();
    let per_nonzero = |r: &&Run| {
        r.nonzero_ram_bytes
            .filter(|n| *n > 0)
            .map(|n| r.bytes_on_wire as f64 / n as f64)
    };
    // Non-zero RAM per second of total time.
    let rate = |r: &&Run| match (r.nonzero_ram_bytes, r.total_ms) {
        (Some(n), Some(ms)) if ms > 0 => Some(n as f64 / (ms as f64 / 1000.0)),
        _ => None,
    };
    Cell {
        scenario: sc.name.clone(),
        config: config.name().into(),
        runs: detail.len(),
        converged: converged_runs * 2 > detail.len(),
        converged_runs,
        verified_runs: detail.iter().filter(|r| r.verified).count(),
        total_ms: median_u64(ok.iter().filter_map(|r| r.total_ms).collect()),
        qemu_downtime_ms: median_u64(ok.iter().filter_map(|r| r.qemu_downtime_ms).collect()),
        guest_downtime_ms: median_f64(ok.iter().filter_map(|r| r.guest_downtime_ms).collect()),
        bytes_transferred: median_u64(ok.iter().map(|r| r.bytes_on_wire).collect()),
        bytes_per_nonzero_byte: median_f64(ok.iter().filter_map(per_nonzero).collect()),
        link_ratio: median_f64(ok.iter().filter_map(rate).map(|r| r / link_bps).collect()),
        link_raw_tcp_mbit_s: link_bps * 8e-6,
        ceiling_ratio: median_f64(
            ok.iter()
                .filter_map(|r| ceiling::ratio(rate(r), ceiling))
                .collect(),
        ),
        ceiling_mbit_s: ceiling.and_then(|c| c.rate_mbit_s),
        budget_ms,
        writer_mib_s: median_f64(detail.iter().map(|r| r.writer_mib_s).collect()).unwrap_or(0.0),
        writer_during_mib_s: median_f64(
            detail
                .iter()
                .filter_map(|r| r.writer_during_mib_s)
                .collect(),
        ),
        max_throttle_pct: median_u64(detail.iter().filter_map(|r| r.max_throttle_pct).collect()),
        prediction: predict::CellPrediction::of(
            &ok.iter().map(|r| &r.prediction).collect::<Vec<_>>(),
            median_u64(ok.iter().filter_map(|r| r.total_ms).collect()),
            median_u64(ok.iter().filter_map(|r| r.qemu_downtime_ms).collect()),
        ),
        detail,
    }
}

fn markdown(report: &Report) -> String {
    let headers = [
        "scenario",
        "config",
        "converged",
        ">verified",
        ">total ms",
        ">QEMU pause ms",
        ">observed gap ms",
        ">MiB on wire",
        ">wire / non-zero RAM",
        ">link ratio",
        ">ceiling ratio",
        ">writer before MiB/s",
        ">writer during MiB/s",
        ">max throttle %",
    ];
    let opt = render::dash;
    let rows: Vec<Vec<String>> = report
        .cells
        .iter()
        .map(|c| {
            vec![
                c.scenario.clone(),
                c.config.clone(),
                format!(
                    "{} ({}/{})",
                    if c.converged { "yes" } else { "no" },
                    c.converged_runs,
                    c.runs
                ),
                format!("{}/{}", c.verified_runs, c.converged_runs),
                opt(c.total_ms.map(|v| v.to_string())),
                opt(c.qemu_downtime_ms.map(|v| v.to_string())),
                opt(c.guest_downtime_ms.map(|v| format!("{v:.0}"))),
                opt(c
                    .bytes_transferred
                    .map(|v| format!("{:.0}", v as f64 / 1048576.0))),
                opt(c.bytes_per_nonzero_byte.map(|v| format!("{v:.2}"))),
                opt(c.link_ratio.map(|v| format!("{v:.2}"))),
                opt(c.ceiling_ratio.map(|v| format!("{v:.2}"))),
                format!("{:.0}", c.writer_mib_s),
                opt(c.writer_during_mib_s.map(|v| format!("{v:.0}"))),
                opt(c.max_throttle_pct.map(|v| v.to_string())),
            ]
        })
        .collect();
    format!(
        "Command: `{}`\n\nAccelerator {}, {} host CPUs, {}; load {} before, {} after; raw TCP hv1 -> hv2 {:.0} Mbit/s unshaped (idle scenarios), {:.0} Mbit/s on the link shaped to {} Mbit/s (writer scenarios); platform budgets x {}.\n\n{}\n\
         QEMU pause: QEMU's `downtime` (with post-copy, the stop at the switch to post-copy); \
         observed gap: the longest gap between replies to a UDP echo probe sent to the guest every 5 ms; \
         writer before: the guest's page writes in the second before the migration; writer during: from just before `migrate` to just after it returned; \
         max throttle: the highest vCPU throttle auto-converge reached. \
         link ratio: non-zero RAM per second of total time, against the link's raw TCP throughput; \
         ceiling ratio: the same against the scenario's guest migrated paused in this run (below; the faster of the two).\n\n\
         Ceilings: each scenario's guest, filled the same way, paused (no guest CPU competing with QEMU) and \
         migrated the way QEMU sends fastest here (unlimited, a multifd channel per core), before and after \
         the scenario's cells.\n\n{}",
        report.machine.command,
        report.machine.accel,
        report.machine.host_cpus,
        report.machine.qemu,
        report.machine.load_before,
        report.machine.load_after,
        report.raw_tcp_unshaped_mbit_s,
        report.raw_tcp_shaped_mbit_s,
        report.link_mbit_shaped,
        report.time_scale,
        render::markdown_table(&headers, &rows),
        ceilings_table(&report.ceilings),
    ) + &format!(
        "\nPredictions: Ferry auto's plan (from the rate learned on this link in the run's earlier \
         completed, uncapped cells, else from the probe; and from the probe alone), and the controller's revision at the start of round 2 (every configuration), \
         against QEMU's total time and pause; errors in % of the actual figure.\n\n{}",
        predict::markdown(
            report.cells.iter().map(|c| (
                c.scenario.as_str(),
                c.config.as_str(),
                c.total_ms,
                c.qemu_downtime_ms,
                &c.prediction
            )),
            &report.prediction_errors
        )
    )
}

fn ceilings_table(ceilings: &[ceiling::Ceiling]) -> String {
    let headers = [
        "scenario",
        "when",
        ">total ms",
        ">QEMU pause ms",
        ">non-zero RAM MiB",
        ">Mbit/s of non-zero RAM",
        ">raw TCP ratio",
        "error",
    ];
    let opt = render::dash;
    let rows: Vec<Vec<String>> = ceilings
        .iter()
        .map(|c| {
            vec![
                c.scenario.clone(),
                c.when.clone(),
                opt(c.total_ms.map(|v| v.to_string())),
                opt(c.qemu_pause_ms.map(|v| v.to_string())),
                opt(c
                    .nonzero_ram_bytes
                    .map(|v| format!("{:.0}", v as f64 / 1048576.0))),
                opt(c.rate_mbit_s.map(|v| format!("{v:.0}"))),
                opt(c.raw_tcp_ratio.map(|v| format!("{v:.2}"))),
                c.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    render::markdown_table(&headers, &rows)
}

fn write_outputs(args: &BenchArgs, report: &Report) -> Result<(), BenchError> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let table = markdown(report);
    std::fs::write(
        args.out.join("bench.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    std::fs::write(args.out.join("bench.md"), &table)?;
    let mut panels: Vec<render::Panel> = Vec::new();
    for c in &report.cells {
        let series = render::Series {
            label: c.config.clone(),
            points: c
                .detail
                .first()
                .map(|r| r.remaining.clone())
                .unwrap_or_default(),
        };
        match panels.iter_mut().find(|p| p.title == c.scenario) {
            Some(p) => p.series.push(series),
            None => panels.push(render::Panel {
                title: c.scenario.clone(),
                series: vec![series],
            }),
        }
    }
    std::fs::write(
        args.out.join("remaining.svg"),
        render::remaining_memory_svg(
            "Remaining guest memory during migration (first run per cell)",
            &panels,
        ),
    )?;
    let out: &mut dyn std::io::Write = &mut std::io::stderr();
    writeln!(out, "\n{table}")?;
    if std::io::stderr().is_terminal() || !args.json {
        writeln!(
            out,
            "wrote {0}/bench.json, {0}/bench.md and {0}/remaining.svg",
            args.out.display()
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(converged: bool, total_ms: u64, wire: u64, nonzero: u64) -> Run {
        Run {
            converged,
            verified: converged,
            total_ms: converged.then_some(total_ms),
            qemu_downtime_ms: converged.then_some(10),
            guest_downtime_ms: converged.then_some(50.0),
            bytes_on_wire: wire,
            nonzero_ram_bytes: converged.then_some(nonzero),
            writer_mib_s: 0.0,
            writer_during_mib_s: None,
            max_throttle_pct: None,
            dirty_rate_mib_s: None,
            plan: None,
            decisions: Vec::new(),
            error: None,
            remaining: Vec::new(),
            prediction: predict::Predicted::default(),
            learned_from_bps: None,
            learned_switchover_ms: None,
        }
    }

    /// The trimmed cells of the table row starting with `start`.
    fn row<'a>(table: &'a str, start: &str) -> Vec<&'a str> {
        let line = table.lines().find(|l| l.starts_with(start));
        let line = line.unwrap_or_else(|| panic!("no row {start}: {table}"));
        let cells = line.trim().trim_matches('|').split('|');
        cells.map(str::trim).collect()
    }

    #[test]
    fn quick_matrix_is_idle_random_and_200_percent_at_512_mib() {
        let names: Vec<_> = scenarios(true, &[], &[])
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["512M idle random", "512M 200% pattern"]);
        let full = scenarios(false, &[], &[]);
        assert_eq!(full.len(), 16, "4 loads x 2 fills x 2 sizes");
        assert!(full.iter().all(|s| s.shaped == (s.writer_share > 0.0)));
        assert_eq!(scenarios(false, &[1024], &[]).len(), 8);
        let loads = [parse_load("100").unwrap(), parse_load("idle").unwrap()];
        let names: Vec<_> = scenarios(false, &[512], &loads)
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(
            names,
            [
                "512M 100% pattern",
                "512M 100% random",
                "512M idle pattern",
                "512M idle random"
            ]
        );
        assert!(parse_load("50").unwrap_err().contains("not a load"));
    }

    #[test]
    fn a_cell_takes_medians_of_converged_runs_and_ratios_against_the_link() {
        let sc = &scenarios(true, &[], &[])[0];
        // 1 GB of non-zero RAM in 1 s over a 2 GB/s link: ratio 0.5.
        let runs = vec![
            run(true, 1000, 1_100_000_000, 1_000_000_000),
            run(false, 0, 5, 0),
            run(true, 3000, 1_300_000_000, 1_000_000_000),
        ];
        // The paused guest moved 1.25 GB/s: the 1 s run reached 0.8 of that.
        let ceiling = ceiling::Ceiling {
            scenario: sc.name.clone(),
            when: "before".into(),
            total_ms: Some(800),
            nonzero_ram_bytes: Some(1_000_000_000),
            rate_bps: Some(1.25e9),
            rate_mbit_s: Some(10_000.0),
            raw_tcp_ratio: Some(0.625),
            ..Default::default()
        };
        let c = cell(sc, Config::FerryAuto, 2e9, Some(&ceiling), Some(9000), runs);
        assert!(c.converged);
        assert_eq!(c.converged_runs, 2);
        assert_eq!(c.total_ms, Some(3000), "upper median of 1000 and 3000");
        assert_eq!(c.link_ratio, Some(0.5));
        assert_eq!(c.ceiling_ratio, Some(0.8));
        assert_eq!(c.bytes_per_nonzero_byte, Some(1.3));
        let without = cell(
            sc,
            Config::Virsh,
            2e9,
            None,
            None,
            vec![run(true, 1000, 1, 1)],
        );
        assert_eq!(without.ceiling_ratio, None, "no ceiling, no ratio to it");
        let table = markdown(&Report {
            machine: Machine {
                command: "ferry bench".into(),
                accel: "tcg".into(),
                host_cpus: 2,
                qemu: "QEMU emulator version 10.0.2".into(),
                load_before: "1.00 1.00 1.00".into(),
                load_after: "2.00 1.50 1.00".into(),
            },
            link_mbit_shaped: 1000,
            raw_tcp_unshaped_mbit_s: 16000.0,
            raw_tcp_shaped_mbit_s: 950.0,
            time_scale: 0.05,
            ceilings: vec![ceiling],
            prediction_errors: predict::Errors::of([&c.prediction].into_iter()),
            cells: vec![c],
        });
        assert!(table.contains("| ferry-auto"), "{table}");
        assert!(
            table.contains("2 host CPUs, QEMU emulator version 10.0.2; load 1.00 1.00 1.00 before"),
            "{table}"
        );
        assert!(table.contains("yes (2/3)"), "{table}");
        assert!(table.contains(" 2/2 |"), "verified of converged: {table}");
        let cells = row(&table, "| 512M idle random | ferry-auto");
        assert_eq!(cells[9..11], ["0.50", "0.80"], "both ratios: {table}");
        let ceilings = table.split("Ceilings:").nth(1).unwrap();
        let cells = row(ceilings, "| 512M idle random");
        assert_eq!(cells[1..3], ["before", "800"], "{table}");
        assert_eq!(cells[5..7], ["10000", "0.62"], "{table}");
    }
}
