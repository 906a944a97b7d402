//! The runner's bare-metal runtime: entry point, port I/O, console, heap, virtio drivers,
//! panic handler.

#[cfg(feature = "scanner")]
mod blk_source;
mod console;
mod entry;
mod heap;
mod helper;
mod io;
mod mem;
mod modes;
mod virtio;
