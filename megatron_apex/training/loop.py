"""The training loop: the Trainer builds a run from its flags and iterates it.

Construction checks everything that can be checked before anything is built (validation.py;
the starting checkpoints: resume.py), then builds the model, lets the parameter strategy
prepare it (strategy.py: every parameter, or LoRA adapters over a frozen base), wraps it with
its optimizer (optimizer.py), makes the EMA, opens the data set (data/dataset.py) and loads what
--load holds. Each iteration then draws its micro-batches (batches.py), runs the objective's
forward and backward passes (objective_step.py: flow matching, then APEX), steps the optimizer,
the scheduler and the EMA, and reports the loss terms averaged over the data-parallel ranks.

Randomness that decides the numbers is drawn from counter-based generators keyed by (seed,
iteration, purpose, micro-batch) (random_streams.py): a resumed run needs no RNG state, and the
numbers do not depend on how the global batch is split.
"""

import os
import time
from functools import partial
from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_apex import families, gpu
from megatron_apex.data.dataset import open_training_dataset
from megatron_apex.objectives.apex import APEXConfig
from megatron_apex.objectives.flow import TimeSamplerConfig
from megatron_apex.parallel import init_distributed, set_seed
from megatron_apex.parallel.fsdp import check_fsdp_config
from megatron_apex.parallel.recompute import enable_activation_recompute
from megatron_apex.training import resume
from megatron_apex.training.config import RunConfig
from megatron_apex.training.batches import MicroBatches, empty_prompt_states
from megatron_apex.training.metrics_log import MetricsLogger, ProgressReport
from megatron_apex.training.objective_step import ObjectiveStep
from megatron_apex.training.optimizer import build_optimizer
from megatron_apex.training.pipeline_apex import build_stage_model
from megatron_apex.training.run_control import DivergedError, SignalWatcher, StopPolicy, update_is_finite
from megatron_apex.training.strategy import parameter_strategy
from megatron_apex.training.validation import (check_data_fits_model, check_lora_config, check_parallel_config,
                                               check_teacher, micro_batches_per_rank)


