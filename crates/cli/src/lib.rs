//! The `ferry` command line, as a library: argument definitions, client configuration,
//! output formatting, exit codes and the commands themselves, with typed errors.
//!
//! The binary (main.rs) only parses, dispatches and turns errors into exit codes; keeping the
//! rest here lets tests check parsing and formatting without spawning the program.

pub mod commands;
pub mod config;
pub mod error;
pub mod logging;
pub mod output;
