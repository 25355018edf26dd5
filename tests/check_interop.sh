#!/usr/bin/env bash
# Interop check: a flatfhir dataset is plain Hive-partitioned Parquet that other engines read
# directly. Writes a dataset with two runs (two `export=` partitions) from the bundled sample,
# compacts it, and has DuckDB and pyarrow (from PyPI, in a cached virtualenv) check row counts
# against the run manifests and the `export` partition column, before and after `compact`.
#   usage: tests/check_interop.sh
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flatfhir/target}"
venv="${FLATFHIR_VENV:-$HOME/.cache/flatfhir/venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import duckdb, pyarrow' 2>/dev/null; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'duckdb>=1.1,<2' 'pyarrow>=15'
fi
[ -x "$CARGO_TARGET_DIR/debug/flatfhir" ] || (cd "$here" && cargo test --locked --no-run --quiet)
bin="$CARGO_TARGET_DIR/debug/flatfhir"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$bin" convert "$here/tests/data/sample" --out "$out/ds" -q >/dev/null
# Started right after the first: run ids are unique to the millisecond plus 48 random bits.
"$bin" convert "$here/tests/data/sample" --out "$out/ds" -q >/dev/null
"$venv/bin/python" "$here/tests/check_interop.py" "$out/ds"
"$bin" compact --data "$out/ds" --min-files 1
"$venv/bin/python" "$here/tests/check_interop.py" "$out/ds"
