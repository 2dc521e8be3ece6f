#!/usr/bin/env bash
# Ready this checkout for a lent GPU machine (the device tool), and undo it afterwards.
#
#   scripts/device.sh prepare   .device/ (git-ignored): the wheels the device image lacks, at the
#                               versions installed in .venv, and the Fashion-MNIST files
#   scripts/device.sh lean      keep results/protocol/runs/ (the committed records, masks and
#                               weights: over 160 MB) from travelling: the tool sends tracked and
#                               untracked-not-ignored files, 64 MiB at most
#   scripts/device.sh restore   undo `lean` (before anything is committed again)
#   scripts/device.sh size      MiB that would travel with carry [".device"]
#
# A window then is (see results/README.md, "A GPU window"):
#   scripts/device.sh prepare && scripts/device.sh lean && scripts/device.sh size
#   device tool: run(command="scripts/device_gpu.sh protocol 540", carry=[".device"], timeout_s=600)
#   scripts/device.sh restore
#   .venv/bin/python scripts/device_pack.py unpack <files_at> results/protocol/runs
set -euo pipefail
cd "$(dirname "$0")/.."
EXCLUDE=.git/info/exclude
RUNS=results/protocol/runs
# missing from the device image (its package list: /work/.library/device/KINDS.md)
WHEELS="torch-pruning pymetis pydantic pydantic-core annotated-types typing-inspection typing-extensions"

exclude() { mkdir -p "$(dirname $EXCLUDE)"; grep -qxF "$1" $EXCLUDE 2>/dev/null || echo "$1" >> $EXCLUDE; }

case ${1:-} in
  prepare)
    exclude /.device/
    mkdir -p .device/whl .device/data/fashion-mnist
    cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .device/data/fashion-mnist/
    pins=$(.venv/bin/python - $WHEELS <<'EOF'
import sys
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))
EOF
)
    rm -f .device/whl/*.whl
    # the device runs CPython 3.12 on x86-64 (KINDS.md)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .device/whl $pins
    ls .device/whl ;;
  lean)
    git diff --cached --quiet || { echo "device.sh: staged changes; commit or unstage them first" >&2; exit 1; }
    git rm -r -q --cached $RUNS
    exclude /$RUNS/
    echo "device.sh: $RUNS is untracked until 'scripts/device.sh restore': commit nothing before it" ;;
  restore)
    git reset -q -- $RUNS
    [ -f $EXCLUDE ] && sed -i "\#^/$RUNS/\$#d" $EXCLUDE
    git status --short -- $RUNS | head ;;
  size)
    { git ls-files -z; git ls-files -z -o --exclude-standard; find .device -type f -print0 2>/dev/null; } \
      | xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {printf "%.1f MiB would travel (limit 64)\n", s/2^20}' ;;
  *) sed -n 2,17p "$0"; exit 2 ;;
esac
