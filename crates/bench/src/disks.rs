//! `ferry bench --disks`: what a live migration with a local disk costs (block migration),
//! through the real server and agents, on a lab guest hv1 -> hv2.
//!
//! The guest has a 1 GiB qcow2 disk on hv1's own datastore and fills its first 64 MiB before
//! the move (the writer at full speed, then idle); in the `writes` load it then keeps
//! rewriting those blocks at [`WRITE_RATE`] blocks/s. Each load moves once `unlimited` and
//! once `capped` at [`CAP_MIB_S`] MiB/s (`MigrationOptions::bandwidth_mib_s`). The job is
//! followed as `ferry demo --storage local` follows it (blocks.rs): the disk copy is timed
//! from the progress samples, and the bytes hv2's migration interface receives after the
//! pre-flight checks are counted. After the move the guest reads back every block it wrote.
//!
//! The figures are named for what they measure: the wire counts memory and disk together
//! with their protocol headers; the allocated bytes are what the source's image file holds
//! (`qemu-img info` actual-size), not the guest's 64 MiB; the disk copy time is bounded by
//! the samples, so the report also says how far apart they were around the sync.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::local_cluster::{start_bench_cluster, BenchCluster, LocalCluster};
use ferry_api::instances::DiskRequest;
use ferry_api::migrations::{LogLine, Migration, MigrationOptions, MigrationState};
use ferry_lab::guest_client::{self, GuestStatus};
use ferry_lab::guest_config::{Fill, GuestConfig, GuestDisk, CONTROL_PORT};
use ferry_lab::image::{GuestImage, ImageOptions};
use serde::Serialize;

use crate::debian::remove;
use crate::error::{bail, BenchError, Context as _};
use crate::{error_suffix, outcome, render, say, BenchArgs, Machine, Outcome};

/// The lab (namespaces ferry-bench-disks-*): apart from the other benches'.
const LAB_NAME: &str = "bench-disks";
const VM: &str = "bench-disk";
const DISK_SERIAL: &str = "ferry-data";
/// The disk's virtual size.
const DISK_BYTES: u64 = 1 << 30;
/// 4 KiB blocks the guest writes from the start of the disk: 64 MiB.
const GUEST_BLOCKS: u64 = 16384;
/// The `writes` load: 4 KiB writes per second (8 MiB/s).
const WRITE_RATE: u32 = 2000;
/// The `capped` configuration's bandwidth.
const CAP_MIB_S: u64 = 32;
const MEMORY_MIB: u32 = 256;
const MEMORY_WSS_MIB: u32 = 32;
/// How long the guest may take to boot and to fill its blocks under TCG.
const FILL_BOUND: Duration = Duration::from_secs(300);

/// One live migration with a local disk, as measured.
#[derive(Debug, Clone, Default, Serialize)]
struct DiskRun {
    /// `idle` or `writes`.
    load: String,
    /// `unlimited` or `capped`.
    config: String,
    run: usize,
    /// The job's final state.
    state: String,
    /// The job completed.
    converged: bool,
    error: Option<String>,
    /// `MigrationOptions::bandwidth_mib_s`.
    cap_mib_s: Option<u64>,
    /// The guest's disk writes per second over the second before the job was created.
    guest_write_blocks_s: Option<f64>,
    /// Job created -> job finished, by the server's clock.
    total_ms: Option<u64>,
    /// First sample showing the disk copy -> first sample with every disk in sync (an upper
    /// bound: the sync came between two samples).
    disk_copy_ms: Option<u64>,
    /// How far apart the last sample before the sync and the first after it were.
    disk_copy_sample_gap_ms: Option<u64>,
    /// The job's sampling interval.
    sample_interval_ms: Option<u64>,
    /// Bytes hv2's migration interface received from the job leaving Preparing to its end:
    /// memory and disk together, headers included.
    wire_rx_bytes: Option<u64>,
    /// `qemu-img info` actual-size of the source's image just before the job.
    allocated_bytes: Option<u64>,
    disk_virtual_bytes: u64,
    /// The pre-flight probe of the migration link (check migration-port-reachable).
    link_probe_mbit_s: Option<f64>,
    /// QEMU's downtime: how long it had the guest paused.
    qemu_pause_ms: Option<u64>,
    /// QEMU's migration stream (`transferred`): guest memory and device state.
    memory_bytes: Option<u64>,
    /// The guest read back every block it wrote on hv2 without an error.
    disk_verified: Option<bool>,
    #[serde(flatten)]
    derived: Derived,
}

