"""The measuring half of the GPU check (tools/gpu_check.sh runs it after ``pytest tests/gpu``):
one markdown table of what a lent GPU can tell us, every part under its own time limit.

    python tools/gpu_check.py                        # the table on stdout, $OUT/gpu_check.{md,json}
    python tools/gpu_check.py --quick                # fewer timed iterations
    python tools/gpu_check.py --parts parity,step    # some parts only
    python tools/gpu_check.py --smoke                # tiny widths, runs on a CPU (checks this script only)

Parts, in the order they run (the most wanted first, so a short budget cuts the least):
  parity      our Qwen-Image (local layers) against diffusers' on the same random weights,
              qwen-image-20b widths (24 heads x 128, text 3584), 2 layers, batch 2 x (1024 image +
              64 text tokens, 64 and 40 real): float32 output and one gradient (block 1's output
              projection) against diffusers' float32; bf16 of both against that same float32.
  attention   padded prompts at the full size, 2 layers, batch 2 x (4096 + 256, 96 and 219 real):
              every attention kernel the machine has (SDPA flash, whose masked calls run on the
              memory-efficient kernel; SDPA cuDNN / memory-efficient; flash-attn varlen;
              Transformer Engine's DotProductAttention) against SDPA's math kernel on the same bf16
              weights, and the padded text states replaced by noise must leave the output alone.
  step        whole training steps of the launcher's Trainer (data, forward, backward, megatron's
              optimizer, EMA) on qwen-image-20b widths, 4 layers, batch 2 x (4096 + 256), bf16, over
              a synthetic latent dataset written at the start: flow matching and the APEX variants
              of tools/benchmark_step.py (paper; released as the launcher runs it, frozen teacher;
              released with batch_split=0.5). Step time, APEX / FM ratio, MFU of the FM step, peak
              memory against megatron_apex/training/memory_estimate.py's plan of the same step;
              and diffusers' model taking the same flow-matching step (loss, clipping to 1.0, AdamW
              on fp32 master weights, as megatron's optimizer keeps them).
  throughput  forward + backward of the same 4-layer stack for every GPU path this machine has
              (local SDPA, SDPA flash, flash-attn, Transformer Engine, TE + FP8 hybrid) and
              diffusers' model.
  sana        forward + backward of a sana-0.6b-width stack (8 layers, batch 8 x (1024 + 300)).

Model FLOPs (``*_forward_flops``) count every matrix multiply and convolution of the forward,
2 per multiply-add, attention included (QK^T and PV: 4 b s_q s_kv h d) and nothing elementwise;
a training step is 3x the forward (backward = 2 forwards; the attention recompute inside
flash kernels is not model FLOPs). tests/unit/test_gpu_paths.py checks the formulas against
torch's FlopCounterMode. MFU = step FLOPs / step time / the GPU's dense bf16 peak
(``PEAK_BF16_TFLOPS``, spec sheets, without sparsity).

Each part runs under SIGALRM with min(its own limit, what is left of --budget-s); a part that
fails or runs out of time leaves an error row and the next part runs. The table and the JSON
are rewritten after every part, so a run killed from outside still leaves what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core peaks, TFLOP/s (vendor spec sheets, no sparsity); first match wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
)

PARTS = ("parity", "attention", "step", "throughput", "sana")
# seconds each part may take at most (the budget left may cut it shorter)
PART_LIMIT_S = {"parity": 60, "attention": 60, "step": 150, "throughput": 90, "sana": 45}
# limits of the pass / fail rows (the other rows are measurements)
FP32_PARITY_TOL = 1e-4     # same math in float32 (tests/gpu/test_diffusers_parity_cuda.py)
BF16_OUTPUT_TOL = 0.03     # bf16 against float32 (tests/gpu/test_bf16_cuda.py)
BF16_GRAD_TOL = 0.06
KERNEL_TOL = 0.02          # two bf16 attention kernels of the same math
PAD_LEAK_TOL = 1e-3        # noise in the padded text states must not reach the output
MEMORY_ESTIMATE_TOL = 0.15  # measured peak within 15% of the planner's estimate


def peak_bf16_flops(device_name: str) -> Optional[float]:
    """Dense bf16 peak (FLOP/s) of a GPU from its name; None when the table has no entry."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None


# ---------------------------------------------------------------------------------- FLOPs
def qwen_image_forward_flops(config, batch: int, grid_h: int, grid_w: int, text_len: int) -> int:
    """Matmul FLOPs of one QwenImageModel forward (no fake condition)."""
    b, n, l = batch, grid_h * grid_w, text_len
    d = config.hidden_size
    s = n + l
    ffn = config.mlp_ratio * d
    t = config.timestep_channels
    embed = 2 * b * n * config.in_channels * d + 2 * b * l * config.joint_attention_dim * d
    embedders = 2 if config.target_time_embedder else 1
    embed += embedders * 2 * b * (t * d + d * d)
    per_layer = (
        2 * 2 * b * d * 6 * d  # img / txt modulation
        + 2 * b * s * d * 3 * d  # fused QKV, both streams
        + 4 * b * s * s * d  # QK^T and PV over the joint sequence
        + 2 * b * s * d * d  # output projections
        + 2 * 2 * b * s * d * ffn  # MLP fc1 + fc2
    )
    head = 2 * b * d * 2 * d + 2 * b * n * d * config.patch_size ** 2 * config.out_channels
    return embed + config.num_layers * per_layer + head


