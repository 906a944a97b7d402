//! Ed25519 signing keys (ring) for checkpoints, their files, and public keys.
//!
//! A signing key file is text, readable by its owner only (mode 0600), kept outside the
//! database; its path comes from configuration:
//!
//! ```text
//! cella-audit-signing-key v1
//! id k2
//! pkcs8 <hex of the PKCS#8 v2 document ring generated>
//! ```
//!
//! A public key file (`<key file>.pub`, what reviewers pass to `--trusted-key`) is:
//!
//! ```text
//! cella-audit-public-key v1
//! id k2
//! ed25519 <hex of the 32-byte public key>
//! ```
//!
//! A key's fingerprint ([`PublicKey::fingerprint`]) is what an operator reads to a reviewer out
//! of band: `SHA256:` and the unpadded base64 of SHA-256 of the 32 key bytes, as ssh prints them.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{self, Ed25519KeyPair, KeyPair};

use crate::hash;

const SIGNING_HEADER: &str = "cella-audit-signing-key v1";
const PUBLIC_HEADER: &str = "cella-audit-public-key v1";

/// What went wrong with a key or key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write key file {path}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("key file {path} has mode {mode:04o}; signing keys must be readable by their owner only (chmod 600 {path})")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {path} is not a {expected} file: {problem}")]
    Format { path: PathBuf, expected: &'static str, problem: String },
    #[error("key id `{0}` is invalid: use 1-32 characters from A-Z a-z 0-9 . _ -")]
    InvalidId(String),
    #[error("the system random generator failed")]
    Random,
}

/// Checks a key id (`k1`, `2026-11-prod`).
pub fn valid_key_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// An Ed25519 public key with the id checkpoints name it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// The key id.
    pub id: String,
    /// The 32-byte Ed25519 public key.
    pub key: [u8; 32],
}

impl PublicKey {
    /// Whether `sig` is this key's signature over `msg`.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        signature::UnparsedPublicKey::new(&signature::ED25519, &self.key).verify(msg, sig).is_ok()
    }

    /// `SHA256:` and the unpadded base64 of SHA-256 of the 32 key bytes (as ssh prints a
    /// fingerprint); the id is not part of it.
    pub fn fingerprint(&self) -> String {
        let digest = hash::sha256(&self.key);
        format!("SHA256:{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest))
    }

    /// The public key file text.
    pub fn to_file_text(&self) -> String {
        format!("{PUBLIC_HEADER}\nid {}\ned25519 {}\n", self.id, hash::to_hex(&self.key))
    }

    /// Parses public key file text (`path` only names it in errors).
    pub fn from_file_text(path: &Path, text: &str) -> Result<Self, KeyError> {
        let fields = parse_fields(path, text, PUBLIC_HEADER, "Cella audit public key")?;
        let bad = |problem: &str| KeyError::Format {
            path: path.to_owned(),
            expected: "Cella audit public key",
            problem: problem.to_owned(),
        };
        let id = field(&fields, "id").ok_or_else(|| bad("no `id` line"))?;
        let key_hex = field(&fields, "ed25519").ok_or_else(|| bad("no `ed25519` line"))?;
        let key = hash::hash_from_hex(key_hex).ok_or_else(|| bad("`ed25519` is not 64 hex digits"))?;
        if !valid_key_id(id) {
            return Err(KeyError::InvalidId(id.to_owned()));
        }
        Ok(Self { id: id.to_owned(), key })
    }

    /// Reads a public key file.
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let text =
            fs::read_to_string(path).map_err(|source| KeyError::Read { path: path.to_owned(), source })?;
        Self::from_file_text(path, &text)
    }
}

