//! The destination half: listen on a free port of the range, then confirm the guest runs.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ferry_qmp::commands::{MigrateIncoming, MigrateRecover, QueryMigrate, QueryStatus, RunState};
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
pub async fn listen(
    qmp: &Qmp,
    params: &MigrationParams,
    addr: IpAddr,
) -> Result<SocketAddr, MigrateError> {
    set_capabilities(qmp, params).await?;
    qmp.execute(&params.shared_parameters()).await?;
    let (first, last) = (params.port_range.first, params.port_range.last);
    match qmp
        .execute(&MigrateIncoming {
            uri: range_uri(addr, first, last),
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

/// Waits for the destination guest to run after the source reported completion.
pub async fn confirm_running(qmp: &Qmp, timeout: Duration) -> Result<(), MigrateError> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = qmp.execute(&QueryStatus {}).await?;
        if status.running {
            return Ok(());
        }
        match status.status {
            RunState::Inmigrate | RunState::Prelaunch | RunState::Paused
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            other => {
                return Err(MigrateError::DestinationNotRunning(format!(
                    "guest state is {other} {} ms after completion",
                    timeout.as_millis()
                )))
            }
        }
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
