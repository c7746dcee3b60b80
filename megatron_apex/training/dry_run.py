"""`--dry-run` of the launcher: what a job would build and need, on a CPU, allocating nothing.

Builds the run's model config, counts its parameters on the meta device against diffusers'
class for the same architecture, plans per-GPU memory for the job's layout
(megatron_apex/training/memory_estimate.py) and prints the launch command.
"""

from __future__ import annotations

import argparse
from typing import List, Optional, Sequence, Tuple

import torch

from megatron_apex.cli import OneLineErrorParser
from megatron_apex.families import count_parameters, family_of_model_name, get_model_config
from megatron_apex.training.arguments import parse_args
from megatron_apex.training.config import RunConfig
from megatron_apex.training.memory_estimate import GIB, MemoryPlanConfig, estimate, format_table, peak


def split_dry_run_flags(argv: Sequence[str]) -> Tuple[Optional[argparse.Namespace], List[str]]:
    """(dry-run options or None when --dry-run is absent, the training flags)."""
    p = OneLineErrorParser(prog="pretrain_apex_dit.py", add_help=False)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--dry-run-world-size", type=int, default=None,
                   help="GPUs of the job (default: WORLD_SIZE, else NNODES x NPROC_PER_NODE)")
    p.add_argument("--dry-run-latent-grid", default="64x64", help="patch tokens HxW of the training images")
    p.add_argument("--dry-run-text-len", type=int, default=256)
    p.add_argument("--dry-run-command", default=None, help="the launch command to print")
    known, rest = p.parse_known_args(list(argv))
    return (known if known.dry_run else None), rest


def diffusers_parameter_count(model_name: str, config) -> Optional[Tuple[str, int]]:
    """(diffusers class, its parameter count) for the registry model, built on meta; None when
    diffusers is not installed."""
    try:
        import diffusers
    except ImportError:
        return None
    arch = dict(family_of_model_name(model_name).config_to_diffusers(config))
    cls = getattr(diffusers, arch.pop("_class_name"))
    with torch.device("meta"):
        reference = cls(**arch)
    return cls.__name__, sum(p.numel() for p in reference.parameters())


def _grid(text: str) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--dry-run-latent-grid {text!r}: expected HxW, e.g. 64x64") from None
    return h, w


def plan_of(cfg: RunConfig, world_size: int, latent_grid: Tuple[int, int], text_len: int) -> MemoryPlanConfig:
    par, tr, obj = cfg.parallel, cfg.train, cfg.objective
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ValueError(f"--dry-run-world-size {world_size} is not a multiple of TP x PP = {tp * pp}")
    dp = world_size // (tp * pp)
    global_batch = tr.global_batch_size or tr.micro_batch_size * dp
    if global_batch % (tr.micro_batch_size * dp):
        raise ValueError(f"--global-batch-size ({global_batch}) must be divisible by --micro-batch-size "
                         f"({tr.micro_batch_size}) x data-parallel size ({dp})")
    params_dtype = cfg.model_overrides.get("params_dtype", "bfloat16" if cfg.optim.bf16 else "float32")
    lora = getattr(cfg, "lora", None)
    return MemoryPlanConfig(
        model=cfg.model, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, data_parallel_size=dp,
        micro_batch_size=tr.micro_batch_size, num_microbatches=global_batch // (tr.micro_batch_size * dp),
        latent_grid=latent_grid, text_len=text_len, objective=obj.objective,
        apex_variant=obj.apex.get("variant", "paper"), teacher=obj.teacher, ema=tr.ema_decay > 0,
        lora_rank=lora.rank if lora is not None else 0, lora_targets=lora.targets if lora is not None else "attn",
        recompute=par.recompute_granularity, distributed_optimizer=par.use_distributed_optimizer,
        params_dtype=params_dtype, sequence_parallel=par.sequence_parallel, fsdp=par.fsdp,
        model_overrides={k: v for k, v in cfg.model_overrides.items() if k != "params_dtype"})


def dry_run(options: argparse.Namespace, training_flags: Sequence[str], world_size: int) -> str:
    cfg = parse_args(list(training_flags))
    world = options.dry_run_world_size or world_size
    plan = plan_of(cfg, world, _grid(options.dry_run_latent_grid), options.dry_run_text_len)
    config = get_model_config(cfg.model, **plan.model_overrides)
    total = count_parameters(config)
    # the architecture diffusers knows: without APEX's second timestep embedder
    arch = count_parameters(config.replace(target_time_embedder=False))
    lines = [f"dry run: {cfg.model} on {world} GPU(s)",
             f"parameters (ours, meta device): {arch:,} + {total - arch:,} APEX extras (target-time embedder, "
             f"learnable condition shift) = {total:,}"]
    reference = diffusers_parameter_count(cfg.model, config)
    if reference is not None:
        name, count = reference
        verdict = "equal" if count == arch else f"DIFFERENT by {arch - count:+,}"
        lines.append(f"parameters (diffusers {name}, meta device): {count:,} -> {verdict}")
    stages = estimate(plan)
    top = peak(stages)
    lines += ["", format_table(plan, stages), "",
              f"peak per GPU: {top.total / GIB:.1f} GiB (stage {top.stage}), plus CUDA context and fragmentation"]
    if options.dry_run_command:
        lines += ["", "launch command:", options.dry_run_command]
    return "\n".join(lines)
