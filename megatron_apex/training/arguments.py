"""Megatron-style command-line flags, parsed into explicit dataclass configs (config.py).

No global argument state: `parse_args(argv)` returns a `RunConfig` that is passed down
explicitly. Flag names follow Megatron-LM wherever Megatron-LM has the flag.
"""

import argparse
import dataclasses
import math
from typing import Any, Dict, List, Optional, Set

from megatron_apex.cli import OneLineErrorParser
from megatron_apex.gpu import add_gpu_arguments, gpu_options_from_args
from megatron_apex.gpu import model_overrides as gpu_model_overrides
from megatron_apex.objectives.apex import APEX_PRESETS, APEXConfig, preset_fields
from megatron_apex.objectives.flow import TimeSamplerConfig
from megatron_apex.training.config import (APEX_SCHEDULES, LORA_FAKE_REFERENCES, OBJECTIVES, RECOMPUTE_GRANULARITIES,
                                           CheckpointArgs, DataArgs, LoggingArgs, LoRAArgs, ObjectiveArgs, OptimArgs,
                                           ParallelArgs, RunConfig, TrainArgs)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="pretrain_apex_dit.py", description=__doc__,
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="qwen-image-tiny", help="registry name (megatron_apex.families)")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--kv-channels", type=int, help="attention head dim")
    g.add_argument("--patch-size", type=int)
    g.add_argument("--shift-site", choices=("input", "projected"), help="where c_fake = A c + b is applied")
    g.add_argument("--shift-kind", choices=("scalar", "diagonal", "full"))
    g.add_argument("--shift-a", type=float, help="condition shift scale a (c_fake = a*c + b)")
    g.add_argument("--shift-b", type=float, help="condition shift offset b")
    g.add_argument("--target-time-embedder", choices=("none", "copy", "zero"),
                   help="any-step target-time embedder: none, initialised from the time embedder, or zero")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--fsdp", action="store_true",
                   help="fully sharded data parallelism (torch FSDP2, ZeRO-3): weights, gradients, optimizer state, "
                        "teacher and EMA sharded over the data-parallel ranks; full-parameter training, TP = PP = 1")
    g.add_argument("--recompute-granularity", choices=RECOMPUTE_GRANULARITIES, default=None,
                   help="activation recompute: each layer (full) or core attention only (selective)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="with --tensor-model-parallel-size > 1: split the activations between the tensor-parallel "
                        "linears along the sequence over the TP ranks (1/TP of their memory; Qwen-Image)")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=64)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data-parallel size")
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the weights kept for sampling; 0 = off")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="exit (after saving a checkpoint) when the iteration is a multiple of this")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="exit (after saving a checkpoint, exit code 0) once training has run this many minutes")
    g.add_argument("--max-skipped-iters", type=int, default=TrainArgs.max_skipped_iters,
                   help="a non-finite loss or grad norm skips the update; after this many consecutive skips the "
                        "run saves the last good weights and stops (0 = never stop)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine"), default="cosine")
    g.add_argument("--lr-decay-iters", type=int, default=None,
                   help="iterations the LR decays over, then it stays at --min-lr (default: --train-iters)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    add_gpu_arguments(p.add_argument_group("GPU paths and precision (docs/gpu.md)"))

    g = p.add_argument_group("objective")
    g.add_argument("--objective", default="apex", help=f"one of {OBJECTIVES}")
    g.add_argument("--apex-variant", default=None, help="paper | released (docs/apex_method.md)")
    g.add_argument("--apex-start-iter", type=int, default=0,
                   help="plain flow matching before this iteration, APEX after it (fine-tuning from FM)")
    g.add_argument("--apex-schedule", choices=APEX_SCHEDULES, default="auto",
                   help="direct: the objective in one forward step; two-phase: no-grad pipeline passes then one "
                        "batched training pass (what pipeline parallelism runs); auto: two-phase when PP > 1")
    g.add_argument("--teacher", choices=("frozen", "online"), default="frozen",
                   help="real velocity of the released variant's distribution-matching query")
    g.add_argument("--apex-option", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other APEXConfig field, e.g. --apex-option dm_clamp=1.0 (repeatable)")
    g.add_argument("--apex-preset", choices=tuple(APEX_PRESETS), default=None,
                   help="a bundle of APEXConfig values (release: the authors' released training code, "
                        "docs/apex_method.md); --apex-variant and --apex-option values given on the command "
                        "line take precedence")
    for flag, kind in (("--lam", float), ("--lambda-p", float), ("--lambda-e", float)):
        g.add_argument(flag, type=kind)
    g.add_argument("--weighting", help="w(t) of L_mix: paper | endpoint | velocity")
    g.add_argument("--fake-grad", help="detach | through")
    g.add_argument("--time-sampler", help="uniform | logit_normal")
    g.add_argument("--time-option", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other TimeSamplerConfig field (repeatable)")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None, help="directory of webdataset shards; default: built-in dataset")
    g.add_argument("--caption-dropout", type=float, default=DataArgs.caption_dropout, metavar="P",
                   help="replace each training caption by the empty prompt with probability P (for classifier-free "
                        "guidance: tools/sample.py --guidance-scale, --apex-option cfg_scale)")

    g = p.add_argument_group("checkpointing and logging")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--keep-last", type=int, default=None,
                   help="keep only the newest N complete checkpoints under --save (default: all)")
    g.add_argument("--finetune", action="store_true",
                   help="load only the model weights of --load; iteration, optimizer and data restart")
    g.add_argument("--pretrained-checkpoint", default=None,
                   help="model weights to start from (a LoRA run's frozen base; a LoRA run resumed with --load "
                        "reads it from its checkpoint when not given)")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None, help="default: <save>/tensorboard")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = p.add_argument_group("LoRA (docs/lora.md)")
    g.add_argument("--lora-rank", type=int, default=0, help="rank of the adapters; 0 = full-parameter training")
    g.add_argument("--lora-alpha", type=float, default=None, help="adapter scale alpha / rank (None: alpha = rank)")
    g.add_argument("--lora-targets", default=LoRAArgs.targets,
                   help="comma-separated presets (attn, mlp, modulation, attn+mlp, all) or fnmatch patterns on "
                        "module names")
    g.add_argument("--lora-dropout", type=float, default=LoRAArgs.dropout, help="dropout on the adapters' input")
    g.add_argument("--lora-init-seed", type=int, default=LoRAArgs.init_seed, help="seed of the adapters' A init")
    g.add_argument("--lora-extra-trainable", default=LoRAArgs.extra_trainable,
                   help="comma-separated fnmatch patterns of further parameters to train (e.g. 'proj_out.*')")
    g.add_argument("--lora-fake-reference", choices=LORA_FAKE_REFERENCES, default=LoRAArgs.fake_reference,
                   help="the objective's no-grad fake-condition queries: adapted = the network being trained (the "
                        "paper), base = the frozen base model (adapters off)")
    return p


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _options(items: List[str], flag: str) -> Dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag} {item!r}: expected FIELD=VALUE")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return out


