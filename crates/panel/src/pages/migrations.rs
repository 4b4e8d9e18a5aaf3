//! Migrations: the history with filters and the queue per destination; one migration's live
//! screen with its actions (cancel, pacing, post-copy) and, once it ended, its report.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Form;
use ferry_api::migrations::{LogLine, Migration, MigrationKind, MigrationState, UpdateMigration};
use maud::{html, Markup};
use serde::Deserialize;

use super::{act as do_act, fetch, Fields};
use crate::api::{enc, Failure};
use crate::session::Session;
use crate::views::{
    action_button, bytes, csrf, error_page, json_island, ms, page, rate, respond, state_badge,
    title_case, Nav,
};
use crate::Panel;

/// A table of migrations, newest first (the list page and an instance's page).
pub fn table(migrations: &[Migration]) -> Markup {
    html! {
        @if migrations.is_empty() { p.empty { "No migrations." } }
        @else {
            table.list {
                thead { tr { th { "Started" } th { "Instance" } th { "Kind" } th { "From → to" } th { "State" } th { "Progress" } th { "QEMU's pause" } } }
                tbody {
                    @for m in migrations {
                        tr data-migration-row=(m.id) {
                            td data-label="Started" { a href=(format!("/migrations/{}", m.id)) { (m.created_at.format("%Y-%m-%d %H:%M:%S")) } }
                            td data-label="Instance" { (m.instance_name) }
                            td data-label="Kind" { (if m.kind == MigrationKind::Live { "live" } else { "cold" }) }
                            td data-label="From → to" { (m.source) " → " (m.destination) }
                            td data-label="State" { (state_badge(m.state)) }
                            td data-label="Progress" { @if let Some(p) = &m.progress { (format!("{:.0} %", p.percent)) } }
                            td data-label="QEMU's pause" { @if let Some(s) = &m.stats { (ms(s.qemu_pause_ms)) } }
                        }
                    }
                }
            }
        }
    }
}

/// Filters of `GET /migrations`.
#[derive(Debug, Default, Deserialize)]
pub struct Filters {
    pub state: Option<String>,
    pub instance: Option<String>,
    pub host: Option<String>,
}

/// `GET /migrations`.
pub async fn list(
    State(panel): State<Panel>,
    session: Session,
    Query(q): Query<Filters>,
) -> Response {
    let blank = |v: &Option<String>| {
        v.as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let (state, instance, host) = (blank(&q.state), blank(&q.instance), blank(&q.host));
    let mut query = vec!["limit=200".to_string()];
    if let Some(s) = &state {
        query.push(format!("state={}", enc(s)));
    }
    if let Some(i) = &instance {
        query.push(format!("instance={}", enc(i)));
    }
    if let Some(h) = &host {
        query.push(format!("host={}", enc(h)));
    }
    let t = &session.token;
    let path = format!("/v1/migrations?{}", query.join("&"));
    let (migrations, pending) = match (
        panel.api.get::<Vec<Migration>>(t, &path).await,
        panel
            .api
            .get::<Vec<Migration>>(t, "/v1/migrations?state=pending&limit=500")
            .await,
    ) {
        (Ok(m), Ok(p)) => (m, p),
        (Err(f), _) | (_, Err(f)) => return error_page(Some(&session), &f),
    };
    let mut queue: BTreeMap<&str, Vec<&Migration>> = BTreeMap::new();
    for m in &pending {
        queue.entry(m.destination.as_str()).or_default().push(m);
    }
    for jobs in queue.values_mut() {
        jobs.sort_by_key(|m| m.created_at);
    }
    let body = html! {
        h1 { "Migrations" }
        form.filters method="get" action="/migrations" role="search" {
            label { "State "
                select name="state" {
                    option value="" { "any" }
                    @for s in MigrationState::ALL {
                        option value=(s.as_str()) selected[state.as_deref() == Some(s.as_str())] { (title_case(s.as_str())) }
                    }
                }
            }
            label { "Instance " input type="text" name="instance" value=[instance.as_deref()]; }
            label { "Host " input type="text" name="host" value=[host.as_deref()]; }
            button type="submit" { "Filter" }
            a href="/migrations" { "Clear" }
        }
        div #live data-live-list {
            h2 { "Queue" }
            @if queue.is_empty() { p.empty { "No job is waiting for a slot." } }
            @else {
                div.cards {
                    @for (dest, jobs) in &queue {
                        article.card data-queue=(dest) {
                            h3 { "→ " (dest) " (" (jobs.len()) " pending)" }
                            ol {
                                @for (n, m) in jobs.iter().enumerate() {
                                    li data-queued=(m.id) data-position=(n + 1) { a href=(format!("/migrations/{}", m.id)) { (m.instance_name) } " from " (m.source) }
                                }
                            }
                        }
                    }
                }
            }
            h2 { "History" }
            (table(&migrations))
        }
    };
    respond(page("Migrations", Some(&session), Nav::Migrations, body))
}

