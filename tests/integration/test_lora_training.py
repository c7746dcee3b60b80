"""LoRA through the real training loop (the harness of test_parallel_training.py), and through
the user-facing tools.

1. Parallel runs against single-process runs: TP=2 (both APEX variants, `--lora-fake-reference
   base` too), PP=2 (two-phase step, the base in the teacher's slot), DP=2 with the distributed
   optimizer: the same per-iteration loss, terms and grad norm (5 iterations, 1e-5 relative).
   A LoRA checkpoint (adapters + optimizer + EMA + frozen teacher) resumes bitwise at TP=1 and
   resharded at TP=2.
2. The launcher trains a LoRA (--lora-rank 4) on a base converted from a random diffusers
   Qwen-Image transformer, samples it, and tools/export_lora.py exports it: stock diffusers
   (QwenImagePipeline.load_lora_weights on the base folder, and the merged folder) gives our
   adapted model's velocity (<= 1e-5); the LoRA checkpoint is < 5% of a full run's.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_parallel_training import ITERS, Runs, assert_same_numbers  # the same harness and 1e-5 tolerance

REPO = Path(__file__).resolve().parents[2]
LONG = 10
LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "all", "--lr", "1e-2"]
TP2, PP2, DISTOPT = (["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"],
                     ["--use-distributed-optimizer"])
# resume: the frozen teacher is taken at iteration 2 (APEX start), EMA on, checkpoints at 5 and 10
RESUMABLE = ["--apex-start-iter", "2", "--teacher", "frozen", "--ema-decay", "0.9", "--apex-option",
             "dm_warmup_steps=0"]


class LoRARuns(Runs):
    def lora_job(self, name, variant="released", iters=ITERS, extra=(), checkpoint=False, base=True):
        job = self.job(name, variant, iters, extra=[*LORA, *extra], init=False, checkpoint=checkpoint)
        if base:
            job["argv"] += ["--pretrained-checkpoint", str(self.root / "base")]
        return job


def _trained(metrics):
    losses = [r["loss"] for r in metrics.values()]
    return len(set(losses)) == len(losses) and all(r["grad_norm"] > 0 for r in metrics.values())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process: the base (a full run of 10 iterations: the zero-initialised output head and
    adaLN gates must have moved for the adapters to get gradients well above float32 rounding;
    after 3 iterations the LoRA grad norm is ~1e-3 and TP=2 vs TP=1 differ by ~1e-5 relative in
    it, after 10 ~0.1-1 and ~3e-7), the LoRA references, the two-phase step at PP=1, a
    10-iteration run with checkpoints at 5 and 10 and its resumption from 5."""
    runs = LoRARuns(tmp_path_factory.mktemp("lora_training"))
    jobs = [runs.job("base", iters=10, init=False, checkpoint=True, extra=["--lr", "1e-2"])]
    for v in ("released", "paper"):
        jobs += [runs.lora_job(f"ref_{v}", v), runs.lora_job(f"ref_base_{v}", v, extra=["--lora-fake-reference", "base"])]
    jobs += [runs.lora_job("two_phase_base_paper", "paper",
                           extra=["--lora-fake-reference", "base", "--apex-schedule", "two-phase"]),
             runs.lora_job("long", iters=LONG, extra=[*RESUMABLE, "--save-interval", "5"], checkpoint=True),
             runs.lora_job("resumed", iters=LONG, base=False,
                           extra=[*RESUMABLE, "--load", runs.checkpoint("long", 5)])]
    runs.launch(1, jobs, "single")
    return runs


@pytest.fixture(scope="module")
def two(single):
    runs = single
    jobs = []
    for v in ("released", "paper"):
        jobs += [runs.lora_job(f"tp2_{v}", v, extra=TP2)]
    jobs += [runs.lora_job("tp2_base_released", extra=[*TP2, "--lora-fake-reference", "base"]),
             runs.lora_job("pp2_base_paper", "paper", extra=[*PP2, "--lora-fake-reference", "base"]),
             runs.lora_job("distopt_released", extra=DISTOPT),
             runs.lora_job("tp2_resumed", iters=LONG, base=False,
                           extra=[*TP2, *RESUMABLE, "--load", runs.checkpoint("long", 5)])]
    runs.launch(2, jobs, "two")
    return runs


