//! TLS: the server's rustls configuration, and a private CA and a server certificate for this
//! host, generated with rcgen into `<data dir>/tls/`: the CA valid 10 years and name-constrained
//! to the names it issues for (`localhost`, the loopback addresses, `tls.names`), the server
//! certificate 1 year. Each start renews what has less than 30 days left: the server
//! certificate from the same CA (clients notice nothing), the CA itself only when it is near its
//! end (then every client must fetch `tls/ca.pem` again, and the start says so).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DnType, ExtendedKeyUsagePurpose, GeneralSubtree, IsCa,
    KeyPair, KeyUsagePurpose, NameConstraints,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use time::{Duration, OffsetDateTime};

use crate::config::TlsConfig;
use crate::files;

/// How long a generated CA is valid.
pub const CA_VALIDITY: Duration = Duration::days(3650);
/// How long a generated server certificate is valid.
pub const SERVER_VALIDITY: Duration = Duration::days(365);
/// A generated certificate with less than this left is made again at start.
pub const RENEW_BEFORE: Duration = Duration::days(30);
/// Generated certificates are valid from this long before they are made (a client whose clock
/// is a little behind still takes them).
const BACKDATE: Duration = Duration::hours(1);
/// The CA's subject: the issuer of every server certificate it signs.
const CA_NAME: &str = "Cella local CA";

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot generate the certificate")]
    Generate(#[from] rcgen::Error),
    #[error(transparent)]
    File(#[from] files::FileError),
    #[error("{0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("{0} holds no PEM private key")]
    NoKey(PathBuf),
    #[error("cannot read PEM from {0}")]
    Pem(PathBuf, #[source] std::io::Error),
    #[error("the certificate and key are not usable together")]
    Rustls(#[from] rustls::Error),
    #[error("tls.cert and tls.key must be configured together")]
    HalfConfigured,
}

/// What [`ensure`] made at this start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Issued {
    /// Nothing: the certificate is configured, or the generated ones have time left.
    Nothing,
    /// The first start: a CA and a server certificate.
    First,
    /// A new server certificate from the same CA, and why; clients notice nothing.
    Server(String),
    /// A new CA (and server certificate), and why: every client must fetch `tls/ca.pem` again.
    Ca(String),
}

/// Where the server's certificate, key and (when generated) CA live.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The generated CA's certificate, which clients trust (`--ca`); `None` for a configured
    /// certificate.
    pub ca: Option<PathBuf>,
    /// What this start generated.
    pub issued: Issued,
    /// A CA an older Cella made (valid for centuries, not name-constrained), kept so clients
    /// go on working; the start says how to replace it.
    pub legacy_ca: bool,
}

impl TlsFiles {
    /// What the start should tell the operator about the certificates, one line each.
    pub fn report(&self) -> Vec<String> {
        let ca = self.ca.as_ref().map_or_else(String::new, |p| p.display().to_string());
        let mut lines = Vec::new();
        match &self.issued {
            Issued::Nothing => {}
            Issued::First => lines.push(format!("generated a CA ({ca}) and a server certificate")),
            Issued::Server(why) => lines.push(format!("renewed the server certificate: {why}")),
            Issued::Ca(why) => lines.push(format!(
                "WARNING: made a NEW CA in {ca} ({why}): every client must fetch it again (cella clients on \
                 this host read it themselves); until then they refuse this server"
            )),
        }
        if self.legacy_ca {
            lines.push(format!(
                "the CA in {ca} was made by an older cella: valid for centuries and not name-constrained; to \
                 replace it, remove its folder and restart, then give clients the new CA"
            ));
        }
        lines
    }
}

/// The CA a client on this host should trust: `<data dir>/tls/ca.pem`.
pub fn local_ca_path(data_dir: &Path) -> PathBuf {
    data_dir.join("tls").join("ca.pem")
}

/// The names a generated server certificate is for (and its CA may issue for): `localhost`,
/// the loopback addresses, and `tls.names`.
fn server_names(config: &TlsConfig) -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    names.extend(config.names.iter().filter(|n| !names.contains(n)).cloned().collect::<Vec<_>>());
    names
}

