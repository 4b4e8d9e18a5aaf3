//! Following a block migration on a [`LocalCluster`]: when the disk copy began and ended by
//! the job's samples, and the bytes hv2 received on its migration interface while the job
//! ran. `ferry demo --storage local` reports them, `ferry bench --disks` measures with them.
//!
//! The figures are kept apart on purpose: the copy's progress counts unallocated ranges it
//! never sends and counts rewritten blocks again, while the interface counts memory and disk
//! together with their protocol headers; neither can stand in for the other.

use std::collections::BTreeMap;
use std::future::Future;

use ferry_api::follow::Seen;
use ferry_api::migrations::{Migration, MigrationState};
use ferry_lab::net::migration_rx_bytes;
use ferry_migrate::{DiskState, Progress};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::error::BenchError;
use crate::local_cluster::LocalCluster;

/// When the disk copy began and ended, from the progress samples.
#[derive(Debug, Default)]
pub struct CopyClock {
    /// Per disk: `elapsed_ms` of the first sample that showed it.
    first_ms: BTreeMap<String, u64>,
    /// The last sample in which some disk was not yet in sync.
    last_unsynced_ms: Option<u64>,
    /// The first sample in which every disk was in sync.
    synced_ms: Option<u64>,
}

impl CopyClock {
    /// Samples may arrive twice (as events and inside records), so every figure is a first
    /// or a last, never a count.
    pub fn sample(&mut self, p: &Progress) {
        if p.disks.is_empty() {
            return;
        }
        for d in &p.disks {
            let first = self.first_ms.entry(d.disk.clone()).or_insert(p.elapsed_ms);
            *first = (*first).min(p.elapsed_ms);
        }
        let synced = p
            .disks
            .iter()
            .all(|d| matches!(d.state, DiskState::Synced | DiskState::Completed));
        if synced {
            self.synced_ms = Some(self.synced_ms.map_or(p.elapsed_ms, |s| s.min(p.elapsed_ms)));
        } else if self.synced_ms.is_none_or(|s| p.elapsed_ms < s) {
            self.last_unsynced_ms = Some(
                self.last_unsynced_ms
                    .map_or(p.elapsed_ms, |u| u.max(p.elapsed_ms)),
            );
        }
    }

    pub fn copy_ms(&self, disk: &str) -> Option<u64> {
        self.synced_ms?.checked_sub(*self.first_ms.get(disk)?)
    }

    pub fn sample_gap_ms(&self) -> Option<u64> {
        self.synced_ms?.checked_sub(self.last_unsynced_ms?)
    }
}

/// What was seen while a block migration was followed.
#[derive(Debug)]
pub struct Watched {
    pub clock: CopyClock,
    /// Bytes hv2's migration interface received while the job ran.
    pub rx_bytes: Option<u64>,
}

/// Hands a follower's observations to the copy clock, and tells the [`RxCounter`] when the
/// job leaves Preparing.
#[derive(Debug)]
pub struct BlockObserver {
    pub clock: CopyClock,
    start: Option<oneshot::Sender<()>>,
}

impl BlockObserver {
    pub fn observe(&mut self, seen: Seen<'_>) {
        match seen {
            Seen::Record(m) => {
                // A job that ends without being seen past Preparing was never counted:
                // dropping the sender leaves the figure unknown rather than zero.
                let past = !matches!(m.state, MigrationState::Pending | MigrationState::Preparing);
                if past || m.state.is_terminal() {
                    if let Some(tx) = self.start.take() {
                        if !m.state.is_terminal() {
                            let _ = tx.send(());
                        }
                    }
                }
                if let Some(p) = &m.progress {
                    self.clock.sample(p);
                }
            }
            Seen::Sample(p) => self.clock.sample(p),
        }
    }
}

