"""GPU fast paths, chosen once from the command line: Transformer Engine (TE) layers and FP8,
the attention kernel, BF16 parameters, and which fused Adam megatron-core picked.

Flags (Megatron-LM's names; docs/gpu.md has the full rules):
  --transformer-impl local|transformer_engine|auto   auto = TE when ``transformer_engine.pytorch``
      imports and CUDA is available, else local (megatron-core's linears + our SDPA core attention).
  --attention-backend auto|flash|fused|unfused|math|local|flash_attn
      Megatron-LM's ``AttnBackend`` names, plus ``math`` (torch's name for ``unfused``) and
      ``flash_attn`` (the flash-attn package). With TE layers, auto/flash/fused/unfused pick the
      kernel inside TE's DotProductAttention (NVTE_* variables, as megatron's LanguageModule
      does) and local/flash_attn keep our core attention next to TE's linears. Our core
      attention runs the kernel ``kernel_for`` names (megatron_apex/models/common/attention.py
      runs it: ``local`` is SDPA letting torch choose, ``math`` is ``unfused``).
  --fp8-format e4m3|hybrid (+ --fp8-recipe, --fp8-margin, --fp8-amax-history-len,
      --fp8-amax-compute-algo): TE's fp8_autocast around the model forward (``fp8_context``);
      only with TE layers on an FP8-capable GPU.
  --bf16: parameters in bfloat16 (``model_overrides``); megatron's DDP keeps the gradients in
      fp32 (grad_reduce_in_fp32) and its optimizer the fp32 main weights.

Adam: megatron-core's own choice (TE's FusedAdam, else apex's, else torch's AdamW); its torch
AdamW runs torch's fused kernel on CUDA (``use_fused_torch_adam``).

Nothing here imports torch, transformer_engine, flash_attn or apex at module load (argument
parsing stays light); they are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import importlib
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "math", "local", "flash_attn")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
FP8_AMAX_COMPUTE_ALGOS = ("most_recent", "max")
# TE DotProductAttention kernels, selected by environment variables (megatron's LanguageModule).
_TE_ATTENTION_ENV = {
    "auto": {"NVTE_FLASH_ATTN": "1", "NVTE_FUSED_ATTN": "1", "NVTE_UNFUSED_ATTN": "1"},
    "flash": {"NVTE_FLASH_ATTN": "1", "NVTE_FUSED_ATTN": "0", "NVTE_UNFUSED_ATTN": "0"},
    "fused": {"NVTE_FLASH_ATTN": "0", "NVTE_FUSED_ATTN": "1", "NVTE_UNFUSED_ATTN": "0"},
    "unfused": {"NVTE_FLASH_ATTN": "0", "NVTE_FUSED_ATTN": "0", "NVTE_UNFUSED_ATTN": "1"},
}
TE_ATTENTION_BACKENDS = tuple(_TE_ATTENTION_ENV)
# FP8 tensor cores start at compute capability 8.9 (Ada, Hopper).
_FP8_MIN_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class GpuOptions:
    """The GPU-path flags. ``gpu_options_from_args`` returns them resolved: ``transformer_impl``
    is then ``local`` or ``transformer_engine`` and ``math`` is spelled ``unfused``."""

    transformer_impl: str = "auto"
    attention_backend: str = "auto"
    fp8_format: Optional[str] = None  # None = no FP8
    fp8_recipe: str = "delayed"
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1
    fp8_amax_compute_algo: str = "most_recent"
    bf16: bool = False

    def validate(self) -> "GpuOptions":
        """Checks that need no hardware: choices, integer ranges."""
        for name, choices in (("transformer_impl", TRANSFORMER_IMPLS), ("attention_backend", ATTENTION_BACKENDS),
                              ("fp8_recipe", FP8_RECIPES), ("fp8_amax_compute_algo", FP8_AMAX_COMPUTE_ALGOS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{_flag(name)} must be one of {choices}, got {getattr(self, name)!r}")
        if self.fp8_format is not None and self.fp8_format not in FP8_FORMATS:
            raise ValueError(f"--fp8-format must be one of {FP8_FORMATS}, got {self.fp8_format!r}")
        if not isinstance(self.fp8_margin, int) or self.fp8_margin < 0:
            raise ValueError(f"--fp8-margin must be an integer >= 0, got {self.fp8_margin!r}")
        if not isinstance(self.fp8_amax_history_len, int) or self.fp8_amax_history_len < 1:
            raise ValueError(f"--fp8-amax-history-len must be an integer >= 1, got {self.fp8_amax_history_len!r}")
        return self

    @property
    def uses_transformer_engine(self) -> bool:
        return self.transformer_impl == "transformer_engine"

    @property
    def te_core_attention(self) -> bool:
        """TE's DotProductAttention as the core attention (else ours, next to TE's linears)."""
        return self.uses_transformer_engine and self.attention_backend in TE_ATTENTION_BACKENDS

    @property
    def kernel(self) -> str:
        """What our core-attention modules run (one of models/common/attention.py's ``KERNELS``)."""
        return kernel_for(self.attention_backend)

    @property
    def spec_backend(self) -> str:
        """The layer-spec backend name of models/specs.py."""
        return "te" if self.uses_transformer_engine else "local"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def kernel_for(attention_backend: str) -> str:
    """--attention-backend -> what our core attention runs: ``math`` is ``unfused``; ``local``
    (megatron's "PyTorch, not TE's attention") is ``sdpa``, SDPA letting torch choose."""
    if attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention-backend must be one of {ATTENTION_BACKENDS}, got {attention_backend!r}")
    return {"math": "unfused", "local": "sdpa"}.get(attention_backend, attention_backend)


# ============================================================================ flags
def add_gpu_arguments(group) -> None:
    """Add the GPU-path flags to an argparse parser or argument group (``--bf16`` included:
    a parser that already defines ``--bf16`` must drop its own)."""
    group.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS, default="auto",
                       help="layer implementation: Transformer Engine, local (megatron-core + PyTorch), or auto "
                            "(Transformer Engine when it imports and CUDA is available)")
    group.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                       help="attention kernel (Megatron-LM's names; math = unfused; flash_attn = the flash-attn "
                            "package); see docs/gpu.md")
    group.add_argument("--fp8-format", choices=FP8_FORMATS, default=None,
                       help="FP8 through Transformer Engine: e4m3 everywhere, or hybrid (e4m3 forward, e5m2 "
                            "gradients); needs --transformer-impl transformer_engine")
    group.add_argument("--fp8-recipe", choices=FP8_RECIPES, default=None,
                       help=f"FP8 scaling recipe (default {GpuOptions.fp8_recipe})")
    group.add_argument("--fp8-margin", type=int, default=None,
                       help=f"scaling-factor margin (default {GpuOptions.fp8_margin})")
    group.add_argument("--fp8-amax-history-len", type=int, default=None,
                       help=f"amax history window (default {GpuOptions.fp8_amax_history_len})")
    group.add_argument("--fp8-amax-compute-algo", choices=FP8_AMAX_COMPUTE_ALGOS, default=None,
                       help=f"amax from the history (default {GpuOptions.fp8_amax_compute_algo})")
    group.add_argument("--bf16", action="store_true",
                       help="bfloat16 parameters and activations; fp32 gradients (DDP) and fp32 main weights "
                            "(optimizer)")


