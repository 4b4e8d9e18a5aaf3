//! `ferry bench --debian`: how long a real guest (the Debian 12 image of `ferry image build
//! --debian`) takes to boot under the lab's accelerator, and what a live migration of it on
//! shared storage costs, measured through the real server and agents.
//!
//! The policy matrix (lib.rs) drives QEMU directly with lab guests Ferry built. This scenario is
//! the other half of issue 9's promise: a guest booting from its own disk through SeaBIOS, seen
//! only through the console and qemu-guest-agent, moved by `POST /v1/migrations` with its disk
//! staying on the datastore both hosts share. Per run:
//!
//! 1. the instance is created (the image copied onto the shared datastore) and started; boot
//!    times are taken from the start request to the first console line, the kernel's banner,
//!    the login prompt (from QEMU's serial log) and the first `guest-ping` answer;
//! 2. the writer of `ferry_lab::debian_guest` runs in the guest: a shell loop that reads the
//!    clock, prints `ferry-hb SEQ 0` on the console, appends `SEQ SECONDS.NANOS` to a file,
//!    `sync`s and sleeps 20 ms;
//! 3. hv1 -> hv2 through the API; QEMU's figures come from the job's stats; afterwards the file
//!    is read back through the agent: no sequence number may be missing, and the longest gap
//!    between consecutive timestamps is what the guest's own clock saw; the console lines give
//!    the same gap on the host's clock (the guest's clock stops while QEMU pauses it, so only
//!    the host's clock sees the pause), and `guest-get-time` before and after tells how long
//!    the guest was really stopped;
//! 4. a clean stop through the guest agent, then delete (which removes the disk copy).
//!
//! Everything lives in a [`LocalCluster`]: on an error, Ctrl-C or SIGTERM the cluster is dropped,
//! which removes its namespaces (and with them every QEMU and tap) and its directory (the
//! shared datastore with the disk copies).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_api::instances::Instance;
use ferry_api::migrations::{MigrationOptions, MigrationState};
use ferry_lab::debian_guest::{self, sh, WriterLog};
use ferry_lab::debian_image::{ensure_debian_image, DebianImage, DebianImageOptions};
use ferry_lab::image::ensure_image;
use ferry_lab::image::ImageOptions;
use ferry_lab::instance::debian_instance;
use ferry_lab::serial::{heartbeat_gap, HostBeats, SerialMonitor};
use ferry_qemu::MacAddr;
use ferry_qmp::GuestAgent;
use serde::Serialize;

use crate::error::{bail, BenchError, Context as _};
use crate::local_cluster::{newest_serial_log, LocalCluster};
use crate::{accel_choice, loadavg, median_f64, say, BenchArgs, Machine, Outcome};

/// The guest's memory, as issue 9 asks for the Debian guest.
const MEMORY_MIB: u32 = 512;
/// The lab (namespaces ferry-bench-debian-*): not the policy bench's, so both can run.
const LAB_NAME: &str = "bench-debian";
/// How long a boot may take to reach a working guest agent (TCG, busy 2-core machine).
const BOOT_BOUND: Duration = Duration::from_secs(300);
/// How long systemd may take after the agent answered to finish starting units.
const SETTLE_BOUND: Duration = Duration::from_secs(120);
/// The writer runs this long before the migration starts and after it ended, so the file has
/// a baseline on both hosts.
const WRITER_MARGIN: Duration = Duration::from_secs(3);

/// What one run measured. Times are milliseconds; `None` where the run did not get that far.
#[derive(Debug, Clone, Default, Serialize)]
struct DebianRun {
    run: usize,
    /// The migration completed, the writer's file has no hole, the guest shut down cleanly,
    /// nothing failed.
    ok: bool,
    error: Option<String>,
    /// `POST /v1/instances`: the image copied onto the shared datastore and the instance defined.
    create_ms: Option<u64>,
    boot: Boot,
    migration: Option<Move>,
    /// `POST /v1/instances/{id}/stop` until it answered (the guest powered off).
    stop_ms: Option<u64>,
    /// How the agent stopped it: `guest-agent` is a clean shutdown through qemu-guest-agent.
    stopped_by: Option<String>,
}

