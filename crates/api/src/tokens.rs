//! API tokens: who a token belongs to, what its role lets it do, and the token routes
//! (`/v1/tokens`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a token may do. Clients (the web panel) show or hide actions by it; the server still
/// checks every call itself. Each role may do everything the one below it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TokenRole {
    /// Only reading calls: dashboards and monitoring that must not move anything. Tokens
    /// created as `read_only` (the name before operators existed) are readers.
    #[serde(alias = "read_only")]
    Reader,
    /// Day-to-day operation of guests: start, stop, migrate, cancel and steer migrations;
    /// no change to hosts, tokens, instance definitions or cluster settings.
    Operator,
    /// Every call, including hosts, tokens and instance definitions.
    Admin,
}

impl TokenRole {
    /// The role's name as the API and the CLI spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRole::Reader => "reader",
            TokenRole::Operator => "operator",
            TokenRole::Admin => "admin",
        }
    }

    /// Whether this role includes everything `needed` may do.
    pub fn allows(self, needed: TokenRole) -> bool {
        self >= needed
    }
}

impl std::fmt::Display for TokenRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `GET /v1/whoami`: the caller's token name and role, so a client can tell what a token may
/// do without trying a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Whoami {
    pub name: String,
    pub role: TokenRole,
}

/// An API token as listed: everything but its secret, which the server never keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Token {
    pub id: String,
    pub name: String,
    pub role: TokenRole,
    pub created_at: DateTime<Utc>,
    /// After this instant the token is refused (`token-expired`); none: it never expires.
    pub expires_at: Option<DateTime<Utc>>,
    /// When the token last authenticated a call (to the minute: checks within a minute of
    /// each other are remembered, not recorded each).
    pub last_used_at: Option<DateTime<Utc>>,
    /// The token set in the server's configuration (`admin_token`): it is managed there and
    /// cannot be revoked through the API.
    #[serde(default)]
    pub from_config: bool,
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Unique among live tokens; what the audit log names as the actor of its changes.
    pub name: String,
    pub role: TokenRole,
    /// How long the token lives, e.g. `30d`, `12h`, `90m`, `2w` (see [`parse_lifetime`]);
    /// none: it never expires.
    #[serde(default)]
    pub expires_in: Option<String>,
}

/// The answer to `POST /v1/tokens`: the only time the secret is shown.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    pub token: Token,
    /// The bearer secret. Store it now: the server keeps only a salted hash.
    pub secret: String,
}

impl std::fmt::Debug for CreatedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedToken")
            .field("token", &self.token)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// The answer to `DELETE /v1/tokens/{name}`: what was revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RevokedTokens {
    pub revoked: Vec<Token>,
}

/// A lifetime that is not a positive number followed by `m`, `h`, `d` or `w`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a token lifetime (expected a number and a unit: 90m, 12h, 30d, 2w)")]
pub struct LifetimeError(pub String);

/// The longest lifetime accepted: about ten years; longer is "never" and should say so.
const MAX_LIFETIME: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// Parses a token lifetime: a positive whole number and a unit, `m` (minutes), `h` (hours),
/// `d` (days) or `w` (weeks), at most about ten years.
pub fn parse_lifetime(text: &str) -> Result<Duration, LifetimeError> {
    let err = || LifetimeError(text.to_string());
    let t = text.trim();
    let unit_at = t.len().checked_sub(1).ok_or_else(err)?;
    if !t.is_char_boundary(unit_at) {
        return Err(err());
    }
    let (n, unit) = t.split_at(unit_at);
    let n: u64 = n.parse().map_err(|_| err())?;
    let secs_per = match unit {
        "m" => 60,
        "h" => 3600,
        "d" => 24 * 3600,
        "w" => 7 * 24 * 3600,
        _ => return Err(err()),
    };
    let secs = n.checked_mul(secs_per).ok_or_else(err)?;
    if n == 0 || Duration::from_secs(secs) > MAX_LIFETIME {
        return Err(err());
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_parse_with_units_and_refuse_the_rest() {
        assert_eq!(parse_lifetime("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert_eq!(parse_lifetime("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_lifetime("90m"), Ok(Duration::from_secs(90 * 60)));
        assert_eq!(parse_lifetime("2w"), Ok(Duration::from_secs(14 * 86400)));
        for bad in [
            "",
            "d",
            "0d",
            "30",
            "30s",
            "-1d",
            "1.5h",
            "99999999999999999w",
            "40000d",
            "é",
        ] {
            assert!(parse_lifetime(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn roles_are_ordered_and_read_only_is_a_reader() {
        assert!(TokenRole::Admin.allows(TokenRole::Operator));
        assert!(TokenRole::Operator.allows(TokenRole::Reader));
        assert!(!TokenRole::Operator.allows(TokenRole::Admin));
        assert!(!TokenRole::Reader.allows(TokenRole::Operator));
        let r: TokenRole = serde_json::from_str("\"read_only\"").unwrap();
        assert_eq!(r, TokenRole::Reader);
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"reader\"");
    }

    #[test]
    fn a_created_token_does_not_print_its_secret() {
        let c = CreatedToken {
            token: Token {
                id: "i".into(),
                name: "n".into(),
                role: TokenRole::Reader,
                created_at: Utc::now(),
                expires_at: None,
                last_used_at: None,
                from_config: false,
            },
            secret: "ferry_0011_topsecret".into(),
        };
        assert!(!format!("{c:?}").contains("topsecret"));
    }
}
