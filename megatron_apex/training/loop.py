"""The training loop: megatron-core's forward/backward schedule, DDP, optimizer and scheduler
driving the APEX (or flow-matching) objective.

Randomness that decides the numbers (noise, times, the objective's fresh samples) is drawn from
counter-based generators keyed by (seed, iteration, purpose, micro-batch) (random_streams.py):
the global batch's draws once for the whole global batch, then sliced per data-parallel rank
and micro-batch, the objective's per micro-batch of the global batch. A resumed run therefore
needs no RNG state, and the numbers do not depend on how the global batch is split.

Two ways to run the APEX objective per global batch: "direct" (apex_loss inside megatron's
forward step, the single-stage path) and "two-phase" (no-grad pipeline passes, then one
batched training pass: pipeline_apex.py), which pipeline parallelism needs and which gives the
same numbers up to floating-point batching.

LoRA (``--lora-rank``, docs/lora.md): the model is built, its base weights loaded
(``--pretrained-checkpoint``, or a full checkpoint given as ``--load ... --finetune``, or the
base recorded in the LoRA checkpoint being resumed), then adapted (megatron_apex.lora.apply_lora)
BEFORE DDP and the optimizer exist, so both only see the trainable parameters. The EMA and the
frozen teacher are copies that share the base's tensors with the model and own only the
trainable ones. Checkpoints hold only the trainable parameters (model, optimizer state, EMA,
teacher) plus, in train_state.json, the base's path and fingerprint; a resumed run must find
the same base.
"""

import dataclasses
import json
import os
import subprocess
import time
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_apex import checkpoint
from megatron_apex.training import optimizer_state
from megatron_apex.training.arguments import RunConfig
from megatron_apex.training.ema import frozen_copy, update_ema
from megatron_apex.training.metrics_log import MetricsLogger
from megatron_apex.training.random_streams import RandomPurpose, stream_generator


def code_version() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_parallel_config(cfg: RunConfig, model_config, apex_config) -> bool:
    """Refuse, before any process group exists, what cannot run with the requested
    parallelism (one line naming the flags); returns whether the two-phase step is used."""
    par = cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    model_config.validate(tp)  # --num-attention-heads divisible by --tensor-model-parallel-size
    if par.sequence_parallel:
        from megatron_apex.models.common.sequence_parallel import check_sequence_parallel

        check_sequence_parallel(model_config, tp, lora=cfg.lora.enabled)
    if model_config.num_layers % pp:
        raise ValueError(f"--num-layers ({model_config.num_layers}) must be divisible by "
                         f"--pipeline-model-parallel-size ({pp})")
    schedule = cfg.objective.schedule
    if schedule == "direct" and pp > 1:
        raise ValueError(f"--apex-schedule direct cannot run with --pipeline-model-parallel-size {pp}: "
                         "pipeline stages need the two-phase step (use two-phase or auto)")
    two_phase = schedule == "two-phase" or pp > 1
    if two_phase and apex_config is not None:
        where = f"--pipeline-model-parallel-size {pp}" if pp > 1 else "--apex-schedule two-phase"
        if apex_config.variant == "paper" and apex_config.fake_grad == "through":
            raise ValueError(f"--fake-grad through cannot run with {where}: gradients through x_fake would cross "
                             "the no-grad pipeline pass that computes x_fake; use --fake-grad detach")
        if apex_config.variant == "released":
            for name in ("cfg_scale", "w_consistency"):
                if getattr(apex_config, name) != 0:
                    raise ValueError(f"--apex-option {name}={getattr(apex_config, name)} cannot run with {where} "
                                     "(not decomposed into no-grad rounds); leave it at 0")
    return two_phase


WEIGHTLESS_SHIFT_KEYS = ("shift_a", "shift_b", "shift_site")


def _fixed_scalar_shift(model_config: Dict) -> bool:
    """A fixed scalar c_fake = a c + b lives in non-persistent buffers: no checkpointed weights."""
    return model_config.get("shift_kind", "scalar") == "scalar" and not model_config.get("shift_learnable")


def _sharded(module, prefix: str) -> Dict:
    return checkpoint.mark_tp_replicas(module.sharded_state_dict(prefix=prefix))


def check_lora_config(cfg: RunConfig, two_phase: bool, apex_config) -> None:
    """What LoRA cannot run with, refused at start (one line naming the flags)."""
    if not cfg.lora.enabled or cfg.lora.fake_reference != "base":
        return
    if two_phase and apex_config is not None and apex_config.variant == "released" \
            and cfg.objective.teacher == "frozen":
        raise ValueError("--lora-fake-reference base cannot run with --teacher frozen in the two-phase step "
                         "(pipeline parallelism or --apex-schedule two-phase): the pass has one slot besides the "
                         "model, for the base or the teacher; use --teacher online or the direct schedule")


# The LoRA settings a checkpoint's adapters depend on, with their flags (compared on resume;
# dropout and the init seed may change).
_LORA_STRUCTURE = {"rank": "--lora-rank", "scale": "--lora-alpha (scale alpha / rank)", "targets": "--lora-targets",
                   "extra_trainable": "--lora-extra-trainable", "train_condition_shift": "train_condition_shift",
                   "train_target_time_embedder": "train_target_time_embedder"}


def _lora_structure(config: Dict) -> Dict:
    from megatron_apex.lora import LoRAConfig

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


