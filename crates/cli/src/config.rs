//! Where the CLI finds the server and its credential.
//!
//! Flags win, then the environment (`FERRY_URL`, `FERRY_TOKEN`; clap reads both), then a small
//! TOML file (`$FERRY_CONFIG`, else `~/.config/ferry/cli.toml`), so that scripts, a shell after
//! `eval "$(ferry lab up)"` and an operator with a config file all work without repeating
//! themselves. Each field is resolved on its own: a token from the file still applies when the
//! URL came from a flag.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::CliError;

/// The config file's content; unknown keys are tolerated so newer files work with older CLIs.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
pub struct FileConfig {
    pub url: Option<String>,
    pub token: Option<String>,
}

/// Leaves the token out.
impl std::fmt::Debug for FileConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileConfig")
            .field("url", &self.url)
            .field("token", &ferry_api::redact::secret_field(&self.token))
            .finish()
    }
}

impl FileConfig {
    pub fn parse(text: &str, path: &Path) -> Result<FileConfig, CliError> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            CliError::new(
                "config-invalid",
                format!(
                    "{}: {}",
                    path.display(),
                    ferry_api::redact::config_error(e.message(), e.span(), text)
                ),
                "the file holds `url = \"http://host:port\"` and `token = \"...\"`",
            )
        })
    }
}

/// The server to talk to, resolved.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientConfig {
    pub url: String,
    pub token: Option<String>,
}

/// Leaves the token out.
impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("url", &self.url)
            .field("token", &ferry_api::redact::secret_field(&self.token))
            .finish()
    }
}

/// The config file to read and whether the user named it explicitly (then it must exist).
pub fn config_path() -> Option<(PathBuf, bool)> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(p) = var("FERRY_CONFIG") {
        return Some((PathBuf::from(p), true));
    }
    let base = var("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some((base.join("ferry/cli.toml"), false))
}

/// Reads the config file, if there is one. A missing default file is fine; a missing file the
/// user named in `$FERRY_CONFIG` is an error, since they meant something by it.
pub fn load_file(path: Option<(PathBuf, bool)>) -> Result<FileConfig, CliError> {
    let Some((path, explicit)) = path else {
        return Ok(FileConfig::default());
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => FileConfig::parse(&text, &path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            Ok(FileConfig::default())
        }
        Err(e) => Err(CliError::new(
            "config-unreadable",
            format!("cannot read {}: {e}", path.display()),
            "fix or unset FERRY_CONFIG",
        )),
    }
}

/// Combines flags/environment with the file. The file is only read when a field is missing, so
/// a broken file does not stand in the way of explicit flags.
pub fn resolve(
    url: Option<String>,
    token: Option<String>,
    file: impl FnOnce() -> Result<FileConfig, CliError>,
) -> Result<ClientConfig, CliError> {
    let nonempty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
    let (url, token) = (nonempty(url), nonempty(token));
    let (url, token) = if url.is_some() && token.is_some() {
        (url, token)
    } else {
        let f = file()?;
        (url.or(nonempty(f.url)), token.or(nonempty(f.token)))
    };
    let url = url.ok_or_else(|| {
        CliError::new(
            "no-server-url",
            "no server URL is configured",
            "pass --url, set FERRY_URL, or put `url = \"http://host:7400\"` in \
             ~/.config/ferry/cli.toml (or $FERRY_CONFIG); `eval \"$(ferry lab up)\"` sets it for a lab",
        )
    })?;
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(CliError::new(
            "invalid-url",
            format!("server URL {url:?} does not start with http:// or https://"),
            "give the full URL, e.g. http://127.0.0.1:7400",
        ));
    }
    Ok(ClientConfig { url, token })
}
