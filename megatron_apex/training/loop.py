"""The training loop: megatron-core's forward/backward schedule, DDP, optimizer and scheduler
driving the APEX (or flow-matching) objective.

Randomness that decides the numbers (noise, times, the objective's fresh samples) is drawn from
generators seeded by (seed, iteration), for the whole global batch, and then sliced per
data-parallel rank and micro-batch: a resumed run therefore needs no RNG state, and the numbers
do not depend on how the global batch is split.

Two ways to run the APEX objective per global batch: "direct" (apex_loss inside megatron's
forward step, the single-stage path) and "two-phase" (no-grad pipeline passes, then one
batched training pass: pipeline_apex.py), which pipeline parallelism needs and which gives the
same numbers up to floating-point batching.
"""

import dataclasses
import json
import os
import subprocess
import time
from functools import partial
from typing import Dict, List

import torch
import torch.distributed as dist

from megatron_apex.training import checkpointing
from megatron_apex.training.arguments import RunConfig
from megatron_apex.training.ema import frozen_copy, update_ema
from megatron_apex.training.metrics_log import MetricsLogger


def _iteration_generator(seed: int, iteration: int, stream: int = 0) -> torch.Generator:
    # Distinct, reproducible streams per (seed, iteration, purpose).
    return torch.Generator().manual_seed((seed * 1_000_003 + iteration) * 7 + stream)


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


def _sharded(module, prefix: str) -> Dict:
    return checkpointing.mark_tp_replicas(module.sharded_state_dict(prefix=prefix))


