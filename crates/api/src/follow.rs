//! Following one migration job to its end through the server's API: the event stream while
//! it lasts, polling when it breaks or is missing, and the final record from a fresh GET.
//!
//! The CLI draws its progress bar from what this hands over, the benchmarks time a job's
//! phases from it; both need the same guarantee, so it lives here once: a flaky stream can
//! only make the observations coarser, never the result wrong.

use std::time::Duration;

use ferry_migrate::Progress;
use uuid::Uuid;

use crate::migrations::{Event, Migration};
use crate::{ApiClient, ApiError};

/// What [`migration`] saw of the job: a record (a state change, or a poll) or a progress
/// sample.
#[derive(Debug, Clone, Copy)]
pub enum Seen<'a> {
    Record(&'a Migration),
    Sample(&'a Progress),
}

/// Follows migration `id` to its end and returns its final record, handing `observe` every
/// record and sample as it arrives (samples may come twice: as events and inside records), so
/// a caller can draw the job or act at a moment of it without opening a second stream.
/// `observe` runs on the stream's task: it must not block.
pub async fn migration(
    client: &ApiClient,
    id: Uuid,
    mut observe: impl FnMut(Seen<'_>),
) -> Result<Migration, ApiError> {
    let stream = client
        .follow_events(&format!("/v1/migrations/{id}/events"), |event, data| {
            match serde_json::from_str::<Event>(data) {
                Ok(Event::Migration { migration }) => {
                    observe(Seen::Record(&migration));
                    !migration.state.is_terminal()
                }
                Ok(Event::Progress { progress, .. }) => {
                    observe(Seen::Sample(&progress));
                    true
                }
                Ok(_) => true,
                Err(e) => {
                    tracing::debug!(event, error = %e, "undecodable event");
                    true
                }
            }
        })
        .await;
    if let Err(e) = stream {
        tracing::debug!(error = %e, "event stream unavailable; polling");
    }
    loop {
        let m: Migration = client.get(&format!("/v1/migrations/{id}")).await?;
        observe(Seen::Record(&m));
        if m.state.is_terminal() {
            return Ok(m);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
