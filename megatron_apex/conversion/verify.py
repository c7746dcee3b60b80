"""verify: diffusers' forward against ours on the same random inputs, for a diffusers folder
converted in memory or for one of our checkpoints (loaded by the caller: conversion sits
below inference, tools/convert_hf.py passes its loader)."""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from megatron_apex.conversion import hf_io
from megatron_apex.conversion.checkpoint_io import check_hf_keys, config_for_folder, init_single_process
from megatron_apex.conversion.engine import EXTRA_STATE_SUFFIX
from megatron_apex.conversion.state_dicts import hf_to_megatron
from megatron_apex.families import ModelFamily

# (checkpoint path, "model" | "ema") -> (our model, eval mode, TP=1; anything)
ModelLoader = Callable[[str, str], Tuple[torch.nn.Module, object]]


def text_mask(batch: int, text_len: int) -> torch.Tensor:
    """Right-padded 1/0 mask, valid lengths spread from ``text_len`` down to 1 (all different
    when batch <= text_len)."""
    mask = torch.zeros(batch, text_len)
    for i in range(batch):
        valid = text_len if batch == 1 else text_len - round(i * (text_len - 1) / (batch - 1))
        mask[i, :max(1, valid)] = 1
    return mask


def load_ours_from_hf(family: ModelFamily, hf_path: str, overrides: Optional[Mapping] = None):
    """Our TP=1 model with a diffusers folder's weights, converted in memory."""
    config, _ = config_for_folder(family, hf_path, overrides)
    source = hf_io.SafetensorsFolder(hf_path, "--hf-path")
    check_hf_keys(family, config, source, "--hf-path")
    init_single_process()
    model = family.whole_model(config.replace(perform_initialization=False))
    state = hf_to_megatron(source, config, source=f"--hf-path {hf_path}", family=family)
    source.close()
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(EXTRA_STATE_SUFFIX)]
    if missing or result.unexpected_keys:
        raise ValueError(f"converted weights do not fit the model: missing {missing}, unexpected {result.unexpected_keys}")
    return model.eval(), config


def _check_same_model(family: ModelFamily, config, hf_config, load: str, hf_path: str) -> None:
    if type(config) is not type(hf_config):
        raise ValueError(f"--load {load} holds a {type(config).__name__} model, --hf-path {hf_path} a "
                         f"{family.diffusers_class} ({type(hf_config).__name__})")
    differs = [k for k in family.arch_fields if getattr(config, k) != getattr(hf_config, k)]
    if differs:
        raise ValueError(f"--load {load} and --hf-path {hf_path} describe different models "
                         f"({', '.join(f'{k}: {getattr(config, k)} vs {getattr(hf_config, k)}' for k in differs)})")


def verify(family: ModelFamily, hf_path: str, load: Optional[str] = None, weights: str = "model", batch: int = 2,
           grid: Tuple[int, int] = (4, 4), text_len: int = 8, seed: int = 0,
           load_model: Optional[ModelLoader] = None) -> Dict:
    """Forward of diffusers' model vs ours on the same random inputs (padded text mask, one
    valid length per sample); returns the max abs difference and the reference's scale. Ours
    is ``load_model(load, weights)`` when ``load`` is given, else ``hf_path`` converted."""
    for flag, value in (("--batch", batch), ("--text-len", text_len), ("--grid", grid[0]), ("--grid", grid[1])):
        if value < 1:
            raise ValueError(f"{flag} must be positive, got {value}")
    hf_config, _ = config_for_folder(family, hf_path)
    if load is not None:
        if load_model is None:
            raise ValueError("verify with a checkpoint (load) needs load_model, the function that loads it")
        model, _ = load_model(load, weights)
        config = model.model_config
        _check_same_model(family, config, hf_config, load, hf_path)
    else:
        model, config = load_ours_from_hf(family, hf_path)
    reference = family.load_reference(hf_path)

    gen = torch.Generator().manual_seed(seed)
    p = config.patch_size
    x = torch.randn(batch, config.out_channels, grid[0] * p, grid[1] * p, generator=gen)
    t = torch.rand(batch, generator=gen)
    ctx = torch.randn(batch, text_len, config.context_dim, generator=gen)
    mask = text_mask(batch, text_len)
    with torch.no_grad():
        ref = family.reference_forward(reference, config, x, t, ctx, mask)
        ours = model(x, t, ctx, mask)
    return {"max_abs_diff": (ours.float() - ref.float()).abs().max().item(),
            "ref_max_abs": ref.abs().max().item(), "shape": tuple(ours.shape)}
