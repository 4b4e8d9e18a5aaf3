//! `ferry bench --start`: how long an operator waits between asking for a live migration and
//! the first bytes of the guest's memory on the wire, for an idle lab guest, through the real
//! server and agents.
//!
//! The guest (256 MiB, 32 MiB of it written, then idle) moves hv1 -> hv2 -> hv1 ... with the
//! default options (auto policy) `--runs` times. Before each request a thread inside the
//! destination's namespace starts recording its migration interface's receive counter every
//! millisecond ([`ferry_lab::net::record_rx`]); the figure is the time from just before the
//! request to the moment that interface had received [`FIRST_BYTES`] more than when the
//! destination listened (so the checks' bandwidth probe, which crosses the same interface
//! earlier, does not count). It covers the pre-flight checks, the dirty-rate measurement,
//! starting the destination and starting the source: what the operator waits for.
//!
//! The first move in each direction measures the link (bandwidth probe) and the CPU models;
//! later ones reuse both (the server keeps a measured link for a while), so the report gives
//! the percentiles of every move and of the later ("warm") ones apart.

use std::time::{Duration, Instant};

use ferry_api::migrations::{CreateMigration, Migration, MigrationOptions, MigrationState};
use ferry_lab::guest_client;
use ferry_lab::guest_config::{Fill, GuestConfig, CONTROL_PORT};
use ferry_lab::image::ImageOptions;
use serde::Serialize;

use crate::debian::remove;
use crate::error::{BenchError, Context as _};
use crate::local_cluster::{start_bench_cluster, BenchCluster, LocalCluster};
use crate::{error_suffix, say, BenchArgs, Machine, Outcome};

/// The lab (namespaces ferry-bench-start-*): apart from the other benches'.
const LAB_NAME: &str = "bench-start";
const VM: &str = "bench-start";
const MEMORY_MIB: u32 = 256;
const WSS_MIB: u32 = 32;
/// Moves when `--runs` is not given.
const DEFAULT_RUNS: usize = 20;
/// Bytes on the destination's migration interface that mark the stream's start: more than
/// a connection's handshake and a stray probe, less than the first batch of pages.
pub const FIRST_BYTES: u64 = 64 << 10;
/// The target for the 95th percentile, to compare against.
const TARGET_P95_MS: u64 = 300;
/// How long one move may take before the bench gives up on it.
const MOVE_BOUND: Duration = Duration::from_secs(120);
/// How long the guest may take to boot under TCG.
const BOOT_BOUND: Duration = Duration::from_secs(300);

/// One move, as measured.
#[derive(Debug, Clone, Default, Serialize)]
struct StartRun {
    run: usize,
    from: String,
    to: String,
    /// The job's final state.
    state: String,
    error: Option<String>,
    /// Request sent -> [`FIRST_BYTES`] received on the destination's migration interface.
    request_to_first_bytes_ms: Option<f64>,
    /// The job created -> the server started the source, by the server's clock.
    created_to_migrating_ms: Option<i64>,
    /// The job created -> finished, by the server's clock.
    total_ms: Option<i64>,
    /// QEMU's own total time for the memory copy.
    qemu_total_ms: Option<u64>,
    /// QEMU's pause.
    qemu_pause_ms: Option<u64>,
    /// The destination's QEMU was started while the dirty rate was measured.
    destination_started_ahead: bool,
    /// The link was measured for this move (the first in each direction).
    link_probed: bool,
}

/// Percentiles of the request -> first bytes times.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Spread {
    moves: usize,
    p50_ms: Option<f64>,
    p95_ms: Option<f64>,
    max_ms: Option<f64>,
}

/// `--out DIR/start.json`; `--json` prints the same on stdout.
#[derive(Debug, Serialize)]
struct StartReport {
    #[serde(flatten)]
    machine: Machine,
    memory_mib: u32,
    wss_mib: u32,
    first_bytes: u64,
    target_p95_ms: u64,
    every_move: Spread,
    /// The moves that reused a measured link.
    warm_moves: Spread,
    runs: Vec<StartRun>,
}

