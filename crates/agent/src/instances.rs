//! Instances on this host: their records on disk, their QEMU processes, and re-adoption of
//! running guests after an agent restart.
//!
//! Each instance lives in `state_dir/instances/<uuid>/instance.json`; its QEMU run directory
//! is `state_dir/run/<first 8 hex of the uuid>` (short, because unix socket paths are limited
//! to 108 bytes). Every QEMU is detached: dropping it (agent shutdown or crash) leaves the
//! guest running.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_api::agent::{AgentInstance, DefineInstance};
use ferry_api::instances::{
    BootFrom, FirmwareKind, InstanceSpec, InstanceState, StopMethod, StopOptions,
};
use ferry_migrate::MigrateError;
use ferry_qemu::{
    parse_gateway, BackingImage, BootSource, DiskSpec, Firmware, Ipv4Cidr, LaunchOptions, MacAddr,
    NicSpec, QemuProcess, Shutdown, StartMode,
};
use ferry_qmp::commands::{QueryStatus, RunState};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use uuid::Uuid;

use crate::datastores;
use crate::net::{add_tap, remove_tap, tap_name, MAX_NICS};
use crate::{Agent, AgentError};

/// How long `stop` waits for QEMU to quit before killing it.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Monitor commands used only to report state get a short timeout: a wedged QEMU must not
/// stall listings and heartbeats.
const STATE_QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// What is stored for an instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct InstanceRecord {
    pub id: Uuid,
    pub name: String,
    pub spec: InstanceSpec,
    /// Set while this host is the destination of migration `incoming` and the guest has not
    /// been confirmed running here.
    #[serde(default)]
    pub incoming: Option<Uuid>,
}

/// An instance in memory: its record and, when it has one, its QEMU process.
pub(crate) struct Slot {
    pub record: InstanceRecord,
    pub process: Option<QemuProcess>,
    /// Set when the instance was removed while someone waited for this slot.
    pub deleted: bool,
    /// QEMU ended by itself with an error (or a signal) since it was last started: shown as
    /// crashed, not stopped, until the instance is started or stopped again.
    pub crashed: bool,
}

impl Slot {
    /// A handle on the QEMU's monitor, usable after the slot's lock is released.
    pub fn qmp(&self) -> Option<ferry_qmp::Qmp> {
        self.process.as_ref().map(|p| p.qmp().clone())
    }

    /// The monitor and the exit watch of the slot's QEMU, for work that outlives the lock
    /// and must say why QEMU went away if it does.
    pub fn monitor(&self) -> Option<Monitor> {
        self.process.as_ref().map(|p| Monitor {
            qmp: p.qmp().clone(),
            exit: p.exit_watch(),
        })
    }
}

/// A QEMU's monitor together with the watch on its exit.
#[derive(Clone)]
pub struct Monitor {
    pub qmp: ferry_qmp::Qmp,
    pub exit: tokio::sync::watch::Receiver<Option<ferry_qemu::Exit>>,
}

impl Monitor {
    /// Turns "the monitor connection closed" into what happened to QEMU: its status and last
    /// output once it has exited (it may take a moment to be reaped). Other errors pass.
    pub async fn explain(&self, e: MigrateError) -> MigrateError {
        let closed = matches!(
            e,
            MigrateError::Qmp(ferry_qmp::QmpError::Closed | ferry_qmp::QmpError::Io(_))
        );
        if !closed {
            return e;
        }
        let mut exit = self.exit.clone();
        let waited =
            tokio::time::timeout(Duration::from_secs(2), exit.wait_for(|s| s.is_some())).await;
        match waited {
            Ok(Ok(ended)) => match ended.clone() {
                Some(ferry_qemu::Exit { status, output }) => {
                    MigrateError::SourceExited { status, output }
                }
                None => e,
            },
            _ => e,
        }
    }
}

/// Whether `/proc/<pid>/cmdline` names guest `name` (`-name guest=<name>,...`), so that a
/// reused pid of an unrelated process is never adopted.
fn cmdline_names_guest(cmdline: &[u8], name: &str) -> bool {
    let exact = format!("guest={name}");
    let prefix = format!("guest={name},");
    cmdline
        .split(|b| *b == 0)
        .map(String::from_utf8_lossy)
        .any(|arg| arg == exact || arg.starts_with(&prefix))
}