_FP8_KNOBS = ("fp8_recipe", "fp8_margin", "fp8_amax_history_len", "fp8_amax_compute_algo")


def gpu_options_from_args(args: argparse.Namespace, check_machine: bool = True) -> GpuOptions:
    """The parsed flags, validated and (``check_machine``) resolved for this machine: one-line
    ValueError naming the flag for what cannot run here. ``check_machine=False`` (a dry run
    planning for another machine) checks only what no hardware decides and keeps ``auto``."""
    knobs = {name: getattr(args, name) for name in _FP8_KNOBS if getattr(args, name, None) is not None}
    fp8_format = getattr(args, "fp8_format", None)
    if fp8_format is None and knobs:
        raise ValueError(f"{_flag(sorted(knobs)[0])} needs --fp8-format (FP8 is off)")
    options = GpuOptions(transformer_impl=getattr(args, "transformer_impl", "auto"),
                         attention_backend=getattr(args, "attention_backend", "auto"),
                         fp8_format=fp8_format, bf16=bool(getattr(args, "bf16", False)), **knobs).validate()
    if options.fp8_format is not None and options.transformer_impl == "local":
        raise ValueError(f"--fp8-format {options.fp8_format} needs --transformer-impl transformer_engine")
    return resolve_gpu_options(options) if check_machine else options


