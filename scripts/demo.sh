#!/usr/bin/env bash
# Sets Cella up (idempotent), starts `cella serve` (HTTPS API, private PostgreSQL, a worker that
# runs every job jailed in its own microVM), creates a tenant, scans the sample folder
# examples/sample-app with `cella scan`, prints the findings, opens a session on the same folder
# (grep, suspend to disk, resume in a new VMM with the index intact, remove), downloads the
# tenant's audit log and verifies it offline, then stops the server.
#
#   scripts/demo.sh                # data folder: /var/tmp/cella-demo (CELLA_DEMO_DIR to change)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
bin=target/release
data=${CELLA_DEMO_DIR:-/var/tmp/cella-demo}
mkdir -p "$data"
export CELLA_DATA_DIR=$data

echo
echo "\$ cella serve --data-dir $data --listen 127.0.0.1:0 &"
rm -f "$data/serve.url"
"$bin/cella" serve --listen 127.0.0.1:0 >"$data/serve.log" 2>&1 &
serve_pid=$!
trap 'kill -TERM $serve_pid 2>/dev/null; wait $serve_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  [ -s "$data/serve.url" ] && break
  kill -0 $serve_pid 2>/dev/null || { cat "$data/serve.log" >&2; echo "cella serve failed to start" >&2; exit 1; }
  sleep 0.1
done
[ -s "$data/serve.url" ] || { cat "$data/serve.log" >&2; echo "cella serve did not start in 60 s" >&2; exit 1; }
sed 's/^/  /' "$data/serve.log"

tenant="demo-$(date +%s)"
echo
echo "\$ cella tenant create $tenant"
created=$("$bin/cella" tenant create "$tenant")
echo "$created" | sed 's/^/  /'
CELLA_API_KEY=$(echo "$created" | awk '/^API key/ {print $3}')
export CELLA_API_KEY

echo
echo "\$ cella scan examples/sample-app --sarif $data/sample-app.sarif"
status=0
"$bin/cella" scan examples/sample-app --sarif "$data/sample-app.sarif" || status=$?
echo "(exit status $status: 1 means findings at or above --fail-on error, as a CI gate would see it)"
[ "$status" -le 1 ] || exit "$status"

echo
echo "\$ cella session create examples/sample-app     # a VM that keeps the artifact indexed"
session=$("$bin/cella" session create examples/sample-app)
echo "$session" | sed 's/^/  /'
id=$(echo "$session" | awk '/^session/ {print $2}')
echo "\$ cella session exec $id grep 'sk_live|TODO'"
"$bin/cella" session exec "$id" grep 'sk_live|TODO' | sed 's/^/  /'
before=$("$bin/cella" session exec "$id" stats | awk '/^index_id/ {print $2}')
echo "\$ cella session suspend $id      # snapshot to disk; the VMM exits, its memory scrubbed"
"$bin/cella" session suspend "$id" | sed 's/^/  /'
echo "\$ cella session resume $id       # a new VMM process restores the snapshot"
"$bin/cella" session resume "$id" | sed 's/^/  /'
after=$("$bin/cella" session exec "$id" stats | awk '/^index_id/ {print $2}')
echo "  index id before suspend: $before, after resume: $after (the index was not rebuilt)"
[ "$before" = "$after" ] || { echo "the restored session rebuilt its index" >&2; exit 1; }
echo "\$ cella session rm $id"
"$bin/cella" session rm "$id" | sed 's/^/  /'

echo
echo "\$ cella audit download --out $data/audit.tar     # saves the server's public key next to it"
"$bin/cella" audit download --out "$data/audit.tar" 2>&1 | sed 's/^/  /'
echo "\$ cella audit fingerprint $data/audit-signing.key.pub   # the operator's, read to the tenant apart"
"$bin/cella" audit fingerprint "$data/audit-signing.key.pub" | sed 's/^/  /'
key_id=$(awk '$1 == "id" {print $2}' "$data/audit-signing.key.pub")
echo "\$ cella audit verify $data/audit.tar --trusted-key $data/cella-audit-$key_id.pub"
"$bin/cella" audit verify "$data/audit.tar" --trusted-key "$data/cella-audit-$key_id.pub"