impl Agent {
    pub(crate) fn instance_dir(&self, id: &Uuid) -> PathBuf {
        self.config.state_dir.join("instances").join(id.to_string())
    }

    pub(crate) fn run_dir(&self, id: &Uuid) -> PathBuf {
        let hex = id.simple().to_string();
        self.config.state_dir.join("run").join(&hex[..8])
    }

    /// Writes `instance.json` atomically (temporary file, then rename).
    pub(crate) fn save_record(&self, record: &InstanceRecord) -> Result<(), AgentError> {
        let dir = self.instance_dir(&record.id);
        std::fs::create_dir_all(&dir).map_err(AgentError::io(&dir))?;
        let json = serde_json::to_vec_pretty(record)
            .map_err(|e| AgentError::Internal(format!("cannot encode instance record: {e}")))?;
        let tmp = dir.join("instance.json.tmp");
        let path = dir.join("instance.json");
        std::fs::write(&tmp, json).map_err(AgentError::io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(AgentError::io(&path))
    }

    /// Removes the instance's directories and forgets it.
    pub(crate) fn forget_instance(&self, slot: &mut Slot) {
        let id = slot.record.id;
        for dir in [self.instance_dir(&id), self.run_dir(&id)] {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(dir = %dir.display(), error = %e, "cannot remove instance directory");
                }
            }
        }
        slot.deleted = true;
        self.instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// The slot of instance `id`, or 404.
    pub(crate) fn slot(&self, id: &Uuid) -> Result<Arc<tokio::sync::Mutex<Slot>>, AgentError> {
        self.instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or(AgentError::InstanceNotFound(*id))
    }

    /// Locks instance `id`'s slot; 404 if it does not exist (or was removed meanwhile).
    pub(crate) async fn lock_slot(
        &self,
        id: &Uuid,
    ) -> Result<tokio::sync::OwnedMutexGuard<Slot>, AgentError> {
        let slot = self.slot(id)?.lock_owned().await;
        if slot.deleted {
            return Err(AgentError::InstanceNotFound(*id));
        }
        Ok(slot)
    }

    /// The CPU models of the instances defined here (those whose slot is free right now).
    pub(crate) fn cpu_models_in_use(&self) -> Vec<String> {
        let slots: Vec<_> = self
            .instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let mut models: Vec<String> = slots
            .iter()
            .filter_map(|s| s.try_lock().ok().map(|s| s.record.spec.cpu_model.clone()))
            .collect();
        models.sort();
        models.dedup();
        models
    }

