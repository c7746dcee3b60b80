"""Transformer Engine layers (the te spec) compute what the local layers compute, at float32
and bf16, on the same weights; each of TE's attention kernels honours prompts padded to
different lengths; FP8 (hybrid, delayed scaling) forward and backward run on an FP8-capable GPU
and stay near bf16; the trainer's two-phase APEX step runs in FP8."""

from __future__ import annotations

import importlib

import pytest
import torch
from _gpu_helpers import FAMILIES, forward_backward, inputs, model_for, options, rel

from megatron_apex import gpu


@pytest.fixture(autouse=True)
def transformer_engine(device):
    if device.type != "cuda":
        pytest.skip("Transformer Engine runs only on CUDA")
    reason = gpu.transformer_engine_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("name", FAMILIES)
# float32: TE's GEMMs may run in TF32 (10-bit mantissa); a wrong weight layout is O(1) off.
@pytest.mark.parametrize("bf16,tol", [(False, 1e-2), (True, 0.03)])
def test_te_layers_match_local_layers(name, bf16, tol, device):
    config, local = model_for(name, options(transformer_impl="local", bf16=bf16), seed=6, device=device)
    _, te = model_for(name, options(transformer_impl="transformer_engine", attention_backend="auto", bf16=bf16),
                      state=local.state_dict(), device=device)
    assert any(type(m).__name__.startswith("TE") for m in te.modules())
    x, t, ctx, mask = inputs(config, device)
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    for m in (None, mask):
        out, grads = forward_backward(te, x, t, ctx, m, weight)
        ref, ref_grads = forward_backward(local, x, t, ctx, m, weight)
        assert rel(out, ref) < tol, m is None
        flat = torch.cat([grads[k].float().flatten() for k in sorted(grads)])
        ref_flat = torch.cat([ref_grads[k].float().flatten() for k in sorted(ref_grads)])
        assert rel(flat, ref_flat) < 2 * tol, m is None


def forget_te_attention_backend():
    """TE caches its kernel choice per attention signature (not per NVTE_* value): drop it so the
    next call chooses under the current environment."""
    for module_name in ("transformer_engine.pytorch.attention.dot_product_attention.dot_product_attention",
                        "transformer_engine.pytorch.attention"):
        try:
            backends = getattr(importlib.import_module(module_name), "_attention_backends", None)
        except ImportError:
            continue
        if isinstance(backends, dict):
            backends["attention_params"] = None
            backends["backend_selection_requires_update"] = True


# valid text tokens per sample: all, some, one, none (an all-padded prompt)
PADDED_LENGTHS = (8, 5, 1, 0)


@pytest.mark.parametrize("kernel", ["fused", "flash", "unfused"])
def test_te_attention_with_padded_prompts_matches_the_masked_math_reference(kernel, device, monkeypatch):
    """Qwen-Image on TE's DotProductAttention forced onto one kernel (bf16) against the float32
    local model on SDPA's math kernel with the explicit mask, per sample. TE's cuDNN ``fused``
    kernel reads the padding mask as per-sample lengths (valid tokens first): it agrees only
    because the joint sequence puts the text padding last (docs/gpu.md)."""
    if kernel == "flash" and gpu.flash_attn_module() is None:
        pytest.skip("TE's flash kernel needs the flash-attn package")
    for name, value in gpu._TE_ATTENTION_ENV[kernel].items():
        monkeypatch.setenv(name, value)  # restored after the test; layer_spec then finds no conflict
    forget_te_attention_backend()
    config, reference = model_for("qwen-image-tiny", options(transformer_impl="local", attention_backend="unfused"),
                                  seed=8, device=device)
    _, te = model_for("qwen-image-tiny", options(transformer_impl="transformer_engine", attention_backend=kernel,
                                                 bf16=True), state=reference.state_dict(), device=device)
    assert type(te.layers[0].attention.core_attention).__name__ == "TEDotProductAttention"
    x, t, ctx, _ = inputs(config, device, batch=len(PADDED_LENGTHS), text=8)
    mask = (torch.arange(8)[None, :] < torch.tensor(PADDED_LENGTHS)[:, None]).to(device)
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    out, grads = forward_backward(te, x, t, ctx, mask, weight)
    ref, ref_grads = forward_backward(reference, x, t, ctx, mask, weight)
    forget_te_attention_backend()
    for i, valid in enumerate(PADDED_LENGTHS):
        assert rel(out[i], ref[i]) < 0.03, f"sample {i} ({valid} valid text tokens)"
    flat = torch.cat([grads[k].float().flatten() for k in sorted(grads)])
    ref_flat = torch.cat([ref_grads[k].float().flatten() for k in sorted(ref_grads)])
    assert rel(flat, ref_flat) < 0.06


