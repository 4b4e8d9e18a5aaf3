//! Hosts: state, accelerator, CPU, QEMU, RAM, datastores, instances, migrations in and out;
//! enable and disable.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Form;
use ferry_api::hosts::{Host, HostState};
use ferry_api::instances::Instance;
use ferry_api::migrations::Migration;
use maud::html;

use super::{act as do_act, Fields};
use crate::api::{enc, Failure};
use crate::session::Session;
use crate::views::{action_button, badge, bytes, error_page, page, respond, Nav};
use crate::Panel;

/// `GET /hosts`.
pub async fn list(State(panel): State<Panel>, session: Session) -> Response {
    let t = &session.token;
    let (hosts, instances, migrations) = match (
        panel.api.get::<Vec<Host>>(t, "/v1/hosts").await,
        panel.api.get::<Vec<Instance>>(t, "/v1/instances").await,
        panel
            .api
            .get::<Vec<Migration>>(t, "/v1/migrations?limit=500")
            .await,
    ) {
        (Ok(h), Ok(i), Ok(m)) => (h, i, m),
        (Err(f), _, _) | (_, Err(f), _) | (_, _, Err(f)) => return error_page(Some(&session), &f),
    };
    let active: Vec<&Migration> = migrations
        .iter()
        .filter(|m| !m.state.is_terminal())
        .collect();
    let body = html! {
        h1 { "Hosts" }
        div #live data-live-list {
            @if hosts.is_empty() { p.empty { "No host has joined yet. Start `ferry agent` on a hypervisor." } }
            div.cards {
                @for h in &hosts {
                    @let on_host: Vec<&Instance> = instances.iter().filter(|i| i.host == h.name).collect();
                    @let outgoing = active.iter().filter(|m| m.source == h.name).count();
                    @let incoming = active.iter().filter(|m| m.destination == h.name).count();
                    article.card data-host=(h.name) {
                        header {
                            h2 { (h.name) }
                            (badge(match h.state { HostState::Online => "online", HostState::Offline => "offline" }))
                            @if !h.enabled { (badge("disabled")) }
                        }
                        @if let Some(f) = &h.facts {
                            dl.facts {
                                dt { "Accelerator" } dd { (f.accel) }
                                dt { "CPU model" } dd { (f.cpu_model) " (" (f.cores) " cores)" }
                                dt { "QEMU" } dd { (f.qemu_version) }
                                dt { "RAM free / total" } dd {
                                    (f.ram_free_mib) " / " (f.ram_total_mib) " MiB"
                                    meter min="0" max=(f.ram_total_mib) value=(f.ram_total_mib.saturating_sub(f.ram_free_mib)) aria-label="RAM in use" {}
                                }
                                dt { "Migration address" } dd { (f.migration_addr) }
                            }
                            h3 { "Datastores" }
                            @if f.datastores.is_empty() { p.empty { "none" } }
                            ul.plain {
                                @for d in &f.datastores {
                                    li {
                                        strong { (d.name) } " " (bytes(d.free_bytes)) " free of " (bytes(d.total_bytes))
                                        @if d.identity.is_some() { " · " span.tag { "shared identity" } }
                                    }
                                }
                            }
                        } @else {
                            p.empty { "No facts reported yet." }
                        }
                        h3 { "Instances (" (on_host.len()) ")" }
                        ul.plain {
                            @for i in &on_host {
                                li { a href=(format!("/instances/{}", i.id)) { (i.name) } " " (badge(i.state.as_str())) }
                            }
                        }
                        p { "Migrations out: " strong { (outgoing) } " · in: " strong { (incoming) }
                            " · " a href=(format!("/migrations?host={}", enc(&h.name))) { "history" } }
                        @if session.admin() {
                            div.actions {
                                @if h.enabled {
                                    (action_button(&session, &format!("/hosts/{}/disable", enc(&h.name)), "Disable", "danger",
                                        Some(&format!("Disable {}? It will receive no new instances or migrations.", h.name))))
                                } @else {
                                    (action_button(&session, &format!("/hosts/{}/enable", enc(&h.name)), "Enable", "", None))
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    respond(page("Hosts", Some(&session), Nav::Hosts, body))
}

/// `POST /hosts/{name}/enable|disable`.
pub async fn act(
    State(panel): State<Panel>,
    session: Session,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let fields = Fields(fields);
    if action != "enable" && action != "disable" {
        let f = Failure::bad_input(
            "no-such-action",
            format!("hosts have no action {action:?}"),
            "use enable or disable",
        );
        return error_page(Some(&session), &f);
    }
    let path = format!("/v1/hosts/{}/{action}", enc(&name));
    let call = panel.api.post_empty::<Host>(&session.token, &path);
    do_act(&session, &headers, &fields, call, |_| "/hosts".to_string()).await
}
