//! Async QMP (QEMU Machine Protocol) client for Ferry.
//!
//! A small client of our own rather than the `qapi` crate: its types are generated from
//! one QEMU schema and reject values they do not know, while Ferry must talk to QEMU 7.2
//! and newer alike. Here replies tolerate unknown enum values and fields, commands are
//! typed where Ferry uses them and [`Qmp::execute_raw`] covers everything else.
//! This crate has no policy: it does not decide when or how to migrate.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ferry_qmp::QmpError> {
//! use ferry_qmp::{Qmp, QueryStatus};
//! use std::time::Duration;
//! let qmp = Qmp::connect("/run/vm.qmp".as_ref(), Duration::from_secs(5)).await?;
//! let status = qmp.execute(&QueryStatus).await?;
//! println!("QEMU {} is {}", qmp.version(), status.status);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod client;
pub mod commands;
mod error;
pub mod events;
pub mod guest_agent;

pub use client::{Qmp, DEFAULT_TIMEOUT};
pub use commands::*;
pub use error::QmpError;
pub use events::Event;
pub use guest_agent::{GuestAgent, GuestAgentError};
