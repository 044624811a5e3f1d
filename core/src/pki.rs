//! The deployment's certificate authority and the identities it issues.
//!
//! Every identity names its role (and VM or master target) in a SAN URI:
//! `urn:tern:admin`, `urn:tern:agent:<vm>`, `urn:tern:master-target:<name>`,
//! `urn:tern:server`. The process server authorises by that URI only.
//!
//! A *bundle* is one PEM file: the CA certificate, the client certificate, its key.

use crate::{NameError, VmName};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::fmt;
use std::path::Path;
use time::{Duration, OffsetDateTime};

const URN_PREFIX: &str = "urn:tern:";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(String),
    #[error("{path}: {reason}")]
    BadBundle { path: String, reason: String },
    #[error("certificate does not name a tern role (no urn:tern: SAN URI)")]
    NoRole,
    #[error("certificate names an unknown tern role {0:?}")]
    UnknownRole(String),
    #[error("certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error(
        "master target name {0:?} is neither a host name nor an IP address ({1}): give the bare name or \
         address the process server dials it by, without a scheme or port"
    )]
    BadMasterTargetName(String, String),
}

impl From<rcgen::Error> for PkiError {
    fn from(e: rcgen::Error) -> Self {
        PkiError::Generate(e.to_string())
    }
}

/// Who a certificate speaks for.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Role {
    Admin,
    Agent(VmName),
    MasterTarget(String),
    Server,
}

impl Role {
    /// `admin`, `agent`, `master-target` or `server`.
    pub fn kind(&self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Agent(_) => "agent",
            Role::MasterTarget(_) => "master-target",
            Role::Server => "server",
        }
    }

    /// The VM of an agent, the name of a master target; empty for the others.
    pub fn name(&self) -> &str {
        match self {
            Role::Agent(vm) => vm.as_str(),
            Role::MasterTarget(n) => n,
            Role::Admin | Role::Server => "",
        }
    }

    /// The role [`Role::kind`] and [`Role::name`] gave.
    pub fn from_parts(kind: &str, name: &str) -> Result<Role, PkiError> {
        if name.is_empty() {
            Role::from_urn(&format!("{URN_PREFIX}{kind}"))
        } else {
            Role::from_urn(&format!("{URN_PREFIX}{kind}:{name}"))
        }
    }

    fn urn(&self) -> String {
        match self {
            Role::Admin => format!("{URN_PREFIX}admin"),
            Role::Agent(vm) => format!("{URN_PREFIX}agent:{vm}"),
            Role::MasterTarget(n) => format!("{URN_PREFIX}master-target:{n}"),
            Role::Server => format!("{URN_PREFIX}server"),
        }
    }

    fn from_urn(urn: &str) -> Result<Role, PkiError> {
        let rest = urn.strip_prefix(URN_PREFIX).ok_or(PkiError::NoRole)?;
        match rest.split_once(':') {
            None if rest == "admin" => Ok(Role::Admin),
            None if rest == "server" => Ok(Role::Server),
            Some(("agent", vm)) => Ok(Role::Agent(VmName::new(vm)?)),
            Some(("master-target", n)) => Ok(Role::MasterTarget(master_target_name(n)?)),
            _ => Err(PkiError::UnknownRole(urn.to_string())),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Admin => f.write_str("admin"),
            Role::Agent(vm) => write!(f, "agent for VM {vm}"),
            Role::MasterTarget(n) => write!(f, "master target {n}"),
            Role::Server => f.write_str("process server"),
        }
    }
}

/// The CA's certificate and key, as PEM.
#[derive(Clone)]
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Ca { .. }")
    }
}

/// How long an identity (an agent's, an admin's, a master target's, the server's) is
/// valid from its issue (`validity(5)`): what `drctl identities` shows as its expiry.
pub const IDENTITY_VALIDITY_MS: i64 = 365 * 5 * 86_400_000;

fn validity(params: &mut CertificateParams, years: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(365 * years);
}

