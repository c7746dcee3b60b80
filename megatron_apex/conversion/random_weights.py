"""Random weights for diffusers models in parity tests and checks: every parameter nonzero and
of unit-ish scale (diffusers' own init zeroes some, which would hide mapping mistakes)."""

from typing import Dict, Iterator, Tuple

import torch

from megatron_apex.conversion import hf_io
from megatron_apex.sizing import tensor_nbytes


def _random_like(name: str, shape, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight") or ".norm_" in name:
        return 1 + 0.2 * torch.randn(shape, generator=gen)
    fan_in = shape[-1] if len(shape) == 2 else 4.0
    return torch.randn(shape, generator=gen) / fan_in ** 0.5


@torch.no_grad()
def randomize_weights_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """In place: norm weights ~ 1 + 0.2 N(0, 1), everything else N(0, 1) / sqrt(fan-in)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.copy_(_random_like(name, p.shape, gen))
    return model


def write_random_diffusers_folder(path: str, diffusers_class: str, config: Dict, seed: int = 0,
                                  max_shard_size="5GB", dtype: torch.dtype = torch.float32) -> Dict[str, int]:
    """A diffusers model folder (config.json + safetensors shards) of ``diffusers_class(**config)``
    with :func:`randomize_weights_`'s weights, written one tensor at a time: a model larger
    than memory can be made (the model is built on the meta device for its keys and shapes).
    Returns {"bytes": total size, "largest": the largest tensor's size}."""
    import diffusers  # optional (the hf extra)

    with torch.device("meta"):
        model = getattr(diffusers, diffusers_class)(**config)
    shapes = [(name, tuple(p.shape)) for name, p in model.named_parameters()]

    def items(meta: bool) -> Iterator[Tuple[str, torch.Tensor, bool]]:
        gen = torch.Generator().manual_seed(seed)
        for name, shape in shapes:
            if meta:
                yield name, torch.empty(shape, dtype=dtype, device="meta"), False
            else:
                yield name, _random_like(name, shape, gen).to(dtype), False

    with hf_io.atomic_output_dir(path, "path") as tmp:
        model.save_config(tmp)
        hf_io.write_tensor_stream(tmp, items, hf_io.parse_size(max_shard_size), separate_extras=False)
    sizes = [tensor_nbytes(shape, dtype) for _, shape in shapes]
    return {"bytes": sum(sizes), "largest": max(sizes)}
