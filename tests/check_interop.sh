#!/usr/bin/env bash
# Interop check: every table of a flatfhir dataset is a Delta Lake table that other engines read
# directly. Writes a dataset with two runs from the bundled sample, then has PyPI `deltalake`,
# `polars`, and an independent replay of `_delta_log` read by pyarrow and DuckDB (all from PyPI,
# in a cached virtualenv) check row counts against the run records — before and after
# `compact` (OPTIMIZE, then VACUUM with no retention). The second run's patient view changed
# (a column added, one removed), so one table holds files of two shapes.
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
# Started right after the first: run ids are unique to the millisecond plus 48 random bits. The
# second run's patient view gained a column and lost one, so that its tables' schema evolves
# (files of both shapes in one table).
mkdir -p "$out/views"
"$venv/bin/python" - "$here/schemas/patient.json" "$out/views/patient.json" <<'PY'
import json, sys
view = json.load(open(sys.argv[1]))
columns = view["select"][0]["column"]
columns[:] = [c for c in columns if c["name"] != "gender"]
columns.append({"name": "gender_code", "path": "gender", "type": "code"})
json.dump(view, open(sys.argv[2], "w"))
PY
"$bin" convert "$here/tests/data/sample" --out "$out/ds" --schemas "$out/views" -q >/dev/null
# The evolved patient table as deltalake and polars read it: each run's rows carry the column
# its view had, null in the other (4 patients per run).
evolved() {
  "$venv/bin/python" - "$out/ds" <<'PY'
import sys, deltalake, polars as pl
for table, gender, code in [("patient", 4, 4), ("patient_latest", 0, 4)]:
    path = f"{sys.argv[1]}/{table}"
    t = deltalake.DeltaTable(path).to_pyarrow_table()
    p = pl.read_delta(path)
    got = [(len(t.column(c).drop_null()), p[c].drop_nulls().len()) for c in ("gender", "gender_code")]
    assert got == [(gender, gender), (code, code)], (table, got)
print("evolved patient tables: ok")
PY
}
"$venv/bin/python" "$here/tests/check_interop.py" "$out/ds" --expect-runs 2
evolved
"$bin" compact --data "$out/ds" --retain 0s
"$venv/bin/python" "$here/tests/check_interop.py" "$out/ds" --expect-runs 2
evolved