def check_data_fits_model(data_path: Optional[str], model_config, model_name: str) -> bool:
    """--data-path against --model before anything is built: its manifest is read (format and
    structure) and its text width, and the image channels and sides when it records them, are
    compared with the model's, in one line naming both flags. Returns whether it holds pre-encoded
    latents (tools/prepare_data.py). The built-in dataset (None) is made for the CPU models."""
    from megatron_apex.data.latent_loader import check_model_fits_data, is_latent_dataset, read_latent_manifest
    from megatron_apex.data.shards import read_manifest

    if data_path is None:
        return False
    if is_latent_dataset(data_path):
        check_model_fits_data(read_latent_manifest(data_path), model_config, data_path, model_name)
        return True
    manifest = read_manifest(data_path)
    problems = []
    if manifest["context_dim"] != model_config.context_dim:
        problems.append(f"text states width {manifest['context_dim']} vs the model's {model_config.context_dim}")
    shape = manifest.get("image_shape")
    if isinstance(shape, list) and len(shape) == 3:
        channels, height, width = shape
        if channels != model_config.latent_channels:
            problems.append(f"image channels {channels} vs the model's {model_config.latent_channels}")
        p = model_config.patch_size
        if height % p or width % p:
            problems.append(f"images of {height}x{width} not multiples of the patch size {p}")
    if problems:
        raise ValueError(f"--data-path {data_path} does not fit --model {model_name}: {'; '.join(problems)}")
    return False


@dataclasses.dataclass
class StartingCheckpoints:
    """What --load and --pretrained-checkpoint name, resolved to complete checkpoints and checked
    against the run's flags before any dataset, model, optimizer, EMA or teacher is built."""

    load: Optional[str] = None  # the checkpoint directory --load resolves to
    load_state: Optional[Dict] = None  # its train_state.json
    pretrained: Optional[str] = None  # the checkpoint directory --pretrained-checkpoint resolves to
    pretrained_state: Optional[Dict] = None
    lora_base: Optional[str] = None  # a LoRA run's base weights; None = random initialisation


