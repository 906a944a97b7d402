#!/usr/bin/env bash
# The OpenAPI document checked by openapi-spec-validator, then a property-based API test:
# schemathesis (from PyPI) generates requests from the server's own
# OpenAPI document (/v1/openapi.json) and fails on any 5xx or response that does not match the
# document. Runs against a real `cella serve` (HTTPS, a fresh database in the PostgreSQL at
# DATABASE_URL, a worker running unjailed VMs so submitted jobs end and `?wait=` answers at
# once; sessions it creates are real session VMs, stopped at the end), once with a tenant key and
# once with the admin credential.
#
#   scripts/api-fuzz.sh [MAX_EXAMPLES]      # part of scripts/test.sh; needs a debug build of cella
set -euo pipefail
cd "$(dirname "$0")/.."
examples=${1:-30}
: "${DATABASE_URL:=postgres://cella:cella@localhost:5432/cella}"

if ! command -v schemathesis >/dev/null; then
  echo "api-fuzz: installing schemathesis from PyPI" >&2
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore 'schemathesis>=4,<5'
fi
if ! python3 -c 'import openapi_spec_validator' 2>/dev/null; then
  echo "api-fuzz: installing openapi-spec-validator from PyPI" >&2
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore 'openapi-spec-validator>=0.7,<1'
fi

work=$(mktemp -d /var/tmp/cella-api-fuzz.XXXXXX)
db="cella_api_fuzz_$$"
server="${DATABASE_URL%/*}"
psql -q "$DATABASE_URL" -c "CREATE DATABASE $db" >/dev/null
serve_pid=
cleanup() {
  [ -n "$serve_pid" ] && { kill -TERM "$serve_pid" 2>/dev/null; wait "$serve_pid" 2>/dev/null || true; }
  # Session VMMs outlive `serve` by design (a restarted serve re-adopts them): stop the ones the
  # fuzz created (SIGTERM: each stops its VM and scrubs it).
  # A restored session's VMM is the spare it took: `--api-sock-path …/sessions/.spares/…`.
  vmms="--api-sock(-path)? $work/data/sessions/"
  pkill -TERM -f -- "$vmms" 2>/dev/null || true
  for _ in $(seq 1 50); do pgrep -f -- "$vmms" >/dev/null || break; sleep 0.1; done
  pkill -KILL -f -- "$vmms" 2>/dev/null || true
  psql -q "$DATABASE_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cargo build --quiet -p cella-service -p cella-vmm --bin cella --bin cella-vmm
cella=target/debug/cella
# The document itself first: a real validator (client generators need it valid, with unique
# operation ids).
echo "== openapi-spec-validator on \`cella openapi\`" >&2
"$cella" openapi >"$work/openapi.json"
python3 -m openapi_spec_validator "$work/openapi.json"
DATABASE_URL="$server/$db" CELLA_JAILED=0 CELLA_VMM="$PWD/target/debug/cella-vmm" CELLA_MAX_ARTIFACT_BYTES=65536 \
  "$cella" serve --data-dir "$work/data" --listen 127.0.0.1:0 >"$work/serve.log" 2>&1 &
serve_pid=$!
for _ in $(seq 1 300); do [ -s "$work/data/serve.url" ] && break; sleep 0.1; done
[ -s "$work/data/serve.url" ] || { cat "$work/serve.log" >&2; exit 1; }
url=$(cat "$work/data/serve.url")
export CELLA_DATA_DIR="$work/data"
key=$("$cella" tenant create fuzz | awk '/^API key/ {print $3}')
admin=$(cat "$work/data/admin.key")

run() {
  local who=$1 token=$2
  shift 2
  echo "== schemathesis ($who, up to $examples examples per operation) against $url" >&2
  schemathesis run "$url/v1/openapi.json" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
    --header "Authorization: Bearer $token" \
    --tls-verify "$work/data/tls/ca.pem" \
    --max-examples "$examples" \
    --request-timeout 90 \
    --no-color "$@"
}
status=0
run tenant "$key" --include-tag jobs --include-tag sessions --include-tag packs --include-tag audit --include-tag service || status=1
run admin "$admin" --include-tag admin || status=1
if grep -q 'internal error' "$work/serve.log"; then
  echo "api-fuzz: the server logged internal errors:" >&2
  grep 'internal error' "$work/serve.log" | sort | uniq -c | head -20 >&2
  status=1
fi
exit $status
