#!/usr/bin/env bash
# Times `flatfhir convert` beside its peers on the same ndjson files in the same run — DuckDB 1.5
# (read_ndjson_auto -> zstd Parquet per type, 2 threads; the fastest here, pinned), DuckDB 2.x
# (same script, its own venv) and polars (scan_ndjson -> sink_parquet, zstd) — with peak RSS
# for each, at one or more input sizes, and prints one table. With --export it also times
# `flatfhir export` against `flatfhir serve` on loopback beside a plain download of the same
# files (same server, same gzip negotiation).
#
#   usage: benches/compare.sh [--export [--file-rate RATE]] [--peers "duckdb duckdb2 polars"]
#                             [--no-duckdb] [--repeat N] [--force] [NDJSON_DIR] [COPIES ...]
#
#   NDJSON_DIR defaults to ../shared/data/synthea-100. Each COPIES (default 1) concatenates the
#   input that many times with rewritten ids (benches/replicate.py), e.g. `1 10 20 100`.
#   --file-rate RATE (e.g. 2MB) makes the server send each file at most that many bytes per
#   second, as an EHR's storage does, so that the local server does not compete for the cores.
#   --peers chooses the peers (default all three; --no-duckdb: none). --repeat N runs every
#   measurement N times (in turns: each tool once, then again) and keeps the fastest time and
#   the largest peak RSS. The script refuses to measure while the 1-minute load average says
#   another job is running (above 0.5 after waiting up to 2 minutes for it to settle); --force
#   measures anyway. FLATFHIR_BIN overrides the binary (default: a fresh `cargo build
#   --release`). Compare rows of one run, never numbers of different runs.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
export_too=0
file_rate=""
peers="duckdb duckdb2 polars"
repeat=1
force=0
while [ $# -gt 0 ]; do
  case "$1" in
    --export) export_too=1; shift ;;
    --file-rate) file_rate="$2"; shift 2 ;;
    --no-duckdb) peers=""; shift ;;
    --peers) peers="$2"; shift 2 ;;
    --repeat) repeat="$2"; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
has_peer() { case " $peers " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
src="${1:-$here/../shared/data/synthea-100}"
shift || true
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(1)

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flatfhir/target}"
venv="${FLATFHIR_VENV:-$HOME/.cache/flatfhir/venv}"
venv2="${FLATFHIR_VENV_DUCKDB2:-$HOME/.cache/flatfhir/venv-duckdb2}"
# ensure VENV MODULE VERSION_CHECK PIP_SPEC: a venv whose MODULE's version passes VERSION_CHECK.
ensure() {
  local v="$1" module="$2" check="$3" spec="$4"
  [ -x "$v/bin/python" ] || python3 -m venv "$v"
  if ! "$v/bin/python" -c "import $module, sys; v = $module.__version__; sys.exit(0 if $check else 1)" 2>/dev/null; then
    "$v/bin/pip" install --quiet --disable-pip-version-check "$spec"
  fi
}
if has_peer duckdb; then ensure "$venv" duckdb "v.startswith('1.5.')" 'duckdb>=1.5,<1.6'; fi
if has_peer polars; then ensure "$venv" polars "int(v.split('.')[0]) >= 1" 'polars>=1'; fi
if has_peer duckdb2; then ensure "$venv2" duckdb "int(v.split('.')[0]) >= 2" 'duckdb>=2,<3'; fi
py="$venv/bin/python"
[ -x "$py" ] || py=python3
py2="$venv2/bin/python"
version() { "$1" -c "import $2; print($2.__version__)" 2>/dev/null || echo "?"; }
if [ -z "${FLATFHIR_BIN:-}" ]; then
  (cd "$here" && cargo build --release --locked --quiet)
