use std::path::PathBuf;

/// What making, loading or using certificates can fail with.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file of the PKI directory (or an operator's CA/certificate file) could not be read
    /// or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A PEM file or a CSR did not hold what it should.
    #[error("{what}: {detail}")]
    Invalid { what: String, detail: String },
    /// rcgen refused to make or sign a certificate.
    #[error("cannot make the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused a configuration (a key that does not match its certificate, ...).
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// A verifier could not be built from the given roots.
    #[error("TLS verifier: {0}")]
    Verifier(String),
    /// A pin is not of the form `sha256:AB:CD:...`.
    #[error("'{0}' is not a certificate fingerprint (sha256:AB:CD:... with 32 bytes)")]
    BadPin(String),
}

impl PkiError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> PkiError {
        let path = path.into();
        move |source| PkiError::Io { path, source }
    }

    pub(crate) fn invalid(what: impl Into<String>, detail: impl std::fmt::Display) -> PkiError {
        PkiError::Invalid {
            what: what.into(),
            detail: detail.to_string(),
        }
    }

    /// A stable code for user-facing errors.
    pub fn code(&self) -> &'static str {
        match self {
            PkiError::Io { .. } => "pki-file-unreadable",
            PkiError::Invalid { .. } => "pki-invalid",
            PkiError::Generate(_) => "pki-generate-failed",
            PkiError::Tls(_) | PkiError::Verifier(_) => "tls-config-invalid",
            PkiError::BadPin(_) => "invalid-fingerprint",
        }
    }

    /// What the operator can do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            PkiError::Io { .. } => "check that the file exists and that this user may read and write it",
            PkiError::Invalid { .. } => "give a PEM file with the certificate or key it should hold",
            PkiError::Generate(_) | PkiError::Tls(_) | PkiError::Verifier(_) => {
                "check the CA and certificate files (an ECDSA P-256 or RSA key matching its certificate)"
            }
            PkiError::BadPin(_) => "copy the fingerprint the server printed at its first start",
        }
    }
}
