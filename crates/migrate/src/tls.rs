//! TLS for every stream of one migration: memory (multifd channels and post-copy's channels
//! included, since QEMU opens them all with its migration `tls-creds`), post-copy recovery,
//! and block migration's NBD export and mirror.
//!
//! Each half gets short-lived credentials made for this migration only. [`StreamTls`] owns the
//! directory QEMU reads them from, under QEMU's fixed file names, and removes it when dropped,
//! whatever the migration's outcome: the files never outlive the half that holds them.
//! [`StreamTls::apply`] gives QEMU the credentials as a `tls-creds-x509` object (and, on the
//! destination, an `authz-simple` object that lets in the source's identity only) and sets the
//! migration parameters; block migration's NBD server and client read those same parameters
//! ([`nbd_server_tls`], [`nbd_client_tls`]), so no stream of the migration can be left plain
//! while the memory is encrypted. [`StreamTls::remove`] takes them out of a QEMU that lives on.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ferry_qmp::commands::{
    MigrateSetParameters, ObjectAddAuthzSimple, ObjectAddTlsCredsX509, ObjectDel,
    QueryMigrateParameters,
};
use ferry_qmp::{Qmp, QmpError};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

/// The id of the credentials object Ferry adds to a QEMU for its migration streams.
pub const CREDS_ID: &str = "ferry-tls-creds";

/// The id of the authz object that names the one client a destination accepts.
pub const AUTHZ_ID: &str = "ferry-tls-authz";

/// Why a half's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The credentials given are unusable (empty, not PEM, no peer named).
    #[error("invalid migration TLS credentials: {0}")]
    Invalid(String),
    /// The credentials directory could not be written.
    #[error("cannot write the migration TLS credentials in {dir}: {source}")]
    Write {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// QEMU refused the credentials objects or parameters.
    #[error("QEMU refused the migration TLS credentials: {0}")]
    Qemu(#[from] QmpError),
}

/// Who is at the other end of the stream, which also says which end this half is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsPeer {
    /// This half accepts the stream (destination): only a client whose certificate has this
    /// distinguished name (as QEMU prints it, e.g. `CN=ferry-migration-ID-source`) may send.
    Client { identity: String },
    /// This half opens the stream (source): the destination's certificate must be valid for
    /// this name (its migration address, matched against the certificate's SAN).
    Server { hostname: String },
}

/// One half's credentials: the migration's CA, this half's certificate and key, and the peer.
///
/// `Debug` never shows the key, so the type can sit in requests and logs safely.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsCredentials {
    /// The CA that signed both halves' certificates (PEM).
    pub ca_pem: String,
    /// This half's certificate (PEM).
    pub cert_pem: String,
    /// This half's private key (PEM).
    pub key_pem: String,
    /// The other end, and so this half's role.
    pub peer: TlsPeer,
}

impl fmt::Debug for TlsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCredentials")
            .field("ca_pem", &format_args!("<{} bytes>", self.ca_pem.len()))
            .field("cert_pem", &format_args!("<{} bytes>", self.cert_pem.len()))
            .field("key_pem", &format_args!("<redacted>"))
            .field("peer", &self.peer)
            .finish()
    }
}

/// One migration's two halves as an issuer hands them out: what the source opens the stream
/// with and what the destination accepts it with.
#[derive(Debug, Clone)]
pub struct HalvesTls {
    pub source: TlsCredentials,
    pub destination: TlsCredentials,
}

impl HalvesTls {
    /// From one pair of certificates of a migration CA (`ca_pem`): the source checks the
    /// destination's certificate against `destination_addr` (its SAN), the destination lets in
    /// `source_dn` only.
    pub fn from_pair(
        ca_pem: &str,
        source: (String, String),
        destination: (String, String),
        source_dn: &str,
        destination_addr: std::net::IpAddr,
    ) -> HalvesTls {
        HalvesTls {
            source: TlsCredentials {
                ca_pem: ca_pem.to_string(),
                cert_pem: source.0,
                key_pem: source.1,
                peer: TlsPeer::Server {
                    hostname: destination_addr.to_string(),
                },
            },
            destination: TlsCredentials {
                ca_pem: ca_pem.to_string(),
                cert_pem: destination.0,
                key_pem: destination.1,
                peer: TlsPeer::Client {
                    identity: source_dn.to_string(),
                },
            },
        }
    }
}

impl TlsCredentials {
    /// True for the half that accepts the stream (QEMU's `server` endpoint).
    pub fn is_server(&self) -> bool {
        matches!(self.peer, TlsPeer::Client { .. })
    }

