#!/usr/bin/env bash
# The current-state merge against the size of the dataset: time and peak RSS of `flatfhir
# convert` (1) loading COPIES × NDJSON_DIR into a new dataset, (2) a nightly-sized run of
# SMALL Observations (the first lines of the input: known ids, so they replace current
# versions) into it, and (3) the whole input again (every key touched). What (2) holds must not
# grow with the dataset; (3) grows with the run's keys (the largest type's merge runs alone).
#
#   usage: [FLATFHIR_BIN=path] benches/merge.sh [NDJSON_DIR] [COPIES (default 10)] [SMALL (default 1000)]
#
#   NDJSON_DIR defaults to ../shared/data/synthea-100; COPIES are built by benches/replicate.py
#   (ids rewritten per copy). FLATFHIR_BIN overrides the binary (default: a fresh `cargo build
#   --release`). Peak RSS from /usr/bin/time.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
case "${1:-}" in -h|--help) sed -n '2,12p' "$0"; exit 0 ;; esac
src="${1:-$here/../shared/data/synthea-100}"
copies="${2:-10}"
small="${3:-1000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flatfhir/target}"
if [ -z "${FLATFHIR_BIN:-}" ]; then (cd "$here" && cargo build --release --quiet); fi
bin="${FLATFHIR_BIN:-$CARGO_TARGET_DIR/release/flatfhir}"
[ -x /usr/bin/time ] || { echo "/usr/bin/time is not installed (apt-get install time)" >&2; exit 2; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
input="$src"
if [ "$copies" != 1 ]; then
  input="$work/input"
  python3 "$here/benches/replicate.py" "$src" "$input" "$copies"
fi
first=$(ls "$input"/Observation*.ndjson | head -1)
mkdir -p "$work/small"
head -n "$small" "$first" > "$work/small/Observation.ndjson"
measure() {
  local what="$1"; shift
  /usr/bin/time -f "%e %M" -o "$work/time" "$bin" convert "$@" --out "$work/ds" -q >/dev/null
  read -r secs kb < "$work/time"
  printf '%-34s %9.2f %12.0f\n' "$what" "$secs" "$((kb / 1024))"
}
printf '%-34s %9s %12s\n' step seconds 'peak RSS MB'
measure "load x$copies (new dataset)" "$input"
measure "$small Observations into it" "$work/small"
measure "$small Observations again" "$work/small"
measure "x$copies again (every key touched)" "$input"
