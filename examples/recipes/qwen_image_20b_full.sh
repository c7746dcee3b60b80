#!/usr/bin/env bash
# Full-parameter APEX on Qwen-Image 20B, 16 GPUs over 2 nodes (8 each).
#
#   NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0> BASE=ckpt/qwen-image-20b bash examples/recipes/qwen_image_20b_full.sh
#   bash examples/recipes/qwen_image_20b_full.sh --dry-run
#   bash examples/recipes/qwen_image_20b_full.sh --tiny          # the same run at CPU size (_launch.sh)
#
# BASE: the diffusers transformer imported with tools/convert_hf.py import. The run starts from
# it once; the same command again (after a preemption, a crash) resumes SAVE's newest checkpoint.
#
# Layout from `tools/estimate_memory.py --model qwen-image-20b --search --gpus 16`: the smallest
# model parallelism that fits 80 GB is TP x PP = 4; TP=4 inside a node (NVLink, no pipeline
# bubble) x DP=4, distributed optimizer, full activation recompute.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export NNODES=${NNODES:-2}
BASE=${BASE:-ckpt/qwen-image-20b}
SAVE=${SAVE:-runs/qwen-image-20b-full}
LATENT_GRID=64x64
TEXT_LEN=256
ARGS=(
  --model qwen-image-20b --bf16
  --pretrained-checkpoint "$BASE" --load "$SAVE" --save "$SAVE"  # BASE on the first start, SAVE's newest after
  --tensor-model-parallel-size 4 --pipeline-model-parallel-size 1
  --use-distributed-optimizer --recompute-granularity full
  --micro-batch-size 1 --global-batch-size 64
  --train-iters 3000 --lr 1e-5 --lr-warmup-iters 100 --lr-decay-style constant --clip-grad 1.0
  --objective apex --apex-preset release --teacher frozen  # the release's recipe: docs/apex_method.md
  --data-path "${DATA_PATH:-data/shards}"
  --save-interval 250 --log-interval 10
)
source examples/recipes/_launch.sh
