#!/usr/bin/env bash
# APEX LoRA on Qwen-Image 20B (the paper's GenEval-0.89 setting), 8 GPUs of one node.
#
#   LORA_RANK=64 BASE=ckpt/qwen-image-20b DATA_PATH=data/shards bash examples/recipes/qwen_image_20b_lora.sh
#   bash examples/recipes/qwen_image_20b_lora.sh --dry-run        # on any CPU: counts, memory, command
#   bash examples/recipes/qwen_image_20b_lora.sh --tiny           # the same run at CPU size (_launch.sh)
#
# BASE is the diffusers transformer imported with tools/convert_hf.py import: the frozen base of
# every start; the same command again (after a preemption, a crash) resumes SAVE's newest
# checkpoint of the adapters. Layout from
# `tools/estimate_memory.py --model qwen-image-20b --lora-rank 64 --search --gpus 8`: data
# parallel only (the frozen bf16 base fits one GPU), full activation recompute at 1024 px.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
BASE=${BASE:-ckpt/qwen-image-20b}
SAVE=${SAVE:-runs/qwen-image-20b-lora}
LATENT_GRID=64x64  # 1024 x 1024 px: VAE / 8, patch 2
TEXT_LEN=256
ARGS=(
  --model qwen-image-20b --bf16
  --lora-rank "${LORA_RANK:-64}" --lora-alpha "${LORA_RANK:-64}" --lora-targets attn
  --pretrained-checkpoint "$BASE" --load "$SAVE" --save "$SAVE"  # the base; the adapters resume from SAVE
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1
  --use-distributed-optimizer --recompute-granularity full
  --micro-batch-size 1 --global-batch-size 64
  --train-iters 3000 --lr 1e-4 --lr-warmup-iters 100 --lr-decay-style constant --clip-grad 1.0
  --objective apex --apex-preset release --teacher frozen  # the release's recipe: docs/apex_method.md
  --data-path "${DATA_PATH:-data/shards}"
  --save-interval 250 --log-interval 10
)
source examples/recipes/_launch.sh
