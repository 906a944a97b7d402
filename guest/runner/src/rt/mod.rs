//! The runner's bare-metal runtime: entry point, port I/O, console, heap, panic handler.

mod console;
mod entry;
mod heap;
mod io;
