//! The frame every page shares (navigation, the confirmation dialog, the script) and the
//! small formatting rules, so each figure reads the same on every page.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use ferry_api::migrations::MigrationState;
use maud::{html, Markup, PreEscaped, DOCTYPE};

use crate::api::Failure;
use crate::session::{Session, CSRF_FIELD};

/// Which navigation entry is the current page's.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Hosts,
    Instances,
    Migrations,
    None,
}

/// A whole page: head, navigation (with the signed-in token's name and role), `body`.
pub fn page(title: &str, session: Option<&Session>, nav: Nav, body: Markup) -> Markup {
    let item = |n: Nav, href: &str, label: &str| {
        html! {
            @if nav == n { a href=(href) aria-current="page" { (label) } }
            @else { a href=(href) { (label) } }
        }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Ferry" }
                link rel="icon" href="/assets/favicon.svg";
                link rel="stylesheet" href="/assets/panel.css";
                script src="/assets/panel.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/" { "Ferry" }
                    @if let Some(s) = session {
                        nav aria-label="Main" {
                            (item(Nav::Hosts, "/hosts", "Hosts"))
                            (item(Nav::Instances, "/instances", "Instances"))
                            (item(Nav::Migrations, "/migrations", "Migrations"))
                        }
                        div.who {
                            span #who data-role=(role_name(s)) {
                                (s.name) " · " (role_name(s))
                            }
                            form method="post" action="/signout" {
                                (csrf(s))
                                button.link type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main #main tabindex="-1" { (body) }
                dialog #confirm aria-labelledby="confirm-text" {
                    form method="dialog" {
                        p #confirm-text {}
                        div.buttons {
                            button value="cancel" autofocus { "Cancel" }
                            button.danger #confirm-ok value="ok" { "Confirm" }
                        }
                    }
                }
            }
        }
    }
}

fn role_name(s: &Session) -> &'static str {
    s.role.as_str()
}

/// The hidden CSRF field of a form.
pub fn csrf(s: &Session) -> Markup {
    html! { input type="hidden" name=(CSRF_FIELD) value=(s.csrf); }
}

/// A one-button form that posts to `action`; `confirm` asks first (for what can hurt).
pub fn action_button(
    s: &Session,
    action: &str,
    label: &str,
    class: &str,
    confirm: Option<&str>,
) -> Markup {
    html! {
        form.inline method="post" action=(action) data-confirm=[confirm] {
            (csrf(s))
            button class=(class) type="submit" { (label) }
        }
    }
}

/// An API failure as a page: the server's sentence and hint, with its code.
pub fn error_page(session: Option<&Session>, f: &Failure) -> Response {
    let status = StatusCode::from_u16(f.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = html! {
        h1 { "That did not work" }
        (error_box(f))
        p { a href="/" data-back { "Back" } " · " a href="/" { "Home" } }
    };
    (
        status,
        Html(page("Error", session, Nav::None, body).into_string()),
    )
        .into_response()
}

/// The server's error: sentence, hint, code.
pub fn error_box(f: &Failure) -> Markup {
    html! {
        div.error role="alert" {
            p.message { (f.body.message) }
            @if !f.body.hint.is_empty() { p.hint { "Hint: " (f.body.hint) } }
            p.code { "code " code { (f.body.code) } " · HTTP " (f.status) }
        }
    }
}

/// Renders a page as the answer.
pub fn respond(m: Markup) -> Response {
    Html(m.into_string()).into_response()
}

/// Bytes in the unit people read (KiB, MiB, GiB), binary like QEMU's and the CLI's.
pub fn bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

/// A rate in MiB/s.
pub fn rate(bps: f64) -> String {
    format!("{:.1} MiB/s", bps / 1048576.0)
}

/// A duration from milliseconds: "850 ms", "12.4 s", "3 min 5 s".
pub fn ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 120_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

/// A migration state as a badge (colour and word; the word alone carries the meaning).
pub fn state_badge(s: MigrationState) -> Markup {
    html! { span class=(format!("badge st-{}", s.as_str())) data-f="state" { (title_case(s.as_str())) } }
}

/// Any other state word as a badge.
pub fn badge(word: &str) -> Markup {
    html! { span class=(format!("badge st-{word}")) { (title_case(word)) } }
}

pub fn title_case(s: &str) -> String {
    let s = s.replace('_', " ");
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// JSON for a `<script type="application/json">` island: `<` escaped so the text can never
/// close the script element.
pub fn json_island(id: &str, value: &serde_json::Value) -> Markup {
    let text = value.to_string().replace('<', "\\u003c");
    html! { script type="application/json" id=(id) { (PreEscaped(text)) } }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_in_their_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
        assert_eq!(ms(850), "850 ms");
        assert_eq!(ms(12_400), "12.4 s");
        assert_eq!(ms(185_000), "3 min 5 s");
        assert_eq!(rate(2.0 * 1048576.0), "2.0 MiB/s");
    }

    #[test]
    fn json_islands_cannot_close_their_script() {
        let v = serde_json::json!({"a": "</script><b>"});
        let s = json_island("x", &v).into_string();
        assert!(!s.contains("</script><b>"), "{s}");
    }
}
