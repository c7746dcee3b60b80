"""The condition shift of APEX (Eq. 9), ``c_fake = A c + b``: a part of the model (its
parameters, when learnable, are saved with the model's), applied by the model's forward where
``fake_condition`` asks for it. The objectives only set that flag."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

FakeCondition = Union[bool, torch.Tensor]

SHIFT_KINDS = ("scalar", "diagonal", "full")


class ConditionShift(nn.Module):
    """``c_fake = A c + b`` on the last dimension of the condition.

    kind "scalar":   A = a*I, b = b*1 (two numbers); fixed buffers unless learnable=True.
    kind "diagonal": A = diag(a_vec), b vector (dim each); learnable unless learnable=False.
    kind "full":     A a (dim, dim) matrix, b vector; learnable unless learnable=False.
    Every kind starts at ``a*c + b``. Learnable values are parameters named ``A`` and ``b``
    (saved in checkpoints); fixed values are non-persistent buffers, so they come from the
    config and checkpoints of models built without a shift still load.
    """

    def __init__(self, dim: int, kind: str = "scalar", a: float = -1.0, b: float = 0.0,
                 learnable: Optional[bool] = None):
        super().__init__()
        if kind not in SHIFT_KINDS:
            raise ValueError(f"ConditionShift kind {kind!r}: unknown; choose one of {SHIFT_KINDS}")
        if int(dim) < 1:
            raise ValueError(f"ConditionShift dim must be >= 1, got {dim}")
        self.dim, self.kind = int(dim), kind
        self.learnable = (kind != "scalar") if learnable is None else bool(learnable)
        if kind == "scalar":
            A, bias = torch.full((1,), float(a)), torch.full((1,), float(b))
        elif kind == "diagonal":
            A, bias = torch.full((self.dim,), float(a)), torch.full((self.dim,), float(b))
        else:
            A, bias = float(a) * torch.eye(self.dim), torch.full((self.dim,), float(b))
        if self.learnable:
            self.A, self.b = nn.Parameter(A), nn.Parameter(bias)
        else:
            self.register_buffer("A", A, persistent=False)
            self.register_buffer("b", bias, persistent=False)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        if c.shape[-1] != self.dim:
            raise ValueError(f"ConditionShift(dim={self.dim}): condition's last dimension is {c.shape[-1]}")
        A, b = self.A.to(c.dtype), self.b.to(c.dtype)
        if self.kind == "full":
            return F.linear(c, A, b)  # c @ A^T + b
        return c * A + b

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kind={self.kind!r}, learnable={self.learnable}"


def apply_condition_shift(shift: Optional[ConditionShift], c: torch.Tensor,
                          fake_condition: FakeCondition) -> torch.Tensor:
    """Shift ``c`` (B, ...) where ``fake_condition`` asks for it.

    ``fake_condition``: a python bool (whole batch) or a (B,) bool tensor (only the selected
    rows are shifted; both paths are differentiable, unselected rows pass through unchanged),
    which lets one batched forward mix the real and the fake branch."""
    if isinstance(fake_condition, torch.Tensor):
        if fake_condition.dtype != torch.bool:
            raise ValueError(f"fake_condition tensor must be bool, got {fake_condition.dtype}")
        if fake_condition.dim() == 0:
            fake_condition = bool(fake_condition)
        else:
            if tuple(fake_condition.shape) != (c.shape[0],):
                raise ValueError(f"fake_condition must have shape ({c.shape[0]},) to match the condition "
                                 f"batch, got {tuple(fake_condition.shape)}")
            if shift is None:
                raise ValueError("fake_condition set but the model has no ConditionShift")
            rows = fake_condition.to(c.device).reshape(-1, *([1] * (c.dim() - 1)))
            return torch.where(rows, shift(c), c)
    if not fake_condition:
        return c
    if shift is None:
        raise ValueError("fake_condition set but the model has no ConditionShift")
    return shift(c)
