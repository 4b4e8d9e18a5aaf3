use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{ApiError, ErrorBody};

/// Percent-encodes one path segment or query value (instance and host names, filters), so
/// that a name with `/`, `?` or spaces addresses what it names and can never change the route.
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// How a client decides to trust the server it calls over HTTPS. Nothing set means the
/// public roots only: a cluster's own certificate is then refused, never accepted silently.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// Trust only this CA (PEM), e.g. the cluster's `ca.pem` (`FERRY_CA`).
    pub ca_pem: Option<String>,
    /// Trust the server whose CA or certificate has this SHA-256 (`sha256:AB:...`), pinned on
    /// first use. Used when no CA is given.
    pub pin: Option<String>,
    /// Present this client certificate (chain PEM, key PEM).
    pub identity: Option<(String, String)>,
}

impl std::fmt::Debug for TlsOptions {
    /// The identity's key never appears in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("ca_pem", &self.ca_pem.is_some())
            .field("pin", &self.pin)
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

impl TlsOptions {
    /// Trust the CA in `ca_pem`.
    pub fn ca(ca_pem: impl Into<String>) -> TlsOptions {
        TlsOptions {
            ca_pem: Some(ca_pem.into()),
            ..TlsOptions::default()
        }
    }

    /// Trust the certificate pinned as `pin`.
    pub fn pinned(pin: impl Into<String>) -> TlsOptions {
        TlsOptions {
            pin: Some(pin.into()),
            ..TlsOptions::default()
        }
    }

    /// The rustls configuration these options make; `None` when nothing is set.
    pub fn client_config(&self) -> Result<Option<Arc<rustls::ClientConfig>>, ferry_pki::PkiError> {
        let identity = self
            .identity
            .as_ref()
            .map(|(c, k)| (c.as_str(), k.as_str()));
        Ok(match (&self.ca_pem, &self.pin) {
            (Some(ca), _) => Some(ferry_pki::tls::client_config(ca, identity)?),
            (None, Some(pin)) => Some(ferry_pki::tls::pinned_client_config(pin, identity)?),
            (None, None) => None,
        })
    }
}

/// A JSON-over-HTTP client with a bearer token, shared by the CLI (to the server), the server
/// (to agents) and agents (to the server), so every caller decodes errors the same way.
#[derive(Clone)]
pub struct ApiClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    timeout: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// Leaves the bearer token out: clients end up in logged structs and test failures.
impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("base", &self.base)
            .field("token", &crate::redact::secret_field(&self.token))
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    /// `base` is like `https://127.0.0.1:7400`; paths passed to the methods start with `/v1/`.
    /// An `https` base is verified against the public roots until [`ApiClient::with_tls`]
    /// says what to trust.
    pub fn new(base: &str, token: Option<String>) -> ApiClient {
        let timeout = Duration::from_secs(60);
        ApiClient {
            base: base.trim_end_matches('/').to_string(),
            token,
            http: build_http(timeout, None),
            timeout,
            tls: None,
        }
    }

    /// The same client trusting what `options` say (a CA, a pin) and presenting its identity.
    pub fn with_tls(self, options: &TlsOptions) -> Result<ApiClient, ApiError> {
        let config = options.client_config().map_err(|e| ApiError::Untrusted {
            url: self.base.clone(),
            detail: e.to_string(),
            changed: false,
        })?;
        Ok(match config {
            Some(c) => self.with_tls_config(c),
            None => self,
        })
    }

    /// The same client with a ready rustls configuration (the server calling agents, whose
    /// verifier also refuses revoked certificates).
    pub fn with_tls_config(mut self, config: Arc<rustls::ClientConfig>) -> ApiClient {
        self.http = build_http(self.timeout, Some(&config));
        self.tls = Some(config);
        self
    }

