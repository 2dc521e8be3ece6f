#!/usr/bin/env bash
# Wall time of the README's quickstart command on a fresh clone, on an idle machine and beside
# one CPU-bound process (a pure-Python busy loop holding one core), as a new user would meet it.
# Usage: benchmarks/quickstart_time.sh [REPO]   (REPO defaults to this checkout; run it on a
# quiet machine: nothing else may run, or the "idle" figure is not idle).
# Writes benchmarks/results/quickstart_time.md.
set -euo pipefail
REPO=$(cd "${1:-$(dirname "$0")/..}" && pwd)
OUT="$REPO/benchmarks/results/quickstart_time.md"
QUICKSTART='./scripts/install.sh && /usr/bin/time -f "RUN %e" .venv/bin/ticketsmith run --model resnet20 --width 0.5 --rounds 2 --epochs 2 --channels-last --out runs/quickstart && .venv/bin/ticketsmith summary runs/quickstart'

measure() {  # $1: label; prints "TOTAL s RUN s"
  local dir; dir=$(mktemp -d)
  git clone -q "$REPO" "$dir/clone"
  (cd "$dir/clone" && /usr/bin/time -f "TOTAL %e" bash -c "$QUICKSTART") > "$dir/log" 2>&1
  echo "$(grep -a '^TOTAL' "$dir/log" | cut -d' ' -f2) $(grep -a '^RUN' "$dir/log" | cut -d' ' -f2)"
  rm -rf "$dir"
}

idle=$(measure idle)
python3 -c "while True: pass" & busy=$!
trap 'kill $busy 2>/dev/null || true' EXIT
loaded=$(measure loaded)
kill $busy

read -r it ir <<<"$idle"; read -r lt lr <<<"$loaded"
{
  echo "# Quickstart wall time"
  echo
  echo "Command: \`benchmarks/quickstart_time.sh\` on $(date -u +%Y-%m-%d), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores."
  echo "Each row: a fresh \`git clone\`, then the README's quickstart line (install, run, summary)."
  echo "The install reuses pip's cache of this machine; a first install that downloads torch adds its download time."
  echo
  echo "| machine state | whole line (s) | of which \`ticketsmith run\` (s) |"
  echo "|---|---|---|"
  echo "| idle | $it | $ir |"
  echo "| beside one CPU-bound process | $lt | $lr |"
} > "$OUT"
cat "$OUT"
