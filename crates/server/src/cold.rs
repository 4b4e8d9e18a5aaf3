//! A cold migration: a stopped instance moves with its disks.
//!
//! Images on storage the destination shares stay where they are. Each other image (disk, or
//! the UEFI NVRAM) is copied, one after the other, to the datastore of the same name on the
//! destination ([`crate::checks::planned_copies`]): the destination agent creates the empty
//! image and exports it on its migration address, the source agent sends the content, the
//! destination stops the export, and both agents checksum the guest-visible content. Only when
//! every copy's checksums agree is the instance defined on the destination, its definition
//! removed from the source, the copies committed on the destination, and the job completed
//! (which moves the instance in the store).
//!
//! The source's images are never written. They stay on the source after the job completed,
//! listed in the job's `copies` with `source_kept`, until [`cleanup`] removes them (`ferry
//! migration cleanup ID`, or automatically `cold_cleanup_after_s` after completion, see
//! [`run_auto_cleanup`]): data is preserved on both ends until then. A failure or cancel
//! before the end removes the destination's images and leaves the instance defined on the
//! source, untouched.
//!
//! A copy an agent lost (it restarted mid-copy: its status is `unknown`) is started again, up
//! to [`COPY_ATTEMPTS`] times; a server restarted mid-copy aborts the copies and starts them
//! again. Once the job is Completing (the instance is being redefined) it only finishes.

use std::time::{Duration, Instant};

use chrono::Utc;
use ferry_api::agent::{
    AgentInstance, ChecksumImage, ChecksumState, ChecksumStatus, CleanedUp, CleanupCopies,
    CopyReceiving, CopyState, CopyStatus, DefineInstance, ImageMeasure, MeasureImage, ReceiveCopy,
    SendCopy,
};
use ferry_api::hosts::HostFacts;
use ferry_api::instances::{DiskFormat, Instance, InstanceState};
use ferry_api::migrations::{DiskCopy, DiskCopyState, Event, Migration, MigrationState};
use ferry_api::{ApiClient, ApiError, ErrorBody};
use ferry_migrate::{Phase, Progress};
use tokio::sync::watch;
use tracing::warn;

use crate::agents::agent_client;
use crate::checks::{fmt_size, planned_copies, PlannedCopy};
use crate::driver::{log, publish_migration};
use crate::server::AppState;
use crate::ServerError;

/// How often a copy an agent lost is started again before the job fails.
pub const COPY_ATTEMPTS: u32 = 3;
/// Long poll of a copy's status and of a checksum.
const POLL_WAIT_MS: u64 = 1000;
const CHECKSUM_WAIT_MS: u64 = 10_000;

/// How a cold job ends when it does not complete.
#[derive(Debug)]
pub enum ColdEnd {
    Failed(ErrorBody),
    Cancelled,
}

impl From<ServerError> for ColdEnd {
    fn from(e: ServerError) -> Self {
        ColdEnd::Failed(e.body)
    }
}

/// How one copy attempt ended when it did not succeed.
enum AttemptEnd {
    /// An agent lost the copy (restart): start it again.
    Lost(String),
    /// The job ends.
    End(ColdEnd),
}

impl From<ColdEnd> for AttemptEnd {
    fn from(e: ColdEnd) -> Self {
        AttemptEnd::End(e)
    }
}

/// The job being driven.
struct ColdJob<'a> {
    state: &'a AppState,
    m: Migration,
    src: ApiClient,
    dst: ApiClient,
    cancel: watch::Receiver<bool>,
    planned: Vec<PlannedCopy>,
    copies: Vec<DiskCopy>,
    started: Instant,
}

