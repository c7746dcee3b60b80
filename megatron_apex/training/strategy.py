"""What a run trains, chosen once from the flags: every parameter (FullParameters) or LoRA
adapters over a frozen base (LoRAParameters, ``--lora-rank``, docs/lora.md).

The strategy answers every question whose answer depends on that choice: which starting
checkpoints fit the run, what is loaded before the optimizer exists, how the EMA and the frozen
teacher copy the model and are updated, which part of a module a checkpoint holds and how it is
loaded back, what train_state.json records besides the counters, and who answers the fake
reference's queries.

LoRA: the model is built, its base weights loaded (``--pretrained-checkpoint``, or a full
checkpoint given as ``--load ... --finetune``, or the base recorded in the LoRA checkpoint being
resumed), then adapted (megatron_apex.lora.apply_lora) BEFORE DDP and the optimizer exist, so
both only see the trainable parameters. The EMA and the frozen teacher are copies that share the
base's tensors with the model and own only the trainable ones. Checkpoints hold only the
trainable parameters (model, optimizer state, EMA, teacher) plus, in train_state.json, the
base's path and fingerprint; a resumed run must find the same base.
"""

import os
from typing import Callable, Dict, Optional

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_apex import checkpoint
from megatron_apex.lora import (LoRAConfig, apply_lora, base_fingerprint, check_base_fingerprint, filter_trainable,
                                format_parameter_summary, parameter_summary)
from megatron_apex.parallel import fsdp
from megatron_apex.training.config import RunConfig
from megatron_apex.training.ema import frozen_copy, update_ema
from megatron_apex.training.resume import StartingCheckpoints, check_model_config

Log = Callable[[str], None]


def sharded_state_dict(module, prefix: str) -> Dict:
    return checkpoint.mark_tp_replicas(module.sharded_state_dict(prefix=prefix))


class FullParameters:
    """Every parameter trains: the EMA and the teacher are whole copies of the model, and a
    checkpoint holds all of its weights."""

    lora_config = None
    fake_reference_is_base = False
    pretrained_is_lora_base = False  # --pretrained-checkpoint's weights are loaded as they are

    def __init__(self, cfg: RunConfig, model_config, log: Log):
        self.cfg, self.model_config, self._log = cfg, model_config, log
        self._build_model = None

    # ---- the starting checkpoints, before anything is built -------------------------------
    def check_starting(self, found: StartingCheckpoints) -> None:
        if found.pretrained is None:
            return
        state = found.pretrained_state
        if state.get("lora") is not None:
            raise ValueError(f"--pretrained-checkpoint {found.pretrained}: a LoRA checkpoint (adapters only); "
                             f"give --lora-rank {state['lora']['config']['rank']} and the LoRA flags to train it "
                             "further, or export a merged model with tools/export_lora.py --merged")
        check_model_config(found.pretrained, state, "--pretrained-checkpoint", self.model_config, self._log,
                           weights_only=True)

    def check_load(self, ckpt: str, state: Dict) -> None:
        """--load's checkpoint is one a full-parameter run can start from."""
        saved_lora = state.get("lora")
        if saved_lora is not None:
            rank = saved_lora["config"]["rank"]
            raise ValueError(f"--load {ckpt}: a LoRA checkpoint (rank {rank}, adapters only); resume it with its "
                             f"--lora-* flags (--lora-rank {rank} ...), or export a merged model with "
                             "tools/export_lora.py --merged")

    def loads_own_kind(self, state: Dict) -> bool:
        return True

    def check_base_of(self, ckpt: str, state: Dict) -> None:
        pass  # no base

    # ---- building ---------------------------------------------------------------------------
    def prepare(self, model, build_model: Callable, starting: StartingCheckpoints) -> None:
        self._build_model = build_model

    def report(self, model, dp_size: int) -> None:
        pass

    def frozen_copy(self, model) -> torch.nn.Module:
        """A frozen copy of the model (EMA, teacher)."""
        if self.cfg.parallel.fsdp:  # sharded like the model: shard-local EMA update, no whole copy
            return frozen_copy(model, lambda: fsdp.shard_model(self._build_model(), frozen=True))
        return frozen_copy(model, self._build_model)

    @torch.no_grad()
    def update_ema(self, ema, model) -> None:
        update_ema(ema, model, self.cfg.train.ema_decay)

    def sync_from_model(self, copy, model) -> None:
        copy.load_state_dict(model.state_dict())

    # ---- checkpoints ------------------------------------------------------------------------
    def sharded_module(self, module, prefix: str) -> Dict:
        if self.cfg.parallel.fsdp:
            return fsdp.sharded_state_dict(module, prefix)
        return sharded_state_dict(module, prefix)

    def load_module(self, module, loaded: Dict, prefix: str) -> None:
        state = checkpoint.module_state_dict(loaded, prefix, module)
        if self.cfg.parallel.fsdp:
            fsdp.load_local_state(module, state)
            return
        module.load_state_dict(state)

    def train_state(self) -> Dict:
        return {}


