"""Runs a list of training jobs through megatron_apex.training.loop.Trainer, one after the
other, in the processes of ONE torchrun launch (so the ~4 s import is paid once per launch).

    train_worker.py PLAN.json

PLAN.json: {"done": path, "jobs": [{"name", "argv", "action", "probe", "checkpoint"}...]}
  argv    pretrain_apex_dit.py flags (each job its own --save: metrics.jsonl goes there)
  checkpoint  False: write no checkpoint (saves cost seconds; most jobs only need metrics)
  action  "train" (default) | "save_init" (build, then save the iteration-0 checkpoint) |
          "build" (build and --load only)
  probe   None | "start" | "end": the model's output on a fixed input, before or after
          training, is written by rank 0 to `<--save or probe_dir>/probe.pt`
Rank 0 writes {"jobs": [names]} to `done` once every job finished.
"""

import json
import os
import sys
import time

import torch

from _common import write_json_atomic


def probe_query():
    """A fixed input in the shapes of the test dataset (1 x 8 x 8 images, 4 x 384 text states):
    a masked token, one-step target time, the condition shift on one row."""
    from megatron_apex.objectives.apex import ModelQuery

    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 1, 8, 8, generator=g)
    t = torch.rand(3, generator=g) * 0.9 + 0.1
    context = torch.randn(3, 4, 384, generator=g)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 2:] = False
    return ModelQuery(x, t, context, mask, fake_condition=torch.tensor([False, True, False]),
                      t_target=torch.zeros(3))


def write_probe(trainer, path):
    from megatron_apex.training.pipeline_apex import pipeline_forward

    out = pipeline_forward(trainer.ddp_model, probe_query())
    if torch.distributed.get_rank() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(out, path + ".tmp")
        os.replace(path + ".tmp", path)


def run_job(job):
    from megatron_apex.training.arguments import parse_args
    from megatron_apex.training.loop import Trainer

    cfg = parse_args(job["argv"])
    trainer = Trainer(cfg)
    if not job.get("checkpoint", True):
        trainer.save = lambda: None
    probe_path = os.path.join(job.get("probe_dir") or cfg.checkpoint.save, "probe.pt")
    if job.get("probe") == "start":
        write_probe(trainer, probe_path)
    action = job.get("action", "train")
    if action == "save_init":
        trainer.save()
    elif action == "train":
        trainer.train()
    if job.get("probe") == "end":
        write_probe(trainer, probe_path)


def main(plan_path):
    with open(plan_path) as f:
        plan = json.load(f)
    for job in plan["jobs"]:
        start = time.perf_counter()
        run_job(job)
        if torch.distributed.get_rank() == 0:
            print(f"[train_worker] {job['name']}: {time.perf_counter() - start:.1f} s", flush=True)
    if torch.distributed.get_rank() == 0:
        write_json_atomic(plan["done"], {"jobs": [job["name"] for job in plan["jobs"]]})
    from megatron_apex.parallel import destroy_distributed

    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
