"""APEX: self-adversarial one-step generation via condition shifting (arXiv 2604.12322).

The math is docs/apex_method.md; function names follow the paper's equations. The condition
shift (Eq. 9) is a model part (models/common/condition_shift.py): the objective only asks for
it with ``fake_condition``. Modules, bottom up:
  config     APEXConfig (every option, checked on construction).
  queries    the model contract (call_model) and ModelQuery, batched by batch_queries.
  paper      variant "paper": the paper's Eqs. 11, 12, 14, 20-25.
  release_options  the release's fake-time flag, pseudo-Huber loss and tan weight (options).
  any_step   the release's any-step training of the base rows on RCGM targets (an option).
  released   variant "released": the mechanism of the authors' released code.
  two_phase  both variants as no-grad rounds plus one training pass (pipeline parallelism).
  loss       apex_loss, the direct entry point.
"""

from megatron_apex.objectives.apex.config import APEX_PRESETS, FAKE_GRADS, LOSSES, VARIANTS, APEXConfig, preset_fields
from megatron_apex.objectives.apex.loss import apex_loss
from megatron_apex.objectives.apex.paper import (apex_total, consistency_loss, fake_flow_loss, fake_flow_query,
                                                 fake_flow_term, fake_sample, fake_trajectory, fake_velocity_reference,
                                                 mix_term, mixed_consistency_loss, mixed_target, paper_apex_loss,
                                                 paper_terms, real_point_query, supervised_loss)
from megatron_apex.objectives.apex.queries import ModelQuery, answer_query, batch_queries, call_model, split_output
from megatron_apex.objectives.apex.release_options import (flag_fake_time, per_sample_loss, pseudo_huber,
                                                           tan_weight)
from megatron_apex.objectives.apex.released import (FreshDraws, ReleasedBatch, cfg_enhanced_target,
                                                    distribution_matching_direction, distribution_matching_loss,
                                                    dm_direction_from_velocities, dm_held_off, draw_fresh,
                                                    flow_map_consistency_loss, one_step_generation, released_apex_loss,
                                                    released_batch, released_terms, split_rows)
from megatron_apex.objectives.apex.two_phase import (PaperTwoPhase, ReleasedTwoPhase, TwoPhaseObjective,
                                                     run_two_phase, two_phase_apex)

__all__ = [
    "APEXConfig", "APEX_PRESETS", "FAKE_GRADS", "LOSSES", "VARIANTS", "apex_loss", "preset_fields",
    "flag_fake_time", "per_sample_loss", "pseudo_huber", "tan_weight",
    "ModelQuery", "answer_query", "batch_queries", "call_model", "split_output",
    "apex_total", "consistency_loss", "fake_flow_loss", "fake_flow_query", "fake_flow_term", "fake_sample",
    "fake_trajectory", "fake_velocity_reference", "mix_term", "mixed_consistency_loss", "mixed_target",
    "paper_apex_loss", "paper_terms", "real_point_query", "supervised_loss",
    "FreshDraws", "ReleasedBatch", "cfg_enhanced_target", "distribution_matching_direction",
    "distribution_matching_loss", "dm_direction_from_velocities", "dm_held_off", "draw_fresh",
    "flow_map_consistency_loss", "one_step_generation", "released_apex_loss", "released_batch", "released_terms",
    "split_rows",
    "PaperTwoPhase", "ReleasedTwoPhase", "TwoPhaseObjective", "run_two_phase", "two_phase_apex",
]