class Trainer:
    """One training run: built and checked from the flags (__init__), then iterated (train)."""

    def __init__(self, cfg: RunConfig):
        self.start_time = time.time()  # --exit-duration-in-mins counts from here
        self.cfg = cfg
        self.info = None  # the process group's, from init_distributed below
        # Everything that can be checked without building anything is, first: a bad flag, data set
        # or checkpoint fails in seconds, not after the model, optimizer and dataset are built.
        self.model_config = families.get_model_config(cfg.model, **cfg.model_overrides)
        check_data_fits_model(cfg.data.data_path, self.model_config, cfg.model)
        obj = cfg.objective
        self.apex_config = APEXConfig(**obj.apex) if obj.objective == "apex" else None
        self.two_phase = check_parallel_config(cfg, self.model_config, self.apex_config)
        check_lora_config(cfg, self.two_phase, self.apex_config)
        check_fsdp_config(cfg)
        self.strategy = parameter_strategy(cfg, self.model_config, self.print0)
        self.starting = resume.check_starting_checkpoints(cfg, self.model_config, self.strategy, self.print0)
        self.info = init_distributed(cfg.parallel.tensor_model_parallel_size,
                                     cfg.parallel.pipeline_model_parallel_size)
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.global_batch_size, self.num_microbatches = micro_batches_per_rank(cfg, self.dp_size)
        self.time_config = TimeSamplerConfig(**obj.time_sampler)
        check_teacher(cfg)

        set_seed(cfg.train.seed)
        build = partial(build_stage_model, self.model_config, families.layer_spec(self.model_config, cfg.gpu),
                        cfg.parallel.sequence_parallel)
        self.model = build()
        self.strategy.prepare(self.model, build, self.starting)  # LoRA: base weights, then adapters
        if cfg.parallel.recompute_granularity:
            enable_activation_recompute(self.model, cfg.parallel.recompute_granularity)
        self.ddp_model, self.optimizer, self.scheduler = build_optimizer(cfg, self.model, self.global_batch_size)
        self.print0(f"[megatron_apex] GPU paths: {gpu.describe(cfg.gpu, self.optimizer)}")
        self.strategy.report(self.model, self.dp_size)
        self.ema = self.strategy.frozen_copy(self.model) if cfg.train.ema_decay > 0 else None
        self.teacher = None

        self.dataset = open_training_dataset(cfg.data.data_path, log=self.print0)
        self.empty_prompt = empty_prompt_states(cfg, self.apex_config, self.dataset, self.info.device)
        self.batches = MicroBatches(self.dataset, cfg, self.time_config, self.dp_rank, self.dp_size)
        self.step = ObjectiveStep(cfg, self.apex_config, self.strategy, self.two_phase, self.model, self.ddp_model,
                                  self.num_microbatches, self.empty_prompt)
        self.iteration = 0
        self.consumed_samples = 0
        self.skipped_iters = 0
        resume.load_starting_checkpoint(self)
        self.sampler = iter(self.dataset.batch_sampler(self.global_batch_size, cfg.train.seed, self.consumed_samples))
        self.is_logger = (self.dp_rank == 0 and ps.is_pipeline_last_stage()
                          and ps.get_tensor_model_parallel_rank() == 0)
        self.logger = MetricsLogger(cfg.checkpoint.save, cfg.logging.tensorboard_dir, enabled=self.is_logger)
        self.logger.truncate_after(self.iteration)

    def print0(self, message: str) -> None:
        # before the process group exists (checks at start): the launcher's RANK
        rank = self.info.rank if self.info is not None else int(os.environ.get("RANK", "0"))
        if rank == 0:
            print(message, flush=True)

    def save(self) -> None:
        resume.save_run(self)

    def micro_batches(self, global_indices: List[int]) -> List[Dict]:
        """This rank's micro-batches of one global batch (training/batches.py)."""
        return self.batches(global_indices, self.iteration, self.info.device, self.empty_prompt)

    # ---- one iteration -------------------------------------------------------------------------
    def train_step(self) -> Dict[str, float]:
        if self.step.needs_teacher(self.iteration) and self.teacher is None:
            self.teacher = self.strategy.frozen_copy(self.model)  # the FM model as it is when APEX starts
        global_indices = next(self.sampler)
        batches = self.micro_batches(global_indices)
        self.ddp_model.zero_grad_buffer()
        self.optimizer.zero_grad()
        gpu.refresh_fp8_weight_cache(self.cfg.gpu, self.model)  # the weights changed at the last step
        reports = self.step.forward_backward(batches, self.iteration, self.teacher)
        lr = self.optimizer.param_groups[0]["lr"]
        if self._update_is_finite(reports):
            update_successful, grad_norm, _ = self.optimizer.step()
        else:  # Megatron's convention for a skipped update: no optimizer or LR step, data consumed
            update_successful, grad_norm = False, float("nan")
        if update_successful:
            self.scheduler.step(increment=self.global_batch_size)
            if self.ema is not None:
                self.strategy.update_ema(self.ema, self.model)
        else:
            self.skipped_iters += 1
        self.iteration += 1
        self.consumed_samples += self.global_batch_size

        metrics = self._mean_terms(reports)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["lr"] = lr
        metrics["update_skipped"] = int(not update_successful)
        metrics["skipped_iters"] = self.skipped_iters
        if self.dataset.skipped is not None:  # damaged samples the data set left out
            metrics["data_skipped"] = self.dataset.skipped
        return metrics

    def _mean_terms(self, reports: List[Dict]) -> Dict[str, float]:
        """The loss terms averaged over micro-batches and data-parallel ranks (last stage only)."""
        metrics: Dict[str, float] = {}
        if ps.is_pipeline_last_stage():
            keys = sorted(reports[0])
            stacked = torch.stack([torch.stack([r[k] for r in reports]).mean() for k in keys])
            if self.dp_size > 1:
                dist.all_reduce(stacked, group=ps.get_data_parallel_group())
                stacked /= self.dp_size
            for k, v in zip(keys, stacked.tolist()):
                metrics[k] = v
        return metrics

    def _update_is_finite(self, reports: List[Dict]) -> bool:
        losses = [v for r in reports for v in r.values()]
        if self.cfg.parallel.fsdp:
            grads = self.ddp_model.local_grads()
        else:
            grads = [b.grad_data for b in self.ddp_model.buffers + self.ddp_model.expert_parallel_buffers]
        return update_is_finite(losses, grads, self.info.device)

    # ---- the loop ----------------------------------------------------------------------------
    def train(self) -> None:
        """Iterate to --train-iters; stop early, with a checkpoint, at --exit-interval,
        --exit-duration-in-mins or a SIGTERM/SIGINT (exit code 0), or after --max-skipped-iters
        consecutive non-finite iterations (DivergedError)."""
        cfg = self.cfg
        total = cfg.train.train_iters
        report = ProgressReport(self.logger, self.global_batch_size, cfg.logging.log_interval, total, self.iteration,
                                bar=self.is_logger and cfg.logging.progress and self.iteration < total)
        last_saved = self.iteration if self.starting.load is not None and not cfg.checkpoint.finetune else None
        consecutive_skips = 0
        with SignalWatcher() as watcher:
            stop = StopPolicy(watcher, cfg.train.exit_duration_in_mins, self.info.device, start=self.start_time)
            try:
                while self.iteration < total:
                    metrics = self.train_step()
                    consecutive_skips = consecutive_skips + 1 if metrics["update_skipped"] else 0
                    report.iteration_done(self.iteration, metrics, self.consumed_samples,
                                          "apex" if self.step.apex_active(self.iteration - 1) else "fm")
                    if metrics["update_skipped"]:
                        self._skipped_update(consecutive_skips)
                    interval = cfg.checkpoint.save_interval
                    if interval and self.iteration % interval == 0:
                        self.save()
                        last_saved = self.iteration
                    if cfg.train.exit_interval and self.iteration % cfg.train.exit_interval == 0:
                        break
                    reason = stop.reason()  # (agreed over the ranks: every rank stops at the same iteration)
                    if reason is not None:
                        self.print0(f"[megatron_apex] {reason}: saving a checkpoint at iteration {self.iteration} "
                                    "and exiting")
                        break
            finally:
                report.close()
            if cfg.checkpoint.save and last_saved != self.iteration:
                self.save()

    def _skipped_update(self, consecutive_skips: int) -> None:
        """Name the skipped update; after --max-skipped-iters in a row, save and stop."""
        self.print0(f"[megatron_apex] iteration {self.iteration}: non-finite loss or gradient, update "
                    f"skipped ({consecutive_skips} in a row, {self.skipped_iters} in total)")
        limit = self.cfg.train.max_skipped_iters
        if limit and consecutive_skips >= limit:
            self.save()
            raise DivergedError(
                f"{consecutive_skips} consecutive iterations had a non-finite loss or gradient "
                f"(--max-skipped-iters {limit}); stopped at iteration "
                f"{self.iteration}, checkpoint holds the weights of the last good update")


def pretrain(cfg: RunConfig) -> Trainer:
    trainer = Trainer(cfg)
    trainer.train()
    return trainer