# APEXConfig / TimeSamplerConfig fields that have a flag of their own, for error messages.
_FLAG_OF_FIELD = {"variant": "--apex-variant", "lam": "--lam", "lambda_p": "--lambda-p", "lambda_e": "--lambda-e",
                  "weighting": "--weighting", "fake_grad": "--fake-grad", "kind": "--time-sampler"}


def _validate_objective(apex: Dict[str, Any], time_sampler: Dict[str, Any], objective: str) -> None:
    """Build the objective's configs once here so a bad value fails at start, naming its flag."""
    for cls, fields, option in ((APEXConfig, apex, "--apex-option"), (TimeSamplerConfig, time_sampler, "--time-option")):
        if cls is APEXConfig and objective != "apex":
            continue
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"{option} {unknown[0]}: unknown field; known: {', '.join(sorted(known))}")
        try:
            cls(**fields)
        except ValueError as err:
            message = str(err)
            for name, flag in _FLAG_OF_FIELD.items():
                if f"{cls.__name__}.{name} " in message and name in fields:
                    raise ValueError(f"{flag} {fields[name]!r}: {message}") from None
            raise ValueError(f"{option}: {message}") from None


# What only the APEX objective reads: refused with --objective fm, where it would do nothing.
_APEX_ONLY_DESTS = ("apex_variant", "apex_preset", "apex_start_iter", "teacher", "apex_option", "lam", "lambda_p",
                    "lambda_e", "weighting", "fake_grad")
