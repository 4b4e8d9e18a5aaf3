//! The Live Migrate dialog: destination (auto or a host, each with its verdict and, on
//! demand, every check), IP configuration, storage mapping per disk, advanced options; then a
//! review with the server's prediction (`POST /v1/migrations/preview`) before Start.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use ferry_api::checks::{Candidate, CheckStatus};
use ferry_api::hosts::Datastore;
use ferry_api::instances::{Instance, InstanceState};
use ferry_api::migrations::{
    CreateMigration, Migration, MigrationKind, MigrationOptions, MigrationPreview, Policy,
};
use ferry_migrate::TimeoutAction;
use maud::{html, Markup};

use super::{fetch, Fields};
use crate::api::{enc, Failure};
use crate::session::{check_form, Session, CSRF_FIELD};
use crate::views::{csrf, error_box, error_page, ms, page, rate, respond, Nav};
use crate::Panel;

/// The form's fields, other than the CSRF token and the step, that a review carries back.
const CARRIED: [&str; 12] = [
    "destination",
    "ip",
    "policy",
    "auto_converge",
    "compress",
    "parallel",
    "bandwidth_mib_s",
    "downtime_ms",
    "budget_s",
    "timeout_action",
    "post_copy",
    "post_copy_ack",
];

fn kind_of(i: &Instance) -> MigrationKind {
    if i.state == InstanceState::Stopped {
        MigrationKind::Cold
    } else {
        MigrationKind::Live
    }
}

fn verdict(c: &Candidate) -> String {
    if c.fit {
        let warns = c
            .checks
            .iter()
            .filter(|k| k.status == CheckStatus::Warn)
            .count();
        if warns > 0 {
            format!(
                "{}: fits (rank {}, {} warning{})",
                c.host,
                c.rank,
                warns,
                if warns == 1 { "" } else { "s" }
            )
        } else {
            format!(
                "{}: fits (rank {}, {} MiB free)",
                c.host, c.rank, c.free_ram_mib
            )
        }
    } else {
        let failed: Vec<&str> = c
            .checks
            .iter()
            .filter(|k| k.status == CheckStatus::Fail)
            .map(|k| k.name.as_str())
            .collect();
        format!("{}: cannot take it ({})", c.host, failed.join(", "))
    }
}

/// Every check of one host: verdict, sentence, measured values, hint.
fn checks_table(c: &Candidate) -> Markup {
    html! {
        table.list.checks {
            thead { tr { th { "Check" } th { "Verdict" } th { "Finding" } th { "Values" } th { "Hint" } } }
            tbody {
                @for k in &c.checks {
                    @let word = match k.status { CheckStatus::Pass => "pass", CheckStatus::Warn => "warn", CheckStatus::Fail => "fail" };
                    tr {
                        td data-label="Check" { code { (k.name) } }
                        td data-label="Verdict" { span class=(format!("badge st-{word}")) { (word) } @if k.overridable && k.status == CheckStatus::Fail { " (overridable)" } }
                        td data-label="Finding" { (k.message) }
                        td data-label="Values" { @if !k.values.is_null() { code.values { (k.values.to_string()) } } }
                        td data-label="Hint" { (k.hint) }
                    }
                }
            }
        }
    }
}

/// Which datastores are shared (mounted by more than one host): a disk on one is not copied,
/// so the dialog and the review say it stays in place instead of offering a mapping.
fn shared_map(datastores: &[Datastore]) -> BTreeMap<String, bool> {
    datastores
        .iter()
        .map(|d| (d.name.clone(), d.shared))
        .collect()
}

/// What happens to each disk, in the review's words: shared storage stays where it is, a
/// mapped disk goes to the chosen datastore, any other to the one the server picks.
fn disk_plan(i: &Instance, o: &MigrationOptions, shared: &BTreeMap<String, bool>) -> Markup {
    html! {
        @for d in &i.spec.disks {
            @let is_shared = shared.get(&d.image.datastore).copied().unwrap_or(false);
            li data-disk-plan=(d.id) {
                "Disk " (d.id) ": "
                @if is_shared { "on shared datastore " (d.image.datastore) ", stays in place" }
                @else if let Some(ds) = o.disk_map.get(&d.id) { "copied to datastore " strong { (ds) } " on the destination" }
                @else { "copied to the destination's datastore with most room" }
            }
        }
        @for (d, ds) in o.disk_map.iter().filter(|(d, _)| !i.spec.disks.iter().any(|x| &x.id == *d)) {
            li { "Disk " (d) " → datastore " (ds) }
        }
    }
}

