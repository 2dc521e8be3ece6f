#!/usr/bin/env bash
# The pre-registered protocol (results/PROTOCOL.md): every command of every arm.
# Usage: results/protocol.sh ARM [ARM ...]   one lane; start at most two lanes side by side.
# Arms: pilot-vgg pilot-resnet mlp-SEED vgg-imp-SEED vgg-refill-SEED vgg-regroup-SEED
#       vgg-controls-SEED vgg-gaimp-SEED resnet-SEED gpu report
# Each run resumes where it stopped (rerun the same arm). Logs: results/protocol/logs/.
set -uo pipefail  # no -e: a failed run is logged, the lane goes on
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OMP_WAIT_POLICY=PASSIVE
TS=".venv/bin/ticketsmith"
R=results/protocol/runs
mkdir -p "$R" results/protocol/logs
COMMON="--dataset fashion-mnist --channels-last --rewind 5% --no-progress"
IMP="--method imp --prune-fraction 0.36"
VGG="--model vgg16 --width 0.25"
RESNET="--model resnet20 --width 0.5"
# the budget chosen by the pilot (PROTOCOL.md, "Budget pilot"); empty until it is decided
VGG_EPOCHS=${VGG_EPOCHS:-30}  # results/protocol/pilot.md (results/pilot.py)
RESNET_EPOCHS=${RESNET_EPOCHS:-30}  # results/protocol/pilot.md (results/pilot.py)

need() { [ -n "$2" ] || { echo "$1: the pilot has not chosen the budget yet (set it in $0)"; exit 2; }; }
run() { echo "$(date -u +%FT%TZ) start $*"; $TS run "$@"; local rc=$?; echo "$(date -u +%FT%TZ) exit $rc $*"; }

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
    gpu)           # full width, one seed, on a lent GPU (about 15 minutes): reported apart
      need VGG_EPOCHS "$VGG_EPOCHS"
      local G="--model vgg16 --width 1.0 $COMMON $IMP --epochs $VGG_EPOCHS --seed 0 --device cuda"
      run $G --rounds 5 --out $R/gpu-vgg-x1-imp-s0
      run $G --rounds 2 --structure refill --refill-coupling none --chain $R/gpu-vgg-x1-imp-s0 --out $R/gpu-vgg-x1-refill-s0
      run $G --rounds 5 --structure regroup --chain $R/gpu-vgg-x1-imp-s0 --out $R/gpu-vgg-x1-regroup-s0 ;;
    report)        # the verdicts so far, per network (finished rounds only; n and missing seeds shown)
      .venv/bin/python results/pilot.py > /dev/null
      for net in mlp vgg resnet; do
        dirs=$(ls -d $R/$net-* 2>/dev/null | grep -v -- "-e15-" )  # the pilot's rejected budgets apart
        [ "$net" = vgg ] && dirs=$(ls -d $R/vgg-e$VGG_EPOCHS-* 2>/dev/null)
        [ "$net" = resnet ] && { [ -n "$RESNET_EPOCHS" ] && dirs=$(ls -d $R/resnet-e$RESNET_EPOCHS-* 2>/dev/null) || dirs=""; }
        [ -n "$dirs" ] && $TS report $dirs --out results/protocol/report-$net --title "protocol: $net"
      done
      .venv/bin/python results/claims.py ;;  # the claims, read by the registered conditions
    *) echo "unknown arm $a"; exit 2 ;;
  esac
}

for a in "$@"; do arm "$a" >> "results/protocol/logs/$a.txt" 2>&1; done
