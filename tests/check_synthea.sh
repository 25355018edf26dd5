#!/usr/bin/env bash
# Extra check over real data: convert a Synthea bulk export with the flatfhir binary, then read the
# Parquet with another engine (DuckDB, from PyPI in a cached virtualenv) and check that every
# resource type's base view has exactly as many rows as the ndjson has lines, and that
# patient.gender/birth_date and observation.value_quantity equal the source values.
#   usage: tests/check_synthea.sh DIR_OF_NDJSON
set -euo pipefail
src="$(cd "$1" && pwd)"
here="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flatfhir/target}"
venv="${FLATFHIR_VENV:-$HOME/.cache/flatfhir/venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import duckdb' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'duckdb>=1.1,<2'
fi
# The binary `cargo test` already built (same features, dependencies optimised): no second build.
[ -x "$CARGO_TARGET_DIR/debug/flatfhir" ] || (cd "$here" && cargo test --locked --no-run --quiet)
bin="$CARGO_TARGET_DIR/debug/flatfhir"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
/usr/bin/time -f 'convert: %e s, peak RSS %M KB' "$bin" convert "$src" --out "$out/ds" -q
# The same files through the export path: serve them, run a Patient-level export over loopback.
"$bin" serve --data "$src" --addr 127.0.0.1:0 --delay 1s >"$out/serve.url" 2>"$out/serve.log" &
serve_pid=$!
trap 'kill $serve_pid 2>/dev/null || true; rm -rf "$out"' EXIT
for _ in $(seq 100); do [ -s "$out/serve.url" ] && break; sleep 0.2; done
/usr/bin/time -f 'export over loopback: %e s, peak RSS %M KB' \
  "$bin" export --base-url "$(head -n 1 "$out/serve.url")" --patients --out "$out/exported" -q >/dev/null
kill $serve_pid
"$venv/bin/python" "$here/tests/check_synthea.py" "$src" "$out/ds" "$out/exported"
"$bin" query --data "$out/ds" "select gender, count(*) as patients from patient group by gender order by gender"
