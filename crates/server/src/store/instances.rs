use ferry_api::instances::{Instance, InstanceSpec, InstanceState};
use sqlx::sqlite::SqliteRow;
use uuid::Uuid;

use super::{
    col, is_foreign_key_violation, is_unique_violation, json_col, ms, now, time_col, to_json,
    u64_col, uuid_col, Store, StoreError, TERMINAL_STATES_SQL,
};

/// The name stored for an instance state (the same as its JSON form).
pub(super) fn instance_state_str(state: InstanceState) -> &'static str {
    state.as_str()
}

fn parse_instance_state(s: &str) -> Option<InstanceState> {
    InstanceState::parse(s)
}

/// Instances with their unfinished migration (at most one, by the partial unique index).
fn instance_select() -> String {
    format!(
        "SELECT i.id, i.name, i.host, i.state, i.generation, i.spec, i.created_at, i.updated_at,
            (SELECT MAX(m.id) FROM migrations m
              WHERE m.instance_id = i.id AND m.state NOT IN {TERMINAL_STATES_SQL}) AS migration
         FROM instances i"
    )
}

fn instance_from_row(row: &SqliteRow) -> Result<Instance, StoreError> {
    let state: String = col(row, "state")?;
    let migration: Option<String> = col(row, "migration")?;
    Ok(Instance {
        id: uuid_col(row, "id")?,
        name: col(row, "name")?,
        host: col(row, "host")?,
        state: parse_instance_state(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("column state: unknown value {state:?}")))?,
        generation: u64_col(row, "generation")?,
        spec: json_col::<InstanceSpec>(row, "spec")?,
        migration: migration
            .map(|m| {
                Uuid::parse_str(&m)
                    .map_err(|_| StoreError::Corrupt(format!("column migration: bad uuid {m:?}")))
            })
            .transpose()?,
        guest: None,
        warnings: Vec::new(),
        created_at: time_col(row, "created_at")?,
        updated_at: time_col(row, "updated_at")?,
    })
}

impl Store {
    /// Records a new instance on `host`, generation 0.
    ///
    /// Names are unique across the fleet (users address instances by name):
    /// [`StoreError::Conflict`] on a duplicate name or id, [`StoreError::NotFound`] if the
    /// host never joined.
    pub async fn insert_instance(
        &self,
        id: Uuid,
        name: &str,
        host: &str,
        spec: &InstanceSpec,
        state: InstanceState,
    ) -> Result<Instance, StoreError> {
        let at = now();
        sqlx::query(
            "INSERT INTO instances (id, name, host, state, generation, spec, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
        )
        .bind(id.to_string())
        .bind(name)
        .bind(host)
        .bind(instance_state_str(state))
        .bind(0i64)
        .bind(to_json(spec, "instance spec")?)
        .bind(ms(at))
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::conflict(
                    super::error::codes::INSTANCE_EXISTS,
                    format!("an instance named {name} (or with id {id}) exists"),
                )
            } else if is_foreign_key_violation(&e) {
                StoreError::NotFound(format!("host {host}"))
            } else {
                StoreError::Db(e)
            }
        })?;
        Ok(Instance {
            id,
            name: name.to_string(),
            host: host.to_string(),
            state,
            generation: 0,
            spec: spec.clone(),
            migration: None,
            guest: None,
            warnings: Vec::new(),
            created_at: at,
            updated_at: at,
        })
    }

    /// An instance by id (any UUID spelling) or by name; an id match wins over a name match.
    pub async fn get_instance(&self, id_or_name: &str) -> Result<Option<Instance>, StoreError> {
        let id = Uuid::parse_str(id_or_name)
            .map(|u| u.to_string())
            .unwrap_or_default();
        let row = sqlx::query(&format!(
            "{} WHERE i.id = $2 OR i.name = $1
             ORDER BY CASE WHEN i.id = $2 THEN 0 ELSE 1 END LIMIT 1",
            instance_select()
        ))
        .bind(id_or_name)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(instance_from_row).transpose()
    }

    /// All instances by name, or those on one host.
    pub async fn list_instances(&self, host: Option<&str>) -> Result<Vec<Instance>, StoreError> {
        let rows = match host {
            Some(host) => {
                sqlx::query(&format!(
                    "{} WHERE i.host = $1 ORDER BY i.name",
                    instance_select()
                ))
                .bind(host)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!("{} ORDER BY i.name", instance_select()))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(instance_from_row).collect()
    }

    /// Records what the instance is doing (as reported by its host's agent).
    /// [`StoreError::NotFound`] if it does not exist.
    pub async fn set_instance_state(
        &self,
        id: Uuid,
        state: InstanceState,
    ) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE instances SET state = $2, updated_at = $3 WHERE id = $1")
            .bind(id.to_string())
            .bind(instance_state_str(state))
            .bind(ms(now()))
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("instance {id}")));
        }
        Ok(())
    }

    /// Replaces the instance's spec: for what Ferry itself writes after creation (the disks it
    /// created or copied), never for a user's change of a defined instance.
    /// [`StoreError::NotFound`] if it does not exist.
    pub async fn set_instance_spec(&self, id: Uuid, spec: &InstanceSpec) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE instances SET spec = $2, updated_at = $3 WHERE id = $1")
            .bind(id.to_string())
            .bind(to_json(spec, "instance spec")?)
            .bind(ms(now()))
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("instance {id}")));
        }
        Ok(())
    }

    /// Moves the record to the host the agents report running the guest (generation + 1):
    /// the correction of a record that did not follow the truth.
    pub async fn move_instance_to(&self, id: Uuid, host: &str) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE instances SET host = $2, generation = generation + 1, updated_at = $3
              WHERE id = $1 AND host <> $2",
        )
        .bind(id.to_string())
        .bind(host)
        .bind(ms(now()))
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 && self.get_instance(&id.to_string()).await?.is_none() {
            return Err(StoreError::NotFound(format!("instance {id}")));
        }
        Ok(())
    }

    /// Forgets an instance. Its finished migrations stay in the history (named by the
    /// snapshot taken when they were created).
    ///
    /// [`StoreError::Conflict`] while a migration of it is unfinished (deleting it would
    /// orphan a running job), [`StoreError::NotFound`] if it does not exist.
    pub async fn delete_instance(&self, id: Uuid) -> Result<(), StoreError> {
        let id_text = id.to_string();
        let mut tx = self.write_tx().await?;
        let done = sqlx::query(&format!(
            "DELETE FROM instances WHERE id = $1 AND NOT EXISTS (
                 SELECT 1 FROM migrations m
                  WHERE m.instance_id = $1 AND m.state NOT IN {TERMINAL_STATES_SQL})"
        ))
        .bind(&id_text)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            let exists = sqlx::query("SELECT id FROM instances WHERE id = $1")
                .bind(&id_text)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
            tx.rollback().await?;
            return Err(if exists {
                StoreError::conflict(
                    super::error::codes::MIGRATION_IN_PROGRESS,
                    format!("instance {id} has a migration in flight"),
                )
            } else {
                StoreError::NotFound(format!("instance {id}"))
            });
        }
        tx.commit().await?;
        Ok(())
    }
}
