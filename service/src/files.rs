//! Small file helpers for the data folder: private folders (0700), secret files (0600) written
//! atomically, and errors that name the path.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A file operation that failed, with its path.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}")]
pub struct FileError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| FileError { action, path: path.to_owned(), source }
}

/// Creates `dir` (and parents) with mode 0700, or tightens an existing one to 0700.
pub fn create_private_dir(dir: &Path) -> Result<(), FileError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err("cannot create folder", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err("cannot chmod", dir))
}

fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err("cannot create", &tmp))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(err("cannot write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(err("cannot rename into", path))
}

/// Writes a secret (mode 0600), atomically.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    write_mode(path, bytes, 0o600)
}

/// Writes a public file (mode 0644), atomically.
pub fn write_public(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    write_mode(path, bytes, 0o644)
}

/// Reads a whole file.
pub fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(err("cannot read", path))
}
