//! `GET /metrics`: the fleet in Prometheus' text format, for dashboards and alerts.
//!
//! Every figure is computed from the store when scraped, not counted in memory: a restarted
//! server (or, later, another server of the same cluster) reports the same history, and a
//! counter never resets because a process did. Counters over finished jobs only grow as
//! jobs finish, which is what Prometheus' `rate()` expects.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use ferry_api::hosts::{Host, HostState};
use ferry_api::migrations::{Migration, MigrationKind, MigrationState};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::auth::Reader;
use crate::server::AppState;
use crate::store::MigrationFilter;
use crate::ServerError;

/// Seconds a whole migration may take: from a quick idle guest to a large busy one.
const DURATION_BUCKETS: [f64; 10] = [0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0];
/// Seconds of QEMU's pause and of the gap observers saw: the interesting range is the tens
/// to hundreds of milliseconds around the 300 ms target.
const PAUSE_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0];

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn kind_str(kind: MigrationKind) -> &'static str {
    match kind {
        MigrationKind::Live => "live",
        MigrationKind::Cold => "cold",
    }
}

fn host_state(h: &Host) -> &'static str {
    match (h.state, h.enabled) {
        (HostState::Offline, _) => "offline",
        (HostState::Online, false) => "disabled",
        (HostState::Online, true) => "online",
    }
}

/// The exposition text for these hosts and jobs (pure, so it is unit-tested on records).
pub fn render(hosts: &[Host], migrations: &[Migration]) -> String {
    let mut registry = Registry::default();

    let by_state = Family::<Labels, Gauge>::default();
    registry.register(
        "ferry_migrations",
        "Migration jobs on record by state and kind",
        by_state.clone(),
    );
    let finished = Family::<Labels, Counter>::default();
    registry.register(
        "ferry_migrations_finished",
        "Migration jobs that ended, by outcome (completed, failed, cancelled) and kind",
        finished.clone(),
    );
    let duration =
        Family::<Labels, Histogram>::new_with_constructor(|| Histogram::new(DURATION_BUCKETS));
    registry.register(
        "ferry_migration_duration_seconds",
        "Request to end of completed migrations, by kind",
        duration.clone(),
    );
    let pause = Histogram::new(PAUSE_BUCKETS);
    registry.register(
        "ferry_migration_qemu_pause_seconds",
        "QEMU's pause at switchover (what QEMU calls downtime) of completed live migrations",
        pause.clone(),
    );
    let gap = Histogram::new(PAUSE_BUCKETS);
    registry.register(
        "ferry_migration_observed_gap_seconds",
        "The longest gap an observer outside the guest saw in its answers, per completed live migration observed",
        gap.clone(),
    );
    let bytes = Family::<Labels, Counter>::default();
    registry.register(
        "ferry_migration_transferred_bytes",
        "Bytes QEMU sent in completed migrations, by kind",
        bytes.clone(),
    );
    let queue = Family::<Labels, Gauge>::default();
    registry.register(
        "ferry_migration_queue_length",
        "Pending migration jobs waiting for a slot, by source host",
        queue.clone(),
    );
    let host_states = Family::<Labels, Gauge>::default();
    registry.register(
        "ferry_hosts",
        "Hosts by state (online, disabled, offline)",
        host_states.clone(),
    );

    // Every combination is written, zeros included, so a dashboard's series exist from the
    // start and an alert on "failed" has something to compare against.
    for kind in [MigrationKind::Live, MigrationKind::Cold] {
        for state in MigrationState::ALL {
            let l = labels(&[("state", state.as_str()), ("kind", kind_str(kind))]);
            let _ = by_state.get_or_create(&l);
            if state.is_terminal() {
                let _ = finished.get_or_create(&l);
            }
        }
        let _ = bytes.get_or_create(&labels(&[("kind", kind_str(kind))]));
        let _ = duration.get_or_create(&labels(&[("kind", kind_str(kind))]));
    }
    for state in ["online", "disabled", "offline"] {
        let _ = host_states.get_or_create(&labels(&[("state", state)]));
    }
    for h in hosts {
        host_states
            .get_or_create(&labels(&[("state", host_state(h))]))
            .inc();
        let _ = queue.get_or_create(&labels(&[("host", &h.name)]));
    }

    let mut pending: BTreeMap<&str, i64> = BTreeMap::new();
    for m in migrations {
        let kind = kind_str(m.kind);
        let l = labels(&[("state", m.state.as_str()), ("kind", kind)]);
        by_state.get_or_create(&l).inc();
        if m.state == MigrationState::Pending {
            *pending.entry(&m.source).or_default() += 1;
        }
        if !m.state.is_terminal() {
            continue;
        }
        finished.get_or_create(&l).inc();
        if m.state != MigrationState::Completed {
            continue;
        }
        if let Some(end) = m.finished_at {
            let secs = (end - m.created_at).num_milliseconds().max(0) as f64 / 1000.0;
            duration
                .get_or_create(&labels(&[("kind", kind)]))
                .observe(secs);
        }
        if let Some(stats) = &m.stats {
            bytes
                .get_or_create(&labels(&[("kind", kind)]))
                .inc_by(stats.bytes_transferred);
            if m.kind == MigrationKind::Live {
                pause.observe(stats.qemu_pause_ms as f64 / 1000.0);
            }
        }
        if let Some(longest) = m
            .impact
            .as_ref()
            .and_then(|i| i.observed.iter().map(|o| o.longest_gap_ms).max())
        {
            gap.observe(longest as f64 / 1000.0);
        }
    }
    for (host, n) in pending {
        queue.get_or_create(&labels(&[("host", host)])).set(n);
    }

    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut text, &registry);
    text
}