# The LoRA settings a checkpoint's adapters depend on, with their flags (compared on resume;
# dropout and the init seed may change).
_LORA_STRUCTURE = {"rank": "--lora-rank", "scale": "--lora-alpha (scale alpha / rank)", "targets": "--lora-targets",
                   "extra_trainable": "--lora-extra-trainable", "train_condition_shift": "train_condition_shift",
                   "train_target_time_embedder": "train_target_time_embedder"}


def _lora_structure(config: Dict) -> Dict:
    lora = LoRAConfig.from_dict(config)
    return {"rank": lora.rank, "scale": lora.scale, "targets": list(lora.targets),
            "extra_trainable": list(lora.extra_trainable), "train_condition_shift": lora.train_condition_shift,
            "train_target_time_embedder": lora.train_target_time_embedder}


def share_frozen_(copy: torch.nn.Module, model: torch.nn.Module) -> None:
    """Make ``copy`` (built like ``model``) use ``model``'s frozen parameters and its buffers
    themselves (no second copy of the base in memory); its own tensors for them are dropped."""
    pairs = list(zip(copy.named_modules(), model.named_modules()))
    for (name, mine), (other_name, theirs) in pairs:
        if name != other_name or type(mine) is not type(theirs):
            raise ValueError(f"frozen copy: module {name!r} ({type(mine).__name__}) does not match the model's "
                             f"{other_name!r} ({type(theirs).__name__})")
        for key, param in theirs._parameters.items():
            if param is not None and not param.requires_grad:
                mine._parameters[key] = param
        for key, buf in theirs._buffers.items():
            if buf is not None:
                mine._buffers[key] = buf


