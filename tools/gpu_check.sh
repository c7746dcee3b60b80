#!/usr/bin/env bash
# The prepared GPU check (docs/gpu.md): tests/gpu, then tools/gpu_check.py's table, in one call
# on a lent GPU machine that has torch and CUDA but no network.
#
#   bash tools/gpu_check.sh --prepare    # HERE, with network: the wheels into .whl/, then --dry-run
#   bash tools/gpu_check.sh --dry-run    # HERE: what would travel (< 64 MiB) and what would run there
#   bash tools/gpu_check.sh [--quick] [--parts a,b]   # THERE: install .whl/, tests/gpu, the table
#   GPU_CHECK_ON_CPU=1 bash tools/gpu_check.sh           # checks this script on a CPU: tests/gpu with
#       MEGATRON_APEX_GPU_TESTS_ON_CPU=1, gpu_check.py --smoke (GPU_CHECK_WHEELS: wheels for this Python)
#
# There, only the wheels carried in .whl/ are installed, with --no-deps --no-index into a
# private folder put first on PYTHONPATH: the machine's torch, CUDA and everything else stay as
# they are (a wheel of torch, triton or a CUDA library in .whl/ is refused). The repository runs
# from PYTHONPATH. The whole run stays under GPU_CHECK_BUDGET_S (480 s): install, then pytest
# tests/gpu (at most 180 s), then gpu_check.py with what is left. Everything lands in $OUT
# (default /tmp/gpu_check): gpu_check_log.txt (all output), pytest_gpu.txt, gpu_check.md (the
# table, printed last), gpu_check.json.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

WHEEL_DIR="${GPU_CHECK_WHEELS:-.whl}"
CARRY_LIMIT_MIB=64
BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"
PYTEST_LIMIT_S=180
INSTALL_LIMIT_S=90
SITE=/tmp/gpu_check_site
# Installed whatever the machine has: the versions the CPU suite runs (setup.py allows
# megatron-core >= 0.16.1 on Python 3.12; 0.16.1 needs torch >= 2.6). The machine's image has
# none of these; diffusers' own needs (huggingface-hub, safetensors, regex, requests, Pillow,
# filelock) and webdataset's pyyaml are in it.
REQUIRED=(megatron-core==0.16.1 diffusers==0.42.1 webdataset==1.0.2 braceexpand==0.1.7)
# Installed only where their module (named as the wheel) does not import: the image has pytest.
FALLBACK=(pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0)
# what the GPU machine's wheels must fit (pip download's target)
PLATFORM_ARGS=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
RUN_TOOL_CALL='run(command="PYTHONUNBUFFERED=1 bash tools/gpu_check.sh", carry=[".whl"], timeout_s=560)'

fail() { echo "gpu_check.sh: $*" >&2; exit 1; }

# megatron-core==0.16.1 -> megatron_core (how the wheel file names it)
wheel_stem() { local name=${1%%==*}; echo "${name//-/_}"; }
is_fallback() {
  local spec
  for spec in "${FALLBACK[@]}"; do [[ $(wheel_stem "$spec") == "$1" ]] && return 0; done
  return 1
}

