//! rustls configurations for every connection Ferry makes, all with the `ring` provider.
//!
//! - the server's API: [`server_config`] (no client certificate; tokens authenticate);
//! - an agent's API: [`agent_server_config`] (a client certificate from the cluster CA whose
//!   identity is the server's, and nothing else);
//! - clients: [`client_config`] (verify against a CA), optionally presenting an identity;
//!   [`pinned_client_config`] (trust on first use: SHA-256 of the CA or the leaf);
//!   [`agents_client_config`] (the server calling agents: its identity, the cluster CA, and
//!   revoked serials refused).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};

use crate::{fingerprint, parse_fingerprint, PkiError, SERVER_CLIENT_CN};

/// The one crypto provider Ferry uses (ring; aws-lc-rs needs a C toolchain to build).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM text, in order.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| PkiError::invalid("certificate PEM", e))?;
    if certs.is_empty() {
        return Err(PkiError::invalid("certificate PEM", "no certificate in it"));
    }
    Ok(certs)
}

/// The private key in a PEM text (PKCS#8, SEC1 or PKCS#1).
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::invalid("private key PEM", e))
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, PkiError> {
    let mut store = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem)? {
        store
            .add(cert)
            .map_err(|e| PkiError::invalid("CA certificate", e))?;
    }
    Ok(Arc::new(store))
}

/// The server's API: its certificate chain, no client certificate asked for.
pub fn server_config(chain_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>, PkiError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs_from_pem(chain_pem)?, key_from_pem(key_pem)?)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// An agent's API: only a client certificate chained to `cluster_ca_pem` whose subject is the
/// server's client identity (CN `ferry-server`, EKU clientAuth) completes the handshake.
pub fn agent_server_config(
    chain_pem: &str,
    key_pem: &str,
    cluster_ca_pem: &str,
) -> Result<Arc<ServerConfig>, PkiError> {
    let inner = WebPkiClientVerifier::builder_with_provider(roots(cluster_ca_pem)?, provider())
        .build()
        .map_err(|e| PkiError::Verifier(e.to_string()))?;
    let verifier = Arc::new(ServerIdentityVerifier { inner });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs_from_pem(chain_pem)?, key_from_pem(key_pem)?)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Finishes a client configuration, presenting `identity` (chain PEM, key PEM) if given.
fn with_identity(
    builder: rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>,
    identity: Option<(&str, &str)>,
) -> Result<Arc<ClientConfig>, PkiError> {
    let config = match identity {
        Some((chain, key)) => {
            builder.with_client_auth_cert(certs_from_pem(chain)?, key_from_pem(key)?)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// A client that trusts only `ca_pem`, optionally presenting `identity` (chain PEM, key PEM).
pub fn client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Arc<ClientConfig>, PkiError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_pem)?);
    with_identity(builder, identity)
}

/// A client that trusts the server whose CA (or leaf) certificate has the SHA-256 `pin`
/// (`sha256:AB:...`): trust on first use, and a changed certificate refused afterwards with an
/// error naming `server-certificate-changed`.
pub fn pinned_client_config(
    pin: &str,
    identity: Option<(&str, &str)>,
) -> Result<Arc<ClientConfig>, PkiError> {
    let verifier = Arc::new(PinVerifier {
        pin: parse_fingerprint(pin)?,
        provider: provider(),
    });
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    with_identity(builder, identity)
}

/// The server calling agents: presents its client identity, trusts the cluster CA, and
/// refuses an agent certificate whose serial was revoked (a removed host).
pub fn agents_client_config(
    ca_pem: &str,
    identity_chain_pem: &str,
    identity_key_pem: &str,
    revoked: RevokedSerials,
) -> Result<Arc<ClientConfig>, PkiError> {
    let inner = WebPkiServerVerifier::builder_with_provider(roots(ca_pem)?, provider())
        .build()
        .map_err(|e| PkiError::Verifier(e.to_string()))?;
    let verifier = Arc::new(AgentCertVerifier { inner, revoked });
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(
            certs_from_pem(identity_chain_pem)?,
            key_from_pem(identity_key_pem)?,
        )?;
    // A resumed session skips certificate verification: no resumption, so that a revoked
    // agent certificate is refused on the very next connection.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Serials (lower-case hex) of agent certificates that must no longer be accepted. Shared,
/// so revoking takes effect on the next connection.
#[derive(Debug, Clone, Default)]
pub struct RevokedSerials(Arc<RwLock<HashSet<String>>>);

impl RevokedSerials {
    pub fn revoke(&self, serial: &str) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(serial.to_ascii_lowercase());
    }

    pub fn contains(&self, serial: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&serial.to_ascii_lowercase())
    }
}

/// Lower-case hex of a certificate's serial number, as [`crate::Issued::serial`] records it.
pub fn serial_of(der: &[u8]) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(hex::encode(x509.raw_serial()))
}