/// The CA's name constraints: exactly the names of [`server_names`] (a DNS name with its
/// subdomains, an address alone).
fn name_constraints(names: &[String]) -> NameConstraints {
    let permitted_subtrees = names
        .iter()
        .map(|name| match name.parse::<IpAddr>() {
            Ok(ip) => GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(
                ip,
                if ip.is_ipv4() { 32 } else { 128 },
            )),
            Err(_) => GeneralSubtree::DnsName(name.trim_start_matches("*.").to_owned()),
        })
        .collect();
    NameConstraints { permitted_subtrees, excluded_subtrees: Vec::new() }
}

/// The CA's parameters, valid from `now` (backdated) for [`CA_VALIDITY`]. Signing with them
/// (and the CA's key) issues certificates under an existing CA of the same name and key.
fn ca_params(names: &[String], now: OffsetDateTime) -> Result<CertificateParams, TlsError> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name.push(DnType::CommonName, CA_NAME);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.name_constraints = Some(name_constraints(names));
    ca.not_before = now - BACKDATE;
    ca.not_after = now + CA_VALIDITY;
    Ok(ca)
}

/// A server certificate for `names`, valid from `now` (backdated) for [`SERVER_VALIDITY`],
/// signed by the CA `ca_key`; its PEM and its key's.
fn issue_server(
    names: &[String],
    ca_key: &KeyPair,
    now: OffsetDateTime,
) -> Result<(String, String), TlsError> {
    let issuer = ca_params(names, now)?.self_signed(ca_key)?;
    let mut server = CertificateParams::new(names.to_vec())?;
    server.distinguished_name.push(DnType::CommonName, "cella serve");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.not_before = now - BACKDATE;
    server.not_after = now + SERVER_VALIDITY;
    let key = KeyPair::generate()?;
    let cert = server.signed_by(&key, &issuer, ca_key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The configured certificate, or the generated one: made on first start, renewed when near
/// its end (see the module's documentation).
pub fn ensure(config: &TlsConfig, data_dir: &Path) -> Result<TlsFiles, TlsError> {
    ensure_at(config, data_dir, OffsetDateTime::now_utc())
}

/// [`ensure`] as if it were `now`.
fn ensure_at(config: &TlsConfig, data_dir: &Path, now: OffsetDateTime) -> Result<TlsFiles, TlsError> {
    match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => {
            return Ok(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: None,
                issued: Issued::Nothing,
                legacy_ca: false,
            })
        }
        (None, None) => {}
        _ => return Err(TlsError::HalfConfigured),
    }
    let dir = data_dir.join("tls");
    let ca_pem = local_ca_path(data_dir);
    let ca_key_file = dir.join("ca.key");
    let mut files = TlsFiles {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        ca: Some(ca_pem.clone()),
        issued: Issued::Nothing,
        legacy_ca: false,
    };
    let names = server_names(config);
    let ca = match (validity_of(&ca_pem), read_key_pair(&ca_key_file)) {
        (None, _) if !ca_pem.exists() => {
            if files.cert.exists() {
                files.issued = Issued::Ca(format!("{} was missing", ca_pem.display()));
            }
            None
        }
        (None, _) => {
            files.issued = Issued::Ca(format!("{} is not a readable certificate", ca_pem.display()));
            None
        }
        (Some(_), None) => {
            files.issued = Issued::Ca(format!("its key {} is missing or unreadable", ca_key_file.display()));
            None
        }
        (Some((_, not_after)), Some(_)) if not_after - now < RENEW_BEFORE => {
            files.issued = Issued::Ca(format!("the old one {} on {}", ends(not_after, now), day(not_after)));
            None
        }
        (Some((not_before, not_after)), Some(key)) => {
            files.legacy_ca = not_after - not_before > CA_VALIDITY + Duration::days(366);
            Some(key)
        }
    };
    let Some(ca_key) = ca else {
        // A new CA, then its server certificate. The CA's certificate is written last: a start
        // that stops half-way still finds the old one (near its end, or missing) and starts over.
        if files.issued == Issued::Nothing {
            files.issued = Issued::First;
        }
        files::create_private_dir(&dir)?;
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params(&names, now)?.self_signed(&ca_key)?;
        let (server_pem, server_key) = issue_server(&names, &ca_key, now)?;
        files::write_private(&ca_key_file, ca_key.serialize_pem().as_bytes())?;
        files::write_private(&files.key, server_key.as_bytes())?;
        files::write_public(&files.cert, server_pem.as_bytes())?;
        files::write_public(&ca_pem, ca_cert.pem().as_bytes())?;
        return Ok(files);
    };
    let why = match validity_of(&files.cert) {
        _ if !files.key.exists() => Some(format!("its key {} is missing", files.key.display())),
        None => Some(format!("{} is missing or not a readable certificate", files.cert.display())),
        Some((_, not_after)) if not_after - now < RENEW_BEFORE => {
            Some(format!("the old one {} on {}", ends(not_after, now), day(not_after)))
        }
        Some((not_before, not_after)) if not_after - not_before > SERVER_VALIDITY + Duration::days(1) => {
            Some(format!("the old one, made by an older cella, was valid until {}", day(not_after)))
        }
        Some(_) if server_config(&files).is_err() => {
            Some("the certificate and its key do not belong together".to_owned())
        }
        Some(_) => None,
    };
    if let Some(why) = why {
        let (server_pem, server_key) = issue_server(&names, &ca_key, now)?;
        files::write_private(&files.key, server_key.as_bytes())?;
        files::write_public(&files.cert, server_pem.as_bytes())?;
        let until = now + SERVER_VALIDITY;
        files.issued = Issued::Server(format!("{why}; the new one is valid until {}", day(until)));
    }
    Ok(files)
}

