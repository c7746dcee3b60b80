"""The empty prompt's text states: the "unconditional" condition of classifier-free guidance.

Caption dropout trains the model on it, the `released` variant's CFG-enhanced target and the
guided sampler query it. A dataset carries it as `empty_prompt.npy` (written by
tools/prepare_data.py with the dataset's own text encoder); datasets encoded with the built-in
MiniLM encoder get it from that encoder directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from megatron_apex.data.text_encoder import ENCODER_NAME, MiniLMTextEncoder

EMPTY_PROMPT = ""
EMPTY_PROMPT_FILE = "empty_prompt.npy"


def _encoder_is_minilm(manifest: dict) -> bool:
    encoder = manifest.get("text_encoder")
    if isinstance(encoder, dict):
        return encoder.get("kind") == "minilm" or encoder.get("name") == ENCODER_NAME
    return encoder == ENCODER_NAME


def empty_prompt_context(manifest: dict, data_path: Optional[str], needed_by: str) -> Tuple[np.ndarray, np.ndarray]:
    """(states (L, D) float32, mask (L,) bool), padded to the manifest's max_text_len and rounded
    through float16 as every stored caption is. ``needed_by`` names the flag asking for it."""
    length, dim = int(manifest["max_text_len"]), int(manifest["context_dim"])
    where = f"--data-path {data_path}" if data_path else "the built-in dataset"
    path = Path(data_path) / EMPTY_PROMPT_FILE if data_path else None
    if path is not None and path.is_file():
        try:
            states = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise ValueError(f"{path}: not a readable .npy array ({err})") from None
        if states.ndim != 2 or states.shape[1] != dim or states.shape[0] > length or states.dtype.kind != "f":
            raise ValueError(f"{path}: {states.dtype} {tuple(states.shape)}, expected float (<= {length}, {dim}) "
                             "(the empty prompt's text states)")
    elif _encoder_is_minilm(manifest):
        full, mask = MiniLMTextEncoder().encode([EMPTY_PROMPT], max_length=length)
        states = full[0][mask[0]]
    else:
        raise ValueError(f"{needed_by} needs the empty prompt's text states, and {where} has no {EMPTY_PROMPT_FILE}; "
                         "re-run tools/prepare_data.py on it (it writes that file with the dataset's text encoder)")
    context = np.zeros((length, dim), dtype=np.float32)
    context[:len(states)] = states.astype(np.float16).astype(np.float32)
    mask = np.zeros(length, dtype=bool)
    mask[:len(states)] = True
    return context, mask