    /// Inserts a new slot; the caller holds its lock.
    pub(crate) fn insert_slot(&self, record: InstanceRecord) -> tokio::sync::OwnedMutexGuard<Slot> {
        let id = record.id;
        let slot = Arc::new(tokio::sync::Mutex::new(Slot {
            record,
            process: None,
            deleted: false,
            crashed: false,
        }));
        let guard = slot
            .clone()
            .try_lock_owned()
            .unwrap_or_else(|_| unreachable!("a fresh mutex is unlocked"));
        self.instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, slot);
        guard
    }

    /// Refuses a name another instance on this host already has: QEMU processes and
    /// re-adoption are matched by name.
    pub(crate) fn check_name_free(&self, id: &Uuid, name: &str) -> Result<(), AgentError> {
        let slots: Vec<_> = self
            .instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(other, _)| *other != id)
            .map(|(_, s)| s.clone())
            .collect();
        for slot in slots {
            if let Ok(s) = slot.try_lock() {
                if s.record.name == name && !s.deleted {
                    return Err(AgentError::conflict(
                        "instance-name-taken",
                        format!(
                            "instance {} on this host is already called '{name}'",
                            s.record.id
                        ),
                        "give each instance a unique name",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The QEMU spec and the taps (name, bridge) for an instance record.
    pub(crate) fn translate(
        &self,
        record: &InstanceRecord,
    ) -> Result<(ferry_qemu::InstanceSpec, Vec<(String, String)>), AgentError> {
        let spec = &record.spec;
        if spec.nics.len() > MAX_NICS {
            return Err(AgentError::BadRequest(format!(
                "{} NICs is more than the {MAX_NICS} an instance may have",
                spec.nics.len()
            )));
        }
        let mut nics = Vec::new();
        let mut taps = Vec::new();
        for (i, nic) in spec.nics.iter().enumerate() {
            let network = self
                .config
                .network(&nic.network)
                .ok_or_else(|| unknown_network(&self.config, &nic.network))?;
            let mac: MacAddr = nic
                .mac
                .parse()
                .map_err(|e: String| AgentError::BadRequest(format!("nics[{i}].mac: {e}")))?;
            let ipv4 = nic
                .ipv4
                .as_deref()
                .map(str::parse::<Ipv4Cidr>)
                .transpose()
                .map_err(|e| AgentError::BadRequest(format!("nics[{i}].ipv4: {e}")))?;
            let gateway = nic
                .gateway
                .as_deref()
                .map(parse_gateway)
                .transpose()
                .map_err(|e| AgentError::BadRequest(format!("nics[{i}].gateway: {e}")))?;
            let tap = tap_name(&record.id, i);
            nics.push(NicSpec {
                tap: tap.clone(),
                mac,
                ipv4,
                gateway,
            });
            taps.push((tap, network.bridge.clone()));
        }
        let boot = match spec.boot.from {
            BootFrom::Kernel => {
                let (Some(kernel), Some(initrd)) = (&spec.boot.kernel, &spec.boot.initrd) else {
                    return Err(AgentError::BadRequest(
                        "boot.from = kernel needs boot.kernel and boot.initrd".into(),
                    ));
                };
                BootSource::Kernel {
                    kernel: kernel.into(),
                    initrd: initrd.into(),
                    cmdline: spec.boot.cmdline.clone(),
                }
            }
            BootFrom::Disk => BootSource::Disk,
        };
        let firmware = match spec.boot.firmware {
            FirmwareKind::Bios => Firmware::Bios,
            FirmwareKind::Uefi => {
                let nvram = spec.boot.nvram.as_ref().ok_or_else(|| {
                    AgentError::BadRequest("a UEFI instance needs boot.nvram".into())
                })?;
                Firmware::Uefi {
                    code: self.config.ovmf_code.clone(),
                    vars: datastores::resolve(&self.config, nvram)?,
                }
            }
        };
        let mut disks = Vec::new();
        for d in &spec.disks {
            let backing = match &d.backing {
                Some(b) => Some(BackingImage {
                    path: datastores::resolve(&self.config, &b.image)?,
                    format: b.format,
                }),
                None => None,
            };
            disks.push(DiskSpec {
                id: d.id.clone(),
                path: datastores::resolve(&self.config, &d.image)?,
                format: d.format,
                bus: d.bus,
                cache: d.cache,
                read_only: d.read_only,
                serial: d.serial.clone(),
                backing,
            });
        }
        let qemu = ferry_qemu::InstanceSpec {
            name: record.name.clone(),
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            cpu_model: spec.cpu_model.clone(),
            machine: spec.machine.clone(),
            boot,
            firmware,
            disks,
            nics,
        };
        qemu.validate()?;
        Ok((qemu, taps))
    }

    /// Creates the taps and starts QEMU for the slot's record; on failure nothing is left.
    pub(crate) async fn launch(&self, slot: &mut Slot, mode: StartMode) -> Result<(), AgentError> {
        let (spec, taps) = self.translate(&slot.record)?;
        slot.crashed = false;
        let ns = self.config.netns.as_deref();
        for (i, (tap, bridge)) in taps.iter().enumerate() {
            if let Err(e) = add_tap(ns, tap, bridge).await {
                for (t, _) in &taps[..i] {
                    remove_tap(ns, t).await;
                }
                return Err(e);
            }
        }
        let mut opts = LaunchOptions::new(self.run_dir(&slot.record.id), self.facts.accel);
        opts.qemu_binary = self.config.qemu_binary.clone();
        opts.netns = self.config.netns.clone();
        opts.mode = mode;
        // Outside the run directory, so the output outlives the process (and a migration).
        opts.serial_log = Some(self.console_segment(&slot.record.id));
        match QemuProcess::launch(&spec, &opts).await {
            Ok(mut process) => {
                process.set_detached(true);
                info!(instance = %slot.record.id, name = %slot.record.name, pid = process.pid(), ?mode, "QEMU started");
                slot.process = Some(process);
                Ok(())
            }
            Err(e) => {
                for (t, _) in &taps {
                    remove_tap(ns, t).await;
                }
                Err(e.into())
            }
        }
    }

    /// Removes the taps of the slot's instance.
    pub(crate) async fn remove_taps(&self, record: &InstanceRecord) {
        for i in 0..record.spec.nics.len().min(MAX_NICS) {
            remove_tap(self.config.netns.as_deref(), &tap_name(&record.id, i)).await;
        }
    }

    /// Stops the slot's QEMU (gracefully: `quit`, then kill after 10 s; or at once) and
    /// removes its taps. `None` when there was no QEMU; otherwise how it ended (only a
    /// clean quit leaves its images closed and flushed).
    pub(crate) async fn teardown(&self, slot: &mut Slot, graceful: bool) -> Option<Shutdown> {
        slot.crashed = false;
        let mut outcome = None;
        if let Some(mut process) = slot.process.take() {
            let ended = if graceful {
                process.shutdown(STOP_TIMEOUT).await
            } else {
                process.kill();
                let _ = process.wait_exit(Duration::from_secs(5)).await;
                Shutdown::Killed(Duration::ZERO)
            };
            info!(instance = %slot.record.id, graceful, outcome = %ended, "QEMU stopped");
            outcome = Some(ended);
        }
        self.remove_taps(&slot.record).await;
        outcome
    }

    /// Notices a QEMU that exited by itself: frees its run directory and taps.
    pub(crate) async fn reap(&self, slot: &mut Slot) {
        let exited = slot
            .process
            .as_ref()
            .and_then(|p| p.exit_status())
            .is_some();
        if exited {
            if let Some(mut p) = slot.process.take() {
                let status = p.exit_status();
                warn!(instance = %slot.record.id, ?status, output = %p.output_tail(), "QEMU exited");
                // A clean exit (the guest powered off) is a stop; anything else a crash. An
                // adopted process's status cannot be known and counts as a crash.
                slot.crashed = status.as_deref() != Some("exit status: 0");
                p.kill();
            }
            self.remove_taps(&slot.record).await;
        }
    }

    /// QEMU's run state, if a process exists and answers.
    pub(crate) async fn run_state(&self, slot: &mut Slot) -> Option<RunState> {
        self.reap(slot).await;
        let qmp = slot.process.as_ref()?.qmp().clone();
        qmp.with_timeout(STATE_QUERY_TIMEOUT)
            .execute(&QueryStatus {})
            .await
            .ok()
            .map(|s| s.status)
    }

    /// The instance as the API reports it.
    pub(crate) async fn describe(&self, slot: &mut Slot) -> AgentInstance {
        let qemu_state = self.run_state(slot).await;
        let pid = slot.process.as_ref().map(|p| p.pid());
        let state = match (&slot.process, &qemu_state) {
            (None, _) if slot.crashed => InstanceState::Crashed,
            (None, _) => InstanceState::Stopped,
            (Some(_), Some(s)) => state_of(s),
            (Some(_), None) => InstanceState::Error,
        };
        AgentInstance {
            id: slot.record.id,
            name: slot.record.name.clone(),
            state,
            qemu_state: qemu_state.map(|s| s.to_string()),
            pid,
            incoming: slot.record.incoming,
            guest: slot
                .process
                .as_ref()
                .and_then(|_| self.guest(&slot.record.id)),
            stopped_by: None,
        }
    }

    /// Every instance on this host, sorted by name.
    pub(crate) async fn list_instances(&self) -> Vec<AgentInstance> {
        let mut out = Vec::new();
        for slot in self.slots() {
            let mut slot = slot.lock().await;
            if !slot.deleted {
                out.push(self.describe(&mut slot).await);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// `PUT /v1/instances/{id}`: idempotent; a changed spec is refused while QEMU runs.
    pub(crate) async fn define(
        &self,
        id: Uuid,
        req: DefineInstance,
    ) -> Result<AgentInstance, AgentError> {
        let record = InstanceRecord {
            id,
            name: req.name,
            spec: req.spec,
            incoming: None,
        };
        self.translate(&record)?;
        self.check_name_free(&id, &record.name)?;
        let existing = self.lock_slot(&id).await;
        let mut slot = match existing {
            Ok(mut slot) => {
                if slot.record.name == record.name && slot.record.spec == record.spec {
                    return Ok(self.describe(&mut slot).await);
                }
                if slot.record.incoming.is_some() {
                    return Err(AgentError::conflict(
                        "instance-incoming",
                        format!("instance {id} is arriving by migration; its spec cannot change"),
                        "wait for the migration to finish",
                    ));
                }
                self.reap(&mut slot).await;
                if slot.process.is_some() {
                    return Err(AgentError::conflict(
                        "instance-running",
                        format!("instance {id} runs with another spec; stop it to redefine it"),
                        "stop the instance first",
                    ));
                }
                slot.record = record;
                slot
            }
            Err(_) => self.insert_slot(record),
        };
        if let Err(e) = self.save_record(&slot.record) {
            self.forget_instance(&mut slot);
            return Err(e);
        }
        info!(instance = %id, name = %slot.record.name, "instance defined");
        Ok(self.describe(&mut slot).await)
    }

    /// `POST /v1/instances/{id}/start`.
    pub(crate) async fn start_instance(&self, id: Uuid) -> Result<AgentInstance, AgentError> {
        let mut slot = self.lock_slot(&id).await?;
        self.reap(&mut slot).await;
        if slot.record.incoming.is_some() {
            return Err(incoming_conflict(id));
        }
        if slot.process.is_some() {
            let state = self.run_state(&mut slot).await;
            return Err(AgentError::conflict(
                "instance-already-running",
                format!(
                    "instance {id} already has a QEMU process (state {})",
                    state.map(|s| s.to_string()).unwrap_or("unknown".into())
                ),
                "stop it first, or leave it running",
            ));
        }
        self.launch(&mut slot, StartMode::Normal).await?;
        Ok(self.describe(&mut slot).await)
    }

    /// `POST /v1/instances/{id}/stop`: asks the guest to shut down (its guest agent, else the
    /// ACPI power button) and waits for it to power off; a guest that has not within the
    /// timeout, or a forced stop, is powered off by QEMU (`quit`, then kill). The slot is not
    /// locked while the guest shuts down, so heartbeats and listings go on. Stopping a
    /// stopped instance succeeds.
    pub(crate) async fn stop_instance(
        &self,
        id: Uuid,
        opts: StopOptions,
    ) -> Result<AgentInstance, AgentError> {
        let timeout = Duration::from_secs(u64::from(
            opts.timeout_s
                .unwrap_or(StopOptions::DEFAULT_TIMEOUT_S)
                .min(StopOptions::MAX_TIMEOUT_S),
        ));
        let asked = {
            let mut slot = self.lock_slot(&id).await?;
            if slot.record.incoming.is_some() {
                return Err(incoming_conflict(id));
            }
            self.refuse_if_migrating(&id)?;
            let running = self.run_state(&mut slot).await == Some(RunState::Running);
            match (&slot.process, running && !opts.force) {
                (None, _) => None,
                (Some(_), false) => Some((StopMethod::Forced, None)),
                (Some(p), true) => {
                    let exit = p.exit_watch();
                    let method = self.ask_guest_to_power_off(&slot).await;
                    Some((method, Some(exit)))
                }
            }
        };
        let method = match asked {
            None => StopMethod::AlreadyStopped,
            Some((method, None)) => method,
            Some((method, Some(mut exit))) => {
                let off = tokio::time::timeout(timeout, exit.wait_for(|s| s.is_some())).await;
                if off.is_ok() {
                    method
                } else {
                    warn!(instance = %id, ?method, ?timeout, "the guest did not power off; stopping QEMU");
                    StopMethod::Timeout
                }
            }
        };
        let mut slot = self.lock_slot(&id).await?;
        self.teardown(&mut slot, true).await;
        info!(instance = %id, ?method, "instance stopped");
        let mut out = self.describe(&mut slot).await;
        out.stopped_by = Some(method);
        Ok(out)
    }

    /// Asks the guest OS to power off: through its guest agent when one answered lately,
    /// else with the ACPI power button. Returns which was used.
    async fn ask_guest_to_power_off(&self, slot: &Slot) -> StopMethod {
        let Some(process) = slot.process.as_ref() else {
            return StopMethod::AlreadyStopped;
        };
        // Only a guest whose agent answered lately is asked through it: a guest without one
        // would cost a timeout first.
        if self.guest(&slot.record.id).is_some()
            && crate::guest_info::power_off(&process.paths().qga_socket).await
        {
            return StopMethod::GuestAgent;
        }
        if let Some(qmp) = slot.qmp() {
            if let Err(e) = qmp.execute_raw("system_powerdown", None).await {
                warn!(instance = %slot.record.id, error = %e, "system_powerdown failed");
            }
        }
        StopMethod::Acpi
    }

    /// `POST /v1/instances/{id}/fence`: pause this copy of the guest (QMP `stop`) because the
    /// server found another host running it. Nothing is lost: the copy stays as it was, and
    /// `cont` (an instance start) or a stop decides later.
    pub(crate) async fn fence_instance(&self, id: Uuid) -> Result<AgentInstance, AgentError> {
        let mut slot = self.lock_slot(&id).await?;
        if self.run_state(&mut slot).await == Some(RunState::Running) {
            if let Some(qmp) = slot.qmp() {
                qmp.execute(&ferry_qmp::commands::Stop {})
                    .await
                    .map_err(ferry_migrate::MigrateError::from)?;
                warn!(instance = %id, "copy fenced: paused because another host runs the guest");
            }
        }
        Ok(self.describe(&mut slot).await)
    }

    /// `GET /v1/instances/{id}/migration-settings`: the migration capabilities and
    /// parameters the instance's QEMU has now. The server reads them from a source once its
    /// memory stream runs, so a job records what QEMU actually ran with, not what was asked.
    pub(crate) async fn migration_settings(
        &self,
        id: Uuid,
    ) -> Result<ferry_migrate::QemuSettings, AgentError> {
        let qmp = self
            .lock_slot(&id)
            .await?
            .qmp()
            .ok_or_else(|| ferry_migrate::MigrateError::SourceNotRunning("stopped".into()))?;
        Ok(ferry_migrate::settings::read(&qmp.with_timeout(STATE_QUERY_TIMEOUT)).await?)
    }

    /// `DELETE /v1/instances/{id}`: refused while QEMU runs.
    pub(crate) async fn delete_instance(&self, id: Uuid) -> Result<(), AgentError> {
        let mut slot = self.lock_slot(&id).await?;
        self.reap(&mut slot).await;
        if slot.process.is_some() {
            return Err(AgentError::conflict(
                "instance-running",
                format!("instance {id} is running; stop it before deleting it"),
                "stop the instance first",
            ));
        }
        self.refuse_if_migrating(&id)?;
        self.remove_taps(&slot.record).await;
        // The console segments stay: a cold migration deletes the source's definition this
        // way, and the output printed there is still the instance's. The server removes them
        // when it deletes the instance (`DELETE /v1/instances/{id}/console`).
        self.forget_instance(&mut slot);
        info!(instance = %id, "instance deleted");
        Ok(())
    }

    /// Loads every instance record and re-adopts the QEMU processes still running; cleans up
    /// after those that died while the agent was down.
    pub(crate) async fn readopt_instances(&self) {
        let dir = self.config.state_dir.join("instances");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot read instance records");
                return;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path().join("instance.json");
            let record: InstanceRecord = match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => r,
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "skipping unreadable instance record");
                    continue;
                }
            };
            let mut slot = self.insert_slot(record);
            self.readopt(&mut slot).await;
        }
    }

    async fn readopt(&self, slot: &mut Slot) {
        let id = slot.record.id;
        let run_dir = self.run_dir(&id);
        let pid = std::fs::read_to_string(run_dir.join("qemu.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let live = pid.filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| cmdline_names_guest(&c, &slot.record.name))
        });
        if let Some(pid) = live {
            match self.translate(&slot.record) {
                Ok((spec, _)) => {
                    match QemuProcess::adopt(&spec, &run_dir, pid, Duration::from_secs(5)).await {
                        Ok(mut p) => {
                            p.set_detached(true);
                            info!(instance = %id, name = %slot.record.name, pid, incoming = ?slot.record.incoming, "re-adopted running QEMU");
                            slot.process = Some(p);
                            return;
                        }
                        Err(e) => {
                            warn!(instance = %id, pid, error = %e, "cannot re-adopt QEMU; leaving it alone");
                            return;
                        }
                    }
                }
                Err(e) => {
                    warn!(instance = %id, error = %e, "instance record no longer translates; leaving its QEMU alone");
                    return;
                }
            }
        }
        // No live process: clean what it left.
        let _ = std::fs::remove_dir_all(&run_dir);
        self.remove_taps(&slot.record).await;
        if let Some(mid) = slot.record.incoming {
            info!(instance = %id, migration = %mid, "incoming QEMU died while the agent was down; removing it");
            self.forget_instance(slot);
        }
    }

    /// At agent shutdown: lets go of every QEMU (they are detached, so they keep running) so
    /// that no monitor connection stays open for the next agent.
    pub(crate) async fn release_all(&self) {
        let slots: Vec<_> = self
            .instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, s)| s)
            .collect();
        for slot in slots {
            match tokio::time::timeout(Duration::from_secs(2), slot.lock()).await {
                Ok(mut s) => {
                    if let Some(p) = s.process.take() {
                        debug_assert!(p.is_detached());
                        drop(p);
                    }
                }
                Err(_) => {
                    warn!("an instance is busy at shutdown; its monitor closes when that finishes")
                }
            }
        }
    }
}

/// A NIC on a network this host does not carry: the message lists the ones it does, so a
/// typo (`lab0` for `lab`) is fixed without reading the agent's configuration.
fn unknown_network(config: &crate::AgentConfig, name: &str) -> AgentError {
    AgentError::refused(
        "unknown-network",
        format!(
            "network '{}' is not configured on host {}; its networks: {}",
            name.escape_debug(),
            config.name,
            ferry_api::hosts::networks_list(
                config
                    .networks
                    .iter()
                    .map(|n| (n.name.as_str(), n.bridge.as_str()))
            )
        ),
        "use one of the host's networks, or add the network (its name and bridge) to \
         `networks` in the host's agent configuration",
    )
}

fn incoming_conflict(id: Uuid) -> AgentError {
    AgentError::conflict(
        "instance-incoming",
        format!("instance {id} is the destination of a migration that is not confirmed"),
        "confirm or remove the incoming migration first",
    )
}

/// What a QEMU run state means to an operator.
fn state_of(s: &RunState) -> InstanceState {
    match s {
        RunState::Running => InstanceState::Running,
        RunState::Paused
        | RunState::Inmigrate
        | RunState::Postmigrate
        | RunState::Prelaunch
        | RunState::FinishMigrate
        | RunState::Suspended
        | RunState::Debug => InstanceState::Paused,
        RunState::GuestPanicked
        | RunState::InternalError
        | RunState::IoError
        | RunState::Shutdown
        | RunState::Watchdog => InstanceState::Crashed,
        _ => InstanceState::Error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_network_lists_the_hosts_networks() {
        let mut config: crate::AgentConfig = toml::from_str(
            "name = \"hv1\"\nstate_dir = \"/tmp/x\"\nmigration_addr = \"10.0.0.1\"\n\
             credential = \"c\"\n\
             [[networks]]\nname = \"lab\"\nbridge = \"br0\"\n\
             [[networks]]\nname = \"prod\"\nbridge = \"br1\"\n",
        )
        .unwrap();
        let e = unknown_network(&config, "lab0");
        assert_eq!(e.code(), "unknown-network");
        assert_eq!(e.status().as_u16(), 422);
        assert_eq!(
            e.to_string(),
            "network 'lab0' is not configured on host hv1; its networks: lab (bridge br0), \
             prod (bridge br1)"
        );
        assert!(e.hint().contains("agent configuration"), "{}", e.hint());
        config.networks.clear();
        assert!(unknown_network(&config, "lab")
            .to_string()
            .ends_with("its networks: none"));
    }

    #[test]
    fn guest_name_in_cmdline_must_match_exactly() {
        let c = b"qemu-system-x86_64\x00-name\x00guest=web-1,debug-threads=on\x00-m\x00128M\x00";
        assert!(cmdline_names_guest(c, "web-1"));
        assert!(!cmdline_names_guest(c, "web"));
        assert!(!cmdline_names_guest(c, "web-10"));
        assert!(cmdline_names_guest(b"q\0guest=a\0", "a"));
        assert!(!cmdline_names_guest(b"", "a"));
    }
}
