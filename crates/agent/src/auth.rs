//! The agent credential: where it is kept and how requests prove they carry it.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::{Agent, AgentError};

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

/// Compares two secrets in time independent of where they differ: both are hashed first, so
/// neither the content nor the length of the expected one leaks through timing.
pub(crate) fn tokens_equal(given: &str, expected: &str) -> bool {
    let a = Sha256::digest(given.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Checks `Authorization: Bearer <credential>` on every request: 503 until the agent has a
/// credential, 401 for a missing or wrong one.
pub(crate) async fn require_bearer(
    State(agent): State<Arc<Agent>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(expected) = agent.credential() else {
        return AgentError::NotJoined.into_response();
    };
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(token) if tokens_equal(token, &expected) => next.run(req).await,
        _ => AgentError::Unauthorized.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn equal_only_when_equal() {
        assert!(tokens_equal("abc", "abc"));
        assert!(!tokens_equal("abc", "abd"));
        assert!(!tokens_equal("", "abc"));
        assert!(!tokens_equal("abcd", "abc"));
    }

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
