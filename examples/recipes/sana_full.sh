#!/usr/bin/env bash
# Full-parameter APEX on Sana 0.6B or 1.6B (the paper's Sana-class one-step models), 8 GPUs of one node.
#
#   SANA_SIZE=0.6b BASE=ckpt/sana-0.6b DATA_PATH=data/shards bash examples/recipes/sana_full.sh
#   SANA_SIZE=1.6b bash examples/recipes/sana_full.sh --dry-run        # SANA_SIZE: 0.6b | 1.6b (default)
#   bash examples/recipes/sana_full.sh --tiny          # the same run at CPU size (_launch.sh)
#
# BASE: the diffusers transformer imported with tools/convert_hf.py import. The run starts from
# it once; the same command again (after a preemption, a crash) resumes SAVE's newest checkpoint.
#
# Layout from `tools/estimate_memory.py --model sana-$SANA_SIZE --search --gpus 8 --latent-grid 32x32
# --text-len 300`: data parallel only, distributed optimizer, for both sizes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
SANA_SIZE=${SANA_SIZE:-1.6b}
if [[ "$SANA_SIZE" != 0.6b && "$SANA_SIZE" != 1.6b ]]; then
  echo "sana_full.sh: error: SANA_SIZE=$SANA_SIZE, expected 0.6b or 1.6b" >&2
  exit 2
fi
BASE=${BASE:-ckpt/sana-$SANA_SIZE}
SAVE=${SAVE:-runs/sana-$SANA_SIZE-full}
LATENT_GRID=32x32  # 1024 x 1024 px: DC-AE / 32, patch 1
TEXT_LEN=300
ARGS=(
  --model "sana-$SANA_SIZE" --bf16
  --pretrained-checkpoint "$BASE" --load "$SAVE" --save "$SAVE"  # BASE on the first start, SAVE's newest after
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1
  --use-distributed-optimizer
  --micro-batch-size 4 --global-batch-size 256
  --train-iters 5000 --lr 2e-5 --lr-warmup-iters 200 --lr-decay-style constant --clip-grad 1.0
  --objective apex --apex-preset release --teacher frozen  # the release's recipe: docs/apex_method.md
  --data-path "${DATA_PATH:-data/shards}"
  --save-interval 250 --log-interval 10
)
source examples/recipes/_launch.sh
