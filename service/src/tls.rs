//! TLS: the server's rustls configuration, and on first start a private CA and a server
//! certificate for this host, generated with rcgen into `<data dir>/tls/`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

use crate::config::TlsConfig;
use crate::files;

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

/// Where the server's certificate, key and (when generated) CA live.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The generated CA's certificate, which clients trust (`--ca`); `None` for a configured
    /// certificate.
    pub ca: Option<PathBuf>,
}

/// The CA a client on this host should trust: `<data dir>/tls/ca.pem`.
pub fn local_ca_path(data_dir: &Path) -> PathBuf {
    data_dir.join("tls").join("ca.pem")
}

/// The configured certificate, or the generated one (made now if it does not exist yet).
pub fn ensure(config: &TlsConfig, data_dir: &Path) -> Result<TlsFiles, TlsError> {
    match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => return Ok(TlsFiles { cert: cert.clone(), key: key.clone(), ca: None }),
        (None, None) => {}
        _ => return Err(TlsError::HalfConfigured),
    }
    let dir = data_dir.join("tls");
    let files = TlsFiles {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        ca: Some(local_ca_path(data_dir)),
    };
    if files.cert.exists() && files.key.exists() && local_ca_path(data_dir).exists() {
        return Ok(files);
    }
    files::create_private_dir(&dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name.push(DnType::CommonName, "Cella local CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;

    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    names.extend(config.names.iter().cloned());
    let mut server = CertificateParams::new(names)?;
    server.distinguished_name.push(DnType::CommonName, "cella serve");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let server_key = KeyPair::generate()?;
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key)?;

    files::write_private(&dir.join("ca.key"), ca_key.serialize_pem().as_bytes())?;
    files::write_private(&files.key, server_key.serialize_pem().as_bytes())?;
    files::write_public(&files.cert, server_cert.pem().as_bytes())?;
    files::write_public(&local_ca_path(data_dir), ca_cert.pem().as_bytes())?;
    Ok(files)
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

    #[test]
    fn generates_once_and_reuses() {
        let dir = std::env::temp_dir().join(format!("cella-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = ensure(&TlsConfig::default(), &dir).unwrap();
        let ca1 = std::fs::read(first.ca.as_ref().unwrap()).unwrap();
        server_config(&first).unwrap();
        let second = ensure(&TlsConfig::default(), &dir).unwrap();
        assert_eq!(std::fs::read(second.ca.unwrap()).unwrap(), ca1);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&first.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn half_a_configuration_is_refused() {
        let config = TlsConfig { cert: Some("/x.pem".into()), key: None, names: vec![] };
        assert!(matches!(ensure(&config, Path::new("/nonexistent")), Err(TlsError::HalfConfigured)));
    }
}
