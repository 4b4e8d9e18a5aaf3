//! The lab's driver of one live migration: both halves run in this process, each QEMU in its
//! host's namespace. (The server drives the same phases through agents.)

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ferry_migrate::phases::StartError;
use ferry_migrate::{
    destination, source, AbortSignal, MigrateError, MigrationHalves, MigrationParams, MirrorTarget,
    SourceOutcome, StreamTls, TlsCredentials,
};
use ferry_qemu::{InstanceSpec, QemuProcess, StartMode};

use crate::net::LabHostNet;
use crate::serial::{HostBeats, SerialMonitor};
use crate::vm::LabVm;
use crate::Lab;

/// How [`Lab::migrate_with`](crate::Lab::migrate_with) moves a guest beyond its parameters.
#[derive(Debug, Clone, Default)]
pub struct LabMigrateOptions {
    /// Each half's TLS credentials; a half without any runs in the clear (which a half with
    /// TLS on the other end must refuse).
    pub tls: LabTls,
    /// Copy the guest's disks into new images on the destination (block migration: an NBD
    /// export there, mirrors on the source) instead of sharing them.
    pub copy_disks: bool,
}

/// The credentials each half of a lab migration gets, as the server would issue them.
#[derive(Debug, Clone, Default)]
pub struct LabTls {
    pub source: Option<TlsCredentials>,
    pub destination: Option<TlsCredentials>,
}

pub(crate) struct LabMigration<'a> {
    lab: &'a Lab,
    vm: &'a mut LabVm,
    dest: LabHostNet,
    params: MigrationParams,
    abort: AbortSignal,
    incoming: Option<(QemuProcess, SerialMonitor)>,
    opts: LabMigrateOptions,
    /// Each half's credentials files while it runs: dropped (so removed) with the migration.
    pub(crate) source_tls: Option<StreamTls>,
    pub(crate) dest_tls: Option<StreamTls>,
    /// Block migration: the destination's spec (its own images) and the exports to copy into.
    dest_spec: Option<InstanceSpec>,
    targets: Vec<MirrorTarget>,
}

impl<'a> LabMigration<'a> {
    pub(crate) fn new(
        lab: &'a Lab,
        vm: &'a mut LabVm,
        dest: LabHostNet,
        params: MigrationParams,
        abort: AbortSignal,
        opts: LabMigrateOptions,
    ) -> Self {
        LabMigration {
            lab,
            vm,
            dest,
            params,
            abort,
            incoming: None,
            opts,
            source_tls: None,
            dest_tls: None,
            dest_spec: None,
            targets: Vec::new(),
        }
    }

    /// The destination's spec for a block migration: each disk in a new, empty image of the
    /// same format and size next to the source's, named after the destination host.
    fn destination_spec(&self) -> Result<InstanceSpec, MigrateError> {
        let mut spec = self.vm.spec.clone();
        for disk in &mut spec.disks {
            let target = PathBuf::from(format!("{}.{}", disk.path.display(), self.dest.name));
            let info = Command::new("qemu-img")
                .args(["info", "-U", "--output=json"])
                .arg(&disk.path)
                .output()
                .map_err(Self::dest_err)?;
            let size = serde_json::from_slice::<serde_json::Value>(&info.stdout)
                .ok()
                .and_then(|v| v["virtual-size"].as_u64())
                .ok_or_else(|| {
                    Self::dest_err(format!("qemu-img info {}: no size", disk.path.display()))
                })?;
            let made = Command::new("qemu-img")
                .args(["create", "-q", "-f", disk.format.as_str()])
                .arg(&target)
                .arg(size.to_string())
                .status()
                .map_err(Self::dest_err)?;
            if !made.success() {
                return Err(Self::dest_err(format!(
                    "qemu-img create {} failed",
                    target.display()
                )));
            }
            disk.path = target;
        }
        Ok(spec)
    }

    /// Removes the images a block migration made on the destination.
    fn remove_dest_images(&mut self) {
        if let Some(spec) = self.dest_spec.take() {
            for disk in &spec.disks {
                let _ = std::fs::remove_file(&disk.path);
            }
        }
    }

    fn dest_err(e: impl std::fmt::Display) -> MigrateError {
        MigrateError::Destination(e.to_string())
    }

    fn incoming_qmp(&self) -> Result<&ferry_qmp::Qmp, MigrateError> {
        self.incoming
            .as_ref()
            .map(|(qemu, _)| qemu.qmp())
            .ok_or_else(|| MigrateError::DestinationNotRunning("no destination process".into()))
    }
}

