//! How bearer secrets (API tokens, agent credentials) are made, kept and checked.
//!
//! The database keeps no secret and no unsalted hash of one: each row holds an argon2id hash
//! (salted, deliberately slow) and a *lookup key* that finds the row without hashing. New
//! secrets read `ferry_<id>_<secret>`, and the id is the lookup key, so a check costs one
//! argon2 verification. Rows written by Ferry before the hashes were salted are kept working:
//! their lookup key is a 64-bit prefix of the old SHA-256 (useless for guessing a 256-bit
//! random secret) and their hash is the old SHA-256 marked `sha256:`, replaced by an argon2
//! hash at their next successful use.
//!
//! Because argon2 is slow on purpose, a [`VerifiedCache`] remembers recent successful checks
//! for a short time, keyed by a hash of the presented secret (in memory only), and forgets a
//! token or credential at once when it is revoked or replaced.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use chrono::{DateTime, Utc};
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::tokens::Role;

/// The prefix of every secret Ferry makes, so a leaked one is recognisable (secret scanners,
/// log review) and its lookup id can be found without hashing.
pub const SECRET_PREFIX: &str = "ferry_";

/// How a row written before salted hashes marks its unsalted SHA-256.
const LEGACY_HASH: &str = "sha256:";

/// How long a verified secret is trusted without verifying it again: short, so that a change
/// made by another server process on the same database (a revoke) is honoured soon; long
/// enough that heartbeats and API calls rarely pay argon2.
pub const CACHE_TTL: Duration = Duration::from_secs(60);

/// The most entries the cache keeps; beyond it, expired entries are dropped and, if still
/// full, the whole cache is cleared (a flood of distinct valid secrets is not a normal load).
const CACHE_MAX: usize = 4096;

/// A freshly made secret: the lookup id (stored) and the whole secret (shown once, never
/// stored). `Debug` leaves the secret out.
pub struct NewSecret {
    pub id: String,
    pub secret: String,
}

impl fmt::Debug for NewSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewSecret")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Makes a secret `ferry_<16 hex id>_<64 hex secret>` from the OS's random source: 256 bits
/// that are never guessed, plus an id that finds its row.
pub fn new_secret() -> NewSecret {
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    OsRng.fill_bytes(&mut id);
    OsRng.fill_bytes(&mut secret);
    let id = hex::encode(id);
    let secret = format!("{SECRET_PREFIX}{id}_{}", hex::encode(secret));
    NewSecret { id, secret }
}

/// The lookup key of a presented secret: the id of a `ferry_<id>_<secret>`, else (a secret
/// made before ids, or the configured admin token) the legacy key, a prefix of its SHA-256.
pub fn lookup_key(presented: &str) -> String {
    match split_new(presented) {
        Some(id) => id.to_string(),
        None => legacy_lookup_key(presented),
    }
}

/// Whether a presented secret has the `ferry_<id>_<secret>` shape.
pub fn is_new_format(presented: &str) -> bool {
    split_new(presented).is_some()
}

fn split_new(presented: &str) -> Option<&str> {
    let rest = presented.strip_prefix(SECRET_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex16 = id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit());
    (hex16 && !secret.is_empty()).then_some(id)
}

/// The key under which a row from before salted hashes is found: `sha256:` and the first 16
/// hex digits (64 bits) of the old hash, the same prefix the schema migration kept.
pub fn legacy_lookup_key(presented: &str) -> String {
    let full = hex::encode(Sha256::digest(presented.as_bytes()));
    format!("{LEGACY_HASH}{}", &full[..16])
}

/// Errors of hashing, which only a broken argon2 configuration or RNG could cause.
#[derive(Debug, thiserror::Error)]
#[error("cannot hash a secret: {0}")]
pub struct HashError(String);

/// The argon2id hash (PHC string with its random salt and parameters) to store for `secret`.
pub fn hash(secret: &str) -> Result<String, HashError> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError(e.to_string()))
}

/// What checking a presented secret against a stored hash found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// The secret does not match.
    No,
    /// It matches an argon2 hash.
    Yes,
    /// It matches an old unsalted SHA-256, which should now be replaced by [`hash`].
    YesLegacy,
}

/// Checks `presented` against `stored` (an argon2 PHC string, or a legacy `sha256:` hash)
/// without revealing through timing how much of it matched. A stored value that is neither
/// never matches.
pub fn verify(stored: &str, presented: &str) -> Verified {
    if let Some(old) = stored.strip_prefix(LEGACY_HASH) {
        let given = hex::encode(Sha256::digest(presented.as_bytes()));
        return if crate::auth::constant_time_eq(given.as_bytes(), old.as_bytes()) {
            Verified::YesLegacy
        } else {
            Verified::No
        };
    }
    let Ok(parsed) = PasswordHash::new(stored) else {
        return Verified::No;
    };
    match Argon2::default().verify_password(presented.as_bytes(), &parsed) {
        Ok(()) => Verified::Yes,
        Err(_) => Verified::No,
    }
}

