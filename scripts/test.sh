#!/usr/bin/env bash
# Runs every check and test, doing its own set-up first (packages, Rust target, guest image).
#
#   scripts/test.sh
#
# Needs root (or access to /dev/kvm) on a Debian 12 machine with Rust; the tests use the real
# /dev/kvm. Benchmarks are not part of this: see README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

# A clean build never reuses incremental state, which would add ~3 GB to target/.
export CARGO_INCREMENTAL=0
# The build and tests need ~8 GB free; say how much there is, so a full disk is plain to see.
disk_free() { echo "== disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free ($1)" >&2; }
disk_free "before set-up"

CELLA_SETUP_SKIP_RELEASE=1 scripts/setup.sh
# The database the tests use (each sqlx test makes its own database inside this server).
export DATABASE_URL="${DATABASE_URL:-postgres://cella:cella@localhost:5432/cella}"

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy (host, all targets)" >&2
cargo clippy --quiet --workspace --all-targets -- -D warnings
cargo clippy --quiet -p cella-vmm --all-targets --features test-hooks -- -D warnings
echo "== cargo clippy (guest images)" >&2
(
  source scripts/guest-env.sh
  for features in test-modes scanner scanner,test-modes; do # the three images (build-guest.sh)
    cargo clippy --quiet --release -p cella-runner --target x86_64-unknown-linux-gnu --features "$features" -- -D warnings
  done
)
echo "== cargo test" >&2
cargo test --workspace
# Every fuzz target for a share of 250 s (the runs stay under 5 minutes as targets are added).
disk_free "after cargo test"
targets=(fuzz/fuzz_targets/*.rs)
echo "== fuzz targets (libFuzzer, ${#targets[@]} targets, $((250 / ${#targets[@]})) s each)" >&2
scripts/fuzz.sh $((250 / ${#targets[@]}))
echo "== API property test (schemathesis against cella serve's own OpenAPI document)" >&2
scripts/api-fuzz.sh 30
