#!/usr/bin/env bash
# The prepared check for a lent GPU (docs/gpu.md): the CUDA tests, then the throughput / MFU table.
#
#   bash tools/gpu_check.sh            # tests/gpu + tools/gpu_check.py (about 3-5 minutes on one H100)
#   bash tools/gpu_check.sh --quick    # fewer layers and iterations in the table
#
# Needs Python with a CUDA build of torch. megatron-core (and diffusers, pytest for a machine
# without them) are installed offline from wheels in .whl/ when they do not import, e.g.
#   pip download megatron-core==0.16.1 diffusers==0.42.1 pytest -d .whl --python-version 3.12 --only-binary=:all:
# Writes $OUT (default /tmp): pytest_gpu.txt, gpu_check.md, gpu_check.json.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-/tmp}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

fail() { echo "gpu_check.sh: $*" >&2; exit 1; }

"$PY" -c "import torch" 2>/dev/null || fail "torch does not import with $PY"
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || fail "CUDA is not available (torch $("$PY" -c 'import torch; print(torch.__version__)')); run this on a GPU machine"

install_wheels() {  # $1: what is missing, for the message
  compgen -G ".whl/*.whl" >/dev/null || fail "$1 does not import and .whl/ holds no wheels to install it from"
  "$PY" -m pip install --quiet --no-index --no-deps .whl/*.whl || fail "installing .whl/*.whl failed ($1 is missing)"
}
"$PY" -c "import megatron.core" 2>/dev/null || install_wheels "megatron-core"
"$PY" -c "import megatron.core" 2>/dev/null || fail "megatron-core still does not import after installing .whl/"
"$PY" -c "import pytest" 2>/dev/null || install_wheels "pytest"
"$PY" -c "import pytest" 2>/dev/null || fail "pytest does not import: add its wheels to .whl/ (pip download pytest -d .whl)"

"$PY" - <<'PYEOF'
import torch
print(f"gpu_check.sh: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}",
      flush=True)
PYEOF

start=$(date +%s)
timeout 210 "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/pytest_gpu.txt"
tests_rc=${PIPESTATUS[0]}
echo "gpu_check.sh: tests/gpu exit code $tests_rc after $(( $(date +%s) - start )) s"

timeout 240 "$PY" -W ignore tools/gpu_check.py --out "$OUT" "$@"
bench_rc=$?
echo "gpu_check.sh: gpu_check.py exit code $bench_rc, total $(( $(date +%s) - start )) s"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
