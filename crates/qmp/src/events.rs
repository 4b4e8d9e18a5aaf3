//! Asynchronous QMP events (`{"event": ..., "data": ..., "timestamp": ...}`).
//!
//! Events are kept as name + raw JSON because QEMU has hundreds of them and adds more in
//! every release; the few the migration engine reacts to get small typed accessors here.

use serde_json::Value;

use crate::commands::{MigrationStatus, RunState};

/// Event name: migration state changed (needs the `events` migration capability).
pub const MIGRATION: &str = "MIGRATION";
/// Event name: a new RAM dirty-sync pass started (needs the `events` capability).
pub const MIGRATION_PASS: &str = "MIGRATION_PASS";
/// Event name: the guest's vCPUs stopped (e.g. at migration switchover).
pub const STOP: &str = "STOP";
/// Event name: the guest's vCPUs resumed.
pub const RESUME: &str = "RESUME";
/// Event name: QEMU is shutting down (guest powerdown, `quit`, signal).
pub const SHUTDOWN: &str = "SHUTDOWN";

/// One asynchronous event as QEMU sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event name, e.g. `MIGRATION`, `STOP`, `SHUTDOWN`.
    pub name: String,
    /// The event's `data` member; `Value::Null` when QEMU sent none (e.g. `STOP`).
    pub data: Value,
    /// QEMU's timestamp in microseconds since the Unix epoch, when QEMU had one. It is
    /// taken in QEMU when the event happened, so it is more precise than our receive time
    /// for measuring, say, downtime between `STOP` and `RESUME`.
    pub timestamp_us: Option<u64>,
}

impl Event {
    /// Builds an event from a QMP message object. Returns `None` when the object is not an
    /// event (no string `event` member), so the caller can treat it as a reply instead.
    pub fn from_json(msg: &serde_json::Map<String, Value>) -> Option<Event> {
        let name = msg.get("event")?.as_str()?.to_string();
        let data = msg.get("data").cloned().unwrap_or(Value::Null);
        let timestamp_us = msg.get("timestamp").and_then(|ts| {
            // QEMU sends {"seconds": -1, "microseconds": -1} when its clock failed.
            let secs = u64::try_from(ts.get("seconds")?.as_i64()?).ok()?;
            let micros = u64::try_from(ts.get("microseconds")?.as_i64()?).ok()?;
            secs.checked_mul(1_000_000)?.checked_add(micros)
        });
        Some(Event {
            name,
            data,
            timestamp_us,
        })
    }

    /// For a `MIGRATION` event, the new migration status; `None` for any other event.
    pub fn migration_status(&self) -> Option<MigrationStatus> {
        if self.name != MIGRATION {
            return None;
        }
        self.data
            .get("status")
            .and_then(Value::as_str)
            .map(MigrationStatus::from_name)
    }

    /// For a `MIGRATION_PASS` event, the dirty-sync pass number; `None` otherwise.
    pub fn migration_pass(&self) -> Option<u64> {
        if self.name != MIGRATION_PASS {
            return None;
        }
        self.data.get("pass").and_then(Value::as_u64)
    }

    /// For a `SHUTDOWN` event, QEMU's reason (`host-qmp-quit`, `guest-shutdown`, ...).
    pub fn shutdown_reason(&self) -> Option<&str> {
        if self.name != SHUTDOWN {
            return None;
        }
        self.data.get("reason").and_then(Value::as_str)
    }

    /// The run state implied by a `STOP`/`RESUME` event, when it is one of those.
    /// `STOP` does not say why the guest stopped, so it maps to [`RunState::Paused`].
    pub fn run_state_hint(&self) -> Option<RunState> {
        match self.name.as_str() {
            STOP => Some(RunState::Paused),
            RESUME => Some(RunState::Running),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(v: Value) -> Event {
        Event::from_json(v.as_object().expect("object")).expect("event")
    }

    #[test]
    fn parses_recorded_events() {
        let e = ev(
            json!({"timestamp": {"seconds": 1795693685, "microseconds": 491247},
                          "event": "MIGRATION", "data": {"status": "active"}}),
        );
        assert_eq!(e.timestamp_us, Some(1_795_693_685_491_247));
        assert_eq!(e.migration_status(), Some(MigrationStatus::Active));
        let e = ev(json!({"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}));
        assert_eq!(e.data, Value::Null);
        assert_eq!(e.run_state_hint(), Some(RunState::Paused));
        let e = ev(json!({"event": "MIGRATION_PASS", "data": {"pass": 2},
                          "timestamp": {"seconds": -1, "microseconds": -1}}));
        assert_eq!(e.migration_pass(), Some(2));
        assert_eq!(e.timestamp_us, None);
        assert!(Event::from_json(json!({"return": {}}).as_object().expect("object")).is_none());
    }
}
