#!/usr/bin/env bash
# Builds the fuzz targets (fuzz/: libFuzzer through libfuzzer-sys, instrumented with LLVM's
# sanitizer-coverage flags on the stable toolchain, overflow checks and debug assertions on) and
# runs each one, one after another, for a bounded time on its committed corpus. Fails on the
# first crash, hang (an input that takes over 10 s) or out-of-memory (2 GiB), printing the
# reproducer's path and the command that replays it.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   # default 20 s, every target
#   scripts/fuzz.sh 0                                  # build only
#
# The committed corpora (fuzz/corpus/<target>/) are read, never written: inputs that reach new
# code go to fuzz/target/corpus/<target>/, kept between runs on this machine. Crashes go to
# fuzz/artifacts/<target>/. See README.md, "Fuzzing".
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-20}
shift || true
if ! [[ "$seconds" =~ ^[0-9]+$ ]]; then
  echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]" >&2
  exit 2
fi
if (($#)); then
  targets=("$@")
else
  targets=()
  for f in fuzz/fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi
for t in "${targets[@]}"; do
  [ -f "fuzz/fuzz_targets/$t.rs" ] || { echo "fuzz: no target $t (see fuzz/fuzz_targets/)" >&2; exit 2; }
done

# libFuzzer's runtime is C++, compiled by libfuzzer-sys's build script (scripts/setup.sh
# installs g++).
if ! command -v c++ >/dev/null; then
  echo "fuzz: needs a C++ compiler: run scripts/setup.sh (or apt-get install g++)" >&2
  exit 1
fi

# The coverage instrumentation libFuzzer steers by: stable rustc flags (cargo-fuzz passes the
# same, plus AddressSanitizer, which needs nightly; the code under test here is safe Rust).
# With an explicit --target they apply to the fuzzed code only, not to build scripts and
# proc-macros.
target=x86_64-unknown-linux-gnu
flags=(
  -Cpasses=sancov-module
  -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
  -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares
  -Cforce-frame-pointers=yes
  --cfg fuzzing
)
unset RUSTFLAGS
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="${flags[*]}"
# The binaries are run from here below, whatever the environment says.
export CARGO_TARGET_DIR="$PWD/fuzz/target"
echo "== fuzz: building ${#targets[@]} targets" >&2
started=$SECONDS
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
(cd fuzz && cargo build --quiet --release --target "$target" -p cella-fuzz "${bins[@]}")
echo "fuzz: built in $((SECONDS - started)) s" >&2
((seconds > 0)) || exit 0

bin=fuzz/target/$target/release
# Targets that need files (a disk, a socket) make them under TMPDIR; libFuzzer ends a run
# without running destructors, so give the runs a folder of their own and remove it after.
TMPDIR=$(mktemp -d -t cella-fuzz.XXXXXX)
export TMPDIR
trap 'rm -rf "$TMPDIR"' EXIT
for t in "${targets[@]}"; do
  seeds=fuzz/corpus/$t
  scratch=fuzz/target/corpus/$t
  artifacts=fuzz/artifacts/$t
  mkdir -p "$scratch" "$artifacts"
  log=fuzz/target/$t.log
  # A crash, hang or OOM ends the run with a non-zero status and writes the input to
  # $artifacts; everything else ends at -max_total_time.
  if "$bin/$t" "$scratch" "$seeds" \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1; then
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
    committed=$(ls "$seeds" | wc -l)
    found=$(ls "$scratch" | wc -l)
    echo "fuzz: $t: ${seconds} s, ${execs:-?} inputs, ${cov:-cov: ?}, corpus $committed + $found found" >&2
  else
    status=$?
    echo "fuzz: $t FAILED (exit $status); the end of its log ($log):" >&2
    grep -v '^#[0-9]' "$log" | tail -40 >&2
    reproducer=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    if [ -n "$reproducer" ]; then
      echo "fuzz: reproducer: $reproducer" >&2
      echo "fuzz: replay it with: $bin/$t $reproducer" >&2
    fi
    exit 1
  fi
done
echo "fuzz: ${#targets[@]} targets ran clean, ${seconds} s each" >&2
