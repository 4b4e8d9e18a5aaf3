use std::path::PathBuf;

/// Why a QEMU process could not be described, started, probed or stopped.
///
/// Each variant carries what an operator needs to act: [`QemuError::code`] is stable for
/// scripts and the API, [`QemuError::hint`] says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// The instance description is unusable; nothing was started.
    #[error("invalid instance spec: {field} {reason}")]
    InvalidSpec { field: &'static str, reason: String },
    /// The QEMU binary could not be executed at all.
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited while we expected it to run; the tail of its own output says why.
    #[error("QEMU for {name} exited ({status}): {output}")]
    Exited {
        name: String,
        status: String,
        output: String,
    },
    /// QMP failed while starting or stopping the process.
    #[error(transparent)]
    Qmp(#[from] ferry_qmp::QmpError),
    /// A file of the run directory could not be prepared.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The operator forced an accelerator this host cannot use.
    #[error("accelerator {accel} is not usable here: {reason}")]
    AccelUnusable { accel: String, reason: String },
    /// An accelerator name that Ferry does not know.
    #[error("unknown accelerator '{0}'")]
    UnknownAccel(String),
}

impl QemuError {
    /// A stable, kebab-case identifier of the error kind.
    pub fn code(&self) -> &'static str {
        match self {
            QemuError::InvalidSpec { .. } => "invalid-instance-spec",
            QemuError::Spawn { .. } => "qemu-not-startable",
            QemuError::Exited { .. } => "qemu-exited",
            QemuError::Qmp(_) => "qmp-failed",
            QemuError::Io { .. } => "run-dir-io",
            QemuError::AccelUnusable { .. } => "accelerator-unusable",
            QemuError::UnknownAccel(_) => "unknown-accelerator",
        }
    }

    /// What the operator can do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            QemuError::InvalidSpec { .. } => "fix the named field of the instance and try again",
            QemuError::Spawn { .. } => "install qemu-system-x86 (apt-get install qemu-system-x86) or set the QEMU binary path",
            QemuError::Exited { .. } => "read the QEMU output above; the run directory keeps qemu.log",
            QemuError::Qmp(_) => "QEMU stopped answering its monitor; check that the process still runs",
            QemuError::Io { .. } => "check permissions and free space of the run directory",
            QemuError::AccelUnusable { .. } => "use --accel auto or --accel tcg",
            QemuError::UnknownAccel(_) => "use one of: auto, kvm, tcg",
        }
    }
}