/// A certificate's validity (notBefore, notAfter).
pub fn validity_of(der: &[u8]) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
    let (_, x509) = x509_parser::parse_x509_certificate(der).ok()?;
    let at = |secs: i64| {
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(secs).unwrap_or(0))
    };
    let v = x509.validity();
    Some((at(v.not_before.timestamp()), at(v.not_after.timestamp())))
}

/// A certificate's subject common name.
pub fn common_name_of(der: &[u8]) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = x509.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// Base64 of the SHA-256 of a certificate's SubjectPublicKeyInfo: what Chromium's
/// `--ignore-certificate-errors-spki-list` takes.
pub fn spki_sha256_base64(der: &[u8]) -> Option<String> {
    use base64::Engine;
    use sha2::{Digest, Sha256};
    let (_, x509) = x509_parser::parse_x509_certificate(der).ok()?;
    let digest = Sha256::digest(x509.public_key().raw);
    Some(base64::engine::general_purpose::STANDARD.encode(digest))
}

/// Connects to `addr`, reads the certificate chain the server presents, and ends the
/// handshake without trusting it (no request is sent): what a CLI shows on first use.
pub async fn probe_server_chain(
    addr: &str,
    server_name: &str,
) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let verifier = Arc::new(RecordingVerifier {
        seen: seen.clone(),
        provider: provider(),
    });
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| PkiError::invalid(format!("server name '{server_name}'"), e))?;
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| PkiError::io(addr)(std::io::ErrorKind::TimedOut.into()))?
    .map_err(PkiError::io(addr))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    // The recording verifier always fails the handshake: nothing is trusted here.
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        connector.connect(name, tcp),
    )
    .await;
    let chain = std::mem::take(&mut *seen.lock().unwrap_or_else(|p| p.into_inner()));
    if chain.is_empty() {
        return Err(PkiError::invalid(
            addr,
            "the server presented no certificate (is it serving HTTPS?)",
        ));
    }
    Ok(chain)
}

/// The agent side of mutual TLS: the webpki checks (chain to the cluster CA, validity,
/// clientAuth EKU), then the subject must be the server's client identity.
#[derive(Debug)]
struct ServerIdentityVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for ServerIdentityVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        match common_name_of(end_entity) {
            Some(cn) if cn == SERVER_CLIENT_CN => Ok(verified),
            _ => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The server's check of an agent: the webpki checks, then the serial must not be revoked.
#[derive(Debug)]
struct AgentCertVerifier {
    inner: Arc<WebPkiServerVerifier>,
    revoked: RevokedSerials,
}

impl ServerCertVerifier for AgentCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        match serial_of(end_entity) {
            Some(s) if !self.revoked.contains(&s) => Ok(verified),
            Some(_) => Err(rustls::Error::InvalidCertificate(CertificateError::Revoked)),
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::BadEncoding,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The text a refused pin carries, which clients turn into the `server-certificate-changed`
/// error code.
pub const PIN_MISMATCH: &str = "server-certificate-changed";

/// Trust on first use: the pinned certificate must be the presented leaf (then it is trusted
/// as is, within its validity) or one of the presented CA certificates (then the leaf must
/// chain to it and name the server, like any CA-verified connection).
#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl PinVerifier {
    fn matches(&self, der: &[u8]) -> bool {
        use sha2::{Digest, Sha256};
        Sha256::digest(der).as_slice() == self.pin
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.matches(end_entity) {
            let (_, x509) = x509_parser::parse_x509_certificate(end_entity)
                .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
            let secs = now.as_secs() as i64;
            let v = x509.validity();
            if secs < v.not_before.timestamp() {
                return Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidYet,
                ));
            }
            if secs > v.not_after.timestamp() {
                return Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
            }
            return Ok(ServerCertVerified::assertion());
        }
        let Some(ca) = intermediates.iter().find(|c| self.matches(c)) else {
            return Err(rustls::Error::General(format!(
                "{PIN_MISMATCH}: the server's certificate ({}) is not the pinned one",
                fingerprint(intermediates.last().unwrap_or(end_entity))
            )));
        };
        let mut store = RootCertStore::empty();
        store
            .add(ca.clone().into_owned())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let others: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .filter(|c| !self.matches(c))
            .cloned()
            .collect();
        WebPkiServerVerifier::builder_with_provider(Arc::new(store), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_server_cert(end_entity, &others, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Records the presented chain and refuses it: used only to show a fingerprint.
#[derive(Debug)]
struct RecordingVerifier {
    seen: Arc<Mutex<Vec<CertificateDer<'static>>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.push(end_entity.clone().into_owned());
        seen.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        Err(rustls::Error::General(
            "certificate recorded, not trusted".into(),
        ))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("not trusted".into()))
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("not trusted".into()))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