fn figure(label: &str, field: &str, value: String) -> Markup {
    html! { div.fig { dt { (label) } dd data-f=(field) { (value) } } }
}

fn chart(id: &str, title: &str, unit: &str) -> Markup {
    html! {
        figure.chart {
            figcaption { (title) " " span.unit { "(" (unit) ")" } }
            svg id=(id) viewBox="0 0 300 120" role="img" aria-label=(title) preserveAspectRatio="none" {}
        }
    }
}

fn report(m: &Migration) -> Markup {
    html! {
        section.report #report aria-live="polite" {
            h2 { "Report" }
            p { "The migration " strong { (m.state.as_str()) }
                @if let (Some(a), Some(b)) = (m.preparing_at.or(Some(m.created_at)), m.finished_at) { " after " (ms((b - a).num_milliseconds().max(0) as u64)) } "." }
            @if m.state == MigrationState::Completed { p { (m.instance_name) " now runs on " strong #final-host { (m.destination) } "." } }
            @else { p { (m.instance_name) " stayed on " strong #final-host { (m.source) } "." } }
            @if let Some(e) = &m.error {
                div.error role="alert" { p.message { (e.message) } @if !e.hint.is_empty() { p.hint { "Hint: " (e.hint) } } p.code { "code " code { (e.code) } } }
            }
            @if let Some(s) = &m.stats {
                dl.facts {
                    dt { "Total time (QEMU)" } dd { (ms(s.total_ms)) }
                    dt { "QEMU's pause" } dd #final-pause { (ms(s.qemu_pause_ms)) }
                    dt { "Bytes sent" } dd { (bytes(s.bytes_transferred)) }
                    dt { "Iterations" } dd { (s.iterations) }
                }
            }
            @if let Some(i) = &m.impact {
                dl.facts {
                    dt { "vCPU throttle peak" } dd { (i.throttle_peak_percent) " %" }
                    dt { "Guest CPU taken by the throttle" } dd { (ms(i.cpu_lost_ms)) " (vCPU time)" }
                    @for o in &i.observed { dt { "Longest gap seen by " (o.by) } dd { (ms(o.longest_gap_ms)) } }
                }
            }
            @for c in &m.copies {
                p { "Disk " (c.disk) ": " (c.state.as_str()) ", " (bytes(c.done_bytes)) " of " (bytes(c.size_bytes))
                    @if let Some(h) = &c.sha256 { " · sha256 " code { (h.get(..16).unwrap_or(h)) "…" } } }
            }
        }
    }
}

fn plan(m: &Migration) -> Markup {
    html! {
        section #plan {
            h2 { "Plan" }
            @if let Some(p) = &m.plan {
                @let pr = &p.plan.prediction;
                p { "Strategy: " strong { (p.plan.strategy.join(", ")) } }
                dl.facts {
                    dt { "Predicted time" } dd { (pr.total_ms.map(ms).unwrap_or_else(|| "no end at these rates; the controller escalates".into())) }
                    dt { "Predicted QEMU's pause" } dd { (ms(pr.downtime_ms)) }
                    dt { "Rounds" } dd { (pr.rounds) }
                    dt { "Send rate assumed" } dd { (rate(pr.rate_bps)) }
                    dt { "Dirty rate measured" } dd { (rate(pr.dirty_rate_bps)) }
                    dt { "Budget" } dd { (ms(pr.budget_ms)) }
                }
                @if !p.plan.reasons.is_empty() { ul { @for r in &p.plan.reasons { li { (r) } } } }
            } @else {
                p.empty { @if m.options.policy == ferry_api::migrations::Policy::Manual { "Manual policy: the options are used as given." } @else if m.kind == MigrationKind::Cold { "A cold migration copies disks; nothing is planned." } @else { "Planned once the job is prepared." } }
            }
        }
    }
}

fn controls(session: &Session, m: &Migration) -> Markup {
    let base = format!("/migrations/{}", m.id);
    let copying = matches!(
        m.state,
        MigrationState::Pending | MigrationState::Preparing | MigrationState::Migrating
    );
    html! {
        @if session.operator() && copying && !m.cancel_requested {
            section.controls #controls {
                h2 { "Actions" }
                div.actions {
                    (action_button(session, &format!("{base}/cancel"), "Cancel migration", "danger",
                        Some(&format!("Cancel the migration of {}? The guest keeps running on {}.", m.instance_name, m.source))))
                    @if m.options.post_copy && m.state == MigrationState::Migrating && m.kind == MigrationKind::Live {
                        (action_button(session, &format!("{base}/postcopy"), "Switch to post-copy", "warn",
                            Some("Switch to post-copy? The guest then runs on the destination and pulls missing pages from the source: if the migration network fails now, the guest pauses until the link is back, and is lost if the source dies.")))
                    }
                }
                // No confirmation: a new cap or pause target only changes how fast the copy
                // goes. Lowering the bandwidth slows the migration (and may keep it from
                // converging, which the budget and the controller handle); the guest keeps
                // running on the source all the while and cannot be lost by it.
                form.pace method="post" action=(format!("{base}/pace")) {
                    (csrf(session))
                    label { "Bandwidth limit (MiB/s, 0 = unlimited) "
                        input #pace-bandwidth type="number" name="bandwidth_mib_s" min="0" inputmode="numeric"; }
                    label { "QEMU's pause target (ms) "
                        input #pace-downtime type="number" name="downtime_ms" min="1" inputmode="numeric"; }
                    button type="submit" { "Apply" }
                }
            }
        }
        @if m.cancel_requested && !m.state.is_terminal() { p.note #cancel-requested { "Cancel requested; the job stops at its next step." } }
    }
}

/// `GET /migrations/{id}`: the live screen.
pub async fn show(
    State(panel): State<Panel>,
    session: Session,
    Path(id): Path<String>,
) -> Response {
    let t = &session.token;
    let m =
        match fetch::<Migration>(&panel, &session, &format!("/v1/migrations/{}", enc(&id))).await {
            Ok(v) => v,
            Err(page) => return page,
        };
    let logs = panel
        .api
        .get::<Vec<LogLine>>(t, &format!("/v1/migrations/{}/logs", m.id))
        .await
        .unwrap_or_default();
    let p = m.progress.as_ref();
    let disk_done: u64 = p
        .map(|p| p.disks.iter().map(|d| d.copied_bytes).sum())
        .unwrap_or(0);
    let disk_left: u64 = p
        .map(|p| p.disks.iter().map(|d| d.remaining_bytes).sum())
        .unwrap_or(0);
    let opt = &m.options;
    let body = html! {
        p.crumbs { a href="/migrations" { "Migrations" } " / " }
        h1 { (m.instance_name) ": " (m.source) " → " (m.destination) }
        div #screen data-migration=(m.id) data-state=(m.state.as_str()) data-sections=(m.state.as_str()) data-updates="0" {
            (json_island("migration-json", &serde_json::to_value(&m).unwrap_or_default()))
            div.status {
                (state_badge(m.state))
                span.phase { "Phase: " span data-f="phase" { (p.and_then(|p| serde_json::to_value(p.phase).ok()).and_then(|v| v.as_str().map(str::to_string)).unwrap_or_else(|| "—".into())) } }
                span.kind { (if m.kind == MigrationKind::Live { "live" } else { "cold" }) }
                span.updates { "live updates: " span #updates data-f="updates" { "0" } }
            }
            div.bar {
                progress #bar max="100" value=(p.map(|p| p.percent).unwrap_or(0.0)) aria-label="Overall progress" {}
                span data-f="percent" { (format!("{:.0} %", p.map(|p| p.percent).unwrap_or(0.0))) }
            }
            dl.figures {
                (figure("Memory copied", "transferred", p.map(|p| bytes(p.transferred_bytes)).unwrap_or_default()))
                (figure("Memory remaining", "remaining", p.map(|p| bytes(p.remaining_bytes)).unwrap_or_default()))
                (figure("Disk copied", "disk_done", if disk_done + disk_left > 0 { bytes(disk_done) } else { "no local disks".into() }))
                (figure("Disk remaining", "disk_left", if disk_done + disk_left > 0 { bytes(disk_left) } else { "—".into() }))
                (figure("Iteration", "iteration", p.map(|p| p.iteration.to_string()).unwrap_or_default()))
                (figure("Transfer speed", "speed", p.map(|p| rate(p.throughput_bps)).unwrap_or_default()))
                (figure("Dirty rate", "dirty", p.map(|p| rate(p.dirty_rate_bps)).unwrap_or_default()))
                (figure("ETA", "eta", p.and_then(|p| p.eta_ms).map(ms).unwrap_or_else(|| "—".into())))
                (figure("QEMU's pause, expected", "expected_pause", p.and_then(|p| p.expected_downtime_ms).map(ms).unwrap_or_else(|| "—".into())))
                (figure("QEMU's pause, final", "final_pause", m.stats.as_ref().map(|s| ms(s.qemu_pause_ms)).unwrap_or_else(|| "—".into())))
                (figure("vCPU throttle", "throttle", p.and_then(|p| p.cpu_throttle_percent).map(|t| format!("{t} %")).unwrap_or_else(|| "—".into())))
                (figure("Elapsed", "elapsed", p.map(|p| ms(p.elapsed_ms)).unwrap_or_default()))
            }
            div.charts {
                (chart("chart-remaining", "Memory remaining", "MiB"))
                (chart("chart-throughput", "Transfer speed", "MiB/s"))
                (chart("chart-dirty", "Dirty rate", "MiB/s"))
            }
            (controls(&session, &m))
            @if m.state.is_terminal() { (report(&m)) }
            (plan(&m))
            section #options {
                h2 { "Options" }
                p { "Policy " (format!("{:?}", opt.policy).to_lowercase())
                    " · bandwidth " (opt.bandwidth_mib_s.map(|b| format!("{b} MiB/s")).unwrap_or_else(|| "unlimited".into()))
                    " · QEMU's pause target " (opt.downtime_ms.map(|d| format!("{d} ms")).unwrap_or_else(|| "300 ms (default)".into()))
                    @if opt.auto_converge { " · auto-converge" }
                    @if opt.compress { " · compression" }
                    @if let Some(n) = opt.parallel { " · " (n) " parallel channels" }
                    @if opt.post_copy { " · post-copy permitted" }
                    @if let Some(b) = opt.budget_s { " · budget " (b) " s" }
                }
            }
            section {
                h2 { "Controller decisions" }
                ol #decisions.log {
                    @for l in logs.iter().filter(|l| l.message.starts_with("controller")) { li { (l.message) } }
                }
            }
            section {
                h2 { "Log" }
                ol #log.log aria-live="off" {
                    @for l in &logs { li class=(format!("lv-{}", l.level)) { time { (l.at.format("%H:%M:%S%.3f")) } " " (l.message) } }
                }
            }
        }
    };
    respond(page("Migration", Some(&session), Nav::Migrations, body))
}

/// `POST /migrations/{id}/cancel|postcopy|pace`.
pub async fn act(
    State(panel): State<Panel>,
    session: Session,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let fields = Fields(fields);
    let back = |m: Migration| format!("/migrations/{}", m.id);
    let t = &session.token;
    match action.as_str() {
        "cancel" | "postcopy" => {
            let path = format!("/v1/migrations/{}/{action}", enc(&id));
            do_act(
                &session,
                &headers,
                &fields,
                panel.api.post_empty::<Migration>(t, &path),
                back,
            )
            .await
        }
        "pace" => {
            let update = (|| -> Result<UpdateMigration, Failure> {
                let u = UpdateMigration {
                    bandwidth_mib_s: fields.number("bandwidth_mib_s", "the bandwidth limit")?,
                    downtime_ms: fields.number("downtime_ms", "QEMU's pause target")?,
                };
                if u.bandwidth_mib_s.is_none() && u.downtime_ms.is_none() {
                    return Err(Failure::bad_input(
                        "invalid-migration-options",
                        "neither a bandwidth limit nor a pause target was given",
                        "type at least one of them",
                    ));
                }
                Ok(u)
            })();
            let update = match update {
                Ok(u) => u,
                Err(f) => return error_page(Some(&session), &f),
            };
            let path = format!("/v1/migrations/{}", enc(&id));
            do_act(
                &session,
                &headers,
                &fields,
                panel.api.patch::<_, Migration>(t, &path, &update),
                back,
            )
            .await
        }
        _ => error_page(
            Some(&session),
            &Failure::bad_input(
                "no-such-action",
                format!("migrations have no action {action:?}"),
                "use cancel, postcopy or pace",
            ),
        ),
    }
}
