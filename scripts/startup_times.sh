#!/bin/bash
# Start-up times of the light commands: median wall time of 5 runs each.
# Usage, from a checkout's root: scripts/startup_times.sh BASE_FOLDER ADAPTER_FOLDER
# (PYTHON defaults to .venv/bin/python; the checkout is put on PYTHONPATH.)
set -u
BASE=$1 ADAPTER=$2
P=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD
median() {
  local label=$1 times=() start end
  shift
  for _ in 1 2 3 4 5; do
    start=$(date +%s.%N); "$@" >/dev/null 2>&1; end=$(date +%s.%N)
    times+=("$(echo "$end - $start" | bc)")
  done
  printf "%-20s %s s\n" "$label" "$(printf '%s\n' "${times[@]}" | sort -n | sed -n 3p)"
}
median "--help" "$P" -m shardmerge --help
median "inspect model" "$P" -m shardmerge inspect "$BASE"
median "inspect adapter" "$P" -m shardmerge inspect "$ADAPTER"
median "plan" "$P" -m shardmerge plan "$BASE" "$ADAPTER"
median "refusal (no base)" "$P" -m shardmerge merge "$BASE.missing" "$ADAPTER" -o /tmp/startup_times_out
