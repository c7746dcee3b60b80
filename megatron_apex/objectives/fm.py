"""Plain flow matching, the baseline APEX is compared with (and fine-tuned from)."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from megatron_apex.objectives.flow import flow_matching_error, interpolate


def fm_loss(model: Callable, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
            context: torch.Tensor, context_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """``mean_B mean_elements ||F(x_t, t, c) - (z - x)||^2`` on the OT path.

    Returns ``dict(loss=..., l_fm=...)`` (the same scalar twice, so logs name the term)."""
    x_t = interpolate(x0, noise, t)
    velocity = model(x_t, t, context, context_mask=context_mask, fake_condition=False)
    l_fm = flow_matching_error(velocity, x0, noise).mean()
    return {"loss": l_fm, "l_fm": l_fm}
