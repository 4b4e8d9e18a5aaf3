//! This host's half of each live migration, and the records that let a restarted agent say
//! where every migration stands.
//!
//! Records live in `state_dir/migrations/<mid>.json`. Progress samples are kept in memory
//! with increasing sequence numbers (the record stores the last one, so numbering continues
//! after a restart). A source migration whose task died with the agent is re-derived from
//! QEMU itself, which keeps migrating while the agent is away.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_api::agent::{
    AgentInstance, DirtyRate, IncomingDisk, IncomingReady, LaunchIncoming, PrepareIncoming,
    ReconnectSource, RemovedIncoming, SetSourceParams, SourceState, SourceStatus, StartSource,
};
use ferry_api::ErrorBody;
use ferry_migrate::{
    destination, source, AbortHandle, Decision, MigrateError, MigrationParams, Progress,
    SourceEvent, SourceOutcome, StreamTls, TlsCredentials,
};
use ferry_qemu::StartMode;
use ferry_qmp::commands::{MigrateSetParameters, MigrateStartPostcopy, RunState};
use ferry_qmp::Qmp;
use serde::{Deserialize, Serialize};
use tracing::{info, info_span, warn, Instrument};
use uuid::Uuid;

use crate::instances::{InstanceRecord, Monitor};
use crate::{Agent, AgentError};

/// Samples kept per migration; older ones are dropped (a poller that far behind only needs
/// the recent ones).
const MAX_SAMPLES: usize = 10_000;
/// How long the destination waits for its guest to run after the source completed.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `cancel` waits for the source to confirm.
const CANCEL_WAIT: Duration = Duration::from_secs(35);

/// A destination's migration entry, its instance's locked slot, and the incoming QEMU's
/// monitor while the guest has not been started there.
/// An instance's slot, locked.
type SlotGuard = tokio::sync::OwnedMutexGuard<crate::instances::Slot>;

/// `migration-exists`: `mid` is known here for another purpose or in another state.
fn migration_exists(mid: Uuid, state: SourceState) -> AgentError {
    AgentError::conflict(
        "migration-exists",
        format!("migration {mid} is already known here (state {state:?})"),
        "use a new migration id",
    )
}

type IncomingSlot = (
    Arc<MigrationEntry>,
    tokio::sync::OwnedMutexGuard<crate::instances::Slot>,
    Option<Qmp>,
);

/// How long the dirty rate is measured before a migration: long enough to see what a guest
/// rewrites between rounds, short enough to run beside the pre-flight checks.
const DIRTY_RATE_WINDOW: Duration = Duration::from_millis(200);

/// How long the record of an ended migration is kept on the host (the server keeps the
/// history); a migration still in flight is always kept.
const RECORD_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// At most this many ended records are kept, whatever their age.
const MAX_ENDED_RECORDS: usize = 200;

/// Which ended records to forget: older than `retention`, or beyond the newest `keep`.
/// `records` are (id, still in flight, last written).
fn records_to_prune(
    records: &[(Uuid, bool, std::time::SystemTime)],
    now: std::time::SystemTime,
    retention: Duration,
    keep: usize,
) -> Vec<Uuid> {
    let mut ended: Vec<_> = records.iter().filter(|(_, live, _)| !live).collect();
    ended.sort_by_key(|r| std::cmp::Reverse(r.2));
    ended
        .iter()
        .enumerate()
        .filter(|(i, (_, _, at))| {
            *i >= keep || now.duration_since(*at).is_ok_and(|age| age > retention)
        })
        .map(|(_, (id, _, _))| *id)
        .collect()
}

/// Where a source sends its stream, as the server gave it.
fn parse_destination(s: &str) -> Result<SocketAddr, AgentError> {
    s.parse().map_err(|_| {
        AgentError::BadRequest(format!(
            "destination '{s}' is not an address like 10.0.0.2:49152"
        ))
    })
}

/// How a source half begins: a new stream, resuming a broken post-copy one, or following a
/// stream QEMU kept running while the agent was away.
#[derive(Debug, Clone, Copy)]
enum SourceStart {
    Fresh,
    Reconnect,
    Attach,
}

/// Which half of the migration this host performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Role {
    Source,
    Destination,
}

/// What is stored about one migration on this host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MigrationRecord {
    pub id: Uuid,
    pub role: Role,
    pub instance_id: Uuid,
    pub state: SourceState,
    #[serde(default)]
    pub outcome: Option<SourceOutcome>,
    #[serde(default)]
    pub error: Option<ErrorBody>,
    /// Sequence number of the last progress sample handed out.
    #[serde(default)]
    pub last_seq: u64,
    /// Source: where the stream goes.
    #[serde(default)]
    pub destination: Option<String>,
    /// Destination: where QEMU listens.
    #[serde(default)]
    pub listen_addr: Option<String>,
    /// Source: the handed-over QEMU has been stopped.
    #[serde(default)]
    pub finished: bool,
    /// Destination: `cont` was (about to be) sent; written before it, so that "gone and never
    /// started" can be proven after a crash of QEMU or the agent.
    #[serde(default)]
    pub start_sent: bool,
    /// Source: the migration may switch to post-copy.
    #[serde(default)]
    pub postcopy_permitted: bool,
    /// Source: the parameters it started with, for a reconnect after a broken post-copy
    /// stream.
    #[serde(default)]
    pub params: Option<MigrationParams>,
    /// Destination of a block migration: the images made for it, removed with the
    /// destination unless the guest ran here. Written before each is created.
    #[serde(default)]
    pub created_images: Vec<PathBuf>,
    /// Block migration: the exports (destination) or the mirrors (source) of its disks.
    #[serde(default)]
    pub disks: Vec<ferry_migrate::MirrorTarget>,
}

struct MigrationData {
    record: MigrationRecord,
    samples: Vec<(u64, Progress)>,
    decisions: Vec<(u64, Decision)>,
}

/// One migration in memory: its record, samples, and the abort handle of a running source.
pub(crate) struct MigrationEntry {
    path: PathBuf,
    data: Mutex<MigrationData>,
    abort: Mutex<Option<AbortHandle>>,
    /// Woken on every sample and record change, for status polls that wait for news.
    changed: tokio::sync::Notify,
    /// This half's TLS credentials while it runs: in memory only (never in the record), the
    /// files removed when the last holder drops them.
    tls: Mutex<Option<Arc<StreamTls>>>,
}