impl Ca {
    pub fn create(deployment: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, format!("tern CA {deployment}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, 20);
        let cert = params.self_signed(&key)?;
        Ok(Ca { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    fn issue(&self, role: &Role, dns: &[String], server: bool) -> Result<(String, String), PkiError> {
        let ca_key = KeyPair::from_pem(&self.key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(dns.to_vec())?;
        params.distinguished_name.push(DnType::CommonName, role.to_string());
        let urn = rcgen::string::Ia5String::try_from(role.urn())?;
        params.subject_alt_names.push(SanType::URI(urn));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Servers also dial out (the process server to a master target), so they may
        // authenticate as clients too.
        params.extended_key_usages = if server {
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        validity(&mut params, 5);
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// The server's certificate: SANs localhost, 127.0.0.1, ::1 and `extra`.
    pub fn issue_server(&self, extra: &[String]) -> Result<(String, String), PkiError> {
        let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
        names.extend(extra.iter().cloned());
        self.issue(&Role::Server, &names, true)
    }

    /// A client identity bundle. A master target's also serves (the process server dials
    /// it), so its certificate names localhost, 127.0.0.1, ::1 and its own name.
    pub fn issue_client(&self, role: &Role) -> Result<Bundle, PkiError> {
        let (cert_pem, key_pem) = match role {
            Role::MasterTarget(name) => {
                let names =
                    vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string(), name.clone()];
                self.issue(role, &names, true)?
            }
            _ => self.issue(role, &[], false)?,
        };
        Ok(Bundle { ca_pem: self.cert_pem.clone(), cert_pem, key_pem })
    }
}

/// A client identity: CA certificate, client certificate, key.
#[derive(Clone)]
pub struct Bundle {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Bundle { .. }")
    }
}

/// Splits PEM text into (label, block) pairs.
fn pem_blocks(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + 11..];
        let Some(label_end) = after.find("-----") else { break };
        let label = after[..label_end].to_string();
        let end_marker = format!("-----END {label}-----");
        let Some(end) = rest[start..].find(&end_marker) else { break };
        let stop = start + end + end_marker.len();
        out.push((label, format!("{}\n", &rest[start..stop])));
        rest = &rest[stop..];
    }
    out
}

impl Bundle {
    pub fn to_pem(&self) -> String {
        format!("{}{}{}", self.ca_pem, self.cert_pem, self.key_pem)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Bundle, PkiError> {
        let bad = |reason: &str| PkiError::BadBundle { path: origin.to_string(), reason: reason.to_string() };
        let blocks = pem_blocks(text);
        let certs: Vec<&String> = blocks.iter().filter(|(l, _)| l == "CERTIFICATE").map(|(_, b)| b).collect();
        let key = blocks.iter().find(|(l, _)| l.ends_with("PRIVATE KEY")).map(|(_, b)| b);
        match (certs.as_slice(), key) {
            ([ca, cert], Some(key)) => {
                let b = Bundle { ca_pem: (*ca).clone(), cert_pem: (*cert).clone(), key_pem: key.clone() };
                if !b.key_matches_certificate()? {
                    return Err(bad(
                        "its private key does not belong to its certificate (the bundle is damaged or was \
                         put together from two); make a new one with `drctl enroll`",
                    ));
                }
                // A certificate changed in a way that still parses is otherwise refused by the
                // peer only after the handshake, which the client sees as a transport error.
                if !issued_by(&pem_to_der(&b.cert_pem)?, &b.ca_pem)? {
                    return Err(bad(
                        "its certificate does not carry its CA's valid signature (the bundle is damaged, \
                         or its certificates come from two deployments); make a new one with `drctl enroll`",
                    ));
                }
                Ok(b)
            }
            _ => Err(bad(
                "not a tern identity bundle (expected the CA certificate, the client certificate and its key); \
                 make one with `drctl enroll`",
            )),
        }
    }

    /// Whether the private key is the one the certificate names: a mismatch otherwise
    /// shows only as a TLS handshake that fails without saying why.
    fn key_matches_certificate(&self) -> Result<bool, PkiError> {
        let key = rcgen::KeyPair::from_pem(&self.key_pem)
            .map_err(|e| PkiError::BadCertificate(format!("its private key cannot be read ({e})")))?;
        let der = pem_to_der(&self.cert_pem)?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
        Ok(cert.tbs_certificate.subject_pki.subject_public_key.data.as_ref() == key.public_key_raw())
    }

    pub fn load(path: &Path) -> Result<Bundle, PkiError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| PkiError::Io { path: path.display().to_string(), error })?;
        Bundle::parse(&text, &path.display().to_string())
    }

    /// The role named by this bundle's own certificate.
    pub fn role(&self) -> Result<Role, PkiError> {
        let der = pem_to_der(&self.cert_pem)?;
        role_of(&der)
    }

    /// Serial, role and issue time of this bundle's own certificate.
    pub fn info(&self) -> Result<CertInfo, PkiError> {
        cert_info(&pem_to_der(&self.cert_pem)?)
    }

    /// When this bundle's own certificate stops being valid (milliseconds since the epoch).
    pub fn expires_ms(&self) -> Result<i64, PkiError> {
        expires_ms(&self.cert_pem)
    }

    /// Whether the bundle's certificate has expired at `now_ms`, or expires within
    /// [`RENEW_WITHIN_MS`]: the text to say, naming `what` and what to do (`renew`).
    pub fn expiry(&self, now_ms: i64, what: &str, renew: &str) -> Expiry {
        expiry_of(self.expires_ms(), now_ms, what, renew)
    }
}

/// Now, in milliseconds since the epoch, for [`Bundle::expiry`].
pub fn now_ms() -> i64 {
    let now = OffsetDateTime::now_utc();
    now.unix_timestamp().saturating_mul(1000) + i64::from(now.millisecond())
}

/// An identity due to expire within this long is warned of (30 days).
pub const RENEW_WITHIN_MS: i64 = 30 * 86_400_000;

/// An identity's certificate, as of now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expiry {
    Valid,
    /// Expires within [`RENEW_WITHIN_MS`]: the warning.
    Soon(String),
    /// Expired: every connection with it is refused; the error.
    Expired(String),
}

/// [`Expiry`] of a certificate that expires at `expires` (or could not be read: valid, as
/// the TLS handshake will say).
pub fn expiry_of(expires: Result<i64, PkiError>, now_ms: i64, what: &str, renew: &str) -> Expiry {
    let Ok(at) = expires else { return Expiry::Valid };
    let date = rfc3339_day(at);
    if at <= now_ms {
        Expiry::Expired(format!(
            "{what} expired on {date}: connections with it are refused (the other side says only that the \
             connection was closed); {renew}"
        ))
    } else if at - now_ms <= RENEW_WITHIN_MS {
        let left = match (at - now_ms) / 3_600_000 {
            h if h >= 48 => format!("{} days", h / 24),
            h => format!("{} hours", h.max(1)),
        };
        Expiry::Soon(format!("{what} expires on {date} (in {left}); {renew}"))
    } else {
        Expiry::Valid
    }
}

/// When the first certificate in `pem` stops being valid (milliseconds since the epoch).
pub fn expires_ms(pem: &str) -> Result<i64, PkiError> {
    let der = pem_to_der(pem)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    Ok(cert.validity().not_after.timestamp().saturating_mul(1000))
}

/// `YYYY-MM-DD` (UTC) of a time in milliseconds since the epoch.
fn rfc3339_day(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .map(|t| format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day()))
        .unwrap_or_else(|_| format!("{ms} ms"))
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| PkiError::BadCertificate(e.to_string()))
}

