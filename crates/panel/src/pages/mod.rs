//! One module per page: its handler(s) and its markup.

pub mod hosts;
pub mod instances;
pub mod live;
pub mod migrate;
pub mod migrations;
pub mod signin;

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};

use crate::api::Failure;
use crate::session::{check_form, Session, CSRF_FIELD};
use crate::views::error_page;
use crate::Panel;

/// A posted form's fields, in order (checkboxes appear only when ticked).
pub struct Fields(pub Vec<(String, String)>);

impl Fields {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A field that is present and not blank.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.get(name).map(str::trim).filter(|v| !v.is_empty())
    }

    pub fn checked(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// A whole number, or a clear refusal naming the field.
    pub fn number<T: std::str::FromStr>(
        &self,
        name: &str,
        label: &str,
    ) -> Result<Option<T>, Failure> {
        match self.value(name) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                Failure::bad_input(
                    "invalid-migration-options",
                    format!("{label} must be a whole number, not {v:?}"),
                    format!("type a whole number into {label}, or leave it empty"),
                )
            }),
        }
    }
}

/// The common shape of an action: check the form, call the API, go to `then`, or show the
/// server's refusal.
pub async fn act<T, F>(
    session: &Session,
    headers: &HeaderMap,
    fields: &Fields,
    call: F,
    then: impl FnOnce(T) -> String,
) -> Response
where
    F: std::future::Future<Output = Result<T, Failure>>,
{
    if let Err(f) = check_form(session, headers, fields.get(CSRF_FIELD)) {
        return error_page(Some(session), &f);
    }
    match call.await {
        Ok(v) => Redirect::to(&then(v)).into_response(),
        Err(f) => error_page(Some(session), &f),
    }
}

/// GETs `path` with the signed-in user's token; a refusal comes back as the error page, for
/// the handler to return as it is.
pub async fn fetch<T: serde::de::DeserializeOwned>(
    panel: &Panel,
    session: &Session,
    path: &str,
) -> Result<T, Response> {
    panel
        .api
        .get::<T>(&session.token, path)
        .await
        .map_err(|f| error_page(Some(session), &f))
}