impl MigrationEntry {
    fn new(path: PathBuf, record: MigrationRecord) -> Arc<MigrationEntry> {
        Arc::new(MigrationEntry {
            path,
            data: Mutex::new(MigrationData {
                record,
                samples: Vec::new(),
                decisions: Vec::new(),
            }),
            abort: Mutex::new(None),
            changed: tokio::sync::Notify::new(),
            tls: Mutex::new(None),
        })
    }

    /// The half's credentials, if it has any.
    fn tls(&self) -> Option<Arc<StreamTls>> {
        self.tls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes the half's credentials away: the files go once the caller drops them too.
    fn take_tls(&self) -> Option<Arc<StreamTls>> {
        self.tls.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn set_tls(&self, tls: Option<Arc<StreamTls>>) {
        *self.tls.lock().unwrap_or_else(|p| p.into_inner()) = tls;
    }

    /// Ends the half's TLS: `qmp`, a QEMU that lives on, loses the objects and parameters,
    /// then the files are removed. Without credentials nothing happens.
    async fn release_tls(&self, qmp: Option<&Qmp>) {
        let Some(tls) = self.take_tls() else {
            return;
        };
        if let Some(qmp) = qmp {
            tls.remove(qmp).await;
        }
        drop(tls);
        info!("migration credentials removed");
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MigrationData> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn record(&self) -> MigrationRecord {
        self.lock().record.clone()
    }

    /// Changes the record and writes it to disk (temporary file, then rename).
    pub(crate) fn update(&self, change: impl FnOnce(&mut MigrationRecord)) {
        let json = {
            let mut data = self.lock();
            change(&mut data.record);
            serde_json::to_vec_pretty(&data.record)
        };
        let written = json.map_err(|e| e.to_string()).and_then(|json| {
            let tmp = self.path.with_extension("json.tmp");
            std::fs::write(&tmp, json)
                .and_then(|_| std::fs::rename(&tmp, &self.path))
                .map_err(|e| e.to_string())
        });
        if let Err(e) = written {
            warn!(path = %self.path.display(), error = %e, "cannot persist migration record");
        }
        self.changed.notify_waiters();
    }

    fn push_event(&self, event: &SourceEvent) {
        match event {
            SourceEvent::Progress(p) => self.push_sample(p.clone()),
            SourceEvent::Decision(d) => {
                let seq = {
                    let mut data = self.lock();
                    let seq = data.record.last_seq + 1;
                    data.decisions.push((seq, d.clone()));
                    seq
                };
                self.update(|r| r.last_seq = seq);
            }
        }
    }

    fn push_sample(&self, progress: Progress) {
        let seq = {
            let mut data = self.lock();
            let seq = data.record.last_seq + 1;
            data.samples.push((seq, progress));
            if data.samples.len() > MAX_SAMPLES {
                let excess = data.samples.len() - MAX_SAMPLES;
                data.samples.drain(..excess);
            }
            seq
        };
        self.update(|r| r.last_seq = seq);
    }

    /// Records how the source half ended.
    fn finish(&self, result: Result<SourceOutcome, MigrateError>) {
        self.update(|r| match result {
            Ok(outcome) => {
                r.state = SourceState::Completed;
                r.outcome = Some(outcome);
            }
            Err(e) => {
                r.state = match e {
                    MigrateError::Cancelled => SourceState::Cancelled,
                    MigrateError::PostcopyPaused(_) => SourceState::PostcopyPaused,
                    _ => SourceState::Failed,
                };
                r.error = Some(AgentError::Migrate(e).body());
            }
        });
        let r = self.record();
        info!(state = ?r.state, error = ?r.error.as_ref().map(|e| &e.message), "source half ended");
    }

    /// True once the source half let QEMU switch over (or start post-copy): from then on a
    /// cancel is refused.
    fn switched_over(&self) -> bool {
        self.abort
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|h| h.is_past_no_return())
    }

    /// What happened after sequence number `after`; with `wait`, waits up to that long for
    /// something new when nothing is, so a poller learns of the end within milliseconds.
    async fn status_after(&self, after: u64, wait: Duration) -> SourceStatus {
        let changed = self.changed.notified();
        let news = |s: &SourceStatus| {
            s.state != SourceState::Running || !s.samples.is_empty() || !s.decisions.is_empty()
        };
        let now = self.status(after);
        if wait.is_zero() || news(&now) {
            return now;
        }
        let _ = tokio::time::timeout(wait, changed).await;
        self.status(after)
    }

    fn status(&self, after: u64) -> SourceStatus {
        let switched_over = self.switched_over();
        let data = self.lock();
        SourceStatus {
            state: data.record.state,
            switched_over,
            samples: data
                .samples
                .iter()
                .filter(|(seq, _)| *seq > after)
                .cloned()
                .collect(),
            decisions: data
                .decisions
                .iter()
                .filter(|(seq, _)| *seq > after)
                .cloned()
                .collect(),
            outcome: data.record.outcome.clone(),
            error: data.record.error.clone(),
        }
    }
}

/// A random export name: only the source this agent hands it to can open the export.
fn export_name() -> String {
    use rand::RngCore;
    let mut token = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut token);
    format!("ferry-{}", hex::encode(token))
}

fn span(mid: &Uuid) -> tracing::Span {
    info_span!("migration", id = %mid)
}

impl Agent {
    fn migration_path(&self, mid: &Uuid) -> PathBuf {
        self.config
            .state_dir
            .join("migrations")
            .join(format!("{mid}.json"))
    }

    /// Where a half keeps its TLS credentials while it runs: beside the migration's record,
    /// in the agent's private state directory.
    fn tls_dir(&self, mid: &Uuid) -> PathBuf {
        self.config
            .state_dir
            .join("migrations")
            .join(format!("{mid}.tls"))
    }

    /// Writes `creds` for `mid` and gives them to `qmp`, replacing credentials the half had
    /// (a launch's, when `/incoming` brings its own).
    async fn apply_tls(
        &self,
        mid: &Uuid,
        entry: &MigrationEntry,
        qmp: &Qmp,
        creds: TlsCredentials,
    ) -> Result<(), AgentError> {
        // The old guard owns the same directory: it must go before the new files are written.
        drop(entry.take_tls());
        let tls =
            Arc::new(StreamTls::create(self.tls_dir(mid), creds).map_err(MigrateError::from)?);
        tls.apply(qmp).await.map_err(MigrateError::from)?;
        entry.set_tls(Some(tls));
        info!("migration streams use TLS");
        Ok(())
    }

