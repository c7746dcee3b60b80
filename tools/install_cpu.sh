#!/usr/bin/env bash
# CPU install into ./.venv: pins the CPU build of torch (an unpinned torch pulls a multi-GB CUDA
# build), installs megatron_apex with its Hugging Face and test extras, and the Fashion-MNIST
# Debian package when apt is available (without it the built-in dataset falls back to
# scikit-learn's digits). Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [[ ! -x "$VENV/bin/python" ]]; then "$PY" -m venv "$VENV"; fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e ".[hf,test]" torch==2.13.0

if [[ ! -d /usr/share/datasets/fashion-mnist ]] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [[ $(id -u) != 0 ]] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
    || echo "install_cpu.sh: could not install dataset-fashion-mnist; the built-in dataset will use scikit-learn's digits" >&2
fi
echo "install_cpu.sh: ready ($("$VENV/bin/python" -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)' 2>/dev/null))"
