//! Partial images a failed block migration left on its destination for a retry.
//!
//! When a live job with local disks fails or is cancelled, the destination agent keeps the
//! images it was filling (if its QEMU quit cleanly, so the files hold every write), and the
//! source's disk keeps a dirty bitmap of what those images lack. The job records each such
//! copy as `target_kept`, with its bitmap. The next migration of the instance:
//! - from the same source to the same destination and datastore takes the image over
//!   ([`take_over`]): the destination reuses it and the source sends only what the bitmap
//!   holds;
//! - to anywhere else has the kept images removed first, like `ferry migration cleanup` of
//!   the failed job ([`remove`]).

use std::collections::HashMap;

use ferry_api::migrations::{Migration, MigrationState};
use uuid::Uuid;

use crate::checks::BlockCopy;
use crate::driver::{log, publish_migration};
use crate::server::AppState;
use crate::store::MigrationFilter;
use crate::ServerError;

/// The disks of `m` that resume from a kept image, each with its bitmap's name. Kept images
/// `m` cannot use are removed (logged on both jobs); the ones it takes over are no longer
/// the earlier job's to remove.
pub async fn take_over(
    state: &AppState,
    m: &Migration,
    copies: &[BlockCopy],
) -> HashMap<String, String> {
    let mut taken = HashMap::new();
    let filter = MigrationFilter {
        instance: Some(m.instance_id),
        ..Default::default()
    };
    let Ok(mut earlier) = state.store.list_migrations(&filter).await else {
        return taken;
    };
    earlier.retain(|o| o.id != m.id);
    earlier.sort_by_key(|o| std::cmp::Reverse(o.created_at));
    // Only the instance's latest migration before this one can hold a copy its bitmap
    // still describes: any later move made the instance's disks change hosts.
    let latest = earlier.first().map(|o| o.id);
    for old in earlier
        .iter()
        .filter(|o| o.copies.iter().any(|c| c.target_kept))
    {
        let usable = Some(old.id) == latest
            && matches!(
                old.state,
                MigrationState::Failed | MigrationState::Cancelled
            )
            && old.source == m.source
            && old.destination == m.destination;
        let mut after = old.copies.clone();
        let mut lines = Vec::new();
        for c in after.iter_mut().filter(|c| c.target_kept) {
            let Some(bitmap) = c.bitmap.clone() else {
                continue;
            };
            let same_target = copies
                .iter()
                .any(|b| b.disk == c.disk && Some(&b.target) == c.target.as_ref());
            if usable && same_target {
                c.target_kept = false;
                lines.push(format!(
                    "disk {}: the partial copy migration {} kept on {} is taken over; only what it lacks is sent",
                    c.disk, old.id, m.destination
                ));
                taken.insert(c.disk.clone(), bitmap);
            }
        }
        if !taken.is_empty() && usable {
            let _ = state.store.set_copies(old.id, &after).await;
            for line in &lines {
                log(state, m.id, "info", line).await;
            }
            log(
                state,
                old.id,
                "info",
                &format!("migration {} resumes from the kept copies", m.id),
            )
            .await;
        }
        let reloaded = match state.store.get_migration(old.id).await {
            Ok(Some(o)) => o,
            _ => continue,
        };
        if reloaded.copies.iter().any(|c| c.target_kept) {
            let message = format!(
                "{} keeps partial copies from migration {} that this one cannot use; they are removed first",
                old.destination, old.id
            );
            log(state, m.id, "info", &message).await;
            if let Err(e) = remove(state, &reloaded, "ferry (a newer migration)").await {
                let message = format!(
                    "the partial copies of migration {} were not removed: {}",
                    old.id, e.body.message
                );
                log(state, m.id, "warn", &message).await;
            }
        }
    }
    taken
}

/// Removes the partial images job `m` kept on its destination (`ferry migration cleanup`,
/// or a newer migration that cannot use them). Idempotent.
pub async fn remove(state: &AppState, m: &Migration, who: &str) -> Result<Migration, ServerError> {
    let images: Vec<_> = m
        .copies
        .iter()
        .filter(|c| c.target_kept)
        .filter_map(|c| c.target.clone())
        .collect();
    if images.is_empty() {
        return Ok(m.clone());
    }
    crate::cold::remove_copies(
        state,
        m,
        &m.destination,
        images,
        who,
        "the partial copies kept",
    )
    .await?;
    let mut copies = m.copies.clone();
    for c in &mut copies {
        c.target_kept = false;
    }
    state.store.set_copies(m.id, &copies).await?;
    let after = state
        .store
        .get_migration(m.id)
        .await?
        .unwrap_or_else(|| m.clone());
    publish_migration(state, &after);
    Ok(after)
}

/// Removes every partial copy the instance's failed migrations kept (the instance is being
/// deleted). Best effort: a job whose removal fails keeps its record, and `ferry migration
/// cleanup ID` finishes it later.
pub async fn remove_all_of(state: &AppState, instance: Uuid, who: &str) {
    let filter = MigrationFilter {
        instance: Some(instance),
        ..Default::default()
    };
    let Ok(jobs) = state.store.list_migrations(&filter).await else {
        return;
    };
    for m in jobs
        .iter()
        .filter(|m| m.copies.iter().any(|c| c.target_kept))
    {
        if let Err(e) = remove(state, m, who).await {
            let message = format!(
                "the partial copies kept on {} were not removed: {}; `ferry migration cleanup {}` removes them",
                m.destination, e.body.message, m.id
            );
            log(state, m.id, "warn", &message).await;
        }
    }
}

/// The bitmap name for a new copy by job `id`: short, and unique per job.
pub fn bitmap_name(id: Uuid) -> String {
    format!("ferry-resume-{}", &id.simple().to_string()[..12])
}
