"""The memory planner's FSDP layouts (tools/estimate_memory.py --fsdp, --search). What an FSDP
rank really holds is compared with the planner in tests/integration/test_fsdp_training.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model", "qwen-image-tiny-test", "--params-dtype", "float32", "--latent-grid", "4x4", "--text-len", "4"]


def run_tool(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "estimate_memory.py"), *args], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


@pytest.mark.parametrize("shape", [(7, 3), (8,), (2, 16), (1, 5), (6, 2, 2), (5,)])
@pytest.mark.parametrize("dp", [1, 2, 4, 16])
def test_rank0_shard_is_the_first_chunk_fsdp_makes(shape, dp):
    from megatron_apex.training.memory_estimate import _fsdp_shard

    tensor = torch.empty(shape)
    # FSDP2 shards dim 0 with torch.chunk; data-parallel rank 0 holds the first chunk
    assert _fsdp_shard(tensor, dp) == torch.chunk(tensor, dp, dim=0)[0].numel()


@pytest.mark.parametrize("args, flag", [(["--tp", "2"], "--tensor-model-parallel-size 2"),
                                        (["--pp", "2"], "--pipeline-model-parallel-size 2"),
                                        (["--lora-rank", "4"], "--lora-rank 4"),
                                        (["--lora-rank", "4", "--search", "--gpus", "2"], "--lora-rank 4")])
def test_fsdp_with_model_parallelism_or_lora_is_refused_in_one_line(args, flag):
    proc = run_tool(*TINY, "--fsdp", *args)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"--fsdp cannot run with {flag}" in errors[0], errors[0]


def test_search_tries_fsdp_at_tp1_pp1_after_plain_data_parallelism():
    proc = run_tool(*TINY, "--search", "--gpus", "2", "--gpu-memory", "1000")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| ") and line[2].isdigit() and line.count("|") == 9]
    layouts = [(int(r[0]), int(r[1]), int(r[2]), r[3]) for r in rows]
    # every layout of 2 GPUs fits this budget; FSDP only at TP = PP = 1, after plain DP there
    assert layouts == [(1, 1, 2, "no"), (1, 1, 2, "yes"), (2, 1, 1, "no"), (1, 2, 1, "no")], proc.stdout
    assert "FSDP gathers GiB" not in proc.stdout  # the detail table is the first (plain) layout's


def test_benchmark_counts_the_state_a_rank_holds(tmp_path):
    """tools/benchmark_parallel.py's held state of one process after a released-APEX step: fp32
    weights, DDP's fp32 grad buffer, Adam's two moments and the frozen teacher, 5 model sizes."""
    import importlib.util

    from megatron_apex.families import count_parameters, get_model_config
    from megatron_apex.training.arguments import parse_args
    from megatron_apex.training.loop import Trainer

    spec = importlib.util.spec_from_file_location("benchmark_parallel", REPO / "tools" / "benchmark_parallel.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    trainer = Trainer(parse_args(["--model", "qwen-image-tiny", "--apex-variant", "released", "--micro-batch-size",
                                  "2", "--global-batch-size", "2", "--train-iters", "2", "--no-progress"]))
    trainer.train_step()
    assert trainer.teacher is not None and trainer.ema is None
    assert bench.held_state_bytes(trainer) == 5 * 4 * count_parameters(get_model_config("qwen-image-tiny"))


def test_a_recipes_dry_run_plans_its_fsdp():
    from megatron_apex.training.arguments import parse_args
    from megatron_apex.training.dry_run import plan_of

    flags = ["--model", "qwen-image-20b", "--micro-batch-size", "1", "--bf16"]
    assert plan_of(parse_args([*flags, "--fsdp"]), 16, (64, 64), 256).fsdp
    assert not plan_of(parse_args(flags), 16, (64, 64), 256).fsdp
