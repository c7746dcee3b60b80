"""The training loop: megatron-core's forward/backward schedule, DDP, optimizer and scheduler
driving the APEX (or flow-matching) objective.

Randomness that decides the numbers (noise, times, the objective's fresh samples) is drawn from
generators seeded by (seed, iteration), for the whole global batch, and then sliced per
data-parallel rank and micro-batch: a resumed run therefore needs no RNG state, and the numbers
do not depend on how the global batch is split.
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


class Trainer:
    def __init__(self, cfg: RunConfig):
        from megatron.core import parallel_state as ps

        from megatron_apex.data.sampler import GlobalBatchSampler
        from megatron_apex.data.shards import load_dataset
        from megatron_apex.models.registry import build_model, get_model_config
        from megatron_apex.objectives.apex import APEXConfig
        from megatron_apex.objectives.flow import TimeSamplerConfig
        from megatron_apex.parallel import init_distributed, set_seed

        self.cfg = cfg
        self.model_config = get_model_config(cfg.model, **cfg.model_overrides)
        if cfg.parallel.pipeline_model_parallel_size > 1:
            raise ValueError("--pipeline-model-parallel-size > 1 is not supported yet by the APEX training loop "
                             "(tracked by the parallelism issue); use 1")
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
        obj = cfg.objective
        self.apex_config = APEXConfig(**obj.apex) if obj.objective == "apex" else None
        self.time_config = TimeSamplerConfig(**obj.time_sampler)
        if obj.teacher not in ("frozen", "online"):
            raise ValueError(f"--teacher {obj.teacher!r}: choose frozen or online")

        set_seed(tr.seed)
        self._build_model = lambda: build_model(self.model_config)
        self.model = self._build_model()
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
            lr_warmup_steps=o.lr_warmup_iters * g, lr_decay_steps=max(tr.train_iters * g, 1),
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
        model_sd = self.model.sharded_state_dict(prefix="model.")
        state = {"model": model_sd,
                 "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading)}
        if self.ema is not None:
            state["ema"] = self.ema.sharded_state_dict(prefix="ema.")
        if with_teacher:
            state["teacher"] = self.teacher.sharded_state_dict(prefix="teacher.")
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
        strip = checkpointing.strip_prefix
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
        self.model.load_state_dict(strip(loaded["model"], "model."))
        self.optimizer.load_state_dict(loaded["optimizer"])
        if self.ema is not None:
            if "ema" in loaded:
                self.ema.load_state_dict(strip(loaded["ema"], "ema."))
            else:  # EMA switched on at resume: start it from the current weights
                self.ema.load_state_dict(self.model.state_dict())
        if self.teacher is not None:
            self.teacher.load_state_dict(strip(loaded["teacher"], "teacher."))
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration = state["iteration"]
        self.consumed_samples = state["consumed_samples"]
        if self.info.rank == 0:
            print(f"[megatron_apex] resumed from {ckpt} (iteration {self.iteration})", flush=True)

    def _load_weights_only(self, ckpt: str, state: Dict) -> None:
        strip = checkpointing.strip_prefix
        sharded = {"model": self.model.sharded_state_dict(prefix="model.")}
        loaded = checkpointing.load_checkpoint(ckpt, sharded)
        self.model.load_state_dict(strip(loaded["model"], "model."))
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

    def _forward_step(self, data_iterator, model):
        from megatron_apex.objectives.apex import apex_loss
        from megatron_apex.objectives.fm import fm_loss

        batch = next(data_iterator)
        args = (model, batch["image"], batch["noise"], batch["t"], batch["context"], batch["context_mask"])
        if self._apex_active(self.iteration):
            teacher = self.teacher if self.cfg.objective.teacher == "frozen" else None
            terms = apex_loss(*args, self.apex_config, generator=batch["generator"], teacher=teacher,
                              step=self.iteration - self.cfg.objective.apex_start_iter)
        else:
            terms = fm_loss(*args)
        return terms["loss"], partial(self._loss_func, terms)

    @staticmethod
    def _loss_func(terms: Dict[str, torch.Tensor], output_tensor: torch.Tensor):
        # clone: the schedule divides the returned loss in place by the number of micro-batches
        report = {k: v.detach().float().clone() for k, v in terms.items()}
        return output_tensor, report

    def train_step(self) -> Dict[str, float]:
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if self._needs_teacher(self.iteration) and self.teacher is None:
            self.teacher = frozen_copy(self.model, self._build_model)  # the FM model as it is when APEX starts
        global_indices = next(self.sampler)
        batches = self._micro_batches(global_indices)
        self.ddp_model.zero_grad_buffer()
        self.optimizer.zero_grad()
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