def resolve_gpu_options(options: GpuOptions) -> GpuOptions:
    """``auto`` replaced by what this machine runs; forced choices checked against it."""
    options.validate()
    cuda = _cuda_available()
    impl = options.transformer_impl
    if impl == "auto":
        impl = "transformer_engine" if cuda and transformer_engine_unavailable() is None else "local"
    elif impl == "transformer_engine":
        reason = transformer_engine_unavailable() or (None if cuda else "CUDA is not available")
        if reason:
            raise ValueError(f"--transformer-impl transformer_engine cannot run here ({reason}); "
                             "use --transformer-impl local or auto")
    attention = "unfused" if options.attention_backend == "math" else options.attention_backend
    if attention == "flash_attn":
        reason = flash_attn_unavailable() or (None if cuda else "CUDA is not available")
        if reason:
            raise ValueError(f"--attention-backend flash_attn cannot run here ({reason}); use --attention-backend "
                             "auto (SDPA)")
    if attention == "fused" and not cuda:
        raise ValueError("--attention-backend fused needs CUDA (the fused SDPA kernels are GPU-only); use auto, "
                         "flash or unfused")
    if options.fp8_format is not None:
        if impl != "transformer_engine":
            why = "" if options.transformer_impl == "local" else \
                f" (--transformer-impl {options.transformer_impl} resolved to local: " \
                f"{transformer_engine_unavailable() or 'CUDA is not available'})"
            raise ValueError(f"--fp8-format {options.fp8_format} needs --transformer-impl transformer_engine{why}")
        capability = _cuda_capability()
        if capability < _FP8_MIN_CAPABILITY:
            raise ValueError(f"--fp8-format {options.fp8_format} needs an FP8-capable GPU (compute capability >= "
                             f"{_FP8_MIN_CAPABILITY[0]}.{_FP8_MIN_CAPABILITY[1]}, e.g. H100); this one is "
                             f"{capability[0]}.{capability[1]}")
    return dataclasses.replace(options, transformer_impl=impl, attention_backend=attention)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _cuda_capability() -> tuple:
    import torch

    return tuple(torch.cuda.get_device_capability())


def transformer_engine_unavailable() -> Optional[str]:
    """None when Transformer Engine's PyTorch part imports, else why not."""
    try:
        importlib.import_module("transformer_engine.pytorch")
    except (ImportError, OSError) as exc:  # OSError: a wheel built against another CUDA / torch
        return f"transformer_engine does not import: {exc}"
    return None


@functools.lru_cache(maxsize=None)
def flash_attn_module():
    """The flash-attn package (None when it does not import). Cached: it is asked per call."""
    try:
        module = importlib.import_module("flash_attn")
        module.flash_attn_func, module.flash_attn_varlen_func  # noqa: B018  (both are needed)
    except (ImportError, OSError, AttributeError):
        return None
    return module


def flash_attn_unavailable() -> Optional[str]:
    return None if flash_attn_module() is not None else "flash_attn does not import (pip install flash-attn)"