# The fixed scalar condition shift c_fake = a c + b holds no weights: only APEX's fake-condition
# queries read it (a learnable --shift-kind initialises weights from it, which flow matching keeps).
_SHIFT_DESTS = ("shift_a", "shift_b", "shift_site")
# APEXConfig fields each variant alone reads (tests/unit/test_flag_validation.py checks that
# these and _SHARED_APEX_FIELDS cover every field, so a new one has to be placed).
PAPER_ONLY_FIELDS = ("lam", "lambda_p", "lambda_e", "weighting", "fake_grad")
RELEASED_ONLY_FIELDS = ("w_base", "w_fake", "w_dm", "dm_clamp", "dm_normalize", "dm_warmup_steps", "fresh_t_min",
                        "fresh_t_max", "cfg_scale", "w_consistency", "consistency_step", "consistency_clamp",
                        "batch_split", "fuse_forwards", "fake_time_flag", "loss", "huber_c", "tan_weight",
                        "any_step", "any_step_order")
_SHARED_APEX_FIELDS = ("variant", "shift_a", "shift_b")


def _flag_of(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def given_dests(argv: Optional[List[str]] = None) -> Set[str]:
    """The destinations of the flags the command line sets, defaults aside. A launcher's own
    flags are on its command line too, so examples/pretrain_apex_dit.sh leaves out what a user's
    --objective or --apex-variant contradicts."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def _where(field: str, apex_option_fields: Set[str]) -> str:
    """How the command line set an APEXConfig field, for messages."""
    return f"--apex-option {field}" if field in apex_option_fields else _flag_of(field)


def check_contradictions(a: argparse.Namespace, given: Set[str], apex: Dict[str, Any],
                         apex_option_fields: Set[str]) -> None:
    """Flags the run's other flags make meaningless, refused in one line naming both; only
    flags on the command line count (``given``), never defaults."""
    if a.objective == "fm":
        for dest in _APEX_ONLY_DESTS:
            if dest in given:
                shown = f"--apex-option {a.apex_option[0]}" if dest == "apex_option" else _flag_of(dest)
                raise ValueError(f"{shown} is an APEX option, but --objective fm trains flow matching alone; drop "
                                 f"{_flag_of(dest)} or use --objective apex")
        if a.shift_kind in (None, "scalar"):
            for dest in _SHIFT_DESTS:
                if dest in given:
                    raise ValueError(f"{_flag_of(dest)} sets the fixed condition shift, which only APEX's fake-"
                                     f"condition queries read, but --objective fm trains flow matching alone; drop "
                                     f"{_flag_of(dest)} or use --objective apex")
        return
    if "shift_a" in apex_option_fields or "shift_b" in apex_option_fields:
        name = "shift_a" if "shift_a" in apex_option_fields else "shift_b"
        raise ValueError(f"--apex-option {name}: the trainer takes the condition shift from the model, set it with "
                         f"{_flag_of(name)}")
    if a.apex_start_iter < 0:
        raise ValueError(f"--apex-start-iter must be >= 0 (0 = APEX from the first iteration), got "
                         f"{a.apex_start_iter}")
    if a.apex_start_iter >= a.train_iters:
        raise ValueError(f"--apex-start-iter {a.apex_start_iter} is at or past --train-iters {a.train_iters}: APEX "
                         "would never run; lower --apex-start-iter, raise --train-iters, or train flow matching "
                         "alone with --objective fm")
    variant = apex.get("variant", APEXConfig.variant)
    chosen = f"--apex-variant {variant}" + ("" if "variant" in apex else " (the default)")
    if a.apex_preset is not None and "apex_variant" not in given and "variant" not in apex_option_fields:
        chosen = f"--apex-preset {a.apex_preset} (--apex-variant {variant})"
    if variant == "released":
        for field in PAPER_ONLY_FIELDS:
            if field in apex:
                raise ValueError(f"{_where(field, apex_option_fields)} acts only in --apex-variant paper, but this "
                                 f"run uses {chosen}")
    elif variant == "paper":
        if "teacher" in given:
            raise ValueError(f"--teacher acts only in --apex-variant released, but this run uses {chosen}")
        for field in RELEASED_ONLY_FIELDS:
            if field in apex:
                raise ValueError(f"--apex-option {field} acts only in --apex-variant released, but this run uses "
                                 f"{chosen}")


def apex_preset(a: argparse.Namespace, apex: Dict[str, Any]) -> None:
    """Fill ``apex`` with the --apex-preset's values the command line did not set itself."""
    preset = preset_fields(a.apex_preset)
    variant = apex.get("variant", preset["variant"])
    if variant != preset["variant"]:
        raise ValueError(f"--apex-variant {variant} contradicts --apex-preset {a.apex_preset} (variant "
                         f"{preset['variant']}); drop one")
    two_phase = a.pipeline_model_parallel_size > 1 or a.apex_schedule == "two-phase"
    if two_phase and "cfg_scale" not in apex and preset.get("cfg_scale", 0) != 0:
        where = (f"--pipeline-model-parallel-size {a.pipeline_model_parallel_size}"
                 if a.pipeline_model_parallel_size > 1 else "--apex-schedule two-phase")
        raise ValueError(f"--apex-preset {a.apex_preset} sets cfg_scale={preset['cfg_scale']} (a CFG-enhanced "
                         f"target), which cannot run with {where}; add --apex-option cfg_scale=0")
    for field, value in preset.items():
        apex.setdefault(field, value)


def parse_args(argv: Optional[List[str]] = None) -> RunConfig:
    a = build_parser().parse_args(argv)
    if a.objective not in OBJECTIVES:
        raise ValueError(f"--objective {a.objective!r}: unknown objective; choose one of {OBJECTIVES}")

    model_overrides = {}
    for flag, key in (("num_layers", "num_layers"), ("num_attention_heads", "num_attention_heads"),
                      ("kv_channels", "attention_head_dim"), ("patch_size", "patch_size"),
                      ("shift_site", "shift_site"), ("shift_kind", "shift_kind"),
                      ("shift_a", "shift_a"), ("shift_b", "shift_b")):
        value = getattr(a, flag)
        if value is not None:
            model_overrides[key] = value
    if a.target_time_embedder is not None:
        model_overrides["target_time_embedder"] = a.target_time_embedder != "none"
        if a.target_time_embedder != "none":
            model_overrides["target_time_init"] = a.target_time_embedder
    gpu = gpu_options_from_args(a)
    model_overrides.update(gpu_model_overrides(gpu))

    apex = _options(a.apex_option, "--apex-option")
    apex_option_fields = set(apex)
    for flag, key in (("apex_variant", "variant"), ("lam", "lam"), ("lambda_p", "lambda_p"),
                      ("lambda_e", "lambda_e"), ("weighting", "weighting"), ("fake_grad", "fake_grad")):
        value = getattr(a, flag)
        if value is not None:
            apex[key] = value
            apex_option_fields.discard(key)  # its own flag wins
    if a.apex_preset is not None and a.objective == "apex":
        apex_preset(a, apex)
    time_sampler = _options(a.time_option, "--time-option")
    if a.time_sampler is not None:
        time_sampler["kind"] = a.time_sampler

    for flag in ("micro_batch_size", "train_iters", "log_interval", "tensor_model_parallel_size",
                 "pipeline_model_parallel_size"):
        if getattr(a, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    for flag in ("save_interval", "exit_interval", "lr_decay_iters", "keep_last"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    _validate_optimizer_flags(a)
    if a.exit_duration_in_mins is not None and not a.exit_duration_in_mins > 0:
        raise ValueError(f"--exit-duration-in-mins must be > 0, got {a.exit_duration_in_mins}")
    if a.max_skipped_iters < 0:
        raise ValueError(f"--max-skipped-iters must be >= 0 (0 = never stop), got {a.max_skipped_iters}")
    if a.sequence_parallel and a.tensor_model_parallel_size < 2:
        raise ValueError(f"--sequence-parallel needs --tensor-model-parallel-size > 1 (it splits the sequence over "
                         f"the tensor-parallel ranks), got --tensor-model-parallel-size {a.tensor_model_parallel_size}")
    if a.keep_last is not None and not a.save:
        raise ValueError("--keep-last needs --save (the directory whose checkpoints it prunes)")
    if not 0.0 <= a.caption_dropout < 1.0:
        raise ValueError(f"--caption-dropout must be in [0, 1), got {a.caption_dropout}")
    if not 0.0 <= a.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1), got {a.ema_decay}")

    check_contradictions(a, given_dests(argv), apex, apex_option_fields)
    _validate_objective(apex, time_sampler, a.objective)
    if a.finetune and not a.load:
        raise ValueError("--finetune needs --load (the checkpoint to fine-tune from)")
    lora = _lora_args(a)
    if a.pretrained_checkpoint is not None and a.finetune and not lora.enabled:
        raise ValueError("--pretrained-checkpoint and --load --finetune both name the starting weights; give one")

    return RunConfig(
        model=a.model,
        model_overrides=model_overrides,
        parallel=ParallelArgs(a.tensor_model_parallel_size, a.pipeline_model_parallel_size,
                              a.use_distributed_optimizer, a.recompute_granularity, fsdp=a.fsdp,
                              sequence_parallel=a.sequence_parallel),
        optim=OptimArgs(a.lr, a.min_lr, a.lr_warmup_iters, a.lr_decay_style, a.weight_decay,
                        a.adam_beta1, a.adam_beta2, a.adam_eps, a.clip_grad, a.bf16, a.lr_decay_iters),
        train=TrainArgs(a.micro_batch_size, a.global_batch_size, a.train_iters, a.seed, a.ema_decay,
                        a.exit_interval, a.exit_duration_in_mins, a.max_skipped_iters),
        objective=ObjectiveArgs(a.objective, a.apex_start_iter, a.teacher, apex, time_sampler, a.apex_schedule),
        data=DataArgs(a.data_path, a.caption_dropout),
        checkpoint=CheckpointArgs(a.save, a.load, a.save_interval, a.finetune, a.pretrained_checkpoint,
                                  a.keep_last),
        logging=LoggingArgs(a.log_interval, a.tensorboard_dir, not a.no_progress),
        lora=lora,
        gpu=gpu,
    )


def _validate_optimizer_flags(a) -> None:
    """torch.optim and megatron's LR scheduler refuse some of these without naming the flag
    (or, for a negative --clip-grad, silently flip the gradients)."""
    for flag, value, ok, need in (
            ("--lr", a.lr, a.lr >= 0, ">= 0"),
            ("--min-lr", a.min_lr, 0 <= a.min_lr <= a.lr, f">= 0 and <= --lr ({a.lr})"),
            ("--lr-warmup-iters", a.lr_warmup_iters, a.lr_warmup_iters >= 0, ">= 0"),
            ("--weight-decay", a.weight_decay, a.weight_decay >= 0, ">= 0"),
            ("--adam-beta1", a.adam_beta1, 0 <= a.adam_beta1 < 1, "in [0, 1)"),
            ("--adam-beta2", a.adam_beta2, 0 <= a.adam_beta2 < 1, "in [0, 1)"),
            ("--adam-eps", a.adam_eps, a.adam_eps > 0, "> 0"),
            ("--clip-grad", a.clip_grad, a.clip_grad >= 0, ">= 0 (0 = no clipping)")):
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"{flag} must be {need}, got {value}")


def _lora_args(a) -> LoRAArgs:
    """--lora-* flags -> LoRAArgs, validated (one line naming the flag)."""
    defaults = LoRAArgs()
    values = dict(alpha=a.lora_alpha, targets=a.lora_targets, dropout=a.lora_dropout, init_seed=a.lora_init_seed,
                  extra_trainable=a.lora_extra_trainable, fake_reference=a.lora_fake_reference)
    if a.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0 (0 = no LoRA), got {a.lora_rank}")
    if a.lora_rank == 0:
        changed = [k for k, v in values.items() if v != getattr(defaults, k)]
        if changed:
            raise ValueError(f"--lora-{changed[0].replace('_', '-')} needs --lora-rank > 0 (LoRA is off)")
        return defaults
    args = LoRAArgs(rank=a.lora_rank, **values)
    args.lora_config()  # LoRAConfig.validate names the flag
    if args.fake_reference == "base" and a.objective != "apex":
        raise ValueError(f"--lora-fake-reference base needs --objective apex (--objective {a.objective} has no "
                         "fake-condition queries)")
    return args