fi
bin="${FLATFHIR_BIN:-$CARGO_TARGET_DIR/release/flatfhir}"
work="$(mktemp -d)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# measure NAME COMMAND... -> "NAME SECONDS PEAK_RSS_KB" (/usr/bin/time -v's numbers); with
# --repeat, the fastest of the runs so far and the largest peak RSS (kept in $work/NAME.best).
measure() {
  local name="$1"; shift
  /usr/bin/time -f '%e %M' -o "$work/$name.time" "$@" >/dev/null 2>"$work/$name.err" \
    || { cat "$work/$name.err" >&2; exit 1; }
  read -r secs rss < "$work/$name.time"
  # Each run as it is measured (stderr), so that a run stopped half-way still shows its rows.
  echo "  $name: ${secs} s, peak RSS $((rss / 1024)) MB" >&2
  if [ -f "$work/$name.best" ]; then
    read -r best_secs best_rss < "$work/$name.best"
    secs=$(awk -v a="$secs" -v b="$best_secs" 'BEGIN { print (a < b ? a : b) }')
    [ "$rss" -ge "$best_rss" ] || rss=$best_rss
  fi
  echo "$secs $rss" > "$work/$name.best"
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

cat > "$work/pl_convert.py" <<'PY'
import glob, os, sys
import polars as pl
src, out = sys.argv[1], sys.argv[2]
types = sorted({os.path.basename(f).split('.')[0] for f in glob.glob(os.path.join(src, '*.ndjson'))})
for t in types:
    os.makedirs(os.path.join(out, t), exist_ok=True)
    pl.scan_ndjson(sorted(glob.glob(f"{src}/{t}.*ndjson")) or f"{src}/{t}.ndjson", infer_schema_length=None) \
        .sink_parquet(f"{out}/{t}/data.parquet", compression="zstd")
PY

# quiet_machine: wait (up to 2 minutes) for the 1-minute load average to drop under 0.5;
# refuse to measure above it unless --force (another job's CPU time would be counted).
quiet_machine() {
  local load
  for _ in $(seq 24); do
    load=$(cut -d' ' -f1 /proc/loadavg)
    awk -v l="$load" 'BEGIN { exit !(l < 0.5) }' && return 0
    sleep 5
  done
  if [ "$force" = 1 ]; then
    echo "warning: load average $load: another job is running; measuring anyway (--force)" >&2
    return 0
  fi
  echo "error: load average $load after 2 minutes: another job is running; not measuring (--force to measure anyway)" >&2
  exit 3
}

# A plain Bulk Data client: kick-off, poll, then GET every file (4 at a time, like `flatfhir
# export`'s default concurrency, asking for gzip as it does) and save the bytes as received.
cat > "$work/download.py" <<'PY'
import json, os, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
base, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
def get(url, **h):
    return urllib.request.urlopen(urllib.request.Request(url, headers=h))
r = get(base + "/$export", Accept="application/fhir+json", Prefer="respond-async")
status = r.headers["Content-Location"]
while True:
    r = get(status, Accept="application/json")
    if r.status == 200:
        manifest = json.load(r)
        break
    time.sleep(0.05)
def fetch(item):
    i, o = item
    with get(o["url"], **{"Accept-Encoding": "gzip"}) as r, open(os.path.join(out, f"{i}.ndjson.gz"), "wb") as w:
        while True:
            b = r.read(1 << 20)
            if not b:
                break
            w.write(b)
with ThreadPoolExecutor(4) as pool:
    list(pool.map(fetch, enumerate(manifest["output"])))
PY

start_server() { # DIR -> base URL in $base
  local port
  port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$bin" serve --data "$1" --addr "127.0.0.1:$port" --delay 0s ${file_rate:+--file-rate "$file_rate"} -q >/dev/null 2>"$work/serve.err" &
  server_pid=$!
  base="http://127.0.0.1:$port/fhir"
  for _ in $(seq 100); do
    if "$py" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1])" "$base/metadata" 2>/dev/null; then
      return
    fi
    sleep 0.1
  done
  cat "$work/serve.err" >&2
  exit 1
}
stop_server() { kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; server_pid=""; }

