//! The destination half: listen on a free port of the range, wait until the whole guest has
//! arrived (paused), and start it once the driver has committed it here.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ferry_qmp::commands::{
    capability, BlockExportAddNbd, CapabilityState, Cont, MigrateIncoming, MigrateRecover,
    MigrateSetCapabilities, MigrationStatus, NbdServerStart, NbdServerStop, QueryMigrate,
    QueryStatus, RunState,
};
use ferry_qmp::{Qmp, QmpError};
use tracing::debug;

use crate::source::set_capabilities;
use crate::{MigrateError, MigrationParams};

/// Makes an incoming-mode QEMU listen for the stream on `addr`, on the first free port of the
/// range, and returns where it listens.
///
/// QEMU searches the range itself (`tcp:addr:first,to=last`), so no other process can take the
/// port between a probe and the bind, and only one `migrate-incoming` is sent: QEMU 9 and
/// later refuse a second one after a failed bind.
///
/// With `stay_on_error` (block migration), a failed stream leaves QEMU running instead of
/// exiting at once: the agent then quits it cleanly, which writes out the images it filled,
/// so a retry can resume from them.
pub async fn listen(
    qmp: &Qmp,
    params: &MigrationParams,
    addr: IpAddr,
    stay_on_error: bool,
) -> Result<SocketAddr, MigrateError> {
    set_capabilities(qmp, params).await?;
    // Destination only: its images stay inactive (no write locks) until the guest is started
    // here after the commit, so an undo can still hand them back to the source.
    qmp.execute(&MigrateSetCapabilities {
        capabilities: vec![CapabilityState {
            capability: capability::LATE_BLOCK_ACTIVATE.into(),
            state: true,
        }],
    })
    .await?;
    qmp.execute(&params.shared_parameters()).await?;
    let (first, last) = (params.port_range.first, params.port_range.last);
    match qmp
        .execute(&MigrateIncoming {
            uri: range_uri(addr, first, last),
            exit_on_error: stay_on_error.then_some(false),
        })
        .await
    {
        Ok(()) => {}
        Err(e) if is_port_busy(&e) => {
            return Err(MigrateError::PortUnavailable { addr, first, last })
        }
        Err(e) => return Err(e.into()),
    }
    let info = qmp.execute(&QueryMigrate).await?;
    let port = info
        .socket_address
        .iter()
        .flatten()
        .filter(|a| a.kind == "inet")
        .find_map(|a| a.port.as_deref()?.parse::<u16>().ok())
        .filter(|p| (first..=last).contains(p))
        .ok_or_else(|| {
            MigrateError::DestinationNotRunning(format!(
                "QEMU accepted the listen range {first}-{last} on {addr} but reports no port of it"
            ))
        })?;
    debug!(%addr, port, "destination listening");
    Ok(SocketAddr::new(addr, port))
}

/// The URI that lets QEMU bind the first free port of `first..=last` on `addr`.
pub fn range_uri(addr: IpAddr, first: u16, last: u16) -> String {
    format!("tcp:{},to={last}", SocketAddr::new(addr, first))
}

fn is_port_busy(e: &QmpError) -> bool {
    matches!(e, QmpError::Command { desc, .. }
        if desc.contains("in use") || desc.contains("available port"))
}

/// Makes a destination whose post-copy stream broke listen again, on the first free port of
/// the range, for the source to reconnect with [`crate::source::reconnect`].
///
/// Port by port, out of band: the destination's main thread may be stuck on a missing page,
/// so nothing but out-of-band commands (not `query-migrate`) would tell which port a range
/// bound. A failed `migrate-recover` leaves the destination paused and ready for the next.
pub async fn recover(
    qmp: &Qmp,
    params: &MigrationParams,
    addr: IpAddr,
) -> Result<SocketAddr, MigrateError> {
    for port in params.port_range.first..=params.port_range.last {
        let at = SocketAddr::new(addr, port);
        match qmp
            .execute_oob(&MigrateRecover {
                uri: format!("tcp:{at}"),
            })
            .await
        {
            Ok(()) => return Ok(at),
            Err(e) if is_port_busy(&e) => debug!(%at, "recovery port busy, trying the next"),
            Err(e) => return Err(e.into()),
        }
    }
    Err(MigrateError::PortUnavailable {
        addr,
        first: params.port_range.first,
        last: params.port_range.last,
    })
}