/// Runs a cold migration to its end; `attach`: the server restarted while it ran.
pub async fn drive(
    state: &AppState,
    m: &Migration,
    attach: bool,
    cancel: watch::Receiver<bool>,
) -> Result<(), ColdEnd> {
    let instance = state
        .store
        .get_instance(&m.instance_id.to_string())
        .await
        .map_err(ServerError::from)?
        .ok_or_else(|| ServerError::not_found("instance", &m.instance_id.to_string()))?;
    let src = agent_client(state, &m.source).await?;
    let dst = agent_client(state, &m.destination).await?;
    let mut job = ColdJob {
        state,
        m: m.clone(),
        src,
        dst,
        cancel,
        planned: Vec::new(),
        copies: m.copies.clone(),
        started: Instant::now(),
    };
    let completing = attach && m.state == MigrationState::Completing;
    if !completing {
        job.refuse_running(&instance).await?;
    }
    job.planned = job.plan(&instance).await?;
    if !completing {
        if attach && !job.planned.is_empty() {
            job.log(
                "warn",
                "the server restarted during the disk copies: they start again",
            )
            .await;
            job.abort_all().await;
        }
        job.copy_all().await?;
        job.set_state(MigrationState::Completing).await?;
    }
    job.redefine(&instance).await?;
    Ok(())
}