/// What the process server keeps of an identity it issued or saw: its serial number (hex),
/// its role, and when it was issued (milliseconds since the epoch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub serial: String,
    pub role: Role,
    pub issued_ms: i64,
}

/// The serial number of a DER certificate, as lowercase hex: how identities are named in
/// `drctl identities` and `drctl revoke`.
pub fn serial_of(der: &[u8]) -> Result<String, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    Ok(hex(cert.raw_serial()))
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    b.iter().fold(String::with_capacity(b.len() * 2), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

/// Serial, role and issue time of a DER certificate. The issue time is its notBefore plus
/// the day [`validity`] backdates it by.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let not_before = cert.validity().not_before.timestamp();
    Ok(CertInfo {
        serial: hex(cert.raw_serial()),
        role: role_of(der)?,
        issued_ms: not_before.saturating_add(86_400).saturating_mul(1000),
    })
}

/// A master target's name: the host name or address the process server dials it by (an
/// IPv6 address too), or a name of the letters, digits, '.', '_' and '-' names were made of
/// before (their identities go on).
pub fn master_target_name(n: &str) -> Result<String, PkiError> {
    match crate::DiskName::new(n) {
        Ok(d) => Ok(d.to_string()),
        Err(e) => check_san(n).map_err(|_| {
            // Said as the master target's name, which it is (W19-C: "disk name").
            let why = e.to_string().replacen("disk name", "a name", 1);
            PkiError::BadMasterTargetName(n.to_string(), why)
        }),
    }
}

