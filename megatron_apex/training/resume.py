"""Where a run starts and what it leaves behind: --load and --pretrained-checkpoint resolved to
complete checkpoints and checked against the flags before any dataset, model, optimizer, EMA or
teacher is built (check_starting_checkpoints), loaded into the built run
(load_starting_checkpoint), and the run's own checkpoints written (save_run).

``run`` below is the Trainer (training/loop.py): its cfg, parameter strategy
(training/strategy.py), model, optimizer, scheduler, EMA, teacher and counters.
"""

import dataclasses
import json
import os
import subprocess
from typing import Callable, Dict, Optional

from megatron_apex import checkpoint
from megatron_apex.training import optimizer_state
from megatron_apex.training.config import RunConfig

Log = Callable[[str], None]


@dataclasses.dataclass
class StartingCheckpoints:
    """What --load and --pretrained-checkpoint name, resolved to complete checkpoints and checked
    against the run's flags before any dataset, model, optimizer, EMA or teacher is built."""

    load: Optional[str] = None  # the checkpoint directory --load resolves to
    load_state: Optional[Dict] = None  # its train_state.json
    pretrained: Optional[str] = None  # the checkpoint directory --pretrained-checkpoint resolves to
    pretrained_state: Optional[Dict] = None
    lora_base: Optional[str] = None  # a LoRA run's base weights; None = random initialisation


def code_version() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


WEIGHTLESS_SHIFT_KEYS = ("shift_a", "shift_b", "shift_site")


def _fixed_scalar_shift(model_config: Dict) -> bool:
    """A fixed scalar c_fake = a c + b lives in non-persistent buffers: no checkpointed weights."""
    return model_config.get("shift_kind", "scalar") == "scalar" and not model_config.get("shift_learnable")


def check_model_config(ckpt: str, state: Dict, flag: str, model_config, log: Log, weights_only: bool = False) -> None:
    saved_cfg = state.get("model_config", {})
    ours = json.loads(json.dumps(dataclasses.asdict(model_config)))  # tuples as saved: lists
    diff = sorted(k for k in set(saved_cfg) | set(ours) if saved_cfg.get(k) != ours.get(k))
    if weights_only and _fixed_scalar_shift(saved_cfg) and _fixed_scalar_shift(ours):
        # a fixed scalar shift holds no weights, so a fine-tune may pick another one
        relabelled = [k for k in diff if k in WEIGHTLESS_SHIFT_KEYS]
        if relabelled:
            log(f"{flag} {ckpt}: fine-tuning with " + ", ".join(
                f"{k} {ours.get(k)!r} (checkpoint {saved_cfg.get(k)!r})" for k in relabelled))
        diff = [k for k in diff if k not in WEIGHTLESS_SHIFT_KEYS]
    if weights_only:
        # the weights are cast to the run's dtype on load: a float32 import starts a --bf16 run
        diff = [k for k in diff if k != "params_dtype"]
    if diff:
        shown = ", ".join(f"{k}: checkpoint {saved_cfg.get(k)!r} vs run {ours.get(k)!r}" for k in diff)
        raise ValueError(f"{flag} {ckpt}: model config differs from this run's flags ({shown})")


# ---- before anything is built --------------------------------------------------------------
def check_starting_checkpoints(cfg: RunConfig, model_config, strategy, log: Log) -> StartingCheckpoints:
    """Resolve --load and --pretrained-checkpoint and check them against the flags (model
    config, LoRA or full, EMA, optimizer state): everything but the LoRA base's fingerprint,
    which needs the base's weights."""
    ck = cfg.checkpoint
    found = StartingCheckpoints()
    if ck.pretrained_checkpoint:
        found.pretrained = checkpoint.resolve_checkpoint(ck.pretrained_checkpoint, "--pretrained-checkpoint", log=log)
        found.pretrained_state = checkpoint.read_train_state(found.pretrained)
    if ck.load and not _first_start(cfg, log):
        found.load = checkpoint.resolve_checkpoint(ck.load, "--load", log=log)
        found.load_state = checkpoint.read_train_state(found.load, required=("model_config",))
    strategy.check_starting(found)
    if found.load is not None:
        _check_load(cfg, model_config, strategy, found.load, found.load_state, log)
    _check_save_keeps_its_checkpoints(cfg, found)
    return found


