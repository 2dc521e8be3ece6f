#!/usr/bin/env bash
# The pre-registered protocol (results/PROTOCOL.md): every command of every arm.
# Usage: results/protocol.sh ARM [ARM ...]   one lane; start at most two lanes side by side.
# Arms: pilot-vgg pilot-resnet mlp-SEED vgg-imp-SEED vgg-refill-SEED vgg-regroup-SEED
#       vgg-controls-SEED vgg-gaimp-SEED resnet-SEED gpu report
# Each run resumes where it stopped (rerun the same arm). Logs: results/protocol/logs/.
set -uo pipefail  # no -e: a failed run is logged, the lane goes on
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OMP_WAIT_POLICY=PASSIVE
TS=${TS:-.venv/bin/ticketsmith}        # scripts/device_gpu.sh: "python3 -m ticketsmith"
R=${PROTOCOL_RUNS:-results/protocol/runs}  # scripts/device_gpu.sh: outside the copied tree
L=${PROTOCOL_LOGS:-results/protocol/logs}
mkdir -p "$R" "$L"
COMMON="--dataset fashion-mnist --channels-last --rewind 5% --no-progress"
IMP="--method imp --prune-fraction 0.36"
VGG="--model vgg16 --width 0.25"
RESNET="--model resnet20 --width 0.5"
# the budget chosen by the pilot (PROTOCOL.md, "Budget pilot"); empty until it is decided
VGG_EPOCHS=${VGG_EPOCHS:-30}  # results/protocol/pilot.md (results/pilot.py)
RESNET_EPOCHS=${RESNET_EPOCHS:-30}  # results/protocol/pilot.md (results/pilot.py)

need() { [ -n "$2" ] || { echo "$1: the pilot has not chosen the budget yet (set it in $0)"; exit 2; }; }
run() { echo "$(date -u +%FT%TZ) start $*"; $TS run "$@"; local rc=$?; echo "$(date -u +%FT%TZ) exit $rc $*"; return $rc; }
# A structured arm on a chain that is still training: each round can start once the chain has
# decided that round's mask, so rerun it (it resumes) until it finishes; give up once the chain
# process $1 has ended and one more try failed.
follow() {
  local chain_pid=$1 alive; shift
  while :; do
    alive=0; kill -0 "$chain_pid" 2>/dev/null && alive=1
    run "$@" && return 0
    [ $alive = 1 ] || return 1
    sleep 20
  done
}

