"""tools/estimate_memory.py against the real objects and the allocator's measured peak.

The estimate runs in its own process (it builds a fake process group); the real objects are
the training loop's own (Trainer: megatron DDP grad buffers, megatron optimizer state)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model", "qwen-image-tiny", "--params-dtype", "float32", "--latent-grid", "7x7", "--text-len", "16"]


def run_estimate(*args):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "estimate_memory.py"), "--json", *args],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """A real released-APEX step of the launcher on the tiny model, batch 16, one step taken
    (so Adam's state exists)."""
    from megatron_apex.training.arguments import parse_args
    from megatron_apex.training.loop import Trainer

    tr = Trainer(parse_args(["--model", "qwen-image-tiny", "--objective", "apex", "--apex-variant", "released",
                             "--apex-start-iter", "0", "--apex-option", "w_dm=1.0", "--micro-batch-size", "16",
                             "--global-batch-size", "16", "--train-iters", "100", "--no-progress"]))
    tr.train_step()
    return tr


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def test_state_bytes_equal_the_real_objects(trainer):
    (stage,) = run_estimate(*TINY, "--micro-batch-size", "16", "--no-use-distributed-optimizer")
    assert stage["weights"] == _nbytes(trainer.model.parameters())
    grad_buffers = [buf.grad_data for buf in trainer.ddp_model.buffers]
    assert stage["grads"] == _nbytes(grad_buffers)
    states = [v for s in trainer.optimizer.optimizer.state.values() for v in s.values()
              if isinstance(v, torch.Tensor) and v.dim() > 0]
    assert stage["optimizer"] == _nbytes(states)
    # released APEX keeps a frozen teacher
    assert trainer.teacher is not None and stage["copies"] == _nbytes(trainer.teacher.parameters())


def measured_step_peak(trainer) -> int:
    """The CPU allocator's peak above the start of one training step (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train_step()
    # allocations are charged to the op that made them, frees are "[memory]" events
    events = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                    for e in prof.events())
    running = top = 0
    for _, delta in events:
        running += delta
        top = max(top, running)
    return top


def test_activations_within_20_percent_of_the_measured_peak(trainer):
    (stage,) = run_estimate(*TINY, "--micro-batch-size", "16")
    measured = measured_step_peak(trainer)
    assert abs(stage["activations"] - measured) <= 0.2 * measured, (stage["activations"], measured)


def test_pipeline_stages_hold_the_whole_model():
    from megatron_apex.families import count_parameters, get_model_config

    stages = run_estimate("--model", "qwen-image-tiny", "--pp", "2", "--dp", "2", "--latent-grid", "7x7",
                          "--text-len", "16")
    assert [s["stage"] for s in stages] == [0, 1]
    assert sum(s["parameters"] for s in stages) == count_parameters(get_model_config("qwen-image-tiny"))
    # bf16 weights, fp32 main grads, Adam moments + fp32 master weights split over 2 DP ranks
    for s in stages:
        assert s["weights"] == 2 * s["parameters"] and s["grads"] == 4 * s["trainable"]
        assert s["optimizer"] == 12 * s["trainable"] // 2


def test_tensor_parallel_rank_holds_its_shards():
    """Per-rank parameters at TP=2 = the replicated ones + half of the TP-split ones, counted
    independently on a TP=1 meta model through megatron's tensor_model_parallel marks."""
    from megatron.core import parallel_state

    from megatron_apex.families import build_model, get_model_config

    (stage,) = run_estimate("--model", "qwen-image-tiny", "--tp", "2", "--latent-grid", "7x7", "--text-len", "16")
    if not parallel_state.model_parallel_is_initialized():
        from megatron_apex.parallel import init_distributed

        init_distributed(1, 1)
    with torch.device("meta"):
        model = build_model(get_model_config("qwen-image-tiny"), backend="local")
    split = sum(p.numel() for p in model.parameters() if getattr(p, "tensor_model_parallel", False))
    whole = sum(p.numel() for p in model.parameters())
    assert stage["parameters"] == whole - split // 2


LAYER_TRACES = """
import json
from megatron_apex.training.memory_estimate import MemoryPlanConfig, layer_activation_bytes
out = {}
for name, tp, sp in (("tp1", 1, False), ("tp2", 2, False), ("tp2_sp", 2, True)):
    plan = MemoryPlanConfig(model="qwen-image-tiny", tensor_model_parallel_size=tp, sequence_parallel=sp,
                            micro_batch_size=4, latent_grid=(8, 8), text_len=16, params_dtype="float32").validate()
    out[name] = layer_activation_bytes(plan)[0]
print(json.dumps(out))
"""


def test_sequence_parallel_divides_a_layers_activations_by_tp():
    """Megatron's accounting: TP alone splits only what lies between a layer's parallel linears
    (heads, MLP channels); sequence parallelism splits the rest along the tokens, so a TP=2 + SP
    rank keeps half of what one process keeps per layer (traced on the model built with it)."""
    proc = subprocess.run([sys.executable, "-c", LAYER_TRACES], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    per_layer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert per_layer["tp2"] > 0.6 * per_layer["tp1"]
    assert abs(2 * per_layer["tp2_sp"] - per_layer["tp1"]) <= 0.02 * per_layer["tp1"], per_layer


@pytest.mark.parametrize("args, needles", [
    (["--sequence-parallel"], ["--sequence-parallel", "--tensor-model-parallel-size > 1"]),
    (["--model", "sana-tiny", "--tp", "2", "--sequence-parallel"], ["--sequence-parallel", "Sana"]),
    (["--lora-rank", "4", "--search", "--gpus", "2", "--sequence-parallel"], ["--sequence-parallel", "--lora-rank"]),
])
def test_sequence_parallel_refusals_name_the_flags(args, needles):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "estimate_memory.py"), "--model", "qwen-image-tiny",
                           *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert all(needle in errors[0] for needle in needles), errors[0]
