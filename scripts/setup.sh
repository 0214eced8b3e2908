#!/usr/bin/env bash
# Set-up on a fresh Debian machine with Python 3.11 (idempotent): the embedded default data set
# (Debian's dataset-fashion-mnist, unless MIXQ_DATA points elsewhere), PyTorch's CPU wheel when
# torch is missing, and mixq itself with its test and export extras.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
if [ -z "${MIXQ_DATA:-}" ] && [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
  echo "setup: installing Debian's dataset-fashion-mnist" >&2
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
# Installing torch first keeps pip from resolving a newer (CUDA) build through mixq's own range.
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[dev]"
