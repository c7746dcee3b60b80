"""LoRA options (one dataclass) and the named target presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

# Module-name patterns (fnmatch, on GLOBAL module names: pipeline stages see the same names as
# a one-stage model) for megatron-style block names. They hold for Qwen-Image
# (attention.linear_qkv / linear_added_qkv / linear_proj / linear_added_proj, img_mlp / txt_mlp,
# img_modulation / txt_modulation / final_modulation) and for any model built from
# megatron-core's attention and MLP modules (self_attention.linear_qkv, mlp.linear_fc1, ...).
_ATTN = ("*attention.linear_*",)
_MLP = ("*mlp.linear_fc*",)
_MODULATION = ("*modulation.linear",)
PRESETS: Dict[str, Tuple[str, ...]] = {
    "attn": _ATTN,
    "mlp": _MLP,
    "modulation": _MODULATION,
    "attn+mlp": _ATTN + _MLP,
    "all": _ATTN + _MLP + _MODULATION,
}


def _split_targets(targets) -> Tuple[str, ...]:
    """A string ("attn+mlp", "attn,img_in") or a sequence of presets / patterns."""
    if isinstance(targets, str):
        items = [t.strip() for t in targets.split(",")]
    else:
        items = [str(t).strip() for t in targets]
    return tuple(t for t in items if t)


@dataclass
class LoRAConfig:
    """``rank``/``alpha``: the adapter adds ``(alpha / rank) * B A x`` (alpha None = rank, i.e.
    scale 1). ``targets``: preset names (see ``PRESETS``) or fnmatch patterns on module names.
    ``dropout``: on the adapter's input, training only. ``init_seed``: A's initialisation
    (kaiming-uniform, a = sqrt(5), as PEFT) is drawn per module from (init_seed, module name),
    so every tensor/pipeline-parallel layout gets the same adapters.

    Besides the adapters, these stay trainable: the model's condition shift when it has
    learnable parameters (``train_condition_shift``), its any-step target-time embedder
    (``train_target_time_embedder``; APEX needs it to learn the tt input) and parameters
    matching ``extra_trainable`` (fnmatch on parameter names).
    """

    rank: int = 16
    alpha: Optional[float] = None
    targets: Tuple[str, ...] = ("attn",)
    dropout: float = 0.0
    init_seed: int = 0
    train_condition_shift: bool = True
    train_target_time_embedder: bool = True
    extra_trainable: Tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        self.targets = _split_targets(self.targets)
        self.extra_trainable = _split_targets(self.extra_trainable)

    @property
    def scale(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha) / self.rank

    def target_patterns(self) -> Dict[str, Tuple[str, ...]]:
        """{target as given: its fnmatch patterns}."""
        return {t: PRESETS.get(t, (t,)) for t in self.targets}

    def validate(self) -> "LoRAConfig":
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"--lora-rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                       or not self.alpha > 0):
            raise ValueError(f"--lora-alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.init_seed, int) or isinstance(self.init_seed, bool) or self.init_seed < 0:
            raise ValueError(f"--lora-init-seed must be a non-negative integer, got {self.init_seed!r}")
        if not self.targets:
            raise ValueError(f"--lora-targets is empty; give presets ({', '.join(PRESETS)}) or module-name patterns")
        return self

    def to_dict(self) -> Dict:
        out = dataclasses.asdict(self)
        out["targets"] = list(self.targets)
        out["extra_trainable"] = list(self.extra_trainable)
        return out

    @classmethod
    def from_dict(cls, values: Dict) -> "LoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown LoRAConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**values).validate()
