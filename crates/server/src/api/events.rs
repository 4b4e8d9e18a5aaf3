//! Server-Sent Events: the whole cluster, or one migration until it ends.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use ferry_api::migrations::Event;
use futures_util::stream::{self, Stream, StreamExt};
use tokio_stream::wrappers::BroadcastStream;
use uuid::Uuid;

use crate::auth::Reader;
use crate::server::AppState;
use crate::ServerError;

fn to_sse(e: &Event) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default()
        .event(e.kind())
        .data(serde_json::to_string(e).unwrap_or_default()))
}

/// Every event of the cluster, as it happens.
#[utoipa::path(get, path = "/v1/events", responses((status = 200, description = "text/event-stream of Event")))]
pub async fn cluster_events(
    State(state): State<AppState>,
    _r: Reader,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let stream = BroadcastStream::new(state.events.subscribe())
        .filter_map(|e| async move { e.ok() })
        .map(|e| to_sse(&e));
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
}

/// One migration's state changes and progress samples: first its current record, then live
/// events; the stream ends after the terminal state.
#[utoipa::path(get, path = "/v1/migrations/{id}/events", params(("id" = String, Path, description = "migration id (UUID)")), responses((status = 200, description = "text/event-stream of Event"), (status = 404, description = "no such migration", body = ferry_api::ErrorBody)))]
pub async fn migration_events(
    State(state): State<AppState>,
    _r: Reader,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ServerError> {
    let uuid = Uuid::parse_str(&id).map_err(|_| ServerError::not_found("migration", &id))?;
    // Subscribe before reading the record, so no change falls between the two.
    let live = BroadcastStream::new(state.events.subscribe());
    let current = state
        .store
        .get_migration(uuid)
        .await?
        .ok_or_else(|| ServerError::not_found("migration", &id))?;
    let first = Event::Migration {
        migration: Box::new(current.clone()),
    };
    let done_already = current.state.is_terminal();
    let live = live
        .filter_map(move |e| async move { e.ok().filter(|e| e.migration_id() == Some(uuid)) })
        .take_while(|e| {
            let more =
                !matches!(e, Event::Migration { migration } if migration.state.is_terminal());
            async move { more }
        });
    let terminal = futures_util::stream::once(async move {
        // take_while drops the terminal event itself; the final record is sent here.
        state.store.get_migration(uuid).await.ok().flatten()
    })
    .filter_map(|m| async move {
        m.map(|m| Event::Migration {
            migration: Box::new(m),
        })
    });
    let tail = if done_already {
        stream::empty().boxed()
    } else {
        live.chain(terminal).boxed()
    };
    let stream = stream::once(async move { first })
        .chain(tail)
        .map(|e| to_sse(&e));
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(10))))
}
