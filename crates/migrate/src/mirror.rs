//! Block migration, source side: each local disk copied into the destination's NBD export,
//! in a way a failed attempt can be resumed from.
//!
//! The destination exports each image over NBD; the source adds an NBD client node for it.
//! Every copy is driven by a dirty bitmap on the disk's node (`ferry-resume-...`, persistent
//! in a qcow2 image) that always holds what the destination image may lack:
//!
//! 1. **Passes** (`blockdev-backup`, `bitmap-mode: always`). The first pass copies the disk
//!    (`sync: full`, or `top` for an overlay on a shared base); a resumed copy starts from
//!    the bitmap instead (`sync: bitmap`). After a pass the bitmap holds what the guest wrote
//!    meanwhile; further passes copy that while it shrinks (or is small next to the disk).
//!    A pass that fails or is cancelled leaves in the bitmap what it had not copied yet, so
//!    nothing is ever sent twice on a retry.
//! 2. **In sync.** Once little is left, a write-blocking mirror (`sync: none`) starts: from
//!    then on every guest write reaches both images before the guest hears it is done. What
//!    the bitmap held at that moment is frozen into `ferry-final`. A guest that rewrites its
//!    disk faster than the passes gain on it gets a write-blocking `sync: full` mirror
//!    instead, which converges whatever the guest does (it resends the disk's data).
//! 3. **Switchover** ([`Mirrors::complete`], the guest stopped at `pre-switchover`): each
//!    mirror ends with `block-job-cancel` (for a mirror in sync: no pivot, the target
//!    consistent), then one last pass copies `ferry-final`, which is small by construction.
//!
//! Any failure or cancel before that ends every job ([`Mirrors::abort`]); the source's images
//! were only read, so the guest goes on with them, and the bitmap stays for a retry.
//!
//! Unallocated and zero ranges are not sent as data: both jobs write zeroes with NBD's
//! WRITE_ZEROES, which carries no payload.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferry_qmp::commands::{
    BlockDirtyBitmapAdd, BlockDirtyBitmapRemove, BlockJobCancel, BlockJobInfo, BlockNodeInfo,
    BlockdevAddNbd, BlockdevBackup, BlockdevDel, BlockdevMirror, JobDismiss, QueryBlockJobs,
    QueryNamedBlockNodes, Transaction,
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
    /// limit into QEMU's copy speed, which counts zero ranges too.
    #[serde(default)]
    pub size_bytes: u64,
    #[serde(default)]
    pub allocated_bytes: u64,
    /// The dirty bitmap on the source's disk node that records what the destination image
    /// lacks (empty: [`DEFAULT_BITMAP`]). It outlives a failed attempt.
    #[serde(default)]
    pub bitmap: String,
    /// The destination image holds an earlier attempt's copy, and `bitmap` what it lacks:
    /// only that is sent (everything, when the bitmap is gone or untrustworthy).
    #[serde(default)]
    pub resume: bool,
}

/// The bitmap name when the server names none.
pub const DEFAULT_BITMAP: &str = "ferry-resume";

/// The frozen bitmap of what the switchover still copies, with the guest stopped.
pub const FINAL_BITMAP: &str = "ferry-final";

/// Below this much data left after a pass, a disk goes in sync: the switchover's last pass
/// copies at most about this much with the guest stopped.
pub const FINAL_BYTES_MAX: u64 = 2 << 20;

/// Passes after the first before a disk whose guest keeps rewriting it gets a full mirror.
const MAX_CATCH_UP_PASSES: u32 = 8;

/// QEMU's copy speed for a disk that may send `bytes_per_sec` of data: a job's speed counts
/// every range it passes, zero ranges (sent without data) included, so it is raised by the
/// share of the disk that holds data (at most 64 times).
pub fn mirror_speed(bytes_per_sec: u64, t: &MirrorTarget) -> u64 {
    copy_speed(bytes_per_sec, t.size_bytes, t.allocated_bytes)
}

/// QEMU's speed for a job that goes through `cover` bytes of a disk holding `data` bytes
/// (0: unknown): what `cover` holds beyond the disk's data must be zero ranges.
pub fn copy_speed(bytes_per_sec: u64, cover: u64, data: u64) -> u64 {
    if cover == 0 || data == 0 || data >= cover {
        return bytes_per_sec.max(1);
    }
    let factor = (cover as f64 / data as f64).min(64.0);
    ((bytes_per_sec as f64 * factor) as u64).max(1)
}

