//! Block migration, source side: each local disk mirrored into the destination's NBD export.
//!
//! The way libvirt does it since QEMU dropped its built-in block migration: the destination
//! exports each new image over NBD; the source adds an NBD client node for it and runs
//! `blockdev-mirror` from the disk's node into it. The bulk copy runs in the background; once
//! a mirror is in sync (`ready`) it is switched to write-blocking, so every guest write reaches
//! both images before the guest hears it is done, and a guest that writes faster than the
//! link still converges. The memory migration starts only when every mirror is in sync. At
//! `pre-switchover`, with the guest stopped, [`Mirrors::complete`] ends each mirror with
//! `block-job-cancel`, which for a mirror in sync leaves the target a consistent copy and the
//! source untouched (no pivot). Any failure or cancel before that ends the mirrors with
//! [`Mirrors::abort`]: the source's images were only ever read.
//!
//! Unallocated and zero ranges are not sent as data: the mirror writes zeroes with NBD's
//! WRITE_ZEROES, which carries no payload.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferry_qmp::commands::{
    BlockJobCancel, BlockJobChangeMirror, BlockJobInfo, BlockdevAddNbd, BlockdevDel,
    BlockdevMirror, JobDismiss, QueryBlockJobs,
};
use ferry_qmp::{Qmp, QmpError};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::DiskCopyFailure;
use crate::MigrateError;

/// One local disk the source copies into the destination's export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorTarget {
    /// The disk's id in the instance spec (its node is `ferry-ID`).
    pub disk: String,
    /// Where the destination's NBD server listens (its migration address).
    pub addr: SocketAddr,
    /// The export's name: a random token only this migration knows.
    pub export: String,
    /// Only the top image moves: the disk is an overlay whose base both hosts share.
    #[serde(default)]
    pub top_only: bool,
    /// The disk's virtual size and the bytes its image holds (0: unknown), to turn a bandwidth
    /// limit into QEMU's mirror speed, which counts zero ranges too.
    #[serde(default)]
    pub size_bytes: u64,
    #[serde(default)]
    pub allocated_bytes: u64,
}

/// QEMU's mirror speed for a disk that may send `bytes_per_sec` of data: the mirror's speed
/// counts every range it passes, zero ranges (sent without data) included, so it is raised
/// by the share of the disk that holds data (at most 64 times).
pub fn mirror_speed(bytes_per_sec: u64, t: &MirrorTarget) -> u64 {
    if t.size_bytes == 0 || t.allocated_bytes == 0 || t.allocated_bytes >= t.size_bytes {
        return bytes_per_sec.max(1);
    }
    let factor = (t.size_bytes as f64 / t.allocated_bytes as f64).min(64.0);
    ((bytes_per_sec as f64 * factor) as u64).max(1)
}

/// Where one disk's mirror is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskState {
    /// The bulk copy runs.
    Copying,
    /// In sync; every guest write goes to both images (write-blocking).
    Synced,
    /// Ended consistently at switchover: the destination's image is complete.
    Completed,
    /// Stopped before switchover; the destination's image is incomplete and removed.
    Cancelled,
    Failed,
}

/// One disk's copy, as samples and the job's record show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskProgress {
    pub disk: String,
    pub state: DiskState,
    /// How far the mirror got through the disk, re-copies of rewritten data included. Zero
    /// and unallocated ranges count without being sent as data.
    pub copied_bytes: u64,
    /// What is left before the mirror is in sync.
    pub remaining_bytes: u64,
    /// Copied plus remaining: grows when the guest rewrites data already copied.
    pub total_bytes: u64,
    /// Recent copy rate, bytes per second.
    pub rate_bps: f64,
}

/// The job id of a disk's mirror.
pub fn job_id(disk: &str) -> String {
    format!("ferry-mirror-{disk}")
}

/// The node name of the NBD client a disk is mirrored into.
pub fn target_node(disk: &str) -> String {
    format!("{}-mirror", ferry_qemu::node_name(disk))
}