/// A sample's value as Prometheus reads the exposition `text`: a counter's or gauge's value,
/// or a histogram's count, of the first series of `name` with these labels. For tests and
/// tools that check what a scrape says; `None` when there is no such series.
pub fn scraped_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).ok()?;
    let s = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))?;
    match &s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => Some(*v),
        prometheus_parse::Value::Histogram(h) => {
            Some(h.iter().map(|b| b.count).fold(0.0, f64::max))
        }
        _ => None,
    }
}

/// The exposition for a scrape; any API token may read it (Prometheus gets a reader token).
pub async fn metrics(State(state): State<AppState>, _: Reader) -> Result<Response, ServerError> {
    let offline_after = chrono::Duration::seconds(state.config.heartbeat_timeout_s as i64);
    let hosts = state
        .store
        .list_hosts(offline_after, chrono::Utc::now())
        .await?;
    let migrations = state
        .store
        .list_migrations(&MigrationFilter::default())
        .await?;
    let text = render(&hosts, &migrations);
    Ok((
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::migration;
    use ferry_api::migrations::MigrationStats;
    use ferry_migrate::{GuestImpact, Observation};

    fn host(name: &str, state: HostState, enabled: bool) -> Host {
        serde_json::from_value(serde_json::json!({
            "name": name, "agent_url": "https://h:7001", "enabled": enabled,
            "state": state, "last_heartbeat": null, "facts": null, "instances": 0
        }))
        .expect("host")
    }

    fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        scraped_value(text, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?}"))
    }

    #[test]
    fn a_completed_migration_moves_its_counters_and_histograms() {
        let hosts = [
            host("hv1", HostState::Online, true),
            host("hv2", HostState::Online, false),
            host("hv3", HostState::Offline, true),
        ];
        let empty = render(&hosts, &[]);
        assert_eq!(
            value(
                &empty,
                "ferry_migrations_finished_total",
                &[("state", "completed"), ("kind", "live")]
            ),
            0.0
        );
        assert_eq!(value(&empty, "ferry_hosts", &[("state", "disabled")]), 1.0);
        assert_eq!(value(&empty, "ferry_hosts", &[("state", "offline")]), 1.0);

        let mut done = migration("hv1", "hv2");
        done.state = MigrationState::Completed;
        done.finished_at = Some(done.created_at + chrono::Duration::milliseconds(2500));
        done.stats = Some(MigrationStats {
            total_ms: 2400,
            qemu_pause_ms: 18,
            bytes_transferred: 300 << 20,
            iterations: 3,
        });
        let mut impact = GuestImpact::new(1);
        impact.observed.push(Observation {
            by: "lab UDP echo every 5 ms".into(),
            longest_gap_ms: 92,
            probes_sent: 100,
            probes_lost: 0,
        });
        done.impact = Some(impact);
        let mut failed = migration("hv1", "hv3");
        failed.state = MigrationState::Failed;
        let queued = [migration("hv1", "hv2"), migration("hv1", "hv3")];
        let all = [done, failed, queued[0].clone(), queued[1].clone()];
        let after = render(&hosts, &all);

        let live = |state| [("state", state), ("kind", "live")];
        assert_eq!(
            value(
                &after,
                "ferry_migrations_finished_total",
                &live("completed")
            ),
            1.0
        );
        assert_eq!(
            value(&after, "ferry_migrations_finished_total", &live("failed")),
            1.0
        );
        assert_eq!(value(&after, "ferry_migrations", &live("pending")), 2.0);
        assert_eq!(
            value(&after, "ferry_migration_queue_length", &[("host", "hv1")]),
            2.0
        );
        assert_eq!(
            value(&after, "ferry_migration_queue_length", &[("host", "hv2")]),
            0.0
        );
        assert_eq!(
            value(
                &after,
                "ferry_migration_transferred_bytes_total",
                &[("kind", "live")]
            ),
            (300u64 << 20) as f64
        );
        for (histogram, want) in [
            ("ferry_migration_duration_seconds", &[("kind", "live")][..]),
            ("ferry_migration_qemu_pause_seconds", &[]),
            ("ferry_migration_observed_gap_seconds", &[]),
        ] {
            assert_eq!(value(&empty, histogram, want), 0.0, "{histogram} before");
            assert_eq!(value(&after, histogram, want), 1.0, "{histogram} after");
        }
        // The 92 ms gap falls in the 100 ms bucket, not the 50 ms one.
        for (le, want) in [("0.05", "0"), ("0.1", "1")] {
            let line = format!("ferry_migration_observed_gap_seconds_bucket{{le=\"{le}\"}} {want}");
            assert!(after.lines().any(|l| l == line), "{line}\n{after}");
        }
    }

    /// The dashboard in deploy/ asks only for series the server writes.
    #[test]
    fn the_grafana_dashboard_uses_only_metrics_the_server_serves() {
        let dashboard = include_str!("../../../deploy/grafana-dashboard.json");
        let text = render(&[host("hv1", HostState::Online, true)], &[]);
        let mut names = 0;
        for (i, _) in dashboard.match_indices("ferry_") {
            let name: String = dashboard[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names += 1;
            assert!(
                text.lines().any(|l| l.starts_with(&name)),
                "the dashboard asks for {name}, which /metrics does not serve"
            );
        }
        assert!(
            names >= 8,
            "only {names} metric names found in the dashboard"
        );
    }
}
