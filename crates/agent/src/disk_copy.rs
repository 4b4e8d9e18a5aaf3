//! This host's half of each disk copy of a cold migration, image checksums and the removal of
//! the source copies a completed migration kept (endpoints in `ferry_api::agent`).
//!
//! The server drives a copy: the destination receives (creates the empty image and exports
//! it, [`ferry_storage::copy::Receiver`]), the source sends ([`ferry_storage::copy::send`]),
//! the destination finishes (stops the export cleanly), both checksum, and only when the
//! instance is defined on the destination does it commit the image. Until the commit,
//! `abort` removes the destination's image; the source image is only ever read.
//!
//! Each copy has a record in `STATE_DIR/copies`, written before anything runs, so that an
//! agent restarted mid-copy cleans up after the copy it lost: the tools it started are
//! killed (found by the copy's export token, which only they carry on their command line),
//! an image still being received is removed, and a received but uncommitted image keeps its
//! record so the server can still commit or abort it. The server sees a lost copy as
//! `unknown` and starts it again; nothing of the source was touched.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_api::agent::{
    ChecksumImage, ChecksumState, ChecksumStatus, CleanedUp, CleanupCopies, CopyReceiving,
    CopyState, CopyStatus, ImageMeasure, MeasureImage, ReceiveCopy, SendCopy,
};
use ferry_api::instances::{DiskFormat, ImageRef};
use ferry_api::ErrorBody;
use ferry_migrate::TlsCredentials;
use ferry_storage::checksum::{image_checksum, ChecksumOptions};
use ferry_storage::copy::{self, CopyTls, ReceiveSpec, Receiver, SendProgress, SendSpec};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tracing::{info, warn};
use uuid::Uuid;

use crate::{datastores, Agent, AgentError};

/// A sender making no progress for this long is stopped (a dead network, a hung datastore).
const STALL_TIMEOUT: Duration = Duration::from_secs(300);
/// How long `qemu-nbd` may take to open the new image and listen.
const EXPORT_START: Duration = Duration::from_secs(20);
/// Longest wait of a status or checksum request.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// Which half of a copy this host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Role {
    Send,
    Receive,
}

/// What survives an agent restart: enough to kill the copy's tools and remove a partial
/// image.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CopyRecord {
    mid: Uuid,
    disk: String,
    role: Role,
    image: ImageRef,
    path: PathBuf,
    /// The export token: on the command line of the copy's `qemu-nbd` and `qemu-img`.
    export: String,
    state: CopyState,
}

type Key = (Uuid, String);

/// One copy half in memory.
pub(crate) struct CopyEntry {
    record: Mutex<CopyRecord>,
    status: Mutex<CopyStatus>,
    started: Instant,
    /// Bumped on every status change, for long polls.
    changed: watch::Sender<u64>,
    /// Destination: the running export, until finished or aborted.
    receiver: tokio::sync::Mutex<Option<Receiver>>,
    /// Destination: where the source connects.
    receiving: Option<CopyReceiving>,
    /// Source: the sending task (tracked by the agent, so shutdown stops it too); aborting it
    /// kills `qemu-img`.
    task: Mutex<Option<AbortHandle>>,
    record_path: PathBuf,
}

impl CopyEntry {
    fn status(&self) -> CopyStatus {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if matches!(s.state, CopyState::Receiving | CopyState::Sending) {
            s.elapsed_ms = self.started.elapsed().as_millis() as u64;
        }
        s
    }

    fn update(&self, f: impl FnOnce(&mut CopyStatus)) {
        {
            let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut s);
        }
        self.changed.send_modify(|v| *v += 1);
    }

    fn record(&self) -> CopyRecord {
        self.record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_record_state(&self, state: CopyState) -> Result<(), AgentError> {
        let record = {
            let mut r = self.record.lock().unwrap_or_else(|p| p.into_inner());
            r.state = state;
            r.clone()
        };
        write_record(&self.record_path, &record)
    }

    fn remove_record(&self) {
        if let Err(e) = std::fs::remove_file(&self.record_path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(path = %self.record_path.display(), error = %e, "cannot remove a copy record");
            }
        }
    }
}

