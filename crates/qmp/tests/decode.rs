//! Replies recorded from QEMU 7.2.22 (Debian 12) decode into the typed outputs.

use ferry_qmp::*;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn recorded<T: DeserializeOwned>(name: &str) -> T {
    let path = format!("{}/tests/recorded/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    let mut reply: Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(reply["return"].take()).unwrap()
}

#[test]
fn query_migrate_capabilities_7_2() {
    let caps: Vec<CapabilityState> = recorded("query-migrate-capabilities.json");
    assert_eq!(caps.len(), 21);
    // `compress` is the one the qapi crate (9.1 schema) chokes on.
    assert!(caps.iter().any(|c| c.capability == "compress" && !c.state));
    assert!(caps
        .iter()
        .any(|c| c.capability == capability::POSTCOPY_RAM));
    assert!(caps.iter().all(|c| !c.state));
}

#[test]
fn query_migrate_parameters_7_2() {
    let p: MigrationParameters = recorded("query-migrate-parameters.json");
    // QEMU's defaults, see LAB-NOTES: 128 MiB/s and 300 ms.
    assert_eq!(p.max_bandwidth, Some(134_217_728));
    assert_eq!(p.downtime_limit, Some(300));
    assert_eq!(p.multifd_channels, Some(2));
    assert_eq!(p.multifd_compression.as_deref(), Some("none"));
    assert_eq!(p.xbzrle_cache_size, Some(67_108_864));
    assert_eq!(p.tls_creds.as_deref(), Some(""));
    assert_eq!(p.cpu_throttle_tailslow, Some(false));
    assert_eq!(p.announce_rounds, Some(5));
    assert!(
        p.extra.is_empty(),
        "unmodelled 7.2 parameters: {:?}",
        p.extra
    );
    // Copying to a set command keeps every modelled value.
    let set = serde_json::to_value(p.to_set()).unwrap();
    assert_eq!(set["downtime-limit"], 300);
    assert_eq!(set["x-checkpoint-delay"], 20000);
}

#[test]
fn query_migrate_completed_and_cancelled_7_2() {
    let m: MigrationInfo = recorded("query-migrate-completed.json");
    assert_eq!(m.status, Some(MigrationStatus::Completed));
    assert!(m.status.as_ref().unwrap().is_terminal());
    assert_eq!(m.downtime, Some(1));
    assert_eq!(m.total_time, Some(19));
    let ram = m.ram.unwrap();
    assert_eq!(ram.downtime_bytes, Some(16_423));
    assert_eq!(ram.dirty_sync_missed_zero_copy, Some(0));
    assert!(ram.extra.is_empty(), "{:?}", ram.extra);

    let m: MigrationInfo = recorded("query-migrate-cancelled.json");
    assert_eq!(m.status, Some(MigrationStatus::Cancelled));
    assert!(m.ram.is_none());

    let empty: MigrationInfo = serde_json::from_str("{}").unwrap();
    assert_eq!(empty.status, None);
}

#[test]
fn query_machines_and_dirty_rate_7_2() {
    let machines: Vec<MachineInfo> = recorded("query-machines.json");
    assert!(machines.iter().any(|m| m.name == "pc-q35-7.2"));
    let default = machines
        .iter()
        .find(|m| m.is_default == Some(true))
        .unwrap();
    assert_eq!(default.alias.as_deref(), Some("pc"));
    assert!(machines.iter().all(|m| m.extra.is_empty()));

    let d: DirtyRateInfo = recorded("query-dirty-rate.json");
    assert_eq!(d.status, "unstarted");
    assert_eq!(d.dirty_rate, None);
    assert_eq!(d.mode.as_deref(), Some("page-sampling"));
}
