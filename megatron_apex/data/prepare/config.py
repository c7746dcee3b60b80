"""tools/prepare_data.py's settings (PrepareConfig) and the checks that make them concrete for
one process: positive sizes, the encoders' device and dtype, the image decoder."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_apex.data import dali_decode


@dataclass
class PrepareConfig:
    inputs: list
    output: str
    vae: str = "none"             # a local diffusers autoencoder folder (encoders.VAE_CLASSES), or "none" (pixels)
    text_encoder: str = "minilm"  # or a local transformers folder (Qwen2.5-VL, Gemma-2, ...)
    resolution: int = 256         # bucket area ~ resolution**2 pixels
    patch_size: int = 2           # latent sides are multiples of this
    channels: int = 3             # pixel channels with --vae none (1: grey, 3: RGB)
    max_text_len: Optional[int] = None  # None: the text encoder family's (encoders.FAMILY_MAX_TEXT_LEN)
    samples_per_shard: int = 1000
    workers: int = 1
    compress: bool = False        # gzip the tars (smaller, but the loader then holds them in memory)
    vae_batch_size: int = 16
    text_batch_size: int = 64
    progress: bool = True
    device: str = "auto"          # cpu | cuda | cuda:N; auto: cuda when available (torchrun: cuda:LOCAL_RANK)
    dtype: str = "auto"           # float32 | bfloat16; auto: bfloat16 on a GPU, float32 on the CPU
    decoder: str = "auto"         # pil | dali; auto: DALI on a GPU when installed, else PIL
    complex_human_instruction: bool = True  # Sana (Gemma-2): SanaPipeline's default instruction


def check_positive(cfg: PrepareConfig) -> None:
    for name in ("samples_per_shard", "workers", "max_text_len", "patch_size", "vae_batch_size", "text_batch_size"):
        value = getattr(cfg, name)
        if name == "max_text_len" and value is None:
            continue  # the text encoder's default, resolved later
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


def resolve_device(device: Optional[str], local_rank: int = 0, world: int = 1) -> str:
    """--device -> 'cpu' or 'cuda:N'. 'cuda' (and 'auto' on a GPU machine) is this process's
    GPU: cuda:LOCAL_RANK under torchrun, the current device otherwise."""
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not match:
        raise ValueError(f"--device {device}: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    count = torch.cuda.device_count()
    if match.group(1) is not None:
        index = int(match.group(1))
    elif world > 1:
        index = local_rank
    else:
        index = torch.cuda.current_device()
    if index >= count:
        raise ValueError(f"--device {device}: this process would use cuda:{index}, but the machine has {count} GPUs"
                         + (" (torchrun: at most one process per GPU)" if world > 1 else ""))
    return f"cuda:{index}"


def resolve_dtype(dtype: Optional[str], device: str) -> str:
    if dtype in (None, "", "auto"):
        return "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype {dtype}: expected float32 or bfloat16")
    return dtype


def resolve_decoder(decoder: Optional[str], device: str) -> str:
    if decoder in (None, "", "auto"):
        return "dali" if device.startswith("cuda") and dali_decode.dali_available() else "pil"
    if decoder not in ("pil", "dali"):
        raise ValueError(f"--decoder {decoder}: expected pil, dali or auto")
    if decoder == "dali" and not dali_decode.dali_available():
        raise ValueError("--decoder dali: NVIDIA DALI is not installed (pip install nvidia-dali-cuda120, the gpu "
                         "extra); use --decoder pil")
    return decoder

