use chrono::{DateTime, Utc};
use ferry_api::instances::InstanceSpec;
use ferry_api::migrations::{
    DiskCopy, LogLine, Migration, MigrationKind, MigrationOptions, MigrationPlan, MigrationState,
    MigrationStats, Sample,
};
use ferry_api::ErrorBody;
use ferry_migrate::{GuestImpact, Progress, QemuSettings};
use sqlx::sqlite::SqliteRow;
use sqlx::{Sqlite, Transaction};
use uuid::Uuid;

use super::{
    col, insert_with_seq, is_foreign_key_violation, is_unique_violation, json_col, ms, now,
    opt_json_col, opt_time_col, time_col, to_json, u64_col, uuid_col, Store, StoreError,
    ACTIVE_STATES_SQL, TERMINAL_STATES_SQL,
};

/// A migration job to queue; the store adds the state (Pending) and timestamps.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMigration {
    pub id: Uuid,
    pub instance_id: Uuid,
    pub kind: MigrationKind,
    pub source: String,
    pub destination: String,
    pub options: MigrationOptions,
}

/// Which migrations [`Store::list_migrations`] returns; every set field narrows the list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MigrationFilter {
    pub state: Option<MigrationState>,
    pub instance: Option<Uuid>,
    /// Migrations from or to this host.
    pub host: Option<String>,
    /// Only migrations holding a concurrency slot (Preparing, Migrating, Completing).
    pub active_only: bool,
    /// At most this many (the newest).
    pub limit: Option<u32>,
}

fn kind_str(kind: MigrationKind) -> &'static str {
    match kind {
        MigrationKind::Live => "live",
        MigrationKind::Cold => "cold",
    }
}

fn parse_kind(s: &str) -> Option<MigrationKind> {
    [MigrationKind::Live, MigrationKind::Cold]
        .into_iter()
        .find(|k| kind_str(*k) == s)
}

/// The instance name comes from the live instance row when it still exists (so it is right
/// whatever happened to the instance), else from the snapshot taken at creation.
const MIGRATION_SELECT: &str = "SELECT m.id, m.instance_id,
        COALESCE(i.name, m.instance_name) AS instance_name, m.kind, m.source, m.destination,
        m.state, m.options, m.created_at, m.preparing_at, m.migrating_at, m.completing_at,
        m.finished_at, m.error, m.progress, m.stats, m.cancel_requested, m.plan, m.copies,
        m.cleaned_up_at, m.impact, m.qemu_settings
    FROM migrations m LEFT JOIN instances i ON i.id = m.instance_id";

/// Moves the migration's instance to the destination and bumps its generation, unless it is
/// already there (which makes the move idempotent). `$1` is the migration id, `$2` the time.
const MOVE_INSTANCE_SQL: &str = "UPDATE instances SET
        host = (SELECT m.destination FROM migrations m WHERE m.id = $1),
        spec = COALESCE((SELECT m.dest_spec FROM migrations m WHERE m.id = $1), spec),
        generation = generation + 1,
        updated_at = $2
    WHERE id = (SELECT m.instance_id FROM migrations m WHERE m.id = $1)
      AND host <> (SELECT m.destination FROM migrations m WHERE m.id = $1)";

fn migration_from_row(row: &SqliteRow) -> Result<Migration, StoreError> {
    let kind: String = col(row, "kind")?;
    let state: String = col(row, "state")?;
    Ok(Migration {
        id: uuid_col(row, "id")?,
        instance_id: uuid_col(row, "instance_id")?,
        instance_name: col(row, "instance_name")?,
        kind: parse_kind(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("column kind: unknown value {kind:?}")))?,
        source: col(row, "source")?,
        destination: col(row, "destination")?,
        state: MigrationState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("column state: unknown value {state:?}")))?,
        options: json_col::<MigrationOptions>(row, "options")?,
        created_at: time_col(row, "created_at")?,
        preparing_at: opt_time_col(row, "preparing_at")?,
        migrating_at: opt_time_col(row, "migrating_at")?,
        completing_at: opt_time_col(row, "completing_at")?,
        finished_at: opt_time_col(row, "finished_at")?,
        error: opt_json_col::<ErrorBody>(row, "error")?,
        progress: opt_json_col::<Progress>(row, "progress")?,
        stats: opt_json_col::<MigrationStats>(row, "stats")?,
        cancel_requested: col(row, "cancel_requested")?,
        plan: opt_json_col::<MigrationPlan>(row, "plan")?,
        copies: opt_json_col::<Vec<DiskCopy>>(row, "copies")?.unwrap_or_default(),
        cleaned_up_at: opt_time_col(row, "cleaned_up_at")?,
        impact: opt_json_col::<GuestImpact>(row, "impact")?,
        qemu_settings: opt_json_col::<QemuSettings>(row, "qemu_settings")?,
    })
}

