"""train_worker.py's jobs, plus action "state_bytes": build the run, take one training step
(so Adam's state and the teacher exist), and write what this rank holds, in bytes, to
`<--save>/state_bytes_rank<R>.json` (weights, grads, optimizer, copies: the real objects the
memory planner counts under --fsdp).

    fsdp_worker.py PLAN.json
"""

import json
import os
import sys
import time

import torch

from _common import write_json_atomic
from train_worker import run_job


def _local_bytes(tensors):
    from megatron_apex.parallel.fsdp import local_tensor

    return sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in tensors)


def record_state_bytes(job):
    from megatron_apex.training.arguments import parse_args
    from megatron_apex.training.loop import Trainer

    cfg = parse_args(job["argv"])
    trainer = Trainer(cfg)
    trainer.train_step()
    model = trainer.model
    states = [v for part in trainer.optimizer.chained_optimizers for s in part.optimizer.state.values()
              for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    copies = [*trainer.ema.parameters(), *trainer.teacher.parameters()]
    payload = {"weights": _local_bytes(model.parameters()),
               "grads": _local_bytes(p.grad for p in model.parameters() if p.grad is not None),
               "optimizer": _local_bytes(states), "copies": _local_bytes(copies)}
    os.makedirs(cfg.checkpoint.save, exist_ok=True)
    write_json_atomic(os.path.join(cfg.checkpoint.save, f"state_bytes_rank{torch.distributed.get_rank()}.json"),
                      payload)


def main(plan_path):
    with open(plan_path) as f:
        plan = json.load(f)
    for job in plan["jobs"]:
        start = time.perf_counter()
        (record_state_bytes if job.get("action") == "state_bytes" else run_job)(job)
        if torch.distributed.get_rank() == 0:
            print(f"[fsdp_worker] {job['name']}: {time.perf_counter() - start:.1f} s", flush=True)
    if torch.distributed.get_rank() == 0:
        write_json_atomic(plan["done"], {"jobs": [job["name"] for job in plan["jobs"]]})
    from megatron_apex.parallel import destroy_distributed

    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