/// A checkpoint signing key.
#[derive(Debug)]
pub struct SigningKey {
    id: String,
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl SigningKey {
    /// Generates a fresh key with id `id`.
    pub fn generate(id: &str) -> Result<Self, KeyError> {
        if !valid_key_id(id) {
            return Err(KeyError::InvalidId(id.to_owned()));
        }
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Random)?;
        let pkcs8 = doc.as_ref().to_vec();
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| KeyError::Random)?;
        Ok(Self { id: id.to_owned(), pair, pkcs8 })
    }

    /// Loads a key file, refusing one that group or others can read or write.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let meta = fs::metadata(path).map_err(|source| KeyError::Read { path: path.to_owned(), source })?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions { path: path.to_owned(), mode });
        }
        let text =
            fs::read_to_string(path).map_err(|source| KeyError::Read { path: path.to_owned(), source })?;
        let fields = parse_fields(path, &text, SIGNING_HEADER, "Cella audit signing key")?;
        let bad = |problem: &str| KeyError::Format {
            path: path.to_owned(),
            expected: "Cella audit signing key",
            problem: problem.to_owned(),
        };
        let id = field(&fields, "id").ok_or_else(|| bad("no `id` line"))?;
        if !valid_key_id(id) {
            return Err(KeyError::InvalidId(id.to_owned()));
        }
        let pkcs8 =
            field(&fields, "pkcs8").and_then(hash::from_hex).ok_or_else(|| bad("`pkcs8` is not hex"))?;
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|e| bad(&format!("`pkcs8` is not an Ed25519 key ({e})")))?;
        Ok(Self { id: id.to_owned(), pair, pkcs8 })
    }

    /// Writes the key to `path` (created with mode 0600; an existing file is never overwritten)
    /// and its public key to `path.pub`.
    pub fn save(&self, path: &Path) -> Result<PathBuf, KeyError> {
        let text = format!("{SIGNING_HEADER}\nid {}\npkcs8 {}\n", self.id, hash::to_hex(&self.pkcs8));
        let write_err = |source| KeyError::Write { path: path.to_owned(), source };
        let mut f =
            fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(write_err)?;
        f.write_all(text.as_bytes()).map_err(write_err)?;
        let mut pub_path = path.as_os_str().to_owned();
        pub_path.push(".pub");
        let pub_path = PathBuf::from(pub_path);
        fs::write(&pub_path, self.public().to_file_text())
            .map_err(|source| KeyError::Write { path: pub_path.clone(), source })?;
        Ok(pub_path)
    }

    /// The key id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        let mut key = [0; 32];
        key.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey { id: self.id.clone(), key }
    }

    /// Signs `msg`.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.pair.sign(msg).as_ref().to_vec()
    }
}

fn parse_fields<'a>(
    path: &Path,
    text: &'a str,
    header: &str,
    expected: &'static str,
) -> Result<Vec<(&'a str, &'a str)>, KeyError> {
    let mut lines = text.lines();
    if lines.next() != Some(header) {
        return Err(KeyError::Format {
            path: path.to_owned(),
            expected,
            problem: format!("the first line is not `{header}`"),
        });
    }
    Ok(lines.filter(|l| !l.trim().is_empty()).filter_map(|l| l.split_once(' ')).collect())
}

fn field<'a>(fields: &[(&'a str, &'a str)], name: &str) -> Option<&'a str> {
    fields.iter().find(|(k, _)| *k == name).map(|(_, v)| v.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cella-audit-keys-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn saved_key_is_0600_and_loads_back_with_the_same_public_key() {
        let dir = temp_dir("roundtrip");
        let key = SigningKey::generate("k1").unwrap();
        let pub_path = key.save(&dir.join("k1.key")).unwrap();
        let mode = fs::metadata(dir.join("k1.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = SigningKey::load(&dir.join("k1.key")).unwrap();
        assert_eq!(loaded.public(), key.public());
        assert_eq!(PublicKey::read(&pub_path).unwrap(), key.public());
        let sig = loaded.sign(b"msg");
        assert!(key.public().verify(b"msg", &sig));
        assert!(!key.public().verify(b"msh", &sig));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fingerprint_is_sha256_of_the_key_bytes_in_unpadded_base64() {
        // The RFC 8032 test 1 public key: its SHA-256 is
        // 21fe31dfa154a261626bf854046fd2271b7bed4b6abe45aa58877ef47f9721b9.
        let key = PublicKey {
            id: "k1".into(),
            key: hash::hash_from_hex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
                .unwrap(),
        };
        assert_eq!(key.fingerprint(), "SHA256:If4x36FUomFia/hUBG/SJxt77UtqvkWqWId+9H+XIbk");
        let other = PublicKey { id: "k2".into(), ..key.clone() };
        assert_eq!(other.fingerprint(), key.fingerprint(), "the id is not part of the fingerprint");
    }

    #[test]
    fn refuses_a_key_file_others_can_read() {
        let dir = temp_dir("perms");
        let path = dir.join("k.key");
        SigningKey::generate("k1").unwrap().save(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = SigningKey::load(&path).unwrap_err();
        assert!(matches!(err, KeyError::Permissions { mode: 0o644, .. }), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn never_overwrites_an_existing_key_file() {
        let dir = temp_dir("overwrite");
        let path = dir.join("k.key");
        SigningKey::generate("k1").unwrap().save(&path).unwrap();
        assert!(matches!(SigningKey::generate("k2").unwrap().save(&path), Err(KeyError::Write { .. })));
        fs::remove_dir_all(&dir).unwrap();
    }
}