fn ends(not_after: OffsetDateTime, now: OffsetDateTime) -> &'static str {
    if not_after <= now {
        "expired"
    } else {
        "expires"
    }
}

fn day(t: OffsetDateTime) -> String {
    t.date().to_string()
}

fn read_key_pair(path: &Path) -> Option<KeyPair> {
    KeyPair::from_pem(&std::fs::read_to_string(path).ok()?).ok()
}

/// The validity (not before, not after) of the first certificate in the PEM file `path`;
/// `None` if it cannot be read.
fn validity_of(path: &Path) -> Option<(OffsetDateTime, OffsetDateTime)> {
    let bytes = std::fs::read(path).ok()?;
    let der = rustls_pemfile::certs(&mut bytes.as_slice()).next()?.ok()?;
    validity(&der)
}

/// A DER certificate's validity: `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE {
/// [0] version OPTIONAL, serialNumber, signature, issuer, validity SEQUENCE { notBefore,
/// notAfter }, …}, signatureAlgorithm, signatureValue }` (RFC 5280).
fn validity(der: &[u8]) -> Option<(OffsetDateTime, OffsetDateTime)> {
    fn time(r: yasna::BERReader<'_, '_>) -> yasna::ASN1Result<OffsetDateTime> {
        let der = r.read_der()?;
        yasna::parse_der(&der, |r| r.read_utctime().map(|t| *t.datetime()))
            .or_else(|_| yasna::parse_der(&der, |r| r.read_generalized_time().map(|t| *t.datetime())))
    }
    yasna::parse_der(der, |r| {
        r.read_sequence(|r| {
            let validity = r.next().read_sequence(|r| {
                r.read_optional(|r| r.read_tagged(yasna::Tag::context(0), |r| r.read_der()))?;
                for _ in 0..3 {
                    r.next().read_der()?;
                }
                let validity = r.next().read_sequence(|r| Ok((time(r.next())?, time(r.next())?)))?;
                while r.read_optional(|r| r.read_der())?.is_some() {}
                Ok(validity)
            })?;
            r.next().read_der()?;
            r.next().read_der()?;
            Ok(validity)
        })
    })
    .ok()
}