/// Where one disk's copy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskState {
    /// Passes (or the fallback mirror) run in the background.
    Copying,
    /// In sync; every guest write goes to both images (write-blocking).
    Synced,
    /// Ended consistently at switchover: the destination's image is complete.
    Completed,
    /// Stopped before switchover; the destination's image is incomplete.
    Cancelled,
    Failed,
}

/// One disk's copy, as samples and the job's record show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskProgress {
    pub disk: String,
    pub state: DiskState,
    /// How far the copy got through the disk, re-copies of rewritten data included. Zero
    /// and unallocated ranges count without being sent as data.
    pub copied_bytes: u64,
    /// What is left before the copy is in sync.
    pub remaining_bytes: u64,
    /// Copied plus remaining: grows when the guest rewrites data already copied.
    pub total_bytes: u64,
    /// Recent copy rate, bytes per second.
    pub rate_bps: f64,
    /// The copy continued an earlier attempt's: only what that one had not sent went.
    #[serde(default)]
    pub resumed: bool,
    /// Copy passes finished so far (the first copies the disk, the next what the guest
    /// wrote meanwhile).
    #[serde(default)]
    pub passes: u32,
    /// The guest rewrote the disk faster than the passes gained: a write-blocking mirror of
    /// the whole disk took over (it resends the disk's data).
    #[serde(default)]
    pub whole_disk_mirror: bool,
}

/// The job id of a disk's copy passes.
pub fn copy_job_id(disk: &str) -> String {
    format!("ferry-copy-{disk}")
}

/// The job id of a disk's mirror.
pub fn job_id(disk: &str) -> String {
    format!("ferry-mirror-{disk}")
}

/// The node name of the NBD client a disk is copied into.
pub fn target_node(disk: &str) -> String {
    format!("{}-mirror", ferry_qemu::node_name(disk))
}

/// How long the last writes of a mirror may take to reach the destination at switchover, and
/// a cancelled job to stop.
const END_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an aborted copy may take to end by itself before it is forced.
const GRACEFUL_END: Duration = Duration::from_secs(5);

/// The copy rate is averaged over this long.
const RATE_WINDOW_MS: u64 = 2000;

/// What follows a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterPass {
    /// Little is left: a write-blocking mirror, the rest at switchover.
    Track,
    /// Another pass over what the guest wrote meanwhile.
    Pass,
    /// The guest outpaces the passes: a write-blocking mirror of the whole disk.
    FullMirror,
}

/// A pass over at most this share of what a whole-disk mirror would resend is worth it even
/// when it did not gain: on a loaded host one pass can take longer than the one before by
/// chance, and resending a whole disk for that is the worse trade (a resumed copy's passes
/// are small next to the disk).
const CHEAP_PASS_SHARE: u64 = 20;

/// After pass `pass` (0: the first) left `left` bytes, where the one before left
/// `left_before`, on a disk whose whole-disk mirror would resend `data` bytes (pure, for
/// tests).
fn after_pass(pass: u32, left: u64, left_before: u64, data: u64) -> AfterPass {
    let gaining = pass == 0
        || (left as f64) < 0.9 * left_before as f64
        || left.saturating_mul(CHEAP_PASS_SHARE) <= data;
    if left <= FINAL_BYTES_MAX {
        AfterPass::Track
    } else if gaining && pass < MAX_CATCH_UP_PASSES {
        AfterPass::Pass
    } else {
        AfterPass::FullMirror
    }
}

/// Which job a disk's copy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// A backup pass: 0 is the first (the whole disk, or the resumed bitmap).
    Pass(u32),
    /// A write-blocking mirror, not yet in sync.
    Mirror,
    /// The mirror is in sync and write-blocking.
    Synced,
    /// Nothing runs any more.
    Ended,
}