/// Boot times, from the moment the start request was sent.
#[derive(Debug, Clone, Default, Serialize)]
struct Boot {
    /// The start request's answer: the agent launched QEMU.
    start_call_ms: Option<u64>,
    /// The first complete line in QEMU's serial log.
    first_serial_line_ms: Option<u64>,
    /// That line (the bootloader's banner).
    first_serial_line: Option<String>,
    /// The kernel's banner (`Linux version`) on the console.
    kernel_ms: Option<u64>,
    /// The serial getty's `login:` prompt.
    login_prompt_ms: Option<u64>,
    /// The first answer to `guest-ping` (polled: one attempt at a time, retried every 250 ms).
    agent_ms: Option<u64>,
    /// `systemctl is-system-running` no longer says starting (polled through the agent).
    settled_ms: Option<u64>,
    /// What it said then: `running`, or `degraded` when a unit failed.
    system_state: Option<String>,
}

/// One live migration hv1 -> hv2 and what the writer saw.
#[derive(Debug, Clone, Default, Serialize)]
struct Move {
    /// `POST /v1/migrations` until the job ended, as the client saw it (pre-flight checks,
    /// dirty-rate measurement, destination start, copy, commit, source teardown).
    job_ms: u64,
    state: String,
    /// QEMU's `total-time` on the source.
    total_ms: Option<u64>,
    /// QEMU's `downtime`: how long QEMU had the guest stopped, by its own account.
    qemu_pause_ms: Option<u64>,
    /// QEMU's `transferred` bytes.
    bytes: Option<u64>,
    iterations: Option<u64>,
    /// The auto policy's plan.
    plan: Option<String>,
    /// The writer's file read back after the move.
    writer: Option<WriterLog>,
    /// The longest gap between consecutive console heartbeats, on the host's clock, across the
    /// source's and then the destination's serial port.
    host_clock_gap_ms: Option<f64>,
    /// Every heartbeat counter followed the one before (one lost line allowed).
    host_clock_heartbeats_continuous: Option<bool>,
    /// How far the guest's wall clock fell behind the host's across the move: the time the
    /// guest did not see pass, i.e. how long it was really stopped, from the source's stop to
    /// the destination's `cont` after the commit (its clock stops while QEMU pauses it). The
    /// clocks' drift measured over the writer's first seconds is taken out.
    guest_clock_lost_ms: Option<f64>,
    /// That drift: how fast the guest's clock runs against the host's (TCG's calibration),
    /// in parts per million; large values make `guest_clock_lost_ms` less certain.
    guest_clock_drift_ppm: Option<f64>,
}

/// Medians over the runs that got that far.
#[derive(Debug, Clone, Default, Serialize)]
struct Medians {
    first_serial_line_ms: Option<f64>,
    kernel_ms: Option<f64>,
    login_prompt_ms: Option<f64>,
    agent_ms: Option<f64>,
    total_ms: Option<f64>,
    qemu_pause_ms: Option<f64>,
    bytes: Option<f64>,
    guest_clock_gap_ms: Option<f64>,
    host_clock_gap_ms: Option<f64>,
    median_write_gap_ms: Option<f64>,
    guest_clock_lost_ms: Option<f64>,
    stop_ms: Option<f64>,
}

/// `--out DIR/debian.json`; `--json` prints the same on stdout.
#[derive(Debug, Serialize)]
struct DebianReport {
    #[serde(flatten)]
    machine: Machine,
    image: ImageInfo,
    /// `guest-get-osinfo`'s pretty name, from the first run that answered.
    guest_os: Option<String>,
    memory_mib: u32,
    runs: Vec<DebianRun>,
    median: Medians,
}

#[derive(Debug, Serialize)]
struct ImageInfo {
    path: PathBuf,
    id: String,
    kernel: String,
    file_mib: f64,
}

