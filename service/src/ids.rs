//! Identifiers and secrets: random ids for tenants, keys and jobs, API keys and their hashes.

use ring::digest::{digest, SHA256};
use ring::rand::{SecureRandom, SystemRandom};

/// Every tenant API key starts with this, so a leaked key is recognizable (secret scanners).
pub const API_KEY_PREFIX: &str = "cella_";
/// Operator credentials start with this.
pub const ADMIN_KEY_PREFIX: &str = "cella_admin_";

/// `n` random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // SystemRandom reads getrandom(2); it only fails if the kernel has no entropy source at
    // all, which no supported host lacks.
    SystemRandom::new().fill(&mut bytes).expect("the kernel's random source failed");
    bytes
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A fresh id: `prefix` + 128 random bits in hex (`job_3f…`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", hex(&random_bytes::<16>()))
}

/// A fresh secret key: `prefix` + 256 random bits in hex.
pub fn new_secret(prefix: &str) -> String {
    format!("{prefix}{}", hex(&random_bytes::<32>()))
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

/// Whether `id` looks like one of ours with `prefix` (so a malformed id answers 404 without a
/// database round trip and never reaches a query).
pub fn is_id(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('_'))
        .is_some_and(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_prefixed_and_unique() {
        let a = new_id("job");
        let b = new_id("job");
        assert_ne!(a, b);
        assert!(is_id(&a, "job"));
        assert!(!is_id(&a, "tenant"));
        assert!(!is_id("job_../../etc", "job"));
    }

    #[test]
    fn api_keys_carry_256_bits() {
        let key = new_secret(API_KEY_PREFIX);
        assert!(key.starts_with("cella_"));
        assert_eq!(key.len() - API_KEY_PREFIX.len(), 64);
    }
}
