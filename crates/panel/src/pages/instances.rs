//! Instances: the list, one instance with its disks and migrations, start and stop.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Form;
use ferry_api::instances::{Instance, InstanceState};
use ferry_api::migrations::Migration;
use maud::{html, Markup};

use super::{act as do_act, fetch, Fields};
use crate::api::{enc, Failure};
use crate::session::Session;
use crate::views::{action_button, badge, bytes, error_page, page, respond, Nav};
use crate::Panel;

fn ips(i: &Instance) -> Vec<String> {
    i.guest
        .as_ref()
        .map(|g| {
            g.interfaces
                .iter()
                .filter(|n| n.name != "lo")
                .flat_map(|n| n.addresses.iter().cloned())
                .collect()
        })
        .unwrap_or_default()
}

/// `GET /instances`.
pub async fn list(State(panel): State<Panel>, session: Session) -> Response {
    let instances = match fetch::<Vec<Instance>>(&panel, &session, "/v1/instances").await {
        Ok(v) => v,
        Err(page) => return page,
    };
    let body = html! {
        h1 { "Instances" }
        div #live data-live-list {
            @if instances.is_empty() { p.empty { "No instances yet (`ferry instance create`)." } }
            @else {
                table.list {
                    thead { tr { th { "Name" } th { "State" } th { "Host" } th { "Memory" } th { "vCPUs" } th { "IPs" } th { "Disks" } th { "Migration" } } }
                    tbody {
                        @for i in &instances {
                            tr data-instance=(i.name) {
                                td data-label="Name" { a href=(format!("/instances/{}", i.id)) { (i.name) } }
                                td data-label="State" { (badge(i.state.as_str())) }
                                td data-label="Host" data-f="host" { (i.host) }
                                td data-label="Memory" { (i.spec.memory_mib) " MiB" }
                                td data-label="vCPUs" { (i.spec.vcpus) }
                                td data-label="IPs" { (ips(i).join(", ")) }
                                td data-label="Disks" { (i.spec.disks.len()) }
                                td data-label="Migration" {
                                    @if let Some(m) = i.migration { a href=(format!("/migrations/{m}")) { "in flight" } }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    respond(page("Instances", Some(&session), Nav::Instances, body))
}

fn actions(session: &Session, i: &Instance) -> Markup {
    let base = format!("/instances/{}", i.id);
    html! {
        div.actions #actions {
            @if i.migration.is_none() {
                @match i.state {
                    InstanceState::Running => {
                        a.button.primary #live-migrate href=(format!("{base}/migrate")) { "Live Migrate" }
                        (action_button(session, &format!("{base}/stop"), "Stop", "danger",
                            Some(&format!("Stop {}? Its guest is shut down (ACPI or guest agent, then forced after the timeout).", i.name))))
                    }
                    InstanceState::Stopped => {
                        (action_button(session, &format!("{base}/start"), "Start", "primary", None))
                        a.button #cold-migrate href=(format!("{base}/migrate")) { "Migrate (cold)" }
                    }
                    _ => {
                        (action_button(session, &format!("{base}/stop"), "Stop", "danger",
                            Some(&format!("Stop {}?", i.name))))
                    }
                }
            } @else {
                p { "A migration is in flight; actions wait for it to end." }
            }
        }
    }
}

/// `GET /instances/{id}`.
pub async fn show(
    State(panel): State<Panel>,
    session: Session,
    Path(id): Path<String>,
) -> Response {
    let t = &session.token;
    let i = match fetch::<Instance>(&panel, &session, &format!("/v1/instances/{}", enc(&id))).await
    {
        Ok(v) => v,
        Err(page) => return page,
    };
    let migrations = panel
        .api
        .get::<Vec<Migration>>(t, &format!("/v1/migrations?instance={}&limit=20", i.id))
        .await
        .unwrap_or_default();
    let body = html! {
        p.crumbs { a href="/instances" { "Instances" } " / " }
        h1 { (i.name) " " (badge(i.state.as_str())) }
        div #live data-live-list {
            dl.facts #instance data-host=(i.host) {
                dt { "Host" } dd data-f="host" { a href="/hosts" { (i.host) } }
                dt { "State" } dd { (i.state.as_str()) }
                dt { "Memory" } dd { (i.spec.memory_mib) " MiB" }
                dt { "vCPUs" } dd { (i.spec.vcpus) }
                dt { "CPU model" } dd { (i.spec.cpu_model) }
                dt { "IPs" } dd { @let a = ips(&i); @if a.is_empty() { "not reported (no guest agent)" } @else { (a.join(", ")) } }
                @if let Some(os) = i.guest.as_ref().and_then(|g| g.os.clone()) { dt { "OS" } dd { (os) } }
                dt { "Generation" } dd { (i.generation) }
            }
            @if session.operator() { (actions(&session, &i)) }
            h2 { "Disks" }
            @if i.spec.disks.is_empty() { p.empty { "No disks (the guest boots from its kernel and initramfs)." } }
            @else {
                table.list {
                    thead { tr { th { "Disk" } th { "Image" } th { "Format" } th { "Size" } th { "Bus" } } }
                    tbody {
                        @for d in &i.spec.disks {
                            tr {
                                td data-label="Disk" { (d.id) }
                                td data-label="Image" { (d.image.to_string()) }
                                td data-label="Format" { (format!("{:?}", d.format).to_lowercase()) }
                                td data-label="Size" { (bytes(d.size_bytes)) }
                                td data-label="Bus" { (format!("{:?}", d.bus).to_lowercase()) }
                            }
                        }
                    }
                }
            }
            h2 { "Network" }
            @if i.spec.nics.is_empty() { p.empty { "No NICs." } }
            ul.plain { @for n in &i.spec.nics { li { (n.network) " · " code { (n.mac) } } } }
            h2 { "Migrations" }
            (super::migrations::table(&migrations))
        }
    };
    respond(page(&i.name, Some(&session), Nav::Instances, body))
}

/// `POST /instances/{id}/start|stop`.
pub async fn act(
    State(panel): State<Panel>,
    session: Session,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let fields = Fields(fields);
    if action != "start" && action != "stop" {
        let f = Failure::bad_input(
            "no-such-action",
            format!("instances have no action {action:?}"),
            "use start, stop or the Live Migrate dialog",
        );
        return error_page(Some(&session), &f);
    }
    let path = format!("/v1/instances/{}/{action}", enc(&id));
    let call = panel.api.post_empty::<Instance>(&session.token, &path);
    do_act(&session, &headers, &fields, call, |i| {
        format!("/instances/{}", i.id)
    })
    .await
}
