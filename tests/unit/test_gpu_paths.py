"""GPU fast paths (megatron_apex/gpu.py) on a CPU: selection rules with stand-in
transformer_engine / flash_attn modules and a patched torch.cuda.is_available, the SDPA
kernels torch actually sees, the flash-attn masking rule against SDPA's mask, --bf16, the
FP8 flag rules, the fused-Adam report, the MFU FLOP formulas against torch's FlopCounterMode,
and that importing the project never imports a GPU-only package."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from megatron_apex import families, gpu
from megatron_apex.families import build_model, get_model_config
from megatron_apex.models.common import attention as core_attention
from megatron_apex.models.qwen_image.layer_spec import get_qwen_image_layer_spec
from megatron_apex.models.sana.layer_spec import get_sana_layer_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def megatron_single_process():
    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)


@pytest.fixture(autouse=True)
def fresh_flash_attn_cache():
    gpu.flash_attn_module.cache_clear()
    yield
    gpu.flash_attn_module.cache_clear()


def parse(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    gpu.add_gpu_arguments(parser)
    return parser.parse_args(list(argv))


# ------------------------------------------------------------------------------ stand-ins
def _reference_attention(q, k, v, scale):
    """Softmax attention of one sequence, [s, h, d] (written independently of SDPA)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    weights = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    return torch.einsum("hqk,khd->qhd", weights.softmax(dim=-1), v.float()).to(q.dtype)


def fake_flash_attn(calls: list) -> types.ModuleType:
    """flash_attn's two entry points with its layouts and argument names, in plain torch."""
    module = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        assert not causal and dropout_p == 0.0
        calls.append("func")
        return torch.stack([_reference_attention(q[i], k[i], v[i], softmax_scale) for i in range(q.shape[0])])

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False):
        assert not causal and dropout_p == 0.0
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        lengths_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
        assert int(lengths_k.max()) <= max_seqlen_k and int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) <= \
            max_seqlen_q
        assert int(cu_seqlens_k[-1]) == k.shape[0] == v.shape[0] and int(cu_seqlens_q[-1]) == q.shape[0]
        calls.append(("varlen", lengths_k.tolist()))
        out = [_reference_attention(q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]], k[cu_seqlens_k[i]:cu_seqlens_k[i + 1]],
                                    v[cu_seqlens_k[i]:cu_seqlens_k[i + 1]], softmax_scale)
               for i in range(len(cu_seqlens_q) - 1)]
        return torch.cat(out)

    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


def install_fake_te(monkeypatch):
    te = types.ModuleType("transformer_engine")
    te.pytorch = types.ModuleType("transformer_engine.pytorch")
    monkeypatch.setitem(sys.modules, "transformer_engine", te)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", te.pytorch)


