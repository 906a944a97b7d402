//! The audit log's part of Cella's configuration: where the signing key file is and when to cut
//! checkpoints. The service embeds this in its own configuration file.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::checkpoint::CheckpointPolicy;
use crate::keys::{KeyError, SigningKey};

/// `[audit]` in the service configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The checkpoint signing key file (mode 0600). Pointing it at a key with a new id rotates keys.
    pub signing_key: PathBuf,
    /// Cut a checkpoint after this many new events (default 1000) …
    #[serde(default = "default_every_events")]
    pub checkpoint_every_events: u64,
    /// … or once the oldest unsigned event is this many seconds old (default 60).
    #[serde(default = "default_every_secs")]
    pub checkpoint_every_secs: u64,
}

fn default_every_events() -> u64 {
    CheckpointPolicy::default().every_events
}

fn default_every_secs() -> u64 {
    CheckpointPolicy::default().every_secs
}

impl AuditConfig {
    /// The checkpoint policy.
    pub fn policy(&self) -> CheckpointPolicy {
        CheckpointPolicy {
            every_events: self.checkpoint_every_events.max(1),
            every_secs: self.checkpoint_every_secs,
        }
    }

    /// How often the checkpointer should look: often enough to honour both limits.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_secs(self.checkpoint_every_secs.clamp(1, 5))
    }

    /// Loads the signing key (checking its permissions).
    pub fn load_key(&self) -> Result<SigningKey, KeyError> {
        SigningKey::load(&self.signing_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_when_only_the_key_path_is_given() {
        let c: AuditConfig = serde_json::from_str(r#"{"signing_key": "/etc/cella/audit.key"}"#).unwrap();
        assert_eq!(c.policy(), CheckpointPolicy { every_events: 1000, every_secs: 60 });
        assert_eq!(c.poll_interval(), Duration::from_secs(5));
    }
}
