//! Per-migration test credentials in the shape `ferry_pki::issue_migration_pair` gives (one
//! CA per migration, a client certificate for the source, a server certificate for the
//! destination's address), made with rcgen, so that switching the tests to the real issuer is
//! a one-line change. Shared by the lab's and the agent's TLS tests.

#![allow(dead_code)]

use std::net::IpAddr;

use ferry_migrate::TlsCredentials;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate and its key, PEM.
pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
}

/// One migration's credentials.
pub struct MigrationCreds {
    pub ca_pem: String,
    pub source: CertKey,
    pub destination: CertKey,
    /// The source certificate's subject as QEMU prints it (what `tls-authz` compares).
    pub source_dn: String,
    pub destination_dn: String,
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// A migration id for certificate names, different on every call.
pub fn fresh_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    format!(
        "{:x}-{:x}-{}",
        t.as_nanos() as u64,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh CA and the pair for migration `id` to `destination_addr`.
pub fn issue_migration_pair(id: &str, destination_addr: IpAddr) -> MigrationCreds {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name = dn(&format!("ferry-migration-{id}-ca"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf = |role: &str, purpose, san: Vec<SanType>| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        let cn = format!("ferry-migration-{id}-{role}");
        p.distinguished_name = dn(&cn);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![purpose];
        p.subject_alt_names = san;
        let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
        (
            CertKey {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            },
            format!("CN={cn}"),
        )
    };
    let (source, source_dn) = leaf("source", ExtendedKeyUsagePurpose::ClientAuth, vec![]);
    let (destination, destination_dn) = leaf(
        "destination",
        ExtendedKeyUsagePurpose::ServerAuth,
        vec![SanType::IpAddress(destination_addr)],
    );
    MigrationCreds {
        ca_pem: ca_cert.pem(),
        source,
        destination,
        source_dn,
        destination_dn,
    }
}

/// What each half gets, (source, destination): the source checks the destination's address,
/// the destination lets in the source's identity only.
pub fn halves(c: &MigrationCreds, destination_addr: IpAddr) -> (TlsCredentials, TlsCredentials) {
    let h = ferry_migrate::HalvesTls::from_pair(
        &c.ca_pem,
        (c.source.cert_pem.clone(), c.source.key_pem.clone()),
        (
            c.destination.cert_pem.clone(),
            c.destination.key_pem.clone(),
        ),
        &c.source_dn,
        destination_addr,
    );
    (h.source, h.destination)
}