impl ColdJob<'_> {
    async fn log(&self, level: &str, message: &str) {
        log(self.state, self.m.id, level, message).await;
    }

    async fn set_state(&mut self, to: MigrationState) -> Result<(), ServerError> {
        let m = self
            .state
            .store
            .set_migration_state(self.m.id, to, None)
            .await?;
        publish_migration(self.state, &m);
        self.m.state = m.state;
        Ok(())
    }

    fn cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    fn path(&self, disk: &str, tail: &str) -> String {
        format!("/v1/copies/{}/{disk}{tail}", self.m.id)
    }

    /// Calls an agent, retrying while it cannot be reached, up to [`crate::agents::AGENT_RETRY`]; a cancel
    /// ends the retries when `cancellable`.
    async fn retrying<T, F, Fut>(
        &self,
        host: &str,
        cancellable: bool,
        call: F,
    ) -> Result<T, ApiError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ApiError>>,
    {
        let cancel = cancellable.then(|| self.cancel.clone());
        let warn = |message: String| async move { self.log("warn", &message).await };
        crate::agents::retry_unreachable(host, cancel, warn, call).await
    }

    /// The existing refusal: a cold migration needs the instance stopped on the source.
    async fn refuse_running(&self, instance: &Instance) -> Result<(), ServerError> {
        let on_source: Vec<AgentInstance> = self
            .src
            .get("/v1/instances")
            .await
            .map_err(|e| ServerError::from_agent(&self.m.source, e))?;
        if on_source
            .iter()
            .any(|i| i.id == self.m.instance_id && i.state == InstanceState::Running)
        {
            return Err(ServerError::conflict(
                "instance-running",
                format!(
                    "{} runs on {}; a cold migration needs it stopped",
                    instance.name, self.m.source
                ),
                "stop it first, or migrate it live",
            ));
        }
        Ok(())
    }

    /// Which images move: those on storage the destination does not share, by both hosts'
    /// facts now (the last heartbeat's when an agent does not answer).
    async fn plan(&self, instance: &Instance) -> Result<Vec<PlannedCopy>, ServerError> {
        if instance.spec.disks.is_empty() && instance.spec.boot.nvram.is_none() {
            return Ok(Vec::new());
        }
        let src = self.facts(&self.src, &self.m.source).await?;
        let dst = self.facts(&self.dst, &self.m.destination).await?;
        Ok(planned_copies(instance, &src, &dst))
    }

    async fn facts(&self, client: &ApiClient, host: &str) -> Result<HostFacts, ServerError> {
        if let Ok(f) = self.retrying(host, true, || client.get("/v1/facts")).await {
            return Ok(f);
        }
        let offline_after = chrono::Duration::seconds(self.state.config.heartbeat_timeout_s as i64);
        self.state
            .store
            .get_host(host, offline_after, Utc::now())
            .await?
            .and_then(|h| h.facts)
            .ok_or_else(|| {
                ServerError::new(
                    503,
                    "host-unreachable",
                    format!("no facts of {host}: its agent does not answer"),
                    "check that the agent on that host runs (`ferry host list`)",
                )
            })
    }

    async fn save_copies(&self) {
        if let Err(e) = self.state.store.set_copies(self.m.id, &self.copies).await {
            warn!(id = %self.m.id, error = %e, "cannot record the disk copies");
        }
    }

    /// Every planned copy, one after the other. On failure or cancel every copy is aborted on
    /// both hosts (the destination's images removed) and the source keeps everything.
    async fn copy_all(&mut self) -> Result<(), ColdEnd> {
        self.copies = self
            .planned
            .iter()
            .map(|p| DiskCopy {
                disk: p.disk.clone(),
                image: p.image.clone(),
                target: None,
                format: p.format,
                size_bytes: p.size_bytes,
                state: DiskCopyState::Pending,
                done_bytes: 0,
                remaining_bytes: p.size_bytes,
                rate_bps: 0.0,
                elapsed_ms: 0,
                sha256: None,
                source_kept: false,
                target_kept: false,
                bitmap: None,
            })
            .collect();
        if !self.copies.is_empty() {
            self.save_copies().await;
            let names: Vec<String> = self
                .planned
                .iter()
                .map(|p| format!("{} ({})", p.disk, p.image))
                .collect();
            let message = format!(
                "copying {} image(s) {} does not share: {}",
                names.len(),
                self.m.destination,
                names.join(", ")
            );
            self.log("info", &message).await;
        }
        self.set_state(MigrationState::Migrating).await?;
        for idx in 0..self.planned.len() {
            if let Err(end) = self.copy_one(idx).await {
                self.abort_all().await;
                for c in &mut self.copies {
                    c.state = DiskCopyState::Failed;
                    c.source_kept = false;
                    c.rate_bps = 0.0;
                }
                self.save_copies().await;
                let message = format!(
                    "the destination's copies were removed; {} stays on {} with its images untouched",
                    self.m.instance_name, self.m.source
                );
                self.log("info", &message).await;
                return Err(end);
            }
        }
        Ok(())
    }

    /// One disk, started again when an agent lost it.
    async fn copy_one(&mut self, idx: usize) -> Result<(), ColdEnd> {
        let disk = self.planned[idx].disk.clone();
        let mut attempt = 1;
        loop {
            match self.attempt(idx).await {
                Ok(()) => return Ok(()),
                Err(AttemptEnd::End(e)) => return Err(e),
                Err(AttemptEnd::Lost(why)) => {
                    self.abort_disk(&disk).await;
                    if attempt >= COPY_ATTEMPTS {
                        return Err(ColdEnd::Failed(ErrorBody::new(
                            "copy-lost",
                            format!("the copy of disk {disk} was lost {attempt} times: {why}"),
                            "check that both agents stay up during the copy, then migrate again",
                        )));
                    }
                    attempt += 1;
                    let message = format!(
                        "disk {disk}: copy lost ({why}); starting it again (attempt {attempt} of {COPY_ATTEMPTS})"
                    );
                    self.log("warn", &message).await;
                }
            }
        }
    }

    /// An agent's refusal or a host that stayed unreachable, as the job's end.
    fn agent_end(host: &str, e: ApiError) -> AttemptEnd {
        AttemptEnd::End(ColdEnd::Failed(ServerError::from_agent(host, e).body))
    }

    async fn attempt(&mut self, idx: usize) -> Result<(), AttemptEnd> {
        if self.cancelled() {
            return Err(AttemptEnd::End(ColdEnd::Cancelled));
        }
        let p = self.planned[idx].clone();
        let (source, destination) = (self.m.source.clone(), self.m.destination.clone());
        // The real sizes, from the source: the new image's virtual size and the room it needs.
        let measure_body = MeasureImage {
            image: p.image.clone(),
            format: p.format,
        };
        let src = self.src.clone();
        let measured: ImageMeasure = self
            .retrying(&source, true, || {
                src.post("/v1/disks/measure", &measure_body)
            })
            .await
            .map_err(|e| Self::agent_end(&source, e))?;
        {
            let c = &mut self.copies[idx];
            c.size_bytes = measured.size_bytes;
            c.done_bytes = 0;
            c.remaining_bytes = measured.size_bytes;
            c.state = DiskCopyState::Copying;
        }
        self.save_copies().await;
        let message = format!(
            "disk {}: copying {} ({} virtual, {} allocated, read as {}) from {source} to {destination}",
            p.disk,
            p.image,
            fmt_size(measured.size_bytes),
            fmt_size(measured.allocated_bytes),
            p.format.as_str()
        );
        self.log("info", &message).await;
        // The copy travels over TLS with the migration's own pair, as a live migration's
        // streams do.
        let tls = crate::stream_tls::for_migration(self.state, &self.m)
            .await
            .map_err(|e| AttemptEnd::End(ColdEnd::Failed(e.body)))?;
        let receive = ReceiveCopy {
            image: p.image.clone(),
            format: p.format,
            size_bytes: measured.size_bytes,
            required_bytes: measured.allocated_bytes,
            tls: Some(tls.destination),
        };
        let (dst, path) = (self.dst.clone(), self.path(&p.disk, "/receive"));
        let receiving: CopyReceiving = self
            .retrying(&destination, true, || dst.post(&path, &receive))
            .await
            .map_err(|e| Self::agent_end(&destination, e))?;
        let send = SendCopy {
            image: p.image.clone(),
            format: p.format,
            destination: receiving.addr.clone(),
            export: receiving.export.clone(),
            rate_limit_bps: self
                .m
                .options
                .bandwidth_mib_s
                .map(|m| m.saturating_mul(1 << 20)),
            tls: Some(tls.source),
        };
        let (src, path) = (self.src.clone(), self.path(&p.disk, "/send"));
        let started: Result<CopyStatus, ApiError> = self
            .retrying(&source, true, || src.post(&path, &send))
            .await;
        if let Err(e) = started {
            self.abort_disk(&p.disk).await;
            return Err(Self::agent_end(&source, e));
        }
        if let Err(e) = self.follow(idx).await {
            self.abort_disk(&p.disk).await;
            return Err(e);
        }
        // The export stops, flushed; the image stays until commit or abort.
        let (dst, path) = (self.dst.clone(), self.path(&p.disk, "/finish"));
        let finished: Result<CopyStatus, ApiError> = self
            .retrying(&destination, false, || dst.post(&path, &()))
            .await;
        match finished {
            Ok(_) => {}
            Err(e) if e.status() == Some(404) => {
                self.abort_disk(&p.disk).await;
                return Err(AttemptEnd::Lost(format!(
                    "{destination} no longer has the received image"
                )));
            }
            Err(e) => {
                self.abort_disk(&p.disk).await;
                return Err(Self::agent_end(&destination, e));
            }
        }
        let (src, path) = (self.src.clone(), self.path(&p.disk, "/finish"));
        let _ = self
            .retrying(&source, false, || {
                src.post::<_, serde_json::Value>(&path, &())
            })
            .await;
        self.verify(idx).await
    }

    /// Follows the source's sending until it ends, recording progress.
    async fn follow(&mut self, idx: usize) -> Result<(), AttemptEnd> {
        let disk = self.planned[idx].disk.clone();
        let source = self.m.source.clone();
        let mut last_done: Option<u64> = None;
        let mut unreachable_since: Option<Instant> = None;
        let mut cancel = self.cancel.clone();
        loop {
            if self.cancelled() {
                self.log(
                    "info",
                    &format!("disk {disk}: cancel requested; stopping the copy"),
                )
                .await;
                return Err(AttemptEnd::End(ColdEnd::Cancelled));
            }
            let mut path = format!("{}?wait_ms={POLL_WAIT_MS}", self.path(&disk, ""));
            if let Some(d) = last_done {
                path.push_str(&format!("&after_done={d}"));
            }
            let polled = tokio::select! {
                r = self.src.get::<CopyStatus>(&path) => r,
                _ = cancel.changed() => continue,
            };
            let status = match polled {
                Ok(s) => {
                    unreachable_since = None;
                    s
                }
                Err(ApiError::Unreachable { .. }) => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > crate::agents::AGENT_RETRY {
                        return Err(AttemptEnd::Lost(format!(
                            "the agent on {source} did not answer for {} s",
                            crate::agents::AGENT_RETRY.as_secs()
                        )));
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(e) => return Err(Self::agent_end(&source, e)),
            };
            last_done = Some(status.done_bytes);
            self.record_progress(idx, &status).await;
            match status.state {
                CopyState::Sending | CopyState::Receiving => {}
                CopyState::Sent | CopyState::Received => return Ok(()),
                CopyState::Unknown | CopyState::Cancelled => {
                    return Err(AttemptEnd::Lost(format!(
                        "the agent on {source} no longer knows the copy (restarted?)"
                    )))
                }
                CopyState::Failed => {
                    // A destination that lost its export (restarted) makes the sender fail:
                    // that is a lost copy, tried again.
                    let (dst, path) = (self.dst.clone(), self.path(&disk, ""));
                    let destination = self.m.destination.clone();
                    let dst_status: Option<CopyStatus> = self
                        .retrying(&destination, true, || dst.get(&path))
                        .await
                        .ok();
                    if dst_status.is_some_and(|s| s.state == CopyState::Unknown) {
                        return Err(AttemptEnd::Lost(format!(
                            "{} lost the export (restarted?)",
                            self.m.destination
                        )));
                    }
                    let body = status.error.unwrap_or_else(|| {
                        ErrorBody::new("copy-failed", "the source reported a failed copy", "")
                    });
                    let message =
                        format!("disk {disk}: copy failed: {}: {}", body.code, body.message);
                    self.log("error", &message).await;
                    return Err(AttemptEnd::End(ColdEnd::Failed(ErrorBody::new(
                        "copy-failed",
                        format!(
                            "the copy of disk {disk} failed on {source}: {}",
                            body.message
                        ),
                        if body.hint.is_empty() {
                            "check the migration network and both datastores, then migrate again"
                                .to_string()
                        } else {
                            body.hint
                        },
                    ))));
                }
            }
        }
    }

    /// The copy's progress on its record and as the job's progress sample (all disks).
    async fn record_progress(&mut self, idx: usize, s: &CopyStatus) {
        {
            let c = &mut self.copies[idx];
            if s.total_bytes > 0 {
                c.size_bytes = s.total_bytes;
            }
            c.done_bytes = s.done_bytes.min(c.size_bytes);
            c.remaining_bytes = c.size_bytes - c.done_bytes;
            c.rate_bps = if s.rate_bps.is_finite() {
                s.rate_bps
            } else {
                0.0
            };
            c.elapsed_ms = s.elapsed_ms;
        }
        self.save_copies().await;
        let total: u64 = self.copies.iter().map(|c| c.size_bytes).sum();
        let remaining: u64 = self.copies.iter().map(|c| c.remaining_bytes).sum();
        let done = total - remaining.min(total);
        let rate = self.copies[idx].rate_bps;
        let progress = Progress {
            phase: Phase::DiskCopy,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            percent: if total > 0 {
                done as f64 * 100.0 / total as f64
            } else {
                100.0
            },
            transferred_bytes: done,
            remaining_bytes: remaining,
            total_bytes: total,
            iteration: idx as u64 + 1,
            throughput_bps: rate,
            dirty_rate_bps: 0.0,
            eta_ms: (rate > 0.0).then(|| (remaining as f64 / rate * 1000.0) as u64),
            expected_downtime_ms: None,
            total_time_ms: None,
            downtime_ms: None,
            cpu_throttle_percent: None,
            disks: Vec::new(),
            revision: None,
        };
        let _ = self.state.store.add_sample(self.m.id, &progress).await;
        let _ = self.state.store.set_progress(self.m.id, &progress).await;
        self.state.events.publish(Event::Progress {
            migration_id: self.m.id,
            progress,
        });
    }

    /// Both hosts checksum the image's guest-visible content; the copy counts only when they
    /// agree.
    async fn verify(&mut self, idx: usize) -> Result<(), AttemptEnd> {
        let p = self.planned[idx].clone();
        self.copies[idx].state = DiskCopyState::Verifying;
        self.save_copies().await;
        let message = format!(
            "disk {}: copied; checksumming on {} and {}",
            p.disk, self.m.source, self.m.destination
        );
        self.log("info", &message).await;
        // The guest's view: a qcow2 overlay read with its base, which both hosts share.
        let format = p.guest_format;
        let (source, destination) = (self.m.source.clone(), self.m.destination.clone());
        let (src, dst) = (self.src.clone(), self.dst.clone());
        let summing = Instant::now();
        let (a, b) = tokio::join!(
            self.checksum(&src, &source, &p, format),
            self.checksum(&dst, &destination, &p, format)
        );
        let (a, b) = (a?, b?);
        if a != b {
            let message = format!(
                "disk {}: checksum mismatch: {source} has sha256 {a}, {destination} has {b}",
                p.disk
            );
            self.log("error", &message).await;
            return Err(AttemptEnd::End(ColdEnd::Failed(ErrorBody::new(
                "checksum-mismatch",
                format!(
                    "the copy of disk {} on {destination} differs from {source}'s image (sha256 {a} != {b})",
                    p.disk
                ),
                "the source image changed during the copy, or a datastore corrupts data: \
                 check both, then migrate again",
            ))));
        }
        let c = &mut self.copies[idx];
        c.state = DiskCopyState::Copied;
        c.sha256 = Some(a.clone());
        c.done_bytes = c.size_bytes;
        c.remaining_bytes = 0;
        c.source_kept = true;
        let secs = (c.elapsed_ms as f64 / 1000.0).max(0.001);
        let message = format!(
            "disk {}: done: {} in {:.2} s ({}/s); sha256 {a} equal on {source} and {destination} (checksums took {:.2} s)",
            p.disk,
            fmt_size(c.size_bytes),
            secs,
            fmt_size((c.size_bytes as f64 / secs) as u64),
            summing.elapsed().as_secs_f64()
        );
        self.save_copies().await;
        self.log("info", &message).await;
        Ok(())
    }

    /// One host's checksum of the image, polled until done.
    async fn checksum(
        &self,
        client: &ApiClient,
        host: &str,
        p: &PlannedCopy,
        format: DiskFormat,
    ) -> Result<String, AttemptEnd> {
        let body = ChecksumImage {
            image: p.image.clone(),
            format,
            wait_ms: CHECKSUM_WAIT_MS,
        };
        loop {
            if self.cancelled() {
                return Err(AttemptEnd::End(ColdEnd::Cancelled));
            }
            let status: ChecksumStatus = self
                .retrying(host, true, || client.post("/v1/disks/checksum", &body))
                .await
                .map_err(|e| Self::agent_end(host, e))?;
            match status.state {
                ChecksumState::Running => continue,
                ChecksumState::Done => {
                    return status.sha256.ok_or_else(|| {
                        AttemptEnd::End(ColdEnd::Failed(ErrorBody::new(
                            "checksum-failed",
                            format!("{host} reported a checksum without a digest"),
                            "check that both agents run the same Ferry version",
                        )))
                    })
                }
                ChecksumState::Failed => {
                    let e = status.error.unwrap_or_else(|| {
                        ErrorBody::new("checksum-failed", "no reason given", "")
                    });
                    return Err(AttemptEnd::End(ColdEnd::Failed(ErrorBody::new(
                        "checksum-failed",
                        format!(
                            "{host} could not checksum {}: {}: {}",
                            p.image, e.code, e.message
                        ),
                        e.hint,
                    ))));
                }
            }
        }
    }

    /// Aborts one disk's copy on both hosts (the destination's uncommitted image goes); a
    /// host with nothing to abort is fine.
    async fn abort_disk(&self, disk: &str) {
        for (client, host) in [
            (&self.src, &self.m.source),
            (&self.dst, &self.m.destination),
        ] {
            let path = self.path(disk, "/abort");
            let r: Result<serde_json::Value, ApiError> =
                self.retrying(host, false, || client.post(&path, &())).await;
            match r {
                Ok(_) => {}
                Err(e) if e.status() == Some(404) => {}
                Err(e) => {
                    let message = format!(
                        "disk {disk}: abort on {host} failed: {e}; its agent removes the partial image when it restarts"
                    );
                    self.log("warn", &message).await;
                }
            }
        }
    }

    async fn abort_all(&self) {
        for p in &self.planned {
            self.abort_disk(&p.disk).await;
        }
    }

    /// The instance's definition moves: defined on the destination, removed from the source,
    /// and the copies committed there.
    async fn redefine(&mut self, instance: &Instance) -> Result<(), ColdEnd> {
        let (source, destination) = (self.m.source.clone(), self.m.destination.clone());
        let message = format!("defining {} on {destination}", instance.name);
        self.log("info", &message).await;
        let path = format!("/v1/instances/{}", self.m.instance_id);
        let define = DefineInstance {
            name: instance.name.clone(),
            spec: instance.spec.clone(),
        };
        let dst = self.dst.clone();
        let defined: Result<AgentInstance, ApiError> = self
            .retrying(&destination, false, || dst.put(&path, &define))
            .await;
        if let Err(e) = defined {
            self.undo_after_copies().await;
            return Err(ServerError::from_agent(&destination, e).into());
        }
        let message = format!("removing the definition from {source}");
        self.log("info", &message).await;
        let src = self.src.clone();
        let removed: Result<serde_json::Value, ApiError> =
            self.retrying(&source, false, || src.delete(&path)).await;
        if let Err(e) = removed {
            if e.status() != Some(404) {
                let _ = self.dst.delete::<serde_json::Value>(&path).await;
                self.undo_after_copies().await;
                return Err(ServerError::from_agent(&source, e).into());
            }
        }
        for p in &self.planned {
            let path = self.path(&p.disk, "/commit");
            let committed: Result<serde_json::Value, ApiError> = self
                .retrying(&destination, false, || dst.post(&path, &()))
                .await;
            match committed {
                Ok(_) => {}
                Err(e) if e.status() == Some(404) => {}
                Err(e) => {
                    // The image is complete and in use by the definition; only its record on
                    // the agent stays (a restart keeps received images).
                    let message = format!("disk {}: commit on {destination} failed: {e}", p.disk);
                    self.log("warn", &message).await;
                }
            }
        }
        if self.copies.iter().any(|c| c.source_kept) {
            let kept: Vec<String> = self
                .copies
                .iter()
                .filter(|c| c.source_kept)
                .map(|c| c.image.to_string())
                .collect();
            let when = match self.state.config.cold_cleanup_after_s {
                0 => format!("until `ferry migration cleanup {}`", self.m.id),
                s => format!(
                    "for {s} s, then removed automatically (or now with `ferry migration cleanup {}`)",
                    self.m.id
                ),
            };
            let message = format!("{source} keeps its copies ({}) {when}", kept.join(", "));
            self.log("info", &message).await;
        }
        Ok(())
    }

    /// A failure after the copies, before the job completes: the destination's images go,
    /// the instance stays on the source.
    async fn undo_after_copies(&mut self) {
        if self.planned.is_empty() {
            return;
        }
        self.abort_all().await;
        for c in &mut self.copies {
            c.state = DiskCopyState::Failed;
            c.source_kept = false;
        }
        self.save_copies().await;
    }
}

