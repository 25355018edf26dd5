#!/usr/bin/env bash
# Many small runs into one dataset: does reading the current state stay flat as runs accumulate?
# Converts the same small input RUNS times (default 100) into one dataset and, every 10 runs,
# prints the wall time of `select count(*) from observation_latest` (the current state: one Delta
# table, whatever the number of runs), of the same count over the history table for one run
# (partition pruning), and of opening the dataset (`select 1`: every table's log replayed), each
# the best of 3. Before Delta, `_latest` was a window over every run at every query.
#   usage: [FLATFHIR_BIN=path] benches/runs.sh [INPUT (default tests/data/sample)] [RUNS (default 100)]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
input="${1:-$here/tests/data/sample}"
runs="${2:-100}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flatfhir/target}"
# FLATFHIR_BIN=… measures a binary already built (e.g. the dev profile's).
if [ -z "${FLATFHIR_BIN:-}" ]; then (cd "$here" && cargo build --release --quiet); fi
bin="${FLATFHIR_BIN:-$CARGO_TARGET_DIR/release/flatfhir}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
best() { # best wall time of 3 runs of "$@", in ms
  local b=""
  for _ in 1 2 3; do
    local t0 t1
    t0=$(date +%s%N); "$@" >/dev/null; t1=$(date +%s%N)
    local ms=$(( (t1 - t0) / 1000000 ))
    if [ -z "$b" ] || [ "$ms" -lt "$b" ]; then b=$ms; fi
  done
  echo "$b"
}
printf '%5s %10s %14s %14s %10s %12s\n' runs convert_ms latest_count_ms one_run_ms open_ms log_files
for i in $(seq 1 "$runs"); do
  t0=$(date +%s%N)
  "$bin" convert "$input" --out "$out/ds" -q >/dev/null
  t1=$(date +%s%N)
  if [ $((i % 10)) -eq 0 ]; then
    last=$(ls "$out/ds/_runs" | sort | tail -1); last="${last%.json}"
    q() { "$bin" query --data "$out/ds" --format csv "$1"; }
    printf '%5d %10d %14d %14d %10d %12d\n' "$i" $(( (t1 - t0) / 1000000 )) \
      "$(best q 'select count(*) from observation_latest')" \
      "$(best q "select count(*) from observation where export = '$last'")" \
      "$(best q 'select 1')" \
      "$(ls "$out/ds/observation/_delta_log" | wc -l)"
  fi
done
