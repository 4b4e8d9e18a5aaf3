//! The REST API under `/v1`, and its OpenAPI document at `/v1/openapi.json`.

mod agents;
mod events;
mod hosts;
mod instances;
mod migrations;
mod tokens;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use utoipa::OpenApi;

use crate::server::AppState;
use crate::ServerError;

/// The largest request body accepted. Every request is a small JSON document (an instance
/// spec is well under 10 KiB), so 1 MiB leaves room and still bounds what one request can make
/// the server buffer.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// A JSON body whose rejection is an [`ServerError`], not axum's plain-text one: 413
/// `body-too-large` above [`MAX_BODY_BYTES`], 400 `unknown-field` for a field the type does not
/// have, else 400 `malformed-json`.
pub struct ApiJson<T>(pub T);

/// How much of a too-large body the server still reads (and throws away) before it answers
/// 413. A client writes its whole body before it reads the answer; closing the connection
/// under it would turn the clear `body-too-large` error into a broken pipe on its side.
const DRAIN_MAX_BYTES: usize = 64 << 20;

/// How long the server keeps reading a too-large body before it answers anyway.
const DRAIN_MAX_TIME: std::time::Duration = std::time::Duration::from_secs(10);

fn body_too_large() -> ServerError {
    ServerError::new(
        413,
        "body-too-large",
        format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
        "send only the fields described in /v1/openapi.json",
    )
}

/// Reads a request body of at most [`MAX_BODY_BYTES`]. A larger one is read on to its end
/// (within [`DRAIN_MAX_BYTES`] and [`DRAIN_MAX_TIME`]) and then refused, so the client is
/// still listening when the refusal comes.
async fn read_body(body: axum::body::Body) -> Result<axum::body::Bytes, ServerError> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut kept = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ServerError::bad_request(
                "malformed-json",
                format!("the request body could not be read: {e}"),
                "send a JSON body as described in /v1/openapi.json",
            )
        })?;
        seen += chunk.len();
        if seen > MAX_BODY_BYTES {
            let drain = async {
                while seen <= DRAIN_MAX_BYTES {
                    match stream.next().await {
                        Some(Ok(more)) => seen += more.len(),
                        _ => break,
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_MAX_TIME, drain).await;
            return Err(body_too_large());
        }
        kept.extend_from_slice(&chunk);
    }
    Ok(kept.into())
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ServerError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ServerError> {
        let (parts, body) = req.into_parts();
        let bytes = read_body(body).await?;
        let req = Request::from_parts(parts, axum::body::Body::from(bytes));
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(body_too_large())
            }
            Err(rejection) if rejection.body_text().contains("unknown field") => {
                Err(ServerError::bad_request(
                    "unknown-field",
                    rejection.body_text(),
                    "remove the field or fix its spelling (see /v1/openapi.json)",
                ))
            }
            Err(rejection) => Err(ServerError::bad_request(
                "malformed-json",
                rejection.body_text(),
                "send a JSON body as described in /v1/openapi.json",
            )),
        }
    }
}

/// Query parameters whose rejection is a [`ServerError`] (code `bad-query`).
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ServerError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ServerError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(rejection) => Err(ServerError::bad_request(
                "bad-query",
                rejection.body_text(),
                "check the query parameters against /v1/openapi.json",
            )),
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Ferry",
        description = "Live migration of KVM/QEMU virtual machines"
    ),
    paths(
        whoami,
        hosts::list,
        hosts::show,
        hosts::enable,
        hosts::disable,
        hosts::rotate_cert,
        hosts::datastores,
        hosts::cpu_baseline,
        hosts::networks,
        instances::list,
        instances::create,
        instances::show,
        instances::start,
        instances::stop,
        instances::delete,
        instances::console,
        instances::migration_candidates,
        migrations::create,
        migrations::preview,
        migrations::list,
        migrations::show,
        migrations::update,
        migrations::cancel,
        migrations::postcopy,
        migrations::cleanup,
        migrations::observe,
        migrations::logs,
        migrations::samples,
        migrations::audit,
        events::cluster_events,
        events::migration_events,
        tokens::list,
        tokens::create,
        tokens::revoke,
    ),
    components(schemas(
        ferry_api::ErrorBody,
        ferry_api::tokens::Whoami,
        ferry_api::tokens::TokenRole,
        ferry_api::tokens::Token,
        ferry_api::tokens::CreateToken,
        ferry_api::tokens::CreatedToken,
        ferry_api::tokens::RevokedTokens,
        ferry_api::checks::Candidate,
        ferry_api::checks::CheckResult,
        ferry_api::checks::CheckStatus,
        ferry_api::migrations::DiskCopy,
        ferry_api::migrations::DiskCopyState,
        ferry_api::migrations::Sample,
        ferry_api::migrations::SamplePage
    ))
)]
struct ApiDoc;

