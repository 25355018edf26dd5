#!/usr/bin/env bash
# Many tiny files: an export whose server cuts the data into N files (Oracle Health/Cerner serve
# thousands), N from 1,000 to 20,000. Prints, per size, the files downloaded, the time, the time
# per file (flat when a file's commit costs the same at any N) and the Parquet parts the run
# published (bounded per view when small parts are coalesced).
#
#   usage: benches/many_files.sh [DIR] [FILES ...]     (default ../shared/data/synthea-100, 1000 5000 20000)
#   FLATFHIR_BIN overrides the binary (default target/release/flatfhir, built when missing);
#   FLATFHIR_BIN_OLD adds rows for a second binary (e.g. an older build) on the same inputs.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
data="${1:-$here/../shared/data/synthea-100}"
shift || true
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(1000 5000 20000)
bin="${FLATFHIR_BIN:-${CARGO_TARGET_DIR:-$here/target}/release/flatfhir}"
[ -x "$bin" ] || (cd "$here" && cargo build --release --locked --quiet)
resources=$(cat "$data"/*.ndjson 2>/dev/null | grep -c . || true)
[ "$resources" -gt 0 ] || { echo "no *.ndjson in $data" >&2; exit 2; }
tmp="$(mktemp -d)"
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT

measure() { # label binary files
  local label=$1 b=$2 n=$3
  local per=$(( (resources + n - 1) / n ))
  [ "$per" -ge 1 ] || per=1
  "$bin" serve --data "$data" --addr 127.0.0.1:0 --delay 0s --resources-per-file "$per" -q \
    > "$tmp/url" 2> "$tmp/serve.log" &
  server=$!
  for _ in $(seq 100); do [ -s "$tmp/url" ] && break; sleep 0.1; done
  local url; url=$(head -1 "$tmp/url")
  rm -rf "$tmp/out"
  local start end
  start=$(date +%s.%N)
  "$b" export --base-url "$url" --system --out "$tmp/out" --json -q > "$tmp/run.json"
  end=$(date +%s.%N)
  kill "$server"; wait "$server" 2>/dev/null || true; server=""
  python3 - "$tmp/run.json" "$label" "$start" "$end" <<'EOF'
import collections, json, sys
m = json.load(open(sys.argv[1]))
secs = float(sys.argv[4]) - float(sys.argv[3])
files = len(m["inputs"])
per_view = collections.Counter(f["view"] for f in m["files"])
print(f"{sys.argv[2]:10} {files:7} {secs:9.2f} {1000 * secs / files:8.2f} {len(m['files']):7} {max(per_view.values()):9}")
EOF
}

echo "$resources resources in $data"
printf '%-10s %7s %9s %8s %7s %9s\n' binary files seconds ms/file parts "max/view"
for n in "${sizes[@]}"; do
  measure flatfhir "$bin" "$n"
  [ -n "${FLATFHIR_BIN_OLD:-}" ] && measure old "$FLATFHIR_BIN_OLD" "$n"
done
