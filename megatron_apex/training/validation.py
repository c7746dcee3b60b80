"""Checks of a run's flags against each other, the model and the data set, made before anything
is built (a bad flag or data set fails in seconds, in one line naming the flags). The checks of
the starting checkpoints are in resume.py."""

from typing import Optional, Tuple

from megatron_apex.data.latent_loader import check_model_fits_data, is_latent_dataset, read_latent_manifest
from megatron_apex.data.shards import read_manifest
from megatron_apex.models.common.sequence_parallel import check_sequence_parallel
from megatron_apex.training.config import RunConfig


def check_parallel_config(cfg: RunConfig, model_config, apex_config) -> bool:
    """Refuse, before any process group exists, what cannot run with the requested
    parallelism (one line naming the flags); returns whether the two-phase step is used."""
    par = cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    model_config.validate(tp)  # --num-attention-heads divisible by --tensor-model-parallel-size
    if par.sequence_parallel:
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


def check_lora_config(cfg: RunConfig, two_phase: bool, apex_config) -> None:
    """What LoRA cannot run with, refused at start (one line naming the flags)."""
    if not cfg.lora.enabled or cfg.lora.fake_reference != "base":
        return
    if two_phase and apex_config is not None and apex_config.variant == "released" \
            and cfg.objective.teacher == "frozen":
        raise ValueError("--lora-fake-reference base cannot run with --teacher frozen in the two-phase step "
                         "(pipeline parallelism or --apex-schedule two-phase): the pass has one slot besides the "
                         "model, for the base or the teacher; use --teacher online or the direct schedule")


def check_data_fits_model(data_path: Optional[str], model_config, model_name: str) -> None:
    """--data-path against --model before anything is built: its manifest is read (format and
    structure) and its text width, and the image channels and sides when it records them, are
    compared with the model's, in one line naming both flags. The built-in dataset (None) is made
    for the CPU models."""
    if data_path is None:
        return
    if is_latent_dataset(data_path):
        check_model_fits_data(read_latent_manifest(data_path), model_config, data_path, model_name)
        return
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


def check_teacher(cfg: RunConfig) -> None:
    teacher = cfg.objective.teacher
    if teacher not in ("frozen", "online"):
        raise ValueError(f"--teacher {teacher!r}: choose frozen or online")


def micro_batches_per_rank(cfg: RunConfig, dp_size: int) -> Tuple[int, int]:
    """(the global batch size, the micro-batches each data-parallel rank accumulates per step)."""
    tr = cfg.train
    global_batch_size = tr.global_batch_size or tr.micro_batch_size * dp_size
    if global_batch_size % (tr.micro_batch_size * dp_size) != 0:
        raise ValueError(
            f"--global-batch-size ({global_batch_size}) must be divisible by --micro-batch-size "
            f"({tr.micro_batch_size}) x data-parallel size ({dp_size})")
    return global_batch_size, global_batch_size // (tr.micro_batch_size * dp_size)
