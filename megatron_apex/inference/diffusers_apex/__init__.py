"""diffusers classes that sample APEX models the way our tools do.

A stock ``QwenImagePipeline`` / ``SanaPipeline`` computes F(x, t, c) with tt = t: it never uses
the any-step target-time embedder an APEX model was trained with, so its one step is the
velocity head's Euler step, not the trained jump z - F(z, 1, c, tt = 0). This module adds:

- ``ApexQwenImageTransformer2DModel`` / ``ApexSanaTransformer2DModel`` (models.py): the stock
  transformers plus the second timestep embedder (``time_text_embed_2`` / ``time_embed_2``, the names our
  export writes), used as our models use it: emb(t) + emb_2(tt) * (t - tt), in the units of the
  stock ``timestep`` argument. ``forward(..., target_timestep=None)``: None means tt = t, which
  is exactly the stock class.
- ``ApexQwenImagePipeline`` / ``ApexSanaPipeline`` (pipelines.py): the stock pipelines whose
  ``__call__`` runs ``megatron_apex.inference.samplers`` (``method`` flowmap / euler / renoise / release;
  ``num_inference_steps`` = NFE) instead of the scheduler, and whose ``load_lora_weights`` also
  loads the trained target-time embedder that ``tools/export_lora.py`` writes beside the LoRA.

Loading an exported pipeline folder (``tools/convert_hf.py export --base-pipeline``): its
``model_index.json`` names ``ApexQwenImagePipeline`` (``ApexSanaPipeline``) and keeps the stock
transformer entry. Importing this module registers the two pipeline classes in the ``diffusers``
namespace, where ``DiffusionPipeline.from_pretrained`` looks ``_class_name`` up, and the APEX
pipelines load their transformer with the APEX class. diffusers 0.42 imports no module a
folder names, so some import of ours has to come first either way; without it
``DiffusionPipeline.from_pretrained`` fails naming the class instead of quietly sampling with
the stock step. Stock ``QwenImagePipeline.from_pretrained(folder)`` still loads the folder (its
transformer ignores the extra keys).
"""

import diffusers
from diffusers import QwenImagePipeline, SanaPipeline

# diffusers finds a component's load method among the names of the module model_index.json
# gives it; a pipeline saved by ApexQwenImagePipeline.save_pretrained before the classes moved
# into models.py names this one.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401

from megatron_apex.inference.diffusers_apex.pipelines import ApexQwenImagePipeline, ApexSanaPipeline
from megatron_apex.inference.diffusers_apex.models import (
    EXTRAS_NAME,
    ApexQwenImageTransformer2DModel,
    ApexSanaTransformer2DModel,
)

__all__ = ["EXTRAS_NAME", "PIPELINES", "ApexQwenImagePipeline", "ApexQwenImageTransformer2DModel", "ApexSanaPipeline",
           "ApexSanaTransformer2DModel"]

PIPELINES = {QwenImagePipeline.__name__: ApexQwenImagePipeline, SanaPipeline.__name__: ApexSanaPipeline}


def _register() -> None:
    """Make ``DiffusionPipeline.from_pretrained`` find our pipelines: it looks a folder's
    ``_class_name`` up as an attribute of the ``diffusers`` module and nowhere else."""
    for cls in PIPELINES.values():
        if getattr(diffusers, cls.__name__, None) is None:
            setattr(diffusers, cls.__name__, cls)


_register()
