//! Values for the server's unit tests.

use chrono::Utc;
use ferry_api::migrations::{Migration, MigrationKind, MigrationOptions, MigrationState};
use uuid::Uuid;

/// A pending live job `src` -> `dst` of a fresh instance, created now, with nothing else set.
pub(crate) fn migration(src: &str, dst: &str) -> Migration {
    Migration {
        id: Uuid::new_v4(),
        instance_id: Uuid::new_v4(),
        instance_name: "vm".into(),
        kind: MigrationKind::Live,
        source: src.into(),
        destination: dst.into(),
        state: MigrationState::Pending,
        options: MigrationOptions::default(),
        created_at: Utc::now(),
        preparing_at: None,
        migrating_at: None,
        completing_at: None,
        finished_at: None,
        error: None,
        progress: None,
        stats: None,
        cancel_requested: false,
        copies: vec![],
        cleaned_up_at: None,
        impact: None,
        qemu_settings: None,
        plan: None,
    }
}
