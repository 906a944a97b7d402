//! What a template is (`cella-vmm template` writes it as `template.json` next to the
//! snapshot): enough for a launcher to tell whether a template holds a job's engine and for an
//! audit event to name the template a job's VM was restored from.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The identity file in a template's folder.
pub const TEMPLATE_FILE: &str = "template.json";
/// The most bytes of an identity file read.
const MAX_IDENTITY: usize = 64 << 10;

/// Why a template's identity could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{path} is not a template's identity file ({reason}); build the template again")]
pub struct BadIdentity {
    pub path: PathBuf,
    pub reason: String,
}

/// A template's identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateIdentity {
    /// SHA-256 (hex) of the fields below, joined: the name the audit log records.
    pub id: String,
    /// SHA-256 (hex) of the serialized policy whose engine the template holds (as
    /// [`crate::job::policy_sha256`]).
    pub policy_sha256: String,
    /// SHA-256 (hex) of the guest image.
    pub image_sha256: String,
    pub mem_mib: u64,
    /// The VMM that built it (a snapshot restores only in the same VMM version).
    pub vmm_version: String,
    /// The image's entry point, where a restored VM's helper vCPU starts; 0 (a template from
    /// before helpers): its VMs get none. Not part of `id`: the image's hash covers it.
    #[serde(default)]
    pub entry: u64,
}

impl TemplateIdentity {
    /// The identity of a template of `image` with `mem_mib` of memory holding the engine of
    /// `policy`, built by VMM version `vmm_version`.
    pub fn new(policy: &[u8], image: &[u8], mem_mib: u64, vmm_version: &str) -> Self {
        let policy_sha256 = crate::job::policy_sha256(policy);
        let image_sha256 = hex(&Sha256::digest(image));
        let id = hex(&Sha256::digest(
            format!("cella-template/1\n{policy_sha256}\n{image_sha256}\n{mem_mib}\n{vmm_version}\n")
                .as_bytes(),
        ));
        TemplateIdentity {
            id,
            policy_sha256,
            image_sha256,
            mem_mib,
            vmm_version: vmm_version.to_owned(),
            entry: 0,
        }
    }

    /// Reads the identity file in the template folder `dir`. It was written by a VMM (in a
    /// jail, when the service makes it) and its id goes into logs and the audit log, so every
    /// field is checked for its form: the hashes 64 lowercase hex digits, the version short and
    /// plain.
    pub fn read(dir: &Path) -> Result<Self, BadIdentity> {
        let path = dir.join(TEMPLATE_FILE);
        let bad = |reason: String| BadIdentity { path: path.clone(), reason };
        let bytes = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
        if bytes.len() > MAX_IDENTITY {
            return Err(bad(format!("it is over {} KiB", MAX_IDENTITY >> 10)));
        }
        let identity: TemplateIdentity = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        let sha256 =
            |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        for (name, value) in [
            ("id", &identity.id),
            ("policy_sha256", &identity.policy_sha256),
            ("image_sha256", &identity.image_sha256),
        ] {
            if !sha256(value) {
                return Err(bad(format!("its {name} is not 64 lowercase hex digits")));
            }
        }
        let version = &identity.vmm_version;
        if version.is_empty()
            || version.len() > 32
            || !version.bytes().all(|b| b.is_ascii_alphanumeric() || b".-+".contains(&b))
        {
            return Err(bad("its vmm_version is not a version".into()));
        }
        Ok(identity)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_changes_with_each_part_and_the_file_round_trips() {
        let a = TemplateIdentity::new(b"policy", b"image", 256, "0.1.0");
        assert_eq!(a.policy_sha256, crate::job::policy_sha256(b"policy"));
        for b in [
            TemplateIdentity::new(b"policy2", b"image", 256, "0.1.0"),
            TemplateIdentity::new(b"policy", b"image2", 256, "0.1.0"),
            TemplateIdentity::new(b"policy", b"image", 128, "0.1.0"),
            TemplateIdentity::new(b"policy", b"image", 256, "0.1.1"),
        ] {
            assert_ne!(a.id, b.id, "{b:?}");
        }
        let dir = std::env::temp_dir().join(format!("cella-template-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(TEMPLATE_FILE), serde_json::to_vec(&a).unwrap()).unwrap();
        assert_eq!(TemplateIdentity::read(&dir).unwrap(), a);
        std::fs::write(dir.join(TEMPLATE_FILE), b"{}").unwrap();
        let e = TemplateIdentity::read(&dir).unwrap_err();
        assert!(e.to_string().contains("not a template's identity file"), "{e}");
        // Fields of the wrong form are refused by name: they reach logs and the audit log.
        let cases = [
            (TemplateIdentity { id: "ab".into(), ..a.clone() }, "its id is not"),
            (TemplateIdentity { id: a.id.to_uppercase(), ..a.clone() }, "its id is not"),
            (
                TemplateIdentity { policy_sha256: format!("{}\u{1b}", &a.policy_sha256[1..]), ..a.clone() },
                "policy_sha256",
            ),
            (TemplateIdentity { image_sha256: String::new(), ..a.clone() }, "image_sha256"),
            (TemplateIdentity { vmm_version: "0.1.0\nfake".into(), ..a.clone() }, "vmm_version"),
        ];
        for (bad, says) in cases {
            std::fs::write(dir.join(TEMPLATE_FILE), serde_json::to_vec(&bad).unwrap()).unwrap();
            let e = TemplateIdentity::read(&dir).unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