def hide(monkeypatch, *names):
    """Make ``import name`` raise ImportError even where the package is installed."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def randomized(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def qwen(attention_backend="auto", seed=0, **overrides):
    config = get_model_config("qwen-image-tiny-test", **overrides)
    spec = get_qwen_image_layer_spec("local", attention_backend=attention_backend)
    return config, randomized(build_model(config, spec=spec).eval(), seed)


def sana(attention_backend="auto", seed=0, **overrides):
    config = get_model_config("sana-tiny-test", **overrides)
    spec = get_sana_layer_spec("local", attention_backend=attention_backend)
    return config, randomized(build_model(config, spec=spec).eval(), seed)


def qwen_inputs(config, B=3, H=6, W=8, L=5):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, config.out_channels, H, W, generator=gen)
    t = torch.rand(B, generator=gen)
    ctx = torch.randn(B, L, config.joint_attention_dim, generator=gen)
    mask = torch.ones(B, L)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    return x, t, ctx, mask


def sana_inputs(config, B=3, H=6, W=8, L=5):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, config.in_channels, H, W, generator=gen)
    t = torch.rand(B, generator=gen)
    ctx = torch.randn(B, L, config.caption_channels, generator=gen)
    mask = torch.ones(B, L)
    mask[1, 2:] = 0
    mask[2, :] = 0  # an all-padded caption: diffusers' -10000 bias then averages every token
    return x, t, ctx, mask


# ------------------------------------------------------------------------------ imports
_IMPORT_PROBE = textwrap.dedent('''
    import importlib, importlib.abc, importlib.util, os, pkgutil, sys, tempfile
    root, probe_dir = sys.argv[1], sys.argv[2]
    ours = (os.path.join(root, "megatron_apex"), os.path.join(root, "tools"), os.path.join(root, "examples"),
            probe_dir)
    GPU = ("transformer_engine", "flash_attn", "apex", "nvidia")
    hits = []

    class Spy(importlib.abc.MetaPathFinder):
        """Records who asks for a GPU-only package, whether or not it is installed."""
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in GPU:
                frame = sys._getframe(1)
                while frame is not None and (frame.f_code.co_filename.startswith("<frozen")
                                             or os.sep + "importlib" + os.sep in frame.f_code.co_filename):
                    frame = frame.f_back
                where = frame.f_code.co_filename if frame is not None else "?"
                if where.startswith(ours):
                    hits.append(f"{name} <- {where}")
            return None

    sys.meta_path.insert(0, Spy())
    import megatron_apex
    names = [m.name for m in pkgutil.walk_packages(megatron_apex.__path__, "megatron_apex.")]
    for name in names:
        importlib.import_module(name)
    sys.path.insert(0, os.path.join(root, "tools"))
    files = sorted(os.path.join(d, f) for d in ("tools", "examples") for f in os.listdir(os.path.join(root, d))
                   if f.endswith(".py"))
    for path in files:
        spec = importlib.util.spec_from_file_location("probe_" + os.path.basename(path)[:-3], os.path.join(root, path))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # as an import would (dataclasses look their module up there)
        spec.loader.exec_module(module)
    # the probe itself must see an eager import (else this test could not fail)
    spec = importlib.util.spec_from_file_location("eager", os.path.join(probe_dir, "eager.py"))
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    eager = [h for h in hits if "eager.py" in h]
    hits = [h for h in hits if "eager.py" not in h]
    print("MODULES", len(names) + len(files))
    print("EAGER", len(eager))
    for h in hits:
        print("HIT", h)
''')


def test_importing_the_project_imports_no_gpu_only_package(tmp_path):
    (tmp_path / "eager.py").write_text("try:\n    import flash_attn\nexcept ImportError:\n    pass\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, str(ROOT), str(tmp_path)], capture_output=True,
                            text=True, env=env, cwd=str(ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "EAGER 1" in lines  # the spy catches an eager import
    assert int(next(line for line in lines if line.startswith("MODULES")).split()[1]) > 60
    assert [line for line in lines if line.startswith("HIT")] == []


# ------------------------------------------------------------------------------ selection
def test_auto_selects_te_and_flash_attn_when_they_import_and_cuda_is_there(monkeypatch):
    from megatron_apex.models.specs import resolve_backend

    install_fake_te(monkeypatch)
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn(calls))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    options = gpu.gpu_options_from_args(parse())
    assert options.transformer_impl == "transformer_engine" and options.spec_backend == "te"
    assert options.te_core_attention  # TE's own attention, its kernel chosen by TE
    assert resolve_backend("auto") == "te"
    # our core attention (e.g. next to local linears): auto runs flash-attn where it can
    monkeypatch.setattr(core_attention, "flash_attn_unsupported", lambda query: None)
    q = torch.randn(2, 3, 5, 8)
    out = core_attention.attention(q, q, q, kernel="auto")
    assert calls == ["func"]
    core_attention.attention(q, q, q, kernel="sdpa")  # --attention-backend local: SDPA, never flash-attn
    assert calls == ["func"]
    assert torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, q, q), atol=1e-6)


def test_auto_without_the_packages_selects_local_and_sdpa(monkeypatch):
    from megatron_apex.models.specs import resolve_backend

    hide(monkeypatch, "transformer_engine", "transformer_engine.pytorch", "flash_attn")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # even with CUDA
    options = gpu.gpu_options_from_args(parse())
    assert (options.transformer_impl, options.kernel) == ("local", "auto")
    assert resolve_backend("auto") == "local"
    seen = record_sdpa(monkeypatch)
    q = torch.randn(2, 3, 5, 8)
    core_attention.attention(q, q, q, kernel="auto")
    assert len(seen) == 1


def test_auto_without_cuda_selects_local_even_with_te(monkeypatch):
    install_fake_te(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.gpu_options_from_args(parse()).transformer_impl == "local"


@pytest.mark.parametrize("argv,flag", [
    (["--transformer-impl", "transformer_engine"], "--transformer-impl transformer_engine"),
    (["--attention-backend", "flash_attn"], "--attention-backend flash_attn"),
])
def test_forcing_a_missing_package_is_a_clear_error(monkeypatch, argv, flag):
    hide(monkeypatch, "transformer_engine", "transformer_engine.pytorch", "flash_attn")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match=flag + r".*does not import") as err:
        gpu.gpu_options_from_args(parse(*argv))
    assert "\n" not in str(err.value)


def test_forcing_gpu_paths_without_cuda_is_a_clear_error(monkeypatch):
    install_fake_te(monkeypatch)
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn([]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, flag in ((["--transformer-impl", "transformer_engine"], "--transformer-impl"),
                       (["--attention-backend", "flash_attn"], "--attention-backend flash_attn"),
                       (["--attention-backend", "fused"], "--attention-backend fused")):
        with pytest.raises(ValueError, match=flag + ".*CUDA"):
            gpu.gpu_options_from_args(parse(*argv))
    # forced flash-attn on a call it cannot take (CPU tensors here): an error, not a silent fallback
    with pytest.raises(ValueError, match="--attention-backend flash_attn.*CUDA"):
        q = torch.randn(1, 2, 4, 8)
        core_attention.attention(q, q, q, kernel="flash_attn")


def test_fp8_flags_need_transformer_engine(monkeypatch):
    hide(monkeypatch, "transformer_engine", "transformer_engine.pytorch")
    with pytest.raises(ValueError, match="--fp8-format hybrid needs --transformer-impl transformer_engine"):
        gpu.gpu_options_from_args(parse("--fp8-format", "hybrid"))
    with pytest.raises(ValueError, match="--fp8-format e4m3 needs --transformer-impl transformer_engine"):
        gpu.gpu_options_from_args(parse("--fp8-format", "e4m3", "--transformer-impl", "local"))
    with pytest.raises(ValueError, match="--fp8-margin needs --fp8-format"):
        gpu.gpu_options_from_args(parse("--fp8-margin", "1"))
    # a dry run for another machine: only what no hardware decides
    planned = gpu.gpu_options_from_args(parse("--fp8-format", "hybrid", "--bf16"), check_machine=False)
    assert (planned.transformer_impl, planned.fp8_format) == ("auto", "hybrid")
    assert gpu.model_overrides(planned) == {"params_dtype": "bfloat16"}
    with pytest.raises(ValueError, match="--fp8-format e4m3 needs --transformer-impl transformer_engine"):
        gpu.gpu_options_from_args(parse("--fp8-format", "e4m3", "--transformer-impl", "local"), check_machine=False)
    with pytest.raises(ValueError, match="--fp8-amax-history-len must be"):
        gpu.gpu_options_from_args(parse("--fp8-format", "hybrid", "--fp8-amax-history-len", "0"))
    # with TE and CUDA: the GPU must have FP8 tensor cores
    install_fake_te(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    with pytest.raises(ValueError, match="--fp8-format hybrid needs an FP8-capable GPU.*8.0"):
        gpu.gpu_options_from_args(parse("--fp8-format", "hybrid"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    options = gpu.gpu_options_from_args(parse("--fp8-format", "hybrid", "--fp8-amax-history-len", "16",
                                              "--fp8-amax-compute-algo", "max"))
    assert (options.fp8_format, options.fp8_amax_history_len, options.fp8_amax_compute_algo) == ("hybrid", 16, "max")


def test_fp8_fields_reach_a_copy_of_the_transformer_config():
    config, model = qwen()
    options = gpu.GpuOptions(transformer_impl="transformer_engine", fp8_format="e4m3", fp8_margin=2,
                             fp8_amax_history_len=8, fp8_amax_compute_algo="max", fp8_recipe="tensorwise")
    copy = gpu.fp8_transformer_config(options, model.config)
    assert (copy.fp8, copy.fp8_margin, copy.fp8_amax_history_len, copy.fp8_amax_compute_algo, copy.fp8_recipe) == \
        ("e4m3", 2, 8, "max", "tensorwise")
    assert model.config.fp8 is None and copy.hidden_size == model.config.hidden_size
    assert isinstance(gpu.fp8_context(gpu.GpuOptions(), model), type(gpu.fp8_context(gpu.GpuOptions(), None)))
    with pytest.raises(ValueError, match="--fp8-format hybrid needs --transformer-impl transformer_engine"):
        gpu.fp8_context(gpu.GpuOptions(transformer_impl="local", fp8_format="hybrid"), model)


# ------------------------------------------------------------------------------ specs
def test_te_spec_core_attention_follows_the_attention_backend(monkeypatch):
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_apex.models.qwen_image import layer_spec as qwen_spec
    from megatron_apex.models.qwen_image.layers import SDPAttention
    from megatron_apex.models.sana import layer_spec as sana_spec_module
    from megatron_apex.models.sana.layers import MaskedSDPAttention

    stand_ins = tuple(type(name, (), {}) for name in ("TECol", "TERow", "TEAttn", "TENorm"))
    for module in (qwen_spec, sana_spec_module):
        monkeypatch.setattr(module, "te_modules", lambda: stand_ins)
    core = lambda spec: spec.submodules.attention.submodules.core_attention  # noqa: E731
    assert core(qwen_spec.get_qwen_image_layer_spec("te", "flash")) is stand_ins[2]
    assert core(qwen_spec.get_qwen_image_layer_spec("transformer_engine", "auto")) is stand_ins[2]
    assert core(qwen_spec.get_qwen_image_layer_spec("local", "auto")) is SDPAttention  # the default: no params
    for backend, kernel in (("flash_attn", "flash_attn"), ("math", "unfused"), ("local", "sdpa")):
        spec = core(qwen_spec.get_qwen_image_layer_spec("te", backend))
        assert isinstance(spec, ModuleSpec) and spec.module is SDPAttention
        assert spec.params == {"attention_backend": kernel}
    sana_spec = sana_spec_module.get_sana_layer_spec("te", "flash")
    assert sana_spec.submodules.attention.submodules.linear_qkv is stand_ins[0]
    cross = sana_spec.submodules.cross_attention.submodules.core_attention
    assert cross.module is MaskedSDPAttention and cross.params == {"attention_backend": "flash"}


def test_layer_spec_sets_te_attention_environment(monkeypatch):
    from megatron_apex.models.qwen_image import layer_spec as qwen_spec

    monkeypatch.setattr(qwen_spec, "te_modules", lambda: tuple(type(n, (), {}) for n in "abcd"))
    for name in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):
        monkeypatch.setenv(name, "")  # recorded, so what layer_spec sets is undone after the test
        monkeypatch.delenv(name)
    config = get_model_config("qwen-image-tiny-test")
    families.layer_spec(config, gpu.GpuOptions(transformer_impl="transformer_engine", attention_backend="fused"))
    assert [os.environ[n] for n in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")] == ["0", "1", "0"]
    with pytest.raises(ValueError, match="--attention-backend flash needs NVTE_FLASH_ATTN=1"):
        families.layer_spec(config, gpu.GpuOptions(transformer_impl="transformer_engine", attention_backend="flash"))
    with pytest.raises(ValueError, match="resolved options"):
        families.layer_spec(config, gpu.GpuOptions())


# ------------------------------------------------------------------------------ SDPA kernels
def _enabled_sdpa_kernels() -> frozenset:
    """The SDPA kernels torch may pick right now (torch.nn.attention.sdpa_kernel sets these)."""
    cuda = torch.backends.cuda
    return frozenset(name for name, on in (
        ("flash", cuda.flash_sdp_enabled()), ("efficient", cuda.mem_efficient_sdp_enabled()),
        ("math", cuda.math_sdp_enabled()), ("cudnn", cuda.cudnn_sdp_enabled())) if on)


def record_sdpa(monkeypatch) -> list:
    """Patch SDPA to record, per call, the kernels torch may use at that moment."""
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((_enabled_sdpa_kernels(), kwargs.get("attn_mask") is not None))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


def test_sdpa_kernel_is_what_torch_sees(monkeypatch):
    hide(monkeypatch, "flash_attn")
    default = _enabled_sdpa_kernels()
    expected = {"unfused": ({"math"}, {"math"}), "flash": ({"flash"}, {"flash", "efficient"}),
                "auto": (default, default), "local": (default, default)}
    config, reference = qwen("unfused")
    x, t, ctx, mask = qwen_inputs(config)
    with torch.no_grad():
        want = {m is None: reference(x, t, ctx, m) for m in (None, mask)}
    for backend, (unmasked, masked) in expected.items():
        _, model = qwen(backend)
        model.load_state_dict(reference.state_dict())
        seen = record_sdpa(monkeypatch)
        for m in (None, mask):
            with torch.no_grad():
                out = model(x, t, ctx, m)
            assert torch.allclose(out, want[m is None], atol=1e-5), backend
        layers = config.num_layers
        assert seen == [(frozenset(unmasked), False)] * layers + [(frozenset(masked), True)] * layers, backend
    # Sana's cross-attention takes its kernel the same way (its bias is a mask)
    config, model = sana("flash")
    seen = record_sdpa(monkeypatch)
    with torch.no_grad():
        model(*sana_inputs(config))
    assert seen == [(frozenset({"flash", "efficient"}), True)] * config.num_layers


def test_unknown_kernel_is_refused():
    from megatron_apex.models.qwen_image.layers import SDPAttention

    config, model = qwen()
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        SDPAttention(model.config, attention_backend="xformers")
    with pytest.raises(ValueError, match="--attention-backend must be one of"):
        get_qwen_image_layer_spec("local", attention_backend="xformers")


# ------------------------------------------------------------------------------ flash-attn
@pytest.mark.parametrize("family", ["qwen", "sana"])
def test_flash_attn_path_keeps_the_mask_semantics(monkeypatch, family):
    """flash-attn (stand-in, same layouts and arguments) with varlen for the padded text
    equals SDPA with the mask / diffusers' caption bias: outputs and gradients."""
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn(calls))
    monkeypatch.setattr(core_attention, "flash_attn_unsupported", lambda query: None)  # CPU float32 here
    build, make_inputs = (qwen, qwen_inputs) if family == "qwen" else (sana, sana_inputs)
    config, reference = build("unfused")
    _, model = build("flash_attn")
    model.load_state_dict(reference.state_dict())
    x, t, ctx, mask = make_inputs(config)
    # An all-padded caption under diffusers' -10000 bias is attention over every token
    # (softmax is shift-invariant); the reference computes it that way, without the float32
    # rounding of logit - 10000 (checked to 1e-3 below).
    unpadded = mask.clone()
    unpadded[mask.sum(dim=1) == 0] = 1
    if family == "sana":
        with torch.no_grad():
            biased, exact = reference(x, t, ctx, mask), reference(x, t, ctx, unpadded)
        assert torch.allclose(biased, exact, atol=1e-3) and not torch.equal(unpadded, mask)
    for m, m_ref in ((None, None), (mask, unpadded)):
        outs, grads = [], []
        for net, net_mask in ((reference, m_ref), (model, m)):
            net.zero_grad()
            out = net(x, t, ctx, net_mask)
            (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
            outs.append(out.detach())
            grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
        assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5), family
        assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-5), family
    layers = config.num_layers
    if family == "qwen":  # joint attention: image then text keys; sample 2 keeps 1 text token
        n_img = (6 // config.patch_size) * (8 // config.patch_size)
        varlen = ("varlen", [5 + n_img, 3 + n_img, 1 + n_img])
        assert calls == ["func"] * layers + [varlen] * layers  # the backward runs through autograd
    else:  # cross-attention; the all-padded caption attends to every token (the -10000 bias)
        assert calls == ["func"] * layers + [("varlen", [5, 2, 5])] * layers


# ------------------------------------------------------------------------------ bf16
@pytest.mark.parametrize("name", ["qwen-image-tiny-test", "sana-tiny-test"])
def test_bf16_flag_gives_bfloat16_parameters(name):
    for argv, dtype in (([], torch.float32), (["--bf16"], torch.bfloat16)):
        options = gpu.gpu_options_from_args(parse(*argv))
        config = get_model_config(name, **gpu.model_overrides(options))
        model = build_model(config, spec=families.layer_spec(config, options))
        assert {p.dtype for p in model.parameters()} == {dtype}, argv
        assert model.config.params_dtype == dtype and model.config.bf16 == (dtype == torch.bfloat16)


# ------------------------------------------------------------------------------ fused Adam
def test_adam_class_name_is_what_megatron_builds():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config, model = qwen()
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3), [ddp])
    built = gpu.adam_class_name(optimizer)
    assert built == gpu.adam_class_name()
    inner = gpu._inner_optimizers(optimizer)
    assert built == f"{type(inner[0]).__module__}.{type(inner[0]).__qualname__}"
    assert "adam" in built.lower()
    line = gpu.describe(gpu.GpuOptions(transformer_impl="local", bf16=True), optimizer)
    assert built in line and "bfloat16 params" in line


