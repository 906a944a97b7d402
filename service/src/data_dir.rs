//! The data folder: configuration, TLS material, the admin credential, the audit signing key,
//! the private PostgreSQL, uploaded artifacts, sessions and the workers' scratch files.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::files::{self, FileError};

/// The data folder's layout.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// `--data-dir`, `CELLA_DATA_DIR`, or the default: `/var/lib/cella` for root, else
    /// `$XDG_DATA_HOME/cella` or `~/.local/share/cella`.
    pub fn resolve(flag: Option<PathBuf>) -> Self {
        let root = flag
            .or_else(|| std::env::var_os("CELLA_DATA_DIR").map(PathBuf::from))
            .unwrap_or_else(default_root);
        Self { root }
    }

    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Creates the folder (mode 0711: others may pass through to the private PostgreSQL's
    /// socket folder, but not list it) and its subfolders.
    pub fn create(&self) -> Result<(), FileError> {
        files::create_private_dir(&self.root)?;
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o711))
            .map_err(|source| FileError { action: "cannot chmod", path: self.root.clone(), source })?;
        files::create_private_dir(&self.artifacts())?;
        files::create_private_dir(&self.sessions())?;
        files::create_private_dir(&self.work())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config_file(&self) -> PathBuf {
        self.root.join("cella.toml")
    }

    /// Uploaded artifacts, one file per job, removed once the job has ended.
    pub fn artifacts(&self) -> PathBuf {
        self.root.join("artifacts")
    }

    pub fn artifact(&self, job_id: &str) -> PathBuf {
        self.artifacts().join(job_id)
    }

    /// One folder per live session (its artifact, the VMM's sockets, its snapshot), and beside
    /// each its VMM's log, `<id>.vmm.log`.
    pub fn sessions(&self) -> PathBuf {
        self.root.join("sessions")
    }

    pub fn session(&self, session_id: &str) -> PathBuf {
        self.sessions().join(session_id)
    }

    /// The worker's spare VMMs' control sockets, one folder each (root's, 0700).
    pub fn spares(&self) -> PathBuf {
        self.root.join("spares")
    }

    /// Scratch files: workers' SARIF logs before they are stored, files on their way into a
    /// session.
    pub fn work(&self) -> PathBuf {
        self.root.join("work")
    }

    /// The operator credential created on first start.
    pub fn admin_key_file(&self) -> PathBuf {
        self.root.join("admin.key")
    }

    pub fn audit_key_file(&self) -> PathBuf {
        self.root.join("audit-signing.key")
    }

    /// Where a running `cella serve` writes the URL it listens on.
    pub fn url_file(&self) -> PathBuf {
        self.root.join("serve.url")
    }
}

fn default_root() -> PathBuf {
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if root {
        return PathBuf::from("/var/lib/cella");
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(xdg).join("cella");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/cella")
}
