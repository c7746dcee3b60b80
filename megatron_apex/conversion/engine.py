"""A small, generic, table-driven converter between Hugging Face (diffusers) state dicts and
ours, with tensor-parallel sharding and merging driven by the same table.

The tables are the families' (megatron_apex/families/, their vocabulary in
families/mapping_rules.py); this module applies them to tensors: each rule's ``transform``
names a pair of functions here (``TRANSFORMS``), and ``{i}`` patterns are expanded over layers.
"""

from __future__ import annotations

import functools
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from megatron_apex.families.mapping_rules import ParamRule

EXTRA_STATE_SUFFIX = "_extra_state"


# ----------------------------------------------------------------------------- transforms
def _copy_fuse(tensors: Sequence[torch.Tensor], ctx: Mapping) -> torch.Tensor:
    return tensors[0]


def _copy_split(tensor: torch.Tensor, ctx: Mapping) -> List[torch.Tensor]:
    return [tensor]


def _qkv_fuse(tensors: Sequence[torch.Tensor], ctx: Mapping) -> torch.Tensor:
    """q, k, v [H*hd, ...] -> megatron per-head layout [H * (q_h | k_h | v_h), ...]."""
    head_dim = ctx["head_dim"]
    q, k, v = tensors
    if not q.shape == k.shape == v.shape or q.shape[0] % head_dim:
        raise ValueError(f"q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} do not fuse "
                         f"with head_dim {head_dim}")
    heads = q.shape[0] // head_dim
    rest = q.shape[1:]
    stacked = torch.stack([x.reshape(heads, head_dim, *rest) for x in (q, k, v)], dim=1)
    return stacked.reshape(3 * heads * head_dim, *rest)


def _qkv_split(tensor: torch.Tensor, ctx: Mapping) -> List[torch.Tensor]:
    head_dim = ctx["head_dim"]
    if tensor.shape[0] % (3 * head_dim):
        raise ValueError(f"fused qkv of shape {tuple(tensor.shape)} does not split with head_dim {head_dim}")
    heads = tensor.shape[0] // (3 * head_dim)
    rest = tensor.shape[1:]
    per_head = tensor.reshape(heads, 3, head_dim, *rest)
    return [per_head[:, j].reshape(heads * head_dim, *rest).clone() for j in range(3)]


def _conv1x1_fuse(tensors: Sequence[torch.Tensor], ctx: Mapping) -> torch.Tensor:
    """A 1x1 convolution's weight [out, in, 1, 1] -> the equivalent linear's [out, in]."""
    (weight,) = tensors
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1):
        raise ValueError(f"a 1x1 convolution weight must have shape [out, in, 1, 1], got {tuple(weight.shape)}")
    return weight[:, :, 0, 0]


def _conv1x1_split(tensor: torch.Tensor, ctx: Mapping) -> List[torch.Tensor]:
    return [tensor[:, :, None, None]]


def _halves_interleave(tensor: torch.Tensor) -> torch.Tensor:
    """[a (n); b (n)] along dim 0 -> [a_0, b_0, a_1, b_1, ...]: a contiguous TP chunk of the
    result holds matching channels of both halves (a gated layer's x and gate)."""
    if tensor.shape[0] % 2:
        raise ValueError(f"a [x; gate] tensor needs an even dim 0, got shape {tuple(tensor.shape)}")
    n = tensor.shape[0] // 2
    return tensor.reshape(2, n, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)