# Every wheel of the lists, one file each; anything else in the folder is an error (two versions
# of one package stop pip, an unlisted one would be installed unasked).
list_wheels() {
  local spec stem version file files=() problems=0
  for spec in "${REQUIRED[@]}" "${FALLBACK[@]}"; do
    stem=$(wheel_stem "$spec"); version=${spec#*==}
    file=$(compgen -G "$WHEEL_DIR/${stem}-${version}-*.whl" | head -n 1)
    if [[ -z $file ]]; then
      echo "MISSING $WHEEL_DIR/${stem}-${version}-*.whl (bash tools/gpu_check.sh --prepare)" >&2
      problems=1
    else
      files+=("$file")
    fi
  done
  for file in "$WHEEL_DIR"/*.whl; do
    [[ -e $file ]] || continue
    if [[ " ${files[*]} " != *" $file "* ]]; then
      echo "UNLISTED $file (remove it, or add it to tools/gpu_check.sh)" >&2; problems=1
    fi
    case "$(basename "$file")" in
      torch-*|torchvision-*|torchaudio-*|triton-*|nvidia_*|transformer_engine*|flash_attn*)
        echo "REFUSED $file: the GPU machine's own torch and CUDA stay as they are" >&2; problems=1 ;;
    esac
  done
  printf '%s\n' "${files[@]}"
  return $problems
}

prepare() {
  local py=${PYTHON:-python3} tmp
  mkdir -p "$(dirname "$WHEEL_DIR")"
  tmp=$(mktemp -d "${WHEEL_DIR%/}.tmp.XXXXXX") || fail "cannot make a temporary folder beside $WHEEL_DIR"
  trap 'rm -rf "${tmp:-}"' EXIT  # an interrupted download leaves nothing that would travel
  # --no-deps: every package is named above; pip would otherwise pull torch and CUDA (gigabytes)
  if ! "$py" -m pip download --quiet --no-deps --only-binary=:all: "${PLATFORM_ARGS[@]}" -d "$tmp" \
      "${REQUIRED[@]}" "${FALLBACK[@]}"; then
    rm -rf "$tmp"; fail "pip download failed (see above)"
  fi
  chmod 755 "$tmp" && rm -rf "$WHEEL_DIR" && mv "$tmp" "$WHEEL_DIR" || fail "cannot move the wheels into $WHEEL_DIR"
  echo "gpu_check.sh: wheels in $WHEEL_DIR"
}

mib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1048576 }'; }

dry_run() {
  local wheels rc=0 file size tree_bytes wheel_bytes=0 total stem
  echo "== what travels: the working tree (tracked and untracked-not-ignored files) and carry=[\"$WHEEL_DIR\"]"
  wheels=$(list_wheels) || rc=1
  tree_bytes=$(git ls-files -z --cached --others --exclude-standard \
    | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
  echo "working tree: $(mib "$tree_bytes") MiB"
  while IFS= read -r file; do
    [[ -n $file ]] || continue
    size=$(stat -c %s "$file"); wheel_bytes=$((wheel_bytes + size))
    stem=$(basename "$file"); stem=${stem%%-*}
    if is_fallback "$stem"; then
      echo "  $file  $(mib "$size") MiB  (installed only if \`import $stem\` fails there)"
    else
      echo "  $file  $(mib "$size") MiB"
    fi
  done <<< "$wheels"
  total=$((tree_bytes + wheel_bytes))
  echo "wheels: $(mib "$wheel_bytes") MiB; total: $(mib "$total") MiB of the ${CARRY_LIMIT_MIB} MiB a call may carry"
  if (( total >= CARRY_LIMIT_MIB * 1048576 )); then
    echo "TOO LARGE: $(mib "$total") MiB >= ${CARRY_LIMIT_MIB} MiB" >&2; rc=1
  fi
  echo
  echo "== the device call (one; the script ends within ${BUDGET_S} s, timeout_s leaves the margin)"
  echo "$RUN_TOOL_CALL"
  echo
  echo "== what it runs there"
  echo "PY=python3 (the image's, with torch + CUDA; never reinstalled)"
  echo "\$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE <the wheels above whose module is missing>"
  echo "export PYTHONPATH=$SITE:\$PWD PYTEST_DISABLE_PLUGIN_AUTOLOAD=1"
  echo "timeout $PYTEST_LIMIT_S \$PY -m pytest -q -rs -p no:cacheprovider tests/gpu > \$OUT/pytest_gpu.txt"
  echo "timeout -k 5 <left + 15> \$PY -W ignore tools/gpu_check.py --out \$OUT --budget-s <left = ${BUDGET_S} - elapsed - 40> --pytest-log \$OUT/pytest_gpu.txt --pytest-rc <rc> --no-table [--quick] [--parts ...]"
  echo "cat \$OUT/gpu_check.md"
  return $rc
}

install_wheels() {  # $1: the python there
  local py=$1 file stem wheels selected=()
  wheels=$(list_wheels) || fail "$WHEEL_DIR is not what tools/gpu_check.sh expects (see above; run --prepare here first)"
  while IFS= read -r file; do
    stem=$(basename "$file"); stem=${stem%%-*}
    if is_fallback "$stem"; then
      if "$py" -c "import $stem" 2>/dev/null; then
        echo "gpu_check.sh: $stem is there, its wheel stays unused"; continue
      fi
    fi
    selected+=("$file")
  done <<< "$wheels"
  rm -rf "$SITE"
  timeout "$INSTALL_LIMIT_S" "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$SITE" "${selected[@]}" || fail "installing the wheels of $WHEEL_DIR failed"
}

device_run() {  # its output goes to $OUT/gpu_check_log.txt too
  local py=${PYTHON:-python3} start elapsed left tests_rc check_rc torch_before torch_after smoke=()
  start=$(date +%s)
  export PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1

  torch_before=$("$py" -c "import torch; print(torch.__version__, torch.__file__)" 2>/dev/null) \
    || fail "torch does not import with $py"
  if [[ ${GPU_CHECK_ON_CPU:-0} == 1 ]]; then
    echo "gpu_check.sh: GPU_CHECK_ON_CPU=1: checking the script on a CPU (tests/gpu on the CPU, gpu_check.py --smoke)"
    export MEGATRON_APEX_GPU_TESTS_ON_CPU=1
    smoke=(--smoke)
  else
    "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
      || fail "CUDA is not available to torch ${torch_before%% *}: run this on the GPU machine (--dry-run here)"
  fi
  install_wheels "$py"
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  torch_after=$("$py" -c "import torch; print(torch.__version__, torch.__file__)")
  [[ $torch_after == "$torch_before" ]] || fail "torch changed after the install ($torch_before -> $torch_after)"
  "$py" - <<'PYEOF' || fail "the installed packages do not import (see above)"
import importlib.metadata as md, sys, torch
import megatron.core, diffusers, webdataset, pytest  # noqa: F401
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
print(f"gpu_check.sh: {device}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"Python {sys.version.split()[0]}; " + ", ".join(f"{d} {md.version(d)}" for d in
      ("megatron-core", "diffusers", "webdataset", "pytest")), flush=True)
PYEOF
  echo "gpu_check.sh: installed in $(( $(date +%s) - start )) s"

  timeout "$PYTEST_LIMIT_S" "$py" -m pytest -q -rs -p no:cacheprovider tests/gpu > "$OUT/pytest_gpu.txt" 2>&1
  tests_rc=$?
  tail -n 25 "$OUT/pytest_gpu.txt"
  elapsed=$(( $(date +%s) - start ))
  echo "gpu_check.sh: tests/gpu exit code $tests_rc after $elapsed s"

  # what is left, less 20 s of grace for the kill and 20 s for the end
  left=$(( BUDGET_S - elapsed - 40 ))
  if (( left < 30 )); then
    echo "gpu_check.sh: only $left s left of ${BUDGET_S} s; gpu_check.py does not run"
    check_rc=1
  else
    timeout -k 5 $(( left + 15 )) "$py" -W ignore tools/gpu_check.py --out "$OUT" --budget-s "$left" \
      --pytest-log "$OUT/pytest_gpu.txt" --pytest-rc "$tests_rc" --no-table "${smoke[@]}" "$@"
    check_rc=$?
  fi
  echo "gpu_check.sh: gpu_check.py exit code $check_rc; total $(( $(date +%s) - start )) s of ${BUDGET_S} s"
  echo
  if [[ -f $OUT/gpu_check.md ]]; then cat "$OUT/gpu_check.md"; else echo "(no table: gpu_check.py wrote none)"; fi
  [[ $tests_rc -eq 0 && $check_rc -eq 0 ]]
}

case "${1:-}" in
  --prepare) shift; prepare && dry_run ;;
  --dry-run) shift; dry_run ;;
  -h|--help) sed -n '2,17p' "$0" ;;
  *)
    OUT="${OUT:-/tmp/gpu_check}"
    mkdir -p "$OUT" || fail "cannot write to OUT=$OUT"
    rm -f "$OUT"/gpu_check.md "$OUT"/gpu_check.json "$OUT"/pytest_gpu.txt  # no stale table printed last
    export OUT
    # through tee: the log comes back even when the call is cut short
    device_run "$@" 2>&1 | tee "$OUT/gpu_check_log.txt"
    exit "${PIPESTATUS[0]}" ;;
esac
