"""apex_loss: the APEX objective of one micro-batch, run directly (every model query as an
ordinary forward with autograd), for whichever variant the config names."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from megatron_apex.objectives.apex.config import APEXConfig
from megatron_apex.objectives.apex.paper import paper_apex_loss
from megatron_apex.objectives.apex.released import released_apex_loss


def apex_loss(model: Callable, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
              context: torch.Tensor, context_mask: Optional[torch.Tensor], cfg: APEXConfig, *,
              generator: Optional[torch.Generator] = None, teacher: Optional[Callable] = None,
              step: Optional[int] = None, uncond_context: Optional[torch.Tensor] = None,
              uncond_context_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """The APEX objective for any callable with the model contract; a dict of scalar tensors.

    variant "paper":    loss, l_fake, l_mix.
    variant "released": loss, l_base, l_fake, l_dm (+ l_consistency). Fresh noise and times
                        come from ``generator`` (reproducible); ``teacher`` supplies the real
                        velocity of the DM query (None = the model itself, under no_grad);
                        ``step`` drives dm_warmup_steps; ``uncond_context`` feeds cfg_scale.
    The paper variant ignores generator, teacher and step (it draws nothing fresh)."""
    if not isinstance(cfg, APEXConfig):
        raise ValueError(f"apex_loss: cfg must be an APEXConfig, got {type(cfg).__name__}")
    if noise.shape != x0.shape:
        raise ValueError(f"apex_loss: noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    if tuple(t.shape) != (x0.shape[0],):
        raise ValueError(f"apex_loss: t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
    if context.shape[0] != x0.shape[0]:
        raise ValueError(f"apex_loss: context batch {context.shape[0]} != x0 batch {x0.shape[0]}")
    if cfg.variant == "paper":
        return paper_apex_loss(model, x0, noise, t, context, context_mask, cfg)
    return released_apex_loss(model, x0, noise, t, context, context_mask, cfg, generator=generator,
                              teacher=teacher, step=step, uncond_context=uncond_context,
                              uncond_context_mask=uncond_context_mask)
