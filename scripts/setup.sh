#!/usr/bin/env bash
# Installs what Cella needs on a fresh Debian 12 machine and builds the guest image.
# Idempotent: it installs only what is missing and rebuilds only what changed.
#
#   scripts/setup.sh            # packages, Rust target, guest image, release binaries
#
# Afterwards: target/cella/cella-runner and cella-scanner (the guest images cella-vmm uses by
# default) and cella-scanner-test (the scanner with the test modes, for the tests), target/cella/native-hello (the launch benchmark's native comparison),
# target/release/cella-vmm and cella-jailer, and a running PostgreSQL with a `cella` role.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1msetup:\033[0m %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# --- Debian packages -------------------------------------------------------------------
# gcc + libc6-dev: the static native process the launch benchmark compares against.
# bubblewrap: the sandbox the launch benchmark compares against.
# postgresql: the queue and the audit log (tests use a local cluster, see below).
# ripgrep: the scan benchmark's comparison.
# g++: libFuzzer's runtime, which the fuzz targets build (scripts/fuzz.sh).
# python3-requests: the generic HTTP client the service's tests check refusals with.
# python3-yaml: reads the CI recipes in examples/ci/ so their tests run the very commands.
# zip: Info-ZIP, one of the zip writers the archive tests read the output of.
# git: the findings tests make a repository (installed unless some git is on PATH).
packages=(gcc g++ libc6-dev bubblewrap postgresql ripgrep python3-requests python3-yaml zip zstd)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
command -v git >/dev/null || missing+=(git)
if ((${#missing[@]})); then
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
  [ "$(id -u)" = 0 ] || die "missing packages ${missing[*]}: run as root (or install them yourself)"
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- PostgreSQL ----------------------------------------------------------------------------
# The tests and the service (when not given DATABASE_URL) need a server. Start Debian's
# cluster and make a `cella` role that may create databases (each test gets its own).
if [ "${CELLA_SETUP_SKIP_POSTGRES:-0}" != 1 ]; then
  pg_version=$(ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -1)
  [ -n "$pg_version" ] || die "PostgreSQL is not installed (apt-get install postgresql)"
  if ! pg_lsclusters -h 2>/dev/null | awk '{print $1" "$2}' | grep -qx "$pg_version main"; then
    say "creating PostgreSQL $pg_version cluster 'main'"
    pg_createcluster "$pg_version" main >/dev/null
  fi
  if ! pg_lsclusters -h | awk -v v="$pg_version" '$1==v && $2=="main" {print $4}' | grep -qx online; then
    say "starting PostgreSQL $pg_version"
    pg_ctlcluster "$pg_version" main start || die "cannot start PostgreSQL $pg_version (see /var/log/postgresql/)"
  fi
  for _ in $(seq 50); do
    runuser -u postgres -- psql -qAtc 'select 1' >/dev/null 2>&1 && break
    sleep 0.2
  done
  runuser -u postgres -- psql -qAtc 'select 1' >/dev/null || die "PostgreSQL does not answer"
  if [ "$(runuser -u postgres -- psql -qAtc "select 1 from pg_roles where rolname = 'cella'")" != 1 ]; then
    say "creating PostgreSQL role and database 'cella'"
    runuser -u postgres -- psql -qc "create role cella login createdb password 'cella'" >/dev/null
  fi
  if [ "$(runuser -u postgres -- psql -qAtc "select 1 from pg_database where datname = 'cella'")" != 1 ]; then
    runuser -u postgres -- psql -qc "create database cella owner cella" >/dev/null
  fi
fi

# --- KVM ---------------------------------------------------------------------------------
[ -e /dev/kvm ] || die "/dev/kvm does not exist: Cella needs KVM (load kvm_intel/kvm_amd, or a host that offers it)"
[ -r /dev/kvm ] && [ -w /dev/kvm ] || die "/dev/kvm is not readable and writable by $(id -un): run as root or join the kvm group"

# Huge pages for large scans: cella-vmm asks for 2 MiB pages for the heap of a VM whose artifact
# is 16 MiB or more (~13% faster here). Shared memory gets them only if the host allows it; in
# `advise` mode only memory that asks does, so nothing else on the host changes.
thp=/sys/kernel/mm/transparent_hugepage/shmem_enabled
if [ -w "$thp" ] && grep -q '\[never\]' "$thp"; then
  say "allowing transparent huge pages for shared memory that asks for them (shmem_enabled=advise)"
  echo advise > "$thp"
fi

# --- Rust ---------------------------------------------------------------------------------
command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) first"

# --- guest images and comparison binary ----------------------------------------------------
say "building the guest images (target/cella/cella-runner, cella-scanner, cella-scanner-test)"
scripts/build-guest.sh || die "building the guest images failed (see above)"

if [ ! -x target/cella/native-hello ] || [ tests/bench/native-hello.c -nt target/cella/native-hello ]; then
  say "building the native comparison process (static)"
  gcc -static -O2 -o target/cella/native-hello tests/bench/native-hello.c
fi

# --- host binaries -------------------------------------------------------------------------
# cella-vmm is linked statically: a jailed VMM needs no shared libraries in its jail, and a
# static binary starts ~0.4 ms sooner (no dynamic loader); stripped, it is smaller to copy into
# a jail and to page in.
if [ "${CELLA_SETUP_SKIP_RELEASE:-0}" != 1 ]; then
  say "building release binaries (cella-vmm statically linked)"
  cargo rustc --quiet --release -p cella-vmm --bin cella-vmm -- -C target-feature=+crt-static -C strip=symbols
  # The jailer is static too: it starts ~0.3 ms sooner without the dynamic loader.
  cargo rustc --quiet --release -p cella-jailer --bin cella-jailer -- -C target-feature=+crt-static
  cargo build --quiet --release -p cella-service
fi
say "ready: guest images in target/cella/; PostgreSQL at postgres://cella:cella@localhost:5432/cella"
