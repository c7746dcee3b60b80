"""LoRA adapters on megatron-core tensor-parallel linears, correct under tensor parallelism.

An adapted module keeps its class's behaviour and its parameter names (``weight``, ``bias``:
base checkpoints and conversion tables still apply); its class is swapped for a subclass that
adds ``lora_A`` (r x in) and ``lora_B`` (out x r) and adds ``scale * B A x`` to the output.

Under tensor parallelism (TP) the adapter is sharded like its base:
- column-parallel base (output sharded): A replicated, B sharded on dim 0 like the weight;
  ``h = A x`` enters megatron's copy-to-TP region (identity forward, all-reduce of dL/dh
  backward, since every rank's B shard contributes to it), then ``B_local h`` is this rank's
  slice of the output (all-gathered when the base gathers its output).
- row-parallel base (input sharded): A sharded on dim 1 like the weight, B replicated; the
  partial ``A_local x_local`` is all-reduced over TP (on the r-wide ``h`` rather than on the
  output: the same sum, r / out of the traffic), then ``B h`` is added to the base's already
  reduced output. Result: exactly the unsharded LoRA.
- plain ``torch.nn.Linear`` (replicated under TP): A and B replicated, no communication.
Gradients of replicated adapter tensors are identical on every TP rank (their inputs are),
so megatron needs no extra reduction; the TP attributes (``tensor_model_parallel``,
``partition_dim``, ``partition_stride``) are set as megatron's own layers set them, which is
what DDP, the optimizer, grad-norm clipping and ``sharded_state_dict`` read.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    get_cuda_rng_tracker,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from torch import nn

KINDS = ("column", "row", "replicated")
ADAPTER_PARAMS = ("lora_A", "lora_B")


def adapter_kind(module: nn.Module) -> Optional[str]:
    """"column" / "row" / "replicated" for the linears LoRA can adapt, else None."""
    if isinstance(module, LoRAMixin):
        return module.lora_kind
    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    # megatron's Transformer Engine wrappers (TEColumnParallelLinear, TERowParallelLinear) are
    # not megatron-core linears; they say how they are split. A layer-norm-fused TE linear sees
    # the pre-norm input, which an adapter on it must not use.
    mode = getattr(module, "parallel_mode", None)
    name = type(module).__name__
    if mode in ("column", "row") and name.startswith("TE") and "LayerNorm" not in name \
            and isinstance(getattr(module, "weight", None), torch.Tensor):
        return mode
    if isinstance(module, nn.Linear):
        return "replicated"
    return None


def _tp_group_of(module: nn.Module, kind: str):
    if kind == "replicated":
        return None
    group = getattr(module, "tp_group", None)
    if group is None:
        if ps.model_parallel_is_initialized():
            group = ps.get_tensor_model_parallel_group()
    return group


def _group_size(group) -> int:
    return group.size() if group is not None and dist.is_initialized() else 1


def _group_rank(group) -> int:
    return group.rank() if group is not None and dist.is_initialized() else 0


def _mark(param: torch.Tensor, partition_dim: Optional[int]) -> None:
    """megatron's TP attributes: sharded along ``partition_dim``, or replicated (None)."""
    param.tensor_model_parallel = partition_dim is not None
    param.partition_dim = -1 if partition_dim is None else partition_dim
    param.partition_stride = 1