/// Removes the source copies a completed cold migration kept: `POST
/// /v1/migrations/{id}/cleanup` and the automatic cleanup. Idempotent: a job already cleaned
/// up is returned as it is. Refused for a job that did not complete (its source images are
/// the instance's, not copies) or that kept nothing. For a failed live job whose destination
/// kept partial images for a retry, removes those instead.
pub async fn cleanup(state: &AppState, m: &Migration, who: &str) -> Result<Migration, ServerError> {
    if m.copies.iter().any(|c| c.target_kept) {
        return crate::kept_copies::remove(state, m, who).await;
    }
    if m.state != MigrationState::Completed {
        return Err(ServerError::conflict(
            "migration-not-completed",
            format!(
                "migration {} is {}; only a completed migration's source copies can be removed",
                m.id,
                m.state.as_str()
            ),
            "a failed or cancelled cold migration left the instance on its source with its images: nothing to clean",
        ));
    }
    if m.copies.is_empty() {
        return Err(ServerError::conflict(
            "nothing-to-clean-up",
            format!(
                "migration {} copied no disks, so it kept nothing on {}",
                m.id, m.source
            ),
            "only migrations that copied disks (cold, or live with local disks) keep source copies",
        ));
    }
    if m.cleaned_up_at.is_some() || !m.copies.iter().any(|c| c.source_kept) {
        return Ok(m.clone());
    }
    // The instance came back to the source (same images): they are its disks, not copies.
    if let Some(i) = state.store.get_instance(&m.instance_id.to_string()).await? {
        if i.host == m.source {
            return Err(ServerError::conflict(
                "instance-on-source",
                format!(
                    "{} is on {} again; its images there are in use, not leftovers",
                    i.name, m.source
                ),
                "nothing to clean up for this migration",
            ));
        }
    }
    let images: Vec<_> = m
        .copies
        .iter()
        .filter(|c| c.source_kept)
        .map(|c| c.image.clone())
        .collect();
    remove_copies(state, m, &m.source, images, who, "the source copies").await?;
    let cleaned = state.store.mark_cleaned_up(m.id).await?;
    publish_migration(state, &cleaned);
    Ok(cleaned)
}

