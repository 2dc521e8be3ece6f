#!/usr/bin/env bash
# Install everything ticketsmith and its tests need, into ./.venv (idempotent).
#   - Debian's dataset-fashion-mnist (the default dataset), when apt is available;
#   - torch==2.13.0 first: on machines with a local CPU wheel it takes that one instead of
#     several GB of CUDA packages; then the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo -n"
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
    || echo "install.sh: could not install dataset-fashion-mnist with apt; tests that need it are skipped" >&2
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import ticketsmith, torch; print(f'ticketsmith {ticketsmith.__version__}, torch {torch.__version__}')"