/// A name for a server certificate as given to `--san`: an IP address, or a DNS name
/// (letters, digits, hyphens, dots; `*.` at the front for a wildcard). A URL, a port or an
/// empty name would be written into the certificate, and no client could dial by it (W18-A).
pub fn check_san(s: &str) -> Result<String, String> {
    let s = s.trim();
    let bare = s.strip_prefix('[').and_then(|x| x.strip_suffix(']')).unwrap_or(s);
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return Ok(bare.to_string());
    }
    let labels = s.strip_prefix("*.").unwrap_or(s);
    let ok = !labels.is_empty()
        && labels.len() <= 253
        && labels.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if ok {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!(
            "{s:?} is not a host name or IP address: give the bare name or address clients dial the server \
             by, without a scheme or port (dr.example.com, 10.0.0.5, 2001:db8::5)"
        ))
    }
}

/// Whether a DER certificate was signed by the CA whose certificate is the first in
/// `ca_pem`: one of this deployment's, not another's (whose CA may bear the same name).
pub fn issued_by(der: &[u8], ca_pem: &str) -> Result<bool, PkiError> {
    let (_, block) = pem_blocks(ca_pem)
        .into_iter()
        .find(|(label, _)| label == "CERTIFICATE")
        .ok_or_else(|| PkiError::BadCertificate("no CA certificate".into()))?;
    let ca_der = pem_to_der(&block)?;
    let (_, ca) =
        x509_parser::parse_x509_certificate(&ca_der).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    Ok(cert.verify_signature(Some(ca.public_key())).is_ok())
}

/// The certificates in PEM text that are not a CA's (a bundle's own certificate, or a
/// certificate file alone), as PEM.
pub fn leaf_certificates(text: &str) -> Result<Vec<String>, PkiError> {
    let mut out = Vec::new();
    for (label, block) in pem_blocks(text) {
        if label != "CERTIFICATE" {
            continue;
        }
        let der = pem_to_der(&block)?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
        if !cert.is_ca() {
            out.push(block);
        }
    }
    Ok(out)
}

