"""Rebuild a trained model from a checkpoint directory alone (its train_state.json holds the
model config), in one process, whatever TP/PP it was trained with: megatron-core's
dist_checkpointing reshards on load.

A LoRA run's checkpoint holds only its trainable parameters: the model is built, its base
loaded (the base recorded in the checkpoint, or ``pretrained_checkpoint``; a randomly
initialised base is rebuilt from the run's seed), checked against the base fingerprint the
run saved, adapted as the run was, and then the adapters are loaded."""

import dataclasses
import json
import os
from typing import Dict, Optional, Tuple

import torch
from megatron.core.transformer import TransformerConfig

from megatron_apex import checkpoint
from megatron_apex.families import build_model, get_model_config, model_names
from megatron_apex.lora import LoRAConfig, apply_lora, base_fingerprint, check_base_fingerprint, filter_trainable
from megatron_apex.parallel import init_distributed, set_seed

WEIGHTS = ("auto", "ema", "model")


def _model_config(state: Dict, ckpt: str = "the checkpoint"):
    where = os.path.join(ckpt, checkpoint.TRAIN_STATE)
    name = state["model_name"]
    if name not in model_names():
        raise ValueError(f"{where}: model_name {name!r} is not a registered model (known: "
                         f"{', '.join(sorted(model_names()))}); written by a newer or other version?")
    saved = state["model_config"]
    try:
        return get_model_config(name, **{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: model_config does not rebuild the model ({err})") from None


# What a checkpoint's train_state.json must hold for loading, and the type of each entry.
_REQUIRED = {"model_name": str, "model_config": dict}
_REQUIRED_LORA = {"config": dict, "seed": int, "base_fingerprint": dict}


def check_train_state(ckpt: str, state) -> Dict:
    """``state`` (read from ``ckpt``) has what rebuilding the model needs; errors name the key."""
    where = os.path.join(ckpt, checkpoint.TRAIN_STATE)
    if not isinstance(state, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(state).__name__}")
    lora = state.get("lora")
    checks = [(state, "", _REQUIRED)]
    if lora is not None:
        if not isinstance(lora, dict):
            raise ValueError(f"{where}: lora must be an object, got {type(lora).__name__}")
        checks.append((lora, "lora.", _REQUIRED_LORA))
    for holder, prefix, required in checks:
        for key, kind in required.items():
            if key not in holder:
                raise ValueError(f"{where} lacks {prefix}{key} (not a complete megatron_apex checkpoint)")
            if not isinstance(holder[key], kind) or isinstance(holder[key], bool):
                raise ValueError(f"{where}: {prefix}{key} must be a JSON {kind.__name__}, got "
                                 f"{type(holder[key]).__name__}")
    return state


def _load_prefixed(ckpt: str, prefix_name: str, sharded: Dict) -> Dict:
    prefix = f"{prefix_name}."
    loaded = checkpoint.load_checkpoint(ckpt, {prefix_name: sharded})
    return checkpoint.strip_prefix(loaded[prefix_name], prefix)


def lora_base_of(ckpt: str, state: Dict, pretrained_checkpoint: Optional[str] = None) -> Optional[str]:
    """The base checkpoint directory of a LoRA run's checkpoint (None: random init from its seed)."""
    if pretrained_checkpoint:
        return checkpoint.resolve_checkpoint(pretrained_checkpoint, "--pretrained-checkpoint")
    base = state["lora"].get("base")
    if base is None:
        return None
    if not os.path.isfile(os.path.join(base, checkpoint.TRAIN_STATE)):
        raise FileNotFoundError(f"--load {ckpt}: its LoRA base {base} is missing; pass the base weights with "
                                "--pretrained-checkpoint")
    return base


def load_lora_base(ckpt: str, state: Dict, pretrained_checkpoint: Optional[str] = None
                   ) -> Tuple[torch.nn.Module, Optional[str]]:
    """(the base model of a LoRA checkpoint, unadapted, TP=1 single stage; its checkpoint dir)."""
    config = _model_config(state, ckpt)
    base = lora_base_of(ckpt, state, pretrained_checkpoint)
    if base is None:  # the run's random initialisation, rebuilt (the fingerprint checks it)
        set_seed(int(state["lora"]["seed"]))
        return build_model(config), None
    base_state = checkpoint.read_train_state(base)
    if base_state.get("lora") is not None:
        raise ValueError(f"--pretrained-checkpoint {base}: a LoRA checkpoint (adapters only), not base weights")
    ours = json.loads(json.dumps(dataclasses.asdict(config)))
    theirs = base_state.get("model_config", {})
    diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if diff:
        shown = ", ".join(f"{k}: base {theirs.get(k)!r} vs LoRA run {ours.get(k)!r}" for k in diff)
        raise ValueError(f"base {base} is not the model of the LoRA checkpoint {ckpt} ({shown})")
    model = build_model(config.replace(perform_initialization=False))
    model.load_state_dict(_load_prefixed(base, "model", model.sharded_state_dict(prefix="model.")))
    return model, base


def load_lora_model(ckpt: str, state: Dict, weights: str, pretrained_checkpoint: Optional[str] = None,
                    check_base: bool = True) -> Tuple[torch.nn.Module, Optional[str]]:
    """(the adapted model of a LoRA checkpoint with its ``weights`` ("model" | "ema") adapters,
    the base checkpoint dir)."""
    model, base = load_lora_base(ckpt, state, pretrained_checkpoint)
    apply_lora(model, LoRAConfig.from_dict(state["lora"]["config"]))
    if check_base:
        try:
            check_base_fingerprint(state["lora"]["base_fingerprint"], base_fingerprint(model), f"--load {ckpt}")
        except ValueError as err:
            raise ValueError(f"{err}; base used: {base or 'random initialisation'} (give the right one with "
                             "--pretrained-checkpoint)") from None
    prefix = f"{weights}."
    trainable = filter_trainable(model.sharded_state_dict(prefix=prefix), model)
    result = model.load_state_dict(_load_prefixed(ckpt, weights, trainable), strict=False)
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(k for k in result.missing_keys if k in wanted)
    if missing or result.unexpected_keys:
        raise ValueError(f"--load {ckpt}: LoRA entries do not fit the model (missing {missing}, unexpected "
                         f"{sorted(result.unexpected_keys)})")
    return model, base


def read_checkpoint(load: str, weights: str = "auto", pretrained_checkpoint: Optional[str] = None
                    ) -> Tuple[str, Dict, str]:
    """(the checkpoint directory, its checked train_state, the weights to load: "model" | "ema"),
    without building anything: every refusal of ``load_model_for_inference`` that needs no weights."""
    if weights not in WEIGHTS:
        raise ValueError(f"--weights {weights!r}: choose one of {WEIGHTS}")
    ckpt = checkpoint.resolve_checkpoint(load, "--load")
    state = check_train_state(ckpt, checkpoint.read_train_state(ckpt))
    if weights == "auto":
        weights = "ema" if state.get("has_ema") else "model"
    if weights == "ema" and not state.get("has_ema"):
        raise ValueError(f"--weights ema: {ckpt} holds no EMA weights (trained with --ema-decay 0)")
    if pretrained_checkpoint and not state.get("lora"):
        raise ValueError(f"--pretrained-checkpoint: {ckpt} is a full checkpoint (not a LoRA run); it needs no base")
    return ckpt, state, weights


def model_config_of(ckpt: str, state: Dict):
    """The model config a checkpoint's train_state records (errors name its train_state.json)."""
    return _model_config(state, ckpt)


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` with parameters of ``dtype``, its forward casting inputs to it too (the models
    cast latents and text states to their config's params_dtype)."""
    model.to(dtype)
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, TransformerConfig):
            config.params_dtype = dtype
            config.bf16, config.fp16 = dtype == torch.bfloat16, dtype == torch.float16
    return model


def load_model_for_inference(load: str, weights: str = "auto", pretrained_checkpoint: Optional[str] = None,
                             dtype: Optional[torch.dtype] = None) -> Tuple[torch.nn.Module, Dict]:
    """(the model, eval mode, TP=1; the checkpoint's train_state plus ``checkpoint``, ``weights``
    and, for a LoRA run, ``lora_base``). ``pretrained_checkpoint`` overrides a LoRA run's base.
    ``dtype``: of the parameters; None = float32 without CUDA (a --bf16 run's checkpoint would
    otherwise sample with slow, coarse bf16 CPU matmuls), the checkpoint's own dtype with CUDA."""
    ckpt, state, weights = read_checkpoint(load, weights, pretrained_checkpoint)
    init_distributed(1, 1)
    if state.get("lora"):
        model, state["lora_base"] = load_lora_model(ckpt, state, weights, pretrained_checkpoint)
    else:
        model = build_model(_model_config(state, ckpt))
        prefix = f"{weights}."
        loaded = checkpoint.load_checkpoint(ckpt, {weights: model.sharded_state_dict(prefix=prefix)})
        model.load_state_dict(checkpoint.strip_prefix(loaded[weights], prefix))
    if dtype is None and not torch.cuda.is_available():
        dtype = torch.float32
    if dtype is not None:
        cast_model(model, dtype)
    model.eval()
    state["checkpoint"] = ckpt
    state["weights"] = weights
    return model, state