struct Prefill<'a>(Option<&'a Fields>);

impl Prefill<'_> {
    fn val(&self, name: &str) -> Option<String> {
        self.0.and_then(|f| f.value(name)).map(str::to_string)
    }
    fn is(&self, name: &str, value: &str) -> bool {
        self.0.and_then(|f| f.get(name)) == Some(value)
    }
    fn checked(&self, name: &str) -> bool {
        self.0.is_some_and(|f| f.checked(name))
    }
}

async fn dialog_page(
    panel: &Panel,
    session: &Session,
    id: &str,
    prefill: Option<&Fields>,
    failure: Option<&Failure>,
) -> Response {
    let t = &session.token;
    let i = match panel
        .api
        .get::<Instance>(t, &format!("/v1/instances/{}", enc(id)))
        .await
    {
        Ok(i) => i,
        Err(f) => return error_page(Some(session), &f),
    };
    let kind = kind_of(&i);
    let candidates = match panel
        .api
        .get::<Vec<Candidate>>(t, &format!("/v1/instances/{}/migration-candidates", i.id))
        .await
    {
        Ok(c) => c,
        Err(f) => return error_page(Some(session), &f),
    };
    let datastores = panel
        .api
        .get::<Vec<Datastore>>(t, "/v1/datastores")
        .await
        .unwrap_or_default();
    let shared = shared_map(&datastores);
    // A datastore name once, with the hosts that have one of that name: a host-local
    // datastore is listed by the API once per host, but a mapping names only the datastore.
    let mut targets: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for ds in &datastores {
        let hosts = targets.entry(ds.name.as_str()).or_default();
        hosts.extend(ds.mounts.iter().map(|m| m.host.as_str()));
        hosts.sort_unstable();
        hosts.dedup();
    }
    let pf = Prefill(prefill);
    let title = if kind == MigrationKind::Live {
        "Live Migrate"
    } else {
        "Migrate (cold)"
    };
    let body = html! {
        p.crumbs { a href="/instances" { "Instances" } " / " a href=(format!("/instances/{}", i.id)) { (i.name) } " / " }
        h1 { (title) " " (i.name) }
        p { "From " strong { (i.host) } ". " (i.spec.memory_mib) " MiB, " (i.spec.vcpus) " vCPUs." }
        @if let Some(f) = failure { (error_box(f)) }
        form.dialog #migrate-form method="post" action=(format!("/instances/{}/migrate", i.id)) {
            (csrf(session))
            fieldset {
                legend { "Destination" }
                label for="destination" { "Host" }
                select #destination name="destination" {
                    option value="auto" selected[pf.val("destination").is_none_or(|d| d == "auto")] { "auto (best fit)" }
                    @for c in &candidates {
                        option value=(c.host) selected[pf.is("destination", &c.host)] disabled[!c.fit] { (verdict(c)) }
                    }
                }
                @for c in &candidates {
                    details.checks data-checks=(c.host) {
                        summary { "Every check for " (c.host) }
                        (checks_table(c))
                    }
                }
            }
            fieldset {
                legend { "IP configuration" }
                label { input type="radio" name="ip" value="keep" checked; " Keep the guest's addresses" }
                label.disabled { input type="radio" name="ip" value="new" disabled; " New IPs from the destination's subnets" }
                p.small #ip-reason { "Not available yet: Ferry does not manage networks and their subnets, so it has no addresses to give. The guest keeps its own." }
            }
            fieldset {
                legend { "Storage" }
                @if i.spec.disks.is_empty() { p.small { "No disks: only memory and device state move." } }
                @for d in &i.spec.disks {
                    @let is_shared = shared.get(d.image.datastore.as_str()).copied().unwrap_or(false);
                    div.row data-disk=(d.id) data-shared=(is_shared) {
                        label for=(format!("disk-{}", d.id)) { (d.id) " (" (d.image.to_string()) ")" }
                        @if is_shared {
                            span.tag { "shared storage: stays where it is" }
                        } @else if kind == MigrationKind::Cold {
                            span.small { "copied to datastore " (d.image.datastore) " on the destination" }
                        } @else {
                            select id=(format!("disk-{}", d.id)) name=(format!("disk.{}", d.id)) {
                                option value="" { "auto (the destination's datastore with most room)" }
                                @for (name, hosts) in &targets {
                                    option value=(name) selected[pf.is(&format!("disk.{}", d.id), name)] { (name) " (on " (hosts.join(", ")) ")" }
                                }
                            }
                        }
                    }
                }
            }
            fieldset {
                legend { "Bandwidth" }
                label for="bandwidth" { "Bandwidth limit (MiB/s, empty = unlimited)" }
                input #bandwidth type="number" name="bandwidth_mib_s" min="1" inputmode="numeric" value=[pf.val("bandwidth_mib_s")];
            }
            @if kind == MigrationKind::Live {
                details.advanced #advanced open[prefill.is_some()] {
                    summary { "Advanced options" }
                    div.grid {
                        label { "Policy "
                            select #policy name="policy" {
                                option value="auto" selected[!pf.is("policy", "manual")] { "auto: measure, predict, steer" }
                                option value="manual" selected[pf.is("policy", "manual")] { "manual: exactly these options" }
                            }
                        }
                        label { input #auto_converge type="checkbox" name="auto_converge" checked[pf.checked("auto_converge")]; " Auto-converge (throttle the guest's vCPUs when it dirties faster than we send)" }
                        label { input #compress type="checkbox" name="compress" checked[pf.checked("compress")]; " Compression (zstd over parallel channels)" }
                        label { "Parallel channels " input #parallel type="number" name="parallel" min="1" max="16" value=[pf.val("parallel")]; }
                        label { "QEMU's pause target (ms) " input #downtime type="number" name="downtime_ms" min="1" placeholder="300" value=[pf.val("downtime_ms")]; }
                        label { "Time budget (s) " input #budget type="number" name="budget_s" min="1" placeholder="auto" value=[pf.val("budget_s")]; }
                        label { "When the budget runs out "
                            select #timeout_action name="timeout_action" {
                                option value="abort" selected[!pf.is("timeout_action", "postcopy")] { "abort: the guest stays on the source" }
                                option value="postcopy" selected[pf.is("timeout_action", "postcopy")] { "switch to post-copy" }
                            }
                        }
                        p.small { "Migration traffic always goes over the hosts' private migration network (each host's migration address)." }
                    }
                    div.risk #postcopy-box {
                        label { input #post_copy type="checkbox" name="post_copy" checked[pf.checked("post_copy")]; " Permit post-copy" }
                        p.warning role="note" {
                            strong { "Risk: " }
                            "after the switch to post-copy the guest runs on the destination while its remaining memory is still on the source. "
                            "If the migration network fails then, Ferry keeps the guest paused on the destination and retries until the link is back; "
                            "it never resumes the source. If the source host dies before every page arrived, the guest's state is lost."
                        }
                        label { input #post_copy_ack type="checkbox" name="post_copy_ack" checked[pf.checked("post_copy_ack")]; " I understand this risk" }
                    }
                }
            }
            div.buttons {
                a.button href=(format!("/instances/{}", i.id)) { "Back" }
                button.primary #review type="submit" name="step" value="review" { "Review" }
            }
        }
    };
    let mut resp = respond(page(title, Some(session), Nav::Instances, body));
    // A refusal keeps its HTTP status, so a script (or a test) sees what the API said.
    if let Some(f) = failure {
        if let Ok(status) = axum::http::StatusCode::from_u16(f.status) {
            *resp.status_mut() = status;
        }
    }
    resp
}

/// `GET /instances/{id}/migrate`.
pub async fn dialog(
    State(panel): State<Panel>,
    session: Session,
    Path(id): Path<String>,
) -> Response {
    dialog_page(&panel, &session, &id, None, None).await
}

/// The request the form describes, or a clear refusal naming the field.
fn request(instance: &str, kind: MigrationKind, f: &Fields) -> Result<CreateMigration, Failure> {
    let post_copy = f.checked("post_copy");
    if post_copy && !f.checked("post_copy_ack") {
        return Err(Failure::bad_input(
            "invalid-migration-options",
            "post-copy was permitted without acknowledging its risk",
            "tick \"I understand this risk\", or leave post-copy off",
        ));
    }
    let policy = match f.value("policy").unwrap_or("auto") {
        "auto" => Policy::Auto,
        "manual" => Policy::Manual,
        other => {
            return Err(Failure::bad_input(
                "invalid-migration-options",
                format!("there is no policy {other:?}"),
                "choose auto or manual",
            ))
        }
    };
    let timeout_action = match f.value("timeout_action") {
        None | Some("abort") => None,
        Some("postcopy") => Some(TimeoutAction::Postcopy),
        Some(other) => {
            return Err(Failure::bad_input(
                "invalid-migration-options",
                format!("there is no timeout action {other:?}"),
                "choose abort or post-copy",
            ))
        }
    };
    if f.value("ip").is_some_and(|v| v != "keep") {
        return Err(Failure::bad_input(
            "invalid-migration-options",
            "new IPs cannot be given yet: Ferry does not manage networks",
            "keep the guest's addresses",
        ));
    }
    let disk_map =
        f.0.iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("disk.")?.to_string(), v.trim().to_string())))
            .filter(|(_, v)| !v.is_empty())
            .collect();
    let options = MigrationOptions {
        bandwidth_mib_s: f.number("bandwidth_mib_s", "the bandwidth limit")?,
        downtime_ms: f.number("downtime_ms", "QEMU's pause target")?,
        auto_converge: f.checked("auto_converge"),
        compress: f.checked("compress"),
        post_copy,
        force: false,
        policy,
        budget_s: f.number("budget_s", "the time budget")?,
        timeout_action,
        xbzrle_cache_mib: None,
        parallel: f.number("parallel", "parallel channels")?,
        disk_map,
    };
    Ok(CreateMigration {
        instance: instance.to_string(),
        destination: f
            .value("destination")
            .filter(|d| *d != "auto")
            .map(str::to_string),
        options,
        kind: Some(kind),
    })
}