/// The DNS names and IP addresses the first leaf certificate in `text` (PEM) names.
pub fn server_names(text: &str) -> Result<Vec<String>, PkiError> {
    let Some(block) = leaf_certificates(text)?.into_iter().next() else { return Ok(Vec::new()) };
    let der = pem_to_der(&block)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let mut names = Vec::new();
    if let Some(san) = cert.subject_alternative_name().map_err(|e| PkiError::BadCertificate(e.to_string()))? {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => names.push((*d).to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                        names.push(std::net::IpAddr::from(v4).to_string());
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                        names.push(std::net::IpAddr::from(v6).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    Ok(names)
}

/// Reads the role from a DER certificate's `urn:tern:` SAN URI.
pub fn role_of(der: &[u8]) -> Result<Role, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?
        .ok_or(PkiError::NoRole)?;
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = name
            && uri.starts_with(URN_PREFIX)
        {
            return Role::from_urn(uri);
        }
    }
    Err(PkiError::NoRole)
}

/// Writes a new secret file readable by its owner only; an existing file is left alone
/// (an error), never overwritten.
pub fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |error| PkiError::Io { path: path.display().to_string(), error };
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_master_target_may_be_named_by_an_ipv6_address() {
        let ca = Ca::create("test").unwrap();
        for name in ["2001:db8::5", "onprem1", "mt_1", "10.0.0.5"] {
            let b = ca.issue_client(&Role::MasterTarget(master_target_name(name).unwrap())).unwrap();
            assert_eq!(b.role().unwrap(), Role::MasterTarget(name.to_string()));
        }
        let e = master_target_name("https://onprem1:7444").unwrap_err().to_string();
        assert!(e.contains("master target name") && e.contains("without a scheme or port"), "{e}");
    }

    #[test]
    fn a_san_is_a_bare_name_or_address() {
        for ok in
            ["dr.example.com", "DR-1.example.com", "10.0.0.5", "2001:db8::5", "[::1]", "*.example.com", "dr"]
        {
            assert!(check_san(ok).is_ok(), "{ok}");
        }
        for bad in [
            "https://dr.example.com:7443",
            "10.0.0.5:7443",
            "",
            " ",
            "dr..example.com",
            "-dr.example.com",
            "dr_1",
        ] {
            assert!(check_san(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_certificate_is_issued_by_its_own_ca_only() {
        let (ours, theirs) = (Ca::create("test").unwrap(), Ca::create("test").unwrap());
        let b = ours.issue_client(&Role::Admin).unwrap();
        let der = pem_to_der(&b.cert_pem).unwrap();
        assert!(issued_by(&der, &ours.cert_pem).unwrap());
        assert!(!issued_by(&der, &theirs.cert_pem).unwrap(), "a CA of the same name is another's");
    }

    #[test]
    fn a_server_certificate_names_its_hosts() {
        let ca = Ca::create("test").unwrap();
        let (cert, _) = ca.issue_server(&["dr.example.com".into(), "192.0.2.10".into()]).unwrap();
        let names = server_names(&cert).unwrap();
        for n in ["localhost", "127.0.0.1", "::1", "dr.example.com", "192.0.2.10"] {
            assert!(names.iter().any(|x| x == n), "{n} in {names:?}");
        }
    }

    /// Identities last five years: within the last 30 days a warning, after them an error,
    /// each naming the day and what to do.
    #[test]
    fn an_identity_warns_before_it_expires_and_says_so_after() {
        let ca = Ca::create("test").unwrap();
        let b = ca.issue_client(&Role::Admin).unwrap();
        let at = b.expires_ms().unwrap();
        let now = OffsetDateTime::now_utc().unix_timestamp() * 1000;
        let five_years = 365 * 5 * 86_400_000;
        assert!((at - now - five_years).abs() < 60_000, "{at} {now}");
        assert_eq!(b.expiry(now, "it", "renew it"), Expiry::Valid);
        let day = rfc3339_day(at);
        match b.expiry(at - 10 * 86_400_000, "it", "renew it") {
            Expiry::Soon(t) => {
                assert!(t.contains(&day) && t.contains("in 10 days") && t.contains("renew it"), "{t}")
            }
            e => panic!("{e:?}"),
        }
        match b.expiry(at + 1, "it", "renew it") {
            Expiry::Expired(t) => assert!(t.contains("expired on") && t.contains(&day), "{t}"),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn bundle_names_its_role() {
        let ca = Ca::create("test").unwrap();
        let vm = VmName::new("web1").unwrap();
        let b = ca.issue_client(&Role::Agent(vm.clone())).unwrap();
        let parsed = Bundle::parse(&b.to_pem(), "x").unwrap();
        assert_eq!(parsed.role().unwrap(), Role::Agent(vm));
        let admin = ca.issue_client(&Role::Admin).unwrap();
        assert_eq!(admin.role().unwrap(), Role::Admin);
        assert!(Bundle::parse("garbage", "x").is_err());
        // The key of another identity with this certificate: refused, saying so.
        let other = ca.issue_client(&Role::Admin).unwrap();
        let mixed = format!("{}{}{}", b.ca_pem, b.cert_pem, other.key_pem);
        let err = Bundle::parse(&mixed, "mixed").unwrap_err().to_string();
        assert!(err.contains("does not belong to its certificate"), "{err}");
        let (server, _) = ca.issue_server(&["dr.example".into()]).unwrap();
        assert_eq!(role_of(&pem_to_der(&server).unwrap()).unwrap(), Role::Server);
    }

    /// A certificate with one character of its signature changed still parses, but is not
    /// its CA's: refused when the bundle is read, not left to a handshake that fails late.
    #[test]
    fn a_bundle_whose_certificate_is_damaged_or_another_deployments_is_refused() {
        let ca = Ca::create("test").unwrap();
        let b = ca.issue_client(&Role::Admin).unwrap();
        let mut lines: Vec<String> = b.cert_pem.lines().map(str::to_string).collect();
        let last = lines.len() - 2; // the last line of base64, before the END line
        let i = lines[last].trim_end_matches('=').len() - 4;
        let c = lines[last].as_bytes()[i];
        lines[last].replace_range(i..=i, if c == b'A' { "B" } else { "A" });
        let damaged = format!("{}{}\n{}", b.ca_pem, lines.join("\n"), b.key_pem);
        let der = pem_to_der(&lines.join("\n")).unwrap();
        assert!(x509_parser::parse_x509_certificate(&der).is_ok(), "the damage still parses");
        let err = Bundle::parse(&damaged, "damaged").unwrap_err().to_string();
        assert!(
            err.contains("does not carry its CA's valid signature") && err.contains("drctl enroll"),
            "{err}"
        );
        let theirs = Ca::create("test").unwrap();
        let foreign = format!("{}{}{}", theirs.cert_pem, b.cert_pem, b.key_pem);
        let err = Bundle::parse(&foreign, "foreign").unwrap_err().to_string();
        assert!(err.contains("does not carry its CA's valid signature"), "{err}");
    }
}
