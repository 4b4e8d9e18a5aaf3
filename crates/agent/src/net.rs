//! Host taps for guest NICs, created with plain `ip` commands (inside the lab host's namespace
//! when the agent is configured with one).

use tokio::process::Command;
use uuid::Uuid;

use crate::AgentError;

/// Most NICs an instance may have; keeps tap names within the kernel's 15-byte limit.
pub(crate) const MAX_NICS: usize = 16;

/// The tap of NIC `index` of instance `id`: `fy<first 8 hex of the id><index>`.
///
/// Derived from the instance id, not its name, so that it is unique on the host, the same on
/// source and destination of a migration, and at most 12 characters.
pub fn tap_name(id: &Uuid, index: usize) -> String {
    let hex = id.simple().to_string();
    format!("fy{}{}", &hex[..8], index)
}

/// Runs `ip [-n ns] args...`; a failure carries the command line and stderr.
async fn ip(netns: Option<&str>, args: &[&str]) -> Result<(), AgentError> {
    let mut all: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        all.extend(["-n", ns]);
    }
    all.extend_from_slice(args);
    let cmdline = format!("ip {}", all.join(" "));
    let out = Command::new("ip")
        .args(&all)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| AgentError::Net {
            cmdline: cmdline.clone(),
            stderr: format!("could not start: {e}"),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(AgentError::Net {
            cmdline,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Creates tap `tap` enslaved to `bridge` and up. A leftover tap of the same name (from a
/// guest that died with the agent down) is replaced.
pub(crate) async fn add_tap(
    netns: Option<&str>,
    tap: &str,
    bridge: &str,
) -> Result<(), AgentError> {
    let _ = ip(netns, &["link", "del", tap]).await;
    ip(netns, &["tuntap", "add", "dev", tap, "mode", "tap"]).await?;
    if let Err(e) = ip(netns, &["link", "set", tap, "master", bridge, "up"]).await {
        let _ = ip(netns, &["link", "del", tap]).await;
        return Err(e);
    }
    Ok(())
}

/// Removes tap `tap`; a missing tap is fine, so cleanup paths call this unconditionally.
pub(crate) async fn remove_tap(netns: Option<&str>, tap: &str) {
    if ip(netns, &["link", "show", "dev", tap]).await.is_ok() {
        if let Err(e) = ip(netns, &["link", "del", tap]).await {
            tracing::warn!(tap, error = %e, "cannot remove tap");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_short_and_stable() {
        let id: Uuid = "1234abcd-0000-4000-8000-000000000001".parse().unwrap();
        assert_eq!(tap_name(&id, 0), "fy1234abcd0");
        assert_eq!(tap_name(&id, 3), "fy1234abcd3");
        assert!(tap_name(&id, MAX_NICS - 1).len() <= 15);
    }
}
