//! The fault matrix: which faults, in which phases of a migration, and the slices of it that
//! `--quick` and the integration test run. Names here are the ones reports and `--faults` /
//! `--phases` use, so a failing cell can be replayed by name.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::error::ChaosError;

/// One fault, as the world can inflict it on a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// The operator cancels through the server's API.
    Cancel,
    /// SIGKILL of the source QEMU (not restarted: a crashed QEMU's guest is gone).
    KillSourceQemu,
    KillDestinationQemu,
    /// SIGKILL of a daemon, started again after [`RESTART_AFTER`].
    KillSourceAgent,
    KillDestinationAgent,
    KillServer,
    /// The source host's migration interface down, then up again.
    LinkDown10s,
    LinkDown60s,
}

/// How long a killed daemon stays down before the "operator" starts it again: longer than the
/// server's agent call retries take to notice, shorter than its give-up time.
pub const RESTART_AFTER: Duration = Duration::from_secs(5);

impl Fault {
    pub const ALL: [Fault; 8] = [
        Fault::Cancel,
        Fault::KillSourceQemu,
        Fault::KillDestinationQemu,
        Fault::KillSourceAgent,
        Fault::KillDestinationAgent,
        Fault::KillServer,
        Fault::LinkDown10s,
        Fault::LinkDown60s,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Cancel => "cancel",
            Fault::KillSourceQemu => "kill-source-qemu",
            Fault::KillDestinationQemu => "kill-destination-qemu",
            Fault::KillSourceAgent => "kill-source-agent",
            Fault::KillDestinationAgent => "kill-destination-agent",
            Fault::KillServer => "kill-server",
            Fault::LinkDown10s => "link-down-10s",
            Fault::LinkDown60s => "link-down-60s",
        }
    }

    /// A killed QEMU is not brought back: its guest may be lost, but never duplicated.
    pub fn kills_qemu(self) -> bool {
        matches!(self, Fault::KillSourceQemu | Fault::KillDestinationQemu)
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Fault {
    type Err = ChaosError;
    fn from_str(s: &str) -> Result<Fault, ChaosError> {
        Fault::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| ChaosError::Invalid(format!("unknown fault {s:?}")))
    }
}

/// Where in a migration the fault lands. Observed on the server's record (state, progress
/// phase and iteration), polled fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The job is Preparing (checks, plan, destination start).
    Preparing,
    /// Migrating, iteration 1: the first full pass over memory.
    FirstRound,
    /// Migrating, iteration 2 or later: resending dirtied pages.
    LaterRounds,
    /// The source QEMU stopped the guest for the last pages: its newest sample says
    /// switchover (QEMU's pre-switchover and device states). The source agent passes the point
    /// of no return at once, so the record is then Completing already, or still Migrating.
    PreSwitchover,
    /// The job is Completing and the source QEMU has completed: the destination is being
    /// confirmed, committed, started, and the source torn down.
    Completing,
    /// Post-copy, switched by the operator through the API: the guest runs on the destination
    /// while its memory follows.
    PostCopy,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Preparing,
        Phase::FirstRound,
        Phase::LaterRounds,
        Phase::PreSwitchover,
        Phase::Completing,
        Phase::PostCopy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Preparing => "preparing",
            Phase::FirstRound => "first-round",
            Phase::LaterRounds => "later-rounds",
            Phase::PreSwitchover => "pre-switchover",
            Phase::Completing => "completing",
            Phase::PostCopy => "post-copy",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Phase {
    type Err = ChaosError;
    fn from_str(s: &str) -> Result<Phase, ChaosError> {
        Phase::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| ChaosError::Invalid(format!("unknown phase {s:?}")))
    }
}

/// One cell to run: a fault at a phase, or at a random instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CellSpec {
    pub fault: Fault,
    /// `None`: at a random instant after the migration starts (`delay_ms` below).
    pub phase: Option<Phase>,
    /// For a random cell: how long after the job was created the fault lands.
    pub delay_ms: Option<u64>,
}

impl CellSpec {
    pub fn at(fault: Fault, phase: Phase) -> CellSpec {
        CellSpec {
            fault,
            phase: Some(phase),
            delay_ms: None,
        }
    }
}

/// Every fault in every phase.
pub fn full() -> Vec<CellSpec> {
    Phase::ALL
        .into_iter()
        .flat_map(|p| Fault::ALL.into_iter().map(move |f| CellSpec::at(f, p)))
        .collect()
}

/// A slice that fits in a few minutes on a small machine: one cell per kind of actor (the
/// operator, each daemon, a QEMU, the network), spread over the phases that are hit reliably,
/// plus post-copy.
pub fn quick() -> Vec<CellSpec> {
    vec![
        CellSpec::at(Fault::Cancel, Phase::FirstRound),
        CellSpec::at(Fault::KillServer, Phase::LaterRounds),
        CellSpec::at(Fault::KillSourceAgent, Phase::FirstRound),
        CellSpec::at(Fault::KillDestinationAgent, Phase::LaterRounds),
        CellSpec::at(Fault::KillDestinationQemu, Phase::FirstRound),
        CellSpec::at(Fault::LinkDown10s, Phase::LaterRounds),
        CellSpec::at(Fault::Cancel, Phase::PostCopy),
    ]
}

/// Selects cells of `base` by fault and phase names (empty: all).
pub fn select(
    base: Vec<CellSpec>,
    faults: &[Fault],
    phases: &[Phase],
) -> Result<Vec<CellSpec>, ChaosError> {
    let cells: Vec<CellSpec> = base
        .into_iter()
        .filter(|c| faults.is_empty() || faults.contains(&c.fault))
        .filter(|c| phases.is_empty() || c.phase.is_some_and(|p| phases.contains(&p)))
        .collect();
    if cells.is_empty() {
        return Err(ChaosError::Invalid(
            "no cell matches the given faults and phases".into(),
        ));
    }
    Ok(cells)
}

/// `n` cells at random instants, from `seed` (printed, so `--seed` replays the same run).
pub fn random(seed: u64, n: usize, window: Duration) -> Vec<CellSpec> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| CellSpec {
            fault: Fault::ALL[rng.gen_range(0..Fault::ALL.len())],
            phase: None,
            delay_ms: Some(rng.gen_range(0..window.as_millis() as u64)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in Fault::ALL {
            assert_eq!(f.as_str().parse::<Fault>().unwrap(), f);
        }
        for p in Phase::ALL {
            assert_eq!(p.as_str().parse::<Phase>().unwrap(), p);
        }
    }

    #[test]
    fn the_full_matrix_is_every_fault_in_every_phase() {
        assert_eq!(full().len(), Fault::ALL.len() * Phase::ALL.len());
    }

    #[test]
    fn a_seed_replays_the_same_cells() {
        let w = Duration::from_secs(20);
        assert_eq!(random(7, 5, w), random(7, 5, w));
        assert_ne!(random(7, 5, w), random(8, 5, w));
    }
}