def sana_forward_flops(config, batch: int, grid_h: int, grid_w: int, text_len: int) -> int:
    """Matmul and convolution FLOPs of one SanaModel forward (no fake condition). The ReLU
    linear attention is counted as implemented: per head 4 n d (d + 1) (the ones row that
    yields the normaliser)."""
    b, n, l = batch, grid_h * grid_w, text_len
    d = config.hidden_size
    head_dim = config.attention_head_dim
    x = config.cross_attention_inner_dim
    ffn = config.ffn_hidden_size
    t = config.timestep_channels
    p = config.patch_size
    embed = 2 * b * n * config.in_channels * p * p * d  # patch conv
    embed += 2 * b * l * (config.caption_channels * d + d * d)  # caption projection
    embedders = 2 if config.target_time_embedder else 1
    embed += embedders * 2 * b * (t * d + d * d) + 2 * b * d * 6 * d  # time embedders, adaLN-single
    per_layer = (
        2 * b * n * d * 3 * d  # QKV
        + 4 * b * n * config.num_attention_heads * head_dim * (head_dim + 1)  # linear attention
        + 2 * b * n * d * d  # projection
        + 2 * b * n * d * x + 2 * 2 * b * l * d * x  # cross q, k, v
        + 4 * b * n * l * x  # cross QK^T and PV
        + 2 * b * n * x * d  # cross projection
        + 2 * b * n * d * 2 * ffn + 2 * b * n * 2 * ffn * 9 + 2 * b * n * ffn * d  # GLUMBConv
    )
    head = 2 * b * n * d * p * p * config.out_channels
    return embed + config.num_layers * per_layer + head


# ---------------------------------------------------------------------------------- report
class Context:
    """What every part needs to know about this run (a plain class: tests load this file without
    registering it as a module, which a dataclass would need)."""

    def __init__(self, device, cuda: bool, smoke: bool, quick: bool, peak: Optional[float], no_diffusers: bool):
        self.device, self.cuda, self.smoke, self.quick = device, cuda, smoke, quick
        self.peak, self.no_diffusers = peak, no_diffusers


class Report:
    """Rows of the one table (part, check, result, verdict); written after every part."""

    def __init__(self, out: str, header: str, print_table: bool):
        self.out, self.header, self.print_table = out, header, print_table
        self.rows: List[Dict] = []
        self.parts: Dict[str, Dict] = {}

    def add(self, part: str, check: str, result: str, verdict: str = "", **values) -> None:
        row = dict(part=part, check=check, result=result, verdict=verdict, **values)
        self.rows.append(row)
        print(json.dumps(row, default=str), file=sys.stderr, flush=True)

    def failed(self) -> bool:
        return any(r["verdict"].startswith(("FAIL", "error")) for r in self.rows)

    def markdown(self) -> str:
        lines = [self.header, "", "| part | check | result | verdict |", "|---|---|---|---|"]
        for r in self.rows:
            cells = [str(r[k]).replace("|", "\\|").replace("\n", " ") for k in ("part", "check", "result", "verdict")]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def write(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        blob = json.dumps({"header": self.header, "parts": self.parts, "rows": self.rows}, indent=1, default=str)
        for name, text in (("gpu_check.md", self.markdown()), ("gpu_check.json", blob)):
            path = os.path.join(self.out, name)
            with open(path + ".tmp", "w") as f:
                f.write(text + "\n")
            os.replace(path + ".tmp", path)


def verdict(ok: bool, limit: str) -> str:
    return "ok" if ok else f"FAIL (limit {limit})"


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise PartTimeout in the main thread after ``seconds`` (SIGALRM; a CUDA call in flight
    finishes first)."""
    def on_alarm(signum, frame):
        raise PartTimeout(f"ran past its {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except RuntimeError as exc:  # a broken CUDA context: the parts after fail on their own, with rows
            print(f"gpu_check.py: releasing GPU memory failed: {error_text(exc)}", file=sys.stderr, flush=True)


def error_text(exc: BaseException) -> str:
    first = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


# ---------------------------------------------------------------------------------- helpers
def time_steps(step: Callable, device, iters: int, warmup: int) -> float:
    """Mean seconds per call after ``warmup`` untimed calls."""
    import torch

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def randomize_(model, seed: int):
    """megatron_apex.conversion.random_weights' scales (norm weights 1 + 0.2 N(0, 1), the rest
    N(0, 1) / sqrt(fan-in)), drawn on the model's device: a CPU takes seconds per billion."""
    import torch

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32)
            if name.endswith("norm.weight") or ".norm_" in name:
                r = 1 + 0.2 * r
            else:
                r /= (p.shape[-1] if p.dim() == 2 else 4.0) ** 0.5
            p.copy_(r)
    return model


def rel(a, ref) -> float:
    a, ref = a.detach().float(), ref.detach().float()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def text_mask(batch: int, text: int, lengths=None):
    """[b, text] float mask: sample i keeps lengths[i] tokens (default text - 37 i, at least 1)."""
    import torch

    mask = torch.zeros(batch, text)
    for i in range(batch):
        keep = lengths[i] if lengths else max(1, text - 37 * i)
        mask[i, :keep] = 1
    return mask


def diffusers_arch(config) -> Dict:
    """diffusers' QwenImageTransformer2DModel arguments of our config."""
    c = config
    return dict(patch_size=c.patch_size, in_channels=c.in_channels, out_channels=c.out_channels,
                num_layers=c.num_layers, attention_head_dim=c.attention_head_dim,
                num_attention_heads=c.num_attention_heads, joint_attention_dim=c.joint_attention_dim,
                axes_dims_rope=tuple(c.axes_dims_rope))