/// What the measured figures imply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
struct Derived {
    /// Wire bytes per allocated byte of the disk.
    wire_per_allocated: Option<f64>,
    /// (Wire bytes - QEMU's memory stream) per allocated byte: the disk's share of the wire,
    /// with the memory's headers still in it.
    wire_less_memory_per_allocated: Option<f64>,
    /// Allocated bytes / disk copy time.
    disk_copy_bytes_s: Option<f64>,
    /// That throughput as a share of the pre-flight probe's raw link rate.
    disk_copy_vs_link: Option<f64>,
    /// That throughput as a share of the cap (capped only).
    disk_copy_vs_cap: Option<f64>,
}

fn derive(r: &DiskRun) -> Derived {
    let allocated = r.allocated_bytes.filter(|a| *a > 0).map(|a| a as f64);
    let throughput = allocated
        .zip(r.disk_copy_ms.filter(|ms| *ms > 0))
        .map(|(a, ms)| a / (ms as f64 / 1000.0));
    Derived {
        wire_per_allocated: r.wire_rx_bytes.zip(allocated).map(|(w, a)| w as f64 / a),
        wire_less_memory_per_allocated: r
            .wire_rx_bytes
            .zip(r.memory_bytes)
            .zip(allocated)
            .map(|((w, m), a)| w.saturating_sub(m) as f64 / a),
        disk_copy_bytes_s: throughput,
        disk_copy_vs_link: throughput
            .zip(r.link_probe_mbit_s.filter(|l| *l > 0.0))
            .map(|(t, mbit)| t / (mbit * 1e6 / 8.0)),
        disk_copy_vs_cap: throughput
            .zip(r.cap_mib_s.filter(|c| *c > 0))
            .map(|(t, cap)| t / (cap as f64 * 1048576.0)),
    }
}

/// The guest's load during the move.
#[derive(Debug, Clone, Copy)]
enum Load {
    Idle,
    Writes,
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Load::Idle => "idle",
            Load::Writes => "writes",
        }
    }
}

/// `--out DIR/disks.json`; `--json` prints the same on stdout.
#[derive(Debug, Serialize)]
struct DisksReport {
    #[serde(flatten)]
    machine: Machine,
    memory_mib: u32,
    disk_virtual_bytes: u64,
    guest_blocks: u64,
    write_rate_blocks_s: u32,
    cap_mib_s: u64,
    runs: Vec<DiskRun>,
}

/// `ferry bench --disks`.
pub(super) async fn bench(args: &BenchArgs, image: &ImageOptions) -> Result<Outcome, BenchError> {
    let runs = args.runs.unwrap_or(1).max(1);
    let BenchCluster {
        cluster,
        image,
        accel,
        load_before,
    } = start_bench_cluster("disk", LAB_NAME, args, image).await?;
    let mut results = Vec::new();
    for load in [Load::Idle, Load::Writes] {
        for cap in [None, Some(CAP_MIB_S)] {
            for i in 1..=runs {
                let mut run = DiskRun {
                    load: load.name().into(),
                    config: config_name(cap).into(),
                    run: i,
                    cap_mib_s: cap,
                    disk_virtual_bytes: DISK_BYTES,
                    ..DiskRun::default()
                };
                say(&format!(
                    "{} / {} (run {i} of {runs})...",
                    run.load, run.config
                ));
                if let Err(e) = one_run(&cluster, &image, load, &mut run).await {
                    run.error = Some(e.chain());
                }
                remove(&cluster, VM).await;
                run.derived = derive(&run);
                say(&format!("  {}", run_line(&run)));
                results.push(run);
            }
        }
    }
    cluster.shutdown().await;

    let report = DisksReport {
        machine: Machine::after_runs(accel.name(), load_before),
        memory_mib: MEMORY_MIB,
        disk_virtual_bytes: DISK_BYTES,
        guest_blocks: GUEST_BLOCKS,
        write_rate_blocks_s: WRITE_RATE,
        cap_mib_s: CAP_MIB_S,
        runs: results,
    };
    let table = markdown(&report);
    write_outputs(&args.out, &report, &table)?;
    let json = match args.json {
        true => Some(serde_json::to_string_pretty(&report)?),
        false => None,
    };
    let ok = report
        .runs
        .iter()
        .all(|r| r.converged && r.disk_verified == Some(true));
    Ok(Outcome::new(ok, json))
}

