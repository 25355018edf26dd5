#!/usr/bin/env bash
# Azure Blob Storage round trip against Azurite (Microsoft's emulator, from npm) on loopback:
# convert the bundled sample into az://lake/fhir, query every history and current-state table
# back, and compare the counts with the same convert into a local folder. Azurite is installed
# into ~/.cache/flatfhir/azurite (npm) and the container is created with PyPI
# `azure-storage-blob` (cached venv). Without node/npm the check is skipped with a message —
# unless CI=true, where that is a failure.
#   usage: tests/check_azure.sh
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flatfhir/target}"
venv="${FLATFHIR_VENV:-$HOME/.cache/flatfhir/venv}"
root="$HOME/.cache/flatfhir/azurite"
skip() {
  if [ "${CI:-}" = true ]; then echo "check_azure: $1 (a failure in CI)" >&2; exit 1; fi
  echo "check_azure: skipped: $1"; exit 0
}
if [ ! -x "$root/node_modules/.bin/azurite-blob" ]; then
  command -v npm >/dev/null || skip "npm is not installed (Azurite comes from npm)"
  mkdir -p "$root"
  (cd "$root" && npm install --silent --no-audit --no-fund azurite@3) || skip "npm install azurite failed"
fi
if ! "$venv/bin/python" -c 'import azure.storage.blob' 2>/dev/null; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check azure-storage-blob
fi
[ -x "$CARGO_TARGET_DIR/debug/flatfhir" ] || (cd "$here" && cargo test --locked --no-run --quiet)
bin="$CARGO_TARGET_DIR/debug/flatfhir"
work="$(mktemp -d)"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$root/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort "$port" --location "$work/azurite" \
  --silent --skipApiVersionCheck --disableTelemetry >"$work/azurite.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do grep -q "successfully listens" "$work/azurite.log" 2>/dev/null && break; sleep 0.2; done
export AZURITE_BLOB_STORAGE_URL="http://127.0.0.1:$port"
"$venv/bin/python" - "$port" <<'PY'
import sys
from azure.storage.blob import BlobServiceClient
# Azurite's well-known development account.
cs = ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
      "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
      f"BlobEndpoint=http://127.0.0.1:{sys.argv[1]}/devstoreaccount1;")
BlobServiceClient.from_connection_string(cs).create_container("lake")
PY
opt=(--store-option azure_storage_use_emulator=true)
"$bin" convert "$here/tests/data/sample" --out az://lake/fhir "${opt[@]}" -q >/dev/null
"$bin" convert "$here/tests/data/sample" --out "$work/local" -q >/dev/null
sql="select 'observation' as t, count(*) as n from observation union all select 'observation_latest', count(*) from observation_latest
 union all select 'patient_name_latest', count(*) from patient_name_latest union all select 'encounter', count(*) from encounter
 union all select 'condition_coding_latest', count(*) from condition_coding_latest order by 1"
remote=$("$bin" query --data az://lake/fhir "${opt[@]}" --format csv "$sql")
local=$("$bin" query --data "$work/local" --format csv "$sql")
echo "$remote"
[ "$remote" = "$local" ] || { echo "check_azure: az:// counts differ from the local convert:"; echo "$local"; exit 1; }
echo "check_azure: convert → query over az:// (Azurite) equals the local run"