def diffusers_qwen_image(ctx: Context):
    """diffusers' QwenImageTransformer2DModel class, or None (a skipped row says why)."""
    if ctx.no_diffusers:
        return None
    try:
        from diffusers import QwenImageTransformer2DModel
    except ImportError:
        return None
    return QwenImageTransformer2DModel


class DiffusersContract:
    """diffusers' model behind our model contract model(x_t, t, context, context_mask)."""

    def __init__(self, model, patch_size: int, dtype):
        self.model, self.p, self.dtype = model, patch_size, dtype

    def __call__(self, x_t, t, context, context_mask=None, fake_condition=False, t_target=None):
        from megatron_apex.models.qwen_image.model import pack_latents, unpack_latents

        b, _, h, w = x_t.shape
        out = self.model(hidden_states=pack_latents(x_t.to(self.dtype), self.p),
                         encoder_hidden_states=context.to(self.dtype), encoder_hidden_states_mask=context_mask,
                         timestep=t, img_shapes=[(1, h // self.p, w // self.p)] * b, return_dict=False)[0]
        return unpack_latents(out, h, w, self.p)


def gpu_options(**fields):
    from megatron_apex import gpu

    return gpu.resolve_gpu_options(gpu.GpuOptions(**fields))


def build_ours(config, options, device):
    """Our model for ``options`` (resolved GpuOptions), no init (the caller sets the weights)."""
    from megatron_apex import gpu
    from megatron_apex.families import build_model, layer_spec

    config = config.replace(perform_initialization=False, **gpu.model_overrides(options))
    return build_model(config, spec=layer_spec(config, options)).to(device)


def load_same_weights(model, state) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(f"weights do not fit: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")


# ---------------------------------------------------------------------------------- parity
def part_parity(ctx: Context, report: Report) -> None:
    import torch

    from megatron_apex.conversion import load_diffusers_state_dict
    from megatron_apex.families import build_model, get_model_config, layer_spec
    from megatron_apex.families.qwen_image import config_from_diffusers
    from megatron_apex.models.qwen_image.model import pack_latents, unpack_latents

    part = "parity"
    hf_class = diffusers_qwen_image(ctx)
    if hf_class is None:
        report.add(part, "our Qwen-Image against diffusers'", "not run", "skipped: diffusers does not import")
        return
    name, (b, h, w, l), lengths = (("qwen-image-tiny-test", (2, 8, 12, 8), (8, 5)) if ctx.smoke
                                   else ("qwen-image-20b", (2, 64, 64, 64), (64, 40)))
    config = get_model_config(name, num_layers=2)
    shape = f"{config.hidden_size} wide, 2 layers, {b} x ({(h // config.patch_size) * (w // config.patch_size)} + {l})"
    dev = ctx.device
    with torch.device(dev):
        hf = randomize_(hf_class(**diffusers_arch(config)), seed=1)

    def ours(bf16: bool):
        options = gpu_options(transformer_impl="local", attention_backend="auto", bf16=bf16)
        from megatron_apex import gpu

        cfg = config_from_diffusers(hf.config, perform_initialization=False, **gpu.model_overrides(options))
        model = build_model(cfg, spec=layer_spec(cfg, options)).to(dev)
        load_diffusers_state_dict(model, hf.state_dict())
        return model

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(b, config.out_channels, h, w, generator=gen).to(dev)
    t = torch.rand(b, generator=gen).to(dev)
    context = torch.randn(b, l, config.joint_attention_dim, generator=gen).to(dev)
    mask = text_mask(b, l, lengths).to(dev)
    weight = torch.randn(x.shape, generator=gen).to(dev)
    p = config.patch_size

    def run_hf(model, dtype):
        model.zero_grad(set_to_none=True)
        out = model(hidden_states=pack_latents(x.to(dtype), p), encoder_hidden_states=context.to(dtype),
                    encoder_hidden_states_mask=mask, timestep=t, img_shapes=[(1, h // p, w // p)] * b,
                    return_dict=False)[0]
        out = unpack_latents(out, h, w, p)
        (out.float() * weight).sum().backward()
        return out.detach().float(), model.transformer_blocks[1].attn.to_out[0].weight.grad.float()

    def run_ours(model):
        model.zero_grad(set_to_none=True)
        out = model(x, t, context, mask)
        (out.float() * weight).sum().backward()
        return out.detach().float(), model.layers[1].attention.linear_proj.weight.grad.float()

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 means float32
    try:
        ref, ref_grad = run_hf(hf, torch.float32)
        model = ours(bf16=False)
        out32, grad32 = run_ours(model)
        del model
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    scale = max(1.0, ref.abs().max().item())
    diff = (out32 - ref).abs().max().item() / scale
    report.add(part, f"float32 output, ours vs diffusers ({shape}): max |diff| / max(1, max |out|)",
               f"{diff:.1e}", verdict(diff < FP32_PARITY_TOL, f"{FP32_PARITY_TOL:g}"), value=diff)
    g = rel(grad32, ref_grad)
    report.add(part, "float32 gradient of block 1's output projection, ours vs diffusers: relative",
               f"{g:.1e}", verdict(g < FP32_PARITY_TOL, f"{FP32_PARITY_TOL:g}"), value=g)

    model = ours(bf16=True)
    out16, grad16 = run_ours(model)
    del model
    hf.to(torch.bfloat16)
    hout16, hgrad16 = run_hf(hf, torch.bfloat16)
    o_ours, o_hf, g_ours, g_hf = rel(out16, ref), rel(hout16, ref), rel(grad16, ref_grad), rel(hgrad16, ref_grad)
    report.add(part, "bf16 output, relative error against diffusers' float32: ours / diffusers",
               f"{o_ours:.4f} / {o_hf:.4f}", verdict(o_ours < BF16_OUTPUT_TOL, f"ours {BF16_OUTPUT_TOL}"),
               ours=o_ours, diffusers=o_hf)
    report.add(part, "bf16 gradient (block 1 output projection), relative error against float32: ours / diffusers",
               f"{g_ours:.4f} / {g_hf:.4f}", verdict(g_ours < BF16_GRAD_TOL, f"ours {BF16_GRAD_TOL}"),
               ours=g_ours, diffusers=g_hf)


# ---------------------------------------------------------------------------------- attention
def attention_kernels(ctx: Context, report: Report, part: str) -> List[tuple]:
    """(label, GpuOptions fields) of the attention kernels this machine can run; rows for the
    ones it cannot."""
    from megatron_apex import gpu

    kernels = [("SDPA flash (a masked call runs the memory-efficient kernel)",
                dict(transformer_impl="local", attention_backend="flash"))]
    if not ctx.cuda:
        return kernels
    kernels.append(("SDPA fused (cuDNN / memory-efficient)", dict(transformer_impl="local", attention_backend="fused")))
    if gpu.flash_attn_module() is not None:
        kernels.append(("flash-attn varlen", dict(transformer_impl="local", attention_backend="flash_attn")))
    else:
        report.add(part, "padded text, flash-attn varlen", "not run", "skipped: flash-attn is not installed")
    reason = gpu.transformer_engine_unavailable()
    if reason is None:
        kernels.append(("Transformer Engine DotProductAttention",
                        dict(transformer_impl="transformer_engine", attention_backend="auto")))
    else:
        report.add(part, "padded text, Transformer Engine DotProductAttention", "not run", f"skipped: {reason}")
    return kernels


def part_attention(ctx: Context, report: Report) -> None:
    import torch

    from megatron_apex.families import get_model_config

    part = "attention"
    name, (b, h, w, l), lengths = (("qwen-image-tiny-test", (2, 8, 8, 8), (3, 6)) if ctx.smoke
                                   else ("qwen-image-20b", (2, 128, 128, 256), (96, 219)))
    config = get_model_config(name, num_layers=2)
    bf16 = ctx.cuda or not ctx.smoke
    dev = ctx.device
    shape = f"{b} x ({(h // config.patch_size) * (w // config.patch_size)} + {l}), {lengths[0]} and {lengths[1]} real"
    kernels = attention_kernels(ctx, report, part)
    reference = randomize_(build_ours(config, gpu_options(transformer_impl="local", attention_backend="unfused",
                                                          bf16=bf16), dev), seed=3)
    state = reference.state_dict()
    dtype = torch.bfloat16 if bf16 else torch.float32
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(b, config.out_channels, h, w, generator=gen).to(dev, dtype)
    t = torch.rand(b, generator=gen).to(dev)
    context = torch.randn(b, l, config.joint_attention_dim, generator=gen).to(dev, dtype)
    mask = text_mask(b, l, lengths).to(dev)
    # the padded positions' states replaced by large noise: a kernel that lets a padded key in shows it
    noisy = torch.where(mask.bool()[..., None], context, 10 * torch.randn(context.shape, generator=gen).to(dev, dtype))

    def leak(model, out):
        return rel(model(x, t, noisy, mask), out)

    with torch.no_grad():
        ref = reference(x, t, context, mask)
        moved = leak(reference, ref)
        report.add(part, f"padded text ({shape}), SDPA math (the reference): padded states -> noise, output change",
                   f"{moved:.1e}", verdict(moved < PAD_LEAK_TOL, f"{PAD_LEAK_TOL:g}"), pad_leak=moved)
    del reference
    for label, fields in kernels:
        model = None
        try:
            model = build_ours(config, gpu_options(bf16=bf16, **fields), dev)
            load_same_weights(model, state)
            with torch.no_grad():
                out = model(x, t, context, mask)
                err, moved = rel(out, ref), leak(model, out)
            report.add(part, f"padded text, {label}: relative error vs math | padded states -> noise, output change",
                       f"{err:.4f} | {moved:.1e}",
                       verdict(err < KERNEL_TOL and moved < PAD_LEAK_TOL, f"{KERNEL_TOL} | {PAD_LEAK_TOL:g}"),
                       error_vs_math=err, pad_leak=moved)
        except PartTimeout:
            raise
        except Exception as exc:  # one kernel failing must not hide the others
            traceback.print_exc()
            report.add(part, f"padded text, {label}", "failed", f"error: {error_text(exc)}")
        finally:
            del model
            release_memory()


# ---------------------------------------------------------------------------------- step
def _benchmark_step_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_step", REPO / "tools" / "benchmark_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_latent_dataset(folder: Path, config, batch: int, height: int, width: int, text: int) -> Path:
    """``batch`` random float16 latents and padded text states in the shards.v1 format (the
    reader takes float images as latents): the Trainer's --data-path for the step part."""
    import numpy as np

    from megatron_apex.data import shard_writer

    rng = np.random.default_rng(0)
    lengths = text_mask(batch, text).sum(1).int().tolist()

    def samples():
        for i in range(batch):
            latent = rng.standard_normal((config.latent_channels, height, width)).astype(np.float16)
            states = rng.standard_normal((lengths[i], config.joint_attention_dim)).astype(np.float16)
            yield dict(key=f"{i:07d}", image=latent, context=states, mask=np.ones(lengths[i], dtype=bool), caption="")

    split = shard_writer.write_split(folder, "train", samples(), samples_per_shard=batch, compress=False)
    shard_writer.write_manifest(folder, dict(format=shard_writer.SHARD_FORMAT, dataset="gpu-check-synthetic",
                                             splits={"train": split}, context_dim=config.joint_attention_dim,
                                             max_text_len=text, image_shape=[config.latent_channels, height, width]))
    return folder


def start_estimates(plans: List[Dict]) -> subprocess.Popen:
    """The memory planner in a CPU-only subprocess (its fake process group must not meet this
    process's real one); it runs while the GPU works."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, __file__, "--estimate", json.dumps(plans)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect_estimates(proc: subprocess.Popen, timeout: float) -> List[Optional[Dict]]:
    try:
        out, err = proc.communicate(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError("the memory estimate did not finish in time") from None
    if proc.returncode != 0:
        raise RuntimeError(f"the memory estimate failed: {(err or '').strip().splitlines()[-1:]}")
    return json.loads(out.strip().splitlines()[-1])


def estimate_main(plans_json: str) -> int:
    """--estimate: print the peak stage of each plan as JSON (run by start_estimates)."""
    from megatron_apex.training.memory_estimate import MemoryPlanConfig, estimate, peak

    out = []
    for fields in json.loads(plans_json):
        if fields is None:
            out.append(None)
            continue
        top = peak(estimate(MemoryPlanConfig(**{**fields, "latent_grid": tuple(fields["latent_grid"])})))
        out.append({**dataclasses.asdict(top), "total": top.total})
    print(json.dumps(out))
    return 0


def _memory_plans(run_cfg, objectives: Dict, batch: int, grid: tuple, text: int) -> List[Optional[Dict]]:
    """The planner's view of each objective's step (None: it has no model of batch_split)."""
    overrides = {k: v for k, v in run_cfg.model_overrides.items() if k != "params_dtype"}
    base = dict(model=run_cfg.model, micro_batch_size=batch, latent_grid=list(grid), text_len=text,
                ema=run_cfg.train.ema_decay > 0, teacher=run_cfg.objective.teacher,
                distributed_optimizer=run_cfg.parallel.use_distributed_optimizer,
                params_dtype=run_cfg.model_overrides.get("params_dtype", "float32"), model_overrides=overrides)
    plans = []
    for config in objectives.values():
        if config is None:
            plans.append(dict(base, objective="fm"))
        elif config.batch_split is not None:
            plans.append(None)
        else:
            plans.append(dict(base, objective="apex", apex_variant=config.variant))
    return plans


def _diffusers_step(ctx: Context, config, batch: int, height: int, width: int, text: int):
    """diffusers' model taking a flow-matching step: our fm_loss on it, clipping to 1.0, fused
    AdamW on fp32 master copies of its bf16 weights (what megatron's optimizer keeps)."""
    import torch

    from megatron_apex.objectives.fm import fm_loss

    hf_class = diffusers_qwen_image(ctx)
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    with torch.device(ctx.device):
        model = randomize_(hf_class(**diffusers_arch(config)), seed=5).to(dtype)
    params = [p for p in model.parameters()]
    master = [p.detach().float().clone().requires_grad_(True) for p in params]
    optimizer = torch.optim.AdamW(master, lr=1e-5, weight_decay=0.0, fused=ctx.cuda)
    contract = DiffusersContract(model, config.patch_size, dtype)
    gen = torch.Generator().manual_seed(6)
    x0 = torch.randn(batch, config.out_channels, height, width, generator=gen).to(ctx.device)
    noise = torch.randn(x0.shape, generator=gen).to(ctx.device)
    t = torch.rand(batch, generator=gen).to(ctx.device)
    context = torch.randn(batch, text, config.joint_attention_dim, generator=gen).to(ctx.device)
    mask = text_mask(batch, text).to(ctx.device)

    def step():
        for p in params:
            p.grad = None
        fm_loss(contract, x0, noise, t, context, mask)["loss"].backward()
        for m, p in zip(master, params):
            m.grad = None if p.grad is None else p.grad.float()  # a few of diffusers' weights get no gradient
        torch.nn.utils.clip_grad_norm_(master, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for m, p in zip(master, params):
                p.copy_(m)

    return model, step


def _peak_gib(baseline: int) -> Optional[float]:
    import torch

    return (torch.cuda.max_memory_allocated() - baseline) / 2 ** 30 if torch.cuda.is_available() else None


def part_step(ctx: Context, report: Report, deadline: float) -> None:
    import torch

    from megatron_apex import gpu
    from megatron_apex.training.arguments import parse_args
    from megatron_apex.training.loop import Trainer

    part = "step"
    bench = _benchmark_step_module()
    name, layers, (b, h, w, l) = (("qwen-image-tiny-test", 2, (2, 8, 8, 8)) if ctx.smoke
                                  else ("qwen-image-20b", 4, (2, 128, 128, 256)))
    warmup, iters = (1, 1) if ctx.smoke else ((1, 2) if ctx.quick else (2, 4))
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_step_"))
    old_cache = os.environ.get("MEGATRON_APEX_CACHE")
    os.environ["MEGATRON_APEX_CACHE"] = str(tmp / "cache")  # the dataset memo
    trainer = estimates = hf_model = hf_step = None
    try:
        flags = bench.launcher_flags(name, b, str(tmp / "data")) + ["--num-layers", str(layers)]
        flags += ["--bf16"] if ctx.cuda else []
        run_cfg = parse_args(flags)
        from megatron_apex.families import get_model_config

        config = get_model_config(run_cfg.model, **run_cfg.model_overrides)
        write_latent_dataset(tmp / "data", config, b, h, w, l)
        grid = (h // config.patch_size, w // config.patch_size)
        from megatron_apex.objectives.apex import APEXConfig

        objectives = {"flow matching": None, **bench.step_variants(APEXConfig(**run_cfg.objective.apex))}
        estimates = start_estimates(_memory_plans(run_cfg, objectives, b, grid, l))
        shape = f"{config.hidden_size} wide, {layers} layers, {b} x ({grid[0] * grid[1]} + {l})"

        release_memory()
        baseline = torch.cuda.memory_allocated() if ctx.cuda else 0
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer = Trainer(run_cfg)
        objectives = {"flow matching": None, **bench.step_variants(trainer.apex_config)}
        flops = 3 * qwen_image_forward_flops(trainer.model_config, b, grid[0], grid[1], l)
        times, peaks = {}, {}
        for label, apex_config in objectives.items():
            # the step's apex_active() reads apex_start_iter: FM steps are the iterations before it
            trainer.cfg.objective.apex_start_iter = 0 if apex_config is not None else 10 ** 10
            if apex_config is not None:
                trainer.step.apex_config = apex_config
                if ctx.cuda:
                    torch.cuda.reset_peak_memory_stats()
            times[label] = time_steps(trainer.train_step, ctx.device, iters, warmup)
            peaks[label] = _peak_gib(baseline)
        adam = gpu.adam_class_name(trainer.optimizer)
        fm = times["flow matching"]
        mfu = flops / fm / ctx.peak if ctx.peak else None
        report.add(part, f"flow-matching step of the Trainer ({shape}, {trainer.cfg.gpu.transformer_impl} layers, "
                   f"adam {adam.rsplit('.', 1)[-1]}, EMA): time, TFLOP/s, MFU",
                   f"{1000 * fm:.1f} ms, {flops / fm / 1e12:.1f} TFLOP/s, MFU "
                   + (f"{100 * mfu:.1f}%" if mfu is not None else "n/a"), step_s=fm, mfu=mfu, adam=adam)
        for label, seconds in times.items():
            if label != "flow matching":
                report.add(part, f"{label} step / flow-matching step", f"{1000 * seconds:.1f} ms ({seconds / fm:.2f}x)",
                           step_s=seconds, ratio=seconds / fm)
        del trainer
        trainer = None
        release_memory()

        if diffusers_qwen_image(ctx) is None:
            report.add(part, "flow-matching step, diffusers' model", "not run", "skipped: diffusers does not import")
        else:
            if ctx.cuda:
                torch.cuda.reset_peak_memory_stats()
            base_hf = torch.cuda.memory_allocated() if ctx.cuda else 0
            hf_model, hf_step = _diffusers_step(ctx, config, b, h, w, l)
            hf_time = time_steps(hf_step, ctx.device, iters, warmup)
            hf_peak = _peak_gib(base_hf)
            report.add(part, "flow-matching step: ours (Trainer) / diffusers (same loss, clipping, AdamW on fp32 "
                       "master weights)", f"{1000 * fm:.1f} ms / {1000 * hf_time:.1f} ms ({fm / hf_time:.2f}x)"
                       + (f", peak {peaks['flow matching']:.1f} / {hf_peak:.1f} GiB" if hf_peak is not None else ""),
                       ours_s=fm, diffusers_s=hf_time, ratio=fm / hf_time)
            del hf_model, hf_step
            hf_model = hf_step = None
            release_memory()

        planned = collect_estimates(estimates, deadline - time.monotonic() - 2)
        estimates = None
        for (label, _), plan in zip(objectives.items(), planned):
            measured = peaks[label]
            if plan is None:
                report.add(part, f"peak memory, {label}: measured (the planner has no batch_split)",
                           "n/a" if measured is None else f"{measured:.1f} GiB", measured_gib=measured)
                continue
            planned_gib = plan["total"] / 2 ** 30
            if measured is None:  # a CPU (--smoke): the planner's figure alone
                report.add(part, f"peak memory, {label}: planned (memory_estimate.py; no CUDA to measure)",
                           f"{planned_gib:.3f} GiB", planned_gib=planned_gib, planned=plan)
                continue
            ratio = measured / planned_gib
            report.add(part, f"peak memory, {label}: measured / planned (memory_estimate.py)",
                       f"{measured:.1f} / {planned_gib:.1f} GiB ({ratio:.2f}x)",
                       verdict(abs(ratio - 1) <= MEMORY_ESTIMATE_TOL, f"±{MEMORY_ESTIMATE_TOL:.0%}"),
                       measured_gib=measured, planned_gib=planned_gib, planned=plan)
    finally:
        if estimates is not None:
            estimates.kill()
            estimates.communicate()
        del trainer, hf_model, hf_step
        release_memory()
        if old_cache is None:
            os.environ.pop("MEGATRON_APEX_CACHE", None)
        else:
            os.environ["MEGATRON_APEX_CACHE"] = old_cache
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------- throughput
def cases(quick: bool, smoke: bool) -> List[Dict]:
    """(model family, config, batch, latent H, W, text length) of each benchmarked stack."""
    from megatron_apex.families import get_model_config

    if smoke:
        return [dict(name="qwen-image (smoke)", config=get_model_config("qwen-image-tiny-test", num_layers=2),
                     batch=2, height=8, width=8, text=8),
                dict(name="sana (smoke)", config=get_model_config("sana-tiny-test", num_layers=2), batch=2,
                     height=8, width=8, text=8)]
    return [dict(name="qwen-image-20b widths", config=get_model_config("qwen-image-20b", num_layers=4),
                 batch=2, height=128, width=128, text=256),
            dict(name="sana-0.6b widths", config=get_model_config("sana-0.6b", num_layers=8), batch=8,
                 height=32, width=32, text=300)]


def variants(device_is_cuda: bool, smoke: bool) -> List[Dict]:
    """The GPU paths this machine can run: (label, GpuOptions fields)."""
    from megatron_apex import gpu

    out = [dict(label="local, SDPA (torch chooses)", transformer_impl="local", attention_backend="local")]
    if device_is_cuda:
        out.append(dict(label="local, SDPA flash", transformer_impl="local", attention_backend="flash"))
        if gpu.flash_attn_module() is not None:
            out.append(dict(label="local, flash-attn", transformer_impl="local", attention_backend="flash_attn"))
        if gpu.transformer_engine_unavailable() is None:
            out.append(dict(label="Transformer Engine", transformer_impl="transformer_engine",
                            attention_backend="auto"))
            import torch

            if tuple(torch.cuda.get_device_capability()) >= (8, 9):
                out.append(dict(label="Transformer Engine, FP8 hybrid", transformer_impl="transformer_engine",
                                attention_backend="auto", fp8_format="hybrid"))
    return out


def _inputs(case, device, dtype):
    import torch

    config = case["config"]
    b, h, w, l = case["batch"], case["height"], case["width"], case["text"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, config.latent_channels, h, w, generator=gen)
    t = torch.rand(b, generator=gen)
    ctx = torch.randn(b, l, config.context_dim if hasattr(config, "context_dim") else config.joint_attention_dim,
                      generator=gen)
    return x.to(device, dtype), t.to(device), ctx.to(device, dtype), text_mask(b, l).to(device)


def _flops(case) -> int:
    from megatron_apex.models.qwen_image.config import QwenImageConfig

    config = case["config"]
    p = config.patch_size
    fn = qwen_image_forward_flops if isinstance(config, QwenImageConfig) else sana_forward_flops
    return fn(config, case["batch"], case["height"] // p, case["width"] // p, case["text"])


def _build_ours_step(case, variant, device):
    import torch

    from megatron_apex import gpu

    fields = {k: v for k, v in variant.items() if k != "label"}
    options = gpu_options(bf16=True, **fields)
    model = randomize_(build_ours(case["config"], options, device), seed=0)
    x, t, ctx, mask = _inputs(case, device, torch.bfloat16)

    def step():
        with gpu.fp8_context(options, model):
            out = model(x, t, ctx, mask)
        out.float().square().mean().backward()
        for p in model.parameters():
            p.grad = None

    return model, step


def _build_diffusers_step(case, device, hf_class):
    """diffusers' QwenImageTransformer2DModel with the same widths (the reference row)."""
    import torch

    with torch.device(device):
        model = randomize_(hf_class(**diffusers_arch(case["config"])), seed=0).to(torch.bfloat16)
    contract = DiffusersContract(model, case["config"].patch_size, torch.bfloat16)
    x, t, ctx, mask = _inputs(case, device, torch.bfloat16)

    def step():
        contract(x, t, ctx, mask).float().square().mean().backward()
        for param in model.parameters():
            param.grad = None

    return model, step


def throughput(ctx: Context, report: Report, case: Dict, part: str) -> None:
    import torch

    iters, warmup = (1, 1) if ctx.smoke else ((3, 1) if ctx.quick else (5, 2))
    flops = 3 * _flops(case)
    c = case["config"]
    tokens = (case["height"] // c.patch_size) * (case["width"] // c.patch_size)
    shape = f"{case['name']}, {c.num_layers} layers, {case['batch']} x ({tokens} + {case['text']})"
    runs = [(v["label"], v) for v in variants(ctx.cuda, ctx.smoke)]
    hf_class = diffusers_qwen_image(ctx) if "qwen" in case["name"] else None
    if hf_class is not None:
        runs.append(("diffusers", None))
    times = {}
    for label, variant in runs:
        model = step = None
        try:
            model, step = (_build_diffusers_step(case, ctx.device, hf_class) if variant is None
                           else _build_ours_step(case, variant, ctx.device))
            params = sum(p.numel() for p in model.parameters()) / 1e6
            if ctx.cuda:
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if ctx.cuda else 0
            seconds = time_steps(step, ctx.device, iters, warmup)
            times[label] = seconds
            mfu = flops / seconds / ctx.peak if ctx.peak else None
            mem = _peak_gib(base)
            versus = ""
            if variant is None and runs[0][0] in times:
                versus = f", ours ({runs[0][0]}) / diffusers {times[runs[0][0]] / seconds:.2f}x"
            report.add(part, f"forward + backward, {shape}, {label} ({params:.0f} M params)",
                       f"{1000 * seconds:.1f} ms, {flops / seconds / 1e12:.1f} TFLOP/s, MFU "
                       + (f"{100 * mfu:.1f}%" if mfu is not None else "n/a")
                       + (f", {mem:.1f} GiB above the weights" if mem is not None else "")
                       + f", {case['batch'] * tokens / seconds:,.0f} image tokens/s" + versus,
                       step_s=seconds, mfu=mfu, peak_gib=mem, params_m=params)
        except PartTimeout:
            raise
        except Exception as exc:  # one failing path must not hide the others
            traceback.print_exc()
            report.add(part, f"forward + backward, {shape}, {label}", "failed", f"error: {error_text(exc)}")
        finally:
            del model, step
            release_memory()


def part_throughput(ctx: Context, report: Report) -> None:
    throughput(ctx, report, cases(ctx.quick, ctx.smoke)[0], "throughput")


def part_sana(ctx: Context, report: Report) -> None:
    throughput(ctx, report, cases(ctx.quick, ctx.smoke)[1], "sana")


# ---------------------------------------------------------------------------------- tests/gpu row
def pytest_row(report: Report, log_path: Optional[str], rc: Optional[int]) -> None:
    """One row from ``pytest -q -rs`` output: the summary, failures, why tests were skipped."""
    import re

    if not log_path:
        return
    text = Path(log_path).read_text(errors="replace") if Path(log_path).is_file() else ""
    summary = ""
    for line in reversed(text.splitlines()):
        if re.search(r"\d+ (passed|failed|skipped|error)", line):
            summary = line.strip("= ").strip()
            break
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M)
    reasons = sorted({m.strip() for m in re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", text, flags=re.M)})
    result = summary or ("did not finish (timeout)" if rc == 124 else f"no summary (exit code {rc})")
    if failed:
        result += "; failed: " + ", ".join(f.split("::", 1)[-1] for f in failed[:6])
    if reasons:
        result += "; skipped because: " + "; ".join(r[:90] for r in reasons[:4])
    ok = rc == 0 and bool(summary)
    report.add("tests/gpu", "pytest tests/gpu", result, "ok" if ok else f"FAIL (exit code {rc})")


# ---------------------------------------------------------------------------------- driver
def header(ctx: Context) -> str:
    import torch

    def version(dist: str) -> str:
        from importlib import metadata

        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "absent"

    name = torch.cuda.get_device_name(0) if ctx.cuda else "cpu"
    peak = f"{ctx.peak / 1e12:.0f} TFLOP/s dense bf16 peak" if ctx.peak else "peak unknown (no MFU)"
    return (f"## GPU check {datetime.date.today().isoformat()}: {name}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda or 'none'}, Python {sys.version.split()[0]}, megatron-core "
            f"{version('megatron-core')}, diffusers {version('diffusers')}, transformer-engine "
            f"{version('transformer-engine')}, flash-attn {version('flash-attn')} ({peak})")


def run(args) -> int:
    import torch

    started = time.monotonic()
    deadline = started + args.budget_s
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("gpu_check.py: CUDA is not available (torch.cuda.is_available() is False); run it on a GPU "
              "machine, or pass --smoke to check the script on a CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    ctx = Context(device=device, cuda=cuda, smoke=args.smoke, quick=args.quick,
                  peak=peak_bf16_flops(name) if cuda else None, no_diffusers=args.no_diffusers)
    report = Report(args.out, header(ctx), print_table=not args.no_table)
    pytest_row(report, args.pytest_log, args.pytest_rc)
    report.write()

    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)
    runners = {"parity": part_parity, "attention": part_attention, "throughput": part_throughput,
               "sana": part_sana, "step": lambda c, r: part_step(c, r, part_deadline)}
    for part in [p for p in PARTS if p in args.parts]:
        left = deadline - time.monotonic()
        if left < 10:
            report.add(part, "(the whole part)", "not run", f"skipped: {args.budget_s:.0f} s budget spent")
            report.parts[part] = dict(status="not run", seconds=0.0)
            report.write()
            continue
        limit = min(PART_LIMIT_S[part] * (4 if args.smoke else 1), left)
        part_deadline = time.monotonic() + limit
        t0 = time.monotonic()
        status = "ok"
        try:
            with time_limit(limit):
                runners[part](ctx, report)
        except PartTimeout as exc:
            status = "timeout"
            report.add(part, "(the whole part)", "stopped", f"error: {exc} (limit {limit:.0f} s)")
        except Exception as exc:
            status = "error"
            traceback.print_exc()
            report.add(part, "(the whole part)", "failed", f"error: {error_text(exc)}")
        finally:
            release_memory()
        report.parts[part] = dict(status=status, seconds=round(time.monotonic() - t0, 1), limit_s=limit)
        print(f"gpu_check.py: part {part}: {status} in {report.parts[part]['seconds']} s", file=sys.stderr, flush=True)
        report.write()
    report.add("all", "gpu_check.py wall time", f"{time.monotonic() - started:.0f} s of a {args.budget_s:.0f} s budget",
               "", parts={k: v["seconds"] for k, v in report.parts.items()})
    report.write()
    if report.print_table:
        print(report.markdown())
    return 1 if report.failed() else 0


def parse_parts(text: str) -> List[str]:
    parts = [p for p in text.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    return parts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="fewer timed iterations")
    parser.add_argument("--smoke", action="store_true", help="tiny widths; runs on a CPU (checks the script)")
    parser.add_argument("--parts", type=parse_parts, default=list(PARTS), help="comma-separated: " + ", ".join(PARTS))
    parser.add_argument("--no-diffusers", action="store_true", help="skip everything that needs diffusers")
    parser.add_argument("--budget-s", type=float, default=300.0, help="seconds for all parts together")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_check"), help="where gpu_check.{md,json} go")
    parser.add_argument("--pytest-log", default=None, help="pytest -q -rs output of tests/gpu: one row of the table")
    parser.add_argument("--pytest-rc", type=int, default=None, help="its exit code (124: timed out)")
    parser.add_argument("--no-table", action="store_true", help="write the table to --out only (gpu_check.sh "
                        "prints it last)")
    parser.add_argument("--estimate", default=None, help=argparse.SUPPRESS)  # internal: start_estimates
    args = parser.parse_args(argv)
    if args.estimate is not None:
        return estimate_main(args.estimate)
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
