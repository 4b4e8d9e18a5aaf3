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

/// A JSON-over-HTTP client with a bearer token, shared by the CLI (to the server), the server
/// (to agents) and agents (to the server), so every caller decodes errors the same way.
#[derive(Clone)]
pub struct ApiClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
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
    /// `base` is like `http://127.0.0.1:7400`; paths passed to the methods start with `/v1/`.
    pub fn new(base: &str, token: Option<String>) -> ApiClient {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap_or_default();
        ApiClient {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        }
    }

    /// The same client with another overall request timeout (default 60 s), for the few
    /// calls that legitimately take long, such as copying a disk image.
    pub fn with_timeout(mut self, timeout: Duration) -> ApiClient {
        self.http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(timeout)
            .build()
            .unwrap_or_default();
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
        let resp = req.send().await.map_err(|e| ApiError::Unreachable {
            url: url.clone(),
            detail: error_chain(&e),
        })?;
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
            .map_err(|e| ApiError::Unreachable {
                url: url.clone(),
                detail: error_chain(&e),
            })?;
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
