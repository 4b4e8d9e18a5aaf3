use crate::image::ImageError;
use crate::net::NetError;

/// Why a lab operation failed: which part, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Qemu(#[from] ferry_qemu::QemuError),
    #[error(transparent)]
    Migrate(#[from] ferry_migrate::MigrateError),
    /// The request names something that does not exist or asks for something impossible.
    #[error("{0}")]
    InvalidRequest(String),
    /// The guest did not do what the lab expected of it (boot, answer, verify).
    #[error("guest {name}: {detail}")]
    Guest { name: String, detail: String },
}

impl LabError {
    pub fn code(&self) -> &'static str {
        match self {
            LabError::Image(e) => e.code(),
            LabError::Net(e) => e.code(),
            LabError::Qemu(e) => e.code(),
            LabError::Migrate(e) => e.code(),
            LabError::InvalidRequest(_) => "invalid-request",
            LabError::Guest { .. } => "guest-unresponsive",
        }
    }

    pub fn hint(&self) -> &'static str {
        match self {
            LabError::Image(e) => e.hint(),
            LabError::Net(e) => e.hint(),
            LabError::Qemu(e) => e.hint(),
            LabError::Migrate(e) => e.hint(),
            LabError::InvalidRequest(_) => "check the names and sizes given",
            LabError::Guest { .. } => "read the guest's serial log in the lab's run directory",
        }
    }
}
