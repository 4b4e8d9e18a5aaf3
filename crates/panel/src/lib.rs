//! Ferry's web panel: hosts, instances, the Live Migrate dialog and a live migration screen.
//!
//! The pages are rendered on the server (maud) from the server's own REST API, called in
//! process with the signed-in user's token ([`api::Api`]), so the panel has no rules of its
//! own: what the API refuses, the panel refuses, with the same code, sentence and hint. One
//! small script of ours (`assets/panel.js`) follows the server's event stream to keep pages
//! live and draws the charts; it and the stylesheet are compiled into the binary, so the
//! panel fetches nothing from anywhere else.

pub mod api;
mod pages;
pub mod session;
mod views;

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

/// What every panel handler shares: the API it renders from.
#[derive(Clone)]
pub struct Panel {
    api: api::Api,
}

/// The panel's routes, to be merged into the server's router beside `/v1`. `api` is the
/// server's API router (with its state); the panel calls it in process for everything.
pub fn router(api_router: Router) -> Router {
    let panel = Panel {
        api: api::Api::new(api_router),
    };
    Router::new()
        .route("/", get(|| async { Redirect::to("/instances") }))
        .route("/assets/panel.js", get(script))
        .route("/assets/panel.css", get(stylesheet))
        .route("/assets/favicon.svg", get(favicon))
        .route(
            "/signin",
            get(pages::signin::show).post(pages::signin::submit),
        )
        .route("/signout", post(pages::signin::signout))
        .route("/events", get(pages::live::cluster_events))
        .route("/hosts", get(pages::hosts::list))
        .route("/hosts/{name}/{action}", post(pages::hosts::act))
        .route("/instances", get(pages::instances::list))
        .route("/instances/{id}", get(pages::instances::show))
        .route("/instances/{id}/{action}", post(pages::instances::act))
        .route(
            "/instances/{id}/migrate",
            get(pages::migrate::dialog).post(pages::migrate::submit),
        )
        .route("/migrations", get(pages::migrations::list))
        .route("/migrations/{id}", get(pages::migrations::show))
        .route(
            "/migrations/{id}/events",
            get(pages::live::migration_events),
        )
        .route("/migrations/{id}/logs", get(pages::live::logs))
        .route("/migrations/{id}/samples", get(pages::live::samples))
        .route("/migrations/{id}/{action}", post(pages::migrations::act))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(panel)
}

/// Every panel answer forbids framing and any script, style or connection not served by the
/// panel itself, so injected markup could neither run nor call out.
async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

const SCRIPT: &str = include_str!("../assets/panel.js");
const STYLESHEET: &str = include_str!("../assets/panel.css");
const FAVICON: &str = include_str!("../assets/favicon.svg");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn stylesheet() -> Response {
    asset("text/css; charset=utf-8", STYLESHEET)
}

async fn favicon() -> Response {
    asset("image/svg+xml", FAVICON)
}
