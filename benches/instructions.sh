#!/usr/bin/env bash
# Instructions per input byte of `flatfhir convert --threads 1` under callgrind: a figure that,
# unlike seconds, repeats exactly for the same binary and input whatever else the machine does.
# Prints the total, the bytes and the instructions per byte, and leaves the profile for
# `callgrind_annotate` (path printed). Issue 21's target is half of today's figure.
# Mind how callgrind counts copies: under it glibc copies 16 KiB to ~2 MiB with `rep movsb`,
# which callgrind counts at one instruction per byte, ten times its count for a smaller or
# bigger copy, though the CPU is about as fast at all three; so `memcpy` (and `realloc`, which copies)
# weigh more in the total than in seconds, and a change that only moves copies across those
# sizes moves the figure without saving time (see `props_for` in src/sink/writer.rs).
#   usage: [FLATFHIR_BIN=path] benches/instructions.sh [NDJSON_DIR (default ../shared/data/synthea-100)] [-- CONVERT_ARGS ...]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
input="${1:-$here/../shared/data/synthea-100}"
shift || true
[ "${1:-}" = "--" ] && shift
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flatfhir/target}"
if [ -z "${FLATFHIR_BIN:-}" ]; then (cd "$here" && cargo build --release --quiet); fi
bin="${FLATFHIR_BIN:-$CARGO_TARGET_DIR/release/flatfhir}"
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 2; }
work="$(mktemp -d)"
trap 'rm -rf "$work/out"' EXIT
bytes=$(cat "$input"/*.ndjson 2>/dev/null | wc -c)
[ "$bytes" -gt 0 ] || { echo "no .ndjson files in $input" >&2; exit 2; }
profile="$work/callgrind.out"
valgrind --tool=callgrind --callgrind-out-file="$profile" \
  "$bin" convert "$input" --out "$work/out" --threads 1 -q "$@" >/dev/null 2>"$work/valgrind.err" \
  || { cat "$work/valgrind.err" >&2; exit 1; }
total=$(awk '/^summary:/ {print $2}' "$profile")
awk -v t="$total" -v b="$bytes" 'BEGIN {
  printf "instructions %.3f G, input %.1f MB, %.1f instructions per byte\n", t / 1e9, b / 1e6, t / b }'
echo "profile: $profile (callgrind_annotate --inclusive=yes $profile | head -40)"