# ============================================================================ model side
def model_overrides(options: GpuOptions) -> Dict[str, Any]:
    """Model-config fields the options decide (merged into RunConfig.model_overrides)."""
    return {"params_dtype": "bfloat16"} if options.bf16 else {}


def set_te_attention_environment(backend: str) -> None:
    """NVTE_FLASH_ATTN / NVTE_FUSED_ATTN / NVTE_UNFUSED_ATTN for TE's DotProductAttention; a
    conflicting value already in the environment is an error (megatron's rule)."""
    if backend not in _TE_ATTENTION_ENV:
        raise ValueError(f"--attention-backend {backend!r} does not select a Transformer Engine attention kernel; "
                         f"one of {tuple(_TE_ATTENTION_ENV)}")
    for name, value in _TE_ATTENTION_ENV[backend].items():
        current = os.environ.get(name)
        if current is not None and current != value:
            raise ValueError(f"--attention-backend {backend} needs {name}={value} but the environment has "
                             f"{name}={current}; unset NVTE_FLASH_ATTN, NVTE_FUSED_ATTN and NVTE_UNFUSED_ATTN")
    os.environ.update(_TE_ATTENTION_ENV[backend])


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def fp8_transformer_config(options: GpuOptions, transformer_config):
    """A shallow copy of the model's megatron ``TransformerConfig`` with the FP8 fields set
    (the model keeps its own: FP8 only acts through the autocast context)."""
    config = copy.copy(transformer_config)
    config.fp8 = options.fp8_format
    config.fp8_recipe = options.fp8_recipe
    config.fp8_margin = options.fp8_margin
    config.fp8_amax_history_len = options.fp8_amax_history_len
    config.fp8_amax_compute_algo = options.fp8_amax_compute_algo
    return config


def fp8_context(options: GpuOptions, model):
    """Context for the model's forward: TE's fp8_autocast (megatron-core's get_fp8_context,
    amax reduced over its amax group) when --fp8-format is set, else a no-op. Our models do
    not use megatron's TransformerBlock, which would enter it itself. The trainer enters it
    per micro-batch around every forward it runs, the no-grad ones (teacher, fake-flow and
    one-step queries) included, and never around a backward (megatron's schedule runs those
    outside the forward step, as with its own TransformerBlock)."""
    if options.fp8_format is None:
        return contextlib.nullcontext()
    if not options.uses_transformer_engine:
        raise ValueError(f"--fp8-format {options.fp8_format} needs --transformer-impl transformer_engine")
    from megatron.core.fp8_utils import get_fp8_context

    return get_fp8_context(fp8_transformer_config(options, _unwrap(model).config))


def refresh_fp8_weight_cache(options: GpuOptions, model) -> None:
    """Call before the first forward of a training iteration. megatron's TE linears pass TE
    ``is_first_microbatch``: True quantizes the weights to FP8 and caches them, False reuses
    the cache, and they set it False after every forward. megatron's schedules set it back at
    each global batch only when the MODEL's config has ``fp8`` set, which ours does not (FP8
    acts through ``fp8_context`` alone), so without this every step would reuse the FP8
    weights of the first one. No-op without --fp8-format."""
    if options.fp8_format is None:
        return
    for module in _unwrap(model).modules():
        if hasattr(module, "is_first_microbatch"):
            module.is_first_microbatch = True


# ============================================================================ optimizer
def adam_class_name(optimizer=None) -> str:
    """The Adam class megatron-core uses: TE's FusedAdam when TE imports, else apex's FusedAdam,
    else torch's AdamW (decided when megatron.core.optimizer is imported; megatron has no flag
    to opt out). Given a built megatron optimizer, the class it actually holds, with
    ``(fused)`` when torch's AdamW runs its fused kernel (``use_fused_torch_adam``)."""
    if optimizer is not None:
        inner = _inner_optimizers(optimizer)
        names = sorted({f"{type(o).__module__}.{type(o).__qualname__}" + (" (fused)" if _runs_fused(o) else "")
                        for o in inner})
        return ", ".join(names)
    import megatron.core.optimizer as mopt

    if mopt.USING_PYTORCH_OPTIMIZER:
        return "torch.optim.adamw.AdamW"
    return f"{mopt.Adam.__module__}.{mopt.Adam.__qualname__}"


