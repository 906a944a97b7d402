//! The binaries a benchmark runs: Cella's own, next to `cella-bench` (`target/release/` after
//! `scripts/setup.sh`), so a benchmark measures the same build it was built with.

use std::path::PathBuf;

/// `name` in this executable's folder, or why it cannot be run.
pub fn sibling(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let path = exe.with_file_name(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "no {name} next to this benchmark ({}); build Cella's binaries first: bash scripts/setup.sh",
            path.display()
        ))
    }
}