def _megatron_adam(seed=0):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config, model = qwen(seed=seed)
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)
    return model, get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1), [ddp])


def _fill_grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.main_grad.copy_(torch.randn(p.shape, generator=gen))


def test_torch_adam_runs_fused_where_megatron_fell_back_to_it(monkeypatch):
    """Without TE and apex megatron builds torch's AdamW with torch's defaults (foreach on
    CUDA). use_fused_torch_adam turns on torch's fused kernel when every parameter is a CUDA
    tensor; the CPU stands in for CUDA here (torch's fused Adam also runs on the CPU)."""
    import megatron.core.optimizer as mopt

    assert mopt.USING_PYTORCH_OPTIMIZER  # this machine: no TE, no apex
    model, optimizer = _megatron_adam()
    assert not gpu.use_fused_torch_adam(optimizer)  # CPU tensors: left as megatron built it
    assert "(fused)" not in gpu.adam_class_name(optimizer)
    monkeypatch.setattr(gpu, "_fused_adam_capable", lambda p: p.is_floating_point())
    reference_model, reference = _megatron_adam()
    assert gpu.use_fused_torch_adam(optimizer)
    assert gpu.adam_class_name(optimizer) == "torch.optim.adamw.AdamW (fused)"
    assert "adam=torch.optim.adamw.AdamW (fused)" in gpu.describe(gpu.GpuOptions(transformer_impl="local"), optimizer)
    calls = []
    fused_kernel = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(1) or fused_kernel(*a, **k))
    for step in range(2):
        for m, opt in ((model, optimizer), (reference_model, reference)):
            _fill_grads(m, step)
            opt.step()
    groups = len(gpu._inner_optimizers(optimizer)[0].param_groups)
    assert len(calls) == 2 * groups  # a fused call per group and step; the reference ran the unfused path
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    # a checkpoint of the unfused run restores its groups' settings; the hook puts fused back
    optimizer.load_state_dict(reference.state_dict())
    assert gpu.adam_class_name(optimizer).endswith("(fused)")
    inner = gpu._inner_optimizers(optimizer)[0]
    steps = [s["step"] for s in inner.state.values()]
    assert steps and all(t.dtype == torch.float32 and float(t) == 2 for t in steps)