class LoRAParameters:
    """Adapters (and the parts --lora-extra-trainable names) train over a frozen base; see the
    module docstring."""

    pretrained_is_lora_base = True  # --pretrained-checkpoint names the base, loaded by prepare()

    def __init__(self, cfg: RunConfig, model_config, log: Log):
        self.cfg, self.model_config, self._log = cfg, model_config, log
        self.lora_config = cfg.lora.lora_config()
        self.fake_reference_is_base = cfg.lora.fake_reference == "base"
        self._build_model = None
        self.lora_base: Optional[str] = None  # the base's checkpoint directory; None = random init
        self.base_fingerprint = None
        self._trainable_names, self._trainable_keys = set(), set()

    # ---- the starting checkpoints, before anything is built -------------------------------
    def check_starting(self, found: StartingCheckpoints) -> None:
        base, flag = self._base_checkpoint(found)
        found.lora_base = base
        if base is None:
            return
        state = (found.pretrained_state if base == found.pretrained else found.load_state if base == found.load
                 else checkpoint.read_train_state(base))
        if state.get("lora") is not None:
            raise ValueError(f"{flag} {base}: a LoRA checkpoint (adapters only), not base weights; give the full "
                             f"checkpoint it was trained on ({state['lora'].get('base')})")
        check_model_config(base, state, flag, self.model_config, self._log, weights_only=True)

    def _base_checkpoint(self, found: StartingCheckpoints):
        """(the checkpoint directory of this LoRA run's base weights, None = random init from
        --seed; where it comes from, for messages)."""
        ck = self.cfg.checkpoint
        flag = "--pretrained-checkpoint"
        pretrained, ckpt = found.pretrained, found.load
        if ckpt is None:
            return pretrained, flag
        saved = found.load_state.get("lora")
        if saved is None:  # a full checkpoint: the base of a new LoRA run
            if not ck.finetune:
                raise ValueError(f"--load {ckpt}: a full checkpoint (no LoRA adapters), which a LoRA run cannot "
                                 f"resume; train a LoRA on it with --pretrained-checkpoint {ck.load} (or --load "
                                 f"{ck.load} --finetune)")
            if pretrained is not None:
                raise ValueError(f"--pretrained-checkpoint {ck.pretrained_checkpoint} and --load {ck.load} --finetune "
                                 "(a full checkpoint) both name the LoRA base; give one")
            return ckpt, "--load"
        if pretrained is not None:
            return pretrained, flag
        base = saved.get("base")
        if base is None:
            return None, flag
        if not os.path.isfile(os.path.join(base, checkpoint.TRAIN_STATE)):
            raise FileNotFoundError(f"--load {ckpt}: its LoRA base {base} is missing; pass the base weights with "
                                    "--pretrained-checkpoint")
        return base, f"the LoRA base recorded in --load {ckpt}:"

    def check_load(self, ckpt: str, state: Dict) -> None:
        """The adapters of ``ckpt`` fit this run's (a full checkpoint is this run's base)."""
        saved = state.get("lora")
        if saved is None:
            return  # a full checkpoint given with --finetune: this run's base (check_starting)
        theirs, ours = _lora_structure(saved["config"]), _lora_structure(self.lora_config.to_dict())
        diff = [k for k in _LORA_STRUCTURE if theirs[k] != ours[k]]
        if diff:
            shown = ", ".join(f"{_LORA_STRUCTURE[k] or k}: checkpoint {theirs[k]!r} vs run {ours[k]!r}" for k in diff)
            raise ValueError(f"--load {ckpt}: LoRA settings differ from this run's flags ({shown})")

    def loads_own_kind(self, state: Dict) -> bool:
        """Whether --load's checkpoint holds adapters (False: a full checkpoint, this run's base,
        which prepare() loads)."""
        return state.get("lora") is not None

    def check_base_of(self, ckpt: str, state: Dict) -> None:
        """The adapters of ``ckpt`` were trained on this run's base (needs the base loaded)."""
        saved = state["lora"]
        try:
            check_base_fingerprint(saved["base_fingerprint"], self.base_fingerprint, source=f"--load {ckpt}")
        except ValueError as err:
            theirs_base = saved.get("base") or f"random initialisation with --seed {saved.get('seed')}"
            ours_base = self.lora_base or f"random initialisation with --seed {self.cfg.train.seed}"
            raise ValueError(f"{err}; its base: {theirs_base}, this run's: {ours_base} (give the right one with "
                             "--pretrained-checkpoint)") from None

    # ---- building ---------------------------------------------------------------------------
    def prepare(self, model, build_model: Callable, starting: StartingCheckpoints) -> None:
        """Base weights, then adapters (before DDP / optimizer), then the base's fingerprint."""
        self._build_model = build_model
        base = starting.lora_base  # checked in check_starting
        if base is not None:
            loaded = checkpoint.load_checkpoint(base, {"model": sharded_state_dict(model, "model.")})
            model.load_state_dict(checkpoint.module_state_dict(loaded["model"], "model.", model))
        self.lora_base = os.path.abspath(base) if base is not None else None
        apply_lora(model, self.lora_config)
        self.base_fingerprint = base_fingerprint(model)  # collective over TP/PP
        self._trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
        trainable = filter_trainable(sharded_state_dict(model, "model."), model)
        self._trainable_keys = {v.key[len("model."):] for v in trainable.values()}
        where = self.lora_base or f"random initialisation (--seed {self.cfg.train.seed})"
        self._log(f"[megatron_apex] LoRA rank {self.lora_config.rank} on {self.lora_config.targets} over the frozen "
                     f"base {where}")

    def report(self, model, dp_size: int) -> None:
        summary = parameter_summary(model, dp_size=dp_size,
                                    distributed_optimizer=self.cfg.parallel.use_distributed_optimizer)
        self._log(f"[megatron_apex] {format_parameter_summary(summary)}")

    def frozen_copy(self, model) -> torch.nn.Module:
        """A frozen copy that owns only the trainable parameters and shares the base's tensors
        with the model."""
        clone = self._build_model()
        apply_lora(clone, self.lora_config)
        share_frozen_(clone, model)
        clone.requires_grad_(False)
        clone.eval()
        self.sync_from_model(clone, model)
        return clone

    @torch.no_grad()
    def update_ema(self, ema, model) -> None:
        params = dict(ema.named_parameters())
        for name, p in model.named_parameters():
            if p.requires_grad:
                params[name].lerp_(p.detach().to(params[name].dtype), 1.0 - self.cfg.train.ema_decay)

    @torch.no_grad()
    def sync_from_model(self, copy, model) -> None:
        params = dict(copy.named_parameters())
        for name, p in model.named_parameters():
            if p.requires_grad:
                params[name].copy_(p.detach())

    # ---- checkpoints ------------------------------------------------------------------------
    def sharded_module(self, module, prefix: str) -> Dict:
        """Only the trainable part (--fsdp does not run with LoRA: parallel.fsdp.check_fsdp_config)."""
        sharded = sharded_state_dict(module, prefix)
        return {k: v for k, v in sharded.items()
                if isinstance(v, ShardedTensor) and v.key[len(prefix):] in self._trainable_keys}

    def load_module(self, module, loaded: Dict, prefix: str) -> None:
        state = checkpoint.module_state_dict(loaded, prefix, module)
        result = module.load_state_dict(state, strict=False)
        missing = sorted(k for k in result.missing_keys if k in self._trainable_names)
        if missing or result.unexpected_keys:
            raise ValueError(f"LoRA checkpoint entries do not fit the model: missing {missing}, unexpected "
                             f"{sorted(result.unexpected_keys)}")

    def train_state(self) -> Dict:
        return {"lora": {"config": self.lora_config.to_dict(), "base": self.lora_base, "seed": self.cfg.train.seed,
                         "base_fingerprint": self.base_fingerprint}}


def parameter_strategy(cfg: RunConfig, model_config, log: Log):
    """FullParameters, or LoRAParameters under --lora-rank."""
    return LoRAParameters(cfg, model_config, log) if cfg.lora.enabled else FullParameters(cfg, model_config, log)
