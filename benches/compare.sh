#!/usr/bin/env bash
# Times `flatfhir convert` beside DuckDB (read_ndjson_auto -> zstd Parquet per type, 2 threads) on
# the same ndjson files in the same run, with peak RSS for both, and prints a table.
#   usage: benches/compare.sh [NDJSON_DIR] [COPIES]
#   NDJSON_DIR defaults to ../shared/data/synthea-100; COPIES (default 1) concatenates the input
#   that many times with rewritten ids, for larger sizes (x10, x20, x100).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
src="${1:-$here/../shared/data/synthea-100}"
copies="${2:-1}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flatfhir/target}"
venv="${FLATFHIR_VENV:-$HOME/.cache/flatfhir/venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import duckdb' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'duckdb>=1.1,<2'
fi
# FLATFHIR_BIN overrides the binary (e.g. a debug build for a quick check of the script itself).
if [ -z "${FLATFHIR_BIN:-}" ]; then
  (cd "$here" && cargo build --release --locked --quiet)
fi
bin="${FLATFHIR_BIN:-$CARGO_TARGET_DIR/release/flatfhir}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

input="$src"
if [ "$copies" -gt 1 ]; then
  input="$work/input"
  "$venv/bin/python" "$here/benches/replicate.py" "$src" "$input" "$copies"
fi
bytes=$(cat "$input"/*.ndjson | wc -c)
lines=$(cat "$input"/*.ndjson | wc -l)

measure() { # name, command...
  local name="$1"; shift
  /usr/bin/time -f '%e %M' -o "$work/$name.time" "$@" >/dev/null 2>"$work/$name.err" || { cat "$work/$name.err"; exit 1; }
  read -r secs rss < "$work/$name.time"
  echo "$name $secs $rss"
}

cat > "$work/duck.py" <<'PY'
import duckdb, glob, os, sys
src, out = sys.argv[1], sys.argv[2]
con = duckdb.connect()
con.execute("SET threads = 2")
types = sorted({os.path.basename(f).split('.')[0] for f in glob.glob(os.path.join(src, '*.ndjson'))})
for t in types:
    os.makedirs(os.path.join(out, t), exist_ok=True)
    con.execute(f"COPY (SELECT * FROM read_ndjson_auto('{src}/{t}.*ndjson', maximum_object_size=67108864, union_by_name=true)) "
                f"TO '{out}/{t}/data.parquet' (FORMAT parquet, COMPRESSION zstd)")
PY

results=()
results+=("$(measure flatfhir "$bin" convert "$input" --out "$work/ff" -q)")
results+=("$(measure duckdb "$venv/bin/python" "$work/duck.py" "$input" "$work/duck")")
echo
printf 'input: %s x%s — %s MB, %s resources\n' "$src" "$copies" "$((bytes / 1000000))" "$lines"
printf '%-10s %9s %9s %12s %10s %12s\n' tool seconds MB/s resources/s 'vs duckdb' 'peak RSS MB'
duck_secs=$(echo "${results[1]}" | awk '{print $2}')
for r in "${results[@]}"; do
  read -r name secs rss <<<"$r"
  awk -v n="$name" -v s="$secs" -v r="$rss" -v b="$bytes" -v l="$lines" -v d="$duck_secs" \
    'BEGIN { printf "%-10s %9.2f %9.1f %12.0f %9.2fx %12.0f\n", n, s, b/1e6/s, l/s, d/s, r/1024 }'
done
