//! Who an API token belongs to.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a token may do. Clients (the web panel) show or hide actions by it; the server still
/// checks every change itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TokenRole {
    /// Every call, including changes.
    Admin,
    /// Only reading calls.
    ReadOnly,
}

/// `GET /v1/whoami`: the caller's token name and role, so a client can tell a read-only
/// token from an admin one without trying a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Whoami {
    pub name: String,
    pub role: TokenRole,
}
