#!/usr/bin/env bash
# Sets Cella up (idempotent) and launches one microVM running the `hello` guest, then shows the
# JSON report of a second launch (exit, launch time, scrub evidence).
#
#   scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
echo
echo "\$ cella-vmm run -- hello"
target/release/cella-vmm run -- hello
echo
echo "\$ cella-vmm run --json -- hello"
target/release/cella-vmm run --json -- hello 2>/dev/null
