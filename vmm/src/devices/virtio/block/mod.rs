//! virtio-blk, read-only, backed by one host file (the tenant's artifact).

mod device;
mod request;

pub use device::{Block, BlockState};
