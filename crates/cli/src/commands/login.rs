//! `ferry login`: remember a server, its token and how to trust it.
//!
//! With `--ca` (or `FERRY_CA`) the server is verified against that CA. Without, this is trust
//! on first use: the CLI shows the fingerprint of the CA the server presents and stores it as
//! a pin only when told to (`--accept-fingerprint sha256:...` that matches, or an interactive
//! yes). From then on a different certificate is refused with `server-certificate-changed`.

use std::io::{BufRead, IsTerminal, Write};

use ferry_api::TlsOptions;

use super::ApiOpts;
use crate::config::{self, ClientConfig, FileConfig};
use crate::error::CliError;

/// `host:port` and the host of an https URL.
fn authority(url: &str) -> Result<(String, String), CliError> {
    let rest = url.strip_prefix("https://").ok_or_else(|| {
        CliError::new(
            "invalid-url",
            format!("{url} is not an https:// URL"),
            "give the server's https:// URL",
        )
    })?;
    let auth = rest.split('/').next().unwrap_or_default().to_string();
    let (host, has_port) = match auth.strip_prefix('[') {
        Some(v6) => {
            let host = v6.split(']').next().unwrap_or_default().to_string();
            (host, v6.contains("]:"))
        }
        None => match auth.rsplit_once(':') {
            Some((h, _)) => (h.to_string(), true),
            None => (auth.clone(), false),
        },
    };
    let addr = if has_port {
        auth
    } else {
        format!("{auth}:443")
    };
    Ok((addr, host))
}

/// Asks on the terminal whether to trust `fingerprint`.
fn ask(fingerprint: &str) -> bool {
    eprint!("Trust this server's CA {fingerprint}? Compare it with the fingerprint the server printed at its first start [y/N] ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    matches!(line.trim(), "y" | "Y" | "yes")
}

pub async fn run(api: &ApiOpts, accept: Option<String>) -> Result<u8, CliError> {
    let url = api.url.clone().filter(|u| !u.is_empty()).ok_or_else(|| {
        CliError::new(
            "no-server-url",
            "ferry login needs the server's URL",
            "pass --url https://HOST:7400",
        )
    })?;
    let url = url.trim_end_matches('/').to_string();
    let mut cfg = ClientConfig {
        url: url.clone(),
        token: api.token.clone().filter(|t| !t.is_empty()),
        ca: api.ca.clone(),
        fingerprint: None,
    };
    if cfg.ca.is_none() && url.starts_with("https://") {
        let (addr, host) = authority(&url)?;
        let chain = ferry_pki::tls::probe_server_chain(&addr, &host)
            .await
            .map_err(|e| {
                CliError::new(
                    "unreachable",
                    format!("cannot read the certificate of {url}: {e}"),
                    "check the URL and that the server runs",
                )
            })?;
        // The CA when the server sends it (Ferry's servers do), else the leaf itself.
        let presented = ferry_pki::fingerprint(chain.last().unwrap_or(&chain[0]));
        eprintln!("The server at {url} presents a certificate of CA\n  {presented}");
        let accepted = match &accept {
            Some(given) => {
                let want = ferry_pki::parse_fingerprint(given).map_err(|e| {
                    CliError::new(e.code(), e.to_string(), e.hint())
                })?;
                if ferry_pki::parse_fingerprint(&presented).ok() != Some(want) {
                    return Err(CliError::new(
                        "server-certificate-changed",
                        format!("the server presents {presented}, not the accepted {given}"),
                        "do not connect if you did not expect a different CA; otherwise compare with the fingerprint the server printed",
                    ));
                }
                true
            }
            None if std::io::stdin().is_terminal() => ask(&presented),
            None => {
                return Err(CliError::new(
                    "server-certificate-unknown",
                    format!("the server's CA {presented} is not trusted yet"),
                    format!(
                        "compare it with the fingerprint the server printed, then run `ferry login --url {url} --accept-fingerprint {presented}` (or set FERRY_CA)"
                    ),
                ))
            }
        };
        if !accepted {
            return Err(CliError::new(
                "server-certificate-unknown",
                "the server's certificate was not accepted",
                "give FERRY_CA, or accept the fingerprint",
            ));
        }
        cfg.fingerprint = Some(presented);
    }
    // Prove the trust (and the token) works before storing it.
    let client = ferry_api::ApiClient::new(&cfg.url, cfg.token.clone())
        .with_tls(&match (&cfg.ca, &cfg.fingerprint) {
            (Some(_), _) => cfg.tls_options()?,
            (None, Some(pin)) => TlsOptions::pinned(pin.clone()),
            (None, None) => TlsOptions::default(),
        })
        .map_err(CliError::Api)?;
    if cfg.token.is_some() {
        client
            .get::<serde_json::Value>("/v1/whoami")
            .await
            .map_err(CliError::Api)?;
    }
    let Some((path, _)) = config::config_path() else {
        return Err(CliError::new(
            "config-unwritable",
            "no place for the CLI's config file",
            "set FERRY_CONFIG or HOME",
        ));
    };
    let ca = cfg
        .ca
        .as_ref()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()));
    config::save_file(
        &path,
        &FileConfig {
            url: Some(cfg.url.clone()),
            token: cfg.token.clone(),
            ca,
            fingerprint: cfg.fingerprint.clone(),
        },
    )?;
    println!("logged in to {}; saved in {}", cfg.url, path.display());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::authority;

    #[test]
    fn authorities() {
        assert_eq!(
            authority("https://10.0.0.1:7400").unwrap(),
            ("10.0.0.1:7400".into(), "10.0.0.1".into())
        );
        assert_eq!(
            authority("https://ferry.example/v1").unwrap(),
            ("ferry.example:443".into(), "ferry.example".into())
        );
        assert_eq!(
            authority("https://[fd00::1]:7400").unwrap(),
            ("[fd00::1]:7400".into(), "fd00::1".into())
        );
        assert!(authority("http://x:1").is_err());
    }
}