def test_fused_adam_of_te_or_apex_is_left_as_megatron_built_it(monkeypatch):
    import megatron.core.optimizer as mopt

    model, optimizer = _megatron_adam()
    monkeypatch.setattr(gpu, "_fused_adam_capable", lambda p: True)
    monkeypatch.setattr(mopt, "USING_PYTORCH_OPTIMIZER", False)  # megatron picked TE's or apex's FusedAdam
    assert not gpu.use_fused_torch_adam(optimizer)
    assert all(not group.get("fused") for group in gpu._inner_optimizers(optimizer)[0].param_groups)


class _StandInFusedAdam(torch.optim.AdamW):
    """What megatron builds from TE's / apex's FusedAdam (it passes adam_w_mode)."""

    def __init__(self, params, adam_w_mode=True, **kwargs):
        self.adam_w_mode = adam_w_mode
        super().__init__(params, **kwargs)


def test_the_trainer_keeps_megatrons_choice_of_adam(monkeypatch, tmp_path, capsys):
    """Our optimizer construction goes through megatron's get_megatron_optimizer: where TE or
    apex is installed megatron's FusedAdam is what trains (stand-in class here)."""
    import megatron.core.optimizer as mopt

    from megatron_apex.training.arguments import parse_args
    from megatron_apex.training.loop import Trainer

    monkeypatch.setattr(mopt, "Adam", _StandInFusedAdam)
    monkeypatch.setattr(mopt, "USING_PYTORCH_OPTIMIZER", False)
    trainer = Trainer(parse_args(["--model", "qwen-image-tiny", "--num-layers", "1", "--micro-batch-size", "2",
                                  "--no-progress", "--train-iters", "1", "--save", str(tmp_path / "run")]))
    inner = gpu._inner_optimizers(trainer.optimizer)
    assert inner and all(type(o) is _StandInFusedAdam and o.adam_w_mode for o in inner)
    assert f"adam={__name__}._StandInFusedAdam" in capsys.readouterr().out


