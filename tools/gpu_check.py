"""One-shot GPU check of our Qwen-Image MMDiT against diffusers (run it whenever a GPU is lent).

    python tools/gpu_check.py        # writes $OUT/gpu_check.json (default /tmp) and prints each number

1. float32 forward and gradients on CUDA vs diffusers' QwenImageTransformer2DModel (same weights,
   padded text mask, non-square grid);
2. bf16 forward of both models against the float32 reference;
3. SDPA backends: memory-efficient with a mask and flash without one agree with the default/math;
4. bf16 forward+backward time of an 8-layer, 1.2 B-parameter Qwen-Image-class stack (1,024 image +
   128 text tokens, batch 8), ours vs diffusers on the same weights and input.
Needs megatron-core and diffusers (carry their wheels to a machine that lacks them).
"""
import json
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
from megatron_apex.conversion.random_weights import randomize_weights_  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
CUDA = torch.cuda.is_available()
res = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if CUDA else "cpu", "python": sys.version.split()[0]}


def log(k, v):
    res[k] = v
    print(k, v, flush=True)


from megatron_apex.parallel import init_distributed  # noqa: E402

init_distributed(1, 1)
from diffusers import QwenImageTransformer2DModel  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from megatron_apex.conversion import config_from_diffusers, load_diffusers_state_dict  # noqa: E402
from megatron_apex.models import build_model  # noqa: E402
from megatron_apex.models.qwen_image.model import pack_latents, unpack_latents  # noqa: E402
from megatron_apex.models.specs import resolve_backend  # noqa: E402

log("auto_backend", resolve_backend("auto"))
dev = torch.device("cuda" if CUDA else "cpu")


def rand_hf(seed, **arch):
    torch.manual_seed(seed)
    hf = QwenImageTransformer2DModel(**arch)
    randomize_weights_(hf, seed + 1)
    return hf


def hf_run(hf, x, t, ctx, mask):
    B, C, H, W = x.shape
    out = hf(hidden_states=pack_latents(x, 2), encoder_hidden_states=ctx, encoder_hidden_states_mask=mask,
             timestep=t, img_shapes=[(1, H // 2, W // 2)] * B, return_dict=False)[0]
    return unpack_latents(out, H, W, 2)


# ---- 1. fp32 parity + grads on CUDA, padded mask, non-square
arch = dict(patch_size=2, in_channels=8, out_channels=2, num_layers=3, attention_head_dim=32, num_attention_heads=4,
            joint_attention_dim=48, axes_dims_rope=(8, 12, 12))
hf = rand_hf(0, **arch).to(dev)
cfg = config_from_diffusers(hf.config)
ours = build_model(cfg, backend="local")
load_diffusers_state_dict(ours, hf.cpu().state_dict())
hf = hf.to(dev)
ours = ours.to(dev)
g = torch.Generator().manual_seed(1)
B, C, H, W, L = 4, 2, 16, 24, 9
x = torch.randn(B, C, H, W, generator=g).to(dev)
t = torch.rand(B, generator=g).to(dev)
ctx = torch.randn(B, L, 48, generator=g).to(dev)
mask = torch.ones(B, L)
for i in range(B):
    mask[i, L - 2 * i:] = 0
mask = mask.to(dev)
w = torch.randn(B, C, H, W, generator=g).to(dev)
o1 = ours(x, t, ctx, mask)
r1 = hf_run(hf, x, t, ctx, mask)
(o1 * w).sum().backward()
(r1 * w).sum().backward()
log("fp32_cuda_out_maxdiff", (o1 - r1).abs().max().item())
log("fp32_cuda_out_refmax", r1.abs().max().item())
gq = ours.layers[1].attention.linear_proj.weight.grad
gr = hf.transformer_blocks[1].attn.to_out[0].weight.grad
log("fp32_cuda_grad_to_out_maxdiff", (gq - gr).abs().max().item())
log("fp32_cuda_grad_img_in_maxdiff", (ours.img_in.weight.grad - hf.img_in.weight.grad).abs().max().item())

# ---- 2. bf16: both vs the fp32 reference
with torch.no_grad():
    hf_bf = rand_hf(0, **arch)
    cfg_bf = config_from_diffusers(hf_bf.config, params_dtype="bfloat16")
    ours_bf = build_model(cfg_bf, backend="local")
    load_diffusers_state_dict(ours_bf, {k: v.to(torch.bfloat16) for k, v in hf_bf.state_dict().items()})
    ours_bf = ours_bf.to(dev)
    hf_bf = hf_bf.to(dev, torch.bfloat16)
    ob = ours_bf(x.bfloat16(), t, ctx.bfloat16(), mask).float()
    rb = hf_run(hf_bf, x.bfloat16(), t, ctx.bfloat16(), mask).float()
    ref = r1.detach()
    rel = lambda a: ((a - ref).norm() / ref.norm()).item()  # noqa: E731
    log("bf16_rel_err_ours_vs_fp32", rel(ob))
    log("bf16_rel_err_diffusers_vs_fp32", rel(rb))

    if not CUDA:
        sys.exit(0)
    # ---- 3. SDPA backends: efficient with a mask, flash without
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        oe = ours_bf(x.bfloat16(), t, ctx.bfloat16(), mask).float()
    log("bf16_efficient_with_mask_rel_vs_default", ((oe - ob).norm() / ob.norm()).item())
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        of = ours_bf(x.bfloat16(), t, ctx.bfloat16(), None).float()
    with sdpa_kernel([SDPBackend.MATH]):
        om = ours_bf(x.bfloat16(), t, ctx.bfloat16(), None).float()
    log("bf16_flash_nomask_rel_vs_math", ((of - om).norm() / om.norm()).item())

# ---- 4. throughput: ours vs diffusers, same weights, bf16 fwd+bwd, ~0.9B-param 8-layer config
big = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=8, attention_head_dim=128, num_attention_heads=16,
           joint_attention_dim=1024, axes_dims_rope=(16, 56, 56))
torch.manual_seed(0)
hfb = QwenImageTransformer2DModel(**big)
cfgb = config_from_diffusers(hfb.config, params_dtype="bfloat16")
ob_model = build_model(cfgb, backend="local")
load_diffusers_state_dict(ob_model, {k: v.to(torch.bfloat16) for k, v in hfb.state_dict().items()})
ob_model = ob_model.to(dev)
hfb = hfb.to(dev, torch.bfloat16)
Bb, Hb, Wb, Lb = 8, 64, 64, 128  # 1024 image tokens + 128 text
xb = torch.randn(Bb, 16, Hb, Wb, device=dev, dtype=torch.bfloat16)
tb = torch.rand(Bb, device=dev)
cb = torch.randn(Bb, Lb, 1024, device=dev, dtype=torch.bfloat16)
mb = torch.ones(Bb, Lb, device=dev)
mb[:, 100:] = 0


def bench(fn, n=6):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def step_ours():
    ob_model(xb, tb, cb, mb).float().square().mean().backward()


def step_hf():
    hf_run(hfb, xb, tb, cb, mb).float().square().mean().backward()


log("params_big", sum(p.numel() for p in ob_model.parameters()))
log("bf16_fwd_bwd_s_ours", bench(step_ours))
log("bf16_fwd_bwd_s_diffusers", bench(step_hf))
log("peak_mem_gib", torch.cuda.max_memory_allocated() / 2**30)
with open(os.path.join(OUT, "gpu_check.json"), "w") as f:
    json.dump(res, f, indent=1)