/// Who a verified secret belongs to, as the cache remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// An API token: its row id, name, role and expiry (checked at every use, cached or not).
    Token {
        id: String,
        name: String,
        role: Role,
        expires_at: Option<DateTime<Utc>>,
    },
    /// An agent's credential: the host it was issued to.
    Agent { host: String },
}

/// Recently verified secrets, so that argon2 runs once per [`CACHE_TTL`] per secret and not
/// on every heartbeat or API call. Keys are SHA-256 digests of the presented secrets and live
/// only in this process's memory.
#[derive(Default)]
pub struct VerifiedCache {
    entries: Mutex<HashMap<[u8; 32], (Principal, Instant)>>,
}

impl fmt::Debug for VerifiedCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.entries.lock().map(|e| e.len()).unwrap_or(0);
        f.debug_struct("VerifiedCache")
            .field("entries", &n)
            .finish()
    }
}

fn cache_key(presented: &str) -> [u8; 32] {
    Sha256::digest(presented.as_bytes()).into()
}

impl VerifiedCache {
    /// The principal a secret was verified for less than [`CACHE_TTL`] ago.
    pub fn get(&self, presented: &str) -> Option<Principal> {
        let key = cache_key(presented);
        let mut entries = self.entries.lock().ok()?;
        match entries.get(&key) {
            Some((p, at)) if at.elapsed() < CACHE_TTL => Some(p.clone()),
            Some(_) => {
                entries.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Remembers a successful verification.
    pub fn put(&self, presented: &str, principal: Principal) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.len() >= CACHE_MAX {
            entries.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
            if entries.len() >= CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert(cache_key(presented), (principal, Instant::now()));
    }

    /// Forgets every entry for the API token with this row id (revoked or replaced).
    pub fn forget_token(&self, token_id: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(|_, (p, _)| !matches!(p, Principal::Token { id, .. } if id == token_id));
        }
    }

    /// Forgets every entry for the API tokens with this name.
    pub fn forget_token_name(&self, token_name: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(
                |_, (p, _)| !matches!(p, Principal::Token { name, .. } if name == token_name),
            );
        }
    }

    /// Forgets the credential of this host's agent (joined again with a new one).
    pub fn forget_agent(&self, host_name: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            entries
                .retain(|_, (p, _)| !matches!(p, Principal::Agent { host } if host == host_name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_secrets_carry_their_id_and_are_unique() {
        let a = new_secret();
        let b = new_secret();
        assert_ne!(a.secret, b.secret);
        assert_ne!(a.id, b.id);
        assert!(a.secret.starts_with("ferry_"));
        assert_eq!(lookup_key(&a.secret), a.id);
        assert!(is_new_format(&a.secret));
        assert!(!format!("{a:?}").contains(&a.secret), "{a:?}");
    }

    #[test]
    fn other_secrets_are_looked_up_by_a_short_legacy_prefix() {
        for s in [
            "admin-secret",
            "ferry_short_x",
            "ferry_0123456789abcdef_",
            "",
        ] {
            let key = lookup_key(s);
            assert!(key.starts_with("sha256:"), "{s}: {key}");
            assert_eq!(key.len(), "sha256:".len() + 16);
            assert!(!is_new_format(s));
        }
    }

    #[test]
    fn an_argon2_hash_is_salted_and_verifies_only_its_secret() {
        let h1 = hash("ferry_0123456789abcdef_secret").unwrap();
        let h2 = hash("ferry_0123456789abcdef_secret").unwrap();
        assert!(h1.starts_with("$argon2id$"), "{h1}");
        assert_ne!(h1, h2, "each hash has its own salt");
        assert!(!h1.contains("secret"));
        assert_eq!(verify(&h1, "ferry_0123456789abcdef_secret"), Verified::Yes);
        assert_eq!(verify(&h1, "ferry_0123456789abcdef_secreT"), Verified::No);
        assert_eq!(verify("garbage", "anything"), Verified::No);
    }

    #[test]
    fn a_legacy_hash_verifies_and_asks_for_a_rehash() {
        let old = format!("sha256:{}", hex::encode(Sha256::digest(b"old-token")));
        assert_eq!(verify(&old, "old-token"), Verified::YesLegacy);
        assert_eq!(verify(&old, "old-tokem"), Verified::No);
    }

    #[test]
    fn the_cache_forgets_revoked_tokens_and_rejoined_agents() {
        let cache = VerifiedCache::default();
        let token = Principal::Token {
            id: "t1".into(),
            name: "ci".into(),
            role: Role::Operator,
            expires_at: None,
        };
        cache.put("secret-a", token.clone());
        cache.put("secret-b", Principal::Agent { host: "hv1".into() });
        assert_eq!(cache.get("secret-a"), Some(token));
        assert_eq!(cache.get("secret-c"), None);
        cache.forget_token("t1");
        assert_eq!(cache.get("secret-a"), None);
        assert!(cache.get("secret-b").is_some());
        cache.forget_agent("hv1");
        assert_eq!(cache.get("secret-b"), None);
        assert!(!format!("{cache:?}").contains("secret"));
    }
}
