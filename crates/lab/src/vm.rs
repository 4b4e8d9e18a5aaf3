//! A guest running in the lab, and how the host talks to it.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use ferry_qemu::{InstanceSpec, QemuProcess};

use crate::guest_client::{self, DiskVerifyReport, GuestStatus, VerifyReport};
use crate::guest_config::CONTROL_PORT;
use crate::serial::{heartbeat_gap, HeartbeatGap, HostBeats, SerialMonitor};
use crate::{Lab, LabError};

/// A lab guest: its QEMU process, where it runs, and its serial heartbeat.
#[derive(Debug)]
pub struct LabVm {
    pub name: String,
    /// The lab host it runs on now.
    pub host: String,
    pub ip: Ipv4Addr,
    pub tap: String,
    pub spec: InstanceSpec,
    pub qemu: QemuProcess,
    pub serial: SerialMonitor,
    /// Heartbeats seen on hosts it ran on before, oldest first.
    pub past_beats: Vec<HostBeats>,
    /// Heartbeats printed by destinations that were removed again (a cancelled or failed
    /// migration). A destination starts paused and runs only once committed, so any beat here
    /// is a second running copy.
    pub stray_beats: Vec<HostBeats>,
}

impl LabVm {
    /// Sends `abort` the moment this guest's QEMU stops it for switchover (its
    /// `pre-switchover` event): the race of a cancel against the point of no return. The task
    /// ends with whether the cancel was accepted (`None` if the monitor closed first).
    pub fn abort_at_switchover(
        &self,
        abort: ferry_migrate::AbortHandle,
    ) -> tokio::task::JoinHandle<Option<bool>> {
        let mut events = self.qemu.qmp().events();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(e)
                        if e.migration_status()
                            == Some(ferry_qmp::commands::MigrationStatus::PreSwitchover) =>
                    {
                        return Some(abort.abort().is_ok())
                    }
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
        })
    }

    /// Sends one command to the guest's control service from the lab's client namespace,
    /// i.e. over the guest network, as a user of the VM would reach it.
    pub async fn control(&self, lab: &Lab, command: &str) -> Result<String, LabError> {
        let addr = SocketAddr::from((self.ip, CONTROL_PORT));
        guest_client::control_in(&lab.net.client_netns, addr, command)
            .await
            .map_err(|e| LabError::Guest {
                name: self.name.clone(),
                detail: format!("'{command}' at {addr}: {e}"),
            })
    }

    pub async fn status(&self, lab: &Lab) -> Result<GuestStatus, LabError> {
        let line = self.control(lab, "status").await?;
        guest_client::parse_status(&line).map_err(|e| LabError::Guest {
            name: self.name.clone(),
            detail: format!("bad status reply '{line}': {e}"),
        })
    }

    /// Asks the guest to check every page of its working set.
    pub async fn verify(&self, lab: &Lab) -> Result<VerifyReport, LabError> {
        self.verify_within(lab, Duration::ZERO).await
    }

    /// Like [`LabVm::verify`], retrying for up to `patience` while the guest does not answer
    /// (e.g. a guest throttled hard before switchover that missed the client's ARP requests).
    pub async fn verify_within(
        &self,
        lab: &Lab,
        patience: Duration,
    ) -> Result<VerifyReport, LabError> {
        let addr = SocketAddr::from((self.ip, CONTROL_PORT));
        let line = guest_client::control_in_within(&lab.net.client_netns, addr, "verify", patience)
            .await
            .map_err(|e| LabError::Guest {
                name: self.name.clone(),
                detail: format!("'verify' at {addr}: {e}"),
            })?;
        guest_client::parse_verify(&line).map_err(|e| LabError::Guest {
            name: self.name.clone(),
            detail: format!("bad verify reply '{line}': {e}"),
        })
    }

    /// Asks the guest to read back every block of its disk (`GuestConfig::disk`) and check it
    /// against its count of acknowledged writes.
    pub async fn disk_verify(&self, lab: &Lab) -> Result<DiskVerifyReport, LabError> {
        let line = self.control(lab, "disk-verify").await?;
        guest_client::parse_disk_verify(&line).map_err(|e| LabError::Guest {
            name: self.name.clone(),
            detail: format!("bad disk-verify reply '{line}': {e}"),
        })
    }

    /// Heartbeat gap and continuity over every host this guest has run on.
    pub fn heartbeat_gap(&self) -> HeartbeatGap {
        let mut all = self.past_beats.clone();
        all.push(HostBeats::new(self.host.clone(), self.serial.beats()));
        heartbeat_gap(&all)
    }
}