struct Tracked {
    disk: String,
    bitmap: String,
    top_only: bool,
    /// The disk's share of the bandwidth cap, and the same as QEMU's speed for a whole-disk
    /// job (see [`mirror_speed`]).
    share: Option<u64>,
    whole_disk_speed: Option<u64>,
    /// The disk's virtual size and data (0: unknown), for each pass's speed.
    size: u64,
    allocated: u64,
    stage: Stage,
    /// Bytes earlier jobs of this copy went through.
    done: u64,
    /// Data the previous pass left.
    left_before: u64,
    /// `ferry-final` exists on the disk's node.
    final_bitmap: bool,
    window: VecDeque<(u64, u64)>,
    last: DiskProgress,
    /// The target node exists in QEMU (and maybe a job).
    started: bool,
}

impl Tracked {
    fn new(disk: &str, state: DiskState, started: bool) -> Tracked {
        Tracked {
            disk: disk.to_string(),
            bitmap: DEFAULT_BITMAP.to_string(),
            top_only: false,
            share: None,
            whole_disk_speed: None,
            size: 0,
            allocated: 0,
            stage: Stage::Ended,
            done: 0,
            left_before: 0,
            final_bitmap: false,
            window: VecDeque::new(),
            last: DiskProgress {
                disk: disk.to_string(),
                state,
                copied_bytes: 0,
                remaining_bytes: 0,
                total_bytes: 0,
                rate_bps: 0.0,
                resumed: false,
                passes: 0,
                whole_disk_mirror: false,
            },
            started,
        }
    }

    fn node(&self) -> String {
        ferry_qemu::node_name(&self.disk)
    }

    fn fail(&mut self, message: &str) -> MigrateError {
        self.last.state = DiskState::Failed;
        disk_error(&self.disk, message)
    }

    /// Starts a backup pass: the first one copies `sync` (`full`, `top` or `bitmap`), the
    /// later ones the bitmap.
    async fn start_pass(
        &mut self,
        qmp: &Qmp,
        pass: u32,
        sync: &'static str,
    ) -> Result<(), MigrateError> {
        // A resumed bitmap may cover much of the disk's zero ranges; a catch-up pass's is
        // the guest's writes.
        let cover = match sync {
            "bitmap" => bitmap_count(qmp, &self.node(), &self.bitmap)
                .await?
                .unwrap_or(0),
            _ => self.size,
        };
        let speed = self
            .share
            .map(|share| copy_speed(share, cover, self.allocated));
        qmp.execute(&BlockdevBackup {
            job_id: copy_job_id(&self.disk),
            device: self.node(),
            target: target_node(&self.disk),
            sync,
            bitmap: Some(self.bitmap.clone()),
            bitmap_mode: Some("always"),
            on_target_error: "report",
            speed,
            auto_dismiss: false,
        })
        .await
        .map_err(|e| self.fail(&e.to_string()))?;
        self.stage = Stage::Pass(pass);
        Ok(())
    }

    /// After pass `pass` left `left` bytes in the bitmap: another pass, or in sync.
    async fn after_pass(&mut self, qmp: &Qmp, pass: u32, left: u64) -> Result<(), MigrateError> {
        let data = if self.allocated > 0 {
            self.allocated
        } else {
            self.size
        };
        let next = after_pass(pass, left, self.left_before, data);
        self.left_before = left;
        match next {
            AfterPass::Track => return self.start_tracking(qmp, left).await,
            AfterPass::Pass => return self.start_pass(qmp, pass + 1, "bitmap").await,
            AfterPass::FullMirror => {}
        }
        info!(disk = %self.disk, left, passes = pass + 1,
            "the passes stopped gaining on the guest's writes; a full mirror takes over");
        qmp.execute(&BlockdevMirror {
            job_id: job_id(&self.disk),
            device: self.node(),
            target: target_node(&self.disk),
            sync: if self.top_only { "top" } else { "full" },
            // The guest already outpaced the passes: its writes go to both images from now
            // on, so the mirror's copy of the rest converges.
            copy_mode: "write-blocking",
            on_target_error: "report",
            speed: self.whole_disk_speed,
            auto_dismiss: false,
        })
        .await
        .map_err(|e| self.fail(&e.to_string()))?;
        self.last.whole_disk_mirror = true;
        self.stage = Stage::Mirror;
        Ok(())
    }

