#!/usr/bin/env bash
# Set up a fresh machine: the Fashion-MNIST demo data (Debian package), a
# virtualenv in .venv and this project with the CPU build of MXNet.
#   bash scripts/install.sh          # runtime only
#   bash scripts/install.sh --test   # plus the test dependencies (pytest, onnxruntime, ...)
# Environment: PYTHON (default python3), VENV (default .venv),
#              MXNET_EXTRA (default cpu; gpu installs mxnet-cu112).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${MXNET_EXTRA:-cpu},export   # export: onnx, for python -m training_runtime.export
[ "${1:-}" = "--test" ] && EXTRAS="$EXTRAS,test"

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "[install] installing Debian package dataset-fashion-mnist (demo data)"
        apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null \
            || echo "[install] WARNING: could not install dataset-fashion-mnist"
    elif command -v sudo >/dev/null 2>&1; then
        sudo apt-get update -qq >/dev/null && sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null \
            || echo "[install] WARNING: could not install dataset-fashion-mnist"
    fi
    if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
        echo "[install] Fashion-MNIST demo data not found in $FMNIST." >&2
        echo "[install] Download the four idx .gz files (train/t10k images and labels) and pass" >&2
        echo "[install] --data-dir DIR to train_attr.py / train_fgvc.py." >&2
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "[install] creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade "pip<25" >/dev/null 2>&1 || true
echo "[install] pip install -e .[$EXTRAS]"
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
# S3N's multi-threaded CPU sampler (fgvc_gluon/native): built once now instead of at the first S3N run;
# without a C++ compiler S3N falls back to MXNet's BilinearSampler (same numbers, slower)
"$VENV/bin/python" -m fgvc_gluon.native || true