def _first_start(cfg: RunConfig, log: Log) -> bool:
    """--load names this run's own --save and it holds no checkpoint yet: the first start of
    a run that a re-run of the same command resumes (the recipes, the CPU job). It starts
    as it would without --load (from --pretrained-checkpoint, else from --seed). A directory
    with a `latest` marker or an iter_* entry holds a checkpoint, or a damaged one, which
    --load resolves or refuses as always; so does a --load other than --save."""
    ck = cfg.checkpoint
    if not ck.save or os.path.abspath(ck.load) != os.path.abspath(ck.save):
        return False
    if os.path.isdir(ck.load):
        if any(name == checkpoint.LATEST or name.startswith("iter_") for name in os.listdir(ck.load)):
            return False
    elif os.path.exists(ck.load):
        return False
    start = f"the weights of --pretrained-checkpoint {ck.pretrained_checkpoint}" if ck.pretrained_checkpoint \
        else f"--seed {cfg.train.seed}"
    log(f"[megatron_apex] --load {ck.load} holds no checkpoint yet: first start, from {start}")
    return True


def _check_save_keeps_its_checkpoints(cfg: RunConfig, found: StartingCheckpoints) -> None:
    """A run never writes over a complete checkpoint: --save may hold none past the
    iteration the run starts at (a fresh start over an earlier run's directory, or a
    resume from an older checkpoint than its newest, would replace them one by one)."""
    ck = cfg.checkpoint
    if not ck.save:
        return
    start = found.load_state["iteration"] if found.load is not None and not ck.finetune else 0
    later = [i for i in checkpoint.complete_checkpoints(ck.save) if i > start]
    if later:
        names = ", ".join(os.path.basename(checkpoint.checkpoint_dir(ck.save, i)) for i in later)
        raise ValueError(f"--save {ck.save} holds complete checkpoints past iteration {start}, where this run "
                         f"starts ({names}), which it would overwrite: resume the newest with --load {ck.save}, "
                         "or give another --save")


def _check_load(cfg: RunConfig, model_config, strategy, ckpt: str, state: Dict, log: Log) -> None:
    ck = cfg.checkpoint
    check_model_config(ckpt, state, "--load", model_config, log, weights_only=ck.finetune)
    strategy.check_load(ckpt, state)
    if not strategy.loads_own_kind(state) or ck.finetune:
        return  # weights only: this run's LoRA base (loaded with it), or a fine-tune's start
    if state.get("has_ema") and not cfg.train.ema_decay > 0:
        raise ValueError(f"--load {ckpt}: checkpoint holds EMA weights but --ema-decay is 0")
    if "scheduler" not in state:
        raise ValueError(f"--load {ckpt}: holds weights only (no optimizer state); add --finetune")
    checkpoint.read_train_state(ckpt, required=("iteration", "consumed_samples"))


# Flags whose change makes a resumed run differ from the run that wrote the checkpoint
# (architecture, LoRA and EMA mismatches are errors, checked above; these are allowed, as
# Megatron allows them, but named so that nobody changes them by accident).
RUN_DEFINING = {"objective": ("objective", "apex_start_iter", "teacher", "apex", "time_sampler", "schedule"),
                "train": ("micro_batch_size", "global_batch_size", "seed", "ema_decay"),
                "optim": ("lr", "min_lr", "lr_warmup_iters", "lr_decay_style", "lr_decay_iters", "weight_decay",
                          "adam_beta1", "adam_beta2", "adam_eps", "clip_grad", "bf16"),
                "data": ("data_path", "caption_dropout")}


def report_changed_flags(cfg: RunConfig, ckpt: str, saved_args: Dict, log: Log) -> None:
    ours = json.loads(json.dumps(cfg.to_dict()))
    changed = [f"{group}.{key}: checkpoint {saved_args[group][key]!r} -> now {ours[group][key]!r}"
               for group, keys in RUN_DEFINING.items() for key in keys
               if key in saved_args.get(group, {}) and saved_args[group][key] != ours[group][key]]
    if changed:
        log(f"[megatron_apex] WARNING: resuming {ckpt} with changed flags: {'; '.join(changed)}")


