//! The destination half: listen on a free port of the range, then confirm the guest runs.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ferry_qmp::commands::{MigrateIncoming, QueryStatus, RunState};
use ferry_qmp::{Qmp, QmpError};
use tracing::debug;

use crate::source::set_capabilities;
use crate::{MigrateError, MigrationParams};

/// Makes an incoming-mode QEMU listen for the stream on `addr`, on the first free port of the
/// range, and returns where it listens.
///
/// Trying the ports in QEMU itself (rather than probing with our own socket first) leaves no
/// window in which another process could take the port.
pub async fn listen(
    qmp: &Qmp,
    params: &MigrationParams,
    addr: IpAddr,
) -> Result<SocketAddr, MigrateError> {
    set_capabilities(qmp, params).await?;
    qmp.execute(&params.shared_parameters()).await?;
    for port in params.port_range.first..=params.port_range.last {
        let at = SocketAddr::new(addr, port);
        match qmp
            .execute(&MigrateIncoming {
                uri: format!("tcp:{at}"),
            })
            .await
        {
            Ok(()) => return Ok(at),
            Err(QmpError::Command { ref desc, .. }) if desc.contains("in use") => {
                debug!(%at, "migration port busy, trying the next");
            }
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