/// Counts the bytes hv2 receives on its migration interface from the moment the job leaves
/// Preparing to its end: the pre-flight bandwidth probe before that sends far more than a
/// small guest's whole migration, and would drown the figure.
#[derive(Debug)]
pub struct RxCounter {
    netns: String,
    start: oneshot::Receiver<()>,
}

impl RxCounter {
    /// Runs `follow` (which feeds the [`BlockObserver`]) and counts around it.
    pub async fn around<T>(self, follow: impl Future<Output = T>) -> (T, Option<u64>) {
        let RxCounter { netns, start } = self;
        let before = async {
            match start.await {
                Ok(()) => rx_bytes(&netns).await,
                Err(_) => None,
            }
        };
        let (out, before) = tokio::join!(follow, before);
        let after = rx_bytes(&netns).await;
        (out, before.zip(after).map(|(b, a)| a.saturating_sub(b)))
    }
}

/// The observer and counter of one block migration to hv2 (see [`LocalCluster::follow_counting`]
/// for the whole of it; the demo puts its progress bar in between).
pub fn block_watch(cluster: &LocalCluster) -> Result<(BlockObserver, RxCounter), BenchError> {
    let netns = cluster.net.host("hv2")?.netns.clone();
    let (tx, rx) = oneshot::channel();
    Ok((
        BlockObserver {
            clock: CopyClock::default(),
            start: Some(tx),
        },
        RxCounter { netns, start: rx },
    ))
}

impl LocalCluster {
    /// Follows job `id` to its end, timing its disk copy and counting what hv2 receives.
    pub async fn follow_counting(&self, id: Uuid) -> Result<(Migration, Watched), BenchError> {
        let (mut observer, counter) = block_watch(self)?;
        let follow = ferry_api::follow::migration(&self.api, id, |s| observer.observe(s));
        let (m, rx_bytes) = counter.around(follow).await;
        Ok((
            m?,
            Watched {
                clock: observer.clock,
                rx_bytes,
            },
        ))
    }
}

/// [`migration_rx_bytes`] off the runtime's threads (it runs `ip`).
async fn rx_bytes(netns: &str) -> Option<u64> {
    let netns = netns.to_string();
    tokio::task::spawn_blocking(move || migration_rx_bytes(&netns))
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_migrate::DiskProgress;

    fn sample(elapsed_ms: u64, states: &[DiskState]) -> Progress {
        let disks = states
            .iter()
            .enumerate()
            .map(|(i, s)| DiskProgress {
                disk: format!("disk{i}"),
                state: *s,
                copied_bytes: 0,
                remaining_bytes: 0,
                total_bytes: 0,
                rate_bps: 0.0,
                resumed: false,
                passes: 0,
                whole_disk_mirror: false,
            })
            .collect();
        Progress::disk_copy(elapsed_ms, disks, 0)
    }

    /// The copy runs from each disk's first sample to the first with all in sync, however
    /// often a sample is seen and in whatever order.
    #[test]
    fn the_copy_is_timed_from_the_first_sample_to_the_first_with_every_disk_in_sync() {
        use DiskState::{Completed, Copying, Synced};
        let mut clock = CopyClock::default();
        for (t, states) in [
            (1000, vec![Copying, Copying]),
            (1250, vec![Synced, Copying]),
            (1250, vec![Synced, Copying]),
            (1750, vec![Synced, Synced]),
            (1500, vec![Synced, Copying]),
            (2000, vec![Synced, Synced]),
            (3000, vec![Completed, Completed]),
        ] {
            clock.sample(&sample(t, &states));
        }
        assert_eq!(clock.copy_ms("disk0"), Some(750));
        assert_eq!(clock.copy_ms("disk1"), Some(750));
        assert_eq!(clock.sample_gap_ms(), Some(250));
        assert_eq!(clock.copy_ms("disk9"), None);

        let mut memory_only = CopyClock::default();
        memory_only.sample(&sample(500, &[]));
        assert_eq!(memory_only.copy_ms("disk0"), None);
    }
}
