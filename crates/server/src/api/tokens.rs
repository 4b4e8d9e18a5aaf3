//! API tokens: create, list, revoke (admins only, each change audited with its actor).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use ferry_api::tokens::{parse_lifetime, CreateToken, CreatedToken, RevokedTokens, Token};

use super::ApiJson;
use crate::auth::Admin;
use crate::server::AppState;
use crate::store::Role;
use crate::ServerError;

/// Names are what the audit log shows as actors and what `ferry token revoke` takes: short,
/// printable, no spaces, so a log line cannot be forged through one.
fn check_name(name: &str) -> Result<(), ServerError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(ServerError::bad_request(
            "invalid-token-name",
            format!("{name:?} is not a token name"),
            "use 1 to 64 letters, digits, '-', '_', '.' or '@'",
        ))
    }
}

/// Every token with its role, creation, expiry and last use; never a secret.
#[utoipa::path(get, path = "/v1/tokens", responses((status = 200, body = Vec<Token>), (status = 403, description = "not an admin token", body = ferry_api::ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    _a: Admin,
) -> Result<Json<Vec<Token>>, ServerError> {
    let tokens = state.store.list_tokens().await?;
    Ok(Json(tokens.iter().map(|t| t.api()).collect()))
}

/// Creates a token; the answer holds its secret, shown this once (the server keeps only a
/// salted hash).
#[utoipa::path(post, path = "/v1/tokens", request_body = CreateToken, responses((status = 201, body = CreatedToken), (status = 400, description = "invalid name or lifetime", body = ferry_api::ErrorBody), (status = 403, description = "not an admin token", body = ferry_api::ErrorBody), (status = 409, description = "a token of that name exists (token-name-taken)", body = ferry_api::ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    who: Admin,
    ApiJson(req): ApiJson<CreateToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ServerError> {
    check_name(&req.name)?;
    let expires_at = match &req.expires_in {
        None => None,
        Some(text) => {
            let life = parse_lifetime(text).map_err(|e| {
                ServerError::bad_request(
                    "invalid-expiry",
                    e.to_string(),
                    "give a number and a unit: 90m, 12h, 30d or 2w (or leave it out for a \
                     token that never expires)",
                )
            })?;
            let life = chrono::Duration::from_std(life)
                .map_err(|e| ServerError::internal(format!("lifetime out of range: {e}")))?;
            Some(Utc::now() + life)
        }
    };
    let (info, secret) = state
        .store
        .create_token(&req.name, Role::from_api(req.role), expires_at)
        .await?;
    state
        .store
        .audit(
            &who.name,
            "token.create",
            &info.name,
            &serde_json::json!({"role": info.role.as_str(), "expires_at": info.expires_at, "id": info.id}),
        )
        .await?;
    tracing::info!(actor = %who.name, token = %info.name, role = %info.role, "created an API token");
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            token: info.api(),
            secret,
        }),
    ))
}

/// Revokes the token of this name: refused from the next call on, also where it was
/// verified recently. The configured admin token is managed in the server's config instead.
#[utoipa::path(delete, path = "/v1/tokens/{name}", params(("name" = String, Path, description = "token name")), responses((status = 200, body = RevokedTokens), (status = 403, description = "not an admin token", body = ferry_api::ErrorBody), (status = 404, description = "no such token", body = ferry_api::ErrorBody), (status = 409, description = "the token comes from the server's config (token-from-config)", body = ferry_api::ErrorBody)))]
pub async fn revoke(
    State(state): State<AppState>,
    who: Admin,
    Path(name): Path<String>,
) -> Result<Json<RevokedTokens>, ServerError> {
    let revoked = state.store.revoke_tokens_named(&name).await?;
    if revoked.is_empty() {
        let configured = state
            .store
            .list_tokens()
            .await?
            .into_iter()
            .any(|t| t.name == name && t.id == crate::store::CONFIG_TOKEN_ID);
        if configured {
            return Err(ServerError::conflict(
                "token-from-config",
                format!("the token {name:?} is the server's configured admin token"),
                "change or remove admin_token in the server's config and restart it",
            ));
        }
        return Err(ServerError::not_found("token", &name));
    }
    state
        .store
        .audit(
            &who.name,
            "token.revoke",
            &name,
            &serde_json::json!({"ids": revoked.iter().map(|t| t.id.clone()).collect::<Vec<_>>()}),
        )
        .await?;
    tracing::info!(actor = %who.name, token = %name, "revoked an API token");
    Ok(Json(RevokedTokens {
        revoked: revoked.iter().map(|t| t.api()).collect(),
    }))
}