/// Waits until the destination holds the whole guest: its incoming migration completed and
/// QEMU, started with `-S`, keeps the guest paused for Ferry to commit. A guest that already
/// runs (post-copy starts it, see [`start_on_postcopy`]) is ready too.
pub async fn await_complete(qmp: &Qmp, timeout: Duration) -> Result<(), MigrateError> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = qmp.execute(&QueryStatus {}).await?;
        if status.running {
            return Ok(());
        }
        let waiting = match status.status {
            RunState::Inmigrate | RunState::Prelaunch => true,
            RunState::Paused => {
                let info = qmp.execute(&QueryMigrate).await?;
                match info.status {
                    Some(MigrationStatus::Completed) => return Ok(()),
                    Some(MigrationStatus::Failed) => {
                        return Err(MigrateError::DestinationNotRunning(format!(
                            "the incoming migration failed: {}",
                            info.error_desc.unwrap_or_else(|| "no reason given".into())
                        )))
                    }
                    _ => true,
                }
            }
            _ => false,
        };
        if !waiting || Instant::now() >= deadline {
            return Err(MigrateError::DestinationNotRunning(format!(
                "guest state is {} {} ms after the source completed",
                status.status,
                timeout.as_millis()
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Starts the guest on a destination that holds it (after the commit) and waits until it runs.
pub async fn start(qmp: &Qmp, timeout: Duration) -> Result<(), MigrateError> {
    let status = qmp.execute(&QueryStatus {}).await?;
    if !status.running {
        qmp.execute(&Cont {}).await?;
    }
    let deadline = Instant::now() + timeout;
    loop {
        let status = qmp.execute(&QueryStatus {}).await?;
        if status.running {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(MigrateError::DestinationNotRunning(format!(
                "guest state is {} {} ms after cont",
                status.status,
                timeout.as_millis()
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// For a migration that may switch to post-copy: once this destination enters post-copy, the
/// source has stopped for good and the guest must run here, so the destination starts itself
/// as soon as its device state is loaded (`cont` while still incoming makes QEMU start the
/// guest then). Ends with the incoming migration or the connection.
pub fn start_on_postcopy(qmp: Qmp) -> tokio::task::JoinHandle<()> {
    let mut events = qmp.events();
    tokio::spawn(async move {
        loop {
            let status = match events.recv().await {
                Ok(e) => e.migration_status(),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            };
            match status {
                Some(MigrationStatus::PostcopyActive) => {
                    debug!("post-copy started: the destination runs the guest");
                    if let Err(e) = qmp.execute(&Cont {}).await {
                        tracing::warn!(error = %e, "cont on entering post-copy failed");
                    }
                    return;
                }
                Some(MigrationStatus::Completed)
                | Some(MigrationStatus::Failed)
                | Some(MigrationStatus::Cancelled) => return,
                _ => {}
            }
        }
    })
}

/// Block migration, destination side: starts QEMU's NBD server on `addr`, on the first free
/// port of the range, and exports each disk's node writable under its export name, for the
/// source's mirrors. `disks` is `(disk id, export name, top only)`.
///
/// With TLS applied to this QEMU ([`crate::tls::StreamTls::apply`], before this), the server
/// takes the same credentials and authz as the memory stream.
///
/// The export activates the still-incoming node, so the image is open for writing here from
/// now on; it is a new image only this migration knows, and the source never opens it.
pub async fn export_disks(
    qmp: &Qmp,
    params: &MigrationParams,
    addr: IpAddr,
    disks: &[(String, String, bool)],
) -> Result<Vec<crate::MirrorTarget>, MigrateError> {
    if disks.is_empty() {
        return Ok(Vec::new());
    }
    // The export takes the memory stream's credentials and its one allowed client: an
    // encrypted migration never receives its disks in the clear.
    let tls = crate::tls::nbd_server_tls(qmp).await?;
    let mut bound = None;
    for port in params.port_range.first..=params.port_range.last {
        let at = SocketAddr::new(addr, port);
        let mut start = NbdServerStart::new(at);
        if let Some((creds, authz)) = tls.clone() {
            start.tls_creds = Some(creds);
            start.tls_authz = authz;
        }
        match qmp.execute(&start).await {
            Ok(()) => {
                bound = Some(at);
                break;
            }
            Err(e) if is_port_busy(&e) => debug!(%at, "NBD port busy, trying the next"),
            Err(e) => return Err(e.into()),
        }
    }
    let at = bound.ok_or(MigrateError::PortUnavailable {
        addr,
        first: params.port_range.first,
        last: params.port_range.last,
    })?;
    let mut targets = Vec::new();
    for (disk, export, top_only) in disks {
        let added = qmp
            .execute(&BlockExportAddNbd {
                kind: "nbd",
                id: format!("ferry-export-{disk}"),
                node_name: ferry_qemu::node_name(disk),
                writable: true,
                name: export.clone(),
            })
            .await;
        if let Err(e) = added {
            let _ = qmp.execute(&NbdServerStop).await;
            return Err(MigrateError::Destination(format!(
                "disk {disk} cannot be exported for the copy: {e}"
            )));
        }
        targets.push(crate::MirrorTarget {
            disk: disk.clone(),
            addr: at,
            export: export.clone(),
            top_only: *top_only,
            size_bytes: 0,
            allocated_bytes: 0,
            bitmap: String::new(),
            resume: false,
        });
    }
    debug!(%at, disks = disks.len(), "disks exported for the mirrors");
    Ok(targets)
}

/// Stops the NBD server and its exports once the mirrors have completed (the whole guest is
/// here): nothing but this QEMU writes the images from now on.
pub async fn stop_exports(qmp: &Qmp) -> Result<(), MigrateError> {
    match qmp.execute(&NbdServerStop).await {
        Ok(()) => Ok(()),
        // Never started, or stopped already.
        Err(QmpError::Command { desc, .. }) if desc.contains("not running") => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_uri_names_the_first_and_last_port() {
        let v4: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(range_uri(v4, 49152, 49215), "tcp:10.0.0.2:49152,to=49215");
        let v6: IpAddr = "fd00::2".parse().unwrap();
        assert_eq!(range_uri(v6, 49152, 49152), "tcp:[fd00::2]:49152,to=49152");
    }
}
