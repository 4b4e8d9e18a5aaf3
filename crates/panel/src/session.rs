//! Sign-in: the API token lives in one cookie (Secure, HttpOnly, SameSite=Strict), never in a
//! URL or in script reach. Every form that changes something carries a CSRF token derived
//! from the session's token, and the server's API still decides what the token may do.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Redirect, Response};
use ferry_api::tokens::{TokenRole, Whoami};
use sha2::{Digest, Sha256};

use crate::api::Failure;
use crate::Panel;

/// The session cookie's name.
pub const COOKIE: &str = "ferry_session";

/// The CSRF form field's name.
pub const CSRF_FIELD: &str = "csrf";

/// The signed-in user of one request. `Debug` leaves the token out, so a logged session
/// never shows it.
#[derive(Clone)]
pub struct Session {
    /// The API token, passed to the API as the bearer of every call.
    pub token: String,
    pub name: String,
    pub role: TokenRole,
    /// The value every form of this session must send back.
    pub csrf: String,
}

impl Session {
    /// Whether admin actions (hosts) are shown. The server refuses them for other roles
    /// anyway; hiding them only spares the user a refusal.
    pub fn admin(&self) -> bool {
        self.role == TokenRole::Admin
    }

    /// Whether guest actions (start, stop, migrate, cancel) are shown: operators and admins.
    pub fn operator(&self) -> bool {
        self.role.allows(TokenRole::Operator)
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("token", &"<redacted>")
            .field("csrf", &"<redacted>")
            .finish()
    }
}

/// The session's CSRF token: a hash of the API token under a fixed label. A page of another
/// site can neither read the cookie nor compute this, so it cannot forge a form post.
pub fn csrf_for(token: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"ferry-panel-csrf\0");
    h.update(token.as_bytes());
    hex::encode(h.finalize())
}

/// Compares secrets without leaking, through timing, how much of a guess was right.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The session token from the request's cookies.
pub fn token_from(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty())
}

/// Whether a token can be stored in a cookie as it is. API tokens are made of URL-safe
/// characters; anything else is not a token and is refused at sign-in.
pub fn token_is_well_formed(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 512
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
}

/// The `Set-Cookie` value that signs `token` in.
pub fn cookie_for(token: &str) -> String {
    format!("{COOKIE}={token}; Path=/; HttpOnly; Secure; SameSite=Strict")
}

/// The `Set-Cookie` value that signs out.
pub fn cookie_cleared() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0")
}

/// Refuses a form post whose origin is another site, or whose CSRF field is missing or wrong.
pub fn check_form(
    session: &Session,
    headers: &HeaderMap,
    sent: Option<&str>,
) -> Result<(), Failure> {
    check_origin(headers)?;
    match sent {
        Some(v) if same(v, &session.csrf) => Ok(()),
        _ => Err(Failure {
            status: 403,
            body: ferry_api::ErrorBody::new(
                "csrf-refused",
                "the form did not carry this session's CSRF token",
                "reload the page and submit the form again",
            ),
        }),
    }
}

/// A browser names the page's origin on every cross-site post; one that differs from this
/// server's host is refused even before the CSRF token is looked at.
pub fn check_origin(headers: &HeaderMap) -> Result<(), Failure> {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin_host = origin
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(origin);
    if !host.is_empty() && origin_host == host {
        Ok(())
    } else {
        Err(Failure {
            status: 403,
            body: ferry_api::ErrorBody::new(
                "csrf-refused",
                format!("a form from {origin} may not act on this panel"),
                "use the panel's own pages",
            ),
        })
    }
}

/// Why a request has no session: not signed in (go to the sign-in page) or the API failed.
pub enum NoSession {
    SignIn,
    Failed(Failure),
}

impl IntoResponse for NoSession {
    fn into_response(self) -> Response {
        match self {
            NoSession::SignIn => (
                [(header::SET_COOKIE, cookie_cleared())],
                Redirect::to("/signin"),
            )
                .into_response(),
            NoSession::Failed(f) => crate::views::error_page(None, &f).into_response(),
        }
    }
}

impl FromRequestParts<Panel> for Session {
    type Rejection = NoSession;
    async fn from_request_parts(parts: &mut Parts, panel: &Panel) -> Result<Self, NoSession> {
        let token = token_from(&parts.headers).ok_or(NoSession::SignIn)?;
        match panel.api.get::<Whoami>(&token, "/v1/whoami").await {
            Ok(who) => Ok(Session {
                csrf: csrf_for(&token),
                token,
                name: who.name,
                role: who.role,
            }),
            Err(f) if f.status == 401 => Err(NoSession::SignIn),
            Err(f) => Err(NoSession::Failed(f)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn the_token_comes_from_its_cookie_only() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; ferry_session=tok-1; b=2"),
        );
        assert_eq!(token_from(&h).as_deref(), Some("tok-1"));
        h.insert(header::COOKIE, HeaderValue::from_static("ferry_session="));
        assert_eq!(token_from(&h), None);
    }

    #[test]
    fn the_cookie_is_secure_http_only_and_strict() {
        let c = cookie_for("t");
        for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
            assert!(c.contains(attr), "{c}");
        }
    }

    #[test]
    fn tokens_with_cookie_breaking_characters_are_refused() {
        assert!(token_is_well_formed("abc-DEF_123"));
        assert!(!token_is_well_formed("a;b"));
        assert!(!token_is_well_formed("a b"));
        assert!(!token_is_well_formed(""));
    }

    #[test]
    fn csrf_is_checked_and_other_origins_refused() {
        let s = Session {
            token: "t".into(),
            name: "n".into(),
            role: TokenRole::Admin,
            csrf: csrf_for("t"),
        };
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("localhost:8080"));
        assert!(check_form(&s, &h, Some(&csrf_for("t"))).is_ok());
        assert!(check_form(&s, &h, Some(&csrf_for("u"))).is_err());
        assert!(check_form(&s, &h, None).is_err());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://localhost:8080"),
        );
        assert!(check_form(&s, &h, Some(&csrf_for("t"))).is_ok());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(check_form(&s, &h, Some(&csrf_for("t"))).is_err());
    }
}