/// Removes `images`, copies job `m` left on `host`, and logs it: `who` removed `what`.
pub(crate) async fn remove_copies(
    state: &AppState,
    m: &Migration,
    host: &str,
    images: Vec<ferry_api::instances::ImageRef>,
    who: &str,
    what: &str,
) -> Result<(), ServerError> {
    let agent = agent_client(state, host).await?;
    let done: CleanedUp = agent
        .post(
            &format!("/v1/copies/{}/cleanup", m.id),
            &CleanupCopies { images },
        )
        .await
        .map_err(|e| ServerError::from_agent(host, e))?;
    let list = |v: &[ferry_api::instances::ImageRef]| {
        v.iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut message = format!("cleanup by {who}: removed {what} on {host}");
    if !done.removed.is_empty() {
        message.push_str(&format!(" ({})", list(&done.removed)));
    }
    if !done.missing.is_empty() {
        message.push_str(&format!("; already gone: {}", list(&done.missing)));
    }
    log(state, m.id, "info", &message).await;
    Ok(())
}

/// Removes the source copies of completed cold migrations `cold_cleanup_after_s` after they
/// completed, until `stop`. Does nothing when the setting is 0 (manual cleanup).
pub async fn run_auto_cleanup(state: AppState, mut stop: watch::Receiver<bool>) {
    let after = state.config.cold_cleanup_after_s;
    if after == 0 {
        return;
    }
    let every = Duration::from_secs(after.clamp(1, 60));
    // Jobs whose cleanup failed, warned about once each.
    let mut warned = std::collections::HashSet::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {},
            _ = stop.wait_for(|s| *s) => return,
        }
        let before = Utc::now() - chrono::Duration::seconds(after as i64);
        let due = match state.store.cleanups_due(before).await {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "cannot list the cold migrations due for cleanup");
                continue;
            }
        };
        for m in due {
            if let Err(e) = cleanup(&state, &m, "automatic cleanup").await {
                if warned.insert(m.id) {
                    warn!(id = %m.id, error = %e, "automatic cleanup failed; retried later");
                    let message = format!("automatic cleanup failed (retried): {e}");
                    log(&state, m.id, "warn", &message).await;
                }
            }
        }
    }
}