def kaiming_uniform_A(rank: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """PEFT's A init: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))."""
    A = torch.empty(rank, in_features)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    return A


class LoRAMixin:
    """Mixed in front of the base linear's class by :func:`add_lora_` (never instantiated)."""

    _lora_base_class: type = None

    # ------------------------------------------------------------------ set-up
    def _lora_setup(self, kind: str, rank: int, alpha: Optional[float], dropout: float, A_full: torch.Tensor):
        weight = self.weight
        self.lora_kind = kind
        self.lora_rank = rank
        self.lora_alpha = float(rank if alpha is None else alpha)
        self.lora_scale = self.lora_alpha / rank
        self.lora_dropout = float(dropout)
        self.lora_enabled = True
        self.lora_tp_group = _tp_group_of(self, kind)
        self.lora_input_is_parallel = bool(getattr(self, "input_is_parallel", True))
        # megatron-core's column linear takes (input, weight=None, runtime_gather_output=None);
        # Transformer Engine's never gathers its output.
        self.lora_megatron_column = isinstance(self, ColumnParallelLinear)
        (r, in_full), _ = self.lora_full_shapes()
        if tuple(A_full.shape) != (r, in_full):
            raise ValueError(f"LoRA A init has shape {tuple(A_full.shape)}, expected {(r, in_full)}")
        A_local = self._lora_local(A_full, "A")
        self.lora_A = nn.Parameter(A_local.to(device=weight.device, dtype=weight.dtype).contiguous())
        B_shape = (weight.shape[0], rank)
        self.lora_B = nn.Parameter(torch.zeros(B_shape, device=weight.device, dtype=weight.dtype))
        _mark(self.lora_A, 1 if kind == "row" else None)
        _mark(self.lora_B, 0 if kind == "column" else None)

    def lora_full_shapes(self) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """((r, in), (out, r)) of the unsharded adapter."""
        tp = _group_size(self.lora_tp_group)
        out, inp = self.weight.shape
        if self.lora_kind == "column":
            out *= tp
        elif self.lora_kind == "row":
            inp *= tp
        return (self.lora_rank, inp), (out, self.lora_rank)

    def _lora_local(self, full: torch.Tensor, which: str) -> torch.Tensor:
        """This TP rank's slice of a full A or B."""
        group = self.lora_tp_group
        tp = _group_size(group)
        if tp == 1:
            return full
        if which == "A" and self.lora_kind == "row":
            return full.chunk(tp, dim=1)[_group_rank(group)]
        if which == "B" and self.lora_kind == "column":
            return full.chunk(tp, dim=0)[_group_rank(group)]
        return full

    # ------------------------------------------------------------------ forward
    def _lora_dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.lora_dropout > 0):
            return x
        if self.lora_kind == "row" and _group_size(self.lora_tp_group) > 1:
            # x is sharded: each rank needs its own mask (megatron's TP-distinct RNG stream)
            with get_cuda_rng_tracker().fork():
                return F.dropout(x, self.lora_dropout, True)
        return F.dropout(x, self.lora_dropout, True)

    def lora_delta(self, x: torch.Tensor, gather_output: bool = False) -> torch.Tensor:
        """``scale * B A x`` laid out like the base's output on this rank."""
        group = self.lora_tp_group
        parallel = _group_size(group) > 1
        kind = self.lora_kind
        x = x.to(self.lora_A.dtype)
        if kind == "row" and parallel and not self.lora_input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, group=group)
        h = F.linear(self._lora_dropout(x), self.lora_A)
        if parallel and kind == "column":
            h = copy_to_tensor_model_parallel_region(h, group=group)
        elif parallel and kind == "row":
            h = reduce_from_tensor_model_parallel_region(h, group=group)
        y = F.linear(h, self.lora_B) * self.lora_scale
        if parallel and kind == "column" and gather_output:
            y = gather_from_tensor_model_parallel_region(y, group=group)
        return y

    def forward(self, input_, *args, **kwargs):
        megatron_column = self.lora_megatron_column
        if megatron_column and kwargs.get("weight", args[0] if args else None) is not None:
            raise RuntimeError(f"{type(self).__name__}: a LoRA-adapted linear cannot run with an external weight")
        result = super().forward(input_, *args, **kwargs)
        if not self.lora_enabled:
            return result
        gather = False
        if megatron_column:
            runtime = kwargs.get("runtime_gather_output", args[1] if len(args) > 1 else None)
            gather = bool(getattr(self, "gather_output", False) if runtime is None else runtime)
        if isinstance(result, tuple):
            out = result[0]
            return (out + self.lora_delta(input_, gather).to(out.dtype),) + tuple(result[1:])
        return result + self.lora_delta(input_, gather).to(result.dtype)

    # ------------------------------------------------------------------ checkpoints
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The base's entries, with A and B sharded along their partition dims (the base's
        own implementation would call them replicated)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        group = self.lora_tp_group
        if group is None:
            group = ps.get_tensor_model_parallel_group() if ps.model_parallel_is_initialized() else None
        base = getattr(super(), "sharded_state_dict", None)
        if base is not None:
            out = base(prefix=prefix, sharded_offsets=sharded_offsets, metadata=metadata)
        else:  # plain torch.nn.Linear: everything replicated
            state = {k: v for k, v in self.state_dict(prefix="", keep_vars=True).items() if k not in ADAPTER_PARAMS}
            out = make_sharded_tensors_for_checkpoint(state, prefix, {}, sharded_offsets, tp_group=group,
                                                      dp_cp_group=metadata["dp_cp_group"])
        axis = {"column": {"lora_B": 0}, "row": {"lora_A": 1}, "replicated": {}}[self.lora_kind]
        out.update(make_sharded_tensors_for_checkpoint(
            {"lora_A": self.lora_A, "lora_B": self.lora_B}, prefix, axis, sharded_offsets,
            tp_group=group, dp_cp_group=metadata["dp_cp_group"]))
        return out

    def extra_repr(self) -> str:
        base = super().extra_repr() if hasattr(super(), "extra_repr") else ""
        lora = (f"lora(kind={self.lora_kind}, r={self.lora_rank}, alpha={self.lora_alpha:g}, "
                f"enabled={self.lora_enabled})")
        return f"{base}, {lora}" if base else lora


_CLASSES: dict = {}


def _lora_class(base_cls: type) -> type:
    cls = _CLASSES.get(base_cls)
    if cls is None:
        name = f"LoRA{base_cls.__name__}"
        cls = type(name, (LoRAMixin, base_cls), {"__module__": __name__, "_lora_base_class": base_cls})
        _CLASSES[base_cls] = cls
        # lets pickle/deepcopy find the class by name (first base class of that name wins)
        globals().setdefault(name, cls)
    return cls


