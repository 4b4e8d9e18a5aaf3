//! The live feeds the script follows: the server's event streams and a migration's log,
//! passed through from the API with the session's token (an `EventSource` cannot send an
//! Authorization header, and the token must not reach the script).

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferry_api::migrations::{LogLine, SamplePage};
use serde::Deserialize;

use crate::api::enc;
use crate::session::Session;
use crate::views::error_page;
use crate::Panel;

/// `GET /events`: every event of the cluster (list pages refresh on them).
pub async fn cluster_events(State(panel): State<Panel>, session: Session) -> Response {
    match panel.api.stream(&session.token, "/v1/events").await {
        Ok(r) => r,
        Err(f) => error_page(Some(&session), &f),
    }
}

/// `GET /migrations/{id}/events`: one migration's record and samples until it ends.
pub async fn migration_events(
    State(panel): State<Panel>,
    session: Session,
    Path(id): Path<String>,
) -> Response {
    let path = format!("/v1/migrations/{}/events", enc(&id));
    match panel.api.stream(&session.token, &path).await {
        Ok(r) => r,
        Err(f) => error_page(Some(&session), &f),
    }
}

/// `GET /migrations/{id}/logs`: the log lines as JSON, for the screen's log and decisions.
pub async fn logs(
    State(panel): State<Panel>,
    session: Session,
    Path(id): Path<String>,
) -> Response {
    let path = format!("/v1/migrations/{}/logs", enc(&id));
    match panel.api.get::<Vec<LogLine>>(&session.token, &path).await {
        Ok(lines) => Json(lines).into_response(),
        Err(f) => (
            axum::http::StatusCode::from_u16(f.status)
                .unwrap_or(axum::http::StatusCode::BAD_GATEWAY),
            Json(f.body),
        )
            .into_response(),
    }
}

/// Paging of `GET /migrations/{id}/samples`, passed on to the API.
#[derive(Debug, Default, Deserialize)]
pub struct SamplesQuery {
    pub after: Option<u64>,
}

/// `GET /migrations/{id}/samples?after=SEQ`: a page of the job's stored progress history as
/// JSON, so the screen's charts start with the job's whole course (the event stream only
/// brings what comes after the page was opened).
pub async fn samples(
    State(panel): State<Panel>,
    session: Session,
    Path(id): Path<String>,
    Query(q): Query<SamplesQuery>,
) -> Response {
    let path = format!(
        "/v1/migrations/{}/samples?after={}",
        enc(&id),
        q.after.unwrap_or(0)
    );
    match panel.api.get::<SamplePage>(&session.token, &path).await {
        Ok(page) => Json(page).into_response(),
        Err(f) => (
            axum::http::StatusCode::from_u16(f.status)
                .unwrap_or(axum::http::StatusCode::BAD_GATEWAY),
            Json(f.body),
        )
            .into_response(),
    }
}