impl MigrationHalves for LabMigration<'_> {
    async fn prepare_destination(&mut self) -> Result<SocketAddr, MigrateError> {
        self.lab
            .net
            .add_tap(&self.dest.name, &self.vm.tap)
            .map_err(Self::dest_err)?;
        let spec = if self.opts.copy_disks && !self.vm.spec.disks.is_empty() {
            let spec = self.destination_spec()?;
            self.dest_spec = Some(spec.clone());
            spec
        } else {
            self.vm.spec.clone()
        };
        let (qemu, serial) = self
            .lab
            .launch(&spec, &self.dest.name, StartMode::Incoming)
            .await
            .map_err(Self::dest_err)?;
        let qmp = qemu.qmp().clone();
        self.incoming = Some((qemu, serial));
        self.lab.set_incoming_qmp(&self.vm.name, Some(qmp.clone()));
        if let Some(creds) = self.opts.tls.destination.clone() {
            let tls = StreamTls::create(self.lab.tls_dir(&self.vm.name, "destination"), creds)?;
            tls.apply(&qmp).await?;
            self.dest_tls = Some(tls);
        }
        let at = IpAddr::V4(self.dest.migration_addr);
        let addr = destination::listen(&qmp, &self.params, at, false).await?;
        if self.dest_spec.is_some() {
            let exports: Vec<_> = spec
                .disks
                .iter()
                .map(|d| {
                    (
                        d.id.clone(),
                        format!("lab-{}-{}", self.vm.name, d.id),
                        false,
                    )
                })
                .collect();
            self.targets = destination::export_disks(&qmp, &self.params, at, &exports).await?;
        }
        if self.params.postcopy {
            destination::start_on_postcopy(qmp);
        }
        Ok(addr)
    }

    async fn run_source(
        &mut self,
        dest: SocketAddr,
        observe: &mut source::Observer<'_>,
    ) -> Result<SourceOutcome, MigrateError> {
        if let Some(creds) = self.opts.tls.source.clone() {
            let tls = StreamTls::create(self.lab.tls_dir(&self.vm.name, "source"), creds)?;
            tls.apply(self.vm.qemu.qmp()).await?;
            self.source_tls = Some(tls);
        }
        source::run_source(
            self.vm.qemu.qmp(),
            dest,
            &self.params,
            &self.targets,
            observe,
            self.abort.clone(),
        )
        .await
    }

    async fn recover_destination(&mut self) -> Result<SocketAddr, MigrateError> {
        let (qemu, _) = self
            .incoming
            .as_ref()
            .ok_or_else(|| MigrateError::PostcopyFailed("no destination process".into()))?;
        destination::recover(
            qemu.qmp(),
            &self.params,
            IpAddr::V4(self.dest.migration_addr),
        )
        .await
    }

    async fn reconnect_source(
        &mut self,
        dest: SocketAddr,
        observe: &mut source::Observer<'_>,
    ) -> Result<SourceOutcome, MigrateError> {
        source::reconnect(
            self.vm.qemu.qmp(),
            dest,
            &self.params,
            observe,
            self.abort.clone(),
        )
        .await
    }

    async fn destination_ready(&mut self) -> Result<(), MigrateError> {
        let qmp = self.incoming_qmp()?;
        destination::await_complete(qmp, Duration::from_secs(10)).await?;
        destination::stop_exports(qmp).await
    }

    /// In one process there is no record to write: the guest belongs to the destination from
    /// here on, and `finish_source` makes `vm` point at it.
    async fn commit(&mut self) -> Result<(), MigrateError> {
        Ok(())
    }

    async fn start_destination(&mut self) -> Result<(), StartError> {
        let fail = |error| StartError {
            error,
            retry: false,
            never_ran: false,
        };
        let qmp = self.incoming_qmp().map_err(fail)?;
        destination::start(qmp, Duration::from_secs(10))
            .await
            .map_err(fail)
    }

    async fn uncommit(&mut self) -> Result<(), MigrateError> {
        Ok(())
    }

    async fn finish_source(&mut self) {
        let Some((qemu, serial)) = self.incoming.take() else {
            return;
        };
        self.lab.set_incoming_qmp(&self.vm.name, None);
        let old_qemu = std::mem::replace(&mut self.vm.qemu, qemu);
        let old_serial = std::mem::replace(&mut self.vm.serial, serial);
        let old_host = std::mem::replace(&mut self.vm.host, self.dest.name.clone());
        if let Some(spec) = self.dest_spec.take() {
            // The guest's disks are the destination's images from now on; the source's stay
            // where they were (the test that made them removes them).
            self.vm.spec = spec;
        }
        old_qemu.shutdown(Duration::from_secs(5)).await;
        let exited = std::time::Instant::now();
        // QEMU has exited, so its serial socket is closed: read what is left in it, the last
        // (possibly unterminated) line included.
        let beats = old_serial.finish(Duration::from_secs(5)).await;
        self.vm
            .past_beats
            .push(HostBeats::exited(old_host.clone(), beats, exited));
        let _ = self.lab.net.remove_tap(&old_host, &self.vm.tap);
    }

    async fn remove_destination(&mut self) -> Result<(), MigrateError> {
        if let Some((mut qemu, serial)) = self.incoming.take() {
            self.lab.set_incoming_qmp(&self.vm.name, None);
            qemu.kill();
            if qemu.wait_exit(Duration::from_secs(5)).await.is_none() {
                return Err(Self::dest_err(
                    "destination QEMU did not exit after SIGKILL",
                ));
            }
            let beats = serial.finish(Duration::from_secs(5)).await;
            if !beats.is_empty() {
                self.vm
                    .stray_beats
                    .push(HostBeats::new(self.dest.name.clone(), beats));
            }
        }
        self.remove_dest_images();
        self.lab
            .net
            .remove_tap(&self.dest.name, &self.vm.tap)
            .map_err(Self::dest_err)
    }

    async fn resume_source(&mut self, destination_gone: bool) -> Result<(), MigrateError> {
        if destination_gone {
            source::resume_handed_over(self.vm.qemu.qmp()).await
        } else {
            source::ensure_running(self.vm.qemu.qmp()).await
        }
    }
}
