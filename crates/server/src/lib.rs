//! The control plane: the fleet's desired and observed state, the migration queue and its state
//! machine, the REST API with its OpenAPI document, live events, and recovery after a crash.
//!
//! Agents do the work on hosts; the server decides what happens, in which order, and records
//! it, so that a restarted server knows every job and finishes it.

pub mod agents;
pub mod api;
mod auth;
pub mod checks;
pub mod cold;
pub mod config;
pub mod disks;
pub mod driver;
pub mod error;
pub mod events;
pub mod kept_copies;
pub mod metrics;
pub mod pki;
pub mod preflight;
mod qemu_settings;
pub mod reconcile;
pub mod scheduler;
pub mod send_rates;
pub mod server;
pub mod store;
pub mod stream_tls;
#[cfg(test)]
mod test_support;

pub use config::ServerConfig;
pub use error::ServerError;
pub use server::{run, start, ServerHandle};