    /// Little is left: a write-blocking mirror keeps the target in sync from now on, and what
    /// the bitmap holds is frozen for the switchover's last pass.
    async fn start_tracking(&mut self, qmp: &Qmp, left: u64) -> Result<(), MigrateError> {
        qmp.execute(&BlockdevMirror {
            job_id: job_id(&self.disk),
            device: self.node(),
            target: target_node(&self.disk),
            sync: "none",
            copy_mode: "write-blocking",
            on_target_error: "report",
            speed: None,
            auto_dismiss: false,
        })
        .await
        .map_err(|e| self.fail(&e.to_string()))?;
        qmp.execute(&Transaction::snapshot_bitmap(
            &self.node(),
            &self.bitmap,
            FINAL_BITMAP,
        ))
        .await
        .map_err(|e| self.fail(&e.to_string()))?;
        self.final_bitmap = true;
        self.stage = Stage::Mirror;
        info!(disk = %self.disk, left, "write-blocking mirror started; the rest goes at switchover");
        Ok(())
    }

    /// Reads this disk's job from `jobs` and moves its copy on.
    async fn step(
        &mut self,
        qmp: &Qmp,
        jobs: &[BlockJobInfo],
        elapsed_ms: u64,
    ) -> Result<(), MigrateError> {
        match self.stage {
            Stage::Pass(pass) => {
                let id = copy_job_id(&self.disk);
                let Some(job) = jobs.iter().find(|j| j.device == id) else {
                    return Err(self.fail("its copy job is gone from QEMU"));
                };
                if let Some(err) = &job.error {
                    return Err(self.fail(err));
                }
                if job.status != "concluded" {
                    self.sample(job.offset, job.len, false, elapsed_ms);
                    return Ok(());
                }
                let _ = qmp.execute(&JobDismiss { id }).await;
                self.done += job.offset;
                self.last.passes = pass + 1;
                let left = bitmap_count(qmp, &self.node(), &self.bitmap)
                    .await?
                    .ok_or_else(|| self.fail("its dirty bitmap is gone"))?;
                self.sample(0, left, false, elapsed_ms);
                self.after_pass(qmp, pass, left).await
            }
            Stage::Mirror | Stage::Synced => {
                let id = job_id(&self.disk);
                let Some(job) = jobs.iter().find(|j| j.device == id) else {
                    return Err(self.fail("its mirror job is gone from QEMU"));
                };
                if let Some(err) = &job.error {
                    return Err(self.fail(err));
                }
                if job.status == "concluded" {
                    return Err(self.fail("its mirror ended early"));
                }
                if self.stage == Stage::Mirror && job.ready {
                    info!(disk = %self.disk, "in sync: guest writes reach both hosts before they complete");
                    self.stage = Stage::Synced;
                }
                let synced = self.stage == Stage::Synced;
                self.sample(job.offset, job.len, synced, elapsed_ms);
                Ok(())
            }
            Stage::Ended => Ok(()),
        }
    }

    fn sample(&mut self, offset: u64, len: u64, synced: bool, elapsed_ms: u64) {
        let (resumed, passes, whole) = (
            self.last.resumed,
            self.last.passes,
            self.last.whole_disk_mirror,
        );
        self.last = progress_of(
            &self.disk,
            self.done + offset,
            len.saturating_sub(offset),
            synced,
            &mut self.window,
            elapsed_ms,
        );
        self.last.resumed = resumed;
        self.last.passes = passes;
        self.last.whole_disk_mirror = whole;
    }
}

/// The copies of one migration's local disks.
pub struct Mirrors {
    disks: Vec<Tracked>,
}

impl Mirrors {
    /// Nothing to copy (every disk is on shared storage).
    pub fn none() -> Mirrors {
        Mirrors { disks: Vec::new() }
    }

    pub fn is_empty(&self) -> bool {
        self.disks.is_empty()
    }

    /// Some job still runs in QEMU (not yet completed or aborted).
    pub fn is_live(&self) -> bool {
        self.disks.iter().any(|d| d.started)
    }

    /// The Ferry mirrors this QEMU already runs (found after an agent restart), taken as in
    /// sync: the memory stream starts only once they are.
    pub async fn adopt(qmp: &Qmp) -> Mirrors {
        let jobs = qmp.execute(&QueryBlockJobs).await.unwrap_or_default();
        let nodes = qmp
            .execute(&QueryNamedBlockNodes { flat: true })
            .await
            .unwrap_or_default();
        let disks = jobs
            .iter()
            .filter_map(|j| j.device.strip_prefix("ferry-mirror-"))
            .map(|disk| {
                let mut d = Tracked::new(disk, DiskState::Synced, true);
                d.stage = Stage::Synced;
                d.final_bitmap = find_bitmap(&nodes, &d.node(), FINAL_BITMAP).is_some();
                d
            })
            .collect();
        Mirrors { disks }
    }

