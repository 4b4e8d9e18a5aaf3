//! `ferry demo --storage local`: the guest's disk is on a datastore only hv1 sees, so it moves
//! with the guest by block migration. The report then says what that cost: how far each
//! disk's copy went, how long the copy took by the job's samples, what hv2 received on its
//! migration interface, and where the source's image stays.
//!
//! The figures are kept apart on purpose: the copy's progress counts unallocated ranges it
//! never sends and counts rewritten blocks again, while the interface counts memory and disk
//! together with their protocol headers; neither can stand in for the other.

use ferry_api::migrations::{DiskCopy, Migration};
use ferry_bench::blocks::{block_watch, CopyClock, Watched};
use ferry_bench::local_cluster::LocalCluster;
use ferry_cli::commands::migrate::follow_observed;
use ferry_cli::commands::Ctx;
use ferry_cli::error::CliError;
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

/// Follows job `id` as the plain demo does (its bar when `bar`), timing the disk copy from the
/// samples and counting what hv2 receives ([`ferry_bench::blocks`]).
pub(super) async fn follow_counting(
    cluster: &LocalCluster,
    ctx: &Ctx,
    id: Uuid,
    bar: bool,
) -> Result<(Migration, Watched), CliError> {
    let (mut observer, counter) = block_watch(cluster)?;
    let follow = follow_observed(ctx, id, bar, |s| observer.observe(s));
    let (m, rx_bytes) = counter.around(follow).await;
    let clock = observer.clock;
    Ok((m?, Watched { clock, rx_bytes }))
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