# ------------------------------------------------------------------------------ TE version pin
def test_transformer_engine_pin_is_the_range_megatron_core_is_tested_with():
    """setup.py's gpu extra allows exactly the Transformer Engine versions megatron-core's own
    "dev" extra allows (what its CI runs); a megatron-core upgrade fails here until the pin is
    checked against the new one."""
    import re
    from importlib.metadata import distribution

    from packaging.requirements import Requirement

    megatron = distribution("megatron-core")
    if megatron.version != "0.16.1":
        pytest.skip(f"the pin is for megatron-core 0.16.1, this is {megatron.version}")
    ours = Requirement(re.search(r'TRANSFORMER_ENGINE = "([^"]+)"', (ROOT / "setup.py").read_text()).group(1))
    theirs = [Requirement(r) for r in megatron.requires or []]
    theirs = [r for r in theirs if r.name == "transformer-engine" and r.marker and r.marker.evaluate({"extra": "dev"})]
    assert len(theirs) == 1 and "pytorch" in ours.extras and "pytorch" in theirs[0].extras
    for probe in ("2.8.0", "2.9.0", "2.10.0", "2.11.0", "2.11.9", "2.12.0", "2.20.2", "3.0.0"):
        assert ours.specifier.contains(probe) == theirs[0].specifier.contains(probe), probe
    assert ours.specifier.contains("2.11.0") and not ours.specifier.contains("2.12.0")


