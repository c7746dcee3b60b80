"""This rank's micro-batches of one global batch, with the random numbers the step needs.

The host draws every random number (reproducible on any device), the device computes. The
global batch's draws (noise, times, the caption-dropout rows) are made once for the whole global
batch from its counter-based stream (random_streams.py) and sliced like the samples
(data/sampler.micro_batch_slices), and the objective's own draws come from one stream per
micro-batch keyed by its index in the global batch: so the numbers do not depend on how the
global batch is split over data-parallel ranks and micro-batches.
"""

from typing import Dict, List, Optional, Tuple

import torch

from megatron_apex.data.dataset import TrainingDataset
from megatron_apex.data.empty_prompt import empty_prompt_context
from megatron_apex.data.sampler import micro_batch_slices
from megatron_apex.objectives.flow import sample_time
from megatron_apex.training.config import RunConfig
from megatron_apex.training.random_streams import RandomPurpose, stream_generator

EmptyPrompt = Optional[Tuple[torch.Tensor, torch.Tensor]]


def empty_prompt_states(cfg: RunConfig, apex_config, dataset: TrainingDataset, device) -> EmptyPrompt:
    """(context (1, L, D), mask (1, L)) of the empty prompt when caption dropout or the
    CFG-enhanced target needs it, else None."""
    cfg_scale = apex_config.cfg_scale if apex_config is not None else 0.0
    if cfg.data.caption_dropout == 0 and cfg_scale == 0:
        return None
    flag = "--caption-dropout" if cfg.data.caption_dropout > 0 else "--apex-option cfg_scale"
    context, mask = empty_prompt_context(dataset.manifest, cfg.data.data_path, flag)
    return torch.from_numpy(context)[None].to(device), torch.from_numpy(mask)[None].to(device)


class MicroBatches:
    """Turns a global batch (dataset indices) into this data-parallel rank's micro-batches:
    {image, context, context_mask, label, caption, noise, t} on the device, plus the objective's
    generator."""

    def __init__(self, dataset: TrainingDataset, cfg: RunConfig, time_config, dp_rank: int, dp_size: int):
        self.dataset, self.time_config = dataset, time_config
        self.seed, self.micro_batch_size = cfg.train.seed, cfg.train.micro_batch_size
        self.caption_dropout = cfg.data.caption_dropout
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def __call__(self, global_indices: List[int], iteration: int, device, empty_prompt: EmptyPrompt) -> List[Dict]:
        gen = stream_generator(self.seed, iteration, RandomPurpose.GLOBAL_BATCH)
        g = len(global_indices)
        # the sampler's global batches have one sample shape (a latent data set's: one bucket)
        noise = torch.randn((g, *self.dataset.sample_shape(global_indices[0])), generator=gen)
        t = sample_time(g, self.time_config, generator=gen)
        p_drop = self.caption_dropout
        dropped = torch.rand(g, generator=gen) < p_drop if p_drop > 0 else None  # (no draw when off)
        out = []
        for where in micro_batch_slices(g, self.micro_batch_size, self.dp_rank, self.dp_size):
            batch = self.dataset.get_batch(global_indices[where])
            batch["noise"] = noise[where]
            batch["t"] = t[where]
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            if dropped is not None:
                drop_captions(batch, dropped[where].to(device), empty_prompt)
            # the objective's own fresh draws: one stream per micro-batch of the global batch, keyed
            # by its index there (so any data-parallel split draws the same numbers)
            batch["generator"] = stream_generator(self.seed, iteration, RandomPurpose.OBJECTIVE,
                                                  micro_batch=where.start // self.micro_batch_size)
            out.append(batch)
        return out


def drop_captions(batch: Dict, rows: torch.Tensor, empty_prompt: EmptyPrompt) -> None:
    """The captions of ``rows`` replaced by the empty prompt's states (caption dropout)."""
    context, mask = empty_prompt
    if batch["context"].shape[1:] != context.shape[1:]:
        raise ValueError(f"the empty prompt's states are {tuple(context.shape[1:])}, the batch's captions "
                         f"{tuple(batch['context'].shape[1:])}")
    batch["context"] = torch.where(rows[:, None, None], context.to(batch["context"].dtype), batch["context"])
    batch["context_mask"] = torch.where(rows[:, None], mask, batch["context_mask"])
