"""Throughput and MFU of Qwen-Image- and Sana-class layer stacks on a lent GPU (tools/gpu_check.sh
runs it after ``pytest tests/gpu``).

    python tools/gpu_check.py                 # markdown table on stdout, $OUT/gpu_check.{md,json}
    python tools/gpu_check.py --quick         # fewer layers and iterations
    python tools/gpu_check.py --smoke         # tiny widths, runs on a CPU too (checks this script only)

Each row is bf16 forward + backward of the model (embeddings, a few blocks of the real widths,
output head) on a realistic input, for every GPU path this machine has: local layers with
SDPA (torch chooses), SDPA's flash kernel, the flash-attn package, Transformer Engine layers,
TE + FP8 (hybrid, delayed scaling), and diffusers' model as the reference when it imports.
  qwen-image-20b widths (24 heads x 128, text width 3584): 4096 image tokens (128x128 latent,
      2x2 patches) + 256 text tokens (padded: each sample keeps 256 - 37 i), batch 2;
  sana-0.6b widths (36 x 32, cross-attention 16 x 72, caption 2304): 1024 image tokens (32x32
      latent) + 300 caption tokens (padded likewise), batch 8.

Model FLOPs (``*_forward_flops``) count every matrix multiply and convolution of the forward,
2 per multiply-add, attention included (QK^T and PV: 4 b s_q s_kv h d) and nothing elementwise;
a training step is 3x the forward (backward = 2 forwards; the attention recompute inside
flash kernels is not model FLOPs). tests/unit/test_gpu_paths.py checks the formulas against
torch's FlopCounterMode. MFU = step FLOPs / step time / the GPU's dense bf16 peak
(``PEAK_BF16_TFLOPS``, spec sheets, without sparsity); image tokens/s = batch x image tokens
/ step time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from typing import Dict, List, Optional

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


# ---------------------------------------------------------------------------------- cases
def cases(quick: bool, smoke: bool) -> List[Dict]:
    """(model family, config, batch, latent H, W, text length) of each benchmarked stack."""
    from megatron_apex.models.registry import get_model_config

    if smoke:
        return [dict(name="qwen-image (smoke)", config=get_model_config("qwen-image-tiny-test", num_layers=2),
                     batch=2, height=8, width=8, text=8),
                dict(name="sana (smoke)", config=get_model_config("sana-tiny-test", num_layers=2), batch=2,
                     height=8, width=8, text=8)]
    qwen_layers, sana_layers = (2, 4) if quick else (4, 8)
    return [dict(name="qwen-image-20b widths", config=get_model_config("qwen-image-20b", num_layers=qwen_layers),
                 batch=2, height=128, width=128, text=256),
            dict(name="sana-0.6b widths", config=get_model_config("sana-0.6b", num_layers=sana_layers), batch=8,
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
    mask = torch.ones(b, l)
    for i in range(b):
        mask[i, max(1, l - 37 * i):] = 0
    return x.to(device, dtype), t.to(device), ctx.to(device, dtype), mask.to(device)


def _flops(case) -> int:
    from megatron_apex.models.qwen_image.config import QwenImageConfig

    config = case["config"]
    p = config.patch_size
    fn = qwen_image_forward_flops if isinstance(config, QwenImageConfig) else sana_forward_flops
    return fn(config, case["batch"], case["height"] // p, case["width"] // p, case["text"])


def _time_steps(step, device, iters: int, warmup: int) -> float:
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


def _build_ours(case, variant, device):
    import torch

    from megatron_apex import gpu
    from megatron_apex.models.registry import build_model

    fields = {k: v for k, v in variant.items() if k != "label"}
    options = gpu.resolve_gpu_options(gpu.GpuOptions(bf16=True, **fields))
    config = case["config"].replace(perform_initialization=False, **gpu.model_overrides(options))
    model = build_model(config, spec=gpu.layer_spec(config, options)).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # random weights: adaLN-Zero would make every block the identity
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * 0.02)
    x, t, ctx, mask = _inputs(case, device, torch.bfloat16)

    def step():
        with gpu.fp8_context(options, model):
            out = model(x, t, ctx, mask)
        out.float().square().mean().backward()
        for p in model.parameters():
            p.grad = None

    return model, step


def _build_diffusers(case, device):
    """diffusers' QwenImageTransformer2DModel with the same widths (the reference row)."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    from megatron_apex.models.qwen_image.model import pack_latents, unpack_latents

    c = case["config"]
    model = QwenImageTransformer2DModel(
        patch_size=c.patch_size, in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.num_layers,
        attention_head_dim=c.attention_head_dim, num_attention_heads=c.num_attention_heads,
        joint_attention_dim=c.joint_attention_dim, axes_dims_rope=tuple(c.axes_dims_rope),
    ).to(device, torch.bfloat16)
    x, t, ctx, mask = _inputs(case, device, torch.bfloat16)
    b, _, h, w = x.shape
    p = c.patch_size

    def step():
        out = model(hidden_states=pack_latents(x, p), encoder_hidden_states=ctx, encoder_hidden_states_mask=mask,
                    timestep=t, img_shapes=[(1, h // p, w // p)] * b, return_dict=False)[0]
        unpack_latents(out, h, w, p).float().square().mean().backward()
        for param in model.parameters():
            param.grad = None

    return model, step


def run(args) -> int:
    import torch

    from megatron_apex.parallel import init_distributed

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("gpu_check.py: CUDA is not available (torch.cuda.is_available() is False); run it on a GPU "
              "machine, or pass --smoke to check the script on a CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    init_distributed(1, 1)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = peak_bf16_flops(name) if cuda else None
    iters, warmup = (2, 1) if args.smoke else ((5, 2) if args.quick else (10, 3))
    rows = []
    for case in cases(args.quick, args.smoke):
        flops = 3 * _flops(case)
        runs = [(v["label"], v) for v in variants(cuda, args.smoke)]
        try:
            import diffusers  # noqa: F401

            if "qwen" in case["name"] and not args.no_diffusers:
                runs.append(("diffusers (reference)", None))
        except ImportError:
            pass
        for label, variant in runs:
            row = dict(model=case["name"], layers=case["config"].num_layers, batch=case["batch"],
                       image_tokens=(case["height"] // case["config"].patch_size)
                       * (case["width"] // case["config"].patch_size), text_tokens=case["text"], path=label)
            model = step = None
            try:
                model, step = _build_diffusers(case, device) if variant is None else _build_ours(case, variant, device)
                row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                seconds = _time_steps(step, device, iters, warmup)
                row.update(step_s=seconds, image_tokens_per_s=row["batch"] * row["image_tokens"] / seconds,
                           tflops=flops / seconds / 1e12, mfu=(flops / seconds / peak) if peak else None,
                           peak_mem_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None)
            except Exception as exc:  # one failing path must not hide the others
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                traceback.print_exc()
            finally:
                del model, step
                if cuda:
                    torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    table = markdown(rows, name, peak, torch)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    for suffix, text in (("md", table), ("json", json.dumps({"device": name, "rows": rows}, indent=1))):
        path = os.path.join(args.out, f"gpu_check.{suffix}")
        with open(path + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(path + ".tmp", path)
    return 1 if any("error" in r for r in rows if r["path"] != "diffusers (reference)") else 0


def markdown(rows, device_name, peak, torch) -> str:
    cuda = torch.version.cuda or "none"
    peak_text = f"{peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "peak unknown (no MFU)"
    lines = [f"## {datetime.date.today().isoformat()}, {device_name}, torch {torch.__version__}, CUDA {cuda}, "
             f"Python {sys.version.split()[0]} ({peak_text})", "",
             "| model | layers | batch x (image + text) tokens | path | params (M) | step (ms) | image tokens/s | "
             "TFLOP/s | MFU | peak mem (GiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"{r['batch']} x ({r['image_tokens']} + {r['text_tokens']})"
        if "error" in r:
            lines.append(f"| {r['model']} | {r['layers']} | {shape} | {r['path']} | | failed: {r['error']} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "n/a"
        lines.append(f"| {r['model']} | {r['layers']} | {shape} | {r['path']} | {r['params_m']:.0f} | "
                     f"{1000 * r['step_s']:.1f} | {r['image_tokens_per_s']:,.0f} | {r['tflops']:.1f} | {mfu} | {mem} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="fewer layers and iterations")
    parser.add_argument("--smoke", action="store_true", help="tiny widths; runs on a CPU (checks the script)")
    parser.add_argument("--no-diffusers", action="store_true", help="skip the diffusers reference row")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp"), help="where gpu_check.{md,json} go")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