    /// Attaches each export and starts each disk's first pass, the disks sharing
    /// `bandwidth`. On failure the copies already started are aborted before the error
    /// returns.
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
                .map(|t| {
                    let mut d = Tracked::new(&t.disk, DiskState::Copying, false);
                    if !t.bitmap.is_empty() {
                        d.bitmap = t.bitmap.clone();
                    }
                    d.top_only = t.top_only;
                    d.share = share;
                    d.whole_disk_speed = share.map(|b| mirror_speed(b, t));
                    d.size = t.size_bytes;
                    d.allocated = t.allocated_bytes;
                    d
                })
                .collect(),
        };
        let tls = crate::tls::nbd_client_tls(qmp).await?;
        for (i, t) in targets.iter().enumerate() {
            if let Err(e) = mirrors.start_one(qmp, i, t, &tls).await {
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
        tls: &Option<(String, Option<String>)>,
    ) -> Result<(), MigrateError> {
        let d = &mut self.disks[i];
        let fail = |e: QmpError| disk_error(&t.disk, &e.to_string());
        let mut add = BlockdevAddNbd::new(target_node(&t.disk), t.addr, t.export.clone());
        // The disk travels with the memory's credentials: an encrypted migration never
        // sends its disks in the clear.
        if let Some((creds, hostname)) = tls.clone() {
            add.tls_creds = Some(creds);
            add.tls_hostname = hostname;
        }
        qmp.execute(&add).await.map_err(fail)?;
        d.started = true;
        let resumable = prepare_bitmap(qmp, &d.node(), &d.bitmap, t.resume)
            .await
            .map_err(fail)?;
        // A reused image whose bitmap is lost is overwritten whole, zero ranges included.
        let sync = match (resumable, t.resume, t.top_only) {
            (true, _, _) => "bitmap",
            (false, false, true) => "top",
            _ => "full",
        };
        d.last.resumed = resumable;
        if t.resume && !resumable {
            warn!(disk = %t.disk, "the earlier attempt's bitmap is gone or untrustworthy; copying the whole disk again");
        }
        d.start_pass(qmp, 0, sync).await?;
        info!(disk = %t.disk, addr = %t.addr, sync, bitmap = %d.bitmap, "disk copy started");
        Ok(())
    }

    /// Reads every copy's state and moves it on (next pass, mirror, in sync); a job that
    /// failed or vanished is an error (the caller aborts the rest).
    pub async fn sample(&mut self, qmp: &Qmp, elapsed_ms: u64) -> Result<(), MigrateError> {
        let jobs = qmp.execute(&QueryBlockJobs).await?;
        for d in &mut self.disks {
            d.step(qmp, &jobs, elapsed_ms).await?;
        }
        Ok(())
    }

    /// The last state of every disk.
    pub fn progress(&self) -> Vec<DiskProgress> {
        self.disks.iter().map(|d| d.last.clone()).collect()
    }

    /// Every disk is in sync.
    pub fn all_ready(&self) -> bool {
        self.disks.iter().all(|d| d.stage == Stage::Synced)
    }

    /// With the guest stopped (pre-switchover): ends every mirror consistently, copies what
    /// each disk's `ferry-final` holds, then detaches the exports: each destination image
    /// then holds exactly what the source's does.
    pub async fn complete(&mut self, qmp: &Qmp) -> Result<(), MigrateError> {
        for d in &self.disks {
            qmp.execute(&BlockJobCancel {
                device: job_id(&d.disk),
                force: None,
            })
            .await
            .map_err(|e| disk_error(&d.disk, &e.to_string()))?;
        }
        let mirror_ids: Vec<String> = self.disks.iter().map(|d| job_id(&d.disk)).collect();
        let ended = wait_concluded(qmp, &mirror_ids).await?;
        for d in &mut self.disks {
            let job = ended.iter().find(|j| j.device == job_id(&d.disk));
            if let Some(err) = job.and_then(|j| j.error.clone()) {
                return Err(d.fail(&err));
            }
            d.done += job.map_or(0, |j| j.offset);
            let _ = qmp
                .execute(&JobDismiss {
                    id: job_id(&d.disk),
                })
                .await;
        }
        // The last pass, guest stopped: what the bitmap held when each mirror took over.
        let started = Instant::now();
        let mut finals = Vec::new();
        for d in &mut self.disks {
            if !d.final_bitmap {
                continue;
            }
            let left = bitmap_count(qmp, &d.node(), FINAL_BITMAP)
                .await?
                .unwrap_or(0);
            if left == 0 {
                continue;
            }
            qmp.execute(&BlockdevBackup {
                job_id: copy_job_id(&d.disk),
                device: d.node(),
                target: target_node(&d.disk),
                sync: "bitmap",
                bitmap: Some(FINAL_BITMAP.into()),
                bitmap_mode: Some("never"),
                on_target_error: "report",
                speed: None,
                auto_dismiss: false,
            })
            .await
            .map_err(|e| d.fail(&e.to_string()))?;
            finals.push(copy_job_id(&d.disk));
        }
        let ended = wait_concluded(qmp, &finals).await?;
        for d in &mut self.disks {
            if let Some(job) = ended.iter().find(|j| j.device == copy_job_id(&d.disk)) {
                if let Some(err) = &job.error {
                    return Err(d.fail(err));
                }
                d.done += job.offset;
                let _ = qmp
                    .execute(&JobDismiss {
                        id: copy_job_id(&d.disk),
                    })
                    .await;
            }
            d.last.state = DiskState::Completed;
            d.last.remaining_bytes = 0;
            d.last.copied_bytes = d.done;
            d.last.total_bytes = d.done;
            d.stage = Stage::Ended;
        }
        if !finals.is_empty() {
            info!(
                ms = started.elapsed().as_millis() as u64,
                "last disk pass done with the guest stopped"
            );
        }
        for d in &mut self.disks {
            release(qmp, &d.disk).await;
            d.started = false;
        }
        info!("disk copies completed; destination images consistent");
        Ok(())
    }

    /// Stops every job and detaches its export, best effort; the source's images were only
    /// read, so the guest goes on with them as before. Each disk's bitmap stays: it holds
    /// what the destination image lacks, for a retry.
    pub async fn abort(&mut self, qmp: &Qmp) {
        for d in &mut self.disks {
            if matches!(d.last.state, DiskState::Copying | DiskState::Synced) {
                d.last.state = DiskState::Cancelled;
            }
            d.stage = Stage::Ended;
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
            d.final_bitmap = false;
        }
    }
}