/// A progress sample ready to store. Non-finite rates (a division by a zero interval) would
/// be written by serde_json as `null` and then fail to read back, so they become 0.
fn progress_json(progress: &Progress) -> Result<String, StoreError> {
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    let clean = Progress {
        percent: finite(progress.percent),
        throughput_bps: finite(progress.throughput_bps),
        dirty_rate_bps: finite(progress.dirty_rate_bps),
        ..progress.clone()
    };
    to_json(&clean, "progress")
}

async fn fetch_in(
    tx: &mut Transaction<'_, Sqlite>,
    id: Uuid,
) -> Result<Option<Migration>, StoreError> {
    let row = sqlx::query(&format!("{MIGRATION_SELECT} WHERE m.id = $1"))
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    row.as_ref().map(migration_from_row).transpose()
}

async fn fetch_existing_in(
    tx: &mut Transaction<'_, Sqlite>,
    id: Uuid,
) -> Result<Migration, StoreError> {
    fetch_in(tx, id)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("migration {id}")))
}

impl Store {
    /// Queues a migration job (state Pending).
    ///
    /// Checked and inserted in one statement, so no second unfinished job for the same
    /// instance can slip in: [`StoreError::Conflict`] if the instance already has one (or the
    /// id is taken), [`StoreError::NotFound`] if the instance or a host does not exist.
    pub async fn insert_migration(&self, m: &NewMigration) -> Result<Migration, StoreError> {
        let options = to_json(&m.options, "migration options")?;
        let instance_id = m.instance_id.to_string();
        let mut tx = self.write_tx().await?;
        let inserted = sqlx::query(&format!(
            "INSERT INTO migrations (id, seq, instance_id, instance_name, kind, source,
                                     destination, state, options, created_at, cancel_requested)
             SELECT $1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM migrations), i.id, i.name,
                    $3, $4, $5, 'pending', $6, $7, $8
               FROM instances i
              WHERE i.id = $2
                AND NOT EXISTS (SELECT 1 FROM migrations o
                                 WHERE o.instance_id = $2
                                   AND o.state NOT IN {TERMINAL_STATES_SQL})"
        ))
        .bind(m.id.to_string())
        .bind(&instance_id)
        .bind(kind_str(m.kind))
        .bind(&m.source)
        .bind(&m.destination)
        .bind(&options)
        .bind(ms(now()))
        .bind(false)
        .execute(&mut *tx)
        .await;
        let inserted = match inserted {
            Ok(done) => done.rows_affected(),
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::conflict(
                    super::error::codes::MIGRATION_IN_PROGRESS,
                    format!(
                        "migration {} exists or instance {} already has one in flight",
                        m.id, m.instance_id
                    ),
                ))
            }
            Err(e) if is_foreign_key_violation(&e) => {
                return Err(StoreError::NotFound(format!(
                    "host {} or {}",
                    m.source, m.destination
                )))
            }
            Err(e) => return Err(e.into()),
        };
        if inserted == 0 {
            let open = sqlx::query(&format!(
                "SELECT m.id, m.state FROM migrations m
                  WHERE m.instance_id = $1 AND m.state NOT IN {TERMINAL_STATES_SQL}"
            ))
            .bind(&instance_id)
            .fetch_optional(&mut *tx)
            .await?;
            tx.rollback().await?;
            return Err(match open {
                Some(row) => {
                    let other: String = col(&row, "id")?;
                    let state: String = col(&row, "state")?;
                    StoreError::conflict(
                        super::error::codes::MIGRATION_IN_PROGRESS,
                        format!(
                            "instance {} already has migration {other} ({state})",
                            m.instance_id
                        ),
                    )
                }
                None => StoreError::NotFound(format!("instance {}", m.instance_id)),
            });
        }
        let created = fetch_existing_in(&mut tx, m.id).await?;
        tx.commit().await?;
        Ok(created)
    }

    /// One migration job.
    pub async fn get_migration(&self, id: Uuid) -> Result<Option<Migration>, StoreError> {
        let row = sqlx::query(&format!("{MIGRATION_SELECT} WHERE m.id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(migration_from_row).transpose()
    }

    /// Migration jobs matching `filter`, newest first.
    pub async fn list_migrations(
        &self,
        filter: &MigrationFilter,
    ) -> Result<Vec<Migration>, StoreError> {
        let mut sql = format!("{MIGRATION_SELECT} WHERE 1 = 1");
        let mut binds: Vec<String> = Vec::new();
        if let Some(state) = filter.state {
            binds.push(state.as_str().to_string());
            sql.push_str(&format!(" AND m.state = ${}", binds.len()));
        }
        if let Some(instance) = filter.instance {
            binds.push(instance.to_string());
            sql.push_str(&format!(" AND m.instance_id = ${}", binds.len()));
        }
        if let Some(host) = &filter.host {
            binds.push(host.clone());
            let n = binds.len();
            sql.push_str(&format!(" AND (m.source = ${n} OR m.destination = ${n})"));
        }
        if filter.active_only {
            sql.push_str(&format!(" AND m.state IN {ACTIVE_STATES_SQL}"));
        }
        sql.push_str(" ORDER BY m.seq DESC");
        if filter.limit.is_some() {
            sql.push_str(&format!(" LIMIT ${}", binds.len() + 1));
        }
        let mut query = sqlx::query(&sql);
        for b in &binds {
            query = query.bind(b.as_str());
        }
        if let Some(limit) = filter.limit {
            query = query.bind(i64::from(limit));
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(migration_from_row).collect()
    }

    /// Jobs holding a concurrency slot (Preparing, Migrating, Completing): what the
    /// scheduler counts, the checks see as load, and a restarted server re-attaches to.
    pub async fn active_migrations(&self) -> Result<Vec<Migration>, StoreError> {
        self.list_migrations(&MigrationFilter {
            active_only: true,
            ..Default::default()
        })
        .await
    }

    /// The queue: Pending jobs, oldest first, so the scheduler starts them in the order
    /// users asked.
    pub async fn pending_in_order(&self) -> Result<Vec<Migration>, StoreError> {
        let rows = sqlx::query(&format!(
            "{MIGRATION_SELECT} WHERE m.state = $1 ORDER BY m.seq"
        ))
        .bind(MigrationState::Pending.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(migration_from_row).collect()
    }

    /// Moves a job to `state`, stamping when it entered it (`preparing_at`, `migrating_at`,
    /// `completing_at` the first time; `finished_at` for Completed, Failed, Cancelled) and
    /// keeping `error` if given (an earlier error is kept otherwise).
    ///
    /// An ended job never changes again: [`StoreError::InvalidTransition`], except that
    /// setting the state it already has is a no-op (so a retried call succeeds). Other
    /// ordering rules belong to the scheduler. Use [`Store::complete_migration`] for
    /// Completed, which also moves the instance.
    pub async fn set_migration_state(
        &self,
        id: Uuid,
        state: MigrationState,
        error: Option<&ErrorBody>,
    ) -> Result<Migration, StoreError> {
        let stamp = match state {
            MigrationState::Pending => "",
            MigrationState::Preparing => ", preparing_at = COALESCE(preparing_at, $4)",
            MigrationState::Migrating => ", migrating_at = COALESCE(migrating_at, $4)",
            MigrationState::Completing => ", completing_at = COALESCE(completing_at, $4)",
            MigrationState::Completed | MigrationState::Failed | MigrationState::Cancelled => {
                ", finished_at = $4"
            }
        };
        let error = error.map(|e| to_json(e, "migration error")).transpose()?;
        let mut tx = self.write_tx().await?;
        let sql = format!(
            "UPDATE migrations SET state = $2, error = COALESCE($3, error){stamp}
              WHERE id = $1 AND state NOT IN {TERMINAL_STATES_SQL}"
        );
        let mut update = sqlx::query(&sql)
            .bind(id.to_string())
            .bind(state.as_str())
            .bind(error);
        // Every bound parameter must appear in the statement (PostgreSQL insists), so the
        // time is bound only when a timestamp column is set.
        if !stamp.is_empty() {
            update = update.bind(ms(now()));
        }
        let done = update.execute(&mut *tx).await?;
        let current = fetch_existing_in(&mut tx, id).await?;
        if done.rows_affected() == 0 && current.state != state {
            tx.rollback().await?;
            return Err(StoreError::InvalidTransition {
                from: current.state,
                to: state,
            });
        }
        tx.commit().await?;
        Ok(current)
    }

    /// Marks that a user asked to cancel; the scheduler acts on it. Repeating is harmless.
    /// [`StoreError::InvalidTransition`] (to Cancelled) if the job already ended.
    pub async fn set_cancel_requested(&self, id: Uuid) -> Result<Migration, StoreError> {
        let mut tx = self.write_tx().await?;
        let done = sqlx::query(&format!(
            "UPDATE migrations SET cancel_requested = $2
              WHERE id = $1 AND state NOT IN {TERMINAL_STATES_SQL}"
        ))
        .bind(id.to_string())
        .bind(true)
        .execute(&mut *tx)
        .await?;
        let current = fetch_existing_in(&mut tx, id).await?;
        if done.rows_affected() == 0 {
            tx.rollback().await?;
            return Err(StoreError::InvalidTransition {
                from: current.state,
                to: MigrationState::Cancelled,
            });
        }
        tx.commit().await?;
        Ok(current)
    }

    /// Records new options of a job that has not ended (a pacing change while it runs).
    pub async fn set_options(
        &self,
        id: Uuid,
        options: &MigrationOptions,
    ) -> Result<Migration, StoreError> {
        let json = serde_json::to_string(options)
            .map_err(|e| StoreError::Corrupt(format!("options: {e}")))?;
        let done = sqlx::query(&format!(
            "UPDATE migrations SET options = $2 WHERE id = $1 AND state NOT IN {TERMINAL_STATES_SQL}"
        ))
        .bind(id.to_string())
        .bind(json)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("open migration {id}")));
        }
        self.get_migration(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("migration {id}")))
    }

    /// Records what the migration cost the guest so far.
    pub async fn set_impact(&self, id: Uuid, impact: &GuestImpact) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE migrations SET impact = $2 WHERE id = $1")
            .bind(id.to_string())
            .bind(to_json(impact, "guest impact")?)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("migration {id}")));
        }
        Ok(())
    }

    /// Records the instance's spec as it will be on the destination (block migration: local
    /// disks on the destination's datastores); the commit writes it into the instance in the
    /// same statement that moves it.
    pub async fn set_dest_spec(&self, id: Uuid, spec: &InstanceSpec) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE migrations SET dest_spec = $2 WHERE id = $1")
            .bind(id.to_string())
            .bind(to_json(spec, "destination spec")?)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("migration {id}")));
        }
        Ok(())
    }

    /// Gives the instance of a migration whose commit is undone back to the source, with the
    /// spec it had there (generation + 1).
    pub async fn move_instance_back(
        &self,
        id: Uuid,
        host: &str,
        spec: &InstanceSpec,
    ) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE instances SET host = $2, spec = $3, generation = generation + 1,
                    updated_at = $4
              WHERE id = $1",
        )
        .bind(id.to_string())
        .bind(host)
        .bind(to_json(spec, "instance spec")?)
        .bind(ms(now()))
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("instance {id}")));
        }
        Ok(())
    }

    /// Records the disk copies of a cold migration (their progress, checksums, and whether the
    /// source copies are kept). Rates that are not finite are stored as 0, like progress.
    pub async fn set_copies(&self, id: Uuid, copies: &[DiskCopy]) -> Result<(), StoreError> {
        let clean: Vec<DiskCopy> = copies
            .iter()
            .map(|c| DiskCopy {
                rate_bps: if c.rate_bps.is_finite() {
                    c.rate_bps
                } else {
                    0.0
                },
                ..c.clone()
            })
            .collect();
        let done = sqlx::query("UPDATE migrations SET copies = $2 WHERE id = $1")
            .bind(id.to_string())
            .bind(to_json(&clean, "disk copies")?)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("migration {id}")));
        }
        Ok(())
    }

    /// Records that the source copies of a completed migration were removed: every copy's
    /// `source_kept` becomes false and `cleaned_up_at` is set, once (a repeat keeps the first
    /// time). Returns the job.
    pub async fn mark_cleaned_up(&self, id: Uuid) -> Result<Migration, StoreError> {
        let mut tx = self.write_tx().await?;
        let current = fetch_existing_in(&mut tx, id).await?;
        let copies: Vec<DiskCopy> = current
            .copies
            .iter()
            .map(|c| DiskCopy {
                source_kept: false,
                ..c.clone()
            })
            .collect();
        sqlx::query(
            "UPDATE migrations SET copies = $2, cleaned_up_at = COALESCE(cleaned_up_at, $3)
              WHERE id = $1",
        )
        .bind(id.to_string())
        .bind(to_json(&copies, "disk copies")?)
        .bind(ms(now()))
        .execute(&mut *tx)
        .await?;
        let updated = fetch_existing_in(&mut tx, id).await?;
        tx.commit().await?;
        Ok(updated)
    }

    /// Completed migrations that finished before `before` and still keep source copies: what
    /// the automatic cleanup removes.
    pub async fn cleanups_due(&self, before: DateTime<Utc>) -> Result<Vec<Migration>, StoreError> {
        let rows = sqlx::query(&format!(
            "{MIGRATION_SELECT} WHERE m.state = $1 AND m.copies IS NOT NULL
                AND m.cleaned_up_at IS NULL AND m.finished_at <= $2 ORDER BY m.seq"
        ))
        .bind(MigrationState::Completed.as_str())
        .bind(ms(before))
        .fetch_all(&self.pool)
        .await?;
        let all: Vec<Migration> = rows
            .iter()
            .map(migration_from_row)
            .collect::<Result<_, _>>()?;
        Ok(all
            .into_iter()
            .filter(|m| m.copies.iter().any(|c| c.source_kept))
            .collect())
    }

    /// Keeps the latest progress sample on the job, for listings and for clients that
    /// connect mid-migration.
    /// Records the migration settings the source QEMU runs the job with, as read back from it.
    pub async fn set_qemu_settings(
        &self,
        id: Uuid,
        settings: &QemuSettings,
    ) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE migrations SET qemu_settings = $2 WHERE id = $1")
            .bind(id.to_string())
            .bind(to_json(settings, "qemu_settings")?)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("migration {id}")));
        }
        Ok(())
    }

    /// Records the plan the auto policy made for the job, and the parameters it chose.
    pub async fn set_plan(&self, id: Uuid, plan: &MigrationPlan) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE migrations SET plan = $2 WHERE id = $1")
            .bind(id.to_string())
            .bind(to_json(plan, "plan")?)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("migration {id}")));
        }
        Ok(())
    }

    pub async fn set_progress(&self, id: Uuid, progress: &Progress) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE migrations SET progress = $2 WHERE id = $1")
            .bind(id.to_string())
            .bind(progress_json(progress)?)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("migration {id}")));
        }
        Ok(())
    }

    /// Appends a sample to the job's progress history (for charts after the fact).
    pub async fn add_sample(&self, id: Uuid, progress: &Progress) -> Result<(), StoreError> {
        let id_text = id.to_string();
        let json = progress_json(progress)?;
        let at = ms(now());
        insert_with_seq(|| {
            sqlx::query(
                "INSERT INTO migration_samples (migration_id, seq, at, progress)
                 SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3
                   FROM migration_samples WHERE migration_id = $1",
            )
            .bind(id_text.as_str())
            .bind(at)
            .bind(json.as_str())
            .execute(&self.pool)
        })
        .await
        .map_err(|e| not_found_if_fk(e, id))
    }

    /// The job's progress history, oldest first.
    pub async fn samples(&self, id: Uuid) -> Result<Vec<Progress>, StoreError> {
        let rows = sqlx::query(
            "SELECT progress FROM migration_samples WHERE migration_id = $1 ORDER BY seq",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| json_col(r, "progress")).collect()
    }

    /// Up to `limit` samples of the job's history with `seq` above `after`, oldest first,
    /// with their sequence numbers and times: the pages `GET /v1/migrations/{id}/samples`
    /// serves, so a chart opened late gets the job's whole course without one unbounded read.
    pub async fn samples_page(
        &self,
        id: Uuid,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Sample>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, progress FROM migration_samples
              WHERE migration_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(id.to_string())
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Sample {
                    seq: u64_col(r, "seq")?,
                    at: time_col(r, "at")?,
                    progress: json_col(r, "progress")?,
                })
            })
            .collect()
    }

    /// Records what QEMU measured at the end of the job.
    pub async fn set_stats(&self, id: Uuid, stats: &MigrationStats) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE migrations SET stats = $2 WHERE id = $1")
            .bind(id.to_string())
            .bind(to_json(stats, "migration stats")?)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("migration {id}")));
        }
        Ok(())
    }

    /// Switchover is final: in ONE transaction, the job becomes Completed (finished_at, and
    /// `stats` if given) and the instance moves (host = destination, generation + 1), so no
    /// crash can leave a completed job with the instance recorded on the source, or the
    /// reverse.
    ///
    /// If [`Store::move_instance_for`] already moved the instance, it is not moved again.
    /// Completing an already Completed job returns it unchanged; a Failed or Cancelled one is
    /// [`StoreError::InvalidTransition`].
    pub async fn complete_migration(
        &self,
        id: Uuid,
        stats: Option<&MigrationStats>,
    ) -> Result<Migration, StoreError> {
        let stats = stats.map(|s| to_json(s, "migration stats")).transpose()?;
        let at = ms(now());
        let mut tx = self.write_tx().await?;
        let done = sqlx::query(&format!(
            "UPDATE migrations SET state = $2, finished_at = $3, stats = COALESCE($4, stats)
              WHERE id = $1 AND state NOT IN {TERMINAL_STATES_SQL}"
        ))
        .bind(id.to_string())
        .bind(MigrationState::Completed.as_str())
        .bind(at)
        .bind(stats)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            let current = fetch_existing_in(&mut tx, id).await?;
            tx.rollback().await?;
            return match current.state {
                MigrationState::Completed => Ok(current),
                from => Err(StoreError::InvalidTransition {
                    from,
                    to: MigrationState::Completed,
                }),
            };
        }
        sqlx::query(MOVE_INSTANCE_SQL)
            .bind(id.to_string())
            .bind(at)
            .execute(&mut *tx)
            .await?;
        let completed = fetch_existing_in(&mut tx, id).await?;
        tx.commit().await?;
        Ok(completed)
    }

    /// For a job found in Completing after a crash: records that the instance now lives on
    /// the destination (host = destination, generation + 1) without finishing the job.
    ///
    /// Idempotent: does nothing if the instance is already on the destination.
    /// [`StoreError::Conflict`] for a Failed or Cancelled job (its instance stayed on the
    /// source), [`StoreError::NotFound`] for an unknown job.
    pub async fn move_instance_for(&self, id: Uuid) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        sqlx::query(&format!(
            "{MOVE_INSTANCE_SQL}
               AND EXISTS (SELECT 1 FROM migrations m
                            WHERE m.id = $1 AND m.state NOT IN ('failed', 'cancelled'))"
        ))
        .bind(id.to_string())
        .bind(ms(now()))
        .execute(&mut *tx)
        .await?;
        let current = fetch_existing_in(&mut tx, id).await?;
        if matches!(
            current.state,
            MigrationState::Failed | MigrationState::Cancelled
        ) {
            tx.rollback().await?;
            return Err(StoreError::conflict(
                "migration-ended",
                format!(
                    "migration {id} is {}; its instance stays on {}",
                    current.state.as_str(),
                    current.source
                ),
            ));
        }
        tx.commit().await?;
        Ok(())
    }

    /// Appends a line to the job's log (what Ferry did, what QEMU said). Lines are numbered
    /// from 1 per job.
    pub async fn add_log(&self, id: Uuid, level: &str, message: &str) -> Result<(), StoreError> {
        let id_text = id.to_string();
        let at = ms(now());
        insert_with_seq(|| {
            sqlx::query(
                "INSERT INTO migration_logs (migration_id, seq, at, level, message)
                 SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3, $4
                   FROM migration_logs WHERE migration_id = $1",
            )
            .bind(id_text.as_str())
            .bind(at)
            .bind(level)
            .bind(message)
            .execute(&self.pool)
        })
        .await
        .map_err(|e| not_found_if_fk(e, id))
    }

    /// The job's log, in order.
    pub async fn logs(&self, id: Uuid) -> Result<Vec<LogLine>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, level, message FROM migration_logs
              WHERE migration_id = $1 ORDER BY seq",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(LogLine {
                    seq: u64_col(r, "seq")?,
                    at: time_col(r, "at")?,
                    level: col(r, "level")?,
                    message: col(r, "message")?,
                })
            })
            .collect()
    }
}

/// A history row for a job that does not exist violates the foreign key: say which job.
fn not_found_if_fk(e: sqlx::Error, id: Uuid) -> StoreError {
    if is_foreign_key_violation(&e) {
        StoreError::NotFound(format!("migration {id}"))
    } else {
        StoreError::Db(e)
    }
}