fn carried(f: &Fields) -> Markup {
    html! {
        @for (k, v) in f.0.iter().filter(|(k, _)| CARRIED.contains(&k.as_str()) || k.starts_with("disk.")) {
            input type="hidden" name=(k) value=(v);
        }
    }
}

fn review(
    session: &Session,
    i: &Instance,
    f: &Fields,
    req: &CreateMigration,
    pv: &MigrationPreview,
    shared: &BTreeMap<String, bool>,
) -> Response {
    let o = &req.options;
    let body = html! {
        p.crumbs { a href="/instances" { "Instances" } " / " a href=(format!("/instances/{}", i.id)) { (i.name) } " / " }
        h1 { "Review: " (i.name) " " (pv.source) " → " (pv.destination) }
        section #prediction {
            h2 { "Prediction" }
            @if let Some(p) = &pv.plan {
                @let pr = &p.plan.prediction;
                dl.facts {
                    dt { "Strategy" } dd #pred-strategy { (p.plan.strategy.join(", ")) }
                    dt { "Time" } dd #pred-time { (pr.total_ms.map(ms).unwrap_or_else(|| "no end at these rates; the controller escalates".into())) }
                    dt { "QEMU's pause" } dd #pred-pause { (ms(pr.downtime_ms)) }
                    dt { "Rounds" } dd { (pr.rounds) }
                    dt { "Send rate" } dd { (rate(pr.rate_bps)) }
                    dt { "Dirty rate" } dd { (rate(pr.dirty_rate_bps)) }
                    dt { "Budget" } dd { (ms(pr.budget_ms)) }
                }
                @if !p.plan.reasons.is_empty() { ul { @for r in &p.plan.reasons { li { (r) } } } }
            }
            @for n in &pv.notes { p.note { (n) } }
        }
        section {
            h2 { "Options" }
            ul #review-options {
                li { "Destination: " strong { (pv.destination) } @if req.destination.is_none() { " (auto: best fit)" } }
                li { "IP configuration: keep" }
                li { "Policy: " (format!("{:?}", o.policy).to_lowercase()) }
                li { "Bandwidth limit: " (o.bandwidth_mib_s.map(|b| format!("{b} MiB/s")).unwrap_or_else(|| "unlimited".into())) }
                li { "QEMU's pause target: " (o.downtime_ms.map(|d| format!("{d} ms")).unwrap_or_else(|| "300 ms (default)".into())) }
                li { "Auto-converge: " (if o.auto_converge { "on" } else { "off" }) }
                li { "Compression: " (if o.compress { "on" } else { "off" }) }
                li { "Parallel channels: " (o.parallel.map(|p| p.to_string()).unwrap_or_else(|| "default".into())) }
                li { "Time budget: " (o.budget_s.map(|b| format!("{b} s")).unwrap_or_else(|| "auto".into())) ", then " (if o.timeout_action == Some(TimeoutAction::Postcopy) { "post-copy" } else { "abort" }) }
                li { "Post-copy: " (if o.post_copy { "permitted (risk acknowledged)" } else { "not permitted" }) }
                (disk_plan(i, o, shared))
            }
        }
        details.checks open[!pv.candidate.fit] {
            summary { "Every check for " (pv.destination) (if pv.candidate.fit { ": all pass or warn" } else { ": a check fails" }) }
            (checks_table(&pv.candidate))
        }
        form method="post" action=(format!("/instances/{}/migrate", i.id)) {
            (csrf(session))
            (carried(f))
            div.buttons {
                button type="submit" name="step" value="edit" { "Back" }
                @if session.operator() {
                    button.primary #start type="submit" name="step" value="start" { "Start migration" }
                }
            }
        }
    };
    respond(page("Review", Some(session), Nav::Instances, body))
}

