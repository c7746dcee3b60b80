"""The text side of sampling: prompts in, padded text states out, with the encoders of
tools/prepare_data.py (megatron_apex/data/encoders.py: MiniLM, or a transformers folder with the
Qwen-Image prompt template for Qwen2.5-VL and plain captions for Gemma-2), so a model samples
with the states it was trained on.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

def read_prompt_file(path: str) -> List[str]:
    """One prompt per non-blank line of --prompts ``path``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as err:
        raise ValueError(f"--prompts {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts in the file")
    return prompts


def dataset_captions(data_path: str, shard_names: Sequence[str], limit: int) -> List[str]:
    """The first ``limit`` distinct captions (`KEY.txt` members) of a dataset's shards, in shard
    order; link members and names that leave the folder are not read."""
    captions: List[str] = []
    for name in shard_names:
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            continue
        path = Path(data_path) / name
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    if not (member.isreg() and member.name.endswith(".txt")):
                        continue
                    text = tar.extractfile(member).read().decode("utf-8", "replace").strip()
                    if text and text not in captions:
                        captions.append(text)
                        if len(captions) == limit:
                            return captions
        except (OSError, tarfile.TarError, EOFError):
            continue  # a damaged shard: the trainer skips it too; the next one may have captions
    return captions


def encode_prompts(encoder, prompts: Sequence[str], max_text_len: int, negative: bool = False,
                   batch_size: int = 16) -> List[np.ndarray]:
    """Each prompt's real tokens' states, (n_i, D) float32 (an encoders.py text encoder);
    ``negative``: encoded as the pipelines encode negative prompts."""
    states: List[np.ndarray] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        states.extend(np.asarray(s, dtype=np.float32) for s in encoder.encode(chunk, max_text_len, negative=negative))
    return states


def pad_states(states: Sequence[np.ndarray], length: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(context (N, L, D) float32 with zero padding, mask (N, L) bool), L the longest (or ``length``):
    as the latent loader pads a batch of stored captions."""
    length = max(1, max(len(s) for s in states)) if length is None else length
    dim = states[0].shape[1]
    context = torch.zeros(len(states), length, dim)
    mask = torch.zeros(len(states), length, dtype=torch.bool)
    for i, s in enumerate(states):
        context[i, :len(s)] = torch.from_numpy(s)
        mask[i, :len(s)] = True
    return context, mask
