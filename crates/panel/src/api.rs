//! The panel's only way to read or change anything: the server's own REST router, called in
//! process with the signed-in user's token. Every rule (auth, validation, the queue, the
//! checks) stays in the API, so the panel answers exactly what the CLI would, with the same
//! codes and hints.

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::response::Response;
use axum::Router;
use ferry_api::ErrorBody;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tower::ServiceExt;

/// The largest API answer the panel reads into memory (migration lists, console, logs).
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// An API refusal or failure as the panel shows it: the HTTP status and the server's own
/// error body (code, sentence, hint).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{body} (HTTP {status})")]
pub struct Failure {
    pub status: u16,
    pub body: ErrorBody,
}

impl Failure {
    /// A failure the panel itself finds (bad form input), in the API's shape so that it is
    /// shown the same way.
    pub fn bad_input(code: &str, message: impl Into<String>, hint: impl Into<String>) -> Self {
        Failure {
            status: 400,
            body: ErrorBody::new(code, message, hint),
        }
    }
}

/// The server's API router, shared by every panel request.
#[derive(Clone)]
pub struct Api {
    router: Router,
}

impl Api {
    pub fn new(router: Router) -> Api {
        Api { router }
    }

    /// One request through the API router, answered as the router answers it.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response, Failure> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"));
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(body.map(Body::from).unwrap_or_else(Body::empty))
            .map_err(|e| {
                Failure::bad_input(
                    "bad-request",
                    format!("the request could not be built: {e}"),
                    "check the address",
                )
            })?;
        match self.router.clone().oneshot(req).await {
            Ok(resp) => Ok(resp),
            Err(never) => match never {},
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, Failure> {
        let resp = self.raw(method, path, token, body).await?;
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), MAX_ANSWER_BYTES)
            .await
            .map_err(|e| Failure {
                status: 502,
                body: ErrorBody::new(
                    "bad-response",
                    format!("the API's answer to {path} could not be read: {e}"),
                    "see the server log",
                ),
            })?;
        if status.is_success() {
            serde_json::from_slice(&bytes).map_err(|e| Failure {
                status: 502,
                body: ErrorBody::new(
                    "bad-response",
                    format!("the API's answer to {path} was not understood: {e}"),
                    "see the server log; report it if it repeats",
                ),
            })
        } else {
            Err(Failure {
                status: status.as_u16(),
                body: serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                    ErrorBody::new(
                        "bad-response",
                        format!("the API answered {path} with HTTP {}", status.as_u16()),
                        "see the server log",
                    )
                }),
            })
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, token: &str, path: &str) -> Result<T, Failure> {
        self.call(Method::GET, path, token, None).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        token: &str,
        path: &str,
        body: &B,
    ) -> Result<T, Failure> {
        self.call_json(Method::POST, path, token, body).await
    }

    /// A POST without a body (start, stop, cancel, ...).
    pub async fn post_empty<T: DeserializeOwned>(
        &self,
        token: &str,
        path: &str,
    ) -> Result<T, Failure> {
        self.call(Method::POST, path, token, None).await
    }

    pub async fn patch<B: Serialize, T: DeserializeOwned>(
        &self,
        token: &str,
        path: &str,
        body: &B,
    ) -> Result<T, Failure> {
        self.call_json(Method::PATCH, path, token, body).await
    }

    /// A call with `body` as JSON: a form that cannot be encoded is the user's input.
    async fn call_json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: &B,
    ) -> Result<T, Failure> {
        let bytes = serde_json::to_vec(body).map_err(|e| {
            Failure::bad_input("bad-request", e.to_string(), "check the form's values")
        })?;
        self.call(method, path, token, Some(bytes)).await
    }

    /// The API's answer passed through untouched (the SSE streams), or its error body.
    pub async fn stream(&self, token: &str, path: &str) -> Result<Response, Failure> {
        let resp = self.raw(Method::GET, path, token, None).await?;
        if resp.status() == StatusCode::OK {
            Ok(resp)
        } else {
            let status = resp.status().as_u16();
            let bytes = axum::body::to_bytes(resp.into_body(), MAX_ANSWER_BYTES)
                .await
                .unwrap_or_default();
            Err(Failure {
                status,
                body: serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                    ErrorBody::new("bad-response", format!("HTTP {status}"), "")
                }),
            })
        }
    }
}

/// Percent-encodes one path segment or query value (see [`ferry_api::encode_segment`]).
pub fn enc(s: &str) -> String {
    ferry_api::encode_segment(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enc_keeps_names_and_escapes_the_rest() {
        assert_eq!(enc("web-1"), "web-1");
        assert_eq!(enc("a b/c?d"), "a%20b%2Fc%3Fd");
    }
}