/// Makes `bitmap` on `node` ready for a copy: kept when `resume` asks for it and it can be
/// trusted (true), otherwise made anew (false). Every other Ferry bitmap on the node (an
/// earlier attempt's, a leftover `ferry-final`) is removed. Persistent on qcow2, so it
/// outlives a clean stop of this QEMU.
async fn prepare_bitmap(
    qmp: &Qmp,
    node: &str,
    bitmap: &str,
    resume: bool,
) -> Result<bool, QmpError> {
    let nodes = qmp.execute(&QueryNamedBlockNodes { flat: true }).await?;
    let info = nodes.iter().find(|n| n.node_name == node);
    let mut resumable = false;
    for b in info.map_or(&[][..], |n| &n.dirty_bitmaps[..]) {
        let Some(name) = b.name.as_deref() else {
            continue;
        };
        if name == bitmap && resume && b.recording && !b.inconsistent {
            resumable = true;
        } else if name.starts_with("ferry-") {
            let _ = qmp
                .execute(&BlockDirtyBitmapRemove {
                    node: node.into(),
                    name: name.into(),
                })
                .await;
        }
    }
    if !resumable {
        let persistent = info.is_some_and(|n| n.drv == "qcow2");
        let add = |persistent| BlockDirtyBitmapAdd {
            node: node.into(),
            name: bitmap.into(),
            persistent,
            disabled: false,
        };
        if let Err(e) = qmp.execute(&add(persistent)).await {
            if !persistent {
                return Err(e);
            }
            // A read-only image cannot store one: the bitmap then lives as long as QEMU.
            qmp.execute(&add(false)).await?;
        }
    }
    Ok(resumable)
}