@pytest.mark.parametrize("variant", ["released", "paper"])
def test_lora_tensor_parallel_matches_single_process(two, variant):
    ref = two.metrics(f"ref_{variant}")
    assert _trained(ref)
    assert_same_numbers(two.metrics(f"tp2_{variant}"), ref)


def test_lora_with_base_fake_reference_under_tp_pp_and_two_phase(two):
    for name, ref in (("tp2_base_released", "ref_base_released"), ("pp2_base_paper", "ref_base_paper"),
                      ("two_phase_base_paper", "ref_base_paper")):
        assert_same_numbers(two.metrics(name), two.metrics(ref))
    # the base answers the fake queries: the numbers differ from the adapted reference's
    for v, term in (("released", "l_dm"), ("paper", "l_mix")):
        adapted, base = two.metrics(f"ref_{v}"), two.metrics(f"ref_base_{v}")
        assert adapted[1][term] == base[1][term]  # iteration 1: B = 0, adapted == base
        assert any(not math.isclose(adapted[i][term], base[i][term], rel_tol=1e-6) for i in range(2, ITERS + 1))


def test_lora_distributed_optimizer_matches_single_process(two):
    assert_same_numbers(two.metrics("distopt_released"), two.metrics("ref_released"))


def test_lora_checkpoint_resumes_bitwise_and_resharded(two):
    straight = two.metrics("long")
    assert sorted(straight) == list(range(1, LONG + 1)) and _trained(straight)
    resumed = two.metrics("resumed")
    assert sorted(resumed) == list(range(ITERS + 1, LONG + 1))
    for it in resumed:
        for key in ("loss", "l_base", "l_fake", "l_dm", "grad_norm"):
            assert resumed[it][key] == straight[it][key], (it, key)  # bitwise: same ops, same order
    assert_same_numbers(two.metrics("tp2_resumed"), straight, range(ITERS + 1, LONG + 1))
    # the checkpoint holds the trainable tensors only, and names its base
    from megatron.core import dist_checkpointing

    keys = dist_checkpointing.load_tensors_metadata(two.checkpoint("long", 5)).keys()
    params = [k for k in keys if k.startswith(("model.", "ema.", "teacher."))]
    assert {k.split(".", 1)[0] for k in params} == {"model", "ema", "teacher"}
    assert all(k.endswith(("lora_A", "lora_B")) or ".target_time_embedder." in k for k in params), params
    state = json.loads(Path(two.checkpoint("long", 5), "train_state.json").read_text())
    assert state["lora"]["base"] == two.checkpoint("base", 10) and state["lora"]["config"]["rank"] == 4


# ============================================================================ launcher + diffusers
_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
TINY_HF = dict(patch_size=4, in_channels=16, out_channels=1, num_layers=4, attention_head_dim=24, num_attention_heads=4,
               joint_attention_dim=384, axes_dims_rope=(8, 8, 8))
TRAIN = ["--model", "qwen-image-tiny", "--micro-batch-size", "8", "--global-batch-size", "8", "--log-interval", "1",
         "--no-progress", "--lr", "1e-2", "--lr-warmup-iters", "0", "--apex-start-iter", "1",
         "--apex-option", "dm_warmup_steps=0", "--ema-decay", "0.5", "--save-interval", "1000"]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}


