//! Sign-in with an API token, and sign-out.

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use ferry_api::tokens::Whoami;
use maud::html;

use super::Fields;
use crate::api::Failure;
use crate::session::{
    check_form, check_origin, cookie_cleared, cookie_for, token_is_well_formed, Session, CSRF_FIELD,
};
use crate::views::{error_box, page, respond, Nav};
use crate::Panel;

fn form(failure: Option<&Failure>) -> Response {
    let body = html! {
        section.signin {
            h1 { "Sign in" }
            p { "Paste an API token. An admin token may do everything; an operator token starts, stops and migrates guests; a reader token sees every page and changes nothing." }
            @if let Some(f) = failure { (error_box(f)) }
            form method="post" action="/signin" {
                label for="token" { "API token" }
                input #token type="password" name="token" autocomplete="off" required autofocus;
                button.primary type="submit" { "Sign in" }
            }
            p.small { "The token is kept in a cookie only this panel can read (HttpOnly, Secure, SameSite=Strict), never in an address." }
        }
    };
    respond(page("Sign in", None, Nav::None, body))
}

/// `GET /signin`.
pub async fn show() -> Response {
    form(None)
}

/// `POST /signin`: the token is checked by the API (`/v1/whoami`) before it is kept.
pub async fn submit(
    State(panel): State<Panel>,
    headers: HeaderMap,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let fields = Fields(fields);
    if let Err(f) = check_origin(&headers) {
        return form(Some(&f));
    }
    let token = fields.value("token").unwrap_or("").to_string();
    if !token_is_well_formed(&token) {
        let f = Failure::bad_input(
            "unauthorized",
            "that is not an API token",
            "paste an API token of this cluster (the first admin token is in the file admin.token next to the server's database)",
        );
        return form(Some(&f));
    }
    match panel.api.get::<Whoami>(&token, "/v1/whoami").await {
        Ok(_) => (
            [(header::SET_COOKIE, cookie_for(&token))],
            Redirect::to("/instances"),
        )
            .into_response(),
        Err(f) => form(Some(&f)),
    }
}

/// `POST /signout`.
pub async fn signout(
    session: Session,
    headers: HeaderMap,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let fields = Fields(fields);
    if let Err(f) = check_form(&session, &headers, fields.get(CSRF_FIELD)) {
        return crate::views::error_page(Some(&session), &f);
    }
    (
        [(header::SET_COOKIE, cookie_cleared())],
        Redirect::to("/signin"),
    )
        .into_response()
}
