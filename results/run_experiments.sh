#!/usr/bin/env bash
# The recorded experiments (issues 5 and 6), on Fashion-MNIST, 2-core CPU.
# Budget: 6 epochs per training for VGG, 4 for ResNet (LR x0.1 at 50% and 75%), batch 128, channels_last,
# rewind to 5% of training, 5 IMP rounds pruning 36% of the remaining weights each (two of
# the paper's 20% steps per round: sparsity 36, 59, 74, 83, 89%), seed 0.
# Usage: results/run_experiments.sh PHASE LANE   (two lanes run side by side, 1 thread each)
set -uo pipefail  # no -e: a run that fails is logged, the lane goes on
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
TS=".venv/bin/ticketsmith"
declare -A EPOCHS=([resnet]=4 [vgg]=6 [mlp]=10) GAIMP_ROUNDS=([resnet]=3 [vgg]=2)
declare -A BATCH_TICKETS=([resnet]="resnet-refill/round_02 resnet-refill+/round_03 resnet-gaimp/round_03"
           [mlp]="mlp-srigl-0.9/round_00 mlp-srigl-0.99/round_00")
declare -A DST_EPOCHS=([resnet]=3 [vgg]=3 [mlp]=10) DST_SPARSITIES=([resnet]="0.8 0.9 0.95"
           [vgg]="0.8 0.9 0.95" [mlp]="0.8 0.9 0.95 0.98 0.99")
IMP="--method imp --rounds 5 --prune-fraction 0.36"
declare -A MODEL=([resnet]="--model resnet20 --width 0.5" [vgg]="--model vgg16 --width 0.25"
                 [mlp]="--model mlp-300-100")  # mlp: DST only (condensed linear layers)
lane=$2; m=${MODEL[$lane]}
COMMON="--dataset fashion-mnist --epochs ${EPOCHS[$lane]} --channels-last --rewind 5% --no-progress"
case $1 in
  chain)   # unstructured IMP (the chain every IMP-structure run post-processes)
    $TS run $m $COMMON $IMP --out runs/$lane-imp ;;
  refill)  # IMP-Refill and IMP-Refill+ on that chain
    $TS run $m $COMMON $IMP --structure refill  --chain runs/$lane-imp --out runs/$lane-refill
    $TS run $m $COMMON $IMP --structure refill+ --chain runs/$lane-imp --out runs/$lane-refill+ ;;
  regroup) # IMP-Regroup (element blocks, as in the paper)
    $TS run $m $COMMON $IMP --structure regroup --chain runs/$lane-imp --out runs/$lane-regroup ;;
  gaimp)   # group-aware IMP: regroup inside every round; 3 rounds for ResNet (to 74%), 2 for VGG
    $TS run $m $COMMON $IMP --rounds ${GAIMP_ROUNDS[$lane]} --structure regroup --structure-every-round --out runs/$lane-gaimp ;;
  random)  # random-ticket control (Tables A3/A4): the refilled masks, fresh random init, 3 rounds
    $TS run $m $COMMON $IMP --rounds 3 --structure refill --chain runs/$lane-imp --reinit random --out runs/$lane-refill-random ;;
  dst)     # dense vs RigL vs SRigL with/without ablation at 80/90/95% (3 epochs each for ResNet)
    COMMON="${COMMON/--epochs ${EPOCHS[$lane]}/--epochs ${DST_EPOCHS[$lane]}}"
    $TS run $m $COMMON --method dense --out runs/$lane-dense
    for s in ${DST_SPARSITIES[$lane]}; do
      $TS run $m $COMMON --method rigl  --sparsity $s --out runs/$lane-rigl-$s
      $TS run $m $COMMON --method srigl --sparsity $s --out runs/$lane-srigl-$s
      $TS run $m $COMMON --method srigl --sparsity $s --no-dst-ablation --out runs/$lane-srigl-noabl-$s
    done ;;
  sweep)   # Regroup's hyper-parameters on IMP round 3 (74%): element blocks (the paper's) and
           # channel blocks (the fast executor's), 1 retraining epoch each, speed at batch 64
    $TS sweep runs/$lane-imp --round 3 --vary t1=2,8 --vary b1=4,32 --epochs 1 \
      --batch-size 64 --pairs 10 --out results/sweep-$lane-element --no-progress
    $TS sweep runs/$lane-imp --round 3 --vary t1=2,8 --granularity channel --epochs 1 \
      --batch-size 64 --pairs 10 --out results/sweep-$lane-channel --no-progress ;;
  bench)   # every ticket at batch 1 and 64, against the fastest dense path (run alone!); the conv
           # nets' DST tickets are skipped: constant fan-in convs compact to dense layers (~1x)
    export OMP_NUM_THREADS=2
    for d in runs/$lane-*; do
      case $lane:$d in mlp:*-dense|resnet:*rigl*|resnet:*-dense|vgg:*rigl*|vgg:*-dense) continue ;; esac
      [ -f $d/summary.json ] && $TS bench $d --batch-sizes 1,64 --pairs 10
    done ;;
  batches) # speed across batch sizes (the reviewer's question) for the extreme tickets
    export OMP_NUM_THREADS=2
    for t in ${BATCH_TICKETS[$lane]}; do
      $TS bench ${MODEL[$lane]} --masks runs/$t/masks.safetensors --input-shape 1,28,28 \
        --batch-sizes 1,4,16,64,256 --pairs 10 --no-layerwise --out results/batches/$lane-${t//\//-}
    done ;;
  report)  # plots + report.md/html per lane (IMP family) and for the DST runs; small files kept
    imp=$(for r in imp refill refill+ regroup gaimp refill-random; do  # else the kept records
      if [ -d runs/$lane-$r ]; then echo runs/$lane-$r; elif [ -d results/runs/$lane-$r ]; then echo results/runs/$lane-$r; fi
    done)
    [ -n "$imp" ] && $TS report $imp --out results/report-$lane --title "$lane: IMP, Refill, Refill+, Regroup, group-aware IMP, random control"
    base=runs; [ -d runs/$lane-dense ] || base=results/runs  # else the kept records
    dst=$(ls -d $base/$lane-dense $base/$lane-rigl-* $base/$lane-srigl-* 2>/dev/null)
    [ -n "$dst" ] && $TS report $dst --out results/report-$lane-dst --title "$lane: dense vs RigL vs SRigL"
    [ -d runs ] && for d in runs/$lane-*; do  # configs, summaries, per-round records and bench tables; no weights
      (cd runs && find "$(basename $d)" \( -name config.json -o -name summary.json -o -name round.json \
        -o -name bench.json -o -name bench.md \) -exec cp --parents {} ../results/runs/ \;)
    done ;;
  *) echo "unknown phase $1"; exit 2 ;;
esac
