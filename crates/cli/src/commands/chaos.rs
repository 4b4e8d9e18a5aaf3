//! `ferry chaos`: the fault matrix on a lab of its own (see the ferry-chaos crate). Prints one
//! JSON object (`--json`) or a table; exits 1 when any cell is not ok, so CI can gate on it.

use std::time::{Duration, Instant};

use clap::Args;
use ferry_chaos::matrix::{self, CellSpec};
use ferry_chaos::{report, CellOptions, ChaosLab, Fault, LabSpec, Phase, Summary};

use crate::error::{exit, CliError};

#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct ChaosArgs {
    /// The slice of the matrix that fits in a few minutes (the default).
    #[arg(long, conflicts_with_all = ["full", "random"])]
    pub quick: bool,
    /// Every fault in every phase (48 cells; about an hour on a small machine).
    #[arg(long, conflicts_with = "random")]
    pub full: bool,
    /// N cells, each a random fault at a random instant of its migration (seeded: the seed
    /// is printed, `--seed` replays it).
    #[arg(long, value_name = "N")]
    pub random: Option<usize>,
    /// Seed of `--random`; default: from the clock.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Only these faults (comma-separated): cancel, kill-source-qemu, kill-destination-qemu,
    /// kill-source-agent, kill-destination-agent, kill-server, link-down-10s, link-down-60s.
    #[arg(long, value_delimiter = ',')]
    pub faults: Vec<String>,
    /// Only these phases (comma-separated): preparing, first-round, later-rounds,
    /// pre-switchover, completing, post-copy.
    #[arg(long, value_delimiter = ',')]
    pub phases: Vec<String>,
    /// Print one JSON object on stdout (per-cell progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// The lab's name (its namespaces are `ferry-<name>-*`, its directory
    /// /var/tmp/ferry-lab/<name>).
    #[arg(long, default_value = "chaos")]
    pub name: String,
    /// Accelerator: auto (probe), kvm or tcg.
    #[arg(long, env = "FERRY_ACCEL", default_value = "auto")]
    pub accel: String,
    /// Migration bandwidth cap, MiB/s: makes phases last long enough to hit.
    #[arg(long, default_value_t = 8)]
    pub bandwidth_mib_s: u64,
}

/// How long after its job starts a random cell's fault may land: about a capped copy's length.
const RANDOM_WINDOW: Duration = Duration::from_secs(20);

pub async fn run(args: ChaosArgs) -> Result<u8, CliError> {
    let (cells, seed) = cells(&args)?;
    if let Some(s) = seed {
        eprintln!(
            "chaos: seed {s} (replay with --random {} --seed {s})",
            cells.len()
        );
    }
    let exe = super::this_program()?;
    let spec = LabSpec {
        name: args.name.clone(),
        ferry_binary: exe,
        accel: args.accel.clone(),
    };
    let opts = CellOptions {
        bandwidth_mib_s: args.bandwidth_mib_s,
        ..CellOptions::default()
    };
    // Ctrl-C or SIGTERM drops the run: the lab it owns kills its daemons and removes its
    // namespaces (every QEMU and tap with them) and its directory on drop.
    let summary = tokio::select! {
        r = run_matrix(&spec, &cells, &opts, seed) => r?,
        _ = super::shutdown_signal() => {
            eprintln!("chaos: interrupted; the lab was removed");
            return Ok(130);
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&summary).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        );
    } else {
        println!("{}", report::table(&summary));
    }
    Ok(if summary.ok { exit::OK } else { exit::ERROR })
}

async fn run_matrix(
    spec: &LabSpec,
    cells: &[CellSpec],
    opts: &CellOptions,
    seed: Option<u64>,
) -> Result<Summary, CliError> {
    let started = Instant::now();
    let mut lab = ChaosLab::start(spec).await?;
    eprintln!(
        "chaos: lab {} up ({}), {} cell(s); logs in {}",
        spec.name,
        lab.accel,
        cells.len(),
        lab.dir().display()
    );
    eprintln!("{}", report::table_header());
    let results = ferry_chaos::run_cells(&mut lab, cells, opts, |r| {
        eprintln!("{}", report::table_row(r))
    })
    .await?;
    // Failed cells' logs were saved as each failed; the lab itself goes.
    Ok(Summary::new(
        results,
        seed,
        &lab.accel,
        started.elapsed().as_secs_f64(),
    ))
}

/// The cells the arguments ask for, and the seed of a random run.
pub fn cells(args: &ChaosArgs) -> Result<(Vec<CellSpec>, Option<u64>), CliError> {
    let faults = args
        .faults
        .iter()
        .map(|f| f.parse::<Fault>())
        .collect::<Result<Vec<_>, _>>()?;
    let phases = args
        .phases
        .iter()
        .map(|p| p.parse::<Phase>())
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(n) = args.random {
        let seed = args.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
        return Ok((matrix::random(seed, n, RANDOM_WINDOW), Some(seed)));
    }
    // Naming faults or phases picks from the whole matrix; alone, --quick is the slice.
    let named = !faults.is_empty() || !phases.is_empty();
    let base = if args.full || (named && !args.quick) {
        matrix::full()
    } else {
        matrix::quick()
    };
    Ok((matrix::select(base, &faults, &phases)?, None))
}
