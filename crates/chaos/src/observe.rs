//! Where a job is, from the server's record alone: its state, and while it copies the phase
//! and iteration of its newest progress sample. Pure, so the ordering that decides "reached"
//! and "missed" is tested without a migration.

use ferry_api::migrations::{Migration, MigrationState};
use ferry_migrate::progress::Phase as CopyPhase;

use crate::matrix::Phase;

/// A point in a job's life, ordered: a fault phase is missed once the job is past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    /// Increases along a job's life.
    pub rank: u8,
    /// The matrix phase this point is in, if any (e.g. not while pending, or while the stream
    /// is set up before the first page).
    pub phase: Option<Phase>,
    pub label: &'static str,
}

/// The rank of each matrix phase along a job's life. Post-copy replaces pre-switchover and
/// runs while the job is Completing, so it shares Completing's rank.
pub fn rank_of(p: Phase) -> u8 {
    match p {
        Phase::Preparing => 1,
        Phase::FirstRound => 3,
        Phase::LaterRounds => 4,
        Phase::PreSwitchover => 5,
        Phase::Completing => 6,
        // A post-copy job is Completing from the start of post-copy; its end is "ended".
        Phase::PostCopy => 6,
    }
}

pub fn point(m: &Migration) -> Point {
    let at = |phase: Phase| Point {
        rank: rank_of(phase),
        phase: Some(phase),
        label: phase.as_str(),
    };
    match m.state {
        MigrationState::Pending => Point {
            rank: 0,
            phase: None,
            label: "pending",
        },
        MigrationState::Preparing => at(Phase::Preparing),
        MigrationState::Migrating => match &m.progress {
            Some(p) if p.phase == CopyPhase::Postcopy => at(Phase::PostCopy),
            Some(p) if p.phase == CopyPhase::Switchover => at(Phase::PreSwitchover),
            Some(p) if p.transferred_bytes > 0 && p.iteration >= 2 => at(Phase::LaterRounds),
            Some(p) if p.transferred_bytes > 0 => at(Phase::FirstRound),
            _ => Point {
                rank: 2,
                phase: None,
                label: "stream-setup",
            },
        },
        // Post-copy reports switched-over when it starts, so the job is Completing while the
        // rest of memory follows.
        // The source agent passes the point of no return as soon as QEMU stops the guest, so
        // the server marks the job Completing with the switchover sample: while the newest
        // sample still says switchover, the last pages are on their way.
        MigrationState::Completing => match &m.progress {
            Some(p) if p.phase == CopyPhase::Postcopy => at(Phase::PostCopy),
            Some(p) if p.phase == CopyPhase::Switchover => at(Phase::PreSwitchover),
            _ => at(Phase::Completing),
        },
        _ => Point {
            rank: 7,
            phase: None,
            label: "ended",
        },
    }
}

/// `state/phase/iteration` of a record, for the cell's details.
pub fn describe(m: &Migration) -> String {
    match &m.progress {
        Some(p) => format!(
            "{}/{}/it{} {:.0}%",
            m.state.as_str(),
            p.phase.as_str(),
            p.iteration,
            p.percent
        ),
        None => m.state.as_str().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_rank_in_a_jobs_order() {
        let order = [
            Phase::Preparing,
            Phase::FirstRound,
            Phase::LaterRounds,
            Phase::PreSwitchover,
            Phase::Completing,
        ];
        for w in order.windows(2) {
            assert!(rank_of(w[0]) < rank_of(w[1]), "{w:?}");
        }
        assert_eq!(rank_of(Phase::PostCopy), rank_of(Phase::Completing));
    }
}
