#!/usr/bin/env bash
# Interop check: every table of a flatfhir dataset is a Delta Lake table that other engines read
# directly. Writes a dataset with two runs from the bundled sample, then has PyPI `deltalake`,
# `polars`, and an independent replay of `_delta_log` read by pyarrow and DuckDB (all from PyPI,
# in a cached virtualenv) check row counts against the run records — before and after
# `compact` (OPTIMIZE, then VACUUM with no retention).
#   usage: tests/check_interop.sh
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flatfhir/target}"
venv="${FLATFHIR_VENV:-$HOME/.cache/flatfhir/venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import duckdb, pyarrow, deltalake, polars' 2>/dev/null; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'duckdb>=1.1,<2' 'pyarrow>=15' 'deltalake>=1.1' 'polars>=1.0'
fi
[ -x "$CARGO_TARGET_DIR/debug/flatfhir" ] || (cd "$here" && cargo test --locked --no-run --quiet)
bin="$CARGO_TARGET_DIR/debug/flatfhir"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$bin" convert "$here/tests/data/sample" --out "$out/ds" -q >/dev/null
# Started right after the first: run ids are unique to the millisecond plus 48 random bits.
"$bin" convert "$here/tests/data/sample" --out "$out/ds" -q >/dev/null
"$venv/bin/python" "$here/tests/check_interop.py" "$out/ds" --expect-runs 2
"$bin" compact --data "$out/ds" --retain 0s
"$venv/bin/python" "$here/tests/check_interop.py" "$out/ds" --expect-runs 2
