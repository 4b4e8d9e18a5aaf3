//! The lab's driver of one live migration: both halves run in this process, each QEMU in its
//! host's namespace. (The server drives the same phases through agents.)

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ferry_migrate::phases::StartError;
use ferry_migrate::{
    destination, source, AbortSignal, MigrateError, MigrationHalves, MigrationParams, SourceOutcome,
};
use ferry_qemu::{QemuProcess, StartMode};

use crate::net::LabHostNet;
use crate::serial::{HostBeats, SerialMonitor};
use crate::vm::LabVm;
use crate::Lab;

pub(crate) struct LabMigration<'a> {
    lab: &'a Lab,
    vm: &'a mut LabVm,
    dest: LabHostNet,
    params: MigrationParams,
    abort: AbortSignal,
    incoming: Option<(QemuProcess, SerialMonitor)>,
}

impl<'a> LabMigration<'a> {
    pub(crate) fn new(
        lab: &'a Lab,
        vm: &'a mut LabVm,
        dest: LabHostNet,
        params: MigrationParams,
        abort: AbortSignal,
    ) -> Self {
        LabMigration {
            lab,
            vm,
            dest,
            params,
            abort,
            incoming: None,
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
        let (qemu, serial) = self
            .lab
            .launch(&self.vm.spec, &self.dest.name, StartMode::Incoming)
            .await
            .map_err(Self::dest_err)?;
        let qmp = qemu.qmp().clone();
        self.incoming = Some((qemu, serial));
        self.lab.set_incoming_qmp(&self.vm.name, Some(qmp.clone()));
        let addr = destination::listen(
            &qmp,
            &self.params,
            IpAddr::V4(self.dest.migration_addr),
            false,
        )
        .await?;
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
        source::run_source(
            self.vm.qemu.qmp(),
            dest,
            &self.params,
            &[],
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
        destination::await_complete(self.incoming_qmp()?, Duration::from_secs(10)).await
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