@pytest.mark.parametrize("name", FAMILIES)
def test_fp8_forward_backward_runs(name, device):
    if tuple(torch.cuda.get_device_capability()) < (8, 9):
        pytest.skip(f"FP8 needs compute capability >= 8.9, this GPU is {torch.cuda.get_device_capability()}")
    fp8 = options(transformer_impl="transformer_engine", attention_backend="auto", fp8_format="hybrid", bf16=True)
    config, bf16 = model_for(name, options(transformer_impl="transformer_engine", bf16=True), seed=7, device=device)
    _, model = model_for(name, fp8, state=bf16.state_dict(), device=device)
    x, t, ctx, mask = inputs(config, device)
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    ref, _ = forward_backward(bf16, x, t, ctx, mask, weight)
    for _ in range(3):  # delayed scaling: the amax history fills over the first iterations
        out, grads = forward_backward(model, x, t, ctx, mask, weight, context=gpu.fp8_context(fp8, model))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert rel(out, ref) < 0.15  # e4m3 keeps 3 mantissa bits


def test_two_phase_apex_step_trains_in_fp8(tmp_path, device, monkeypatch):
    """The two-phase step (what pipeline parallelism runs, here on one stage) with --fp8-format
    hybrid: every forward, the frozen teacher's and the no-grad queries' included, inside TE's
    fp8_autocast; finite losses and gradients over steps whose FP8 weights are re-quantized
    after every update."""
    import json
    from pathlib import Path

    import numpy as np

    from megatron_apex.training.arguments import parse_args
    from megatron_apex.training.loop import Trainer

    if tuple(torch.cuda.get_device_capability()) < (8, 9):
        pytest.skip(f"FP8 needs compute capability >= 8.9, this GPU is {torch.cuda.get_device_capability()}")
    data = Path(__file__).resolve().parents[1] / "data" / "gpu_check_fashion"
    monkeypatch.setenv("MEGATRON_APEX_CACHE", str(tmp_path / "cache"))
    # 28 x 28 latents in 4 x 4 patches: 49 image and 16 text tokens; 8 samples per micro-batch
    # keep every FP8 GEMM's rows a multiple of 8
    trainer = Trainer(parse_args([
        "--model", "qwen-image-tiny", "--num-layers", "2", "--micro-batch-size", "8", "--global-batch-size", "16",
        "--lr-warmup-iters", "0", "--log-interval", "1", "--no-progress", "--train-iters", "3",
        "--objective", "apex", "--apex-variant", "released", "--apex-start-iter", "0", "--teacher", "frozen",
        "--apex-option", "w_dm=1.0", "--apex-option", "dm_warmup_steps=0", "--apex-schedule", "two-phase",
        "--transformer-impl", "transformer_engine", "--fp8-format", "hybrid", "--bf16", "--ema-decay", "0",
        "--data-path", str(data), "--save", str(tmp_path / "run")]))
    assert trainer.two_phase and trainer.cfg.gpu.fp8_format == "hybrid"
    trainer.train()
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in records)
    assert "l_dm" in records[-1]
    # TE's modules record whether their last forward ran in FP8
    for model in (trainer.model, trainer.teacher):
        assert any(getattr(m, "fp8", False) for m in model.modules())

