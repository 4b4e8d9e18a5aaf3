//! `ferry token`: API tokens with a role (admin, operator, reader) and an optional lifetime.
//! Only admins may manage tokens; every change is in the audit log with its actor.

use clap::Subcommand;
use ferry_api::tokens::{
    parse_lifetime, CreateToken, CreatedToken, RevokedTokens, Token, TokenRole,
};

use super::{seg, Ctx};
use crate::error::{exit, CliError};
use crate::output;

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum TokenCommand {
    /// Create a token and print its secret (shown this once; the server keeps only a hash).
    Create {
        /// Unique name, recorded as the actor of what the token changes.
        name: String,
        /// admin (everything), operator (start, stop, migrate, cancel) or reader (reads only).
        #[arg(long, value_parser = parse_role)]
        role: TokenRole,
        /// Lifetime, e.g. 30d, 12h, 90m, 2w; without it the token never expires.
        #[arg(long, value_parser = check_lifetime)]
        expires: Option<String>,
    },
    /// List tokens: role, created, expires, last used (never a secret).
    List,
    /// Revoke the token of this name: refused from its next call on.
    Revoke { name: String },
}

/// Parses a role name as the API spells it (`read_only`, its older name, too).
fn parse_role(s: &str) -> Result<TokenRole, String> {
    match s {
        "admin" => Ok(TokenRole::Admin),
        "operator" => Ok(TokenRole::Operator),
        "reader" | "read_only" => Ok(TokenRole::Reader),
        other => Err(format!(
            "unknown role '{other}' (expected admin, operator or reader)"
        )),
    }
}

/// Checks a lifetime before sending it, so a typo is reported without a round trip.
fn check_lifetime(s: &str) -> Result<String, String> {
    parse_lifetime(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

pub async fn run(ctx: &Ctx, cmd: TokenCommand) -> Result<u8, CliError> {
    match cmd {
        TokenCommand::Create {
            name,
            role,
            expires,
        } => {
            let req = CreateToken {
                name,
                role,
                expires_in: expires,
            };
            let made: CreatedToken = ctx.post("/v1/tokens", &req).await?;
            ctx.print(&made, output::created_token);
        }
        TokenCommand::List => {
            let list: Vec<Token> = ctx.get("/v1/tokens").await?;
            let now = chrono::Utc::now();
            ctx.print(&list, |l| output::tokens_table(l, now));
        }
        TokenCommand::Revoke { name } => {
            let done: RevokedTokens = ctx.delete(&format!("/v1/tokens/{}", seg(&name))).await?;
            ctx.print(&done, |d| {
                d.revoked
                    .iter()
                    .map(|t| format!("revoked token {} ({})", t.name, t.role))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_lifetimes_are_checked_before_sending() {
        assert_eq!(parse_role("operator"), Ok(TokenRole::Operator));
        assert_eq!(parse_role("read_only"), Ok(TokenRole::Reader));
        assert!(parse_role("root")
            .unwrap_err()
            .contains("admin, operator or reader"));
        assert_eq!(check_lifetime("30d"), Ok("30d".into()));
        assert!(check_lifetime("30").is_err());
    }
}