fn config_name(cap: Option<u64>) -> &'static str {
    if cap.is_some() {
        "capped"
    } else {
        "unlimited"
    }
}

fn write_outputs(out: &Path, report: &DisksReport, table: &str) -> Result<(), BenchError> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(
        out.join("disks.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    std::fs::write(out.join("disks.md"), table)?;
    eprintln!("\n{table}");
    eprintln!("wrote {0}/disks.json and {0}/disks.md", out.display());
    Ok(())
}

/// Boots the guest, fills its blocks, sets its load, moves it and reads its disk back; the
/// caller removes the instance.
async fn one_run(
    cluster: &LocalCluster,
    image: &GuestImage,
    load: Load,
    run: &mut DiskRun,
) -> Result<(), BenchError> {
    let config = GuestConfig {
        wss_mib: MEMORY_WSS_MIB,
        rate_mib_s: 0,
        fill: Fill::Pattern,
        // Rate 0: every block once as fast as the disk goes, then idle.
        disk: Some(GuestDisk {
            rate_blocks_s: 0,
            blocks: Some(GUEST_BLOCKS),
            ..GuestDisk::new(DISK_SERIAL)
        }),
        ..GuestConfig::default()
    };
    config
        .validate(MEMORY_MIB)
        .map_err(|e| BenchError::Invalid(format!("guest: {e}")))?;
    let disk = DiskRequest {
        datastore: Some(LocalCluster::LOCAL_DATASTORE.into()),
        size_bytes: Some(DISK_BYTES),
        serial: Some(DISK_SERIAL.into()),
        ..DiskRequest::default()
    };
    let vm = cluster
        .create_lab_guest(image, config, MEMORY_MIB, VM, vec![disk])
        .await?;
    let ip = cluster.net.guest_addr(0);
    let client_ns = cluster.net.client_netns.clone();
    let control = SocketAddr::from((ip, CONTROL_PORT));
    guest_client::control_in_within(&client_ns, control, "status", FILL_BOUND)
        .await
        .with_context(|| format!("the guest at {ip} did not answer"))?;
    let status = || async {
        let reply = guest_client::control_in(&client_ns, control, "status").await?;
        Ok::<_, BenchError>(guest_client::parse_status(&reply)?)
    };
    let deadline = Instant::now() + FILL_BOUND;
    loop {
        let s = status().await?;
        let disk = s.disk.context("the guest reports no disk writer")?;
        if disk.blocks > 0 && disk.writes >= disk.blocks {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the guest wrote {} of {} blocks in {} s",
                disk.writes,
                disk.blocks,
                FILL_BOUND.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Load::Writes = load {
        let reply =
            guest_client::control_in(&client_ns, control, &format!("disk-rate {WRITE_RATE}"))
                .await?;
        if !reply.starts_with("ok") {
            bail!("disk-rate {WRITE_RATE}: {reply}");
        }
    }
    let before = status().await?;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = status().await?;
    run.guest_write_blocks_s = Some(
        disk_writes(&after).saturating_sub(disk_writes(&before)) as f64 / t.elapsed().as_secs_f64(),
    );
    let source_image = vm
        .spec
        .disks
        .first()
        .and_then(|d| cluster.image_path("hv1", &d.image))
        .context("the instance has no disk on hv1")?;
    run.allocated_bytes = allocated_bytes(&source_image).await;

    let options = MigrationOptions {
        bandwidth_mib_s: run.cap_mib_s,
        ..MigrationOptions::default()
    };
    let m = cluster.create_migration_to_hv2(VM, &options).await?;
    let (m, watched) = cluster.follow_counting(m.id).await?;
    // The source keeps its image after the move until the cleanup; the next run's disk has
    // the same name there.
    if m.copies.iter().any(|c| c.source_kept) {
        let _: Migration = cluster
            .api
            .post(&format!("/v1/migrations/{}/cleanup", m.id), &())
            .await?;
    }
    run.state = m.state.as_str().into();
    run.converged = m.state == MigrationState::Completed;
    run.total_ms = m
        .finished_at
        .map(|f| (f - m.created_at).num_milliseconds().max(0) as u64);
    let disk = m.copies.first().map(|c| c.disk.clone()).unwrap_or_default();
    run.disk_copy_ms = watched.clock.copy_ms(&disk);
    run.disk_copy_sample_gap_ms = watched.clock.sample_gap_ms();
    run.sample_interval_ms = m
        .plan
        .as_ref()
        .map(|p| p.params.sample_interval.as_millis() as u64);
    run.wire_rx_bytes = watched.rx_bytes;
    run.qemu_pause_ms = m.stats.as_ref().map(|s| s.qemu_pause_ms);
    run.memory_bytes = m.stats.as_ref().map(|s| s.bytes_transferred);
    let logs: Vec<LogLine> = cluster
        .api
        .get(&format!("/v1/migrations/{}/logs", m.id))
        .await?;
    run.link_probe_mbit_s = link_probe_mbit_s(&logs);
    if !run.converged {
        run.error = m.error.as_ref().map(|e| e.message.clone());
    }
    let reply = guest_client::control_in(&client_ns, control, "disk-verify").await?;
    let verify = guest_client::parse_disk_verify(&reply)?;
    run.disk_verified = Some(verify.ok && verify.blocks_checked > 0);
    Ok(())
}

fn disk_writes(s: &GuestStatus) -> u64 {
    s.disk.map_or(0, |d| d.writes)
}

/// What the image file holds on its host (`qemu-img info` actual-size), read while QEMU runs.
async fn allocated_bytes(path: &Path) -> Option<u64> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .await
        .ok()?;
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    info.get("actual-size")?.as_u64()
}

/// The raw link rate the pre-flight probe measured, from the job's log line
/// `check migration-port-reachable: pass: ..., N Mbit/s`.
fn link_probe_mbit_s(logs: &[LogLine]) -> Option<f64> {
    let line = logs
        .iter()
        .find(|l| l.message.starts_with("check migration-port-reachable:"))?;
    let before = line.message.split(" Mbit/s").next()?;
    before.rsplit([' ', ',']).next()?.parse().ok()
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

fn run_line(r: &DiskRun) -> String {
    format!(
        "{} ({}): total {}, disk copy {}, {} on the wire{}",
        outcome(r.converged),
        r.state,
        r.total_ms.map_or("-".into(), |v| format!("{v} ms")),
        r.disk_copy_ms.map_or("-".into(), |v| format!("{v} ms")),
        r.wire_rx_bytes
            .map_or("-".into(), |v| format!("{:.1} MiB", mib(v))),
        error_suffix(&r.error)
    )
}

fn markdown(report: &DisksReport) -> String {
    let headers = [
        "load",
        "config",
        "converged",
        ">total s",
        ">disk copy s",
        ">sample gap ms",
        ">wire MiB",
        ">allocated MiB",
        ">wire / allocated",
        ">(wire - memory) / allocated",
        ">copy MiB/s",
        ">copy / link",
        ">copy / cap",
        ">link Mbit/s",
        ">QEMU pause ms",
        ">memory MiB",
        "disk verified",
        ">guest writes/s",
    ];
    let opt = render::dash;
    let rows: Vec<Vec<String>> = report
        .runs
        .iter()
        .map(|r| {
            let d = &r.derived;
            vec![
                r.load.clone(),
                r.config.clone(),
                format!("{} ({})", if r.converged { "yes" } else { "no" }, r.state),
                opt(r.total_ms.map(|v| format!("{:.1}", v as f64 / 1000.0))),
                opt(r.disk_copy_ms.map(|v| format!("{:.2}", v as f64 / 1000.0))),
                opt(r.disk_copy_sample_gap_ms.map(|v| v.to_string())),
                opt(r.wire_rx_bytes.map(|v| format!("{:.1}", mib(v)))),
                opt(r.allocated_bytes.map(|v| format!("{:.1}", mib(v)))),
                opt(d.wire_per_allocated.map(|v| format!("{v:.2}"))),
                opt(d.wire_less_memory_per_allocated.map(|v| format!("{v:.2}"))),
                opt(d.disk_copy_bytes_s.map(|v| format!("{:.1}", v / 1048576.0))),
                opt(d.disk_copy_vs_link.map(|v| format!("{v:.3}"))),
                opt(d.disk_copy_vs_cap.map(|v| format!("{v:.2}"))),
                opt(r.link_probe_mbit_s.map(|v| format!("{v:.0}"))),
                opt(r.qemu_pause_ms.map(|v| v.to_string())),
                opt(r.memory_bytes.map(|v| format!("{:.1}", mib(v)))),
                opt(r
                    .disk_verified
                    .map(|v| if v { "yes" } else { "NO" }.to_string())),
                opt(r.guest_write_blocks_s.map(|v| format!("{v:.0}"))),
            ]
        })
        .collect();
    let intervals: Vec<String> = {
        let mut v: Vec<u64> = report
            .runs
            .iter()
            .filter_map(|r| r.sample_interval_ms)
            .collect();
        v.sort_unstable();
        v.dedup();
        v.iter().map(|ms| format!("{ms} ms")).collect()
    };
    format!(
        "Command: `{}`\n\n\
         Accelerator {}, {} host CPUs, {}; load {} before, {} after. A {} MiB lab guest with a \
         {} MiB qcow2 disk on hv1's own datastore, of which it filled the first {} MiB before \
         each move; `idle`: no more writes, `writes`: {} blocks of 4 KiB per second; \
         `capped`: bandwidth {} MiB/s, `unlimited`: none. Job samples every {}.\n\n{}\n\
         - total: job created -> job finished (server's clock: checks, copy, switchover, cleanup)\n\
         - disk copy: first sample showing the disk copy -> first sample with every disk in sync \
         (an upper bound; the sample gap is how far apart the samples around the sync were)\n\
         - wire: bytes hv2's migration interface received from the end of the pre-flight checks \
         to the end of the job, memory and disk together, headers included\n\
         - (wire - memory) / allocated: what of the wire was not QEMU's memory stream, per \
         allocated byte (the disk's copy with every header)\n\
         - allocated: `qemu-img info` actual-size of the source image just before the move\n\
         - copy MiB/s: allocated / disk copy (a lower bound, the copy time being an upper \
         one; a copy within one sample gap says little); copy / link: that against the pre-flight probe's \
         raw link rate (link Mbit/s); copy / cap: against the cap\n\
         - QEMU pause: QEMU's downtime; memory: QEMU's migration stream (transferred)\n\
         - disk verified: the guest read every block back on hv2 as its writes left it; \
         guest writes/s: its disk writes over the second before the job\n",
        report.machine.command,
        report.machine.accel,
        report.machine.host_cpus,
        report.machine.qemu,
        report.machine.load_before,
        report.machine.load_after,
        report.memory_mib,
        report.disk_virtual_bytes >> 20,
        (report.guest_blocks * 4096) >> 20,
        report.write_rate_blocks_s,
        report.cap_mib_s,
        if intervals.is_empty() {
            "-".into()
        } else {
            intervals.join(", ")
        },
        render::markdown_table(&headers, &rows)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn made_up() -> DiskRun {
        DiskRun {
            load: "writes".into(),
            config: "capped".into(),
            run: 1,
            state: "completed".into(),
            converged: true,
            cap_mib_s: Some(32),
            guest_write_blocks_s: Some(1990.0),
            total_ms: Some(9_500),
            disk_copy_ms: Some(4_000),
            disk_copy_sample_gap_ms: Some(250),
            sample_interval_ms: Some(250),
            wire_rx_bytes: Some(96 << 20),
            allocated_bytes: Some(64 << 20),
            disk_virtual_bytes: DISK_BYTES,
            link_probe_mbit_s: Some(1024.0),
            qemu_pause_ms: Some(40),
            memory_bytes: Some(20 << 20),
            disk_verified: Some(true),
            ..DiskRun::default()
        }
    }

    #[test]
    fn figures_of_a_run_are_ratios_of_what_it_measured() {
        let mut r = made_up();
        let d = derive(&r);
        // 96 MiB on the wire for 64 MiB allocated, 20 MiB of it memory.
        assert_eq!(d.wire_per_allocated, Some(1.5));
        assert_eq!(d.wire_less_memory_per_allocated, Some(76.0 / 64.0));
        // 64 MiB in 4 s: 16 MiB/s, over a 1024 Mbit/s = 128 MiB/s link and a 32 MiB/s cap.
        assert_eq!(d.disk_copy_bytes_s, Some(16.0 * 1048576.0));
        let link = d.disk_copy_vs_link.unwrap();
        assert!((link - 16.0 * 1048576.0 / 128e6).abs() < 1e-9, "{link}");
        assert_eq!(d.disk_copy_vs_cap, Some(0.5));
        r.cap_mib_s = None;
        r.disk_copy_ms = None;
        r.allocated_bytes = Some(0);
        assert_eq!(derive(&r), Derived::default(), "nothing without its inputs");
    }

    #[test]
    fn the_link_rate_comes_from_the_probe_check_in_the_job_log() {
        let line = |message: &str| LogLine {
            seq: 1,
            at: chrono::Utc::now(),
            level: "info".into(),
            message: message.into(),
        };
        let logs = [
            line("check storage: pass: disk0 copied live"),
            line("check migration-port-reachable: pass: the source reaches the destination's migration port, 0.05 ms round trip, 12345 Mbit/s"),
        ];
        assert_eq!(link_probe_mbit_s(&logs), Some(12345.0));
        assert_eq!(
            link_probe_mbit_s(&[line(
                "check migration-port-reachable: pass: the source reaches the destination's migration port"
            )]),
            None
        );
    }

    #[test]
    fn the_table_names_every_figure_and_shows_a_made_up_run() {
        let mut r = made_up();
        r.derived = derive(&r);
        let mut failed = made_up();
        failed.config = "unlimited".into();
        failed.converged = false;
        failed.state = "failed".into();
        failed.disk_copy_ms = None;
        failed.derived = derive(&failed);
        let report = DisksReport {
            machine: Machine {
                command: "ferry bench --disks".into(),
                accel: "tcg".into(),
                host_cpus: 2,
                qemu: "QEMU emulator version 8.2.2".into(),
                load_before: "1.00 1.00 1.00".into(),
                load_after: "2.00 1.50 1.00".into(),
            },
            memory_mib: MEMORY_MIB,
            disk_virtual_bytes: DISK_BYTES,
            guest_blocks: GUEST_BLOCKS,
            write_rate_blocks_s: WRITE_RATE,
            cap_mib_s: CAP_MIB_S,
            runs: vec![r, failed],
        };
        let md = markdown(&report);
        assert!(md.contains("Command: `ferry bench --disks`"), "{md}");
        assert!(md.contains("1024 MiB qcow2 disk"), "{md}");
        assert!(md.contains("first 64 MiB"), "{md}");
        assert!(md.contains("Job samples every 250 ms"), "{md}");
        for h in [
            "wire / allocated",
            "copy / link",
            "copy / cap",
            "QEMU pause ms",
        ] {
            assert!(md.contains(h), "{h}: {md}");
        }
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| writes")).collect();
        assert_eq!(rows.len(), 2, "{md}");
        assert!(rows[0].contains("yes (completed)"), "{}", rows[0]);
        assert!(
            rows[0].contains(" 1.50 |"),
            "wire per allocated: {}",
            rows[0]
        );
        assert!(rows[0].contains(" 16.0 |"), "copy MiB/s: {}", rows[0]);
        assert!(rows[0].contains(" 0.50 |"), "copy / cap: {}", rows[0]);
        assert!(rows[1].contains("no (failed)"), "{}", rows[1]);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["runs"][0]["wire_per_allocated"], 1.5);
    }
}
