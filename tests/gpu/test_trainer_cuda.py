"""The training loop and the sampler on the GPU: batches drawn on the host reach the device,
APEX (released, with caption dropout and the CFG-enhanced target) trains in bf16, and a
checkpoint samples on the device to the same images as on the host (bf16 tolerance); the
optimizer is megatron's FusedAdam, or torch's AdamW running its fused kernel.

It trains on tests/data/gpu_check_fashion (tools/make_gpu_check_data.py): captions and the
empty prompt already encoded, so the GPU machine needs neither the MiniLM encoder nor
Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parents[1] / "data" / "gpu_check_fashion"

FLAGS = ["--model", "qwen-image-tiny", "--num-layers", "2", "--micro-batch-size", "8", "--global-batch-size", "16",
         "--lr-warmup-iters", "0", "--log-interval", "1", "--no-progress", "--train-iters", "4", "--save-interval", "4",
         "--objective", "apex", "--apex-variant", "released", "--apex-start-iter", "2", "--teacher", "frozen",
         "--apex-option", "cfg_scale=0.5", "--caption-dropout", "0.2", "--ema-decay", "0.9", "--data-path", str(DATA)]


def test_apex_trains_and_samples_on_the_device(tmp_path, device, monkeypatch):
    import json

    from megatron_apex.inference.loading import load_model_for_inference
    from megatron_apex.inference.samplers import sample_seeded
    from megatron_apex.training.arguments import parse_args
    from megatron_apex.training.loop import Trainer

    monkeypatch.setenv("MEGATRON_APEX_CACHE", str(tmp_path / "cache"))  # the dataset's memo
    bf16 = ["--bf16"] if device.type == "cuda" else []
    trainer = Trainer(parse_args([*FLAGS, *bf16, "--save", str(tmp_path / "run")]))
    assert {p.device.type for p in trainer.model.parameters()} == {device.type}
    fused_calls = _expect_fused_adam(trainer, device, monkeypatch)
    batches = trainer.micro_batches(list(range(16)))
    assert {v.device.type for b in batches for v in b.values() if torch.is_tensor(v)} == {device.type}
    trainer.train()
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in records)
    assert "l_dm" in records[-1] and "l_fm" in records[0]  # flow matching, then APEX
    if fused_calls is not None:  # torch's AdamW: its fused kernel ran the steps on CUDA only
        assert bool(fused_calls) == (device.type == "cuda")

    model, _ = load_model_for_inference(str(tmp_path / "run"))
    host, _ = load_model_for_inference(str(tmp_path / "run"), dtype=torch.float32)
    context = torch.randn(6, 16, 384, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(6, 16, dtype=torch.bool)
    ours = sample_seeded(model, context, mask, (1, 28, 28), nfe=2, seed=3)
    ref = sample_seeded(host.cpu(), context, mask, (1, 28, 28), nfe=2, seed=3)
    assert ours.device.type == "cpu" and ours.shape == (6, 1, 28, 28)
    assert (ours - ref).norm() / ref.norm() < 0.05


def _expect_fused_adam(trainer, device, monkeypatch):
    """megatron's Adam: TE's or apex's FusedAdam where one imports; otherwise torch's AdamW,
    which must run torch's fused kernel on CUDA (and not on the CPU). Returns the list the
    fused kernel's calls are counted in (None when megatron's FusedAdam trains)."""
    import megatron.core.optimizer as mopt

    from megatron_apex import gpu

    name = gpu.adam_class_name(trainer.optimizer)
    if not mopt.USING_PYTORCH_OPTIMIZER:
        assert "FusedAdam" in name, name
        return None
    assert name.endswith("(fused)") == (device.type == "cuda"), name
    calls = []
    kernel = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    return calls