fn write_record(path: &Path, record: &CopyRecord) -> Result<(), AgentError> {
    let json = serde_json::to_vec_pretty(record)
        .map_err(|e| AgentError::Internal(format!("cannot encode a copy record: {e}")))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json).map_err(AgentError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(AgentError::io(path))
}

/// A checksum computed in the background, joined by repeated requests.
pub(crate) struct ChecksumJob {
    started: Instant,
    progress: watch::Receiver<u64>,
    result: watch::Receiver<Option<Result<(String, u64), ErrorBody>>>,
}

/// The copies and checksums of this agent.
#[derive(Default)]
pub(crate) struct Copies {
    entries: Mutex<HashMap<Key, Arc<CopyEntry>>>,
    checksums: Mutex<HashMap<(PathBuf, DiskFormat), Arc<ChecksumJob>>>,
    /// Serialises starting and ending copies, so two requests for one copy cannot race.
    setup: tokio::sync::Mutex<()>,
}

impl Copies {
    fn get(&self, key: &Key) -> Option<Arc<CopyEntry>> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    fn insert(&self, key: Key, entry: Arc<CopyEntry>) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, entry);
    }

    fn remove(&self, key: &Key) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

/// A disk id from the path: a plain name (it names a record file).
fn check_disk(disk: &str) -> Result<(), AgentError> {
    let plain = !disk.is_empty()
        && disk.len() <= 64
        && disk
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        Ok(())
    } else {
        Err(AgentError::BadRequest(format!(
            "{disk:?} is not a disk id (letters, digits, - and _)"
        )))
    }
}

fn no_copy(mid: Uuid, disk: &str) -> AgentError {
    AgentError::CopyNotFound {
        mid,
        disk: disk.to_string(),
    }
}

/// Kills the processes whose command line carries `token` (a copy's export name): the copy's
/// own `qemu-nbd` or `qemu-img`, left by an agent that stopped mid-copy.
fn kill_by_token(token: &str) -> usize {
    if token.len() < 16 {
        return 0;
    }
    let me = std::process::id();
    let mut killed = 0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let carries = cmdline
            .split(|b| *b == 0)
            .any(|arg| String::from_utf8_lossy(arg).contains(token));
        if carries {
            // SAFETY: kill(2) on a pid read from /proc; at worst it is gone already.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            killed += 1;
        }
    }
    killed
}

impl Agent {
    fn copy_record_path(&self, mid: Uuid, disk: &str) -> PathBuf {
        self.config
            .state_dir
            .join("copies")
            .join(format!("{mid}-{disk}.json"))
    }

    /// Where a copy's half keeps its TLS credentials while it runs: beside its record, in the
    /// agent's private state directory (never on a datastore). Removed by the half when it
    /// ends, and at start by [`Agent::load_copies`] after a crash.
    fn copy_tls(&self, mid: Uuid, disk: &str, creds: Option<TlsCredentials>) -> Option<CopyTls> {
        creds.map(|credentials| CopyTls {
            credentials,
            dir: self
                .config
                .state_dir
                .join("copies")
                .join(format!("{mid}-{disk}.tls")),
        })
    }

    /// Whether an instance defined on this host uses `image` (as a disk, its base or its
    /// NVRAM): such an image is never created over, nor removed.
    pub(crate) async fn image_in_use(&self, image: &ImageRef) -> Option<String> {
        for slot in self.slots() {
            let s = slot.lock().await;
            if s.deleted {
                continue;
            }
            let spec = &s.record.spec;
            let uses = spec.disks.iter().any(|d| {
                &d.image == image || d.backing.as_ref().is_some_and(|b| &b.image == image)
            }) || spec.boot.nvram.as_ref() == Some(image);
            if uses {
                return Some(s.record.name.clone());
            }
        }
        None
    }

