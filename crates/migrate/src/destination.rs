//! The destination half: listen on a free port of the range, then confirm the guest runs.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ferry_qmp::commands::{Command, MigrateIncoming, MigrateRecover, QueryStatus, RunState};
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
    on_free_port(qmp, params, addr, false, |uri| MigrateIncoming { uri }).await
}

/// Makes a destination whose post-copy stream broke listen again, on the first free port of
/// the range, for the source to reconnect with [`crate::source::reconnect`].
pub async fn recover(
    qmp: &Qmp,
    params: &MigrationParams,
    addr: IpAddr,
) -> Result<SocketAddr, MigrateError> {
    // Out of band: the destination's main thread may be stuck on a missing page.
    on_free_port(qmp, params, addr, true, |uri| MigrateRecover { uri }).await
}

/// Issues `make(uri)` (out of band if `oob`) for each port of the range until QEMU accepts
/// one.
async fn on_free_port<C: Command<Output = ()>>(
    qmp: &Qmp,
    params: &MigrationParams,
    addr: IpAddr,
    oob: bool,
    make: impl Fn(String) -> C,
) -> Result<SocketAddr, MigrateError> {
    for port in params.port_range.first..=params.port_range.last {
        let at = SocketAddr::new(addr, port);
        let cmd = make(format!("tcp:{at}"));
        let sent = if oob {
            qmp.execute_oob(&cmd).await
        } else {
            qmp.execute(&cmd).await
        };
        match sent {
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