rows=()
for n in "${sizes[@]}"; do
  input="$src"
  if [ "$n" -gt 1 ]; then
    input="$work/input-x$n"
    python3 "$here/benches/replicate.py" "$src" "$input" "$n"
    sync # else the first tool timed competes with the writeback of the input just written
  fi
  bytes=$(cat "$input"/*.ndjson | wc -c)
  lines=$(cat "$input"/*.ndjson | wc -l)
  echo "x$n: $((bytes / 1000000)) MB, $lines resources" >&2
  rm -f "$work"/*.best
  tools=(flatfhir)
  for p in duckdb duckdb2 polars; do has_peer "$p" && tools+=("$p"); done
  [ "$export_too" = 1 ] && tools+=(download export)
  quiet_machine
  for _ in $(seq "$repeat"); do
    measure flatfhir "$bin" convert "$input" --out "$work/ff" -q >/dev/null
    rm -rf "$work/ff"
    if has_peer duckdb; then
      measure duckdb "$py" "$work/duck.py" "$input" "$work/duck" >/dev/null
      rm -rf "$work/duck"
    fi
    if has_peer duckdb2; then
      measure duckdb2 "$py2" "$work/duck.py" "$input" "$work/duck" >/dev/null
      rm -rf "$work/duck"
    fi
    if has_peer polars; then
      measure polars "$py" "$work/pl_convert.py" "$input" "$work/pl" >/dev/null
      rm -rf "$work/pl"
    fi
    if [ "$export_too" = 1 ]; then
      start_server "$input"
      measure download "$py" "$work/download.py" "$base" "$work/dl" >/dev/null
      rm -rf "$work/dl"
      measure export "$bin" export --base-url "$base" --system --out "$work/ex" -q >/dev/null
      rm -rf "$work/ex"
      stop_server
    fi
  done
  for t in "${tools[@]}"; do
    rows+=("x$n $bytes $lines $t $(cat "$work/$t.best")")
  done
  [ "$input" = "$src" ] || rm -rf "$input"
done

echo
echo "input: $src"
has_peer duckdb && echo "duckdb: $(version "$py" duckdb)"
has_peer duckdb2 && echo "duckdb2: $(version "$py2" duckdb)"
has_peer polars && echo "polars: $(version "$py" polars)"
printf '%-6s %-9s %9s %9s %12s %10s %12s %9s\n' \
  size tool seconds MB/s resources/s ratio 'peak RSS MB' 'vs x10'
printf '%s\n' "${rows[@]}" | awk '
  { size[NR]=$1; b[NR]=$2; l[NR]=$3; tool[NR]=$4; s[NR]=$5; rss[NR]=$6; t[$1" "$4]=$5 }
  END {
    for (i = 1; i <= NR; i++) {
      # ratio: convert vs DuckDB (>1 = flatfhir faster); export vs plain download (<=1.2 target)
      ratio = "-"
      if (tool[i] == "flatfhir" && (size[i]" duckdb") in t) ratio = sprintf("%.2fx", t[size[i]" duckdb"] / s[i])
      if ((tool[i] == "duckdb2" || tool[i] == "polars") && (size[i]" flatfhir") in t) ratio = sprintf("%.2fx ff", s[i] / t[size[i]" flatfhir"])
      if (tool[i] == "export" && (size[i]" download") in t) ratio = sprintf("%.2fx dl", s[i] / t[size[i]" download"])
      lin = "-"
      if (("x10 "tool[i]) in t && size[i] != "x10") lin = sprintf("%.2fx", s[i] / t["x10 "tool[i]])
      printf "%-6s %-9s %9.2f %9.1f %12.0f %10s %12.0f %9s\n", size[i], tool[i], s[i], b[i]/1e6/s[i], l[i]/s[i], ratio, rss[i]/1024, lin
    }
  }'
echo "ratio: flatfhir rows = DuckDB 1.5 time / flatfhir time; duckdb2 and polars rows = their time / flatfhir time;"
echo "       export rows = export time / download time."
echo "vs x10: this size's time / the same tool's time at x10 (linear = copies/10)."
