//! Errors of the lab network, each with a stable code and a hint for the operator.

/// Why a lab network operation failed.
///
/// Every variant renders as one sentence; `code()` gives a stable kebab-case identifier for
/// scripts and the API, and `hint()` tells the operator what to try next.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The lab name does not fit the namespace naming scheme.
    #[error("invalid lab name {name:?}: {reason}")]
    InvalidLabName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The number of hosts is outside the supported range.
    #[error("a lab needs between 1 and {max} hosts, but {count} were requested")]
    InvalidHostCount {
        /// The requested number of hosts.
        count: usize,
        /// The largest supported number of hosts.
        max: usize,
    },
    /// The tap name would be rejected by the kernel or is unsafe to pass to `ip`.
    #[error("invalid tap name {name:?}: {reason}")]
    InvalidTapName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The host is not part of this lab.
    #[error("unknown lab host {name:?} (known hosts: {})", known.join(", "))]
    UnknownHost {
        /// The requested host name.
        name: String,
        /// The hosts the lab has.
        known: Vec<String>,
    },
    /// No namespaces of the named lab exist.
    #[error("no lab named {lab:?} exists on this machine")]
    LabNotFound {
        /// The requested lab name.
        lab: String,
    },
    /// An `ip` command failed; the command line lets the operator reproduce it by hand.
    #[error("command `{cmdline}` failed: {}", stderr.trim())]
    Command {
        /// The full command line that was run.
        cmdline: String,
        /// What the command wrote to stderr (or why it could not start).
        stderr: String,
    },
    /// A system call failed outside of a command.
    #[error("lab network I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

impl NetError {
    /// A stable kebab-case identifier, so scripts and the API can match on errors without
    /// parsing messages.
    pub fn code(&self) -> &'static str {
        match self {
            NetError::InvalidLabName { .. } => "invalid-lab-name",
            NetError::InvalidHostCount { .. } => "invalid-host-count",
            NetError::InvalidTapName { .. } => "invalid-tap-name",
            NetError::UnknownHost { .. } => "unknown-host",
            NetError::LabNotFound { .. } => "lab-not-found",
            NetError::Command { .. } => "lab-command-failed",
            NetError::Io(_) => "lab-io-failed",
        }
    }

    /// What the operator should try next.
    pub fn hint(&self) -> &'static str {
        match self {
            NetError::InvalidLabName { .. } => {
                "use 1 to 20 characters from lowercase letters, digits and '-'"
            }
            NetError::InvalidHostCount { .. } => "pick a host count from 1 to 8",
            NetError::InvalidTapName { .. } => {
                "use 1 to 15 characters from letters, digits, '-', '_' and '.'"
            }
            NetError::UnknownHost { .. } => "use one of the known host names, such as hv1",
            NetError::LabNotFound { .. } => {
                "list existing labs with `ferry lab list` or create one with `ferry lab up`"
            }
            NetError::Command { .. } => {
                "run as root with iproute2 installed; rerun the command by hand to see more, \
                 and remove a half-built lab with `ferry lab down`"
            }
            NetError::Io(_) => "run as root; network namespaces need CAP_SYS_ADMIN",
        }
    }
}