    /// Refuses credentials that cannot work, before anything is written or started.
    pub fn validate(&self) -> Result<(), TlsError> {
        for (what, pem, label) in [
            ("CA certificate", &self.ca_pem, "CERTIFICATE"),
            ("certificate", &self.cert_pem, "CERTIFICATE"),
            ("private key", &self.key_pem, "PRIVATE KEY"),
        ] {
            if !(pem.contains("-----BEGIN ") && pem.contains(label)) {
                return Err(TlsError::Invalid(format!(
                    "the {what} is not a PEM {label}"
                )));
            }
        }
        let peer = match &self.peer {
            TlsPeer::Client { identity } => identity,
            TlsPeer::Server { hostname } => hostname,
        };
        if peer.trim().is_empty() || peer.contains('\0') {
            return Err(TlsError::Invalid(
                "the peer's identity or host name is empty".into(),
            ));
        }
        Ok(())
    }

    /// The file names QEMU's `tls-creds-x509` reads for this endpoint: (certificate, key).
    fn file_names(&self) -> (&'static str, &'static str) {
        if self.is_server() {
            ("server-cert.pem", "server-key.pem")
        } else {
            ("client-cert.pem", "client-key.pem")
        }
    }
}

/// One half's credentials on disk and in its QEMU. Owns the directory: dropping it removes
/// the files, whether the migration completed, failed or was cancelled.
pub struct StreamTls {
    dir: PathBuf,
    creds: TlsCredentials,
}

impl fmt::Debug for StreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamTls")
            .field("dir", &self.dir)
            .field("creds", &self.creds)
            .finish()
    }
}

impl StreamTls {
    /// Writes `creds` into `dir` (created 0700, replacing what a crashed earlier half left
    /// there), each file 0600, under the names QEMU expects.
    pub fn create(dir: impl Into<PathBuf>, creds: TlsCredentials) -> Result<StreamTls, TlsError> {
        creds.validate()?;
        // QEMU resolves the directory itself, from its own working directory.
        let dir = std::path::absolute(dir.into()).map_err(|e| {
            TlsError::Invalid(format!(
                "the credentials directory has no absolute path: {e}"
            ))
        })?;
        let failed = |source| TlsError::Write {
            dir: dir.clone(),
            source,
        };
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => warn!(dir = %dir.display(), "removed stale migration credentials"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(failed(e)),
        }
        std::fs::DirBuilder::new()
            .recursive(false)
            .mode(0o700)
            .create(&dir)
            .map_err(failed)?;
        // From here on the guard exists, so a failed write removes what was written.
        let tls = StreamTls { dir, creds };
        let (cert, key) = tls.creds.file_names();
        for (name, content) in [
            ("ca-cert.pem", &tls.creds.ca_pem),
            (cert, &tls.creds.cert_pem),
            (key, &tls.creds.key_pem),
        ] {
            write_private(&tls.dir.join(name), content).map_err(|source| TlsError::Write {
                dir: tls.dir.clone(),
                source,
            })?;
        }
        debug!(dir = %tls.dir.display(), server = tls.creds.is_server(), "migration credentials written");
        Ok(tls)
    }

    /// The directory holding the files (gone once this is dropped).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The credentials and the peer they were made for.
    pub fn credentials(&self) -> &TlsCredentials {
        &self.creds
    }

    /// Gives QEMU the credentials and makes every stream of its migrations use them: the
    /// credentials object, on a destination the authz object naming the source's identity,
    /// and the `tls-creds` with `tls-authz` (destination) or `tls-hostname` (source)
    /// parameters. Call it before `migrate-incoming`, `migrate` or the NBD export; leftovers
    /// of an earlier attempt in the same QEMU are replaced. On failure nothing stays added.
    pub async fn apply(&self, qmp: &Qmp) -> Result<(), TlsError> {
        remove_objects(qmp).await;
        let dir = self.dir.to_string_lossy().into_owned();
        let endpoint = if self.creds.is_server() {
            "server"
        } else {
            "client"
        };
        let applied = async {
            qmp.execute(&ObjectAddTlsCredsX509::new(CREDS_ID, dir, endpoint))
                .await?;
            let params = match &self.creds.peer {
                TlsPeer::Client { identity } => {
                    qmp.execute(&ObjectAddAuthzSimple::new(AUTHZ_ID, identity.clone()))
                        .await?;
                    MigrateSetParameters {
                        tls_creds: Some(CREDS_ID.into()),
                        tls_authz: Some(AUTHZ_ID.into()),
                        tls_hostname: Some(String::new()),
                        ..Default::default()
                    }
                }
                TlsPeer::Server { hostname } => MigrateSetParameters {
                    tls_creds: Some(CREDS_ID.into()),
                    tls_hostname: Some(hostname.clone()),
                    tls_authz: Some(String::new()),
                    ..Default::default()
                },
            };
            qmp.execute(&params).await
        }
        .await;
        if let Err(e) = applied {
            remove(qmp).await;
            return Err(e.into());
        }
        debug!(endpoint, "migration streams use TLS");
        Ok(())
    }

    /// Takes the credentials out of a QEMU that lives on after the migration (the source after
    /// a failure or cancel, the destination once it runs the guest): its next migration must
    /// not find this one's objects or parameters. Best effort; the files go with `self`.
    pub async fn remove(&self, qmp: &Qmp) {
        remove(qmp).await
    }
}

