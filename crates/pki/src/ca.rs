//! The server-owned roots and everything they sign.
//!
//! Two separate roots live in the server's `pki/` directory: the cluster CA (the server's
//! HTTPS certificate, its client identity for calling agents, the agents' certificates) and the
//! migration CA (short-lived pairs for QEMU's migration streams). They are separate so that a
//! migration credential, which sits in files QEMU reads, can never authenticate to an API, and
//! an API certificate can never receive a migration.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
    SerialNumber,
};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::files::{ensure_private_dir, read_text, write_private};
use crate::{fingerprint, PkiError};

/// The common name of the server's client identity: the only caller agents accept.
pub const SERVER_CLIENT_CN: &str = "ferry-server";
/// How long an agent's certificate lasts unless the server is told otherwise.
pub const AGENT_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// How long the server's own certificates (HTTPS and client identity) last; renewed when a
/// third is left.
pub const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// How long a migration's credential pair lasts by default: long enough to start a migration,
/// short enough that a leaked file is useless soon.
pub const MIGRATION_CREDS_TTL: Duration = Duration::from_secs(15 * 60);
/// Certificates start this much in the past, so a peer whose clock is a little behind (or
/// QEMU's "not yet active" check) does not refuse a certificate made a moment ago.
pub const BACKDATE: Duration = Duration::from_secs(60);
/// The roots last ten years: replacing a CA means re-issuing every certificate.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// What a leaf certificate may be used for. A certificate is one or the other, never both:
/// an agent's (server) certificate can never call another agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// TLS server (EKU serverAuth).
    Server,
    /// TLS client (EKU clientAuth).
    Client,
}

/// Everything a leaf certificate says about its subject and lifetime.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub common_name: String,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub usage: Usage,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl LeafSpec {
    /// A spec valid from [`BACKDATE`] ago for `validity`.
    pub fn new(common_name: &str, usage: Usage, validity: Duration) -> LeafSpec {
        let now = SystemTime::now();
        LeafSpec {
            common_name: common_name.to_string(),
            dns_names: vec![],
            ips: vec![],
            usage,
            not_before: now - BACKDATE,
            not_after: now + validity,
        }
    }
}

/// A certificate with its private key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertKey {
    /// The key never appears in a log line or an error.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A certificate the cluster CA issued: what the holder presents and what the server records.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The leaf followed by the CA certificate, so that a peer trusting the CA by pin can see
    /// the CA in the handshake.
    pub chain_pem: String,
    /// The private key, when the CA made it (empty for a signed CSR: the key never left its
    /// holder).
    pub key_pem: String,
    /// Lower-case hex of the serial number, as recorded and revoked.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Issued {
    /// Whether a third of the lifetime or less is left at `now`: time to renew.
    pub fn needs_renewal(&self, now: SystemTime) -> bool {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        match self.not_after.duration_since(now) {
            Ok(left) => left <= life / 3,
            Err(_) => true,
        }
    }
}

/// A migration's temporary credentials, signed by the migration CA.
#[derive(Debug, Clone)]
pub struct MigrationCreds {
    /// The migration CA's certificate, which both QEMUs trust.
    pub ca_pem: String,
    /// The source QEMU's client certificate (clientAuth only).
    pub source: CertKey,
    /// The destination QEMU's server certificate (serverAuth only, SAN = its migration
    /// address).
    pub destination: CertKey,
    /// The source's distinguished name as QEMU's `authz-simple` `identity` compares it.
    pub source_dn: String,
    /// The destination's distinguished name, same format.
    pub destination_dn: String,
    pub not_after: SystemTime,
}

/// One self-signed root: its certificate as rcgen needs it to sign, its key, and its PEM.
struct Root {
    issuer: rcgen::Certificate,
    key: KeyPair,
    pem: String,
    der: CertificateDer<'static>,
}