def add_lora_(module: nn.Module, rank: int, alpha: Optional[float], dropout: float, A_full: torch.Tensor,
              name: str = "module") -> None:
    """Give ``module`` an adapter in place: A from the full (r x in) ``A_full`` (this rank's
    slice is kept), B = 0, so the output is unchanged until B is trained."""
    kind = adapter_kind(module)
    if kind is None:
        raise ValueError(f"{name} ({type(module).__name__}) is not a linear LoRA can adapt; LoRA adapts megatron "
                         "ColumnParallelLinear / RowParallelLinear (and their Transformer Engine versions) "
                         "and torch.nn.Linear")
    if isinstance(module, LoRAMixin):
        raise ValueError(f"{name} already has a LoRA adapter")
    if getattr(module, "sequence_parallel", False):
        raise NotImplementedError(f"{name}: LoRA under sequence parallelism is not implemented")
    if getattr(module, "explicit_expert_comm", False):
        raise NotImplementedError(f"{name}: LoRA on expert-parallel linears is not implemented")
    if getattr(module, "weight", None) is None:
        raise ValueError(f"{name} has no weight of its own (skip_weight_param_allocation); LoRA cannot adapt it")
    module.__class__ = _lora_class(type(module))
    module._lora_setup(kind, rank, alpha, dropout, A_full)


def remove_lora_(module: nn.Module) -> None:
    """Drop the adapter (weights are NOT merged; see merge.merge_lora_)."""
    if not isinstance(module, LoRAMixin):
        raise ValueError(f"{type(module).__name__} has no LoRA adapter")
    base_cls = module._lora_base_class
    for key in ADAPTER_PARAMS:
        delattr(module, key)
    for key in [k for k in vars(module) if k.startswith("lora_")]:
        delattr(module, key)
    module.__class__ = base_cls


def is_adapter_param_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ADAPTER_PARAMS


def iter_lora_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(local name, module) of every adapted module."""
    for name, module in model.named_modules():
        if isinstance(module, LoRAMixin):
            yield name, module


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block the model computes its base (adapters off); e.g. the frozen teacher
    of APEX's released variant. Only the adapters are switched off: trainable extras (a
    learnable condition shift, the target-time embedder) stay as trained.

    Use it for no-grad queries: with activation recompute, a backward run after the block
    would recompute the forward WITH the adapters."""
    modules = [m for _, m in iter_lora_modules(model)]
    if not modules:
        raise ValueError("adapters_disabled: the model has no LoRA adapters (call apply_lora first)")
    previous = [m.lora_enabled for m in modules]
    for m in modules:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m, state in zip(modules, previous):
            m.lora_enabled = state


# ---------------------------------------------------------------------- full (unsharded) views
def _gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = _group_size(group)
    if size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def full_lora_weights(module: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A, B) unsharded; collective over the module's TP group."""
    A, B = module.lora_A.detach(), module.lora_B.detach()
    if module.lora_kind == "column":
        B = _gather(B, 0, module.lora_tp_group)
    elif module.lora_kind == "row":
        A = _gather(A, 1, module.lora_tp_group)
    return A.clone(), B.clone()


@torch.no_grad()
def full_lora_grads(module: nn.Module) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Unsharded gradients of (A, B) (zeros where there is none); collective over TP."""
    grads = []
    for key, dim in (("lora_A", 1 if module.lora_kind == "row" else None),
                     ("lora_B", 0 if module.lora_kind == "column" else None)):
        p = getattr(module, key)
        g = p.grad if p.grad is not None else getattr(p, "main_grad", None)
        g = torch.zeros_like(p) if g is None else g.detach()
        grads.append(g.clone() if dim is None else _gather(g, dim, module.lora_tp_group))
    return grads[0], grads[1]


@torch.no_grad()
def set_full_lora_weights_(module: nn.Module, A_full: torch.Tensor, B_full: torch.Tensor, name: str = "module") -> None:
    """Load unsharded (A, B) (B in the adapter's own scale); each rank keeps its slice."""
    (shape_A, shape_B) = module.lora_full_shapes()
    for which, tensor, shape in (("lora_A", A_full, shape_A), ("lora_B", B_full, shape_B)):
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name}.{which}: got shape {list(tensor.shape)}, the adapter has {list(shape)} "
                             f"(rank {module.lora_rank})")
    module.lora_A.copy_(module._lora_local(A_full, "A").to(module.lora_A.dtype))
    module.lora_B.copy_(module._lora_local(B_full, "B").to(module.lora_B.dtype))


@torch.no_grad()
def merged_weight(module: nn.Module) -> torch.Tensor:
    """This rank's ``W + scale * B A`` (local shapes; merging needs no communication)."""
    W = module.weight
    delta = (module.lora_B.float() @ module.lora_A.float()) * module.lora_scale
    return (W.float() + delta).to(W.dtype)
