#!/usr/bin/env bash
# Runs ON the lent GPU machine, as the device tool's command, from the repository root
# (prepared here by scripts/device.sh; carry [".device"]):
#
#   scripts/device_gpu.sh protocol [SECONDS]   results/protocol.sh gpu: the protocol's full-width
#                                              arm, then its records packed into $OUT
#   scripts/device_gpu.sh speed [SECONDS]      benchmarks/gpu_speed.py (its results into $OUT)
#
# Both stop themselves after SECONDS (default 540, inside the tool's 600 s a call) and leave
# what finished. The protocol's runs live in /tmp/ts-gpu on the device, so a second call on the
# still-warm machine (it stays 30 s after a call) resumes them; each call packs everything
# finished so far, so the last call's files are the ones to unpack (scripts/device_pack.py).
#
# Dry run on a CPU (no GPU, tiny width, one epoch a round; writes /tmp/ts-dry/out):
#   DRY_RUN=1 scripts/device_gpu.sh protocol 600
set -uo pipefail
cd "$(dirname "$0")/.."
task=${1:-protocol}
limit=${2:-540}
if [ -n "${DRY_RUN:-}" ]; then
  OUT=${OUT:-/tmp/ts-dry/out}
  export VGG_EPOCHS=1 GPU_WIDTH=0.0625 GPU_DEVICE=cpu TS=".venv/bin/ticketsmith"
  RUNS=/tmp/ts-dry/runs PY=.venv/bin/python
else
  : "${OUT:?the device tool sets OUT}"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .device/whl/*.whl || exit 1
  export PYTHONPATH=$PWD/src:/tmp/site TS="python3 -m ticketsmith"
  RUNS=/tmp/ts-gpu/runs PY=python3
  nvidia-smi -L
fi
export TICKETSMITH_DATA=$PWD/.device/data/fashion-mnist PYTHONUNBUFFERED=1
[ -f "$TICKETSMITH_DATA/train-images-idx3-ubyte.gz" ] || export TICKETSMITH_DATA=/usr/share/datasets/fashion-mnist
mkdir -p "$OUT"
$PY -c "import torch, ticketsmith; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

case $task in
  protocol)
    # a process group of its own, so that the time limit stops the chain and its followers
    PROTOCOL_RUNS=$RUNS PROTOCOL_LOGS=$RUNS/../logs timeout -s TERM -k 20 "$limit" results/protocol.sh gpu
    echo "protocol.sh gpu: exit $? (124: stopped at ${limit} s; rerun to resume)"
    $PY scripts/device_pack.py pack "$RUNS" "$OUT" --logs $RUNS/../logs/gpu.txt
    tail -n 30 $RUNS/../logs/gpu.txt ;;
  speed)
    smoke=""; [ -n "${DRY_RUN:-}" ] && smoke="--device cpu --smoke"
    timeout -s TERM -k 20 "$limit" $PY benchmarks/gpu_speed.py $smoke --budget-s $((limit - 120)) \
      --out "$OUT/gpu_speed" 2>&1 | tee "$OUT/gpu_speed.log" ;;
  *) sed -n 2,16p "$0"; exit 2 ;;
esac
