#!/usr/bin/env bash
# Sets Cella up (idempotent), launches one microVM running the `hello` guest, then scans the
# sample folder examples/sample-app in a microVM and prints its findings.
#
#   scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
echo
echo "\$ cella-vmm run -- hello"
target/release/cella-vmm run -- hello
echo
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
tar -C examples -czf "$out/sample-app.tar.gz" sample-app
echo "\$ cella-vmm scan --artifact sample-app.tar.gz --sarif sample-app.sarif"
target/release/cella-vmm scan --artifact "$out/sample-app.tar.gz" --sarif "$out/sample-app.sarif"
echo
echo "SARIF results (rule, file:line):"
python3 - "$out/sample-app.sarif" <<'PY'
import json, sys
log = json.load(open(sys.argv[1]))
for r in log["runs"][0]["results"]:
    loc = r["locations"][0]["physicalLocation"]
    print(f'  {r["ruleId"]:32} {loc["artifactLocation"]["uri"]}:{loc["region"]["startLine"]}')
PY
