//! Inflicting one fault and clearing it the way the world would: a killed daemon is started
//! again after a while (an operator, systemd), a link comes back, a killed QEMU stays dead.

use std::time::Duration;

use ferry_api::migrations::Migration;
use ferry_lab::net::netns_command;
use uuid::Uuid;

use crate::cluster::{ChaosLab, Daemon};
use crate::error::ChaosError;
use crate::matrix::{Fault, RESTART_AFTER};

/// The host-side migration interface a link fault takes down.
const MIGRATION_IF: &str = "mig0";

/// What injecting did, for the cell's details.
#[derive(Debug, Clone)]
pub struct Injected {
    /// Whether the fault really landed (e.g. a QEMU that was not there cannot be killed).
    pub landed: bool,
    /// What happened, in words: "SIGKILL pid 1234", "refused: too-late-to-cancel", ...
    pub note: String,
}

/// Inflicts `fault` on migration `m` of instance `id` (source host index 0 or 1) and clears
/// it; returns once it is cleared (a restarted daemon answers, the link is up again).
pub async fn inflict(
    lab: &mut ChaosLab,
    fault: Fault,
    m: &Migration,
    id: Uuid,
) -> Result<Injected, ChaosError> {
    let src = lab.host_index(&m.source).unwrap_or(0);
    let dst = lab.host_index(&m.destination).unwrap_or(1);
    match fault {
        Fault::Cancel => Ok(cancel(lab, m).await),
        Fault::KillSourceQemu => Ok(kill_qemu(lab, src, id)),
        Fault::KillDestinationQemu => Ok(kill_qemu(lab, dst, id)),
        Fault::KillSourceAgent => crash(lab, Daemon::Agent(src)).await,
        Fault::KillDestinationAgent => crash(lab, Daemon::Agent(dst)).await,
        Fault::KillServer => crash(lab, Daemon::Server).await,
        Fault::LinkDown10s => link_down(lab, src, Duration::from_secs(10)).await,
        Fault::LinkDown60s => link_down(lab, src, Duration::from_secs(60)).await,
    }
}

async fn cancel(lab: &ChaosLab, m: &Migration) -> Injected {
    let r: Result<Migration, _> = lab
        .api
        .post(&format!("/v1/migrations/{}/cancel", m.id), &())
        .await;
    Injected {
        landed: true,
        note: match r {
            Ok(_) => "cancel accepted".into(),
            Err(e) => format!("cancel refused: {}", e.code()),
        },
    }
}

fn kill_qemu(lab: &ChaosLab, host: usize, id: Uuid) -> Injected {
    match lab.qemu_pid(host, id) {
        Some(pid) => {
            // SAFETY: kill(2) has no memory-safety preconditions; pid is this instance's QEMU
            // (read from its pidfile, checked alive and named qemu).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            Injected {
                landed: true,
                note: format!("SIGKILL QEMU pid {pid} on {}", lab.host_name(host)),
            }
        }
        None => Injected {
            landed: false,
            note: format!("no QEMU of the instance on {}", lab.host_name(host)),
        },
    }
}

async fn crash(lab: &mut ChaosLab, which: Daemon) -> Result<Injected, ChaosError> {
    lab.kill9(which);
    tokio::time::sleep(RESTART_AFTER).await;
    lab.restart(which)?;
    if which == Daemon::Server {
        lab.wait_server(Duration::from_secs(30)).await?;
    }
    let name = match which {
        Daemon::Server => "server".to_string(),
        Daemon::Agent(i) => format!("agent {}", lab.host_name(i)),
    };
    Ok(Injected {
        landed: true,
        note: format!(
            "SIGKILL {name}, restarted after {} s",
            RESTART_AFTER.as_secs()
        ),
    })
}

async fn link_down(lab: &ChaosLab, host: usize, outage: Duration) -> Result<Injected, ChaosError> {
    let ns = lab.net.hosts[host].netns.clone();
    set_link(&ns, "down").await?;
    tokio::time::sleep(outage).await;
    set_link(&ns, "up").await?;
    Ok(Injected {
        landed: true,
        note: format!(
            "{MIGRATION_IF} of {} down for {} s",
            lab.host_name(host),
            outage.as_secs()
        ),
    })
}

/// `ip link set mig0 up|down` inside the host's namespace.
pub async fn set_link(netns: &str, state: &str) -> Result<(), ChaosError> {
    let out = netns_command(netns, "ip")
        .args(["link", "set", MIGRATION_IF, state])
        .output()
        .map_err(|e| ChaosError::io(format!("ip link set {MIGRATION_IF} {state}"), e))?;
    if !out.status.success() {
        return Err(ChaosError::io(
            format!("ip link set {MIGRATION_IF} {state} in {netns}"),
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        ));
    }
    Ok(())
}
