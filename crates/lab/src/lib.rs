//! Lab hosts on one machine, the guest image and probes of the test guest.
//!
//! Tests, benchmarks and the demo all stand on this crate, so that every figure Ferry reports is
//! measured on the same real parts: network namespaces as hosts, real QEMU guests, and a guest
//! program that checks its own memory.

pub mod debian_guest;
pub mod debian_image;
mod error;
pub mod guest_client;
pub mod guest_config;
pub mod image;
pub mod instance;
#[allow(clippy::module_inception)]
mod lab;
mod migration;
pub mod net;
pub mod private_fs;
pub mod serial;
mod vm;

pub use error::LabError;
pub use lab::{choose_accel, GuestRequest, Lab, LabOptions};
pub use migration::{LabMigrateOptions, LabTls};
pub use vm::LabVm;
