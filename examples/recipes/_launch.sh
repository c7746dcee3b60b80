#!/usr/bin/env bash
# Shared tail of the recipes: `source`d with ARGS, LATENT_GRID and TEXT_LEN set, and ARGS holding
# `--pretrained-checkpoint BASE --load SAVE --save SAVE`. With --dry-run among the arguments it
# prints parameter counts, the per-GPU memory plan and the launch command on this machine (CPU,
# nothing allocated); otherwise it launches the job with torchrun on this node.
#
# Re-running a recipe with the same SAVE resumes its newest complete checkpoint: the trainer
# starts from BASE only while SAVE holds no checkpoint (the first start), and refuses to write
# over a complete checkpoint. The run's directories are therefore set through BASE and SAVE,
# never by --save / --load / --pretrained-checkpoint arguments.
#
# --tiny: the same recipe at CPU size (tests, a smoke run of the command before booking GPUs):
# the family's tiny model on the built-in data (or on DATA_PATH when it is set: data prepared for
# the tiny model, as in docs/walkthrough.md), one process unless NPROC_PER_NODE says otherwise,
# no model parallelism, a small batch and iteration counts cut to a few (training, LR warm-up,
# the DM term's warm-up, checkpoint and log intervals). Precision, optimizer, objective and the
# checkpoint flags stay the recipe's.
recipe=$(basename "$0")
dry=0
tiny=0
user=()
for a in "$@"; do
  case "$a" in
    --dry-run) dry=1 ;;
    --tiny) tiny=1 ;;
    --save | --save=* | --load | --load=* | --pretrained-checkpoint | --pretrained-checkpoint=*)
      echo "$recipe: error: ${a%%=*}: set SAVE=DIR (the run's checkpoints, resumed on a re-run) and BASE=DIR (the" \
           "weights of its first start) instead" >&2
      exit 2 ;;
    *) user+=("$a") ;;
  esac
done

tiny_value() {  # the CPU-size value of a recipe's flag; nothing for the flags --tiny keeps
  case "$1" in
    --model) case "$2" in qwen-image*) echo qwen-image-tiny ;; sana*) echo sana-tiny ;; esac ;;
    --tensor-model-parallel-size | --pipeline-model-parallel-size | --log-interval) echo 1 ;;
    --micro-batch-size | --lr-warmup-iters | --save-interval) echo 2 ;;
    --global-batch-size) echo 4 ;;
    --train-iters) echo 8 ;;
    --apex-option) case "$2" in dm_warmup_steps=*) echo dm_warmup_steps=2 ;; esac ;;
  esac
}

if [[ $tiny == 1 ]]; then
  sized=()
  for ((i = 0; i < ${#ARGS[@]}; i++)); do
    flag="${ARGS[$i]}"
    value="${ARGS[$((i + 1))]:-}"
    if [[ "$flag" == --data-path ]]; then  # the recipe's data is sized for its model: the built-in data
      if [[ -n "${DATA_PATH:-}" ]]; then sized+=("$flag" "$value"); fi
      i=$((i + 1))
    elif [[ -n "$(tiny_value "$flag" "$value")" ]]; then
      sized+=("$flag" "$(tiny_value "$flag" "$value")")
      i=$((i + 1))
    elif [[ "$flag" == --model ]]; then
      echo "$recipe: error: --tiny: no tiny model of the family of --model $value" >&2
      exit 2
    else
      sized+=("$flag")
    fi
  done
  ARGS=("${sized[@]}")
  LATENT_GRID=7x7
  TEXT_LEN=16
  NNODES=1
  NODE_RANK=0
  NPROC_PER_NODE=${NPROC_PER_NODE:-1}
fi

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
export NNODES NPROC_PER_NODE

LAUNCH=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK"
        --nproc-per-node "$NPROC_PER_NODE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
        examples/pretrain_apex_dit.py "${ARGS[@]}")
if [[ $dry == 1 ]]; then
  exec "$PYTHON" examples/pretrain_apex_dit.py --dry-run --dry-run-latent-grid "$LATENT_GRID" \
    --dry-run-text-len "$TEXT_LEN" --dry-run-command "$(printf '%q ' "${LAUNCH[@]}" "${user[@]}")" \
    "${ARGS[@]}" "${user[@]}"
fi
exec "${LAUNCH[@]}" "${user[@]}"