fn find_bitmap<'a>(
    nodes: &'a [BlockNodeInfo],
    node: &str,
    name: &str,
) -> Option<&'a ferry_qmp::commands::DirtyBitmapInfo> {
    nodes
        .iter()
        .find(|n| n.node_name == node)?
        .dirty_bitmaps
        .iter()
        .find(|b| b.name.as_deref() == Some(name))
}

/// The bytes `name` on `node` marks dirty; `None` when there is no such bitmap.
async fn bitmap_count(qmp: &Qmp, node: &str, name: &str) -> Result<Option<u64>, MigrateError> {
    let nodes = qmp.execute(&QueryNamedBlockNodes { flat: true }).await?;
    Ok(find_bitmap(&nodes, node, name).map(|b| b.count))
}

/// Stops every Ferry copy this QEMU runs, whoever started it (an agent that restarted
/// mid-copy no longer knows them): the guest keeps its own disks.
pub async fn abort_all(qmp: &Qmp) {
    let Ok(jobs) = qmp.execute(&QueryBlockJobs).await else {
        return;
    };
    let mut disks: Vec<String> = jobs
        .iter()
        .filter_map(|j| {
            j.device
                .strip_prefix("ferry-mirror-")
                .or_else(|| j.device.strip_prefix("ferry-copy-"))
                .map(str::to_string)
        })
        .collect();
    disks.sort();
    disks.dedup();
    if !disks.is_empty() {
        warn!(?disks, "stopping disk copies left from an earlier attempt");
        abort_disks(qmp, &disks).await;
    }
}

async fn abort_disks(qmp: &Qmp, disks: &[String]) {
    let ids: Vec<String> = disks
        .iter()
        .flat_map(|d| [job_id(d), copy_job_id(d)])
        .collect();
    // First without force: a mirror in sync then ends as at a switchover, its in-flight
    // writes finished. QEMU 10.0 was seen to corrupt its heap ("corrupted double-linked
    // list", at the NBD node's blockdev-del) after a forced cancel of a write-blocking
    // mirror while the guest wrote; the graceful end never did. Force only when the
    // graceful one does not come (a target that stopped answering).
    for force in [false, true] {
        for id in &ids {
            let _ = qmp
                .execute(&BlockJobCancel {
                    device: id.clone(),
                    force: force.then_some(true),
                })
                .await;
        }
        let patience = if force { END_TIMEOUT } else { GRACEFUL_END };
        match wait_concluded_within(qmp, &ids, patience).await {
            Ok(_) => break,
            Err(e) if force => warn!(error = %e, "disk copies did not confirm their end"),
            Err(_) => warn!("disk copies did not end gracefully; forcing them"),
        }
    }
    for disk in disks {
        let _ = qmp
            .execute(&JobDismiss {
                id: copy_job_id(disk),
            })
            .await;
        let _ = qmp
            .execute(&BlockDirtyBitmapRemove {
                node: ferry_qemu::node_name(disk),
                name: FINAL_BITMAP.into(),
            })
            .await;
        release(qmp, disk).await;
    }
}

