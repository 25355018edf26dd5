#!/usr/bin/env bash
# The metrics file (`--metrics-file`) is valid Prometheus text: PyPI `prometheus_client`'s own
# parser (cached virtualenv) reads the file of a throttled export from the built-in server, of a
# failed export, and of a convert, and the figures a textfile-collector alert uses are there.
#   usage: tests/check_metrics.sh
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flatfhir/target}"
venv="${FLATFHIR_VENV:-$HOME/.cache/flatfhir/venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import prometheus_client' 2>/dev/null; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'prometheus_client>=0.17'
fi
[ -x "$CARGO_TARGET_DIR/debug/flatfhir" ] || (cd "$here" && cargo test --locked --no-run --quiet)
bin="$CARGO_TARGET_DIR/debug/flatfhir"
work="$(mktemp -d)"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$bin" serve --data "$here/tests/data/sample" --addr "127.0.0.1:$port" --delay 0s >"$work/serve.out" 2>"$work/serve.err" &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do grep -q http "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
base="$(head -1 "$work/serve.out")"

"$bin" export --base-url "$base" --patients --out "$work/lake" --param _flatfhirFault=file-429 \
  --metrics-file "$work/ok.prom" -q >/dev/null
if "$bin" export --base-url "$base" --patients --out "$work/lake" --max-retries 0 \
  --param _flatfhirFault=kickoff-500 --metrics-file "$work/failed.prom" -q 2>/dev/null; then
  echo "check_metrics: the failing export succeeded" >&2; exit 1
fi
"$bin" convert "$here/tests/data/sample" --out "$work/converted" --metrics-file "$work/convert.prom" -q >/dev/null

"$venv/bin/python" - "$work" <<'PY'
import sys
from prometheus_client.parser import text_string_to_metric_families

def read(path):
    with open(path) as f:
        families = list(text_string_to_metric_families(f.read()))
    out = {}
    for fam in families:
        assert fam.type == "gauge", (fam.name, fam.type)
        assert fam.name.startswith("flatfhir_"), fam.name
        for s in fam.samples:
            assert {"command", "dataset"} <= set(s.labels), s
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("command", "dataset"))))] = s.value
    return out

work = sys.argv[1]
ok = read(f"{work}/ok.prom")
assert ok[("flatfhir_run_success", ())] == 1, ok
assert ok[("flatfhir_run_exit_code", ())] == 0
assert ok[("flatfhir_last_run_timestamp_seconds", ())] > 1.7e9
assert ok[("flatfhir_run_rows", (("type", "Patient"),))] > 0
assert ok[("flatfhir_run_http_throttled", ())] > 0, "file-429 was counted"
assert ok[("flatfhir_run_http_throttle_wait_seconds", ())] >= 1
assert ok[("flatfhir_run_http_responses", (("code", "429"),))] > 0
failed = read(f"{work}/failed.prom")
assert failed[("flatfhir_run_success", ())] == 0, failed
assert failed[("flatfhir_run_exit_code", ())] == 2
converted = read(f"{work}/convert.prom")
assert converted[("flatfhir_run_success", ())] == 1
assert converted[("flatfhir_run_lines", (("type", "Observation"),))] > 0
print(f"check_metrics: ok ({len(ok)} + {len(failed)} + {len(converted)} samples parsed by prometheus_client)")
PY
