#!/usr/bin/env bash
# The raw `resource` column's codec and page size against CPU and file size: runs `flatfhir
# convert --threads 1` under callgrind once per option, the option set through the
# measurement-only variables of src/sink/writer.rs (FLATFHIR_BENCH_JSON_COMPRESSION,
# FLATFHIR_BENCH_JSON_PAGE_BYTES; every other column is written as by default), and prints
# one table: instructions in all and per input byte, those spent in codecs (parquet's
# `Codec::compress` of every column and the JSON column's own zstd, inclusive), and the total bytes of the Parquet files
# written by the run (the history tables' files), each beside the first option's. Sizes
# repeat exactly; instruction counts within ~0.2% for the same binary and input, whatever
# else the machine does.
#
#   usage: [FLATFHIR_BIN=path] benches/raw_column.sh [NDJSON_DIR] [OPTION ...]
#
#   NDJSON_DIR defaults to ../shared/data/synthea-100. An OPTION is CODEC or CODEC@PAGE_BYTES,
#   CODEC in parquet's spelling (`zstd(1)`, `lz4_raw`, `snappy`, `uncompressed`) or `default`
#   (what the binary writes without the variables); default options: default zstd(2) zstd(3)
#   lz4_raw snappy uncompressed zstd(1)@262144 zstd(1)@2097152 zstd(1)@4194304. Each run
#   takes ~1-2 minutes. The figures and the choice they led to: `props_for` in
#   src/sink/writer.rs (mind its note on how callgrind counts copies).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
case "${1:-}" in -h|--help) sed -n '2,19p' "$0"; exit 0 ;; esac
input="$here/../shared/data/synthea-100"
if [ $# -gt 0 ] && [ -d "$1" ]; then input="$1"; shift; fi
options=("$@")
[ ${#options[@]} -gt 0 ] || options=(default 'zstd(2)' 'zstd(3)' lz4_raw snappy uncompressed \
  'zstd(1)@262144' 'zstd(1)@2097152' 'zstd(1)@4194304')
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flatfhir/target}"
if [ -z "${FLATFHIR_BIN:-}" ]; then (cd "$here" && cargo build --release --quiet); fi
bin="${FLATFHIR_BIN:-$CARGO_TARGET_DIR/release/flatfhir}"
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 2; }
bytes=$(cat "$input"/*.ndjson 2>/dev/null | wc -c)
[ "$bytes" -gt 0 ] || { echo "no .ndjson files in $input" >&2; exit 2; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

rows=()
for opt in "${options[@]}"; do
  codec="${opt%@*}"
  pages=""
  [ "$codec" = "$opt" ] || pages="${opt#*@}"
  vars=()
  [ "$codec" = default ] || vars+=("FLATFHIR_BENCH_JSON_COMPRESSION=$codec")
  [ -z "$pages" ] || vars+=("FLATFHIR_BENCH_JSON_PAGE_BYTES=$pages")
  rm -rf "$work/out"
  profile="$work/callgrind.out"
  env "${vars[@]}" valgrind --tool=callgrind --callgrind-out-file="$profile" \
    "$bin" convert "$input" --out "$work/out" --threads 1 -q >/dev/null 2>"$work/valgrind.err" \
    || { cat "$work/valgrind.err" >&2; exit 1; }
  grep -q "ignoring FLATFHIR_BENCH" "$work/valgrind.err" && { cat "$work/valgrind.err" >&2; exit 1; }
  total=$(awk '/^summary:/ {print $2}' "$profile")
  # Inclusive cost of every codec's compress: parquet's (called from its column writers only)
  # and the zstd of the JSON column's own pages (src/sink/json_pages.rs, zstd options only).
  codecs=$(callgrind_annotate --inclusive=yes --threshold=100 "$profile" 2>/dev/null \
    | awk '/as parquet::compression::Codec>::compress \[|json_pages::JsonPages::compress \[/ { gsub(",", "", $1); s += $1 } END { print s + 0 }')
  # The files the writer wrote: not the current-state tables' copies of them, not checkpoints.
  size=$(find "$work/out" -name '*.parquet' -not -path '*_delta_log*' -not -path '*_latest/*' \
    -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
  rows+=("$opt $total $codecs $size")
  echo "  $opt: $total instructions, $codecs in codecs, $size bytes of Parquet" >&2
done

printf '%s\n' "${rows[@]}" | awk -v b="$bytes" '
  NR == 1 { t0 = $2; s0 = $4 }
  { printf "%-20s %9.3f G %7.1f /B %+6.1f%% %9.3f G %9.2f MB %+6.1f%%\n", $1, $2 / 1e9, $2 / b,
      100 * ($2 / t0 - 1), $3 / 1e9, $4 / 1e6, 100 * ($4 / s0 - 1) }
  BEGIN { printf "%-20s %11s %10s %7s %11s %12s %7s\n", "option", "instructions", "per byte",
      "vs 1st", "in codecs", "parquet", "vs 1st" }'
echo "input: $input, $(awk -v b="$bytes" 'BEGIN { printf "%.1f MB", b / 1e6 }')"
