"""Training objectives: the OT flow path (flow), plain flow matching (fm), APEX (apex)."""

from megatron_apex.objectives.apex import APEXConfig, apex_loss
from megatron_apex.objectives.flow import (TimeSamplerConfig, endpoint, interpolate, mix_weight,
                                           per_sample_mse, sample_time, velocity_target)
from megatron_apex.objectives.fm import fm_loss

__all__ = [
    "APEXConfig", "apex_loss",
    "TimeSamplerConfig", "endpoint", "interpolate", "mix_weight", "per_sample_mse",
    "sample_time", "velocity_target", "fm_loss",
]
