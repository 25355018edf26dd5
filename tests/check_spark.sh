#!/usr/bin/env bash
# Spark check: Apache Spark's own Parquet reader (PyPI `pyspark`, Java 17 from Debian) reads every
# table flatfhir writes exactly as pyarrow does (tests/check_spark.py: per column, non-null counts
# and value checksums). Converts the bundled test data (every resource type the default views
# cover, the sample export and the hostile ndjson), plus any DIR given (.ci/run passes Synthea
# when ../shared is there).
#   usage: tests/check_spark.sh [DIR_OF_NDJSON...]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flatfhir/target}"
venv="${FLATFHIR_SPARK_VENV:-$HOME/.cache/flatfhir/venv-spark}"
if ! command -v java >/dev/null; then
  # pyspark 4 needs Java 17 or newer.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -qq openjdk-17-jre-headless >/dev/null
  else
    echo "check_spark.sh: needs Java 17+ on PATH (e.g. apt-get install openjdk-17-jre-headless)" >&2
    exit 1
  fi
fi
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import pyspark, pyarrow' 2>/dev/null; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'pyspark>=4.0,<5' 'pyarrow>=15'
fi
[ -x "$CARGO_TARGET_DIR/debug/flatfhir" ] || (cd "$here" && cargo test --locked --no-run --quiet)
bin="$CARGO_TARGET_DIR/debug/flatfhir"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$bin" convert "$here/tests/data/valid_fhir" "$here/tests/data/sample" "$here/tests/data/ndjson" \
  --out "$out/bundled" -q >/dev/null
export SPARK_LOCAL_IP=127.0.0.1 PYSPARK_PYTHON="$venv/bin/python"
"$venv/bin/python" "$here/tests/check_spark.py" "$out/bundled" 2>"$out/spark.log" \
  || { tail -n 40 "$out/spark.log" >&2; exit 1; }
for src in "$@"; do
  "$bin" convert "$src" --out "$out/extra" -q >/dev/null
  "$venv/bin/python" "$here/tests/check_spark.py" "$out/extra" 2>"$out/spark.log" \
    || { tail -n 40 "$out/spark.log" >&2; exit 1; }
  rm -rf "$out/extra"
done