impl Root {
    fn create(common_name: &str) -> Result<Root, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Ferry");
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial().0);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ROOT_VALIDITY;
        let cert = params.self_signed(&key)?;
        Ok(Root {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: cert,
            key,
        })
    }

    /// A root from its PEM files; the key must be the certificate's.
    fn from_pem(cert_pem: &str, key_pem: &str, what: &str) -> Result<Root, PkiError> {
        let der = crate::tls::certs_from_pem(cert_pem)
            .map_err(|e| PkiError::invalid(what, e))?
            .into_iter()
            .next()
            .ok_or_else(|| PkiError::invalid(what, "no certificate in the file"))?;
        let key =
            KeyPair::from_pem(key_pem).map_err(|e| PkiError::invalid(format!("{what} key"), e))?;
        let (_, x509) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::invalid(what, e))?;
        if !x509.is_ca() {
            return Err(PkiError::invalid(what, "the certificate is not a CA"));
        }
        if x509.public_key().raw != key.public_key_der().as_slice() {
            return Err(PkiError::invalid(
                what,
                "the key does not belong to the certificate",
            ));
        }
        let params = CertificateParams::from_ca_cert_der(&der)?;
        // Re-signed only to hold the DN and key identifier rcgen signs with; the original
        // certificate (der, pem) is the one peers see.
        let issuer = params.self_signed(&key)?;
        Ok(Root {
            issuer,
            key,
            pem: cert_pem.to_string(),
            der,
        })
    }

    fn sign(&self, spec: &LeafSpec, public: &impl PublicKeyData) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spec.common_name.as_str());
        params.distinguished_name = dn;
        for name in &spec.dns_names {
            let name = name
                .clone()
                .try_into()
                .map_err(|e| PkiError::invalid(format!("host name '{name}'"), e))?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        for ip in &spec.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        // keyEncipherment too: QEMU (GnuTLS) refuses a leaf whose critical key usage lacks it.
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![match spec.usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        let (serial, serial_hex) = random_serial();
        params.serial_number = Some(serial);
        params.not_before = OffsetDateTime::from(spec.not_before);
        params.not_after = OffsetDateTime::from(spec.not_after);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public, &self.issuer, &self.key)?;
        Ok(Issued {
            chain_pem: format!("{}{}", cert.pem(), self.pem),
            key_pem: String::new(),
            serial: serial_hex,
            not_before: spec.not_before,
            not_after: spec.not_after,
        })
    }

    fn issue_with_key(&self, spec: &LeafSpec) -> Result<Issued, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut issued = self.sign(spec, &key)?;
        issued.key_pem = key.serialize_pem();
        Ok(issued)
    }
}

/// A random positive serial of 16 bytes (first byte 0x01..=0x7f, so its DER encoding is the
/// bytes themselves and the recorded hex matches what peers see).
fn random_serial() -> (SerialNumber, String) {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f).max(1);
    (SerialNumber::from_slice(&bytes), hex::encode(bytes))
}

/// Where an operator's own CA is, used instead of one the server makes.
#[derive(Debug, Clone)]
pub struct ExternalCa {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The server's certificate authority: the cluster root and the migration root.
pub struct ClusterCa {
    dir: PathBuf,
    cluster: Root,
    migration: Root,
    created: bool,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa")
            .field("dir", &self.dir)
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

impl ClusterCa {
    /// The CA in `dir` (the server's `STATE/pki`): loaded when its files exist, created (dir
    /// 0700, every file 0600, written whole then renamed) on the first start. With
    /// `external`, the operator's CA signs instead of the cluster root; the migration root is
    /// always the server's own.
    pub fn load_or_create(
        dir: &Path,
        external: Option<&ExternalCa>,
    ) -> Result<ClusterCa, PkiError> {
        ensure_private_dir(dir)?;
        let mut created = false;
        let cluster = match external {
            Some(ext) => Root::from_pem(
                &read_text(&ext.cert)?,
                &read_text(&ext.key)?,
                &ext.cert.display().to_string(),
            )?,
            None => {
                let (root, new) = load_or_create_root(dir, "ca", "Ferry cluster CA")?;
                created |= new;
                root
            }
        };
        let (migration, new) = load_or_create_root(dir, "migration-ca", "Ferry migration CA")?;
        created |= new;
        if external.is_some() {
            // The operator copies this file to CLIs and agents, whichever CA it is.
            write_private(&dir.join("ca.pem"), cluster.pem.as_bytes())?;
        }
        Ok(ClusterCa {
            dir: dir.to_path_buf(),
            cluster,
            migration,
            created,
        })
    }

    /// True when this start made a new root (the server prints the fingerprint then).
    pub fn created(&self) -> bool {
        self.created
    }

    /// The directory the CA lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file operators copy to CLIs and agents (`ca.pem`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The cluster CA's certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.cluster.pem
    }

    /// The cluster CA's certificate, DER.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.cluster.der
    }