def _run(cmd, env=None, expect=0):
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**_env(), **(env or {})}, cwd=REPO, timeout=900)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    pytest.importorskip("peft")  # diffusers' LoRA loading runs on PEFT
    from diffusers import QwenImageTransformer2DModel

    from megatron_apex.conversion.random_weights import randomize_weights_

    root = tmp_path_factory.mktemp("lora_launcher")
    hf_base = root / "hf_base"
    torch.manual_seed(0)
    randomize_weights_(QwenImageTransformer2DModel(**TINY_HF), 1).save_pretrained(hf_base)
    _run([sys.executable, "tools/convert_hf.py", "import", "--model", "qwen-image", "--hf-path", str(hf_base),
          "--save", str(root / "base")])
    lora_run, full_run = root / "lora_run", root / "full_run"
    launcher = _run(["bash", "examples/pretrain_apex_dit.sh", *TRAIN, "--train-iters", "3", "--save", str(lora_run),
                     "--lora-rank", "4", "--pretrained-checkpoint", str(root / "base")],
                    env={"PYTHON": sys.executable, "MASTER_PORT": str(_free_port()), "NUM_PER_PROMPT": "2", "NPROC_PER_NODE": "1",
                         "SKIP_EVAL": "1"})
    # the same job, full-parameter (same objective, optimizer, EMA and frozen teacher)
    _run(["bash", "examples/pretrain_apex_dit.sh", *TRAIN, "--train-iters", "3", "--save", str(full_run),
          "--load", str(root / "base"), "--finetune"],
         env={"PYTHON": sys.executable, "MASTER_PORT": str(_free_port()), "SKIP_SAMPLES": "1", "NPROC_PER_NODE": "1"})
    _run([sys.executable, "tools/export_lora.py", "--load", str(lora_run), "--out", str(root / "lora_out")])
    _run([sys.executable, "tools/export_lora.py", "--load", str(lora_run), "--out", str(root / "merged"), "--merged"])
    return root, launcher


def _free_port():
    from dist_utils import free_port

    return free_port()


def _velocity_inputs(batch=3):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, 1, 28, 28, generator=g)
    t = torch.rand(batch, generator=g)
    ctx = torch.randn(batch, 6, 384, generator=g)
    mask = torch.ones(batch, 6)
    mask[1, 3:] = 0
    return x, t, ctx, mask


def test_launcher_lora_matches_stock_diffusers_and_is_small(launched):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    from megatron_apex.conversion.checkpoint_io import get_family
    from megatron_apex.inference.loading import load_model_for_inference

    root, launcher = launched
    assert "LoRA: " in launcher.stdout and "trainable of" in launcher.stdout  # the start-up summary
    metrics = [json.loads(line) for line in open(root / "lora_run" / "metrics.jsonl")]
    assert [r["iteration"] for r in metrics] == [1, 2, 3] and "l_dm" in metrics[-1]
    npz = np.load(root / "lora_run" / "samples_nfe1.npz")
    assert npz["images"].shape == (10 * 2, 28, 28, 1)

    # 3. the LoRA checkpoint is small next to a full run's (same optimizer state, EMA and teacher)
    lora_size, full_size = _size(root / "lora_run" / "iter_0000003"), _size(root / "full_run" / "iter_0000003")
    for run in ("lora_run", "full_run"):
        state = json.loads((root / run / "iter_0000003" / "train_state.json").read_text())
        assert state["has_ema"] and state["has_teacher"], run
    print(f"checkpoint sizes: LoRA {lora_size} B, full {full_size} B ({100 * lora_size / full_size:.2f}%)")
    assert lora_size < 0.05 * full_size

    ours, state = load_model_for_inference(str(root / "lora_run"))
    assert state["weights"] == "ema" and state["lora_base"] == str(root / "base" / "iter_0000000")
    family = get_family("qwen-image")
    inputs = _velocity_inputs()
    with torch.no_grad():
        mine = ours(*inputs)
        base = QwenImageTransformer2DModel.from_pretrained(root / "hf_base").eval()
        before = family.reference_forward(base, ours.model_config, *inputs)
        pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                 tokenizer=None, transformer=base)
        pipe.load_lora_weights(str(root / "lora_out"))
        with_lora = family.reference_forward(pipe.transformer, ours.model_config, *inputs)
        merged = QwenImageTransformer2DModel.from_pretrained(root / "merged").eval()
        from_merged = family.reference_forward(merged, ours.model_config, *inputs)
    scale = mine.abs().max().item()
    print(f"LoRA effect {(mine - before).abs().max().item():.3e}, scale {scale:.3e}; diffusers+LoRA diff "
          f"{(mine - with_lora).abs().max().item():.3e}, merged diff {(mine - from_merged).abs().max().item():.3e}")
    assert (mine - before).abs().max().item() > 1e-3  # training moved the adapters
    assert (mine - with_lora).abs().max().item() <= 1e-5
    assert (mine - from_merged).abs().max().item() <= 1e-5