# ------------------------------------------------------------------------------ MFU formulas
def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_forward_flop_formulas_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    check = _gpu_check_module()
    for build, make_inputs, formula in ((qwen, qwen_inputs, check.qwen_image_forward_flops),
                                        (sana, sana_inputs, check.sana_forward_flops)):
        for target in (True, False):
            config, model = build("unfused", target_time_embedder=target)  # math SDPA: counted matmuls
            x, t, ctx, mask = make_inputs(config, B=3, H=6, W=10, L=7)
            # with grad, as in training: a no-grad query without t_target skips the target-time term
            with FlopCounterMode(display=False) as counter:
                model(x, t, ctx, mask)
            p = config.patch_size
            assert formula(config, 3, 6 // p, 10 // p, 7) == counter.get_total_flops(), (build.__name__, target)


def test_peak_table_matches_device_names():
    check = _gpu_check_module()
    assert check.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert check.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert check.peak_bf16_flops("NVIDIA H200") == 989e12
    assert check.peak_bf16_flops("Some Future GPU") is None


# ------------------------------------------------------------------------------ FP8 in the steps
class _Fp8Recorder:
    """Stand-in for TE's fp8_autocast (what megatron's get_fp8_context returns): counts the
    contexts entered and knows whether one is open. With it, every model forward (a pre-hook)
    and backward (a full backward hook) records whether it ran inside FP8, and the stand-in
    TE linear (a module with ``is_first_microbatch``, as megatron's TE wrappers have) records
    the flag each forward saw, then clears it as they do."""

    def __init__(self):
        self.depth = self.entered = 0
        self.configs = []
        self.forwards, self.backwards, self.first_flags = [], [], []

    def get_fp8_context(self, config, layer_no=-1, is_init=False):
        self.configs.append(config)
        recorder = self

        class Autocast:
            def __enter__(self):
                recorder.depth += 1
                recorder.entered += 1

            def __exit__(self, *exc):
                recorder.depth -= 1

        return Autocast()

    def watch(self, module, name):
        module.register_forward_pre_hook(lambda m, args: self.forwards.append((name, self.depth > 0)))
        module.register_full_backward_hook(lambda m, gin, gout: self.backwards.append((name, self.depth > 0)))

    def watch_cache_flag(self, module):
        module.is_first_microbatch = True

        def seen(m, args):
            self.first_flags.append(m.is_first_microbatch)
            m.is_first_microbatch = False

        module.register_forward_pre_hook(seen)


_FP8_FLAGS = ["--model", "qwen-image-tiny", "--num-layers", "1", "--micro-batch-size", "2", "--global-batch-size", "4",
              "--no-progress", "--train-iters", "4", "--apex-variant", "released", "--teacher", "frozen",
              "--apex-option", "w_dm=1.0", "--apex-option", "dm_warmup_steps=0", "--ema-decay", "0"]


def _fp8_trainer(monkeypatch, tmp_path, schedule):
    """A CPU Trainer built with --fp8-format hybrid on TE layers as far as it can tell: the
    layer spec stays local and the autocast is the stand-in. One step first, so the frozen
    teacher exists; the recorder starts after it."""
    import dataclasses

    import megatron.core.fp8_utils as fp8_utils

    from megatron_apex.training.arguments import parse_args
    from megatron_apex.training.loop import Trainer

    local_spec = families.layer_spec
    monkeypatch.setattr(families, "layer_spec", lambda config, options: local_spec(
        config, dataclasses.replace(options, transformer_impl="local", fp8_format=None)))
    cfg = parse_args([*_FP8_FLAGS, "--apex-schedule", schedule, "--save", str(tmp_path / schedule)])
    cfg.gpu = dataclasses.replace(cfg.gpu, transformer_impl="transformer_engine", fp8_format="hybrid")
    monkeypatch.setattr(fp8_utils, "get_fp8_context", _Fp8Recorder().get_fp8_context)
    trainer = Trainer(cfg)  # the two-phase step used to refuse --fp8-format here
    assert trainer.two_phase == (schedule == "two-phase")
    trainer.train_step()
    recorder = _Fp8Recorder()
    monkeypatch.setattr(fp8_utils, "get_fp8_context", recorder.get_fp8_context)
    recorder.watch(trainer.model, "model")
    recorder.watch(trainer.teacher, "teacher")
    recorder.watch_cache_flag(trainer.model.layers[0].attention.linear_qkv)
    return trainer, recorder


@pytest.mark.parametrize("schedule", ["direct", "two-phase"])
def test_every_forward_of_a_step_runs_in_fp8_and_no_backward_does(monkeypatch, tmp_path, schedule):
    trainer, recorder = _fp8_trainer(monkeypatch, tmp_path, schedule)
    micro_batches = trainer.num_microbatches
    for _ in range(2):
        trainer.train_step()
    names = [name for name, _ in recorder.forwards]
    assert names.count("teacher") == 2 * micro_batches  # the released DM term asks the frozen teacher once
    assert names.count("model") >= 2 * 3 * micro_batches  # one-step, fake and trained queries at least
    assert all(inside for _, inside in recorder.forwards), recorder.forwards
    assert recorder.backwards and not any(inside for _, inside in recorder.backwards)
    assert all(c.fp8 == "hybrid" for c in recorder.configs)
    if schedule == "direct":  # one context per micro-batch's forward step
        assert recorder.entered == 2 * micro_batches
    else:  # one per micro-batch of every pass: the no-grad rounds, then the training pass
        batch = trainer.micro_batches(list(range(4)))[0]
        rounds = trainer.step.two_phase_objective(batch, trainer.iteration, trainer.teacher).num_rounds
        assert recorder.entered == 2 * micro_batches * (rounds + 1)
    # the FP8 weight cache is refreshed once per iteration: the first forward of each step
    # quantizes the weights the optimizer just changed, the others reuse them
    per_step = len(recorder.first_flags) // 2
    assert recorder.first_flags == ([True] + [False] * (per_step - 1)) * 2
