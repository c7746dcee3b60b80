"""Rebuild a trained model from a checkpoint directory alone (its train_state.json holds the
model config), in one process, whatever TP/PP it was trained with: megatron-core's
dist_checkpointing reshards on load."""

from typing import Dict, Tuple

import torch

from megatron_apex.training import checkpointing

WEIGHTS = ("auto", "ema", "model")


def load_model_for_inference(load: str, weights: str = "auto") -> Tuple[torch.nn.Module, Dict]:
    from megatron_apex.models.registry import build_model, get_model_config
    from megatron_apex.parallel import init_distributed

    if weights not in WEIGHTS:
        raise ValueError(f"--weights {weights!r}: choose one of {WEIGHTS}")
    ckpt = checkpointing.resolve_checkpoint(load)
    state = checkpointing.read_train_state(ckpt)
    if weights == "auto":
        weights = "ema" if state.get("has_ema") else "model"
    if weights == "ema" and not state.get("has_ema"):
        raise ValueError(f"--weights ema: {ckpt} holds no EMA weights (trained with --ema-decay 0)")
    init_distributed(1, 1)
    saved = state["model_config"]
    model = build_model(get_model_config(state["model_name"], **{k: tuple(v) if isinstance(v, list) else v
                                                                 for k, v in saved.items()}))
    prefix = f"{weights}."
    loaded = checkpointing.load_checkpoint(ckpt, {weights: model.sharded_state_dict(prefix=prefix)})
    model.load_state_dict(checkpointing.strip_prefix(loaded[weights], prefix))
    model.eval()
    state["checkpoint"] = ckpt
    state["weights"] = weights
    return model, state