/// `ferry bench --start`.
pub(super) async fn bench(args: &BenchArgs, image: &ImageOptions) -> Result<Outcome, BenchError> {
    let runs = args.runs.unwrap_or(DEFAULT_RUNS).max(2);
    let BenchCluster {
        cluster,
        image,
        accel,
        load_before,
    } = start_bench_cluster("start", LAB_NAME, args, image).await?;
    let result = moves(&cluster, &image, runs).await;
    remove(&cluster, VM).await;
    cluster.shutdown().await;
    let results = result?;

    let times = |warm: bool| -> Vec<f64> {
        results
            .iter()
            .filter(|r| !warm || !r.link_probed)
            .filter_map(|r| r.request_to_first_bytes_ms)
            .collect()
    };
    let report = StartReport {
        machine: Machine::after_runs(accel.name(), load_before),
        memory_mib: MEMORY_MIB,
        wss_mib: WSS_MIB,
        first_bytes: FIRST_BYTES,
        target_p95_ms: TARGET_P95_MS,
        every_move: spread(times(false)),
        warm_moves: spread(times(true)),
        runs: results,
    };
    let table = markdown(&report);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    std::fs::write(
        args.out.join("start.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("start.md"), &table)?;
    eprintln!("\n{table}");
    eprintln!("wrote {0}/start.json and {0}/start.md", args.out.display());
    let ok = report
        .runs
        .iter()
        .all(|r| r.state == "completed" && r.request_to_first_bytes_ms.is_some());
    let json = match args.json {
        true => Some(serde_json::to_string_pretty(&report)?),
        false => None,
    };
    Ok(Outcome::new(ok, json))
}

/// Boots the guest on hv1 and moves it back and forth `runs` times.
async fn moves(
    cluster: &LocalCluster,
    image: &ferry_lab::image::GuestImage,
    runs: usize,
) -> Result<Vec<StartRun>, BenchError> {
    let config = GuestConfig {
        wss_mib: WSS_MIB,
        rate_mib_s: 0,
        fill: Fill::Pattern,
        ..GuestConfig::default()
    };
    config
        .validate(MEMORY_MIB)
        .map_err(|e| BenchError::Invalid(format!("guest: {e}")))?;
    cluster
        .create_lab_guest(image, config, MEMORY_MIB, VM, Vec::new())
        .await?;
    let control = std::net::SocketAddr::from((cluster.net.guest_addr(0), CONTROL_PORT));
    guest_client::control_in_within(&cluster.net.client_netns, control, "status", BOOT_BOUND)
        .await
        .context("the guest did not answer")?;
    let mut out = Vec::new();
    let mut probed = std::collections::HashSet::new();
    for run in 1..=runs {
        let (from, to) = match run % 2 {
            1 => ("hv1", "hv2"),
            _ => ("hv2", "hv1"),
        };
        let mut r = StartRun {
            run,
            from: from.into(),
            to: to.into(),
            link_probed: probed.insert((from, to)),
            ..StartRun::default()
        };
        match one_move(cluster, to, &mut r).await {
            Ok(()) => {}
            Err(e) => r.error = Some(e.chain()),
        }
        say(&format!(
            "  move {run} {from} -> {to}: request -> first bytes {}{}",
            r.request_to_first_bytes_ms
                .map_or("-".into(), |ms| format!("{ms:.0} ms")),
            error_suffix(&r.error)
        ));
        let failed = r.state != "completed";
        out.push(r);
        if failed {
            break;
        }
    }
    Ok(out)
}

/// One move to `to`, recorded from `to`'s namespace.
async fn one_move(cluster: &LocalCluster, to: &str, r: &mut StartRun) -> Result<(), BenchError> {
    let netns = cluster.net.host(to)?.netns.clone();
    let recording =
        tokio::task::spawn_blocking(move || ferry_lab::net::record_rx(&netns, MOVE_BOUND))
            .await?
            .context("recording the destination's migration interface")?;
    let req = CreateMigration {
        instance: VM.into(),
        destination: Some(to.into()),
        options: MigrationOptions::default(),
        kind: None,
    };
    let (asked, asked_utc) = (Instant::now(), chrono::Utc::now());
    let m: Migration = cluster.api.post("/v1/migrations", &req).await?;
    let followed = tokio::time::timeout(
        MOVE_BOUND,
        ferry_api::follow::migration(&cluster.api, m.id, |_| {}),
    )
    .await;
    let trace = tokio::task::spawn_blocking(move || recording.finish()).await?;
    let m = match followed {
        Ok(m) => m?,
        Err(_) => crate::error::bail!("the move did not end within {} s", MOVE_BOUND.as_secs()),
    };
    r.state = format!("{:?}", m.state).to_lowercase();
    r.error = m
        .error
        .as_ref()
        .map(|e| format!("{}: {}", e.code, e.message));
    let ms =
        |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|t| (t - m.created_at).num_milliseconds());
    r.created_to_migrating_ms = ms(m.migrating_at);
    r.total_ms = ms(m.finished_at);
    r.qemu_total_ms = m.stats.as_ref().map(|s| s.total_ms);
    r.qemu_pause_ms = m.stats.as_ref().map(|s| s.qemu_pause_ms);
    let logs: Vec<ferry_api::migrations::LogLine> = cluster
        .api
        .get(&format!("/v1/migrations/{}/logs", m.id))
        .await?;
    r.destination_started_ahead = logs
        .iter()
        .any(|l| l.message.contains("while the dirty rate is measured"));
    // The checks' bandwidth probe crosses the same interface before the stream: count from
    // the moment the destination listened (the server's log line, on the same clock).
    let listening = logs
        .iter()
        .find(|l| l.message.starts_with("destination listening on"))
        .and_then(|l| (l.at - asked_utc).to_std().ok())
        .map(|since| asked + since)
        .context("the job logged no listening destination")?;
    r.request_to_first_bytes_ms = trace
        .first_bytes_after(listening, FIRST_BYTES)
        .map(|t| t.duration_since(asked).as_secs_f64() * 1000.0);
    if m.state != MigrationState::Completed {
        crate::error::bail!("the move ended {}", r.state);
    }
    Ok(())
}

/// p50, p95 and max (nearest rank).
fn spread(mut v: Vec<f64>) -> Spread {
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = |p: f64| -> Option<f64> {
        if v.is_empty() {
            return None;
        }
        let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        Some(v[i])
    };
    Spread {
        moves: v.len(),
        p50_ms: rank(0.50),
        p95_ms: rank(0.95),
        max_ms: v.last().copied(),
    }
}

fn markdown(r: &StartReport) -> String {
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    let i = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
    let u = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let mut s = format!(
        "Request -> first {} KiB on the destination's migration interface, idle {} MiB lab guest ({} MiB written), through the server ({}; {} CPUs; load {} -> {})\n\n",
        r.first_bytes >> 10,
        r.memory_mib,
        r.wss_mib,
        r.machine.accel,
        r.machine.host_cpus,
        r.machine.load_before,
        r.machine.load_after
    );
    s.push_str(
        "| moves | count | p50 ms | p95 ms | max ms | target p95 ms |\n|---|---|---|---|---|---|\n",
    );
    for (name, sp) in [
        ("every move", r.every_move),
        ("warm (link known)", r.warm_moves),
    ] {
        s.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} |\n",
            sp.moves,
            f(sp.p50_ms),
            f(sp.p95_ms),
            f(sp.max_ms),
            r.target_p95_ms
        ));
    }
    s.push_str("\n| move | hosts | state | request -> first bytes ms | created -> migrating ms | total ms | QEMU total ms | QEMU's pause ms | destination started ahead | link probed |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for run in &r.runs {
        s.push_str(&format!(
            "| {} | {} -> {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            run.run,
            run.from,
            run.to,
            run.state,
            f(run.request_to_first_bytes_ms),
            i(run.created_to_migrating_ms),
            i(run.total_ms),
            u(run.qemu_total_ms),
            u(run.qemu_pause_ms),
            if run.destination_started_ahead {
                "yes"
            } else {
                "no"
            },
            if run.link_probed { "yes" } else { "no" },
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_95th_percentile_is_the_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(|i| i as f64 * 10.0).collect();
        let s = spread(v);
        assert_eq!(s.moves, 20);
        assert_eq!(s.p50_ms, Some(100.0));
        assert_eq!(s.p95_ms, Some(190.0));
        assert_eq!(s.max_ms, Some(200.0));
        assert_eq!(spread(Vec::new()).p95_ms, None);
        assert_eq!(spread(vec![42.0]).p95_ms, Some(42.0));
    }
}
