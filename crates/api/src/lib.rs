//! The words Ferry's processes speak to each other.
//!
//! Request and response bodies of the server's REST API (used by the CLI and, later, the web
//! panel), of the agent API (used by the server), and the one small HTTP client all of them use.
//! Keeping them in one crate means a field renamed on one side fails to compile on the other.

pub mod agent;
pub mod checks;
mod client;
mod error;
pub mod follow;
pub mod hosts;
pub mod instances;
pub mod migrations;
pub mod redact;
pub mod tokens;

pub use client::{encode_segment, ApiClient, TlsOptions};
pub use error::{ApiError, ErrorBody};