def _inner_optimizers(optimizer) -> list:
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:
        return [o for c in chained for o in _inner_optimizers(c)]
    inner = getattr(optimizer, "optimizer", None)
    return [inner] if inner is not None else [optimizer]


def _torch_adams(optimizer) -> list:
    import torch

    return [o for o in _inner_optimizers(optimizer) if isinstance(o, (torch.optim.Adam, torch.optim.AdamW))]


def _runs_fused(inner) -> bool:
    return bool(inner.param_groups) and all(group.get("fused") for group in inner.param_groups)


def _fused_adam_capable(param) -> bool:
    """torch's fused Adam kernel is used on CUDA only (the CPU keeps the reference numerics)."""
    return param.device.type == "cuda" and param.is_floating_point()


def use_fused_torch_adam(optimizer) -> bool:
    """megatron-core falls back to ``torch.optim.AdamW`` (or Adam) without TE and apex and
    builds it with torch's defaults, which on CUDA run the multi-tensor ``foreach`` kernels,
    not torch's fused one; it has no option to ask for ``fused=True``. This sets ``fused`` on
    such an optimizer's param groups when every parameter is a floating-point CUDA tensor
    (what torch's constructor would check), moves any ``step`` already held to the parameter's
    device (torch keeps it there for the fused kernel), and does the same after every
    ``load_state_dict`` (which restores the saved groups' settings). TE's and apex's FusedAdam
    (megatron's first choices) are left as megatron built them. Returns whether a torch Adam
    now runs fused."""
    import megatron.core.optimizer as mopt

    if not mopt.USING_PYTORCH_OPTIMIZER:
        return False
    fused = False
    for inner in _torch_adams(optimizer):
        params = [p for group in inner.param_groups for p in group["params"]]
        if not params or not all(_fused_adam_capable(p) for p in params) or \
                any(group.get("differentiable") for group in inner.param_groups):
            continue
        _set_fused(inner)
        if not getattr(inner, "_megatron_apex_fused_hook", False):
            inner.register_load_state_dict_post_hook(_set_fused)
            inner._megatron_apex_fused_hook = True
        fused = True
    return fused


def _set_fused(inner) -> None:
    import torch

    for group in inner.param_groups:
        group["fused"] = True
        if group.get("foreach"):
            group["foreach"] = None  # torch refuses fused and foreach together
        for p in group["params"]:
            state = inner.state.get(p)
            if state and torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def describe(options: GpuOptions, optimizer=None) -> str:
    """One line for the start of a run."""
    if options.te_core_attention:
        attention = f"{options.attention_backend} (Transformer Engine DotProductAttention)"
    elif options.kernel == "auto":
        attention = "auto (" + ("flash-attn for bf16/fp16 CUDA calls, else " if flash_attn_module() else "") + \
            "SDPA, torch chooses)"
    elif options.kernel == "sdpa":
        attention = "local (SDPA, torch chooses)"
    else:
        attention = options.kernel
    fp8 = "off" if options.fp8_format is None else \
        f"{options.fp8_format} ({options.fp8_recipe}, margin {options.fp8_margin}, amax history " \
        f"{options.fp8_amax_history_len}, {options.fp8_amax_compute_algo})"
    params = "bfloat16 params, fp32 grads and main weights" if options.bf16 else "float32 params"
    return (f"transformer_impl={options.transformer_impl}, attention={attention}, fp8={fp8}, {params}, "
            f"adam={adam_class_name(optimizer)}")
