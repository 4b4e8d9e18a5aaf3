//! `ferry demo --storage local`: the guest's disk is on a datastore only hv1 sees, so it moves
//! with the guest by block migration. The report then says what that cost: how far each
//! disk's copy went, how long the copy took by the job's samples, what hv2 received on its
//! migration interface, and where the source's image stays.
//!
//! The figures are kept apart on purpose: the copy's progress counts unallocated ranges it
//! never sends and counts rewritten blocks again, while the interface counts memory and disk
//! together with their protocol headers; neither can stand in for the other.

use std::collections::BTreeMap;

use ferry_api::migrations::{DiskCopy, Migration, MigrationState};
use ferry_cli::commands::migrate::{follow_observed, Seen};
use ferry_cli::error::CliError;
use ferry_cli::local_cluster::LocalCluster;
use ferry_lab::net::migration_rx_bytes;
use ferry_lab::LabError;
use ferry_migrate::{DiskState, Progress};
use serde::Serialize;
use uuid::Uuid;

use super::DemoReport;

/// One disk's copy as the report shows it.
#[derive(Debug, Serialize)]
pub(super) struct DiskCopyReport {
    pub disk: String,
    /// The job's final word on the copy: `copied` once the guest runs from the new image.
    pub state: String,
    /// The disk's virtual size.
    pub size_bytes: u64,
    /// How far the copy went through the disk: not bytes sent, since unallocated ranges
    /// count without crossing the wire and rewritten blocks count again.
    pub progressed_bytes: u64,
    /// From the first sample that showed the disk to the first in which every disk was in
    /// sync, by the source's clock; `None` if the demo saw no such pair of samples. The copy
    /// ended somewhere between two samples, so this is an upper bound.
    pub copy_ms: Option<u64>,
    /// How far apart the last sample before the sync and the first after it were: the copy
    /// took more than `copy_ms` minus this.
    pub copy_sample_gap_ms: Option<u64>,
    /// The new image on the destination.
    pub target: String,
    pub source_host: String,
    /// The image the guest left behind on the source.
    pub source_image: String,
    pub source_path: Option<String>,
    /// The job says the source still has its image (until `ferry migration cleanup`).
    pub source_kept: bool,
    /// The file was there when the report was made.
    pub source_present: bool,
}