def _halves_deinterleave(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.shape[0] % 2:
        raise ValueError(f"an interleaved gated tensor needs an even dim 0, got shape {tuple(tensor.shape)}")
    n = tensor.shape[0] // 2
    return tensor.reshape(n, 2, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape).clone()


def _glu_fuse(tensors: Sequence[torch.Tensor], ctx: Mapping) -> torch.Tensor:
    return _halves_interleave(tensors[0])


def _glu_split(tensor: torch.Tensor, ctx: Mapping) -> List[torch.Tensor]:
    return [_halves_deinterleave(tensor)]


def _conv1x1_glu_fuse(tensors: Sequence[torch.Tensor], ctx: Mapping) -> torch.Tensor:
    return _halves_interleave(_conv1x1_fuse(tensors, ctx))


def _conv1x1_glu_split(tensor: torch.Tensor, ctx: Mapping) -> List[torch.Tensor]:
    return _conv1x1_split(_halves_deinterleave(tensor), ctx)


TRANSFORMS: Dict[str, Tuple[Callable, Callable]] = {
    "copy": (_copy_fuse, _copy_split),
    # Contiguous TP chunks of the fused tensor along dim 0 hold whole heads, so sharding the
    # fused tensor needs no extra rule.
    "qkv_per_head": (_qkv_fuse, _qkv_split),
    # A 1x1 convolution run as a linear over tokens.
    "conv1x1": (_conv1x1_fuse, _conv1x1_split),
    # A gated layer's [x; gate] output channels, interleaved so TP chunks keep pairs together.
    "glu_interleave": (_glu_fuse, _glu_split),
    "conv1x1_glu_interleave": (_conv1x1_glu_fuse, _conv1x1_glu_split),
}


# ----------------------------------------------------------------------------- expansion
def expand(table: Iterable[ParamRule], num_layers: int) -> List[Tuple[str, Tuple[str, ...], ParamRule]]:
    """Concrete (our key, hf keys, rule) triples."""
    out = []
    for rule in table:
        if rule.transform not in TRANSFORMS:
            raise ValueError(f"mapping rule for {rule.ours!r}: unknown transform {rule.transform!r}")
        layers = range(num_layers) if rule.per_layer else [None]
        for i in layers:
            fmt = (lambda s: s.format(i=i)) if i is not None else (lambda s: s)
            out.append((fmt(rule.ours), tuple(fmt(h) for h in rule.hf), rule))
    return out


def _ensure_unique(expanded):
    seen = {}
    for ours, hf_keys, _ in expanded:
        for key in (("ours", ours),) + tuple(("hf", h) for h in hf_keys):
            if key in seen:
                raise ValueError(f"mapping table lists {key[1]!r} twice")
            seen[key] = True


@dataclass(frozen=True)
class _Recipe:
    make: Callable[[], torch.Tensor]


class LazyStateDict(MutableMapping):
    """``{key: tensor}`` whose values may be recipes: a recipe runs each time its key is read
    and its result is not kept, so a consumer that reads keys one at a time (a streaming
    writer) holds one converted tensor, never the state dict. Plain tensors stored into it
    (the APEX extras, filled from other keys) are kept as they are."""

    def __init__(self):
        self._values: Dict[str, object] = {}

    def set_recipe(self, key: str, make: Callable[[], torch.Tensor]) -> None:
        self._values[key] = _Recipe(make)

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self._values[key]
        return value.make() if isinstance(value, _Recipe) else value

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self._values[key] = value

    def __delitem__(self, key: str) -> None:
        del self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key) -> bool:
        return key in self._values


def _fused(fuse: Callable, hf_sd: Mapping[str, torch.Tensor], hf_keys: Tuple[str, ...], ctx: Mapping) -> torch.Tensor:
    return fuse([hf_sd[h] for h in hf_keys], ctx)


def hf_to_ours(hf_sd: Mapping[str, torch.Tensor], table: Sequence[ParamRule], num_layers: int,
               ctx: Optional[Mapping] = None, source: str = "the HF state dict",
               lazy: bool = False) -> Tuple[Mapping[str, torch.Tensor], List[str]]:
    """Returns (our state dict, our keys of optional rules that ``hf_sd`` lacked).

    With ``lazy``, the state dict is a :class:`LazyStateDict`: nothing is read from ``hf_sd``
    here; reading one of our keys reads (and fuses) just the HF tensors it is made of.
    Raises ValueError naming the first missing required key or any key no rule consumes
    (from the keys alone, before any tensor is read).
    """
    ctx = ctx or {}
    expanded = expand(table, num_layers)
    _ensure_unique(expanded)
    ours = LazyStateDict() if lazy else {}
    missing_optional, consumed = [], set()
    for our_key, hf_keys, rule in expanded:
        present = [h in hf_sd for h in hf_keys]
        if not all(present):
            if rule.optional and not any(present):
                missing_optional.append(our_key)
                continue
            absent = hf_keys[present.index(False)]
            raise ValueError(f"{source} lacks key {absent!r} (needed for {our_key!r})")
        fuse, _ = TRANSFORMS[rule.transform]
        if lazy:
            ours.set_recipe(our_key, functools.partial(_fused, fuse, hf_sd, hf_keys, ctx))
        else:
            ours[our_key] = _fused(fuse, hf_sd, hf_keys, ctx)
        consumed.update(hf_keys)
    unexpected = sorted(k for k in hf_sd if k not in consumed)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ValueError(f"{source} has key {unexpected[0]!r}{more} that the mapping does not know")
    return ours, missing_optional


