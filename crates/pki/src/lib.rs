//! Ferry's certificates.
//!
//! The server owns a cluster CA ([`ClusterCa`]): it signs the server's HTTPS certificate, the
//! server's client identity for calling agents, and each agent's certificate (from a CSR; the
//! agent's key never leaves its host). A second root signs the short-lived certificate pairs
//! of migration streams. [`tls`] turns these into rustls configurations for every connection
//! Ferry makes, and [`listener`] serves axum over them.

mod ca;
mod error;
pub mod files;
pub mod listener;
pub mod tls;

pub use ca::{
    generate_key_and_csr, qemu_dn, CertKey, ClusterCa, ExternalCa, Issued, LeafSpec,
    MigrationCreds, Usage, AGENT_CERT_VALIDITY, BACKDATE, MIGRATION_CREDS_TTL,
    SERVER_CERT_VALIDITY, SERVER_CLIENT_CN,
};
pub use error::PkiError;
pub use listener::{ServerConfigSlot, TlsListener};
pub use tls::RevokedSerials;

use sha2::{Digest, Sha256};

/// `sha256:AB:CD:...` of a certificate's DER: what the server prints at first start and what a
/// CLI pins.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    let hex: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
    format!("sha256:{}", hex.join(":"))
}

/// The 32 bytes of a fingerprint written as `sha256:AB:CD:...` (colons and case optional).
pub fn parse_fingerprint(pin: &str) -> Result<[u8; 32], PkiError> {
    let trimmed = pin.trim();
    let body = trimmed
        .strip_prefix("sha256:")
        .or_else(|| trimmed.strip_prefix("SHA256:"))
        .unwrap_or(trimmed);
    let hex_digits: String = body.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(&hex_digits).map_err(|_| PkiError::BadPin(pin.to_string()))?;
    bytes
        .try_into()
        .map_err(|_| PkiError::BadPin(pin.to_string()))
}

#[cfg(test)]
mod tests;
