#!/usr/bin/env bash
# Shared tail of the recipes: `source`d with ARGS set. With --dry-run among the arguments it
# prints parameter counts, the per-GPU memory plan and the launch command on this machine (CPU,
# nothing allocated); otherwise it launches the job with torchrun on this node.
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
dry=0
user=()
for a in "$@"; do if [[ "$a" == --dry-run ]]; then dry=1; else user+=("$a"); fi; done
if [[ $dry == 1 ]]; then
  exec "$PYTHON" examples/pretrain_apex_dit.py --dry-run --dry-run-latent-grid "$LATENT_GRID" \
    --dry-run-text-len "$TEXT_LEN" --dry-run-command "$(printf '%q ' "${LAUNCH[@]}" "${user[@]}")" \
    "${ARGS[@]}" "${user[@]}"
fi
exec "${LAUNCH[@]}" "${user[@]}"