    /// Picks up the copy records left by the previous run: kills their tools, removes images
    /// that were still being received, and keeps received, uncommitted ones for the server.
    pub(crate) async fn load_copies(&self) {
        let dir = self.config.state_dir.join("copies");
        let Ok(files) = std::fs::read_dir(&dir) else {
            return;
        };
        for file in files.flatten() {
            let path = file.path();
            if path.extension().and_then(|e| e.to_str()) == Some("tls") && path.is_dir() {
                // A half's credentials, left by a crash: nothing uses them any more.
                match std::fs::remove_dir_all(&path) {
                    Ok(()) => info!(dir = %path.display(), "stale copy credentials removed"),
                    Err(e) => {
                        warn!(dir = %path.display(), error = %e, "cannot remove stale copy credentials")
                    }
                }
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let record: CopyRecord = match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => r,
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "unreadable copy record; removed");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            };
            let killed = kill_by_token(&record.export);
            if killed > 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            match (record.role, record.state) {
                (Role::Receive, CopyState::Received) => {
                    info!(mid = %record.mid, disk = %record.disk, "received copy kept for the server to commit or abort");
                    let entry = Arc::new(CopyEntry {
                        status: Mutex::new(CopyStatus {
                            state: CopyState::Received,
                            ..CopyStatus::unknown()
                        }),
                        started: Instant::now(),
                        changed: watch::channel(0).0,
                        receiver: tokio::sync::Mutex::new(None),
                        receiving: None,
                        task: Mutex::new(None),
                        record_path: path.clone(),
                        record: Mutex::new(record.clone()),
                    });
                    self.copies.insert((record.mid, record.disk.clone()), entry);
                }
                (Role::Receive, _) => {
                    match std::fs::remove_file(&record.path) {
                        Ok(()) => {
                            info!(mid = %record.mid, disk = %record.disk, path = %record.path.display(), "partial copy removed after a restart")
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            warn!(path = %record.path.display(), error = %e, "cannot remove a partial copy; record kept");
                            continue;
                        }
                    }
                    let _ = std::fs::remove_file(&path);
                }
                (Role::Send, _) => {
                    if killed > 0 {
                        info!(mid = %record.mid, disk = %record.disk, "sender of a lost copy stopped");
                    }
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }

    /// `POST /v1/copies/{mid}/{disk}/receive`.
    /// Refuses (`no-room`) a copy of `required` bytes into `image`'s datastore when it has
    /// less free.
    pub(crate) fn check_room(&self, image: &ImageRef, required: u64) -> Result<(), AgentError> {
        let store = datastores::datastore(&self.config, &image.datastore)?;
        if let Some((_, free)) = crate::facts::statvfs(&store.path) {
            if required > free {
                return Err(AgentError::refused(
                    "no-room",
                    format!(
                        "datastore {} on {} has {} MiB free; the copy of {} needs {} MiB",
                        store.name,
                        self.config.name,
                        free >> 20,
                        image,
                        required.div_ceil(1 << 20)
                    ),
                    "free space on the datastore or pick another destination",
                ));
            }
        }
        Ok(())
    }

    pub(crate) async fn receive_copy(
        self: &Arc<Self>,
        mid: Uuid,
        disk: String,
        req: ReceiveCopy,
    ) -> Result<CopyReceiving, AgentError> {
        check_disk(&disk)?;
        let key = (mid, disk.clone());
        let _setup = self.copies.setup.lock().await;
        if let Some(e) = self.copies.get(&key) {
            let r = e.record();
            return match (&e.receiving, e.status().state) {
                (Some(at), CopyState::Receiving)
                    if r.role == Role::Receive && r.image == req.image =>
                {
                    Ok(at.clone())
                }
                (_, state) => Err(AgentError::conflict(
                    "copy-exists",
                    format!("disk {disk} of migration {mid} already has a copy here ({state:?})"),
                    "abort it first",
                )),
            };
        }
        let path = datastores::resolve(&self.config, &req.image)?;
        // Checked before the record exists: a restart removes the file a receiving record
        // names, which must never be a file that was there before.
        if path.symlink_metadata().is_ok() {
            return Err(ferry_storage::copy::CopyError::TargetExists(path).into());
        }
        if let Some(name) = self.image_in_use(&req.image).await {
            return Err(AgentError::conflict(
                "image-in-use",
                format!("{} is an image of instance {name} on this host", req.image),
                "pick another file name, or move or delete that instance first",
            ));
        }
        self.check_room(&req.image, req.required_bytes)?;
        let mut token = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut token);
        let export = format!("ferry-{}", hex::encode(token));
        let record = CopyRecord {
            mid,
            disk: disk.clone(),
            role: Role::Receive,
            image: req.image.clone(),
            path: path.clone(),
            export: export.clone(),
            state: CopyState::Receiving,
        };
        let record_path = self.copy_record_path(mid, &disk);
        // Written first: a restart in the middle of the start finds and removes the image.
        write_record(&record_path, &record)?;
        let spec = ReceiveSpec {
            path: path.clone(),
            format: req.format,
            size_bytes: req.size_bytes,
            addr: self.config.migration_addr,
            first_port: self.port_range.first,
            last_port: self.port_range.last,
            export: export.clone(),
            netns: self.config.netns.clone(),
            start_timeout: EXPORT_START,
            tls: self.copy_tls(mid, &disk, req.tls),
        };
        let receiver = match Receiver::start(&spec).await {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&record_path);
                return Err(e.into());
            }
        };
        let receiving = CopyReceiving {
            addr: receiver.addr().to_string(),
            export,
        };
        info!(%mid, %disk, image = %req.image, addr = %receiving.addr, "receiving a disk copy");
        let entry = Arc::new(CopyEntry {
            record: Mutex::new(record),
            status: Mutex::new(CopyStatus {
                state: CopyState::Receiving,
                total_bytes: req.size_bytes,
                ..CopyStatus::unknown()
            }),
            started: Instant::now(),
            changed: watch::channel(0).0,
            receiver: tokio::sync::Mutex::new(Some(receiver)),
            receiving: Some(receiving.clone()),
            task: Mutex::new(None),
            record_path,
        });
        self.copies.insert(key, entry);
        Ok(receiving)
    }

    /// `POST /v1/copies/{mid}/{disk}/send`.
    pub(crate) async fn send_copy(
        self: &Arc<Self>,
        mid: Uuid,
        disk: String,
        req: SendCopy,
    ) -> Result<CopyStatus, AgentError> {
        check_disk(&disk)?;
        let key = (mid, disk.clone());
        let _setup = self.copies.setup.lock().await;
        if let Some(e) = self.copies.get(&key) {
            let (r, status) = (e.record(), e.status());
            if r.role == Role::Send
                && r.export == req.export
                && matches!(status.state, CopyState::Sending | CopyState::Sent)
            {
                return Ok(status);
            }
            if matches!(status.state, CopyState::Sending | CopyState::Receiving) {
                return Err(AgentError::conflict(
                    "copy-exists",
                    format!("disk {disk} of migration {mid} is being copied here already"),
                    "abort it first",
                ));
            }
            // An ended attempt: this is the next one.
            e.remove_record();
            self.copies.remove(&key);
        }
        let path = datastores::resolve(&self.config, &req.image)?;
        if !path.exists() {
            return Err(AgentError::refused(
                "image-not-found",
                format!(
                    "{} ({}) does not exist on {}",
                    req.image,
                    path.display(),
                    self.config.name
                ),
                "check the instance's disks on this host",
            ));
        }
        let destination: SocketAddr = req.destination.parse().map_err(|_| {
            AgentError::BadRequest(format!("{:?} is not an IP:PORT address", req.destination))
        })?;
        let record = CopyRecord {
            mid,
            disk: disk.clone(),
            role: Role::Send,
            image: req.image.clone(),
            path: path.clone(),
            export: req.export.clone(),
            state: CopyState::Sending,
        };
        let record_path = self.copy_record_path(mid, &disk);
        write_record(&record_path, &record)?;
        let entry = Arc::new(CopyEntry {
            record: Mutex::new(record),
            status: Mutex::new(CopyStatus {
                state: CopyState::Sending,
                ..CopyStatus::unknown()
            }),
            started: Instant::now(),
            changed: watch::channel(0).0,
            receiver: tokio::sync::Mutex::new(None),
            receiving: None,
            task: Mutex::new(None),
            record_path,
        });
        let spec = SendSpec {
            path,
            format: req.format,
            destination,
            export: req.export.clone(),
            netns: self.config.netns.clone(),
            rate_limit_bps: req.rate_limit_bps,
            stall_timeout: STALL_TIMEOUT,
            tls: self.copy_tls(mid, &disk, req.tls),
        };
        info!(%mid, %disk, image = %req.image, %destination, "sending a disk copy");
        let running = entry.clone();
        let task = tokio::spawn(async move { run_sender(running, spec).await });
        *entry.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task.abort_handle());
        self.track(task);
        self.copies.insert(key, entry.clone());
        Ok(entry.status())
    }

    /// `GET /v1/copies/{mid}/{disk}`: at once when the state is final or the bytes done
    /// differ from `after_done`, else at the next change or after `wait`.
    pub(crate) async fn copy_status(
        &self,
        mid: Uuid,
        disk: &str,
        wait: Duration,
        after_done: Option<u64>,
    ) -> CopyStatus {
        let Some(entry) = self.copies.get(&(mid, disk.to_string())) else {
            return CopyStatus::unknown();
        };
        let status = entry.status();
        let news = !matches!(status.state, CopyState::Sending | CopyState::Receiving)
            || after_done.is_some_and(|d| d != status.done_bytes);
        if news || wait.is_zero() {
            return status;
        }
        let mut changed = entry.changed.subscribe();
        let _ = tokio::time::timeout(wait.min(MAX_WAIT), changed.changed()).await;
        entry.status()
    }

    /// `POST /v1/copies/{mid}/{disk}/finish`.
    pub(crate) async fn finish_copy(
        &self,
        mid: Uuid,
        disk: &str,
    ) -> Result<CopyStatus, AgentError> {
        let key = (mid, disk.to_string());
        let _setup = self.copies.setup.lock().await;
        let entry = self.copies.get(&key).ok_or_else(|| no_copy(mid, disk))?;
        match entry.record().role {
            Role::Send => {
                let status = entry.status();
                if status.state == CopyState::Sending {
                    return Err(AgentError::conflict(
                        "copy-running",
                        format!("disk {disk} of migration {mid} is still being sent"),
                        "wait until its state is sent, or abort it",
                    ));
                }
                entry.remove_record();
                self.copies.remove(&key);
                Ok(status)
            }
            Role::Receive => {
                let receiver = entry.receiver.lock().await.take();
                let Some(receiver) = receiver else {
                    // Finished before (a retried request).
                    return Ok(entry.status());
                };
                match receiver.finish().await {
                    Ok(path) => {
                        entry.set_record_state(CopyState::Received)?;
                        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                        entry.update(|s| {
                            s.state = CopyState::Received;
                            s.done_bytes = s.total_bytes;
                        });
                        info!(%mid, %disk, path = %path.display(), file_bytes = size, "disk copy received");
                        Ok(entry.status())
                    }
                    Err(e) => {
                        // The receiver removed the image.
                        entry.remove_record();
                        self.copies.remove(&key);
                        Err(e.into())
                    }
                }
            }
        }
    }

    /// `POST /v1/copies/{mid}/{disk}/commit`: the received image is the instance's now.
    pub(crate) async fn commit_copy(&self, mid: Uuid, disk: &str) -> Result<(), AgentError> {
        let key = (mid, disk.to_string());
        let _setup = self.copies.setup.lock().await;
        let entry = self.copies.get(&key).ok_or_else(|| no_copy(mid, disk))?;
        let (record, state) = (entry.record(), entry.status().state);
        if record.role != Role::Receive || state != CopyState::Received {
            return Err(AgentError::conflict(
                "copy-not-received",
                format!("disk {disk} of migration {mid} is {state:?} here, not received"),
                "finish the copy on the destination first",
            ));
        }
        entry.remove_record();
        self.copies.remove(&key);
        info!(%mid, %disk, image = %record.image, "disk copy committed");
        Ok(())
    }

    /// `POST /v1/copies/{mid}/{disk}/abort`: the sender stops; the receiver's uncommitted
    /// image goes.
    pub(crate) async fn abort_copy(&self, mid: Uuid, disk: &str) -> Result<(), AgentError> {
        let key = (mid, disk.to_string());
        let _setup = self.copies.setup.lock().await;
        let entry = self.copies.get(&key).ok_or_else(|| no_copy(mid, disk))?;
        let record = entry.record();
        match record.role {
            Role::Send => {
                let task = entry.task.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(task) = task {
                    task.abort();
                    // Dropping the task's future kills qemu-img; wait for that to happen.
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while !task.is_finished() && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                entry.update(|s| {
                    if s.state == CopyState::Sending {
                        s.state = CopyState::Cancelled;
                    }
                });
            }
            Role::Receive => {
                let receiver = entry.receiver.lock().await.take();
                match receiver {
                    Some(r) => r.abort().await,
                    None => match std::fs::remove_file(&record.path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(AgentError::io(&record.path)(e)),
                    },
                }
                entry.update(|s| s.state = CopyState::Cancelled);
            }
        }
        entry.remove_record();
        self.copies.remove(&key);
        info!(%mid, %disk, role = ?record.role, "disk copy aborted");
        Ok(())
    }

    /// `POST /v1/copies/{mid}/cleanup`: removes the source images a completed migration kept.
    pub(crate) async fn cleanup_copies(
        &self,
        mid: Uuid,
        req: CleanupCopies,
    ) -> Result<CleanedUp, AgentError> {
        let mut paths = Vec::new();
        for image in &req.images {
            let path = datastores::resolve(&self.config, image)?;
            if let Some(name) = self.image_in_use(image).await {
                return Err(AgentError::conflict(
                    "image-in-use",
                    format!("{image} is an image of instance {name} on this host; it stays"),
                    "the instance came back to this host: its images are not leftovers",
                ));
            }
            paths.push((image.clone(), path));
        }
        let mut done = CleanedUp {
            removed: Vec::new(),
            missing: Vec::new(),
        };
        for (image, path) in paths {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    info!(%mid, %image, path = %path.display(), "source copy removed");
                    done.removed.push(image);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => done.missing.push(image),
                Err(e) => return Err(AgentError::io(&path)(e)),
            }
        }
        Ok(done)
    }

    /// `POST /v1/disks/measure`.
    pub(crate) async fn measure_image(
        &self,
        req: MeasureImage,
    ) -> Result<ImageMeasure, AgentError> {
        let path = datastores::resolve(&self.config, &req.image)?;
        if !path.exists() {
            return Err(AgentError::refused(
                "image-not-found",
                format!("{} does not exist on {}", req.image, self.config.name),
                "check the instance's disks on this host",
            ));
        }
        let size = copy::image_size(&path, req.format).await?;
        Ok(ImageMeasure {
            size_bytes: size.virtual_bytes,
            allocated_bytes: size.allocated_bytes,
        })
    }

    /// `POST /v1/disks/checksum`: joins the running checksum of the image or starts one, and
    /// waits up to `wait_ms` for it. A result is handed out once.
    pub(crate) async fn checksum_image(
        self: &Arc<Self>,
        req: ChecksumImage,
    ) -> Result<ChecksumStatus, AgentError> {
        let path = datastores::resolve(&self.config, &req.image)?;
        let key = (path.clone(), req.format);
        let job = {
            let mut jobs = self
                .copies
                .checksums
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match jobs.get(&key) {
                Some(j) => j.clone(),
                None => {
                    let job = self.start_checksum(path, req.format);
                    jobs.insert(key.clone(), job.clone());
                    job
                }
            }
        };
        let mut result = job.result.clone();
        let wait = Duration::from_millis(req.wait_ms).min(MAX_WAIT);
        let _ = tokio::time::timeout(wait, result.wait_for(|r| r.is_some())).await;
        let outcome = job.result.borrow().clone();
        let elapsed_ms = job.started.elapsed().as_millis() as u64;
        let done_bytes = *job.progress.borrow();
        let Some(outcome) = outcome else {
            return Ok(ChecksumStatus {
                state: ChecksumState::Running,
                done_bytes,
                size_bytes: 0,
                sha256: None,
                elapsed_ms,
                error: None,
            });
        };
        {
            let mut jobs = self
                .copies
                .checksums
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if jobs.get(&key).is_some_and(|j| Arc::ptr_eq(j, &job)) {
                jobs.remove(&key);
            }
        }
        Ok(match outcome {
            Ok((sha256, size)) => ChecksumStatus {
                state: ChecksumState::Done,
                done_bytes: size,
                size_bytes: size,
                sha256: Some(sha256),
                elapsed_ms,
                error: None,
            },
            Err(body) => ChecksumStatus {
                state: ChecksumState::Failed,
                done_bytes,
                size_bytes: 0,
                sha256: None,
                elapsed_ms,
                error: Some(body),
            },
        })
    }

    fn start_checksum(self: &Arc<Self>, path: PathBuf, format: DiskFormat) -> Arc<ChecksumJob> {
        let (progress_tx, progress) = watch::channel(0u64);
        let (result_tx, result) = watch::channel(None);
        let opts = ChecksumOptions::default();
        let task = tokio::spawn(async move {
            let outcome = image_checksum(&path, format, &opts, Some(&progress_tx))
                .await
                .map(|c| {
                    info!(path = %path.display(), sha256 = %c.sha256, ms = c.elapsed.as_millis() as u64, "image checksummed");
                    (c.sha256, c.size_bytes)
                })
                .map_err(|e| AgentError::from(e).body());
            result_tx.send_replace(Some(outcome));
        });
        self.track(task);
        Arc::new(ChecksumJob {
            started: Instant::now(),
            progress,
            result,
        })
    }
}