def iter_ours_to_hf(sd: Mapping[str, torch.Tensor], table: Sequence[ParamRule], num_layers: int,
                    ctx: Optional[Mapping] = None, source: str = "the model state dict"
                    ) -> Iterator[Tuple[str, torch.Tensor, ParamRule]]:
    """(HF key, tensor, rule) in table order, reading ``sd[our key]`` once per rule when the
    iteration reaches it (``sd`` may be lazy: one of our tensors at a time). Keys are checked
    before anything is read; megatron's ``*._extra_state`` entries are ignored."""
    ctx = ctx or {}
    expanded = expand(table, num_layers)
    _ensure_unique(expanded)
    todo = []
    for our_key, hf_keys, rule in expanded:
        if our_key not in sd:
            if rule.optional:
                continue
            raise ValueError(f"{source} lacks key {our_key!r}")
        todo.append((our_key, hf_keys, rule))
    consumed = {our_key for our_key, _, _ in todo}
    unexpected = sorted(k for k in sd if k not in consumed and not k.endswith(EXTRA_STATE_SUFFIX))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ValueError(f"{source} has key {unexpected[0]!r}{more} that the mapping does not know")
    for our_key, hf_keys, rule in todo:
        _, split = TRANSFORMS[rule.transform]
        for h, tensor in zip(hf_keys, split(sd[our_key], ctx)):
            yield h, tensor, rule


def ours_to_hf(sd: Mapping[str, torch.Tensor], table: Sequence[ParamRule], num_layers: int,
               ctx: Optional[Mapping] = None, source: str = "the model state dict") -> Dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_ours`; megatron's ``*._extra_state`` entries are dropped."""
    return {h: tensor for h, tensor, _ in iter_ours_to_hf(sd, table, num_layers, ctx, source)}


# ----------------------------------------------------------------------------- TP sharding
def _split_dims(table: Sequence[ParamRule], num_layers: int) -> Dict[str, Optional[int]]:
    return {our_key: rule.tp_split_dim for our_key, _, rule in expand(table, num_layers)}


def shard_for_tp(sd: Mapping[str, torch.Tensor], table: Sequence[ParamRule], num_layers: int,
                 tp_rank: int, tp_size: int) -> Dict[str, torch.Tensor]:
    """This rank's slice of a full (TP=1) state dict: contiguous chunks along ``tp_split_dim``."""
    dims = _split_dims(table, num_layers)
    out = {}
    for key, tensor in sd.items():
        if key.endswith(EXTRA_STATE_SUFFIX):
            continue
        if key not in dims:
            raise ValueError(f"state dict key {key!r} is not in the mapping table")
        dim = dims[key]
        if dim is None or tp_size == 1:
            out[key] = tensor
            continue
        if tensor.shape[dim] % tp_size:
            raise ValueError(f"{key!r} dim {dim} ({tensor.shape[dim]}) is not divisible by TP size {tp_size}")
        out[key] = tensor.chunk(tp_size, dim=dim)[tp_rank].clone()
    return out


def merge_tp_shards(shards: Sequence[Mapping[str, torch.Tensor]], table: Sequence[ParamRule],
                    num_layers: int) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`shard_for_tp` (replicated entries are taken from rank 0)."""
    dims = _split_dims(table, num_layers)
    out = {}
    for key, tensor in shards[0].items():
        if key.endswith(EXTRA_STATE_SUFFIX):
            continue
        if key not in dims:
            raise ValueError(f"state dict key {key!r} is not in the mapping table")
        dim = dims[key]
        out[key] = tensor if dim is None else torch.cat([s[key] for s in shards], dim=dim)
    return out
