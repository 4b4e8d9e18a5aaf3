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
    /// The cluster CA file to verify the server with.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The server's CA fingerprint accepted by `ferry login` (trust on first use); only for
    /// `url`.
    #[serde(default)]
    pub fingerprint: Option<String>,
}

/// Leaves the token out.
impl std::fmt::Debug for FileConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileConfig")
            .field("url", &self.url)
            .field("token", &ferry_api::redact::secret_field(&self.token))
            .field("ca", &self.ca)
            .field("fingerprint", &self.fingerprint)
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
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ClientConfig {
    pub url: String,
    pub token: Option<String>,
    /// Verify the server against this CA file (`FERRY_CA`, `--ca`, `ca` in the file).
    pub ca: Option<PathBuf>,
    /// Else against this pinned fingerprint (`fingerprint` in the file, for its `url`).
    pub fingerprint: Option<String>,
}

impl ClientConfig {
    /// What the client trusts: the CA file, else the pin, else only the public roots (so an
    /// unknown cluster certificate is refused, never accepted silently).
    pub fn tls_options(&self) -> Result<ferry_api::TlsOptions, CliError> {
        if let Some(path) = &self.ca {
            let pem = std::fs::read_to_string(path).map_err(|e| {
                CliError::new(
                    "ca-unreadable",
                    format!("cannot read the CA file {}: {e}", path.display()),
                    "point FERRY_CA (or --ca) at the server's pki/ca.pem",
                )
            })?;
            return Ok(ferry_api::TlsOptions::ca(pem));
        }
        if let Some(pin) = &self.fingerprint {
            return Ok(ferry_api::TlsOptions::pinned(pin.clone()));
        }
        Ok(ferry_api::TlsOptions::default())
    }

    /// An API client for this server with its token and trust.
    pub fn client(&self) -> Result<ferry_api::ApiClient, CliError> {
        ferry_api::ApiClient::new(&self.url, self.token.clone())
            .with_tls(&self.tls_options()?)
            .map_err(CliError::Api)
    }
}

/// Writes the CLI config file (mode 0600: it holds a token), keeping nothing else.
pub fn save_file(path: &Path, config: &FileConfig) -> Result<(), CliError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = String::new();
    let mut line = |k: &str, v: &str| {
        text.push_str(&format!("{k} = {}\n", toml::Value::String(v.to_string())));
    };
    if let Some(v) = &config.url {
        line("url", v);
    }
    if let Some(v) = &config.token {
        line("token", v);
    }
    if let Some(v) = &config.ca {
        line("ca", &v.to_string_lossy());
    }
    if let Some(v) = &config.fingerprint {
        line("fingerprint", v);
    }
    let fail = |e: std::io::Error| {
        CliError::new(
            "config-unwritable",
            format!("cannot write {}: {e}", path.display()),
            "check the directory's permissions or set FERRY_CONFIG",
        )
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let tmp = path.with_extension("toml.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(fail)?;
    f.write_all(text.as_bytes()).map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
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
    Ok(ClientConfig {
        url,
        token,
        ..ClientConfig::default()
    })
}
