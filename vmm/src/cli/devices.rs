//! Device options shared by `run` and `scan`.

use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Args, Clone, Default)]
pub struct DeviceArgs {
    /// Attach FILE read-only as a virtio-blk disk
    #[arg(long, value_name = "FILE")]
    pub disk: Option<PathBuf>,
    /// Attach virtio-vsock with its host Unix socket at PATH (host ports at PATH_<port>)
    #[arg(long, value_name = "PATH")]
    pub vsock: Option<PathBuf>,
}
