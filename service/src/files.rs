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

/// The suffix of a file on its way to its name (see [`remove_stale_temporaries`]).
const TEMPORARY: &str = ".tmp";

fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    // `<name>.tmp`: each file its own (`server.pem` and `server.key` once shared `server.tmp`).
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(TEMPORARY);
    let tmp = PathBuf::from(tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err("cannot create", &tmp))
        .and_then(|mut file| {
            file.write_all(bytes).and_then(|()| file.sync_all()).map_err(err("cannot write", &tmp))
        })
        .and_then(|()| std::fs::rename(&tmp, path).map_err(err("cannot rename into", path)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Removes the `*.tmp` files in `dir` that a process killed while writing (a key, a
/// certificate) left; returns how many. Only for folders where nothing else writes them.
pub fn remove_stale_temporaries(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(TEMPORARY))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
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