# ---- the built run ---------------------------------------------------------------------------
def load_starting_checkpoint(run) -> None:
    """Load what check_starting_checkpoints found (and checked) into the built run."""
    ck, strategy = run.cfg.checkpoint, run.strategy
    ckpt, state = run.starting.load, run.starting.load_state
    if ckpt is None:
        if run.starting.pretrained is not None and not strategy.pretrained_is_lora_base:  # (a base is loaded)
            _load_weights_only(run, run.starting.pretrained, run.starting.pretrained_state)
        return
    if not strategy.loads_own_kind(state):
        return  # a full checkpoint given to a LoRA run with --finetune: its base, loaded with it
    strategy.check_base_of(ckpt, state)
    if ck.finetune:
        _load_weights_only(run, ckpt, state)
        return
    if state.get("has_teacher"):
        run.teacher = strategy.frozen_copy(run.model)
    loaded = checkpoint.load_checkpoint(ckpt, run_sharded_state_dict(run, True, state.get("has_teacher")))
    strategy.load_module(run.model, loaded["model"], "model.")
    optimizer_state.load_optimizer_state(run.optimizer, loaded["optimizer"])
    if run.ema is not None:
        if "ema" in loaded:
            strategy.load_module(run.ema, loaded["ema"], "ema.")
        else:  # EMA switched on at resume: start it from the current weights
            strategy.sync_from_model(run.ema, run.model)
    if run.teacher is not None:
        strategy.load_module(run.teacher, loaded["teacher"], "teacher.")
    report_changed_flags(run.cfg, ckpt, state.get("args", {}), run.print0)
    run.scheduler.load_state_dict(state["scheduler"])
    run.iteration = state["iteration"]
    run.consumed_samples = state["consumed_samples"]
    run.skipped_iters = state.get("skipped_iters", 0)
    run.print0(f"[megatron_apex] resumed from {ckpt} (iteration {run.iteration})")


def _load_weights_only(run, ckpt: str, state: Dict) -> None:
    sharded = {"model": run.strategy.sharded_module(run.model, "model.")}
    loaded = checkpoint.load_checkpoint(ckpt, sharded)
    run.strategy.load_module(run.model, loaded["model"], "model.")
    # A --bf16 optimizer copied the initial weights into its float32 main weights when it was
    # built, and its first step would copy those back over the loaded ones.
    run.optimizer.reload_model_params()
    if run.ema is not None:
        run.strategy.sync_from_model(run.ema, run.model)
    run.print0(f"[megatron_apex] fine-tuning from the weights of {ckpt}")


def run_sharded_state_dict(run, is_loading: bool, with_teacher: bool) -> Dict:
    model_sd = run.strategy.sharded_module(run.model, "model.")
    state = {"model": model_sd,
             "optimizer": optimizer_state.optimizer_sharded_state_dict(run.optimizer, model_sd, is_loading)}
    if run.ema is not None:
        state["ema"] = run.strategy.sharded_module(run.ema, "ema.")
    if with_teacher:
        state["teacher"] = run.strategy.sharded_module(run.teacher, "teacher.")
    return state


def run_train_state(run) -> Dict:
    return {
        "iteration": run.iteration,
        "consumed_samples": run.consumed_samples,
        "skipped_iters": run.skipped_iters,
        "scheduler": run.scheduler.state_dict(),
        "args": run.cfg.to_dict(),
        "model_name": run.cfg.model,
        "model_config": dataclasses.asdict(run.model_config),
        "has_teacher": run.teacher is not None,
        "has_ema": run.ema is not None,
        "code_version": code_version(),
        **run.strategy.train_state(),
    }


def save_run(run) -> None:
    ck = run.cfg.checkpoint
    if not ck.save:
        return
    checkpoint.save_checkpoint(ck.save, run.iteration, run_sharded_state_dict(run, False, run.teacher is not None),
                               run_train_state(run), keep_last=ck.keep_last)