class Trainer:
    def __init__(self, cfg: RunConfig):
        from megatron.core import parallel_state as ps

        from megatron_apex.data.sampler import GlobalBatchSampler
        from megatron_apex.data.shards import load_dataset
        from megatron_apex.models.registry import get_model_config
        from megatron_apex.objectives.apex import APEXConfig
        from megatron_apex.objectives.flow import TimeSamplerConfig
        from megatron_apex.parallel import init_distributed, set_seed
        from megatron_apex.parallel.recompute import enable_activation_recompute
        from megatron_apex.training.pipeline_apex import build_stage_model

        self.cfg = cfg
        self.model_config = get_model_config(cfg.model, **cfg.model_overrides)
        obj = cfg.objective
        self.apex_config = APEXConfig(**obj.apex) if obj.objective == "apex" else None
        self.two_phase = check_parallel_config(cfg, self.model_config, self.apex_config)
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
        self._build_model = lambda: build_stage_model(self.model_config)
        self.model = self._build_model()
        if cfg.parallel.recompute_granularity:
            enable_activation_recompute(self.model, cfg.parallel.recompute_granularity)
        self.ddp_model, self.optimizer, self.scheduler = self._build_optimizer(self.model)
        self.ema = frozen_copy(self.model, self._build_model) if tr.ema_decay > 0 else None
        self.teacher = None

        self.dataset = load_dataset(cfg.data.data_path, split="train")
        self.iteration = 0
        self.consumed_samples = 0
        self._maybe_load()
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

        o, tr = self.cfg.optim, self.cfg.train
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=self.cfg.parallel.use_distributed_optimizer)
        ddp_model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
        opt_config = OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad, bf16=o.bf16,
            params_dtype=model.config.params_dtype,
            use_distributed_optimizer=self.cfg.parallel.use_distributed_optimizer)
        optimizer = get_megatron_optimizer(opt_config, [ddp_model])
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

    def _apex_active(self, iteration: int) -> bool:
        return self.apex_config is not None and iteration >= self.cfg.objective.apex_start_iter

    def _needs_teacher(self, iteration: int) -> bool:
        return (self._apex_active(iteration) and self.cfg.objective.teacher == "frozen"
                and self.apex_config.variant == "released")

    # ---- checkpoints --------------------------------------------------------------------
    def _sharded_state_dict(self, is_loading: bool, with_teacher: bool) -> Dict:
        model_sd = _sharded(self.model, "model.")
        state = {"model": model_sd,
                 "optimizer": checkpointing.optimizer_sharded_state_dict(self.optimizer, model_sd, is_loading)}
        if self.ema is not None:
            state["ema"] = _sharded(self.ema, "ema.")
        if with_teacher:
            state["teacher"] = _sharded(self.teacher, "teacher.")
        return state

    def _train_state(self) -> Dict:
        return {
            "iteration": self.iteration,
            "consumed_samples": self.consumed_samples,
            "scheduler": self.scheduler.state_dict(),
            "args": self.cfg.to_dict(),
            "model_name": self.cfg.model,
            "model_config": dataclasses.asdict(self.model_config),
            "has_teacher": self.teacher is not None,
            "has_ema": self.ema is not None,
            "code_version": code_version(),
        }

    def save(self) -> None:
        save = self.cfg.checkpoint.save
        if not save:
            return
        checkpointing.save_checkpoint(save, self.iteration,
                                      self._sharded_state_dict(False, self.teacher is not None),
                                      self._train_state())

    def _maybe_load(self) -> None:
        load = self.cfg.checkpoint.load
        if not load:
            return
        ckpt = checkpointing.resolve_checkpoint(load)
        state = checkpointing.read_train_state(ckpt)
        saved_cfg = state.get("model_config", {})
        ours = json.loads(json.dumps(dataclasses.asdict(self.model_config)))  # tuples as saved: lists
        diff = sorted(k for k in set(saved_cfg) | set(ours) if saved_cfg.get(k) != ours.get(k))
        if diff:
            shown = ", ".join(f"{k}: checkpoint {saved_cfg.get(k)!r} vs run {ours.get(k)!r}" for k in diff)
            raise ValueError(f"--load {ckpt}: model config differs from this run's flags ({shown})")
        module_state = checkpointing.module_state_dict
        if self.cfg.checkpoint.finetune:
            self._load_weights_only(ckpt, state)
            return
        if state.get("has_teacher"):
            self.teacher = frozen_copy(self.model, self._build_model)
        if state.get("has_ema") and self.ema is None:
            raise ValueError(f"--load {ckpt}: checkpoint holds EMA weights but --ema-decay is 0")
        if "scheduler" not in state:
            raise ValueError(f"--load {ckpt}: holds weights only (no optimizer state); add --finetune")
        loaded = checkpointing.load_checkpoint(ckpt, self._sharded_state_dict(True, state.get("has_teacher")))
        self.model.load_state_dict(module_state(loaded["model"], "model.", self.model))
        checkpointing.load_optimizer_state(self.optimizer, loaded["optimizer"])
        if self.ema is not None:
            if "ema" in loaded:
                self.ema.load_state_dict(module_state(loaded["ema"], "ema.", self.ema))
            else:  # EMA switched on at resume: start it from the current weights
                self.ema.load_state_dict(self.model.state_dict())
        if self.teacher is not None:
            self.teacher.load_state_dict(module_state(loaded["teacher"], "teacher.", self.teacher))
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration = state["iteration"]
        self.consumed_samples = state["consumed_samples"]
        if self.info.rank == 0:
            print(f"[megatron_apex] resumed from {ckpt} (iteration {self.iteration})", flush=True)

    def _load_weights_only(self, ckpt: str, state: Dict) -> None:
        module_state = checkpointing.module_state_dict
        sharded = {"model": _sharded(self.model, "model.")}
        loaded = checkpointing.load_checkpoint(ckpt, sharded)
        self.model.load_state_dict(module_state(loaded["model"], "model.", self.model))
        if self.ema is not None:
            self.ema.load_state_dict(self.model.state_dict())
        if self.info.rank == 0:
            print(f"[megatron_apex] fine-tuning from the weights of {ckpt}", flush=True)

    # ---- one iteration ------------------------------------------------------------------
    def _micro_batches(self, global_indices: List[int]) -> List[Dict]:
        """This rank's micro-batches of one global batch: data-parallel rank r takes the r-th
        contiguous slice, cut into micro-batches in order."""
        from megatron_apex.objectives.flow import sample_time

        gen = _iteration_generator(self.cfg.train.seed, self.iteration)
        g = len(global_indices)
        noise = torch.randn((g, *self.dataset.images.shape[1:]), generator=gen)
        t = sample_time(g, self.time_config, generator=gen)
        mbs = self.cfg.train.micro_batch_size
        rank_start = self.dp_rank * (g // self.dp_size)
        out = []
        for mb_index in range(self.num_microbatches):
            start = rank_start + mb_index * mbs
            batch = self.dataset.get_batch(global_indices[start:start + mbs])
            batch["noise"] = noise[start:start + mbs]
            batch["t"] = t[start:start + mbs]
            # the objective's own fresh draws: one stream per micro-batch of the global batch
            batch["generator"] = _iteration_generator(self.cfg.train.seed, self.iteration,
                                                      stream=1 + start // mbs)
            out.append(batch)
        return out

    def _step_teacher(self):
        """The real velocity's model of this iteration's DM query (None = the model itself)."""
        return self.teacher if self.cfg.objective.teacher == "frozen" else None

    def _forward_step(self, data_iterator, model):
        from megatron_apex.objectives.apex import apex_loss
        from megatron_apex.objectives.fm import fm_loss

        batch = next(data_iterator)
        args = (model, batch["image"], batch["noise"], batch["t"], batch["context"], batch["context_mask"])
        if self._apex_active(self.iteration):
            terms = apex_loss(*args, self.apex_config, generator=batch["generator"], teacher=self._step_teacher(),
                              step=self.iteration - self.cfg.objective.apex_start_iter)
        else:
            terms = fm_loss(*args)
        return terms["loss"], partial(self._loss_func, terms)

    def _two_phase_objective(self, batch: Dict):
        from megatron_apex.objectives.apex import two_phase_apex
        from megatron_apex.training.pipeline_apex import FlowMatchingObjective

        args = (batch["image"], batch["noise"], batch["t"], batch["context"], batch["context_mask"])
        if self._apex_active(self.iteration):
            return two_phase_apex(*args, self.apex_config, generator=batch["generator"],
                                  teacher=self._step_teacher() is not None,
                                  step=self.iteration - self.cfg.objective.apex_start_iter)
        return FlowMatchingObjective(*args)

    @staticmethod
    def _loss_func(terms: Dict[str, torch.Tensor], output_tensor: torch.Tensor):
        from megatron_apex.training.pipeline_apex import terms_report

        return output_tensor, terms_report(terms)

    def train_step(self) -> Dict[str, float]:
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_apex.training.pipeline_apex import two_phase_step

        if self._needs_teacher(self.iteration) and self.teacher is None:
            self.teacher = frozen_copy(self.model, self._build_model)  # the FM model as it is when APEX starts
        global_indices = next(self.sampler)
        batches = self._micro_batches(global_indices)
        self.ddp_model.zero_grad_buffer()
        self.optimizer.zero_grad()
        if self.two_phase:
            reports = two_phase_step(self.ddp_model, [self._two_phase_objective(b) for b in batches],
                                     teacher=self._step_teacher())
        else:
            forward_backward = get_forward_backward_func()
            reports = forward_backward(
                forward_step_func=self._forward_step, data_iterator=iter(batches), model=[self.ddp_model],
                num_microbatches=self.num_microbatches, seq_length=0,
                micro_batch_size=self.cfg.train.micro_batch_size, forward_only=False)
        lr = self.optimizer.param_groups[0]["lr"]
        update_successful, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=self.global_batch_size)
        if self.ema is not None:
            update_ema(self.ema, self.model, self.cfg.train.ema_decay)
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
        return metrics

    # ---- the loop -----------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.cfg
        total = cfg.train.train_iters
        bar = None
        if self.is_logger and cfg.logging.progress and self.iteration < total:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.iteration, desc="train", dynamic_ncols=True)
        last_saved = self.iteration if cfg.checkpoint.load and not cfg.checkpoint.finetune else None
        window_start, window_iters = time.time(), 0
        try:
            while self.iteration < total:
                metrics = self.train_step()
                window_iters += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}")
                if self.iteration % cfg.logging.log_interval == 0 or self.iteration == total:
                    elapsed = max(time.time() - window_start, 1e-9)
                    record = {"iteration": self.iteration, **metrics,
                              "samples_per_sec": window_iters * self.global_batch_size / elapsed,
                              "consumed_samples": self.consumed_samples,
                              "objective": "apex" if self._apex_active(self.iteration - 1) else "fm"}
                    self.logger.log(record)
                    window_start, window_iters = time.time(), 0
                interval = cfg.checkpoint.save_interval
                if interval and self.iteration % interval == 0:
                    self.save()
                    last_saved = self.iteration
                if cfg.train.exit_interval and self.iteration % cfg.train.exit_interval == 0:
                    break
        finally:
            if bar is not None:
                bar.close()
        if cfg.checkpoint.save and last_saved != self.iteration:
            self.save()
        self.logger.close()


def pretrain(cfg: RunConfig) -> Trainer:
    trainer = Trainer(cfg)
    trainer.train()
    return trainer
