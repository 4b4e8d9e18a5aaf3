//! The agent credential (what the agent presents to the server): where it is kept. Calls to
//! the agent are authenticated by the server's client certificate instead (see `tls`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::AgentError;

/// The credential file inside the state directory.
pub(crate) fn credential_path(state_dir: &Path) -> PathBuf {
    state_dir.join("credential")
}

/// The credential stored by an earlier join, if any.
pub(crate) fn load_credential(state_dir: &Path) -> Result<Option<String>, AgentError> {
    let path = credential_path(state_dir);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AgentError::Io { path, source: e }),
    }
}

/// Stores the credential readable by root only (mode 0600), written to a temporary file and
/// renamed, so a crash never leaves half a credential.
pub(crate) fn store_credential(state_dir: &Path, credential: &str) -> Result<(), AgentError> {
    let path = credential_path(state_dir);
    let tmp = state_dir.join(".credential.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(AgentError::io(&tmp))?;
    f.write_all(credential.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(AgentError::io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(AgentError::io(&path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn credential_round_trips_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_credential(dir.path()).unwrap(), None);
        store_credential(dir.path(), "s3cret").unwrap();
        assert_eq!(
            load_credential(dir.path()).unwrap().as_deref(),
            Some("s3cret")
        );
        let mode = std::fs::metadata(credential_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
