#!/usr/bin/env bash
# Full-parameter APEX on Sana 0.6B (the paper's Sana-class one-step models), 8 GPUs of one node.
#
#   BASE=ckpt/sana-0.6b DATA_PATH=data/shards bash examples/recipes/sana_0_6b_full.sh
#   bash examples/recipes/sana_0_6b_full.sh --dry-run
#
# Layout from `tools/estimate_memory.py --model sana-0.6b --search --gpus 8 --latent-grid 32x32
# --text-len 300`: data parallel only, distributed optimizer.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
LATENT_GRID=32x32  # 1024 x 1024 px: DC-AE / 32, patch 1
TEXT_LEN=300
ARGS=(
  --model sana-0.6b --bf16
  --load "${BASE:-ckpt/sana-0.6b}" --finetune
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1
  --use-distributed-optimizer
  --micro-batch-size 4 --global-batch-size 256
  --train-iters 5000 --lr 2e-5 --lr-warmup-iters 200 --lr-decay-style constant --clip-grad 1.0
  --objective apex --apex-variant released --teacher frozen
  --apex-option w_dm=1.0 --apex-option dm_warmup_steps=80
  --data-path "${DATA_PATH:-data/shards}"
  --save "${SAVE:-runs/sana-0.6b-full}" --save-interval 250 --log-interval 10
)
source examples/recipes/_launch.sh
