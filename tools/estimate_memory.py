"""Per-GPU memory of an APEX (or flow-matching) training step, before anyone books a cluster.

    python tools/estimate_memory.py --model qwen-image-20b --tp 4 --pp 2 --dp 2
    python tools/estimate_memory.py --model qwen-image-20b --lora-rank 64 --search --gpus 8
    python tools/estimate_memory.py --model qwen-image-20b --search --gpus 16 --gpu-memory 80
    python tools/estimate_memory.py --model qwen-image-20b --search --gpus 16 --sequence-parallel
    python tools/estimate_memory.py --model qwen-image-20b --fsdp --dp 16

Weights, fp32 main grads, Adam state (+ fp32 master weights) and the frozen teacher / EMA
copies are exact byte counts of the stage models megatron builds (on the meta device, in a fake
process group); activations are traced through the real objective on meta tensors, attention
counted as a flash kernel keeps it (megatron_apex/training/memory_estimate.py). With --fsdp
(the trainer's, TP = PP = 1) weights, grads, optimizer state and the copies are the rank's
shards, plus the unsharded layers in flight; --search tries FSDP at TP = PP = 1 of every
full-parameter plan. Not counted:
the CUDA context and allocator fragmentation (--reserve-gib leaves room for them).
"""

import argparse
import dataclasses
import json
import sys

from megatron_apex.training.memory_estimate import GIB, MemoryPlanConfig, estimate, format_table, peak, search


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model", default="qwen-image-20b", help="registry name")
    p.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1)
    p.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1)
    p.add_argument("--dp", "--data-parallel-size", dest="dp", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--num-microbatches", type=int, default=1, help="micro-batches per global batch and DP rank")
    p.add_argument("--latent-grid", default="64x64", help="patch tokens HxW (1024 px, VAE /8, patch 2: 64x64)")
    p.add_argument("--text-len", type=int, default=256)
    p.add_argument("--objective", default="apex", choices=["apex", "fm"])
    p.add_argument("--apex-variant", default="released", choices=["released", "paper"])
    p.add_argument("--teacher", default="frozen", choices=["frozen", "online"])
    p.add_argument("--ema", action="store_true", help="an EMA copy of the weights is kept")
    p.add_argument("--lora-rank", type=int, default=0, help="0 = full-parameter")
    p.add_argument("--lora-targets", default="attn")
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    p.add_argument("--sequence-parallel", action="store_true",
                   help="Megatron-LM's --sequence-parallel (needs --tp > 1; with --search: every layout with TP > 1)")
    p.add_argument("--use-distributed-optimizer", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--fsdp", action="store_true",
                   help="the trainer's --fsdp: weights, grads, optimizer, teacher and EMA sharded over --dp "
                        "(TP = PP = 1; with --search: only that layout)")
    p.add_argument("--params-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--search", action="store_true", help="list the smallest layouts of --gpus that fit")
    p.add_argument("--gpus", type=int, default=8, help="GPUs of the --search")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU (search budget)")
    p.add_argument("--reserve-gib", type=float, default=6.0, help="left for CUDA context and fragmentation")
    p.add_argument("--json", action="store_true", help="print the per-stage figures as JSON")
    a = p.parse_args(argv)
    try:
        h, w = (int(v) for v in a.latent_grid.lower().split("x"))
    except ValueError:
        p.error(f"--latent-grid {a.latent_grid!r}: expected HxW, e.g. 64x64")
    plan = MemoryPlanConfig(
        model=a.model, tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp, data_parallel_size=a.dp,
        micro_batch_size=a.micro_batch_size, num_microbatches=a.num_microbatches, latent_grid=(h, w),
        text_len=a.text_len, objective=a.objective, apex_variant=a.apex_variant, teacher=a.teacher, ema=a.ema,
        lora_rank=a.lora_rank, lora_targets=a.lora_targets,
        recompute=None if a.recompute == "none" else a.recompute,
        distributed_optimizer=a.use_distributed_optimizer, params_dtype=a.params_dtype,
        sequence_parallel=a.sequence_parallel, fsdp=a.fsdp)
    return a, plan


def main(argv=None) -> int:
    a, plan = parse_args(argv)
    try:
        if a.search:
            budget = a.gpu_memory * 1e9 / GIB - a.reserve_gib
            fits = search(plan, a.gpus, budget)
            print(f"{a.model} on {a.gpus} GPUs of {a.gpu_memory:g} GB ({budget:.1f} GiB usable each): "
                  f"{len(fits)} layout(s) fit, smallest model parallelism first\n")
            print("| TP | PP | DP | FSDP | SP | recompute | peak stage GiB | activations GiB |\n"
                  "|---|---|---|---|---|---|---|---|")
            for trial, top in fits:
                print(f"| {trial.tensor_model_parallel_size} | {trial.pipeline_model_parallel_size} | "
                      f"{trial.data_parallel_size} | {'yes' if trial.fsdp else 'no'} | "
                      f"{'yes' if trial.sequence_parallel else 'no'} | "
                      f"{trial.recompute or 'none'} | {top.total / GIB:.1f} | {top.activations / GIB:.1f} |")
            if fits:
                print("\n" + format_table(fits[0][0], estimate(fits[0][0])))
            return 0 if fits else 1
        stages = estimate(plan)
    except ValueError as err:
        print(f"estimate_memory.py: error: {err}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps([{**dataclasses.asdict(s), "total": s.total} for s in stages]))
    else:
        print(format_table(plan, stages))
        print(f"\npeak: stage {peak(stages).stage}, {peak(stages).total / GIB:.2f} GiB per GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