    /// `sha256:AB:CD:...` of the cluster CA: what an operator compares on first use.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cluster.der)
    }

    /// The migration CA's certificate, PEM.
    pub fn migration_ca_pem(&self) -> &str {
        &self.migration.pem
    }

    /// Any leaf from the cluster CA, with a key made here. Tests use it for certificates no
    /// real caller would get (expired, wrong usage).
    pub fn issue(&self, spec: &LeafSpec) -> Result<Issued, PkiError> {
        self.cluster.issue_with_key(spec)
    }

    /// The server's HTTPS certificate for `names` and `ips` (plus `localhost` and 127.0.0.1,
    /// so that a CLI on the server's machine always verifies).
    pub fn issue_server_cert(
        &self,
        names: &[String],
        ips: &[IpAddr],
        validity: Duration,
    ) -> Result<Issued, PkiError> {
        let mut spec = LeafSpec::new("ferry-server-api", Usage::Server, validity);
        spec.dns_names.push("localhost".into());
        for n in names {
            if !spec.dns_names.contains(n) {
                spec.dns_names.push(n.clone());
            }
        }
        let loopback = IpAddr::from([127, 0, 0, 1]);
        spec.ips.push(loopback);
        for ip in ips {
            if !ip.is_unspecified() && !spec.ips.contains(ip) {
                spec.ips.push(*ip);
            }
        }
        self.cluster.issue_with_key(&spec)
    }

    /// The server's client identity for calling agents: clientAuth only, CN `ferry-server`.
    pub fn issue_server_client_identity(&self, validity: Duration) -> Result<Issued, PkiError> {
        self.cluster
            .issue_with_key(&LeafSpec::new(SERVER_CLIENT_CN, Usage::Client, validity))
    }

    /// Signs an agent's CSR: serverAuth only (an agent's certificate cannot call another
    /// agent), SANs the host name and `names`/`ips` (the address the server calls it at).
    /// Only the CSR's public key is used; what else it asks for is ignored.
    pub fn sign_agent_csr(
        &self,
        csr_pem: &str,
        host: &str,
        names: &[String],
        ips: &[IpAddr],
        validity: Duration,
    ) -> Result<Issued, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::invalid("certificate signing request", e))?;
        let mut spec = LeafSpec::new(host, Usage::Server, validity);
        spec.dns_names.push(host.to_string());
        for n in names {
            if !spec.dns_names.contains(n) {
                spec.dns_names.push(n.clone());
            }
        }
        spec.ips.extend(ips.iter().copied());
        self.cluster.sign(&spec, &csr.public_key)
    }

    /// A migration's credential pair from the migration root: the source's client
    /// certificate and the destination's server certificate (SAN its migration address),
    /// valid from a minute ago for `ttl` (15 minutes when zero).
    pub fn issue_migration_pair(
        &self,
        migration: Uuid,
        source_addr: IpAddr,
        destination_addr: IpAddr,
        ttl: Duration,
    ) -> Result<MigrationCreds, PkiError> {
        let ttl = if ttl.is_zero() {
            MIGRATION_CREDS_TTL
        } else {
            ttl
        };
        let source_cn = format!("ferry-migration-{migration}-source");
        let destination_cn = format!("ferry-migration-{migration}-destination");
        let mut source = LeafSpec::new(&source_cn, Usage::Client, ttl);
        source.ips.push(source_addr);
        let mut destination = LeafSpec::new(&destination_cn, Usage::Server, ttl);
        destination.ips.push(destination_addr);
        let source = self.migration.issue_with_key(&source)?;
        let destination = self.migration.issue_with_key(&destination)?;
        let leaf = |chain: &str| -> String {
            // QEMU reads the leaf from the cert file and the CA from its own file.
            let end = "-----END CERTIFICATE-----";
            match chain.find(end) {
                Some(i) => format!("{}\n", &chain[..i + end.len()]),
                None => chain.to_string(),
            }
        };
        Ok(MigrationCreds {
            ca_pem: self.migration.pem.clone(),
            source_dn: qemu_dn(&source_cn),
            destination_dn: qemu_dn(&destination_cn),
            not_after: source.not_after,
            source: CertKey {
                cert_pem: leaf(&source.chain_pem),
                key_pem: source.key_pem,
            },
            destination: CertKey {
                cert_pem: leaf(&destination.chain_pem),
                key_pem: destination.key_pem,
            },
        })
    }
}

/// The distinguished name QEMU's `authz-simple` compares with a peer's: QEMU takes it from
/// `gnutls_x509_crt_get_dn`, RFC 4514 order, `CN=value` for a certificate whose subject is only
/// a common name. The names Ferry makes hold only `[a-z0-9-]`, so nothing needs escaping.
pub fn qemu_dn(common_name: &str) -> String {
    format!("CN={common_name}")
}

/// Loads `NAME.pem` + `NAME.key` from `dir`, or creates them.
fn load_or_create_root(dir: &Path, name: &str, cn: &str) -> Result<(Root, bool), PkiError> {
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    if cert_path.exists() && key_path.exists() {
        let root = Root::from_pem(
            &read_text(&cert_path)?,
            &read_text(&key_path)?,
            &cert_path.display().to_string(),
        )?;
        return Ok((root, false));
    }
    let suffix = {
        use rand::RngCore;
        let mut b = [0u8; 4];
        rand::thread_rng().fill_bytes(&mut b);
        hex::encode(b)
    };
    let root = Root::create(&format!("{cn} {suffix}"))?;
    // The key first: a certificate without its key would be loaded and then refused.
    write_private(&key_path, root.key.serialize_pem().as_bytes())?;
    write_private(&cert_path, root.pem.as_bytes())?;
    Ok((root, true))
}

/// An agent's new private key (ECDSA P-256, PEM) and a CSR for it naming the host. The key
/// never leaves the agent; the server signs the CSR's public key.
pub fn generate_key_and_csr(host: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, host);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}