    /// The same client with another overall request timeout (default 60 s), for the few
    /// calls that legitimately take long, such as copying a disk image.
    pub fn with_timeout(mut self, timeout: Duration) -> ApiClient {
        self.timeout = timeout;
        self.http = build_http(timeout, self.tls.as_ref());
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        self.send(reqwest::Method::GET, path, None::<&()>).await
    }

    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn put<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        self.send(reqwest::Method::PUT, path, Some(body)).await
    }

    pub async fn patch<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        self.send(reqwest::Method::PATCH, path, Some(body)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        self.send(reqwest::Method::DELETE, path, None::<&()>).await
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        req
    }

    async fn send<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ApiError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.request(method, path);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| transport_error(&url, &e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| ApiError::Unreachable {
            url: url.clone(),
            detail: error_chain(&e),
        })?;
        if !status.is_success() {
            let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| {
                ErrorBody::new(
                    "http-error",
                    format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes).trim()),
                    "check the request",
                )
            });
            return Err(ApiError::Status {
                status: status.as_u16(),
                body,
            });
        }
        let bytes = if bytes.is_empty() {
            &b"null"[..]
        } else {
            &bytes[..]
        };
        serde_json::from_slice(bytes).map_err(|e| ApiError::Decode {
            url,
            detail: e.to_string(),
        })
    }

    /// A text resource (`/metrics`), with errors decoded as for JSON calls.
    pub async fn get_text(&self, path: &str) -> Result<String, ApiError> {
        let url = format!("{}{}", self.base, path);
        let unreachable = |e: reqwest::Error| ApiError::Unreachable {
            url: url.clone(),
            detail: error_chain(&e),
        };
        let resp = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .map_err(unreachable)?;
        let status = resp.status();
        let text = resp.text().await.map_err(unreachable)?;
        if !status.is_success() {
            let body = serde_json::from_str::<ErrorBody>(&text).unwrap_or_else(|_| {
                ErrorBody::new("http-error", format!("HTTP {status}"), "check the request")
            });
            return Err(ApiError::Status {
                status: status.as_u16(),
                body,
            });
        }
        Ok(text)
    }

    /// Follows a Server-Sent Events stream, handing each event's `(event, data)` to `on_event`
    /// until the stream ends or `on_event` returns false.
    pub async fn follow_events(
        &self,
        path: &str,
        mut on_event: impl FnMut(&str, &str) -> bool,
    ) -> Result<(), ApiError> {
        let url = format!("{}{}", self.base, path);
        let resp = self
            .request(reqwest::Method::GET, path)
            .timeout(Duration::from_secs(24 * 3600))
            .send()
            .await
            .map_err(|e| transport_error(&url, &e))?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let bytes = resp.bytes().await.unwrap_or_default();
            let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| {
                ErrorBody::new("http-error", format!("HTTP {status}"), "check the request")
            });
            return Err(ApiError::Status { status, body });
        }
        let mut stream = resp.bytes_stream();
        let mut buf = String::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ApiError::Unreachable {
                url: url.clone(),
                detail: error_chain(&e),
            })?;
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let (mut event, mut data) = ("message".to_string(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        if !data.is_empty() {
                            data.push('\n');
                        }
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if !data.is_empty() && !on_event(&event, &data) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

fn build_http(timeout: Duration, tls: Option<&Arc<rustls::ClientConfig>>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout);
    if let Some(config) = tls {
        builder = builder.use_preconfigured_tls((**config).clone());
    }
    builder.build().unwrap_or_default()
}

/// A failed request: a refused certificate is not "unreachable", it is a trust problem the
/// user must see as such (and a changed pinned certificate has its own code).
fn transport_error(url: &str, e: &reqwest::Error) -> ApiError {
    let detail = error_chain(e);
    if detail.contains(ferry_pki::tls::PIN_MISMATCH) {
        return ApiError::Untrusted {
            url: url.to_string(),
            detail,
            changed: true,
        };
    }
    if detail.contains("invalid peer certificate")
        || detail.contains("certificate") && detail.contains("verif")
    {
        return ApiError::Untrusted {
            url: url.to_string(),
            detail,
            changed: false,
        };
    }
    ApiError::Unreachable {
        url: url.to_string(),
        detail,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
