//! The one error type of this crate.
//!
//! Callers (the migration engine, the agent) need to tell apart "QEMU said no" (a
//! [`QmpError::Command`], often worth showing to an operator verbatim), "QEMU is gone"
//! ([`QmpError::Closed`], usually fatal for the instance) and "QEMU is too slow"
//! ([`QmpError::Timeout`], maybe worth a retry), so each has its own variant. Every message
//! names the command that failed, because a bare "Address already in use" in a migration log
//! is useless.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The QMP socket could not be connected before the connect timeout ran out.
    /// `source` is the last error seen, which tells "QEMU never created the socket"
    /// (`NotFound`) from "QEMU died and left it behind" (`ConnectionRefused`).
    #[error("cannot connect to QMP socket {}: {source}", path.display())]
    Connect {
        /// The socket path we tried.
        path: PathBuf,
        /// The last connection error.
        #[source]
        source: io::Error,
    },
    /// Reading from or writing to the socket failed for a reason other than a clean close.
    #[error("QMP I/O error: {0}")]
    Io(#[from] io::Error),
    /// The connection is gone (QEMU exited or closed the monitor). Commands still waiting
    /// for a reply, and every later command, fail with this.
    #[error("QMP connection closed: QEMU went away")]
    Closed,
    /// QEMU did not answer in time. The connection stays usable: a late reply is dropped.
    #[error("{command} timed out: no reply from QEMU after {after:?}")]
    Timeout {
        /// The command (or "greeting") that got no answer.
        command: String,
        /// How long we waited.
        after: Duration,
    },
    /// QEMU answered with an error object (`{"error": {"class": ..., "desc": ...}}`).
    #[error("{command} failed: {class}: {desc}")]
    Command {
        /// The command QEMU rejected.
        command: String,
        /// QEMU's error class, e.g. `GenericError`, `CommandNotFound`, `DeviceNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// The peer sent something that is not valid QMP (not JSON, a reply for an id we never
    /// sent, a greeting without version...). `command` is the command it was charged to,
    /// if any.
    #[error("{}: QMP protocol error: {detail}", command.as_deref().unwrap_or("QMP"))]
    Protocol {
        /// The command that was waiting when the bad message arrived, if any.
        command: Option<String>,
        /// What was wrong, with an excerpt of the offending text.
        detail: String,
    },
    /// QEMU's reply was valid QMP but did not match the typed output of the command
    /// (for example a required field missing in an older QEMU).
    #[error("{command}: cannot decode reply: {detail}")]
    Decode {
        /// The command whose reply did not fit.
        command: String,
        /// The serde error and an excerpt of the reply.
        detail: String,
    },
}

impl QmpError {
    /// The command this error is about, when it is known. `Closed`, `Io` and `Connect`
    /// are about the connection rather than one command.
    pub fn command(&self) -> Option<&str> {
        match self {
            QmpError::Timeout { command, .. }
            | QmpError::Command { command, .. }
            | QmpError::Decode { command, .. } => Some(command),
            QmpError::Protocol { command, .. } => command.as_deref(),
            QmpError::Connect { .. } | QmpError::Io(_) | QmpError::Closed => None,
        }
    }

    /// True when the connection is unusable afterwards (QEMU gone or socket broken), so a
    /// caller should stop issuing commands rather than retry.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            QmpError::Closed | QmpError::Io(_) | QmpError::Connect { .. }
        )
    }

    /// QEMU's error class for [`QmpError::Command`], e.g. to treat `CommandNotFound` as
    /// "this QEMU is too old for that feature".
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// Shortens text quoted in error messages so one huge bad line cannot flood a log.
pub(crate) fn excerpt(text: &str) -> String {
    const MAX: usize = 200;
    if text.len() <= MAX {
        return text.to_string();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len())
}
