//! What each mode does.

use alloc::string::String;
use core::fmt::Write;

#[cfg(not(feature = "scanner"))]
use cella_abi::status;
use cella_abi::BootInfo;
use cella_runner::mode::Mode;

use super::console::Console;
use super::entry::exit;

// An image is the scanner, the test runner, or both (scripts/build-guest.sh).
#[cfg(not(any(feature = "scanner", feature = "test-modes")))]
compile_error!("build cella-runner with feature `test-modes` (the cella-runner image) or `scanner` (cella-scanner), or both; see scripts/build-guest.sh");

#[cfg(feature = "scanner")]
mod scanner;
#[cfg(feature = "scanner")]
mod session;
#[cfg(feature = "test-modes")]
mod test_modes;

/// An image without the `test-modes` feature (`cella-scanner`) refuses every test mode by name.
#[cfg(not(feature = "test-modes"))]
mod test_modes {
    use core::fmt::Write;

    use cella_abi::{status, BootInfo};
    use cella_runner::mode::{Mode, NO_TEST_MODES};

    use crate::rt::console::Console;
    use crate::rt::entry::exit;

    pub fn run(_mode: Mode<'_>, _boot: &BootInfo, console: &mut Console) -> ! {
        let _ = writeln!(console, "cella-runner: {NO_TEST_MODES}");
        exit(status::USAGE)
    }
}

/// How long a runner waits for the host to take the last bytes of a connection.
pub(super) const CLOSE_TIMEOUT_MS: u32 = 10_000;

pub(super) use cella_abi::status::DEVICE_FAILED;

pub fn run(mode: Mode<'_>, boot: &BootInfo, console: &mut Console) -> ! {
    match mode {
        Mode::Hello => {
            let mut line = String::with_capacity(32);
            line.push_str("hello from cella-runner\n");
            let _ = console.write_str(&line);
            drop(line);
            exit(0)
        }
        Mode::Exit(code) => exit(code),
        #[cfg(feature = "scanner")]
        Mode::Scan => scanner::scan(boot, console),
        #[cfg(feature = "scanner")]
        Mode::Template => scanner::template(boot, console),
        #[cfg(feature = "scanner")]
        Mode::Session(args) => session::session(boot, console, args),
        #[cfg(not(feature = "scanner"))]
        Mode::Scan | Mode::Template | Mode::Session(_) => {
            let _ = writeln!(
                console,
                "cella-runner: this image has no scanner; `scan`, `template` and `session` run in \
                 the cella-scanner image"
            );
            exit(status::USAGE)
        }
        test @ (Mode::Fault
        | Mode::Spin
        | Mode::Flood(_)
        | Mode::HeapHash
        | Mode::FillCanary
        | Mode::ReadDisk
        | Mode::VsockEcho(_)
        | Mode::VsockServe(_)
        | Mode::Hostile(_)
        | Mode::Helper(_)) => test_modes::run(test, boot, console),
    }
}

pub(super) fn fail(console: &mut Console, what: &str, why: impl core::fmt::Debug) -> ! {
    let _ = writeln!(console, "cella-runner: {what}: {why:?}");
    exit(DEVICE_FAILED)
}
