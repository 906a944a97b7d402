//! Where the guest images are: `$CELLA_RUNNER_IMAGE` / `$CELLA_SCANNER_IMAGE`, else what
//! `scripts/build-guest.sh` built (`target/cella/<name>` beside this executable's
//! `target/<profile>/` folder), else `<name>.elf` beside the executable (an installed layout).

use std::path::{Path, PathBuf};

/// Environment variable naming the runner image, overriding the search.
pub const RUNNER_IMAGE_ENV: &str = "CELLA_RUNNER_IMAGE";
/// Environment variable naming the scanner image, overriding the search.
pub const SCANNER_IMAGE_ENV: &str = "CELLA_SCANNER_IMAGE";

/// No guest image was given and none was found.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "no guest image given and none found (looked in: {searched}); build it with \
     `scripts/setup.sh`, pass --image PATH, or set {env}"
)]
pub struct ImageNotFound {
    pub searched: String,
    pub env: String,
}

/// Finds the runner image (`cella-runner`: the small image for `run`).
pub fn default_runner_image() -> Result<PathBuf, ImageNotFound> {
    default_guest_image("cella-runner", RUNNER_IMAGE_ENV)
}

/// Finds the scanner image (`cella-scanner`: the runner with the scan engine, for `scan`).
pub fn default_scanner_image() -> Result<PathBuf, ImageNotFound> {
    default_guest_image("cella-scanner", SCANNER_IMAGE_ENV)
}

fn default_guest_image(name: &str, env: &str) -> Result<PathBuf, ImageNotFound> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().ok();
    let dir = exe.as_deref().and_then(Path::parent);
    let mut candidates = Vec::new();
    if let Some(dir) = dir {
        // target/<profile>/cella-vmm, or target/<profile>/deps/<test> for test binaries.
        for up in [dir.parent(), dir.parent().and_then(Path::parent)].into_iter().flatten() {
            candidates.push(up.join("cella").join(name));
        }
        candidates.push(dir.join(format!("{name}.elf")));
    }
    candidates.iter().find(|c| c.is_file()).cloned().ok_or_else(|| ImageNotFound {
        searched: candidates.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(", "),
        env: env.to_owned(),
    })
}
