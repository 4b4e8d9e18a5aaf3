//! `ferry server` and `ferry agent`: the long-running roles of the same binary. Both run until
//! SIGTERM or Ctrl-C; their errors (bad config, port in use) keep the crates' own code and hint.

use std::path::PathBuf;

use clap::Args;

use crate::error::{exit, CliError};

/// `ferry server --config FILE` / `ferry agent --config FILE`.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct DaemonArgs {
    /// The TOML configuration file.
    #[arg(long, short = 'c')]
    pub config: PathBuf,
}

/// Runs the control plane until SIGTERM/Ctrl-C.
pub async fn run_server(args: DaemonArgs) -> Result<u8, CliError> {
    let config = ferry_server::ServerConfig::from_toml_file(&args.config)
        .map_err(|e| CliError::Local(e.body))?;
    ferry_server::run(config)
        .await
        .map_err(|e| CliError::Local(e.body))?;
    Ok(exit::OK)
}

/// Runs a host agent until SIGTERM/Ctrl-C.
pub async fn run_agent(args: DaemonArgs) -> Result<u8, CliError> {
    let config = ferry_agent::AgentConfig::from_toml_file(&args.config)
        .map_err(|e| CliError::Local(e.body()))?;
    ferry_agent::run(config)
        .await
        .map_err(|e| CliError::Local(e.body()))?;
    Ok(exit::OK)
}