/// The caller's token name and role: clients that hide what a token may not do (the web
/// panel) ask here instead of trying a change.
#[utoipa::path(get, path = "/v1/whoami", responses((status = 200, body = ferry_api::tokens::Whoami), (status = 401, description = "no valid token", body = ferry_api::ErrorBody)))]
async fn whoami(caller: crate::auth::Caller) -> Json<ferry_api::tokens::Whoami> {
    Json(ferry_api::tokens::Whoami {
        name: caller.name,
        role: caller.role.api(),
    })
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// Every route of the server.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(crate::metrics::metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/whoami", get(whoami))
        .route("/v1/hosts", get(hosts::list))
        .route("/v1/hosts/{name}", get(hosts::show))
        .route("/v1/hosts/{name}/enable", post(hosts::enable))
        .route("/v1/hosts/{name}/disable", post(hosts::disable))
        .route("/v1/hosts/{name}/rotate-cert", post(hosts::rotate_cert))
        .route("/v1/datastores", get(hosts::datastores))
        .route("/v1/networks", get(hosts::networks))
        .route("/v1/cpu-baseline", get(hosts::cpu_baseline))
        .route(
            "/v1/instances",
            get(instances::list).post(instances::create),
        )
        .route(
            "/v1/instances/{id}",
            get(instances::show).delete(instances::delete),
        )
        .route("/v1/instances/{id}/start", post(instances::start))
        .route("/v1/instances/{id}/stop", post(instances::stop))
        .route("/v1/instances/{id}/console", get(instances::console))
        .route(
            "/v1/instances/{id}/migration-candidates",
            get(instances::migration_candidates),
        )
        .route(
            "/v1/migrations",
            get(migrations::list).post(migrations::create),
        )
        .route(
            "/v1/migrations/{id}",
            get(migrations::show).patch(migrations::update),
        )
        .route("/v1/migrations/preview", post(migrations::preview))
        .route("/v1/migrations/{id}/cancel", post(migrations::cancel))
        .route("/v1/migrations/{id}/postcopy", post(migrations::postcopy))
        .route("/v1/migrations/{id}/cleanup", post(migrations::cleanup))
        .route(
            "/v1/migrations/{id}/observations",
            post(migrations::observe),
        )
        .route("/v1/migrations/{id}/logs", get(migrations::logs))
        .route("/v1/migrations/{id}/samples", get(migrations::samples))
        .route("/v1/migrations/{id}/events", get(events::migration_events))
        .route("/v1/events", get(events::cluster_events))
        .route("/v1/audit", get(migrations::audit))
        .route("/v1/tokens", get(tokens::list).post(tokens::create))
        .route("/v1/tokens/{name}", delete(tokens::revoke))
        .route("/v1/agents/join", post(agents::join))
        .route("/v1/agents/heartbeat", post(agents::heartbeat))
        .route("/v1/agents/renew", post(agents::renew))
        .fallback(|| async {
            ServerError::new(
                404,
                "no-such-endpoint",
                "no such API endpoint",
                "see /v1/openapi.json",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_documents_the_candidates() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        assert!(
            doc["paths"]["/v1/instances/{id}/migration-candidates"]["get"].is_object(),
            "{}",
            doc["paths"]
        );
        for schema in ["Candidate", "CheckResult", "CheckStatus"] {
            assert!(doc["components"]["schemas"][schema].is_object(), "{schema}");
        }
    }

    /// Every `{param}` of every path is declared as a path parameter of each of its
    /// operations, and every operation addressing something by path documents its 404, so
    /// generated clients get the parameters and callers know the answer for a wrong name.
    #[test]
    fn openapi_declares_every_path_parameter_and_its_404() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let paths = doc["paths"].as_object().expect("paths");
        let mut problems = Vec::new();
        let mut checked = 0;
        for (path, item) in paths {
            let wanted: Vec<&str> = path
                .split('/')
                .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            for (method, op) in item.as_object().expect("path item") {
                let Some(op) = op.as_object().filter(|o| o.contains_key("responses")) else {
                    continue;
                };
                let declared: Vec<&str> = op
                    .get("parameters")
                    .and_then(|p| p.as_array())
                    .into_iter()
                    .flatten()
                    .filter(|p| p["in"] == "path")
                    .filter_map(|p| p["name"].as_str())
                    .collect();
                for w in &wanted {
                    checked += 1;
                    if !declared.contains(w) {
                        problems.push(format!("{method} {path}: no path parameter {w}"));
                    }
                }
                // Query parameters declared as path parameters (utoipa's default for
                // IntoParams) would be just as wrong for a generated client.
                for d in &declared {
                    if !wanted.contains(d) {
                        problems.push(format!("{method} {path}: stray path parameter {d}"));
                    }
                }
                if !wanted.is_empty() && op["responses"].get("404").is_none() {
                    problems.push(format!("{method} {path}: 404 not documented"));
                }
            }
        }
        assert!(checked >= 13, "only {checked} path parameters seen");
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}
