#!/usr/bin/env bash
# Run experiment phases one after another (one worker; start two side by side on 2 cores).
# Usage: results/lane.sh PHASE:LANE [PHASE:LANE ...]    (logs in runs/log-PHASE-LANE.txt)
cd "$(dirname "$0")/.."
for item in "$@"; do
  phase=${item%%:*}; lane=${item##*:}
  results/run_experiments.sh "$phase" "$lane" > "runs/log-$phase-$lane.txt" 2>&1
  rc=$?  # before the command substitution below, which would reset $?
  echo "$(date -u +%FT%TZ) $lane $phase exit $rc" >> runs/lanes.txt
done