class Trainer:
    def __init__(self, cfg: RunConfig):
        from megatron.core import parallel_state as ps

        from megatron_apex.data.latent_loader import LatentShardDataset
        from megatron_apex.data.sampler import GlobalBatchSampler
        from megatron_apex.data.shards import load_dataset
        from megatron_apex.models.registry import get_model_config
        from megatron_apex.objectives.apex import APEXConfig
        from megatron_apex.objectives.flow import TimeSamplerConfig
        from megatron_apex.parallel import init_distributed, set_seed
        from megatron_apex.parallel.fsdp import check_fsdp_config
        from megatron_apex.parallel.recompute import enable_activation_recompute
        from megatron_apex.training.pipeline_apex import build_stage_model

        self.start_time = time.time()  # --exit-duration-in-mins counts from here
        self.cfg = cfg
        self.info = None  # the process group's, from init_distributed below
        # Everything that can be checked without building anything is, first: a bad flag, data set
        # or checkpoint fails in seconds, not after the model, optimizer and dataset are built.
        self.model_config = get_model_config(cfg.model, **cfg.model_overrides)
        latent_data = check_data_fits_model(cfg.data.data_path, self.model_config, cfg.model)
        obj = cfg.objective
        self.apex_config = APEXConfig(**obj.apex) if obj.objective == "apex" else None
        self.two_phase = check_parallel_config(cfg, self.model_config, self.apex_config)
        check_lora_config(cfg, self.two_phase, self.apex_config)
        check_fsdp_config(cfg)
        self.lora_config = cfg.lora.lora_config() if cfg.lora.enabled else None
        self.starting = self._check_starting_checkpoints()
        self.info = init_distributed(cfg.parallel.tensor_model_parallel_size,
                                     cfg.parallel.pipeline_model_parallel_size)
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        tr = cfg.train
        self.global_batch_size = tr.global_batch_size or tr.micro_batch_size * self.dp_size
        if self.global_batch_size % (tr.micro_batch_size * self.dp_size) != 0:
            raise ValueError(
                f"--global-batch-size ({self.global_batch_size}) must be divisible by --micro-batch-size "
                f"({tr.micro_batch_size}) x data-parallel size ({self.dp_size})")
        self.num_microbatches = self.global_batch_size // (tr.micro_batch_size * self.dp_size)
        self.time_config = TimeSamplerConfig(**obj.time_sampler)
        if obj.teacher not in ("frozen", "online"):
            raise ValueError(f"--teacher {obj.teacher!r}: choose frozen or online")

        set_seed(tr.seed)
        from megatron_apex import gpu

        spec = gpu.layer_spec(self.model_config, cfg.gpu)
        self._build_model = lambda: build_stage_model(self.model_config, spec, cfg.parallel.sequence_parallel)
        self.model = self._build_model()
        if self.lora_config is not None:
            self._setup_lora()
        if cfg.parallel.recompute_granularity:
            enable_activation_recompute(self.model, cfg.parallel.recompute_granularity)
        self.ddp_model, self.optimizer, self.scheduler = self._build_optimizer(self.model)
        if self.info.rank == 0:
            print(f"[megatron_apex] GPU paths: {gpu.describe(cfg.gpu, self.optimizer)}", flush=True)
        if self.lora_config is not None:
            self._print_lora_summary()
        self.ema = self._frozen_copy() if tr.ema_decay > 0 else None
        self.teacher = None

        if latent_data:
            self.dataset = LatentShardDataset(cfg.data.data_path, log=self._print0)
        else:
            self.dataset = load_dataset(cfg.data.data_path, split="train")
        self.empty_prompt = self._empty_prompt()
        self.iteration = 0
        self.consumed_samples = 0
        self.skipped_iters = 0
        self._maybe_load()
        if isinstance(self.dataset, LatentShardDataset):  # bucket-homogeneous global batches
            self.sampler = iter(self.dataset.batch_sampler(self.global_batch_size, tr.seed, self.consumed_samples))
        else:
            self.sampler = iter(GlobalBatchSampler(len(self.dataset), self.global_batch_size, tr.seed,
                                                   consumed_samples=self.consumed_samples))
        is_logger = (self.dp_rank == 0 and ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0)
        self.is_logger = is_logger
        self.logger = MetricsLogger(cfg.checkpoint.save, cfg.logging.tensorboard_dir, enabled=is_logger)
        self.logger.truncate_after(self.iteration)

    # ---- construction -------------------------------------------------------------------
    def _build_optimizer(self, model):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from megatron_apex import gpu

        o, tr = self.cfg.optim, self.cfg.train
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=self.cfg.parallel.use_distributed_optimizer)
        if self.cfg.parallel.fsdp:  # weights, grads and optimizer state sharded over DP (parallel/fsdp.py)
            from megatron_apex.parallel.fsdp import FullyShardedModel, shard_model

            ddp_model = FullyShardedModel(shard_model(model), ddp_config)
        else:
            ddp_model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
        opt_config = OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad, bf16=o.bf16,
            params_dtype=model.config.params_dtype,
            use_distributed_optimizer=self.cfg.parallel.use_distributed_optimizer)
        optimizer = get_megatron_optimizer(opt_config, [ddp_model])
        gpu.use_fused_torch_adam(optimizer)  # megatron's torch AdamW fallback, on CUDA
        g = self.global_batch_size
        # Megatron's scheduler counts samples, not iterations.
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0 if o.lr_warmup_iters else o.lr, max_lr=o.lr, min_lr=o.min_lr,
            lr_warmup_steps=o.lr_warmup_iters * g, lr_decay_steps=max((o.lr_decay_iters or tr.train_iters) * g, 1),
            lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
            wd_incr_steps=max(tr.train_iters * g, 1), wd_incr_style="constant")
        cfg = model.config
        cfg.grad_scale_func = optimizer.scale_loss
        cfg.no_sync_func = ddp_model.no_sync
        cfg.finalize_model_grads_func = finalize_model_grads
        return ddp_model, optimizer, scheduler

    # ---- LoRA ---------------------------------------------------------------------------
    def _setup_lora(self) -> None:
        """Base weights, then adapters (before DDP / optimizer), then the base's fingerprint."""
        from megatron_apex.lora import apply_lora, base_fingerprint, filter_trainable

        base = self.starting.lora_base  # checked in _check_starting_checkpoints
        if base is not None:
            loaded = checkpoint.load_checkpoint(base, {"model": _sharded(self.model, "model.")})
            self.model.load_state_dict(checkpoint.module_state_dict(loaded["model"], "model.", self.model))
        self.lora_base = os.path.abspath(base) if base is not None else None
        apply_lora(self.model, self.lora_config)
        self.base_fingerprint = base_fingerprint(self.model)  # collective over TP/PP
        self._trainable_names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        trainable = filter_trainable(_sharded(self.model, "model."), self.model)
        self._trainable_keys = {v.key[len("model."):] for v in trainable.values()}
        if self.info.rank == 0:
            where = self.lora_base or f"random initialisation (--seed {self.cfg.train.seed})"
            print(f"[megatron_apex] LoRA rank {self.lora_config.rank} on {self.lora_config.targets} over the frozen "
                  f"base {where}", flush=True)

    def _lora_base_checkpoint(self, found: StartingCheckpoints):
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

    def _print_lora_summary(self) -> None:
        from megatron_apex.lora import format_parameter_summary, parameter_summary

        summary = parameter_summary(self.model, dp_size=self.dp_size,
                                    distributed_optimizer=self.cfg.parallel.use_distributed_optimizer)
        if self.info.rank == 0:
            print(f"[megatron_apex] {format_parameter_summary(summary)}", flush=True)

    def _frozen_copy(self) -> torch.nn.Module:
        """A frozen copy of the model (EMA, teacher). Under LoRA it owns only the trainable
        parameters and shares the base's tensors with the model."""
        if self.lora_config is None:
            if self.cfg.parallel.fsdp:  # sharded like the model: shard-local EMA update, no whole copy
                from megatron_apex.parallel.fsdp import shard_model

                return frozen_copy(self.model, lambda: shard_model(self._build_model(), frozen=True))
            return frozen_copy(self.model, self._build_model)
        from megatron_apex.lora import apply_lora

        clone = self._build_model()
        apply_lora(clone, self.lora_config)
        share_frozen_(clone, self.model)
        clone.requires_grad_(False)
        clone.eval()
        self._copy_trainable(clone)
        return clone

    @torch.no_grad()
    def _copy_trainable(self, clone: torch.nn.Module) -> None:
        params = dict(clone.named_parameters())
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                params[name].copy_(p.detach())

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.lora_config is None:
            update_ema(self.ema, self.model, self.cfg.train.ema_decay)
            return
        params = dict(self.ema.named_parameters())
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                params[name].lerp_(p.detach().to(params[name].dtype), 1.0 - self.cfg.train.ema_decay)

    def _lora_train_state(self) -> Dict:
        return {"config": self.lora_config.to_dict(), "base": self.lora_base, "seed": self.cfg.train.seed,
                "base_fingerprint": self.base_fingerprint}

    def _check_lora_structure(self, ckpt: str, saved: Dict) -> None:
        """The adapters of ``ckpt`` fit this run's."""
        theirs, ours = _lora_structure(saved["config"]), _lora_structure(self.lora_config.to_dict())
        diff = [k for k in _LORA_STRUCTURE if theirs[k] != ours[k]]
        if diff:
            shown = ", ".join(f"{_LORA_STRUCTURE[k] or k}: checkpoint {theirs[k]!r} vs run {ours[k]!r}" for k in diff)
            raise ValueError(f"--load {ckpt}: LoRA settings differ from this run's flags ({shown})")

    def _check_lora_base_fingerprint(self, ckpt: str, saved: Dict) -> None:
        """The adapters of ``ckpt`` were trained on this run's base (needs the base loaded)."""
        from megatron_apex.lora import check_base_fingerprint

        try:
            check_base_fingerprint(saved["base_fingerprint"], self.base_fingerprint, source=f"--load {ckpt}")
        except ValueError as err:
            theirs_base = saved.get("base") or f"random initialisation with --seed {saved.get('seed')}"
            ours_base = self.lora_base or f"random initialisation with --seed {self.cfg.train.seed}"
            raise ValueError(f"{err}; its base: {theirs_base}, this run's: {ours_base} (give the right one with "
                             "--pretrained-checkpoint)") from None

    def _sharded_module(self, module, prefix: str) -> Dict:
        """``module``'s sharded state dict; under LoRA only its trainable part."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        if self.cfg.parallel.fsdp:
            from megatron_apex.parallel import fsdp

            return fsdp.sharded_state_dict(module, prefix)
        sharded = _sharded(module, prefix)
        if self.lora_config is None:
            return sharded
        return {k: v for k, v in sharded.items()
                if isinstance(v, ShardedTensor) and v.key[len(prefix):] in self._trainable_keys}

    def _load_module(self, module, loaded: Dict, prefix: str) -> None:
        state = checkpoint.module_state_dict(loaded, prefix, module)
        if self.cfg.parallel.fsdp:
            from megatron_apex.parallel.fsdp import load_local_state

            load_local_state(module, state)
            return
        if self.lora_config is None:
            module.load_state_dict(state)
            return
        result = module.load_state_dict(state, strict=False)
        missing = sorted(k for k in result.missing_keys if k in self._trainable_names)
        if missing or result.unexpected_keys:
            raise ValueError(f"LoRA checkpoint entries do not fit the model: missing {missing}, unexpected "
                             f"{sorted(result.unexpected_keys)}")

    def _check_model_config(self, ckpt: str, state: Dict, flag: str, weights_only: bool = False) -> None:
        saved_cfg = state.get("model_config", {})
        ours = json.loads(json.dumps(dataclasses.asdict(self.model_config)))  # tuples as saved: lists
        diff = sorted(k for k in set(saved_cfg) | set(ours) if saved_cfg.get(k) != ours.get(k))
        if weights_only and _fixed_scalar_shift(saved_cfg) and _fixed_scalar_shift(ours):
            # a fixed scalar shift holds no weights, so a fine-tune may pick another one
            relabelled = [k for k in diff if k in WEIGHTLESS_SHIFT_KEYS]
            if relabelled:
                self._print0(f"{flag} {ckpt}: fine-tuning with " + ", ".join(
                    f"{k} {ours.get(k)!r} (checkpoint {saved_cfg.get(k)!r})" for k in relabelled))
            diff = [k for k in diff if k not in WEIGHTLESS_SHIFT_KEYS]
        if weights_only:
            # the weights are cast to the run's dtype on load: a float32 import starts a --bf16 run
            diff = [k for k in diff if k != "params_dtype"]
        if diff:
            shown = ", ".join(f"{k}: checkpoint {saved_cfg.get(k)!r} vs run {ours.get(k)!r}" for k in diff)
            raise ValueError(f"{flag} {ckpt}: model config differs from this run's flags ({shown})")

    def _apex_active(self, iteration: int) -> bool:
        return self.apex_config is not None and iteration >= self.cfg.objective.apex_start_iter

    def _needs_teacher(self, iteration: int) -> bool:
        return (self._apex_active(iteration) and self.cfg.objective.teacher == "frozen"
                and self.apex_config.variant == "released")

    # ---- checkpoints --------------------------------------------------------------------
    def _sharded_state_dict(self, is_loading: bool, with_teacher: bool) -> Dict:
        model_sd = self._sharded_module(self.model, "model.")
        state = {"model": model_sd,
                 "optimizer": optimizer_state.optimizer_sharded_state_dict(self.optimizer, model_sd, is_loading)}
        if self.ema is not None:
            state["ema"] = self._sharded_module(self.ema, "ema.")
        if with_teacher:
            state["teacher"] = self._sharded_module(self.teacher, "teacher.")
        return state

    def _train_state(self) -> Dict:
        return {
            "iteration": self.iteration,
            "consumed_samples": self.consumed_samples,
            "skipped_iters": self.skipped_iters,
            "scheduler": self.scheduler.state_dict(),
            "args": self.cfg.to_dict(),
            "model_name": self.cfg.model,
            "model_config": dataclasses.asdict(self.model_config),
            "has_teacher": self.teacher is not None,
            "has_ema": self.ema is not None,
            "code_version": code_version(),
            **({"lora": self._lora_train_state()} if self.lora_config is not None else {}),
        }

    def save(self) -> None:
        ck = self.cfg.checkpoint
        if not ck.save:
            return
        checkpoint.save_checkpoint(ck.save, self.iteration,
                                   self._sharded_state_dict(False, self.teacher is not None),
                                   self._train_state(), keep_last=ck.keep_last)

    def _check_starting_checkpoints(self) -> StartingCheckpoints:
        """Resolve --load and --pretrained-checkpoint and check them against the flags (model
        config, LoRA or full, EMA, optimizer state): everything but the LoRA base's fingerprint,
        which needs the base's weights."""
        ck = self.cfg.checkpoint
        found = StartingCheckpoints()
        if ck.pretrained_checkpoint:
            found.pretrained = checkpoint.resolve_checkpoint(ck.pretrained_checkpoint, "--pretrained-checkpoint",
                                                             log=self._print0)
            found.pretrained_state = checkpoint.read_train_state(found.pretrained)
        if ck.load and not self._first_start(ck):
            found.load = checkpoint.resolve_checkpoint(ck.load, "--load", log=self._print0)
            found.load_state = checkpoint.read_train_state(found.load, required=("model_config",))
        if self.lora_config is not None:
            self._check_lora_base(found)
        elif found.pretrained is not None:
            state = found.pretrained_state
            if state.get("lora") is not None:
                raise ValueError(f"--pretrained-checkpoint {found.pretrained}: a LoRA checkpoint (adapters only); "
                                 f"give --lora-rank {state['lora']['config']['rank']} and the LoRA flags to train it "
                                 "further, or export a merged model with tools/export_lora.py --merged")
            self._check_model_config(found.pretrained, state, "--pretrained-checkpoint", weights_only=True)
        if found.load is not None:
            self._check_load(found.load, found.load_state)
        self._check_save_keeps_its_checkpoints(found)
        return found

    def _first_start(self, ck) -> bool:
        """--load names this run's own --save and it holds no checkpoint yet: the first start of
        a run that a re-run of the same command resumes (the recipes, the CPU job). It starts
        as it would without --load (from --pretrained-checkpoint, else from --seed). A directory
        with a `latest` marker or an iter_* entry holds a checkpoint, or a damaged one, which
        --load resolves or refuses as always; so does a --load other than --save."""
        if not ck.save or os.path.abspath(ck.load) != os.path.abspath(ck.save):
            return False
        if os.path.isdir(ck.load):
            if any(name == checkpoint.LATEST or name.startswith("iter_") for name in os.listdir(ck.load)):
                return False
        elif os.path.exists(ck.load):
            return False
        start = f"the weights of --pretrained-checkpoint {ck.pretrained_checkpoint}" if ck.pretrained_checkpoint \
            else f"--seed {self.cfg.train.seed}"
        self._print0(f"[megatron_apex] --load {ck.load} holds no checkpoint yet: first start, from {start}")
        return True

    def _check_save_keeps_its_checkpoints(self, found: StartingCheckpoints) -> None:
        """A run never writes over a complete checkpoint: --save may hold none past the
        iteration the run starts at (a fresh start over an earlier run's directory, or a
        resume from an older checkpoint than its newest, would replace them one by one)."""
        ck = self.cfg.checkpoint
        if not ck.save:
            return
        start = found.load_state["iteration"] if found.load is not None and not ck.finetune else 0
        later = [i for i in checkpoint.complete_checkpoints(ck.save) if i > start]
        if later:
            names = ", ".join(os.path.basename(checkpoint.checkpoint_dir(ck.save, i)) for i in later)
            raise ValueError(f"--save {ck.save} holds complete checkpoints past iteration {start}, where this run "
                             f"starts ({names}), which it would overwrite: resume the newest with --load {ck.save}, "
                             "or give another --save")

    def _check_lora_base(self, found: StartingCheckpoints) -> None:
        base, flag = self._lora_base_checkpoint(found)
        found.lora_base = base
        if base is None:
            return
        state = (found.pretrained_state if base == found.pretrained else found.load_state if base == found.load
                 else checkpoint.read_train_state(base))
        if state.get("lora") is not None:
            raise ValueError(f"{flag} {base}: a LoRA checkpoint (adapters only), not base weights; give the full "
                             f"checkpoint it was trained on ({state['lora'].get('base')})")
        self._check_model_config(base, state, flag, weights_only=True)

    def _check_load(self, ckpt: str, state: Dict) -> None:
        ck = self.cfg.checkpoint
        self._check_model_config(ckpt, state, "--load", weights_only=ck.finetune)
        saved_lora = state.get("lora")
        if self.lora_config is not None:
            if saved_lora is None:
                return  # a full checkpoint given with --finetune: this run's base (_check_lora_base)
            self._check_lora_structure(ckpt, saved_lora)
        elif saved_lora is not None:
            rank = saved_lora["config"]["rank"]
            raise ValueError(f"--load {ckpt}: a LoRA checkpoint (rank {rank}, adapters only); resume it with its "
                             f"--lora-* flags (--lora-rank {rank} ...), or export a merged model with "
                             "tools/export_lora.py --merged")
        if ck.finetune:
            return
        if state.get("has_ema") and not self.cfg.train.ema_decay > 0:
            raise ValueError(f"--load {ckpt}: checkpoint holds EMA weights but --ema-decay is 0")
        if "scheduler" not in state:
            raise ValueError(f"--load {ckpt}: holds weights only (no optimizer state); add --finetune")
        checkpoint.read_train_state(ckpt, required=("iteration", "consumed_samples"))

    def _maybe_load(self) -> None:
        """Load what _check_starting_checkpoints found (and checked) into the built run."""
        ck = self.cfg.checkpoint
        ckpt, state = self.starting.load, self.starting.load_state
        if ckpt is None:
            if self.starting.pretrained is not None and self.lora_config is None:  # (a LoRA run loaded its base)
                self._load_weights_only(self.starting.pretrained, self.starting.pretrained_state)
            return
        if self.lora_config is not None:
            if state.get("lora") is None:
                return  # a full checkpoint given with --finetune: this run's base, loaded in _setup_lora
            self._check_lora_base_fingerprint(ckpt, state["lora"])
        if ck.finetune:
            self._load_weights_only(ckpt, state)
            return
        if state.get("has_teacher"):
            self.teacher = self._frozen_copy()
        loaded = checkpoint.load_checkpoint(ckpt, self._sharded_state_dict(True, state.get("has_teacher")))
        self._load_module(self.model, loaded["model"], "model.")
        optimizer_state.load_optimizer_state(self.optimizer, loaded["optimizer"])
        if self.ema is not None:
            if "ema" in loaded:
                self._load_module(self.ema, loaded["ema"], "ema.")
            else:  # EMA switched on at resume: start it from the current weights
                self._sync_from_model(self.ema)
        if self.teacher is not None:
            self._load_module(self.teacher, loaded["teacher"], "teacher.")
        self._report_changed_flags(ckpt, state.get("args", {}))
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration = state["iteration"]
        self.consumed_samples = state["consumed_samples"]
        self.skipped_iters = state.get("skipped_iters", 0)
        if self.info.rank == 0:
            print(f"[megatron_apex] resumed from {ckpt} (iteration {self.iteration})", flush=True)

    def _print0(self, message: str) -> None:
        # before the process group exists (checks at start): the launcher's RANK
        rank = self.info.rank if self.info is not None else int(os.environ.get("RANK", "0"))
        if rank == 0:
            print(message, flush=True)

    # Flags whose change makes a resumed run differ from the run that wrote the checkpoint
    # (architecture, LoRA and EMA mismatches are errors, checked above; these are allowed, as
    # Megatron allows them, but named so that nobody changes them by accident).
    _RUN_DEFINING = {"objective": ("objective", "apex_start_iter", "teacher", "apex", "time_sampler", "schedule"),
                     "train": ("micro_batch_size", "global_batch_size", "seed", "ema_decay"),
                     "optim": ("lr", "min_lr", "lr_warmup_iters", "lr_decay_style", "lr_decay_iters", "weight_decay",
                               "adam_beta1", "adam_beta2", "adam_eps", "clip_grad", "bf16"),
                     "data": ("data_path", "caption_dropout")}

    def _report_changed_flags(self, ckpt: str, saved_args: Dict) -> None:
        ours = json.loads(json.dumps(self.cfg.to_dict()))
        changed = [f"{group}.{key}: checkpoint {saved_args[group][key]!r} -> now {ours[group][key]!r}"
                   for group, keys in self._RUN_DEFINING.items() for key in keys
                   if key in saved_args.get(group, {}) and saved_args[group][key] != ours[group][key]]
        if changed:
            self._print0(f"[megatron_apex] WARNING: resuming {ckpt} with changed flags: {'; '.join(changed)}")

    def _load_weights_only(self, ckpt: str, state: Dict) -> None:
        sharded = {"model": self._sharded_module(self.model, "model.")}
        loaded = checkpoint.load_checkpoint(ckpt, sharded)
        self._load_module(self.model, loaded["model"], "model.")
        # A --bf16 optimizer copied the initial weights into its float32 main weights when it was
        # built, and its first step would copy those back over the loaded ones.
        self.optimizer.reload_model_params()
        if self.ema is not None:
            self._sync_from_model(self.ema)
        if self.info.rank == 0:
            print(f"[megatron_apex] fine-tuning from the weights of {ckpt}", flush=True)

    def _sync_from_model(self, copy: torch.nn.Module) -> None:
        if self.lora_config is None:
            copy.load_state_dict(self.model.state_dict())
        else:
            self._copy_trainable(copy)

    def _empty_prompt(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(context (1, L, D), mask (1, L)) of the empty prompt when caption dropout or the
        CFG-enhanced target needs it, else None."""
        from megatron_apex.data.empty_prompt import empty_prompt_context

        cfg_scale = self.apex_config.cfg_scale if self.apex_config is not None else 0.0
        if self.cfg.data.caption_dropout == 0 and cfg_scale == 0:
            return None
        flag = "--caption-dropout" if self.cfg.data.caption_dropout > 0 else "--apex-option cfg_scale"
        context, mask = empty_prompt_context(self.dataset.manifest, self.cfg.data.data_path, flag)
        return torch.from_numpy(context)[None].to(self.info.device), torch.from_numpy(mask)[None].to(self.info.device)

    # ---- one iteration ------------------------------------------------------------------
    def _micro_batches(self, global_indices: List[int]) -> List[Dict]:
        """This rank's micro-batches of one global batch: data-parallel rank r takes the r-th
        contiguous slice, cut into micro-batches in order."""
        from megatron_apex.objectives.flow import sample_time

        gen = stream_generator(self.cfg.train.seed, self.iteration, RandomPurpose.GLOBAL_BATCH)
        g = len(global_indices)
        # a latent dataset's global batch has one latent shape (its bucket), the built-in one image shape
        shape = (self.dataset.sample_shape(global_indices[0]) if hasattr(self.dataset, "sample_shape")
                 else self.dataset.images.shape[1:])
        noise = torch.randn((g, *shape), generator=gen)
        t = sample_time(g, self.time_config, generator=gen)
        p_drop = self.cfg.data.caption_dropout
        dropped = torch.rand(g, generator=gen) < p_drop if p_drop > 0 else None  # (no draw when off)
        mbs = self.cfg.train.micro_batch_size
        rank_start = self.dp_rank * (g // self.dp_size)
        out = []
        for mb_index in range(self.num_microbatches):
            start = rank_start + mb_index * mbs
            batch = self.dataset.get_batch(global_indices[start:start + mbs])
            batch["noise"] = noise[start:start + mbs]
            batch["t"] = t[start:start + mbs]
            # the host draws every random number (reproducible on any device), the device computes
            batch = {k: v.to(self.info.device, non_blocking=True) if torch.is_tensor(v) else v
                     for k, v in batch.items()}
            if dropped is not None:
                self._drop_captions(batch, dropped[start:start + mbs].to(self.info.device))
            # the objective's own fresh draws: one stream per micro-batch of the global batch, keyed
            # by its index there (so any data-parallel split draws the same numbers)
            batch["generator"] = stream_generator(self.cfg.train.seed, self.iteration, RandomPurpose.OBJECTIVE,
                                                  micro_batch=start // mbs)
            out.append(batch)
        return out

    def _drop_captions(self, batch: Dict, rows: torch.Tensor) -> None:
        context, mask = self.empty_prompt
        if batch["context"].shape[1:] != context.shape[1:]:
            raise ValueError(f"the empty prompt's states are {tuple(context.shape[1:])}, the batch's captions "
                             f"{tuple(batch['context'].shape[1:])}")
        batch["context"] = torch.where(rows[:, None, None], context.to(batch["context"].dtype), batch["context"])
        batch["context_mask"] = torch.where(rows[:, None], mask, batch["context_mask"])

    def _step_teacher(self):
        """The real velocity's model of this iteration's DM query (None = the model itself)."""
        return self.teacher if self.cfg.objective.teacher == "frozen" else None

    def _forward_step(self, data_iterator, model):
        from megatron_apex.gpu import fp8_context
        from megatron_apex.objectives.apex import apex_loss
        from megatron_apex.objectives.fm import fm_loss

        batch = next(data_iterator)
        if self._base_fake_reference(self.iteration):
            from megatron_apex.lora.fake_reference import BaseFakeReference

            model = BaseFakeReference(model)
        args = (model, batch["image"], batch["noise"], batch["t"], batch["context"], batch["context_mask"])
        with fp8_context(self.cfg.gpu, self.model):
            if self._apex_active(self.iteration):
                uncond = self.empty_prompt if self.apex_config.cfg_scale > 0 else (None, None)
                terms = apex_loss(*args, self.apex_config, generator=batch["generator"], teacher=self._step_teacher(),
                                  step=self.iteration - self.cfg.objective.apex_start_iter,
                                  uncond_context=uncond[0], uncond_context_mask=uncond[1])
            else:
                terms = fm_loss(*args)
        return terms["loss"], partial(self._loss_func, terms)

    def _two_phase_objective(self, batch: Dict):
        from megatron_apex.objectives.apex import two_phase_apex
        from megatron_apex.training.pipeline_apex import FlowMatchingObjective

        args = (batch["image"], batch["noise"], batch["t"], batch["context"], batch["context_mask"])
        if self._apex_active(self.iteration):
            objective = two_phase_apex(*args, self.apex_config, generator=batch["generator"],
                                       teacher=self._step_teacher() is not None,
                                       step=self.iteration - self.cfg.objective.apex_start_iter)
            if self._base_fake_reference(self.iteration):
                from megatron_apex.lora.fake_reference import route_fake_queries_to_base

                objective = route_fake_queries_to_base(objective)
            return objective
        return FlowMatchingObjective(*args)

    def _base_fake_reference(self, iteration: int) -> bool:
        return (self.lora_config is not None and self.cfg.lora.fake_reference == "base"
                and self._apex_active(iteration))

    def _two_phase_teacher(self):
        """Who answers the teacher slot of the two-phase passes: the base (adapters off) under
        --lora-fake-reference base, else the step's teacher."""
        if self._base_fake_reference(self.iteration):
            from megatron_apex.lora.fake_reference import BaseModel

            return BaseModel(self.ddp_model)
        return self._step_teacher()

    @staticmethod
    def _loss_func(terms: Dict[str, torch.Tensor], output_tensor: torch.Tensor):
        from megatron_apex.training.pipeline_apex import terms_report

        return output_tensor, terms_report(terms)

    def train_step(self) -> Dict[str, float]:
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_apex import gpu
        from megatron_apex.training.pipeline_apex import two_phase_step

        if self._needs_teacher(self.iteration) and self.teacher is None:
            self.teacher = self._frozen_copy()  # the FM model as it is when APEX starts
        global_indices = next(self.sampler)
        batches = self._micro_batches(global_indices)
        self.ddp_model.zero_grad_buffer()
        self.optimizer.zero_grad()
        gpu.refresh_fp8_weight_cache(self.cfg.gpu, self.model)  # the weights changed at the last step
        if self.two_phase:
            reports = two_phase_step(self.ddp_model, [self._two_phase_objective(b) for b in batches],
                                     teacher=self._two_phase_teacher(),
                                     forward_context=partial(gpu.fp8_context, self.cfg.gpu, self.model))
        else:
            forward_backward = get_forward_backward_func()
            reports = forward_backward(
                forward_step_func=self._forward_step, data_iterator=iter(batches), model=[self.ddp_model],
                num_microbatches=self.num_microbatches, seq_length=0,
                micro_batch_size=self.cfg.train.micro_batch_size, forward_only=False)
        lr = self.optimizer.param_groups[0]["lr"]
        if self._update_is_finite(reports):
            update_successful, grad_norm, _ = self.optimizer.step()
        else:  # Megatron's convention for a skipped update: no optimizer or LR step, data consumed
            update_successful, grad_norm = False, float("nan")
        if update_successful:
            self.scheduler.step(increment=self.global_batch_size)
            if self.ema is not None:
                self._update_ema()
        else:
            self.skipped_iters += 1
        self.iteration += 1
        self.consumed_samples += self.global_batch_size

        metrics: Dict[str, float] = {}
        if ps.is_pipeline_last_stage():
            keys = sorted(reports[0])
            stacked = torch.stack([torch.stack([r[k] for r in reports]).mean() for k in keys])
            if self.dp_size > 1:
                dist.all_reduce(stacked, group=ps.get_data_parallel_group())
                stacked /= self.dp_size
            for k, v in zip(keys, stacked.tolist()):
                metrics[k] = v
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["lr"] = lr
        metrics["update_skipped"] = int(not update_successful)
        metrics["skipped_iters"] = self.skipped_iters
        if hasattr(self.dataset, "skipped"):  # damaged samples the latent loader left out
            metrics["data_skipped"] = self.dataset.skipped
        return metrics

    def _update_is_finite(self, reports: List[Dict]) -> bool:
        from megatron_apex.training.run_control import update_is_finite

        losses = [v for r in reports for v in r.values()]
        if self.cfg.parallel.fsdp:
            grads = self.ddp_model.local_grads()
        else:
            grads = [b.grad_data for b in self.ddp_model.buffers + self.ddp_model.expert_parallel_buffers]
        return update_is_finite(losses, grads, self.info.device)

    # ---- the loop -----------------------------------------------------------------------
    def train(self) -> None:
        """Iterate to --train-iters; stop early, with a checkpoint, at --exit-interval,
        --exit-duration-in-mins or a SIGTERM/SIGINT (exit code 0), or after --max-skipped-iters
        consecutive non-finite iterations (DivergedError)."""
        from megatron_apex.training.run_control import DivergedError, SignalWatcher, StopPolicy

        cfg = self.cfg
        total = cfg.train.train_iters
        bar = None
        if self.is_logger and cfg.logging.progress and self.iteration < total:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.iteration, desc="train", dynamic_ncols=True)
        last_saved = self.iteration if self.starting.load is not None and not cfg.checkpoint.finetune else None
        window_start, window_iters = time.time(), 0
        consecutive_skips = 0
        with SignalWatcher() as watcher:
            stop = StopPolicy(watcher, cfg.train.exit_duration_in_mins, self.info.device, start=self.start_time)
            try:
                while self.iteration < total:
                    metrics = self.train_step()
                    window_iters += 1
                    consecutive_skips = consecutive_skips + 1 if metrics["update_skipped"] else 0
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}")
                    if (self.iteration % cfg.logging.log_interval == 0 or self.iteration == total
                            or metrics["update_skipped"]):
                        elapsed = max(time.time() - window_start, 1e-9)
                        record = {"iteration": self.iteration, **metrics,
                                  "samples_per_sec": window_iters * self.global_batch_size / elapsed,
                                  "consumed_samples": self.consumed_samples,
                                  "objective": "apex" if self._apex_active(self.iteration - 1) else "fm"}
                        self.logger.log(record)
                        window_start, window_iters = time.time(), 0
                    if metrics["update_skipped"] and self.info.rank == 0:
                        print(f"[megatron_apex] iteration {self.iteration}: non-finite loss or gradient, update "
                              f"skipped ({consecutive_skips} in a row, {self.skipped_iters} in total)", flush=True)
                    if cfg.train.max_skipped_iters and consecutive_skips >= cfg.train.max_skipped_iters:
                        self.save()
                        raise DivergedError(
                            f"{consecutive_skips} consecutive iterations had a non-finite loss or gradient "
                            f"(--max-skipped-iters {cfg.train.max_skipped_iters}); stopped at iteration "
                            f"{self.iteration}, checkpoint holds the weights of the last good update")
                    interval = cfg.checkpoint.save_interval
                    if interval and self.iteration % interval == 0:
                        self.save()
                        last_saved = self.iteration
                    if cfg.train.exit_interval and self.iteration % cfg.train.exit_interval == 0:
                        break
                    reason = stop.reason()
                    if reason is not None:
                        if self.info.rank == 0:
                            print(f"[megatron_apex] {reason}: saving a checkpoint at iteration {self.iteration} "
                                  "and exiting", flush=True)
                        break
            finally:
                if bar is not None:
                    bar.close()
                self.logger.close()
            if cfg.checkpoint.save and last_saved != self.iteration:
                self.save()


def pretrain(cfg: RunConfig) -> Trainer:
    trainer = Trainer(cfg)
    trainer.train()
    return trainer