arm() {
  local a=$1 seed=${1##*-}
  case $a in
    pilot-vgg)     # dense round only; the chosen one is extended to vgg-imp-0
      for e in 15 30; do run $VGG $COMMON $IMP --rounds 0 --epochs $e --seed 0 --out $R/vgg-e$e-imp-s0; done ;;
    pilot-resnet)
      for e in 15 30; do run $RESNET $COMMON $IMP --rounds 0 --epochs $e --seed 0 --out $R/resnet-e$e-imp-s0; done ;;
    mlp-*)         # dense vs RigL vs SRigL (with / without ablation), 30 epochs
      local M="--model mlp-300-100 $COMMON --epochs 30 --seed $seed"
      run $M --method dense --out $R/mlp-dense-s$seed
      for s in 0.9 0.95 0.98 0.99; do
        run $M --method rigl --sparsity $s --out $R/mlp-rigl-$s-s$seed
        run $M --method srigl --sparsity $s --out $R/mlp-srigl-$s-s$seed
        run $M --method srigl --sparsity $s --no-dst-ablation --out $R/mlp-srigl-noabl-$s-s$seed
      done ;;
    vgg-imp-*)
      need VGG_EPOCHS "$VGG_EPOCHS"
      run $VGG $COMMON $IMP --rounds 5 --epochs $VGG_EPOCHS --seed $seed --out $R/vgg-e$VGG_EPOCHS-imp-s$seed ;;
    vgg-refill-*|vgg-regroup-*|vgg-controls-*|vgg-gaimp-*)
      need VGG_EPOCHS "$VGG_EPOCHS"
      local V="$VGG $COMMON $IMP --epochs $VGG_EPOCHS --seed $seed" P="$R/vgg-e$VGG_EPOCHS"
      local chain="--chain $P-imp-s$seed"
      case $a in
        vgg-refill-*)   run $V --rounds 2 --structure refill --refill-coupling none $chain --out $P-refill-s$seed ;;
        vgg-regroup-*)  run $V --rounds 5 --structure regroup $chain --out $P-regroup-s$seed ;;
        vgg-controls-*)
          run $V --rounds 2 --structure refill --refill-coupling none $chain --reinit random --out $P-refill-reinit-s$seed
          run $V --rounds 5 --structure regroup $chain --reinit random --out $P-regroup-reinit-s$seed
          run $V --rounds 5 --structure regroup $chain --null-mask --out $P-regroup-null-s$seed ;;
        vgg-gaimp-*)    run $V --rounds 5 --structure regroup --structure-every-round --out $P-gaimp-s$seed ;;
      esac ;;
    resnet-*)
      need RESNET_EPOCHS "$RESNET_EPOCHS"
      local N="$RESNET $COMMON $IMP --epochs $RESNET_EPOCHS --seed $seed" P="$R/resnet-e$RESNET_EPOCHS"
      run $N --rounds 3 --out $P-imp-s$seed
      for c in none shared union; do
        run $N --rounds 3 --structure refill --refill-coupling $c --chain $P-imp-s$seed --out $P-refill-$c-s$seed
      done ;;
    gpu)           # full width, one seed, on a lent GPU: reported apart (scripts/device_gpu.sh)
      need VGG_EPOCHS "$VGG_EPOCHS"        # GPU_WIDTH / GPU_DEVICE: only for a dry run on a CPU
      local G="--model vgg16 --width ${GPU_WIDTH:-1.0} $COMMON $IMP --epochs $VGG_EPOCHS --seed 0 --device ${GPU_DEVICE:-cuda}"
      local C=$R/gpu-vgg-x1-imp-s0
      # Refill and Regroup follow the IMP chain side by side on the one GPU (three small
      # processes share it better than one), so the window is about the chain's length
      run $G --rounds 5 --out $C &
      local chain=$!
      follow $chain $G --rounds 2 --structure refill --refill-coupling none --chain $C --out $R/gpu-vgg-x1-refill-s0 &
      follow $chain $G --rounds 5 --structure regroup --chain $C --out $R/gpu-vgg-x1-regroup-s0 &
      wait ;;
    report)        # the verdicts so far, per network (finished rounds only; n and missing seeds shown)
      .venv/bin/python results/pilot.py > /dev/null
      for net in mlp vgg resnet; do
        dirs=$(ls -d $R/$net-* 2>/dev/null | grep -v -- "-e15-" )  # the pilot's rejected budgets apart
        [ "$net" = vgg ] && dirs=$(ls -d $R/vgg-e$VGG_EPOCHS-* 2>/dev/null)
        [ "$net" = resnet ] && { [ -n "$RESNET_EPOCHS" ] && dirs=$(ls -d $R/resnet-e$RESNET_EPOCHS-* 2>/dev/null) || dirs=""; }
        [ -n "$dirs" ] && $TS report $dirs --out results/protocol/report-$net --title "protocol: $net"
      done
      ls -d $R/gpu-* > /dev/null 2>&1 && $TS report $R/gpu-* --out results/protocol/report-gpu --title "protocol: VGG-16 x1.0 on a GPU (one seed, reported apart)"
      .venv/bin/python results/progress.py  # rounds finished and training left, per arm
      .venv/bin/python results/claims.py ;;  # the claims, read by the registered conditions
    *) echo "unknown arm $a"; exit 2 ;;
  esac
}

for a in "$@"; do arm "$a" >> "$L/$a.txt" 2>&1; done
