#!/usr/bin/env bash
# Builds the guest images into target/cella/ (or $CARGO_TARGET_DIR/cella/; run by scripts/setup.sh):
#   cella-runner        the runner's demo and test modes (hello, exit, fault, spin, ...; features
#                       "test-modes"): small, launches fastest
#   cella-scanner       the runner with the scan engine (feature "scanner") and no test modes:
#                       what `cella-vmm scan` and the service run
#   cella-scanner-test  the scanner with the test modes as well, for tests that need both (a
#                       template restored into `heap-hash`)
#
# The runner is a freestanding program (no OS, no libc). It is compiled by the
# x86_64-unknown-linux-gnu code generator, not x86_64-unknown-none: the latter is a soft-float
# target, so its code may not use SSE, and the scan engine's literal search is several times
# slower without it. With --cfg cella_guest the crate is no_std/no_main and brings its own
# entry point and memory functions; the link is static, non-PIE, at 2 MiB, with no start files
# and no libraries. target-cpu x86-64-v2 (SSE4.2, SSSE3, POPCNT): the VMM passes the host's
# CPUID through, and the VMM checks that the CPU has those features before it runs a guest.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/guest-env.sh
target=${CARGO_TARGET_DIR:-target}
mkdir -p "$target/cella"
build() { # image-name cargo-args...
  local name=$1; shift
  cargo build --quiet --release -p cella-runner --target x86_64-unknown-linux-gnu "$@"
  install -m 0644 "$target/x86_64-unknown-linux-gnu/release/cella-runner" "$target/cella/$name.new"
  mv -f "$target/cella/$name.new" "$target/cella/$name"
}
build cella-runner --features test-modes
build cella-scanner --features scanner
build cella-scanner-test --features scanner,test-modes
