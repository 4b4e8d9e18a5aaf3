//! Where the process's log goes, and whether it is coloured.
//!
//! Colour codes help a person at a terminal and ruin a file: a daemon's log (the lab's
//! `<dir>/<host>.log`, the journal of a systemd unit, `--log-file`) is read with `less`,
//! `grep` and log shippers, where `ESC[32m` is noise. So colour is only ever used for a
//! terminal, and `NO_COLOR` (https://no-color.org) turns it off there too.

use std::io::IsTerminal;
use std::path::Path;

use crate::error::CliError;

/// Whether log lines get ANSI colour codes: only when they go to a terminal (not to
/// `--log-file`, not to a pipe or a redirected stderr) and `NO_COLOR` is not set.
pub fn log_colours(to_file: bool, stderr_is_terminal: bool, no_color_set: bool) -> bool {
    !to_file && stderr_is_terminal && !no_color_set
}

/// Installs the global log subscriber: `filter` in RUST_LOG syntax (an invalid one falls back
/// to `warn`), lines to `log_file` (appended, created mode 0600: logs may name tokens' owners
/// and hosts) or else to stderr.
pub fn init(filter: &str, log_file: Option<&Path>) -> Result<(), CliError> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match log_file {
        Some(path) => {
            let file = ferry_lab::private_fs::append_file(path).map_err(|e| {
                CliError::new(
                    "log-file",
                    format!("cannot open the log file {}: {e}", path.display()),
                    "give --log-file a path in a writable directory",
                )
            })?;
            builder
                .with_ansi(log_colours(true, false, no_color))
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
        None => {
            builder
                .with_ansi(log_colours(
                    false,
                    std::io::stderr().is_terminal(),
                    no_color,
                ))
                .with_writer(std::io::stderr)
                .init();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_for_a_terminal_without_no_color() {
        assert!(log_colours(false, true, false));
        assert!(!log_colours(false, false, false), "stderr redirected");
        assert!(!log_colours(true, true, false), "--log-file");
        assert!(!log_colours(false, true, true), "NO_COLOR");
    }
}