/// `POST /instances/{id}/migrate`: `step` = `review` (preview), `edit` (back to the dialog)
/// or `start` (queue it and open its screen).
pub async fn submit(
    State(panel): State<Panel>,
    session: Session,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let fields = Fields(fields);
    if let Err(f) = check_form(&session, &headers, fields.get(CSRF_FIELD)) {
        return error_page(Some(&session), &f);
    }
    let t = &session.token;
    let i = match fetch::<Instance>(&panel, &session, &format!("/v1/instances/{}", enc(&id))).await
    {
        Ok(v) => v,
        Err(page) => return page,
    };
    let step = fields.value("step").unwrap_or("review");
    if step == "edit" {
        return dialog_page(&panel, &session, &id, Some(&fields), None).await;
    }
    let req = match request(&i.id.to_string(), kind_of(&i), &fields) {
        Ok(r) => r,
        Err(f) => return dialog_page(&panel, &session, &id, Some(&fields), Some(&f)).await,
    };
    match step {
        "start" => match panel
            .api
            .post::<_, Migration>(t, "/v1/migrations", &req)
            .await
        {
            Ok(m) => Redirect::to(&format!("/migrations/{}", m.id)).into_response(),
            Err(f) => dialog_page(&panel, &session, &id, Some(&fields), Some(&f)).await,
        },
        _ => match panel
            .api
            .post::<_, MigrationPreview>(t, "/v1/migrations/preview", &req)
            .await
        {
            Ok(pv) => {
                let datastores = panel
                    .api
                    .get::<Vec<Datastore>>(t, "/v1/datastores")
                    .await
                    .unwrap_or_default();
                review(&session, &i, &fields, &req, &pv, &shared_map(&datastores))
            }
            Err(f) => dialog_page(&panel, &session, &id, Some(&fields), Some(&f)).await,
        },
    }
}