/// Dismisses a disk's concluded mirror and removes its NBD client node, once QEMU no longer
/// lists the job (the node is not deleted under a job that is still being torn down).
async fn release(qmp: &Qmp, disk: &str) {
    let _ = qmp.execute(&JobDismiss { id: job_id(disk) }).await;
    let deadline = Instant::now() + GRACEFUL_END;
    while Instant::now() < deadline {
        let jobs = qmp.execute(&QueryBlockJobs).await.unwrap_or_default();
        if !jobs
            .iter()
            .any(|j| j.device == job_id(disk) || j.device == copy_job_id(disk))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Err(e) = qmp
        .execute(&BlockdevDel {
            node_name: target_node(disk),
        })
        .await
    {
        // Absent already (never added), or still in use by a job that did not end.
        tracing::debug!(disk, error = %e, "copy target node not removed");
    }
}

/// Waits until the jobs `ids` are concluded or gone; returns their last entries.
async fn wait_concluded(qmp: &Qmp, ids: &[String]) -> Result<Vec<BlockJobInfo>, MigrateError> {
    wait_concluded_within(qmp, ids, END_TIMEOUT).await
}

async fn wait_concluded_within(
    qmp: &Qmp,
    ids: &[String],
    patience: Duration,
) -> Result<Vec<BlockJobInfo>, MigrateError> {
    let deadline = Instant::now() + patience;
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
                "disk copies did not end within {} s",
                patience.as_secs()
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

/// One sample of a copy: `copied` bytes so far over all its jobs, `remaining` in the
/// current one (pure, for tests).
fn progress_of(
    disk: &str,
    copied: u64,
    remaining: u64,
    synced: bool,
    window: &mut VecDeque<(u64, u64)>,
    elapsed_ms: u64,
) -> DiskProgress {
    window.push_back((elapsed_ms, copied));
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
        state: if synced {
            DiskState::Synced
        } else {
            DiskState::Copying
        },
        copied_bytes: copied,
        remaining_bytes: remaining,
        total_bytes: copied + remaining,
        rate_bps,
        resumed: false,
        passes: 0,
        whole_disk_mirror: false,
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

    #[test]
    fn a_sample_has_the_rate_and_what_remains() {
        let mut w = VecDeque::new();
        let p = progress_of("disk0", 0, 1 << 30, false, &mut w, 0);
        assert_eq!((p.state, p.remaining_bytes), (DiskState::Copying, 1 << 30));
        let p = progress_of(
            "disk0",
            100 << 20,
            (1 << 30) - (100 << 20),
            false,
            &mut w,
            1000,
        );
        assert_eq!(p.copied_bytes, 100 << 20);
        assert_eq!(p.total_bytes, 1 << 30);
        assert!(
            (p.rate_bps - (100 << 20) as f64).abs() < 1.0,
            "{}",
            p.rate_bps
        );
        let p = progress_of("disk0", 1 << 30, 0, true, &mut w, 2000);
        assert_eq!((p.state, p.remaining_bytes), (DiskState::Synced, 0));
    }

    #[test]
    fn passes_go_on_while_they_gain_and_end_in_sync_or_in_a_full_mirror() {
        let mib = |n: u64| n << 20;
        let data = mib(256);
        // Little written during the bulk copy: in sync at once.
        assert_eq!(after_pass(0, mib(1), 0, data), AfterPass::Track);
        // Much written during the bulk copy: another pass, whatever came before.
        assert_eq!(after_pass(0, mib(64), 0, data), AfterPass::Pass);
        // Shrinking by 10 % or more: another pass.
        assert_eq!(after_pass(1, mib(32), mib(64), data), AfterPass::Pass);
        // Not shrinking: the guest outpaces the passes.
        assert_eq!(after_pass(1, mib(60), mib(64), data), AfterPass::FullMirror);
        assert_eq!(after_pass(2, mib(80), mib(64), data), AfterPass::FullMirror);
        // Not shrinking, but a twentieth of the disk or less: another pass costs less
        // than resending the disk (a slow pass on a loaded host, a resumed copy).
        assert_eq!(after_pass(1, mib(12), mib(12), data), AfterPass::Pass);
        assert_eq!(after_pass(1, mib(13), mib(12), data), AfterPass::FullMirror);
        // Gaining, but for too long.
        assert_eq!(
            after_pass(MAX_CATCH_UP_PASSES, mib(8), mib(16), data),
            AfterPass::FullMirror
        );
        // Small enough beats everything.
        assert_eq!(
            after_pass(7, FINAL_BYTES_MAX, mib(1), data),
            AfterPass::Track
        );
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
            bitmap: String::new(),
            resume: false,
        };
        assert_eq!(mirror_speed(1 << 20, &t(1 << 30, 1 << 30)), 1 << 20);
        assert_eq!(mirror_speed(1 << 20, &t(1 << 30, 1 << 28)), 4 << 20);
        assert_eq!(mirror_speed(1 << 20, &t(1 << 30, 1)), 64 << 20);
        assert_eq!(mirror_speed(1 << 20, &t(0, 0)), 1 << 20);
        // A pass over a bitmap that holds no more than the disk's data goes at the cap.
        assert_eq!(copy_speed(1 << 20, 8 << 20, 1 << 28), 1 << 20);
        assert_eq!(copy_speed(1 << 20, 1 << 30, 1 << 28), 4 << 20);
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
            resumed: false,
            passes: 0,
            whole_disk_mirror: false,
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