/// When the disk copy began and ended, from the progress samples.
#[derive(Debug, Default)]
pub(crate) struct CopyClock {
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
    fn sample(&mut self, p: &Progress) {
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

    pub(crate) fn copy_ms(&self, disk: &str) -> Option<u64> {
        self.synced_ms?.checked_sub(*self.first_ms.get(disk)?)
    }

    pub(crate) fn sample_gap_ms(&self) -> Option<u64> {
        self.synced_ms?.checked_sub(self.last_unsynced_ms?)
    }
}

/// What the demo saw while it followed a block migration.
#[derive(Debug)]
pub(crate) struct Watched {
    pub(crate) clock: CopyClock,
    /// Bytes hv2's migration interface received while the job ran.
    pub(crate) rx_bytes: Option<u64>,
}

/// Follows job `id` as the plain demo does, and counts the bytes hv2 receives on its
/// migration interface from the moment the job leaves Preparing to its end: the pre-flight
/// bandwidth probe before that sends far more than a small guest's whole migration, and
/// would drown the figure.
pub(crate) async fn follow_counting(
    cluster: &LocalCluster,
    id: Uuid,
    bar: bool,
) -> Result<(Migration, Watched), CliError> {
    let netns = cluster
        .net
        .host("hv2")
        .map_err(LabError::from)?
        .netns
        .clone();
    let (start_tx, start_rx) = tokio::sync::oneshot::channel::<()>();
    let mut start_tx = Some(start_tx);
    let mut clock = CopyClock::default();
    let follow = follow_observed(&cluster.ctx, id, bar, |seen| match seen {
        Seen::Record(m) => {
            // A job that ends without being seen past Preparing was never counted: dropping
            // the sender leaves the figure unknown rather than zero.
            let past = !matches!(m.state, MigrationState::Pending | MigrationState::Preparing);
            if past || m.state.is_terminal() {
                if let Some(tx) = start_tx.take() {
                    if !m.state.is_terminal() {
                        let _ = tx.send(());
                    }
                }
            }
            if let Some(p) = &m.progress {
                clock.sample(p);
            }
        }
        Seen::Sample(p) => clock.sample(p),
    });
    let before = async {
        match start_rx.await {
            Ok(()) => rx_bytes(&netns).await,
            Err(_) => None,
        }
    };
    let (m, before) = tokio::join!(follow, before);
    let m = m?;
    let after = rx_bytes(&netns).await;
    let rx_bytes = before.zip(after).map(|(b, a)| a.saturating_sub(b));
    Ok((m, Watched { clock, rx_bytes }))
}

/// [`migration_rx_bytes`] off the runtime's threads (it runs `ip`).
async fn rx_bytes(netns: &str) -> Option<u64> {
    let netns = netns.to_string();
    tokio::task::spawn_blocking(move || migration_rx_bytes(&netns))
        .await
        .ok()
        .flatten()
}

/// The job's copies and what the demo measured into the report, whether the job completed
/// or not: a failed copy's state is part of the story.
pub(super) fn record(
    m: &Migration,
    watched: &Watched,
    cluster: &LocalCluster,
    report: &mut DemoReport,
) {
    report.migration_rx_bytes = watched.rx_bytes;
    report.disk_copies = m
        .copies
        .iter()
        .map(|c| copy_report(c, m, &watched.clock, cluster))
        .collect();
    if m.copies.iter().any(|c| c.source_kept) {
        report.cleanup_command = Some(format!("ferry migration cleanup {}", m.id));
    }
}

fn copy_report(
    c: &DiskCopy,
    m: &Migration,
    clock: &CopyClock,
    cluster: &LocalCluster,
) -> DiskCopyReport {
    let path = cluster.image_path(&m.source, &c.image);
    DiskCopyReport {
        disk: c.disk.clone(),
        state: c.state.as_str().into(),
        size_bytes: c.size_bytes,
        progressed_bytes: c.done_bytes,
        copy_ms: clock.copy_ms(&c.disk),
        copy_sample_gap_ms: clock.sample_gap_ms(),
        target: c.target.as_ref().unwrap_or(&c.image).to_string(),
        source_host: m.source.clone(),
        source_image: c.image.to_string(),
        source_present: path.as_ref().is_some_and(|p| p.exists()),
        source_path: path.map(|p| p.display().to_string()),
        source_kept: c.source_kept,
    }
}

/// The report's lines about the copies, under the disk's verification.
pub(super) fn render(r: &DemoReport, destination: &str, out: &mut String) {
    use std::fmt::Write;
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
    for c in &r.disk_copies {
        let _ = writeln!(
            out,
            "  disk {:<19} {} to {} on {destination}",
            format!("{} copy", c.disk),
            c.state,
            c.target
        );
        let _ = writeln!(
            out,
            "    copy progressed        {} of a {} disk (how far the copy went: unallocated \
             ranges count unsent, rewritten blocks count again)",
            mib(c.progressed_bytes),
            mib(c.size_bytes)
        );
        let _ = writeln!(out, "    disk copy time         {}", copy_time(c));
        let _ = writeln!(out, "    source image           {}", source_line(c));
    }
    if let Some(cmd) = &r.cleanup_command {
        let _ = writeln!(
            out,
            "  source cleanup           `{cmd}` removes the source images (this demo removes \
             its whole lab as it exits)"
        );
    }
    if !r.disk_copies.is_empty() {
        let wire = r.migration_rx_bytes.map_or_else(|| "-".into(), mib);
        let _ = writeln!(
            out,
            "  received on the wire     {wire} by {destination}'s migration interface after the \
             pre-flight checks (memory and disk together, headers included)"
        );
    }
}

/// The copy's time as the samples bound it: the copy was not in sync at one sample and was
/// at the next, so a single figure would claim a precision the samples do not have.
fn copy_time(c: &DiskCopyReport) -> String {
    let what = "from the first sample of the disk to the first with every disk in sync";
    match (c.copy_ms, c.copy_sample_gap_ms) {
        (Some(t), Some(gap)) => format!(
            "{}-{t} ms ({what}; samples {gap} ms apart)",
            t.saturating_sub(gap)
        ),
        (Some(t), None) => format!("at most {t} ms ({what})"),
        _ => "- (no samples of the copy seen)".into(),
    }
}

fn source_line(c: &DiskCopyReport) -> String {
    let at = c.source_path.as_deref().unwrap_or(&c.source_image);
    match (c.source_kept, c.source_present) {
        (true, true) => format!("kept on {} at {at} until the cleanup", c.source_host),
        (true, false) => format!("recorded as kept on {}, but {at} is MISSING", c.source_host),
        (false, true) => format!("not kept by the job, yet {at} is on {}", c.source_host),
        (false, false) => format!("not kept on {} ({} removed)", c.source_host, c.source_image),
    }
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