/// The sender's task: runs `qemu-img` and mirrors its progress into the entry.
async fn run_sender(entry: Arc<CopyEntry>, spec: SendSpec) {
    let (tx, mut rx) = watch::channel(SendProgress::default());
    let sending = copy::send(&spec, &tx);
    tokio::pin!(sending);
    let outcome = loop {
        tokio::select! {
            r = &mut sending => break r,
            changed = rx.changed() => {
                if changed.is_ok() {
                    let p = rx.borrow_and_update().clone();
                    entry.update(|s| {
                        s.done_bytes = p.done_bytes;
                        s.total_bytes = p.total_bytes;
                        s.rate_bps = p.rate_bps;
                    });
                }
            }
        }
    };
    let p = rx.borrow().clone();
    let elapsed_ms = entry.started.elapsed().as_millis() as u64;
    match outcome {
        Ok(out) => {
            let _ = entry.set_record_state(CopyState::Sent);
            entry.update(|s| {
                s.state = CopyState::Sent;
                s.done_bytes = out.total_bytes;
                s.total_bytes = out.total_bytes;
                s.rate_bps = p.rate_bps;
                s.elapsed_ms = elapsed_ms;
            });
            let r = entry.record();
            info!(mid = %r.mid, disk = %r.disk, bytes = out.total_bytes, ms = elapsed_ms, "disk copy sent");
        }
        Err(e) => {
            let r = entry.record();
            warn!(mid = %r.mid, disk = %r.disk, error = %e, "disk copy failed");
            let body = AgentError::from(e).body();
            entry.update(|s| {
                s.state = CopyState::Failed;
                s.elapsed_ms = elapsed_ms;
                s.error = Some(body);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_ids_are_plain_names() {
        for ok in ["disk0", "nvram", "data-1_x"] {
            assert!(check_disk(ok).is_ok(), "{ok}");
        }
        for bad in ["", "../x", "a/b", "a.json", &"x".repeat(65)] {
            assert!(check_disk(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_short_token_kills_nothing() {
        assert_eq!(kill_by_token("qemu"), 0);
    }
}
