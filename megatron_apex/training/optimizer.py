"""The model wrapped for data parallelism (megatron's DDP, or FSDP under --fsdp), its optimizer
(megatron's Adam) and learning-rate scheduler, built from the flags."""

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_apex import gpu
from megatron_apex.parallel.fsdp import FullyShardedModel, shard_model
from megatron_apex.training.config import RunConfig


def build_optimizer(cfg: RunConfig, model, global_batch_size: int):
    """(the wrapped model, the optimizer, the scheduler); the model's config gets the hooks
    megatron's forward/backward schedule calls (loss scaling, no-sync, gradient finalisation)."""
    o, tr = cfg.optim, cfg.train
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    if cfg.parallel.fsdp:  # weights, grads and optimizer state sharded over DP (parallel/fsdp.py)
        ddp_model = FullyShardedModel(shard_model(model), ddp_config)
    else:
        ddp_model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad, bf16=o.bf16,
        params_dtype=model.config.params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, [ddp_model])
    gpu.use_fused_torch_adam(optimizer)  # megatron's torch AdamW fallback, on CUDA
    g = global_batch_size
    # Megatron's scheduler counts samples, not iterations.
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.lr_warmup_iters else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_iters * g, lr_decay_steps=max((o.lr_decay_iters or tr.train_iters) * g, 1),
        lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=max(tr.train_iters * g, 1), wd_incr_style="constant")
    config = model.config
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = ddp_model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return ddp_model, optimizer, scheduler