/// `ferry bench --debian`.
pub(super) async fn bench(args: &BenchArgs, image: &ImageOptions) -> Result<Outcome, BenchError> {
    let runs = args.runs.unwrap_or(3).max(1);
    // SAFETY: geteuid(2) cannot fail and has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the Debian bench creates network namespaces and builds its image: run it as root");
    }
    let choice = accel_choice(&args.accel)?;
    let lab_opts = image.clone();
    let cache_dir = lab_opts.cache_dir.clone();
    let deb_opts = DebianImageOptions {
        cache_dir: cache_dir.clone(),
        kernel_package: lab_opts.kernel_package.clone(),
        ..DebianImageOptions::default()
    };
    say("Debian image (built on first use, about 2 minutes; then cached)...");
    let (image, built) = tokio::task::spawn_blocking(move || ensure_debian_image(&deb_opts))
        .await?
        .map_err(|e| BenchError::Failed(format!("{e} (hint: {})", e.hint())))?;
    say(&format!(
        "  {} {} ({:.0} MiB, kernel {})",
        if built { "built" } else { "reused" },
        image.path.display(),
        image.file_bytes as f64 / 1048576.0,
        image.kernel_version
    ));
    // The accelerator probe boots the lab image (cached per boot of this machine), as the demo
    // does, so `auto` means the same here as everywhere else.
    let lab_image = tokio::task::spawn_blocking(move || ensure_image(&lab_opts))
        .await?
        .context("lab image for the accelerator probe")?
        .0;
    let accel = ferry_lab::choose_accel(
        choice,
        Path::new("qemu-system-x86_64"),
        &cache_dir,
        &lab_image,
    )
    .await?;
    let load_before = loadavg();
    say(&format!(
        "starting a server and agents on lab hosts hv1 and hv2 ({}; load {load_before})",
        accel.name()
    ));
    // The cache directory is a datastore of every host: an image given by path must be inside
    // one, and from there it is copied onto the shared datastore.
    let images = crate::local_cluster::images_datastore(&cache_dir)?;
    let cluster = LocalCluster::start(LAB_NAME, 2, accel.name(), vec![images]).await?;
    let mut guest_os = None;
    let mut results = Vec::new();
    for i in 1..=runs {
        say(&format!("run {i} of {runs}"));
        let run = one_run(&cluster, &image, i, &mut guest_os).await;
        say(&format!("  {}", run_line(&run)));
        results.push(run);
    }
    cluster.shutdown().await;

    let report = DebianReport {
        machine: Machine::after_runs(accel.name(), load_before),
        image: ImageInfo {
            path: image.path.clone(),
            id: image.id.clone(),
            kernel: image.kernel_version.clone(),
            file_mib: (image.file_bytes as f64 / 1048576.0 * 10.0).round() / 10.0,
        },
        guest_os,
        memory_mib: MEMORY_MIB,
        median: medians(&results),
        runs: results,
    };
    let table = markdown(&report);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    std::fs::write(
        args.out.join("debian.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("debian.md"), &table)?;
    eprintln!("\n{table}");
    eprintln!(
        "wrote {0}/debian.json and {0}/debian.md",
        args.out.display()
    );
    let json = match args.json {
        true => Some(serde_json::to_string_pretty(&report)?),
        false => None,
    };
    // Exit code 2 (a migration failed) when any run failed or lost a write.
    Ok(Outcome::new(report.runs.iter().all(|r| r.ok), json))
}

/// One run; never fails: what went wrong is in `error`, and the instance is removed anyway.
async fn one_run(
    cluster: &LocalCluster,
    image: &DebianImage,
    index: usize,
    guest_os: &mut Option<String>,
) -> DebianRun {
    let mut run = DebianRun {
        run: index,
        ..DebianRun::default()
    };
    let name = format!("debian-{index}");
    let created = Instant::now();
    let instance = match create(cluster, image, &name).await {
        Ok(i) => i,
        Err(e) => {
            run.error = Some(format!("create: {e:#}"));
            // A create that failed half-way removes what it made; one that timed out on the
            // client side may still have made the instance.
            remove(cluster, &name).await;
            return run;
        }
    };
    run.create_ms = Some(ms(created.elapsed()));
    match measure(cluster, &instance, &mut run, guest_os).await {
        Ok(()) => {
            let holes_free = run
                .migration
                .as_ref()
                .and_then(|m| m.writer.as_ref())
                .is_some_and(|w| w.writes > 0 && w.holes.is_empty());
            // A guest that ignored both its agent and the power button was powered off.
            let clean = matches!(run.stopped_by.as_deref(), Some("guest-agent" | "acpi"));
            run.ok = holes_free && clean;
            if !holes_free {
                run.error = Some("the writer's file is incomplete (see writer)".into());
            } else if !clean {
                run.error = Some(format!(
                    "the guest did not shut down by itself (stopped by {})",
                    run.stopped_by.as_deref().unwrap_or("?")
                ));
            }
        }
        Err(e) => run.error = Some(e.chain()),
    }
    remove(cluster, &name).await;
    run
}

/// The instance, defined on hv1 and not started: its disk is a copy of the image on the
/// shared datastore (deleted with it), booted by SeaBIOS.
async fn create(
    cluster: &LocalCluster,
    image: &DebianImage,
    name: &str,
) -> Result<Instance, BenchError> {
    let req = debian_instance(
        name,
        "hv1",
        image,
        LocalCluster::SHARED_DATASTORE,
        MEMORY_MIB,
        &MacAddr::for_nic(name, 0).to_string(),
        Some(cluster.debian_address()),
        false,
    );
    cluster.create_instance(&req).await
}

/// Boot, writer, migration, readback and stop of one instance.
async fn measure(
    cluster: &LocalCluster,
    vm: &Instance,
    run: &mut DebianRun,
    guest_os: &mut Option<String>,
) -> Result<(), BenchError> {
    // --- boot -------------------------------------------------------------------------------
    // A new instance: the first serial log that appears there is this boot's.
    let console_dir = cluster.console_dir(0, vm.id);
    let t0 = Instant::now();
    let console = tokio::spawn(watch_console(console_dir.clone(), t0, BOOT_BOUND));
    let _: Instance = cluster
        .api
        .post(&format!("/v1/instances/{}/start", vm.id), &())
        .await?;
    run.boot.start_call_ms = Some(ms(t0.elapsed()));
    let agent = GuestAgent::new(cluster.guest_agent_socket(0, vm.id));
    let ready = agent.wait_ready(BOOT_BOUND).await;
    let agent_at = t0.elapsed();
    let marks = console.await.unwrap_or_default();
    run.boot.first_serial_line_ms = marks.first_line.map(ms);
    run.boot.first_serial_line = marks.first_line_text;
    run.boot.kernel_ms = marks.kernel.map(ms);
    run.boot.login_prompt_ms = marks.login.map(ms);
    ready.with_context(|| {
        format!(
            "no answer from the guest agent within {} s; console: {}",
            BOOT_BOUND.as_secs(),
            tail_of(&console_dir)
        )
    })?;
    run.boot.agent_ms = Some(ms(agent_at));
    if guest_os.is_none() {
        *guest_os = agent.get_osinfo().await.ok().and_then(|o| o.pretty_name);
    }
    // Migrating a guest that is still starting units would measure systemd, not the move.
    let deadline = Instant::now() + SETTLE_BOUND;
    loop {
        let state = sh(&agent, "systemctl is-system-running || true").await?;
        let state = state.trim().to_string();
        if !matches!(state.as_str(), "starting" | "initializing") || Instant::now() > deadline {
            run.boot.settled_ms = Some(ms(t0.elapsed()));
            run.boot.system_state = Some(state);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // --- writer -----------------------------------------------------------------------------
    let source_serial =
        SerialMonitor::connect(&cluster.serial_socket(0, vm.id), Duration::from_secs(10))
            .await
            .context("cannot read the guest's console on hv1")?;
    let clock_start = clock_offset_ms(&agent).await?;
    debian_guest::start_writer(&agent).await?;
    tokio::time::sleep(WRITER_MARGIN).await;
    if source_serial.last_beat().is_none() {
        bail!(
            "the writer printed no line on the console within {} s",
            WRITER_MARGIN.as_secs()
        );
    }
    let clock_before = clock_offset_ms(&agent).await?;
    // QEMU serves the agent's channel to one client at a time; the host's agent must get it
    // on hv2 (for the clean stop), and this handle points at hv1's socket anyway.
    drop(agent);

    // --- migration --------------------------------------------------------------------------
    // The destination's console exists once its agent starts QEMU in incoming mode; the
    // reader attaches as soon as it does, well before switchover.
    let dest_socket = cluster.serial_socket(1, vm.id);
    let dest_serial = tokio::spawn(async move {
        SerialMonitor::connect(&dest_socket, Duration::from_secs(300)).await
    });
    let started = Instant::now();
    let m = cluster
        .create_migration_to_hv2(&vm.id.to_string(), &MigrationOptions::default())
        .await?;
    let m = ferry_api::follow::migration(&cluster.api, m.id, |_| {}).await?;
    let mut mv = Move {
        job_ms: ms(started.elapsed()),
        state: m.state.as_str().to_string(),
        plan: m.plan.as_ref().map(|p| p.plan.summary()),
        ..Move::default()
    };
    if let Some(s) = &m.stats {
        mv.total_ms = Some(s.total_ms);
        mv.qemu_pause_ms = Some(s.qemu_pause_ms);
        mv.bytes = Some(s.bytes_transferred);
        mv.iterations = Some(s.iterations);
    }
    if m.state != MigrationState::Completed {
        dest_serial.abort();
        run.migration = Some(mv);
        let why = m
            .error
            .map(|e| format!("{}: {}", e.code, e.message))
            .unwrap_or_default();
        bail!("the migration ended {}: {why}", m.state.as_str());
    }
    tokio::time::sleep(WRITER_MARGIN).await;
    // The source's QEMU has quit with the completed job: its port is read to the end.
    let source_beats = source_serial.finish(Duration::from_secs(5)).await;
    match dest_serial.await {
        Ok(Ok(dest)) => {
            let gap = heartbeat_gap(&[
                HostBeats::new("hv1", source_beats),
                HostBeats::new("hv2", dest.beats()),
            ]);
            mv.host_clock_gap_ms = Some(gap.longest_gap.as_secs_f64() * 1000.0);
            mv.host_clock_heartbeats_continuous = Some(gap.continuous);
        }
        _ => say("  (the destination's console could not be read: no host-clock gap)"),
    }

    // --- readback ---------------------------------------------------------------------------
    let agent = GuestAgent::new(cluster.guest_agent_socket(1, vm.id));
    agent
        .wait_ready(Duration::from_secs(60))
        .await
        .context("the guest agent did not answer on hv2")?;
    let clock_after = clock_offset_ms(&agent).await?;
    let (lost, drift) = clock_lost(&clock_start, &clock_before, &clock_after);
    mv.guest_clock_lost_ms = Some(lost);
    mv.guest_clock_drift_ppm = Some(drift * 1e6);
    // Read while the writer goes on: a last line caught half-written is left out.
    mv.writer = Some(
        debian_guest::read_writer(&agent)
            .await
            .context("reading the writer's log")?,
    );
    run.migration = Some(mv);
    drop(agent);

    // --- clean stop -------------------------------------------------------------------------
    // The host's agent shuts a guest down through qemu-guest-agent only once its own poller
    // (every 10 s) has heard that agent on this host; before that it would press ACPI's power
    // button.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let i: Instance = cluster.api.get(&format!("/v1/instances/{}", vm.id)).await?;
        if (i.host == "hv2" && i.guest.is_some()) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let stopping = Instant::now();
    let _: Instance = cluster
        .api
        .clone()
        .with_timeout(Duration::from_secs(90))
        .post(&format!("/v1/instances/{}/stop?timeout_s=45", vm.id), &())
        .await?;
    run.stop_ms = Some(ms(stopping.elapsed()));
    run.stopped_by = stopped_by(cluster, &vm.name).await;
    Ok(())
}

/// Stops (forced: after a failure the guest's state is unknown) and deletes an instance,
/// quietly: both are harmless when there is nothing to do, and the cluster's teardown
/// removes whatever this leaves.
pub(super) async fn remove(cluster: &LocalCluster, name: &str) {
    let client = cluster.api.clone().with_timeout(Duration::from_secs(90));
    let i: Result<Instance, _> = client.get(&format!("/v1/instances/{name}")).await;
    let Ok(i) = i else { return };
    if i.state != ferry_api::instances::InstanceState::Stopped {
        let _: Result<Instance, _> = client
            .post(&format!("/v1/instances/{name}/stop?force=true"), &())
            .await;
    }
    let deleted: Result<serde_json::Value, _> =
        client.delete(&format!("/v1/instances/{name}")).await;
    if let Err(e) = deleted {
        say(&format!("  could not delete {name}: {e}"));
    }
}

/// The newest stop of `name` in the audit log says how the guest went down.
async fn stopped_by(cluster: &LocalCluster, name: &str) -> Option<String> {
    let audit: Vec<serde_json::Value> = cluster.api.get("/v1/audit").await.ok()?;
    audit
        .iter()
        .find(|e| e["action"] == "instance.stop" && e["target"] == name)
        .and_then(|e| e["detail"]["stopped_by"].as_str().map(str::to_string))
}

/// One comparison of the guest's wall clock with the host's.
#[derive(Debug, Clone, Copy)]
struct ClockReading {
    /// Host wall clock, ms since 1970.
    host_ms: f64,
    /// Host minus guest, ms.
    offset_ms: f64,
}

impl ClockReading {
    /// How much the offset grows per ms of host time since `earlier`: the guest clock's rate
    /// error (0 when the readings are too close to tell).
    fn drift(&self, earlier: &ClockReading) -> f64 {
        let span = self.host_ms - earlier.host_ms;
        if span < 500.0 {
            return 0.0;
        }
        (self.offset_ms - earlier.offset_ms) / span
    }
}

/// How many ms the guest's clock fell behind between `before` and `after`, with the drift
/// measured from `start` to `before` taken out; and that drift (ms per ms).
fn clock_lost(start: &ClockReading, before: &ClockReading, after: &ClockReading) -> (f64, f64) {
    let drift = before.drift(start);
    let lost = after.offset_ms - before.offset_ms - drift * (after.host_ms - before.host_ms);
    (lost, drift)
}

/// Host wall clock minus the guest's (`guest-get-time`). Of three readings the one with the
/// shortest round trip is kept and taken at the round trip's midpoint: the reply's delay is
/// otherwise counted as clock offset.
async fn clock_offset_ms(agent: &GuestAgent) -> Result<ClockReading, BenchError> {
    let mut best: Option<(f64, ClockReading)> = None;
    for _ in 0..3 {
        let before = unix_ms();
        let guest_ns = agent
            .execute_raw("guest-get-time", None)
            .await
            .context("guest-get-time")?
            .as_i64()
            .context("guest-get-time answered no number")?;
        let after = unix_ms();
        let rtt = after - before;
        let host_ms = (before + after) / 2.0;
        let reading = ClockReading {
            host_ms,
            offset_ms: host_ms - guest_ns as f64 / 1e6,
        };
        if best.is_none_or(|(r, _)| rtt < r) {
            best = Some((rtt, reading));
        }
    }
    best.map(|(_, r)| r).context("no clock reading")
}

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        * 1000.0
}

/// When the console first showed each boot milestone, from `t0`.
#[derive(Debug, Default)]
struct ConsoleMarks {
    first_line: Option<Duration>,
    first_line_text: Option<String>,
    kernel: Option<Duration>,
    login: Option<Duration>,
}

/// Follows QEMU's serial log (every 10 ms) until the login prompt or `within`. The log, not
/// the socket: QEMU writes it from its first byte, while a socket reader could attach after
/// the firmware and the bootloader have printed.
async fn watch_console(dir: PathBuf, t0: Instant, within: Duration) -> ConsoleMarks {
    let mut marks = ConsoleMarks::default();
    let mut seen = Vec::new();
    while t0.elapsed() < within {
        let Some(path) = newest_serial_log(&dir) else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if let Ok(bytes) = tokio::fs::read(&path).await {
            if bytes.len() > seen.len() {
                seen = bytes;
                let at = t0.elapsed();
                let text = String::from_utf8_lossy(&seen);
                let complete_line = |l: &&str| l.ends_with('\n') && !l.trim().is_empty();
                if marks.first_line.is_none() {
                    if let Some(line) = text.split_inclusive('\n').find(complete_line) {
                        marks.first_line = Some(at);
                        marks.first_line_text = Some(line.trim().chars().take(100).collect());
                    }
                }
                if marks.kernel.is_none() && text.contains("Linux version") {
                    marks.kernel = Some(at);
                }
                if marks.login.is_none() && text.contains("login:") {
                    marks.login = Some(at);
                    return marks;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    marks
}

/// The last console lines (of the newest serial log in `dir`), for an error message.
fn tail_of(dir: &Path) -> String {
    let Some(path) = newest_serial_log(dir) else {
        return String::new();
    };
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn medians(runs: &[DebianRun]) -> Medians {
    let med =
        |f: &dyn Fn(&DebianRun) -> Option<f64>| median_f64(runs.iter().filter_map(f).collect());
    let mv = |r: &DebianRun| {
        r.migration
            .as_ref()
            .filter(|m| m.state == MigrationState::Completed.as_str())
            .cloned()
    };
    let n = |v: Option<u64>| v.map(|v| v as f64);
    Medians {
        first_serial_line_ms: med(&|r| n(r.boot.first_serial_line_ms)),
        kernel_ms: med(&|r| n(r.boot.kernel_ms)),
        login_prompt_ms: med(&|r| n(r.boot.login_prompt_ms)),
        agent_ms: med(&|r| n(r.boot.agent_ms)),
        total_ms: med(&|r| mv(r).and_then(|m| n(m.total_ms))),
        qemu_pause_ms: med(&|r| mv(r).and_then(|m| n(m.qemu_pause_ms))),
        bytes: med(&|r| mv(r).and_then(|m| n(m.bytes))),
        guest_clock_gap_ms: med(&|r| mv(r).and_then(|m| m.writer).map(|w| w.longest_gap_ms)),
        host_clock_gap_ms: med(&|r| mv(r).and_then(|m| m.host_clock_gap_ms)),
        median_write_gap_ms: med(&|r| mv(r).and_then(|m| m.writer).map(|w| w.median_gap_ms)),
        guest_clock_lost_ms: med(&|r| mv(r).and_then(|m| m.guest_clock_lost_ms)),
        stop_ms: med(&|r| n(r.stop_ms)),
    }
}

fn run_line(r: &DebianRun) -> String {
    let mut s = format!(
        "boot: agent after {}; ",
        secs(r.boot.agent_ms.map(|v| v as f64))
    );
    match &r.migration {
        Some(m) => {
            s.push_str(&format!(
                "migration {} in {} ms, QEMU's pause {} ms, {} MiB; writer: ",
                m.state,
                opt(m.total_ms),
                opt(m.qemu_pause_ms),
                m.bytes
                    .map(|b| format!("{:.0}", b as f64 / 1048576.0))
                    .unwrap_or("-".into())
            ));
            match &m.writer {
                Some(w) => s.push_str(&format!(
                    "{} lines, {} missing, longest gap {:.0} ms (guest clock), {} ms (host clock)",
                    w.writes,
                    w.lost(),
                    w.longest_gap_ms,
                    fopt(m.host_clock_gap_ms)
                )),
                None => s.push('-'),
            }
        }
        None => s.push_str("no migration"),
    }
    if let Some(by) = &r.stopped_by {
        s.push_str(&format!("; stopped by {by}"));
    }
    if let Some(e) = &r.error {
        s.push_str(&format!("; ERROR: {e}"));
    }
    s
}

fn opt(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn fopt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into())
}

fn secs(v: Option<f64>) -> String {
    v.map(|v| format!("{:.1} s", v / 1000.0))
        .unwrap_or_else(|| "-".into())
}

const HEADERS: [&str; 13] = [
    "run",
    ">first console line s",
    ">kernel s",
    ">login prompt s",
    ">agent answers s",
    ">QEMU total ms",
    ">QEMU's pause ms",
    ">guest clock lost ms",
    ">MiB sent",
    ">write gap, guest clock ms",
    ">write gap, host clock ms",
    ">write period ms",
    "writes",
];

fn markdown(report: &DebianReport) -> String {
    let s1 = |v: Option<f64>| {
        v.map(|v| format!("{:.1}", v / 1000.0))
            .unwrap_or("-".into())
    };
    let n = |v: Option<u64>| v.map(|v| v as f64);
    let mib = |v: Option<f64>| {
        v.map(|b| format!("{:.0}", b / 1048576.0))
            .unwrap_or("-".into())
    };
    let mut rows: Vec<Vec<String>> = report
        .runs
        .iter()
        .map(|r| {
            let m = r.migration.as_ref();
            let w = m.and_then(|m| m.writer.as_ref());
            vec![
                r.run.to_string(),
                s1(n(r.boot.first_serial_line_ms)),
                s1(n(r.boot.kernel_ms)),
                s1(n(r.boot.login_prompt_ms)),
                s1(n(r.boot.agent_ms)),
                opt(m.and_then(|m| m.total_ms)),
                opt(m.and_then(|m| m.qemu_pause_ms)),
                fopt(m.and_then(|m| m.guest_clock_lost_ms)),
                mib(n(m.and_then(|m| m.bytes))),
                fopt(w.map(|w| w.longest_gap_ms)),
                fopt(m.and_then(|m| m.host_clock_gap_ms)),
                fopt(w.map(|w| w.median_gap_ms)),
                match (w, &r.error) {
                    (Some(w), _) if w.holes.is_empty() => format!("{} lines, none lost", w.writes),
                    (Some(w), _) => format!(
                        "{} lines, {} MISSING (holes {:?})",
                        w.writes,
                        w.lost(),
                        w.holes
                    ),
                    (None, Some(e)) => format!("FAILED: {e}"),
                    (None, None) => "-".into(),
                },
            ]
        })
        .collect();
    let md = &report.median;
    rows.push(vec![
        "median".into(),
        s1(md.first_serial_line_ms),
        s1(md.kernel_ms),
        s1(md.login_prompt_ms),
        s1(md.agent_ms),
        fopt(md.total_ms),
        fopt(md.qemu_pause_ms),
        fopt(md.guest_clock_lost_ms),
        mib(md.bytes),
        fopt(md.guest_clock_gap_ms),
        fopt(md.host_clock_gap_ms),
        fopt(md.median_write_gap_ms),
        format!(
            "{} of {} runs ok",
            report.runs.iter().filter(|r| r.ok).count(),
            report.runs.len()
        ),
    ]);
    format!(
        "Command: `{}`\n\n{} MiB Debian guest ({}, kernel {}), accelerator {}, {}; {} CPUs, \
         load {} before, {} after.\n\n{}",
        report.machine.command,
        report.memory_mib,
        report.guest_os.as_deref().unwrap_or("Debian"),
        report.image.kernel,
        report.machine.accel,
        report.machine.qemu,
        report.machine.host_cpus,
        report.machine.load_before,
        report.machine.load_after,
        crate::render::markdown_table(&HEADERS, &rows)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_takes_runs_and_out_but_not_the_matrix_options() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
        };
        let b = parse(&["--debian", "--runs", "2", "--out", "/tmp/x", "--json"])
            .unwrap()
            .bench;
        assert!(b.debian && b.json);
        assert_eq!(b.runs, Some(2));
        for matrix in [
            &["--quick"][..],
            &["--sizes", "512"],
            &["--loads", "idle"],
            &["--configs", "virsh"],
            &["--link-mbit", "100"],
            &["--time-scale", "0.1"],
        ] {
            for mode in ["--debian", "--disks"] {
                let args: Vec<&str> = std::iter::once(mode)
                    .chain(matrix.iter().copied())
                    .collect();
                assert!(parse(&args).is_err(), "{args:?}");
            }
        }
        let d = parse(&["--disks", "--out", "/tmp/x"]).unwrap().bench;
        assert!(d.disks && d.runs.is_none(), "--disks defaults to one run");
        assert!(parse(&["--disks", "--debian"]).is_err());
    }

    #[test]
    fn the_guest_clock_loses_the_stop_and_its_drift_is_taken_out() {
        let at = |host_ms: f64, offset_ms: f64| ClockReading { host_ms, offset_ms };
        // The guest's clock runs 100 ppm slow (0.3 ms over the 3 s baseline), then loses 80 ms
        // across a move measured over 10 s (1 ms of which is drift).
        let (lost, drift) = clock_lost(&at(0.0, 5.0), &at(3000.0, 5.3), &at(13_000.0, 86.3));
        assert!((drift - 1e-4).abs() < 1e-12, "{drift}");
        assert!((lost - 80.0).abs() < 1e-9, "{lost}");
        // Readings too close together tell no drift.
        let (lost, drift) = clock_lost(&at(0.0, 5.0), &at(100.0, 6.0), &at(5000.0, 56.0));
        assert_eq!((lost, drift), (50.0, 0.0));
    }

    #[test]
    fn the_table_has_a_row_per_run_and_the_median() {
        let run = |i: usize, gap: f64| DebianRun {
            run: i,
            ok: true,
            boot: Boot {
                first_serial_line_ms: Some(900),
                agent_ms: Some(20_000 + i as u64),
                ..Boot::default()
            },
            migration: Some(Move {
                state: "completed".into(),
                total_ms: Some(3000),
                qemu_pause_ms: Some(20),
                bytes: Some(300 << 20),
                writer: Some(WriterLog {
                    writes: 100,
                    holes: vec![],
                    longest_gap_ms: gap,
                    longest_gap_after: 50,
                    median_gap_ms: 60.0,
                }),
                host_clock_gap_ms: Some(gap + 100.0),
                ..Move::default()
            }),
            stopped_by: Some("guest-agent".into()),
            ..DebianRun::default()
        };
        let runs = vec![run(1, 100.0), run(2, 300.0), run(3, 200.0)];
        let report = DebianReport {
            machine: Machine {
                command: "ferry bench --debian --runs 3".into(),
                accel: "tcg".into(),
                host_cpus: 2,
                qemu: "QEMU emulator version 10.0.0".into(),
                load_before: "1.00 1.00 1.00".into(),
                load_after: "2.00 1.00 1.00".into(),
            },
            image: ImageInfo {
                path: "/x.qcow2".into(),
                id: "abc".into(),
                kernel: "6.1.0".into(),
                file_mib: 139.0,
            },
            guest_os: Some("Debian GNU/Linux 12 (bookworm)".into()),
            memory_mib: 512,
            median: medians(&runs),
            runs,
        };
        assert_eq!(report.median.guest_clock_gap_ms, Some(200.0));
        assert_eq!(report.median.agent_ms, Some(20_002.0));
        let t = markdown(&report);
        assert!(
            t.starts_with("Command: `ferry bench --debian --runs 3`"),
            "{t}"
        );
        assert!(t.contains("| median |"), "{t}");
        assert!(t.contains("3 of 3 runs ok"), "{t}");
        assert!(t.contains("100 lines, none lost"), "{t}");
        assert_eq!(t.lines().filter(|l| l.starts_with('|')).count(), 2 + 3 + 1);
    }
}