impl Drop for StreamTls {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => debug!(dir = %self.dir.display(), "migration credentials removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(dir = %self.dir.display(), error = %e, "cannot remove the migration credentials")
            }
        }
    }
}

/// Resets QEMU's TLS migration parameters and deletes Ferry's objects; errors are logged only
/// (a QEMU that is gone has nothing left to remove).
pub async fn remove(qmp: &Qmp) {
    let reset = MigrateSetParameters {
        tls_creds: Some(String::new()),
        tls_hostname: Some(String::new()),
        tls_authz: Some(String::new()),
        ..Default::default()
    };
    if let Err(e) = qmp.execute(&reset).await {
        debug!(error = %e, "cannot reset the TLS migration parameters");
    }
    remove_objects(qmp).await;
}

async fn remove_objects(qmp: &Qmp) {
    for id in [AUTHZ_ID, CREDS_ID] {
        match qmp.execute(&ObjectDel { id: id.into() }).await {
            Ok(()) => debug!(id, "TLS object removed"),
            Err(QmpError::Command { desc, .. }) if desc.contains("not found") => {}
            Err(e) => debug!(id, error = %e, "cannot remove TLS object"),
        }
    }
}

/// The credentials and authz objects block migration's NBD server must use: those of the
/// QEMU's migration parameters (set by [`StreamTls::apply`]), `None` for a plain migration.
pub async fn nbd_server_tls(qmp: &Qmp) -> Result<Option<(String, Option<String>)>, QmpError> {
    let p = qmp.execute(&QueryMigrateParameters).await?;
    Ok(non_empty(p.tls_creds).map(|creds| (creds, non_empty(p.tls_authz))))
}

/// The credentials object and host name block migration's NBD client must use: those of the
/// QEMU's migration parameters (set by [`StreamTls::apply`]), `None` for a plain migration.
pub async fn nbd_client_tls(qmp: &Qmp) -> Result<Option<(String, Option<String>)>, QmpError> {
    let p = qmp.execute(&QueryMigrateParameters).await?;
    Ok(non_empty(p.tls_creds).map(|creds| (creds, non_empty(p.tls_hostname))))
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

/// Creates `path` readable and writable by its owner only, and never follows or replaces an
/// existing file.
fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(content.as_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn creds(peer: TlsPeer) -> TlsCredentials {
        TlsCredentials {
            ca_pem: "-----BEGIN CERTIFICATE-----\nca\n-----END CERTIFICATE-----\n".into(),
            cert_pem: "-----BEGIN CERTIFICATE-----\nme\n-----END CERTIFICATE-----\n".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----\nsecret-key-bytes\n-----END PRIVATE KEY-----\n"
                .into(),
            peer,
        }
    }

    #[test]
    fn files_are_private_named_for_the_endpoint_and_gone_on_drop() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("tls-dest");
        let tls = StreamTls::create(
            &dir,
            creds(TlsPeer::Client {
                identity: "CN=x".into(),
            }),
        )
        .unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for name in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
            assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
        }
        assert!(!dir.join("client-key.pem").exists());
        drop(tls);
        assert!(
            !dir.exists(),
            "the credentials are removed with their guard"
        );

        let dir = base.path().join("tls-src");
        let tls = StreamTls::create(
            &dir,
            creds(TlsPeer::Server {
                hostname: "10.78.0.12".into(),
            }),
        )
        .unwrap();
        assert!(dir.join("client-cert.pem").exists() && dir.join("client-key.pem").exists());
        drop(tls);
        assert!(!dir.exists());
    }

    #[test]
    fn a_stale_directory_is_replaced() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("tls");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("server-key.pem"), "old").unwrap();
        let tls = StreamTls::create(
            &dir,
            creds(TlsPeer::Server {
                hostname: "h".into(),
            }),
        )
        .unwrap();
        assert!(!dir.join("server-key.pem").exists());
        drop(tls);
    }

    #[test]
    fn debug_never_shows_the_key() {
        let c = creds(TlsPeer::Client {
            identity: "CN=x".into(),
        });
        let shown = format!("{c:?}");
        assert!(!shown.contains("secret-key-bytes"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn unusable_credentials_are_refused_before_anything_is_written() {
        let base = tempfile::tempdir().unwrap();
        let mut c = creds(TlsPeer::Client {
            identity: " ".into(),
        });
        let dir = base.path().join("tls");
        assert!(matches!(
            StreamTls::create(&dir, c.clone()),
            Err(TlsError::Invalid(_))
        ));
        c.peer = TlsPeer::Client {
            identity: "CN=x".into(),
        };
        c.key_pem = "not a key".into();
        assert!(matches!(
            StreamTls::create(&dir, c),
            Err(TlsError::Invalid(_))
        ));
        assert!(!dir.exists());
    }
}