/// The rustls server configuration for `files` (HTTP/1.1 over TLS 1.2/1.3, ring).
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = files::read(path)?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(path.to_owned(), e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = files::read(path)?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|e| TlsError::Pem(path.to_owned(), e))?
        .ok_or_else(|| TlsError::NoKey(path.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A scratch folder for one test, removed when it ends.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let dir = std::env::temp_dir().join(format!("cella-tls-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Dir(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// `openssl ARGS` (the command-line tool), its standard output.
    fn openssl(args: &[&str]) -> String {
        let out = Command::new("openssl").args(args).output().expect("openssl is installed");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// The validity of a PEM certificate as openssl reads it.
    fn dates(pem: &Path) -> (OffsetDateTime, OffsetDateTime) {
        let text = openssl(&[
            "x509",
            "-in",
            pem.to_str().unwrap(),
            "-noout",
            "-startdate",
            "-enddate",
            "-dateopt",
            "iso_8601",
        ]);
        let field = |name: &str| {
            let v = text.lines().find_map(|l| l.strip_prefix(name)).unwrap().replace(' ', "T");
            OffsetDateTime::parse(&v, &time::format_description::well_known::Rfc3339).unwrap()
        };
        (field("notBefore="), field("notAfter="))
    }

    fn text(pem: &Path) -> String {
        openssl(&["x509", "-in", pem.to_str().unwrap(), "-noout", "-text"])
    }

    fn verify(ca: &Path, cert: &Path) -> String {
        openssl(&["verify", "-CAfile", ca.to_str().unwrap(), cert.to_str().unwrap()])
    }

    /// `now` to the second, as certificates hold it.
    fn second(t: OffsetDateTime) -> OffsetDateTime {
        t.replace_nanosecond(0).unwrap()
    }

    #[test]
    fn generates_once_and_reuses() {
        let dir = Dir::new("reuse");
        let first = ensure(&TlsConfig::default(), &dir.0).unwrap();
        assert_eq!(first.issued, Issued::First);
        let ca1 = std::fs::read(first.ca.as_ref().unwrap()).unwrap();
        let cert1 = std::fs::read(&first.cert).unwrap();
        server_config(&first).unwrap();
        let second = ensure(&TlsConfig::default(), &dir.0).unwrap();
        assert_eq!((second.issued, second.legacy_ca), (Issued::Nothing, false));
        assert_eq!(std::fs::read(second.ca.unwrap()).unwrap(), ca1);
        assert_eq!(std::fs::read(&second.cert).unwrap(), cert1);
        use std::os::unix::fs::PermissionsExt;
        for key in [&first.key, &dir.0.join("tls/ca.key")] {
            assert_eq!(std::fs::metadata(key).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn the_ca_is_valid_10_years_and_name_constrained_the_server_certificate_1_year() {
        let dir = Dir::new("validity");
        let config =
            TlsConfig { names: vec!["cella.example.com".into(), "10.1.2.3".into()], ..TlsConfig::default() };
        let now = second(OffsetDateTime::now_utc());
        let files = ensure_at(&config, &dir.0, now).unwrap();
        let ca = files.ca.clone().unwrap();
        assert_eq!(dates(&ca), (now - Duration::hours(1), now + Duration::days(3650)));
        assert_eq!(dates(&files.cert), (now - Duration::hours(1), now + Duration::days(365)));
        // What ensure reads back is what openssl reads.
        assert_eq!(validity_of(&ca), Some(dates(&ca)));
        let ca_text = text(&ca);
        let constraints: Vec<&str> = ca_text
            .lines()
            .skip_while(|l| !l.contains("X509v3 Name Constraints: critical"))
            .skip(2)
            .take(5)
            .map(str::trim)
            .collect();
        assert_eq!(
            constraints,
            [
                "DNS:localhost",
                "IP:127.0.0.1/255.255.255.255",
                "IP:0:0:0:0:0:0:0:1/FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF",
                "DNS:cella.example.com",
                "IP:10.1.2.3/255.255.255.255",
            ],
            "{ca_text}"
        );
        assert!(ca_text.contains("CA:TRUE, pathlen:0"), "{ca_text}");
        let server_text = text(&files.cert);
        assert!(
            server_text.contains("DNS:localhost, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1, DNS:cella.example.com, IP Address:10.1.2.3"),
            "{server_text}"
        );
        assert_eq!(verify(&ca, &files.cert).trim(), format!("{}: OK", files.cert.display()));
    }

    #[test]
    fn a_server_certificate_near_its_end_is_renewed_from_the_same_ca() {
        let dir = Dir::new("renew-server");
        let now = second(OffsetDateTime::now_utc());
        // Made 340 days ago: 25 days left.
        let old = ensure_at(&TlsConfig::default(), &dir.0, now - Duration::days(340)).unwrap();
        let ca = old.ca.clone().unwrap();
        let ca_before = std::fs::read(&ca).unwrap();
        let key_before = std::fs::read(&old.key).unwrap();
        let files = ensure_at(&TlsConfig::default(), &dir.0, now).unwrap();
        let until = (now + Duration::days(365)).date();
        let expires = (now - Duration::days(340) + Duration::days(365)).date();
        assert_eq!(
            files.issued,
            Issued::Server(format!("the old one expires on {expires}; the new one is valid until {until}"))
        );
        assert_eq!(std::fs::read(&ca).unwrap(), ca_before, "the CA stays");
        assert_ne!(std::fs::read(&files.key).unwrap(), key_before, "a new key");
        assert_eq!(dates(&files.cert), (now - Duration::hours(1), now + Duration::days(365)));
        assert_eq!(verify(&ca, &files.cert).trim(), format!("{}: OK", files.cert.display()));
        server_config(&files).unwrap();
        assert_eq!(
            files.report(),
            [format!(
                "renewed the server certificate: {}",
                match files.issued {
                    Issued::Server(ref why) => why.clone(),
                    _ => unreachable!(),
                }
            )]
        );
        // Renewed once: the next start keeps it.
        assert_eq!(ensure_at(&TlsConfig::default(), &dir.0, now).unwrap().issued, Issued::Nothing);
    }

    #[test]
    fn a_ca_near_its_end_is_made_again_and_the_start_says_so() {
        let dir = Dir::new("renew-ca");
        let now = second(OffsetDateTime::now_utc());
        // Made 3630 days ago: 20 days left (its server certificate expired long ago).
        let old = ensure_at(&TlsConfig::default(), &dir.0, now - Duration::days(3630)).unwrap();
        let ca = old.ca.clone().unwrap();
        let ca_before = std::fs::read(&ca).unwrap();
        let files = ensure_at(&TlsConfig::default(), &dir.0, now).unwrap();
        let ended = (now - Duration::days(3630) + Duration::days(3650)).date();
        assert_eq!(files.issued, Issued::Ca(format!("the old one expires on {ended}")));
        assert_ne!(std::fs::read(&ca).unwrap(), ca_before);
        assert_eq!(dates(&ca), (now - Duration::hours(1), now + Duration::days(3650)));
        assert_eq!(dates(&files.cert), (now - Duration::hours(1), now + Duration::days(365)));
        assert_eq!(verify(&ca, &files.cert).trim(), format!("{}: OK", files.cert.display()));
        let report = files.report();
        assert!(
            report[0].starts_with("WARNING: made a NEW CA in ")
                && report[0].contains("every client must fetch it again"),
            "{report:?}"
        );
    }

    #[test]
    fn a_certificate_an_older_cella_made_is_renewed_and_its_ca_kept_with_a_note() {
        let dir = Dir::new("legacy");
        let tls = dir.0.join("tls");
        std::fs::create_dir_all(&tls).unwrap();
        // What earlier versions wrote: rcgen's defaults, 1975 to 4096, no name constraints.
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.distinguished_name.push(DnType::CommonName, CA_NAME);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let server_key = KeyPair::generate().unwrap();
        let mut server = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        server.distinguished_name.push(DnType::CommonName, "cella serve");
        let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key).unwrap();
        std::fs::write(tls.join("ca.key"), ca_key.serialize_pem()).unwrap();
        std::fs::write(tls.join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(tls.join("server.key"), server_key.serialize_pem()).unwrap();
        std::fs::write(tls.join("server.pem"), server_cert.pem()).unwrap();
        let now = second(OffsetDateTime::now_utc());
        let files = ensure_at(&TlsConfig::default(), &dir.0, now).unwrap();
        assert!(
            matches!(&files.issued, Issued::Server(why) if why.contains("made by an older cella, was valid until 4096-01-01")),
            "{:?}",
            files.issued
        );
        assert!(files.legacy_ca);
        assert_eq!(std::fs::read_to_string(tls.join("ca.pem")).unwrap(), ca_cert.pem());
        assert_eq!(dates(&files.cert), (now - Duration::hours(1), now + Duration::days(365)));
        // Clients that trust the old CA go on working.
        assert_eq!(verify(&tls.join("ca.pem"), &files.cert).trim(), format!("{}: OK", files.cert.display()));
        assert!(files.report()[1].contains("made by an older cella"), "{:?}", files.report());
    }

    #[test]
    fn half_a_configuration_is_refused() {
        let config = TlsConfig { cert: Some("/x.pem".into()), key: None, names: vec![] };
        assert!(matches!(ensure(&config, Path::new("/nonexistent")), Err(TlsError::HalfConfigured)));
    }
}
