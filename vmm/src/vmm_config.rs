//! What a caller asks for when it launches a VM, and the limits that request is held to.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::devices::legacy::console::ConsoleLimits;

/// Default guest memory.
pub const DEFAULT_MEM_MIB: u64 = 128;
/// The least guest memory a VM may have (image at 2 MiB, a heap and a stack above it).
pub const MIN_MEM_MIB: u64 = 8;
/// The most guest memory a VM may have.
pub const MAX_MEM_MIB: u64 = 64 << 10;
pub use cella_host::images::{RUNNER_IMAGE_ENV, SCANNER_IMAGE_ENV};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("guest memory of {0} MiB is out of range: give between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB")]
    MemOutOfRange(u64),
    #[error("guest argument {index} contains a NUL byte")]
    ArgHasNul { index: usize },
    #[error("guest arguments take {len} bytes; at most {max} fit")]
    ArgsTooLong { len: usize, max: u64 },
    #[error("a timeout of 0 ms would stop the VM before it starts; give at least 1 ms")]
    ZeroTimeout,
    #[error(
        "no guest image given and none found (looked in: {searched}); build it with \
         `scripts/setup.sh`, pass --image PATH, or set {env}"
    )]
    NoDefaultImage { searched: String, env: String },
}

/// One VM's launch request.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The guest ELF.
    pub image: PathBuf,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Wall-clock limit from the guest's first instruction; `None` runs until the guest exits.
    pub timeout: Option<Duration>,
    /// The guest's arguments.
    pub args: Vec<String>,
    /// Bounds on guest console output.
    pub console_limits: ConsoleLimits,
    /// Set to stop the VM from outside (it then ends as `stopped`).
    pub cancel: Option<Arc<AtomicBool>>,
    /// The instant `launch_us` counts from (the CLI passes the start of `main`).
    pub launch_start: Instant,
    /// A file to attach read-only as virtio-blk (the artifact).
    pub disk: Option<PathBuf>,
    /// Attach virtio-vsock with its host Unix socket at this path.
    pub vsock_uds: Option<PathBuf>,
}

impl VmConfig {
    /// A configuration with the defaults for `image` and `args`.
    pub fn new(image: impl Into<PathBuf>, args: Vec<String>) -> Self {
        VmConfig {
            image: image.into(),
            mem_mib: DEFAULT_MEM_MIB,
            timeout: None,
            args,
            console_limits: ConsoleLimits::default(),
            cancel: None,
            launch_start: Instant::now(),
            disk: None,
            vsock_uds: None,
        }
    }

    /// Guest memory in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }

    /// Checks the limits that do not need the image.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(ConfigError::MemOutOfRange(self.mem_mib));
        }
        if self.timeout == Some(Duration::ZERO) {
            return Err(ConfigError::ZeroTimeout);
        }
        if let Some(index) = self.args.iter().position(|a| a.contains('\0')) {
            return Err(ConfigError::ArgHasNul { index });
        }
        let len = self.args_block().len();
        if len as u64 > cella_abi::layout::ARGS_MAX_LEN {
            return Err(ConfigError::ArgsTooLong { len, max: cella_abi::layout::ARGS_MAX_LEN });
        }
        Ok(())
    }

    /// The arguments as the guest sees them: NUL-terminated strings back to back.
    pub fn args_block(&self) -> Vec<u8> {
        self.args.iter().flat_map(|a| a.bytes().chain([0])).collect()
    }
}

/// Finds the runner image (`cella-runner`: the small image for `run`).
pub fn default_runner_image() -> Result<PathBuf, ConfigError> {
    cella_host::images::default_runner_image().map_err(ConfigError::from)
}

/// Finds the scanner image (`cella-scanner`: the runner with the scan engine, for `scan`).
pub fn default_scanner_image() -> Result<PathBuf, ConfigError> {
    cella_host::images::default_scanner_image().map_err(ConfigError::from)
}

impl From<cella_host::images::ImageNotFound> for ConfigError {
    fn from(e: cella_host::images::ImageNotFound) -> Self {
        ConfigError::NoDefaultImage { searched: e.searched, env: e.env }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_absurd_memory_and_bad_arguments() {
        let mut c = VmConfig::new("img", vec!["hello".into()]);
        assert_eq!(c.validate(), Ok(()));
        c.mem_mib = 0;
        assert_eq!(c.validate(), Err(ConfigError::MemOutOfRange(0)));
        c.mem_mib = 1 << 30;
        assert!(c.validate().unwrap_err().to_string().contains("between 8 and 65536 MiB"));
        c.mem_mib = 64;
        c.args = vec!["a\0b".into()];
        assert_eq!(c.validate(), Err(ConfigError::ArgHasNul { index: 0 }));
        c.args = vec!["x".repeat(20_000)];
        assert!(matches!(c.validate(), Err(ConfigError::ArgsTooLong { .. })));
    }

    #[test]
    fn args_block_is_nul_terminated_strings() {
        let c = VmConfig::new("img", vec!["exit".into(), "7".into()]);
        assert_eq!(c.args_block(), b"exit\x007\x00");
    }
}