/// How long the last writes of a mirror may take to reach the destination at switchover, and
/// a cancelled mirror to stop.
const END_TIMEOUT: Duration = Duration::from_secs(60);

/// The copy rate is averaged over this long.
const RATE_WINDOW_MS: u64 = 2000;

struct Tracked {
    disk: String,
    window: VecDeque<(u64, u64)>,
    last: DiskProgress,
    /// The mirror's job and target node exist in QEMU.
    started: bool,
}

impl Tracked {
    fn new(disk: &str, state: DiskState, started: bool) -> Tracked {
        Tracked {
            disk: disk.to_string(),
            window: VecDeque::new(),
            last: DiskProgress {
                disk: disk.to_string(),
                state,
                copied_bytes: 0,
                remaining_bytes: 0,
                total_bytes: 0,
                rate_bps: 0.0,
            },
            started,
        }
    }
}

/// The mirrors of one migration's local disks.
pub struct Mirrors {
    disks: Vec<Tracked>,
    write_blocking: bool,
}

impl Mirrors {
    /// Nothing to mirror (every disk is on shared storage).
    pub fn none() -> Mirrors {
        Mirrors {
            disks: Vec::new(),
            write_blocking: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.disks.is_empty()
    }

    /// Some mirror still runs in QEMU (not yet completed or aborted).
    pub fn is_live(&self) -> bool {
        self.disks.iter().any(|d| d.started)
    }

    /// The Ferry mirrors this QEMU already runs (found after an agent restart), taken as in
    /// sync and write-blocking: the memory stream starts only once they are.
    pub async fn adopt(qmp: &Qmp) -> Mirrors {
        let jobs = qmp.execute(&QueryBlockJobs).await.unwrap_or_default();
        let disks = jobs
            .iter()
            .filter_map(|j| j.device.strip_prefix("ferry-mirror-"))
            .map(|disk| Tracked::new(disk, DiskState::Synced, true))
            .collect();
        Mirrors {
            disks,
            write_blocking: true,
        }
    }

    /// Attaches each export and starts its mirror, in the background copy mode, the disks
    /// sharing `bandwidth` (see [`mirror_speed`]). On failure the mirrors already started are
    /// aborted before the error returns.
    pub async fn start(
        qmp: &Qmp,
        targets: &[MirrorTarget],
        bandwidth: crate::Bandwidth,
    ) -> Result<Mirrors, MigrateError> {
        let share = match bandwidth {
            crate::Bandwidth::Limited(bps) => Some((bps / targets.len().max(1) as u64).max(1)),
            crate::Bandwidth::Unlimited => None,
        };
        let mut mirrors = Mirrors {
            disks: targets
                .iter()
                .map(|t| Tracked::new(&t.disk, DiskState::Copying, false))
                .collect(),
            write_blocking: false,
        };
        for (i, t) in targets.iter().enumerate() {
            if let Err(e) = mirrors
                .start_one(qmp, i, t, share.map(|b| mirror_speed(b, t)))
                .await
            {
                mirrors.abort(qmp).await;
                return Err(e);
            }
        }
        Ok(mirrors)
    }

    async fn start_one(
        &mut self,
        qmp: &Qmp,
        i: usize,
        t: &MirrorTarget,
        speed_bps: Option<u64>,
    ) -> Result<(), MigrateError> {
        let fail = |e: QmpError| disk_error(&t.disk, &e.to_string());
        qmp.execute(&BlockdevAddNbd::new(
            target_node(&t.disk),
            t.addr,
            t.export.clone(),
        ))
        .await
        .map_err(fail)?;
        self.disks[i].started = true;
        qmp.execute(&BlockdevMirror {
            job_id: job_id(&t.disk),
            device: ferry_qemu::node_name(&t.disk),
            target: target_node(&t.disk),
            sync: if t.top_only { "top" } else { "full" },
            copy_mode: "background",
            on_target_error: "report",
            speed: speed_bps.filter(|s| *s > 0),
            auto_dismiss: false,
        })
        .await
        .map_err(fail)?;
        info!(disk = %t.disk, addr = %t.addr, top_only = t.top_only, "mirror started");
        Ok(())
    }

    /// Reads every mirror's state; a mirror that failed or vanished is an error (the caller
    /// aborts the rest).
    pub async fn sample(&mut self, qmp: &Qmp, elapsed_ms: u64) -> Result<(), MigrateError> {
        let jobs = qmp.execute(&QueryBlockJobs).await?;
        for d in &mut self.disks {
            let Some(job) = jobs.iter().find(|j| j.device == job_id(&d.disk)) else {
                d.last.state = DiskState::Failed;
                return Err(disk_error(&d.disk, "its mirror job is gone from QEMU"));
            };
            if let Some(err) = &job.error {
                d.last.state = DiskState::Failed;
                return Err(disk_error(&d.disk, err));
            }
            if job.status == "concluded" {
                d.last.state = DiskState::Failed;
                return Err(disk_error(&d.disk, "its mirror ended early"));
            }
            d.last = progress_of(&d.disk, job, &mut d.window, elapsed_ms);
        }
        Ok(())
    }

    /// The last state of every disk.
    pub fn progress(&self) -> Vec<DiskProgress> {
        self.disks.iter().map(|d| d.last.clone()).collect()
    }

    /// Whether the mirrors already copy the guest's writes synchronously.
    pub fn is_write_blocking(&self) -> bool {
        self.write_blocking
    }

    /// Every mirror is in sync.
    pub fn all_ready(&self) -> bool {
        self.disks
            .iter()
            .all(|d| matches!(d.last.state, DiskState::Synced))
    }

    /// Switches every mirror to write-blocking: from now on a guest write completes only
    /// once both images have it, so the mirrors stay in sync whatever the guest does.
    pub async fn make_write_blocking(&mut self, qmp: &Qmp) -> Result<(), MigrateError> {
        for d in &self.disks {
            qmp.execute(&BlockJobChangeMirror {
                id: job_id(&d.disk),
                kind: "mirror",
                copy_mode: "write-blocking",
            })
            .await
            .map_err(|e| disk_error(&d.disk, &e.to_string()))?;
        }
        self.write_blocking = true;
        info!("mirrors write-blocking: every guest write reaches both hosts before it completes");
        Ok(())
    }

    /// With the guest stopped (pre-switchover): ends every mirror consistently, so each
    /// destination image holds exactly what the source's does, then detaches the exports.
    pub async fn complete(&mut self, qmp: &Qmp) -> Result<(), MigrateError> {
        for d in &self.disks {
            qmp.execute(&BlockJobCancel {
                device: job_id(&d.disk),
                force: None,
            })
            .await
            .map_err(|e| disk_error(&d.disk, &e.to_string()))?;
        }
        let ended = wait_concluded(qmp, &self.disk_ids()).await?;
        for d in &mut self.disks {
            let job = ended.iter().find(|j| j.device == job_id(&d.disk));
            match job.and_then(|j| j.error.clone()) {
                Some(err) => {
                    d.last.state = DiskState::Failed;
                    return Err(disk_error(&d.disk, &err));
                }
                None => {
                    d.last.state = DiskState::Completed;
                    d.last.remaining_bytes = 0;
                    if let Some(j) = job {
                        d.last.copied_bytes = j.offset;
                        d.last.total_bytes = j.len;
                    }
                }
            }
        }
        for d in &mut self.disks {
            release(qmp, &d.disk).await;
            d.started = false;
        }
        info!("mirrors completed; destination images consistent");
        Ok(())
    }

    /// Stops every mirror and detaches its export, best effort; the source's images were only
    /// read, so the guest goes on with them as before.
    pub async fn abort(&mut self, qmp: &Qmp) {
        for d in &mut self.disks {
            if matches!(d.last.state, DiskState::Copying | DiskState::Synced) {
                d.last.state = DiskState::Cancelled;
            }
        }
        let started: Vec<String> = self
            .disks
            .iter()
            .filter(|d| d.started)
            .map(|d| d.disk.clone())
            .collect();
        abort_disks(qmp, &started).await;
        for d in &mut self.disks {
            d.started = false;
        }
    }

    fn disk_ids(&self) -> Vec<String> {
        self.disks.iter().map(|d| d.disk.clone()).collect()
    }
}

/// Stops every Ferry mirror this QEMU runs, whoever started it (an agent that restarted
/// mid-copy no longer knows them): the guest keeps its own disks.
pub async fn abort_all(qmp: &Qmp) {
    let Ok(jobs) = qmp.execute(&QueryBlockJobs).await else {
        return;
    };
    let disks: Vec<String> = jobs
        .iter()
        .filter_map(|j| j.device.strip_prefix("ferry-mirror-").map(str::to_string))
        .collect();
    if !disks.is_empty() {
        warn!(?disks, "stopping mirrors left from an earlier attempt");
        abort_disks(qmp, &disks).await;
    }
}

async fn abort_disks(qmp: &Qmp, disks: &[String]) {
    for disk in disks {
        let _ = qmp
            .execute(&BlockJobCancel {
                device: job_id(disk),
                force: Some(true),
            })
            .await;
    }
    if let Err(e) = wait_concluded(qmp, disks).await {
        warn!(error = %e, "mirrors did not confirm their end");
    }
    for disk in disks {
        release(qmp, disk).await;
    }
}

/// Dismisses a disk's concluded job and removes its NBD client node.
async fn release(qmp: &Qmp, disk: &str) {
    let _ = qmp.execute(&JobDismiss { id: job_id(disk) }).await;
    if let Err(e) = qmp
        .execute(&BlockdevDel {
            node_name: target_node(disk),
        })
        .await
    {
        // Absent already (never added), or still in use by a job that did not end.
        tracing::debug!(disk, error = %e, "mirror target node not removed");
    }
}

/// Waits until the jobs of `disks` are concluded or gone; returns their last entries.
async fn wait_concluded(qmp: &Qmp, disks: &[String]) -> Result<Vec<BlockJobInfo>, MigrateError> {
    let ids: Vec<String> = disks.iter().map(|d| job_id(d)).collect();
    let deadline = Instant::now() + END_TIMEOUT;
    loop {
        let jobs = qmp.execute(&QueryBlockJobs).await?;
        let mine: Vec<BlockJobInfo> = jobs
            .into_iter()
            .filter(|j| ids.contains(&j.device))
            .collect();
        if mine
            .iter()
            .all(|j| j.status == "concluded" || j.status == "null")
        {
            return Ok(mine);
        }
        if Instant::now() > deadline {
            return Err(MigrateError::Failed(format!(
                "disk mirrors did not end within {} s",
                END_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn disk_error(disk: &str, message: &str) -> MigrateError {
    MigrateError::DiskCopy {
        disk: disk.to_string(),
        reason: DiskCopyFailure::from_message(message),
        message: message.to_string(),
    }
}

/// One sample of a running mirror (pure, for tests).
fn progress_of(
    disk: &str,
    job: &BlockJobInfo,
    window: &mut VecDeque<(u64, u64)>,
    elapsed_ms: u64,
) -> DiskProgress {
    window.push_back((elapsed_ms, job.offset));
    while window.len() > 2
        && window
            .front()
            .is_some_and(|(t, _)| elapsed_ms.saturating_sub(*t) > RATE_WINDOW_MS)
    {
        window.pop_front();
    }
    let rate_bps = match (window.front(), window.back()) {
        (Some(&(t0, b0)), Some(&(t1, b1))) if t1 > t0 => {
            b1.saturating_sub(b0) as f64 * 1000.0 / (t1 - t0) as f64
        }
        _ => 0.0,
    };
    DiskProgress {
        disk: disk.to_string(),
        state: if job.ready {
            DiskState::Synced
        } else {
            DiskState::Copying
        },
        copied_bytes: job.offset,
        remaining_bytes: job.len.saturating_sub(job.offset),
        total_bytes: job.len,
        rate_bps,
    }
}

/// Overall percent with disks and memory weighed by their bytes: `mem_done` of `mem_total`
/// memory bytes, and each disk's copied share of its total.
pub fn overall_percent(disks: &[DiskProgress], mem_done: u64, mem_total: u64) -> f64 {
    let disk_total: u64 = disks.iter().map(|d| d.total_bytes).sum();
    let disk_done: u64 = disks
        .iter()
        .map(|d| match d.state {
            DiskState::Synced | DiskState::Completed => d.total_bytes,
            _ => d.copied_bytes.min(d.total_bytes),
        })
        .sum();
    let total = disk_total + mem_total;
    if total == 0 {
        return 0.0;
    }
    ((disk_done + mem_done.min(mem_total)) as f64 * 100.0 / total as f64).min(100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(offset: u64, len: u64, ready: bool) -> BlockJobInfo {
        serde_json::from_value(serde_json::json!({
            "device": "ferry-mirror-disk0", "type": "mirror", "len": len, "offset": offset,
            "ready": ready, "status": if ready { "ready" } else { "running" }, "speed": 0,
            "busy": true, "paused": false, "io-status": "ok", "auto-finalize": true,
            "auto-dismiss": false
        }))
        .unwrap()
    }

    #[test]
    fn a_sample_has_the_rate_and_what_remains() {
        let mut w = VecDeque::new();
        let p = progress_of("disk0", &job(0, 1 << 30, false), &mut w, 0);
        assert_eq!((p.state, p.remaining_bytes), (DiskState::Copying, 1 << 30));
        let p = progress_of("disk0", &job(100 << 20, 1 << 30, false), &mut w, 1000);
        assert_eq!(p.copied_bytes, 100 << 20);
        assert!(
            (p.rate_bps - (100 << 20) as f64).abs() < 1.0,
            "{}",
            p.rate_bps
        );
        let p = progress_of("disk0", &job(1 << 30, 1 << 30, true), &mut w, 2000);
        assert_eq!((p.state, p.remaining_bytes), (DiskState::Synced, 0));
    }

    #[test]
    fn the_mirror_speed_grows_with_the_share_of_zero_ranges() {
        let t = |size, allocated| MirrorTarget {
            disk: "d".into(),
            addr: "10.0.0.1:1".parse().unwrap(),
            export: "e".into(),
            top_only: false,
            size_bytes: size,
            allocated_bytes: allocated,
        };
        assert_eq!(mirror_speed(1 << 20, &t(1 << 30, 1 << 30)), 1 << 20);
        assert_eq!(mirror_speed(1 << 20, &t(1 << 30, 1 << 28)), 4 << 20);
        assert_eq!(mirror_speed(1 << 20, &t(1 << 30, 1)), 64 << 20);
        assert_eq!(mirror_speed(1 << 20, &t(0, 0)), 1 << 20);
    }

    #[test]
    fn overall_percent_weighs_disks_and_memory_by_bytes() {
        let disk = |state, copied, total| DiskProgress {
            disk: "d".into(),
            state,
            copied_bytes: copied,
            remaining_bytes: total - copied,
            total_bytes: total,
            rate_bps: 0.0,
        };
        // 3 GiB of disk half copied, 1 GiB of memory not started: 1.5 of 4 GiB.
        let p = overall_percent(&[disk(DiskState::Copying, 3 << 29, 3 << 30)], 0, 1 << 30);
        assert!((p - 37.5).abs() < 1e-9, "{p}");
        // Disk in sync, memory half sent.
        let p = overall_percent(
            &[disk(DiskState::Synced, 3 << 30, 3 << 30)],
            1 << 29,
            1 << 30,
        );
        assert!((p - 87.5).abs() < 1e-9, "{p}");
        assert_eq!(overall_percent(&[], 0, 0), 0.0);
    }

    #[test]
    fn block_job_errors_get_codes() {
        let code = |m: &str| DiskCopyFailure::from_message(m).code();
        assert_eq!(code("No space left on device"), "no-space");
        assert_eq!(code("Connection reset by peer"), "link-lost");
        assert_eq!(code("Input/output error"), "link-lost");
        assert_eq!(code("Invalid argument"), "disk-copy-failed");
    }
}