    /// Credentials left by an agent that stopped mid-migration: nothing holds them any more
    /// (QEMU loaded them when they were applied), so they are removed at start.
    fn remove_stale_credentials(&self) {
        let dir = self.config.state_dir.join("migrations");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) == Some("tls") {
                match std::fs::remove_dir_all(&path) {
                    Ok(()) => info!(dir = %path.display(), "stale migration credentials removed"),
                    Err(e) => {
                        warn!(dir = %path.display(), error = %e, "cannot remove stale migration credentials")
                    }
                }
            }
        }
    }

    fn migration(&self, mid: &Uuid) -> Option<Arc<MigrationEntry>> {
        self.migrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(mid)
            .cloned()
    }

    fn migration_or_404(&self, mid: &Uuid) -> Result<Arc<MigrationEntry>, AgentError> {
        self.migration(mid)
            .ok_or(AgentError::MigrationNotFound(*mid))
    }

    /// Forgets ended migration records past their retention (files and memory), so that a
    /// host migrating for months does not keep one file per migration forever.
    pub(crate) fn prune_migration_records(&self) {
        let mut map = self.migrations.lock().unwrap_or_else(|p| p.into_inner());
        let records: Vec<_> = map
            .values()
            .map(|e| {
                let r = e.record();
                let live = matches!(r.state, SourceState::Running | SourceState::PostcopyPaused);
                let at = std::fs::metadata(&e.path)
                    .and_then(|m| m.modified())
                    .unwrap_or_else(|_| std::time::SystemTime::now());
                (r.id, live, at)
            })
            .collect();
        let prune = records_to_prune(
            &records,
            std::time::SystemTime::now(),
            RECORD_RETENTION,
            MAX_ENDED_RECORDS,
        );
        for id in prune {
            if let Some(e) = map.remove(&id) {
                let _ = std::fs::remove_file(&e.path);
            }
        }
    }

    /// Drops the record of `mid` (memory and file), as if it never came.
    fn forget_migration(&self, mid: &Uuid) {
        let removed = self
            .migrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(mid);
        if let Some(e) = removed {
            let _ = std::fs::remove_file(&e.path);
        }
    }

    fn new_migration(&self, record: MigrationRecord) -> Arc<MigrationEntry> {
        self.prune_migration_records();
        let entry = MigrationEntry::new(self.migration_path(&record.id), record.clone());
        entry.update(|_| {});
        self.migrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(record.id, entry.clone());
        entry
    }

    /// 409 when instance `id` is the source of a running migration.
    pub(crate) fn refuse_if_migrating(&self, id: &Uuid) -> Result<(), AgentError> {
        let busy = self
            .migrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|e| e.record())
            .find(|r| {
                r.role == Role::Source && r.instance_id == *id && r.state == SourceState::Running
            });
        match busy {
            Some(r) => Err(AgentError::conflict(
                "migration-in-progress",
                format!("instance {id} is the source of running migration {}", r.id),
                "cancel the migration or wait for it to end",
            )),
            None => Ok(()),
        }
    }

    /// Loads the migration records; re-derives source migrations whose task died with the
    /// previous agent, and fails destinations whose incoming QEMU is gone.
    pub(crate) async fn load_migrations(self: &Arc<Self>) {
        self.remove_stale_credentials();
        let dir = self.config.state_dir.join("migrations");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for file in entries.flatten() {
            let path = file.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let record: MigrationRecord = match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => r,
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "skipping unreadable migration record");
                    continue;
                }
            };
            let mid = record.id;
            let running = record.state == SourceState::Running;
            let role = record.role;
            let instance_id = record.instance_id;
            let entry = MigrationEntry::new(path, record);
            self.migrations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(mid, entry.clone());
            if !running {
                continue;
            }
            let monitor = match self.lock_slot(&instance_id).await {
                Ok(slot) if role == Role::Source || slot.record.incoming == Some(mid) => {
                    slot.monitor()
                }
                _ => None,
            };
            match (role, monitor) {
                (Role::Source, Some(monitor)) => {
                    info!(migration = %mid, "re-deriving a source migration from QEMU");
                    let r = entry.record();
                    let dest = r
                        .destination
                        .as_deref()
                        .and_then(|d| d.parse().ok())
                        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
                    let params = r.params.unwrap_or_default();
                    self.spawn_source_half(mid, &entry, monitor, dest, params, SourceStart::Attach);
                }
                (Role::Source, None) => entry.finish(Err(MigrateError::Failed(
                    "the source QEMU is gone (it ended while the agent was down)".into(),
                ))),
                (Role::Destination, Some(_)) => {
                    info!(migration = %mid, "incoming QEMU re-adopted; waiting for confirm");
                }
                (Role::Destination, None) => entry.update(|r| {
                    r.state = SourceState::Failed;
                    r.error = Some(ErrorBody::new(
                        "destination-prepare-failed",
                        "the incoming QEMU ended while the agent was down",
                        "start the migration again",
                    ));
                }),
            }
        }
    }

    /// `POST /v1/migrations/{mid}/incoming/launch`: define the instance here and start QEMU
    /// in incoming mode, not listening yet. The server does this while the source measures
    /// the guest's dirty rate, which the parameters [`Self::prepare_incoming`] then listens
    /// with depend on: the migration starts that much sooner. Memory-only migrations (a
    /// block migration's images are made with its parameters). Idempotent.
    pub(crate) async fn launch_incoming(
        &self,
        mid: Uuid,
        req: LaunchIncoming,
    ) -> Result<(), AgentError> {
        async {
            if let Some(entry) = self.migration(&mid) {
                let r = entry.record();
                return match (r.role, r.state) {
                    (Role::Destination, SourceState::Running) => Ok(()),
                    _ => Err(migration_exists(mid, r.state)),
                };
            }
            let tls = req.tls.clone();
            let (mut slot, entry, previous) = self.define_incoming(mid, req, &[]).await?;
            let launched = async {
                self.translate(&slot.record)?;
                self.launch(&mut slot, StartMode::Incoming).await?;
                if let (Some(creds), Some(qmp)) = (tls, slot.qmp()) {
                    self.apply_tls(&mid, &entry, &qmp, creds).await?;
                }
                Ok(())
            }
            .await;
            match launched {
                Ok(()) => {
                    info!(instance = %slot.record.id, "incoming QEMU launched; waiting for the plan");
                    Ok(())
                }
                Err(e) => {
                    let e = self.undo_incoming(&mut slot, &entry, previous, e).await;
                    // Launching ahead is only a head start: `/incoming` then does it all
                    // again and reports what fails as the migration's error.
                    self.forget_migration(&mid);
                    Err(e)
                }
            }
        }
        .instrument(span(&mid))
        .await
    }

    /// `POST /v1/migrations/{mid}/incoming`: define the instance here, start QEMU in incoming
    /// mode with its taps (unless [`Self::launch_incoming`] did), and listen on a free port
    /// of this host's range with the plan's parameters. Idempotent.
    pub(crate) async fn prepare_incoming(
        &self,
        mid: Uuid,
        req: PrepareIncoming,
    ) -> Result<IncomingReady, AgentError> {
        async {
            req.params.validate()?;
            if let Some(entry) = self.migration(&mid) {
                let r = entry.record();
                return match (r.role, r.state, r.listen_addr) {
                    (Role::Destination, SourceState::Running, Some(addr)) => Ok(IncomingReady {
                        addr,
                        disks: r.disks,
                    }),
                    (Role::Destination, SourceState::Running, None) if req.disks.is_empty() => {
                        self.listen_launched(mid, &entry, &req.params, req.tls)
                            .await
                    }
                    _ => Err(migration_exists(mid, r.state)),
                };
            }
            let define = LaunchIncoming {
                instance_id: req.instance_id,
                name: req.name,
                spec: req.spec,
                tls: None,
            };
            let (mut slot, entry, previous) = self.define_incoming(mid, define, &req.disks).await?;
            let prepared = async {
                let reused = self.create_incoming_images(&entry, &req.disks).await?;
                self.translate(&slot.record)?;
                self.launch(&mut slot, StartMode::Incoming).await?;
                if let (Some(creds), Some(qmp)) = (req.tls, slot.qmp()) {
                    self.apply_tls(&mid, &entry, &qmp, creds).await?;
                }
                self.listen_incoming(&slot, &entry, &req.params, &req.disks, &reused)
                    .await
            }
            .await;
            match prepared {
                Ok(ready) => Ok(ready),
                Err(e) => Err(self.undo_incoming(&mut slot, &entry, previous, e).await),
            }
        }
        .instrument(span(&mid))
        .await
    }

    /// Listens with `params` on the QEMU that [`Self::launch_incoming`] started for `mid`.
    async fn listen_launched(
        &self,
        mid: Uuid,
        entry: &Arc<MigrationEntry>,
        params: &MigrationParams,
        tls: Option<TlsCredentials>,
    ) -> Result<IncomingReady, AgentError> {
        let mut slot = match self.lock_slot(&entry.record().instance_id).await {
            Ok(slot) if slot.record.incoming == Some(mid) => slot,
            _ => {
                return Err(MigrateError::DestinationNotRunning(
                    "the incoming QEMU launched ahead is gone".into(),
                )
                .into())
            }
        };
        self.reap(&mut slot).await;
        let listened = async {
            if let (Some(creds), Some(qmp)) = (tls, slot.qmp()) {
                self.apply_tls(&mid, entry, &qmp, creds).await?;
            }
            self.listen_incoming(&slot, entry, params, &[], &Vec::new())
                .await
        }
        .await;
        match listened {
            Ok(ready) => Ok(ready),
            Err(e) => Err(self.undo_incoming(&mut slot, entry, None, e).await),
        }
    }

    /// Checks and defines the instance of an incoming migration here and records the
    /// destination's entry; the caller starts QEMU. Returns the slot's earlier record, which
    /// an undo puts back.
    async fn define_incoming(
        &self,
        mid: Uuid,
        req: LaunchIncoming,
        disks: &[IncomingDisk],
    ) -> Result<(SlotGuard, Arc<MigrationEntry>, Option<InstanceRecord>), AgentError> {
        let id = req.instance_id;
        let record = InstanceRecord {
            id,
            name: req.name,
            spec: req.spec,
            incoming: Some(mid),
        };
        // With images still to make, the spec is checked once they exist.
        if disks.is_empty() {
            self.translate(&record)?;
        }
        self.check_name_free(&id, &record.name)?;
        self.check_incoming_images(disks).await?;
        let (slot, previous) = match self.lock_slot(&id).await {
            Ok(mut slot) => {
                if self.run_state(&mut slot).await.is_some() || slot.process.is_some() {
                    return Err(AgentError::conflict(
                        "guest-running-here",
                        format!("instance {id} already has a QEMU process on this host"),
                        "a guest cannot migrate to the host it runs on",
                    ));
                }
                let previous = std::mem::replace(&mut slot.record, record);
                (slot, Some(previous))
            }
            Err(_) => (self.insert_slot(record), None),
        };
        let entry = self.new_migration(MigrationRecord {
            id: mid,
            role: Role::Destination,
            instance_id: id,
            state: SourceState::Running,
            outcome: None,
            error: None,
            last_seq: 0,
            destination: None,
            listen_addr: None,
            finished: false,
            start_sent: false,
            postcopy_permitted: false,
            params: None,
            created_images: Vec::new(),
            disks: Vec::new(),
        });
        self.save_record(&slot.record)?;
        Ok((slot, entry, previous))
    }

    /// Makes the incoming QEMU listen with `params` and exports the block migration's
    /// images; records where.
    async fn listen_incoming(
        &self,
        slot: &SlotGuard,
        entry: &Arc<MigrationEntry>,
        params: &MigrationParams,
        disks: &[IncomingDisk],
        reused: &[String],
    ) -> Result<IncomingReady, AgentError> {
        let qmp = slot.qmp().ok_or_else(|| {
            MigrateError::DestinationNotRunning("the incoming QEMU is gone".into())
        })?;
        let mut params = params.clone();
        params.port_range = self.port_range;
        let addr =
            destination::listen(&qmp, &params, self.config.migration_addr, !disks.is_empty())
                .await?;
        let exports: Vec<(String, String, bool)> = disks
            .iter()
            .map(|d| (d.disk.clone(), export_name(), d.backing.is_some()))
            .collect();
        let mut targets =
            destination::export_disks(&qmp, &params, self.config.migration_addr, &exports).await?;
        for t in &mut targets {
            t.resume = reused.contains(&t.disk);
        }
        if params.postcopy && targets.is_empty() {
            self.track(destination::start_on_postcopy(qmp));
        }
        entry.update(|r| {
            r.listen_addr = Some(addr.to_string());
            r.disks = targets.clone();
        });
        info!(instance = %slot.record.id, %addr, disks = targets.len(), "destination listening");
        Ok(IncomingReady {
            addr: addr.to_string(),
            disks: targets,
        })
    }

    /// Undoes a destination that could not be prepared: QEMU, taps and images go, the
    /// slot's earlier record comes back, and the entry records the failure. Returns `e`.
    async fn undo_incoming(
        &self,
        slot: &mut SlotGuard,
        entry: &Arc<MigrationEntry>,
        previous: Option<InstanceRecord>,
        e: AgentError,
    ) -> AgentError {
        warn!(error = %e, "destination preparation failed; removing it");
        self.teardown(slot, false).await;
        entry.release_tls(None).await;
        self.remove_incoming_images(entry);
        match previous {
            Some(previous) => {
                slot.record = previous;
                let _ = self.save_record(&slot.record);
            }
            None => self.forget_instance(slot),
        }
        let body = e.body();
        entry.update(|r| {
            r.state = SourceState::Failed;
            r.error = Some(body);
        });
        e
    }

    /// `DELETE /v1/migrations/{mid}/incoming`: remove the incoming QEMU, its taps and the
    /// instance, unless the guest already runs here. With `keep_images`, a block migration's
    /// images stay for a retry to resume from, when QEMU quit cleanly (its writes are then
    /// in the files); they are removed in every other case.
    pub(crate) async fn remove_incoming(
        &self,
        mid: Uuid,
        keep_images: bool,
    ) -> Result<RemovedIncoming, AgentError> {
        async {
            let entry = self.migration_or_404(&mid)?;
            let r = entry.record();
            if r.role != Role::Destination {
                return Err(AgentError::BadRequest(format!(
                    "this host is the source of migration {mid}, not its destination"
                )));
            }
            let running_here = AgentError::conflict(
                "guest-running-here",
                format!("the guest of migration {mid} already runs on this host"),
                "the migration completed; stop or migrate the instance instead",
            );
            let cancelled = |r: &mut MigrationRecord| {
                if r.state == SourceState::Running {
                    r.state = SourceState::Cancelled;
                }
            };
            let mut slot = match self.lock_slot(&r.instance_id).await {
                Ok(slot) if slot.record.incoming == Some(mid) => slot,
                // Gone or confirmed: nothing of the incoming side is left to remove.
                _ if r.state == SourceState::Completed => return Err(running_here),
                _ => {
                    // Removed earlier (kept or not), or its QEMU is gone: nothing says the
                    // images hold what was written to them.
                    let had_images = !entry.record().created_images.is_empty();
                    entry.release_tls(None).await;
                    self.remove_incoming_images(&entry);
                    entry.update(cancelled);
                    return Ok(RemovedIncoming {
                        kept_images: false,
                        not_kept: (keep_images && had_images)
                            .then(|| "the incoming QEMU was already gone".to_string()),
                    });
                }
            };
            if self.run_state(&mut slot).await == Some(RunState::Running) {
                return Err(running_here);
            }
            let keep = keep_images && !entry.record().created_images.is_empty();
            let ended = self.teardown(&mut slot, keep).await;
            entry.release_tls(None).await;
            self.forget_instance(&mut slot);
            let not_kept = match &ended {
                _ if !keep => None,
                Some(e) if e.is_clean() => None,
                Some(e) => Some(e.to_string()),
                None => Some("the incoming QEMU was already gone".to_string()),
            };
            let kept_images = keep && not_kept.is_none();
            if kept_images {
                let images = entry.record().created_images;
                info!(?images, "images kept for a retry to resume from");
                entry.update(|r| r.created_images.clear());
            } else {
                if let Some(why) = &not_kept {
                    warn!(why, "images not kept: nothing says they hold every write");
                }
                self.remove_incoming_images(&entry);
            }
            entry.update(cancelled);
            info!(instance = %r.instance_id, "incoming destination removed");
            Ok(RemovedIncoming {
                kept_images,
                not_kept,
            })
        }
        .instrument(span(&mid))
        .await
    }

    /// `POST /v1/migrations/{mid}/confirm`: wait until the whole guest has arrived here. QEMU
    /// keeps it paused (`-S`): it runs only after the server committed it here (`/start`).
    pub(crate) async fn confirm_incoming(&self, mid: Uuid) -> Result<AgentInstance, AgentError> {
        async {
            let (entry, mut slot, qmp) = self.incoming_slot(mid).await?;
            if let Some(qmp) = qmp {
                destination::await_complete(&qmp, CONFIRM_TIMEOUT).await?;
                if !entry.record().disks.is_empty() {
                    // The mirrors completed before the switchover: close the exports.
                    destination::stop_exports(&qmp).await?;
                }
                info!(instance = %entry.record().instance_id, "the whole guest arrived; paused until committed");
            }
            Ok(self.describe(&mut slot).await)
        }
        .instrument(span(&mid))
        .await
    }

    /// `POST /v1/migrations/{mid}/start`: the server has committed the guest to this host; run
    /// it. From here on it is an ordinary instance of this host.
    pub(crate) async fn start_incoming(&self, mid: Uuid) -> Result<AgentInstance, AgentError> {
        async {
            let (entry, mut slot, qmp) = match self.incoming_slot(mid).await {
                Err(AgentError::Migrate(MigrateError::DestinationNotRunning(why))) => {
                    return Err(self.destination_lost(mid, why))
                }
                other => other?,
            };
            if let Some(qmp) = qmp {
                entry.update(|r| r.start_sent = true);
                destination::start(&qmp, CONFIRM_TIMEOUT).await?;
                slot.record.incoming = None;
                self.save_record(&slot.record)?;
                entry.update(|r| {
                    r.state = SourceState::Completed;
                    // The images belong to the instance defined here now.
                    r.created_images.clear();
                });
                self.release_incoming_tls(&entry, qmp);
                info!(instance = %entry.record().instance_id, "committed guest runs on this host");
            }
            Ok(self.describe(&mut slot).await)
        }
        .instrument(span(&mid))
        .await
    }

    /// Once the guest runs here, its QEMU keeps no credentials of the migration that brought
    /// it: as soon as the incoming stream has ended (at once, unless a post-copy stream still
    /// fills the guest, which a recovery may have to reconnect), the TLS objects and
    /// parameters are removed and the files deleted.
    fn release_incoming_tls(&self, entry: &Arc<MigrationEntry>, qmp: Qmp) {
        if entry.tls().is_none() {
            return;
        }
        let entry = entry.clone();
        let span = span(&entry.record().id);
        self.track(tokio::spawn(
            async move {
                loop {
                    let status = match qmp.execute(&ferry_qmp::commands::QueryMigrate).await {
                        Ok(info) => info.status,
                        Err(_) => break,
                    };
                    use ferry_qmp::commands::MigrationStatus as S;
                    if matches!(
                        status,
                        None | Some(S::None | S::Completed | S::Failed | S::Cancelled)
                    ) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                entry.release_tls(Some(&qmp)).await;
            }
            .instrument(span),
        ));
    }

    /// The incoming QEMU of `mid` is gone: `destination-never-started` when this agent never
    /// sent it `cont` (the source's copy is then the newest and may run again),
    /// `destination-lost` when it may have run.
    fn destination_lost(&self, mid: Uuid, why: String) -> AgentError {
        let started = self.migration(&mid).is_some_and(|e| e.record().start_sent);
        if started {
            AgentError::conflict(
                "destination-lost",
                format!("{why}; it may have run the guest before it ended"),
                "the guest is lost here; start the instance again from its last state",
            )
        } else {
            AgentError::conflict(
                "destination-never-started",
                format!("{why}; it never ran the guest"),
                "the source still holds the guest",
            )
        }
    }

    /// The destination entry of `mid`, its instance's slot, and the incoming QEMU's monitor
    /// while the slot still waits for `mid` (`None` once the guest was started here).
    async fn incoming_slot(&self, mid: Uuid) -> Result<IncomingSlot, AgentError> {
        let entry = self.migration_or_404(&mid)?;
        let r = entry.record();
        let mut slot = self.lock_slot(&r.instance_id).await?;
        // A QEMU that exited is noticed now, not taken for a live one.
        self.reap(&mut slot).await;
        if slot.record.incoming != Some(mid) && r.state != SourceState::Completed {
            return Err(AgentError::conflict(
                "migration-not-incoming",
                format!(
                    "instance {} is not waiting for migration {mid}",
                    r.instance_id
                ),
                "prepare the destination first",
            ));
        }
        let qmp = match slot.record.incoming == Some(mid) {
            true => Some(slot.qmp().ok_or_else(|| {
                MigrateError::DestinationNotRunning("the incoming QEMU is gone".into())
            })?),
            false => None,
        };
        Ok((entry, slot, qmp))
    }

    /// `POST /v1/migrations/{mid}/source`: start migrating the instance to `destination` in a
    /// background task.
    pub(crate) async fn start_source(
        &self,
        mid: Uuid,
        req: StartSource,
    ) -> Result<SourceStatus, AgentError> {
        req.params.validate()?;
        let dest = parse_destination(&req.destination)?;
        if let Some(entry) = self.migration(&mid) {
            let r = entry.record();
            if r.role == Role::Source && r.instance_id == req.instance_id {
                return Ok(entry.status(0));
            }
            return Err(AgentError::conflict(
                "migration-exists",
                format!("migration {mid} is already known here for another purpose"),
                "use a new migration id",
            ));
        }
        let mut slot = self.lock_slot(&req.instance_id).await?;
        self.refuse_if_migrating(&req.instance_id)?;
        let state = self.run_state(&mut slot).await;
        let monitor = match (slot.monitor(), &state) {
            (Some(m), Some(RunState::Running)) => m,
            _ => {
                return Err(MigrateError::SourceNotRunning(
                    state
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "stopped".into()),
                )
                .into())
            }
        };
        // Written before the half starts, so that a directory that cannot be written is the
        // request's error; applied to QEMU by the half.
        let tls = match req.tls {
            Some(creds) => Some(Arc::new(
                StreamTls::create(self.tls_dir(&mid), creds).map_err(MigrateError::from)?,
            )),
            None => None,
        };
        let entry = self.new_migration(MigrationRecord {
            id: mid,
            role: Role::Source,
            instance_id: req.instance_id,
            state: SourceState::Running,
            outcome: None,
            error: None,
            last_seq: 0,
            destination: Some(dest.to_string()),
            listen_addr: None,
            finished: false,
            start_sent: false,
            postcopy_permitted: req.params.postcopy,
            params: Some(req.params.clone()),
            created_images: Vec::new(),
            disks: req.disks.clone(),
        });
        entry.set_tls(tls);
        self.spawn_source_half(mid, &entry, monitor, dest, req.params, SourceStart::Fresh);
        Ok(entry.status(0))
    }

    /// Runs a source half in a background task that records its samples, decisions and end
    /// in `entry`; the entry's abort handle stops it.
    fn spawn_source_half(
        &self,
        mid: Uuid,
        entry: &Arc<MigrationEntry>,
        monitor: Monitor,
        dest: SocketAddr,
        params: MigrationParams,
        start: SourceStart,
    ) {
        let (handle, signal) = AbortHandle::new();
        if matches!(start, SourceStart::Reconnect) {
            // A broken post-copy stream being resumed: the guest was handed over long ago.
            handle.pass_no_return();
        }
        *entry.abort.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        let task_entry = entry.clone();
        let task = tokio::spawn(
            async move {
                let sampler = task_entry.clone();
                let disks = task_entry.record().disks;
                let mut observe = move |e: &SourceEvent| sampler.push_event(e);
                let qmp = monitor.qmp.clone();
                let result = match start {
                    SourceStart::Fresh => {
                        info!(%dest, "source half starting");
                        let tls = task_entry.tls();
                        let applied = match &tls {
                            Some(tls) => tls.apply(&qmp).await.map_err(MigrateError::from),
                            None => Ok(()),
                        };
                        drop(tls);
                        match applied {
                            Ok(()) => {
                                source::run_source(
                                    &qmp,
                                    dest,
                                    &params,
                                    &disks,
                                    &mut observe,
                                    signal,
                                )
                                .await
                            }
                            Err(e) => Err(e),
                        }
                    }
                    SourceStart::Reconnect => {
                        info!(%dest, "reconnecting the post-copy stream");
                        source::reconnect(&qmp, dest, &params, &mut observe, signal).await
                    }
                    SourceStart::Attach => {
                        source::attach(&qmp, &params, &mut observe, signal).await
                    }
                };
                let result = match result {
                    Err(e) => Err(monitor.explain(e).await),
                    ok => ok,
                };
                // The half has ended, whatever the outcome, unless a broken post-copy stream
                // waits to be reconnected with the same credentials.
                if !matches!(result, Err(MigrateError::PostcopyPaused(_))) {
                    match task_entry.take_tls() {
                        Some(tls) => {
                            tls.remove(&qmp).await;
                            drop(tls);
                            info!("migration credentials removed");
                        }
                        // Followed after an agent restart: its credentials' files are gone
                        // (see `remove_stale_credentials`), but QEMU may still hold them.
                        None if matches!(start, SourceStart::Attach) => {
                            ferry_migrate::tls::remove(&qmp).await
                        }
                        None => {}
                    }
                }
                task_entry.finish(result);
            }
            .instrument(span(&mid)),
        );
        self.track(task);
    }

    /// `GET /v1/migrations/{mid}?after=SEQ`; an unknown migration is `Unknown`, not an error,
    /// so a poller can tell "this host never heard of it" from a failure.
    pub(crate) async fn source_status(
        &self,
        mid: Uuid,
        after: u64,
        wait: Duration,
    ) -> SourceStatus {
        match self.migration(&mid) {
            Some(entry) => entry.status_after(after, wait).await,
            None => SourceStatus {
                state: SourceState::Unknown,
                switched_over: false,
                samples: Vec::new(),
                decisions: Vec::new(),
                outcome: None,
                error: None,
            },
        }
    }

    /// `POST /v1/migrations/{mid}/cancel`: abort a running source half before switchover and,
    /// with `wait`, wait until QEMU confirms (the guest then runs on this host again). Refused
    /// with `too-late-to-cancel` once the half has let QEMU switch over.
    pub(crate) async fn cancel_source(
        &self,
        mid: Uuid,
        wait: bool,
    ) -> Result<SourceStatus, AgentError> {
        let entry = self.migration_or_404(&mid)?;
        let r = entry.record();
        if r.role != Role::Source {
            return Err(AgentError::BadRequest(format!(
                "this host is the destination of migration {mid}; cancel on its source"
            )));
        }
        let handle = entry
            .abort
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match r.state {
            // Handed over, or in post-copy (a broken post-copy stream too): the guest's newest
            // state is on the destination.
            SourceState::Completed | SourceState::PostcopyPaused => {
                return Err(MigrateError::TooLateToCancel.into())
            }
            SourceState::Running => {}
            _ => return Ok(entry.status(0)),
        }
        if let Some(h) = handle {
            h.abort().map_err(|_| MigrateError::TooLateToCancel)?;
        }
        if wait {
            let deadline = Instant::now() + CANCEL_WAIT;
            while entry.record().state == SourceState::Running && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(entry.status(0))
    }

    /// `POST /v1/migrations/{mid}/finish`: quit the handed-over source QEMU (only in
    /// `postmigrate`), remove its taps and the instance.
    pub(crate) async fn finish_source(&self, mid: Uuid) -> Result<(), AgentError> {
        async {
            let entry = self.migration_or_404(&mid)?;
            let r = entry.record();
            if r.role != Role::Source || r.state != SourceState::Completed {
                return Err(AgentError::conflict(
                    "migration-not-completed",
                    format!(
                        "migration {mid} has not completed on this host (state {:?})",
                        r.state
                    ),
                    "finish only after the source reports completed",
                ));
            }
            let mut slot = match self.lock_slot(&r.instance_id).await {
                Ok(slot) => slot,
                Err(_) => return Ok(()),
            };
            let state = self.run_state(&mut slot).await;
            if slot.process.is_some() && state != Some(RunState::Postmigrate) {
                return Err(AgentError::conflict(
                    "source-not-handed-over",
                    format!(
                        "the source QEMU is in state {}, not postmigrate",
                        state.map(|s| s.to_string()).unwrap_or("unknown".into())
                    ),
                    "a source that still runs the guest is never stopped by finish",
                ));
            }
            self.teardown(&mut slot, true).await;
            self.forget_instance(&mut slot);
            entry.update(|r| r.finished = true);
            info!(instance = %r.instance_id, "handed-over source removed");
            Ok(())
        }
        .instrument(span(&mid))
        .await
    }

    /// `POST /v1/migrations/{mid}/params`: new bandwidth and downtime target for a running
    /// source stream; QEMU applies them to the migration in flight.
    pub(crate) async fn set_source_params(
        &self,
        mid: Uuid,
        req: SetSourceParams,
    ) -> Result<(), AgentError> {
        async {
            let (_, qmp) = self.running_source(mid).await?;
            let params = MigrateSetParameters {
                max_bandwidth: req.bandwidth.map(|b| b.bytes_per_sec()),
                downtime_limit: req.downtime_limit_ms,
                ..Default::default()
            };
            qmp.execute(&params).await.map_err(MigrateError::from)?;
            info!(?req, "migration pacing changed");
            Ok(())
        }
        .instrument(span(&mid))
        .await
    }

    /// The QMP connection of the instance's QEMU on this host, which a source half needs.
    async fn source_qmp(&self, instance_id: &Uuid) -> Result<Qmp, AgentError> {
        Ok(self
            .lock_slot(instance_id)
            .await?
            .qmp()
            .ok_or_else(|| MigrateError::SourceNotRunning("stopped".into()))?)
    }

    /// The QMP connection of a migration this host is running as the source.
    async fn running_source(&self, mid: Uuid) -> Result<(MigrationRecord, Qmp), AgentError> {
        let entry = self.migration_or_404(&mid)?;
        let r = entry.record();
        if r.role != Role::Source || r.state != SourceState::Running {
            return Err(AgentError::conflict(
                "migration-not-running",
                format!("migration {mid} is not copying from this host"),
                "only a running migration can be steered, on its source host",
            ));
        }
        let qmp = self.source_qmp(&r.instance_id).await?;
        Ok((r, qmp))
    }

    /// `POST /v1/migrations/{mid}/postcopy`: switch a running pre-copy to post-copy now. Only
    /// for migrations started with post-copy permitted (both QEMUs need the capability).
    pub(crate) async fn start_postcopy(&self, mid: Uuid) -> Result<(), AgentError> {
        async {
            let (r, qmp) = self.running_source(mid).await?;
            if !r.postcopy_permitted {
                return Err(AgentError::conflict(
                    "postcopy-not-permitted",
                    format!("migration {mid} was started without post-copy permitted"),
                    "start the migration with post-copy allowed (--post-copy) to switch later",
                ));
            }
            // Post-copy hands the guest over: past the same point of no return as a
            // switchover, decided against a cancel under the same gate.
            let entry = self.migration_or_404(&mid)?;
            let gate = entry
                .abort
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if gate.is_some_and(|h| !h.pass_no_return()) {
                return Err(AgentError::conflict(
                    "migration-cancelling",
                    format!("migration {mid} is being cancelled"),
                    "wait for the cancel to finish; the guest stays on the source",
                ));
            }
            qmp.execute(&MigrateStartPostcopy {})
                .await
                .map_err(MigrateError::from)?;
            info!("switched to post-copy on request");
            Ok(())
        }
        .instrument(span(&mid))
        .await
    }

    /// `POST /v1/instances/{id}/dirty-rate`: how fast the running guest dirties memory,
    /// measured by QEMU over one second, for the auto policy's plan.
    pub(crate) async fn measure_dirty_rate(&self, id: Uuid) -> Result<DirtyRate, AgentError> {
        let qmp = {
            let mut slot = self.lock_slot(&id).await?;
            match (self.run_state(&mut slot).await, slot.process.as_ref()) {
                (Some(RunState::Running), Some(p)) => p.qmp().clone(),
                (state, _) => {
                    return Err(MigrateError::SourceNotRunning(
                        state
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| "stopped".into()),
                    )
                    .into())
                }
            }
        };
        let period = DIRTY_RATE_WINDOW;
        let bps = ferry_migrate::dirty_rate::measure(&qmp, period).await?;
        Ok(DirtyRate {
            dirty_rate_bps: bps,
            period_ms: period.as_millis() as u64,
        })
    }

    /// `POST /v1/migrations/{mid}/recover`: make the destination of a broken post-copy stream
    /// listen again, on a free port of the migration range.
    pub(crate) async fn recover_destination(&self, mid: Uuid) -> Result<IncomingReady, AgentError> {
        async {
            let entry = self.migration_or_404(&mid)?;
            let r = entry.record();
            if r.role != Role::Destination || r.state != SourceState::Running {
                return Err(AgentError::conflict(
                    "migration-not-incoming",
                    format!("migration {mid} is not arriving on this host"),
                    "recover on the destination host of a post-copy migration",
                ));
            }
            let qmp = self
                .lock_slot(&r.instance_id)
                .await?
                .qmp()
                .ok_or_else(|| AgentError::Internal("incoming QEMU vanished".into()))?;
            let params = MigrationParams {
                port_range: self.port_range,
                ..MigrationParams::default()
            };
            let addr = destination::recover(&qmp, &params, self.config.migration_addr).await?;
            entry.update(|r| r.listen_addr = Some(addr.to_string()));
            info!(%addr, "destination listening again for the post-copy stream");
            Ok(IncomingReady {
                addr: addr.to_string(),
                disks: Vec::new(),
            })
        }
        .instrument(span(&mid))
        .await
    }

    /// `POST /v1/migrations/{mid}/reconnect`: resume a broken post-copy stream from this
    /// (source) host to where the destination listens again, and follow it in a background
    /// task as `start_source` does.
    pub(crate) async fn reconnect_source(
        &self,
        mid: Uuid,
        req: ReconnectSource,
    ) -> Result<SourceStatus, AgentError> {
        let dest = parse_destination(&req.destination)?;
        let entry = self.migration_or_404(&mid)?;
        let r = entry.record();
        if r.role != Role::Source || r.state != SourceState::PostcopyPaused {
            return Err(AgentError::conflict(
                "migration-not-paused",
                format!("migration {mid} has no broken post-copy stream on this host"),
                "only a post-copy migration whose stream broke can be reconnected",
            ));
        }
        let monitor = self
            .lock_slot(&r.instance_id)
            .await?
            .monitor()
            .ok_or_else(|| MigrateError::SourceNotRunning("stopped".into()))?;
        entry.update(|r| {
            r.state = SourceState::Running;
            r.error = None;
            r.destination = Some(dest.to_string());
        });
        let params = r.params.clone().unwrap_or(MigrationParams {
            postcopy: true,
            ..MigrationParams::default()
        });
        self.spawn_source_half(mid, &entry, monitor, dest, params, SourceStart::Reconnect);
        Ok(entry.status(0))
    }

    /// `POST /v1/migrations/{mid}/resume`: make sure the guest runs on this (source) host.
    /// A source that handed its guest over (`postmigrate`) runs again only with
    /// `destination_gone`: the server says so once the destination was removed and the
    /// migration was never committed.
    pub(crate) async fn resume_source(
        &self,
        mid: Uuid,
        destination_gone: bool,
    ) -> Result<AgentInstance, AgentError> {
        async {
            let entry = self.migration_or_404(&mid)?;
            let r = entry.record();
            if r.state == SourceState::Running {
                return Err(AgentError::conflict(
                    "migration-in-progress",
                    format!("migration {mid} is still running"),
                    "cancel it first",
                ));
            }
            let mut slot = self.lock_slot(&r.instance_id).await?;
            let monitor = slot
                .monitor()
                .ok_or_else(|| MigrateError::SourceNotRunning("stopped".into()))?;
            let resumed = if destination_gone {
                source::resume_handed_over(&monitor.qmp).await
            } else {
                source::ensure_running(&monitor.qmp).await
            };
            if let Err(e) = resumed {
                return Err(monitor.explain(e).await.into());
            }
            info!(instance = %r.instance_id, "source guest runs");
            Ok(self.describe(&mut slot).await)
        }
        .instrument(span(&mid))
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    #[test]
    fn ended_records_go_after_their_retention_or_beyond_the_newest_few() {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        let records = vec![
            (ids[0], true, now - 48 * hour),  // in flight: kept however old
            (ids[1], false, now - 48 * hour), // ended two days ago: gone
            (ids[2], false, now - hour),
            (ids[3], false, now - 2 * hour),
            (ids[4], false, now),
        ];
        let mut pruned = records_to_prune(&records, now, 24 * hour, 10);
        pruned.sort();
        assert_eq!(pruned, vec![ids[1]]);
        // Keep only the two newest ended ones.
        let mut pruned = records_to_prune(&records, now, 24 * hour, 2);
        pruned.sort();
        let mut expected = vec![ids[1], ids[3]];
        expected.sort();
        assert_eq!(pruned, expected);
    }
}
