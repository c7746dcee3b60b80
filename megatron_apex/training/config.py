"""The run's configuration: one dataclass per group of flags, gathered in RunConfig
(training/arguments.py parses the command line into it). No global argument state: a
RunConfig is passed down explicitly."""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from megatron_apex.gpu import GpuOptions
from megatron_apex.lora import LoRAConfig

OBJECTIVES = ("apex", "fm")
RECOMPUTE_GRANULARITIES = ("full", "selective")
APEX_SCHEDULES = ("auto", "direct", "two-phase")
LORA_FAKE_REFERENCES = ("adapted", "base")


@dataclass
class ParallelArgs:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    use_distributed_optimizer: bool = False
    # Activation recompute: None = off, "full" = each transformer layer, "selective" = core
    # attention only (megatron's names); the numbers do not change.
    recompute_granularity: Optional[str] = None
    # Megatron-LM's --sequence-parallel: with TP > 1, each TP rank holds 1/TP of the tokens
    # between the tensor-parallel linears (norms, modulation, residuals); the numbers do not change.
    sequence_parallel: bool = False
    # ZeRO-3 for full-parameter training: weights, gradients, optimizer state and the frozen
    # teacher / EMA copies sharded over the data-parallel ranks (torch FSDP2, parallel/fsdp.py)
    fsdp: bool = False


@dataclass
class OptimArgs:
    lr: float = 1e-3
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: bool = False
    # Iterations the LR decays over (Megatron's --lr-decay-iters); None = --train-iters. After
    # them the LR stays at --min-lr: the APEX fine-tuning phase runs at a constant LR when this
    # equals --apex-start-iter.
    lr_decay_iters: Optional[int] = None


@dataclass
class TrainArgs:
    micro_batch_size: int = 64
    global_batch_size: int = 64
    train_iters: int = 100
    seed: int = 1234
    ema_decay: float = 0.0
    exit_interval: Optional[int] = None  # stop (with a checkpoint) once iteration % N == 0
    # Stop (with a checkpoint, exit code 0) at the first iteration boundary after this many
    # minutes of training, as Megatron-LM's --exit-duration-in-mins (a job's wall-time limit).
    exit_duration_in_mins: Optional[float] = None
    # A non-finite loss or gradient skips the update; this many skips IN A ROW stop the run
    # with a checkpoint of the last good weights (0 = never stop).
    max_skipped_iters: int = 10


@dataclass
class ObjectiveArgs:
    objective: str = "apex"
    # Iterations of plain flow matching before the APEX terms switch on (the paper fine-tunes
    # APEX from a pretrained flow model; 0 = APEX from the first iteration).
    apex_start_iter: int = 0
    # Where the real velocity of the distribution-matching query comes from (`released`
    # variant): "frozen" = a frozen copy of the model taken when APEX starts, "online" = the
    # model being trained (the release's full-tuning setting).
    teacher: str = "frozen"
    apex: Dict[str, Any] = field(default_factory=dict)  # APEXConfig fields
    time_sampler: Dict[str, Any] = field(default_factory=dict)  # TimeSamplerConfig fields
    # "direct": the objective inside megatron's forward step; "two-phase": no-grad pipeline
    # passes, then one batched training pass (needed by pipeline parallelism, same numbers up
    # to floating-point batching); "auto": two-phase exactly when pipeline-parallel.
    schedule: str = "auto"


@dataclass
class DataArgs:
    data_path: Optional[str] = None  # None = the built-in dataset
    # probability that a training sample's caption is replaced by the empty prompt, so the model
    # also learns the unconditional velocity that classifier-free guidance needs
    caption_dropout: float = 0.0


@dataclass
class CheckpointArgs:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    # Load only the weights of --load (EMA too when both have it) and start a new run at
    # iteration 0 with a fresh optimizer: fine-tuning from a pretrained or converted model.
    finetune: bool = False
    # Megatron-LM's --pretrained-checkpoint: the model weights a run starts from (a LoRA run's
    # frozen base); a resumed run (--load) takes everything else from its own checkpoint.
    pretrained_checkpoint: Optional[str] = None
    # Keep only the newest N complete checkpoints under --save (None = keep all).
    keep_last: Optional[int] = None


@dataclass
class LoRAArgs:
    """Low-rank adapters on a frozen base (megatron_apex.lora, docs/lora.md); rank 0 = off,
    full-parameter training."""

    rank: int = 0
    alpha: Optional[float] = None  # None = rank (scale 1)
    targets: str = "attn"
    dropout: float = 0.0
    init_seed: int = 0
    extra_trainable: str = ""  # comma-separated fnmatch patterns on parameter names
    # Who answers the objective's no-grad queries under the shifted condition (v_fake, the DM
    # fake velocity): "adapted" = the network being trained (the paper), "base" = the frozen
    # base model (adapters off).
    fake_reference: str = "adapted"

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(rank=self.rank, alpha=self.alpha, targets=self.targets, dropout=self.dropout,
                          init_seed=self.init_seed, extra_trainable=self.extra_trainable).validate()


@dataclass
class LoggingArgs:
    log_interval: int = 10
    tensorboard_dir: Optional[str] = None
    progress: bool = True


@dataclass
class RunConfig:
    model: str = "qwen-image-tiny"
    model_overrides: Dict[str, Any] = field(default_factory=dict)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    objective: ObjectiveArgs = field(default_factory=ObjectiveArgs)
    data: DataArgs = field(default_factory=DataArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    lora: LoRAArgs = field(default_factory=LoRAArgs)
    gpu: GpuOptions = field(default_factory=GpuOptions)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)
