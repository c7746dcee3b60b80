#!/usr/bin/env bash
# APEX one-step text-to-image training on a Megatron-Core DiT.
#
#   bash examples/pretrain_apex_dit.sh                 # tiny real job on a laptop CPU (<15 min):
#                                                      # flow matching, then APEX fine-tuning, then
#                                                      # one-step and 4-step samples on disk
#   NPROC_PER_NODE=8 bash examples/pretrain_apex_dit.sh --model ... --tensor-model-parallel-size 2 ...
#
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT as for any torchrun job.
# Every argument given to this script is passed on to pretrain_apex_dit.py after the defaults
# below, so it overrides them (argparse keeps the last value of a flag).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
# Default: one process per GPU; without GPUs, data parallelism over up to 2 CPU cores with one
# intra-op thread per process, which is 1.4x faster than one process with two OpenMP threads
# (docs/benchmarks.md) and gives the same numbers (tests/integration/test_parallel_training.py).
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [[ "$NPROC_PER_NODE" == 0 ]]; then
    NPROC_PER_NODE=$(( $(nproc) >= 2 ? 2 : 1 ))
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  fi
fi

# Where the run goes, and the user's objective and APEX variant: the last value among the
# arguments wins, as it does for the trainer.
SAVE=runs/apex-tiny
OBJECTIVE=apex
VARIANT=""
PRESET=""
DATA_PATH=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  next=""
  if [[ $((i + 1)) -lt ${#args[@]} ]]; then next="${args[$((i + 1))]}"; fi
  case "${args[$i]}" in
    --save) SAVE="$next" ;;
    --save=*) SAVE="${args[$i]#--save=}" ;;
    --objective) OBJECTIVE="$next" ;;
    --objective=*) OBJECTIVE="${args[$i]#--objective=}" ;;
    --apex-variant) VARIANT="$next" ;;
    --apex-variant=*) VARIANT="${args[$i]#--apex-variant=}" ;;
    --apex-preset) PRESET="$next" ;;
    --apex-preset=*) PRESET="${args[$i]#--apex-preset=}" ;;
    --data-path) DATA_PATH="$next" ;;
    --data-path=*) DATA_PATH="${args[$i]#--data-path=}" ;;
  esac
done

MODEL_ARGS=(
  --model qwen-image-tiny
)
# 1500 flow-matching iterations (cosine LR 1e-3 -> 5e-4), then 500 APEX iterations at a constant
# 5e-4: the paper fine-tunes APEX from a pretrained flow model, and a constant fine-tuning LR beat
# the tail of one long cosine in our CPU trials (docs/apex_recipe.md).
TRAIN_ARGS=(
  --micro-batch-size 32
  --global-batch-size 64
  --train-iters 2000
  --lr 1e-3
  --min-lr 5e-4
  --lr-warmup-iters 100
  --lr-decay-iters 1500
  --lr-decay-style cosine
  --clip-grad 1.0
  --seed 1234
  --ema-decay 0.99
)
# APEX as the authors' release trains it (`--apex-preset release`, docs/apex_method.md): the
# `released` variant (one-step samples, a fake flow under c_fake = -c, distribution matching
# against a frozen copy of the flow model taken when APEX starts, its gradient clamped to [-1, 1]),
# with the release's any-step rows on RCGM consistency targets, CFG-enhanced targets (r = 0.8),
# fake queries flagged by a negative time, a pseudo-Huber loss and the tan weight. The CFG target
# asks the flow model for the empty prompt's velocity, so 10 % of the captions are dropped for the
# empty prompt throughout. In the benchmark this recipe's one step reached the teacher's 50 steps
# (docs/apex_recipe.md). `--apex-variant released` alone gives the previous recipe (w_dm 1, the DM
# term held off 80 iterations, no CFG target, velocity-only base rows).
#
# The trainer refuses a flag that the run's objective or variant does not read, and it cannot tell
# these defaults from the user's flags, so they step aside: all of them for a user's `--objective
# fm`, the preset for a user's `--apex-variant` or `--apex-preset`. A user's `--train-iters` of
# 1500 or less needs its own `--apex-start-iter` (APEX would never run; the trainer says so).
OBJECTIVE_ARGS=()
if [[ "$OBJECTIVE" == apex ]]; then
  OBJECTIVE_ARGS=(
    --objective apex
    --apex-start-iter 1500
  )
  if [[ -z "$VARIANT" && -z "$PRESET" ]]; then
    OBJECTIVE_ARGS+=(
      --apex-preset release
      --caption-dropout 0.1
    )
  elif [[ "$VARIANT" == released && -z "$PRESET" ]]; then
    OBJECTIVE_ARGS+=(
      --teacher frozen
      --apex-option w_dm=1.0
      --apex-option dm_warmup_steps=80
    )
  elif [[ "$PRESET" == release ]]; then
    OBJECTIVE_ARGS+=(--caption-dropout 0.1)
  fi
fi
# --load of the run's own --save: the trainer resumes its newest complete checkpoint, and starts
# afresh (or from a user's --pretrained-checkpoint) while it holds none.
CHECKPOINT_ARGS=(
  --save "$SAVE"
  --load "$SAVE"
  --save-interval 500
  --log-interval 10
)

"$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  examples/pretrain_apex_dit.py \
  "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" "${OBJECTIVE_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "$@"

# One-step and few-step samples (tools/sample.py: a grid PNG, one PNG per image and an npz), one
# row per prompt: the built-in dataset's class prompts, scored by tools/evaluate.py (class
# accuracy and Frechet distance in the feature space of a classifier trained on the real images;
# the first call trains and caches that classifier, ~30 s), or the first captions of a
# --data-path dataset (no classes to score). A dataset prepared with a VAE or a transformers text
# encoder records their kinds but not their folders: give them to the sampler with
# SAMPLE_ARGS="--pipeline DIR" (or "--text-encoder DIR --vae DIR"; any tools/sample.py flags).
if [[ "$NODE_RANK" == 0 && "${SKIP_SAMPLES:-0}" != 1 ]]; then
  read -r -a SAMPLE_EXTRA <<< "${SAMPLE_ARGS:-}"
  PER_PROMPT=${NUM_PER_PROMPT:-$([[ -n "$DATA_PATH" ]] && echo 4 || echo 100)}
  for nfe in 1 4; do
    "$PYTHON" tools/sample.py --load "$SAVE" --nfe "$nfe" --num-per-prompt "$PER_PROMPT" \
      --out "$SAVE/samples_nfe$nfe" ${SAMPLE_EXTRA[@]+"${SAMPLE_EXTRA[@]}"}
    if [[ "${SKIP_EVAL:-0}" != 1 ]] && "$PYTHON" -c \
        "import numpy, sys; sys.exit('labels' not in numpy.load(sys.argv[1]).files)" "$SAVE/samples_nfe$nfe.npz"; then
      "$PYTHON" tools/evaluate.py --samples "$SAVE/samples_nfe$nfe.npz"
    fi
  done
fi
