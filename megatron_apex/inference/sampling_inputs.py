"""What a checkpoint is sampled with: its text encoder, VAE, image size and default prompts.

Sources, first found wins:
1. the flags: ``--text-encoder DIR`` / ``--vae DIR`` (or ``none`` / ``minilm``), or ``--pipeline DIR``
   (a diffusers pipeline folder: its `text_encoder/` with `tokenizer/`, and `vae/`);
2. the run's training data (`data_path` in train_state.json's args): a `latent_shards.v1` manifest
   (tools/prepare_data.py) records its VAE's class, downsampling and normalisation and its text
   encoder's kind and width, but not their folders: a MiniLM / pixel-space dataset needs
   nothing more, any other needs the folders from the flags, checked against the manifest; a
   `shards.v1` dataset (the built-in one) is MiniLM states and pixels;
3. no recorded data (the built-in dataset, or an imported checkpoint): the built-in dataset
   when the model fits it, else the flags are required.

Defaults: the image size is the manifest's square bucket (a `shards.v1` dataset: its image
shape; without data, the diffusers pipeline's default: 1024 px for Qwen-Image, `sample_size`
latents for Sana); the text length is the manifest's `max_text_len` (without data, the text
encoder's family default in encoders.py: 256 for Qwen-Image as the recipes, 300 for Sana as
SanaPipeline); Sana captions follow SanaPipeline's complex human instruction unless the data was
encoded without it; the prompts are the dataset's class prompts, else its first captions.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from megatron_apex.data.builtin import build_builtin_shards
from megatron_apex.data.encoders import text_encoder_info, vae_geometry
from megatron_apex.data.latent_loader import is_latent_dataset, read_latent_manifest
from megatron_apex.data.shards import read_manifest
from megatron_apex.data.text_encoder import ENCODER_DIM
from megatron_apex.families import family_of_config
from megatron_apex.inference.decoding import geometry_mismatch
from megatron_apex.inference.prompts import dataset_captions

DEFAULT_CAPTIONS = 10  # default prompts taken from a dataset without class prompts
NEEDS_FOLDERS = "--pipeline DIR, or --text-encoder DIR and --vae DIR"


@dataclasses.dataclass
class SamplingInputs:
    text_encoder: str                 # "minilm" or a transformers folder
    tokenizer: Optional[str]          # a separate tokenizer folder (pipeline layout), else None
    vae: str                          # "none" or a diffusers autoencoder folder
    geom: dict                        # encoders.vae_geometry of the VAE
    max_text_len: int
    complex_human_instruction: bool  # Sana captions after SanaPipeline's instruction (encoders.py)
    default_grid: Tuple[int, int]     # latent (height, width)
    data_path: Optional[str] = None   # the run's data, when found
    manifest: Optional[dict] = None
    prompts: Optional[List[str]] = None  # the data's default prompts
    labels: Optional[np.ndarray] = None  # their class ids (class prompts only)
    dataset: Optional[str] = None     # the built-in dataset's name

    @property
    def pad_length(self) -> Optional[int]:
        """Pad text to the data's max_text_len, as the trainer's batches were (None: the longest)."""
        return self.max_text_len if self.manifest is not None else None


def _family_grid(config, factor: int) -> Tuple[int, int]:
    """The latent grid of the family's diffusers pipeline's default image size."""
    return family_of_config(config).default_latent_grid(config, factor)


def _folder(flag: str, path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path}: not a folder ({what})")
    return path


def _pipeline_parts(pipeline: str) -> dict:
    _folder("--pipeline", pipeline, "a diffusers pipeline folder saved with save_pretrained")
    parts = {}
    for sub in ("text_encoder", "tokenizer", "vae"):
        if (Path(pipeline) / sub).is_dir():
            parts[sub] = str(Path(pipeline) / sub)
    return parts


def _read_data(data_path: str):
    """(manifest, "latent" | "shards") of a run's data folder."""
    if is_latent_dataset(data_path):
        return read_latent_manifest(data_path), "latent"
    return read_manifest(data_path), "shards"


def _square_bucket(buckets) -> Tuple[int, int]:
    """The bucket closest to 1:1 (the largest of equals)."""
    return tuple(min(buckets, key=lambda b: (abs(np.log(b[0] / b[1])), -b[0] * b[1])))


def resolve(ckpt: str, state: dict, config, text_encoder: Optional[str] = None, vae: Optional[str] = None,
            pipeline: Optional[str] = None, max_text_len: Optional[int] = None) -> SamplingInputs:
    """The SamplingInputs of checkpoint ``ckpt`` (its train_state ``state``, model ``config``);
    every refusal is one line naming the flag, the data or the checkpoint."""
    parts = _pipeline_parts(pipeline) if pipeline else {}
    te_flag = "--text-encoder" if text_encoder else "--pipeline"
    vae_flag = "--vae" if vae else "--pipeline"
    tokenizer = None
    if text_encoder is None and "text_encoder" in parts:
        text_encoder, tokenizer = parts["text_encoder"], parts.get("tokenizer")
    if vae is None:
        vae = parts.get("vae")
    if pipeline and text_encoder is None and vae is None:
        raise FileNotFoundError(f"--pipeline {pipeline} has neither text_encoder/ nor vae/ (a diffusers pipeline "
                                "folder saved with save_pretrained)")
    if text_encoder not in (None, "minilm"):
        _folder(te_flag, text_encoder, "a transformers text encoder folder, or 'minilm'")
    if vae not in (None, "none"):
        _folder(vae_flag, vae, "a diffusers autoencoder folder, or 'none'")
    explicit = text_encoder is not None or vae is not None

    data_path = ((state.get("args") or {}).get("data") or {}).get("data_path")
    manifest = kind = None
    if data_path is not None:
        if os.path.exists(data_path):
            manifest, kind = _read_data(data_path)
        elif not explicit:
            raise FileNotFoundError(f"--load {ckpt} was trained on --data-path {data_path}, which is not there; "
                                    f"give its encoders with {NEEDS_FOLDERS} (and the size with --height/--width)")
    elif not explicit:
        data_path = str(build_builtin_shards())
        manifest, kind = _read_data(data_path)
        shape = manifest.get("image_shape") or [None, 0, 0]
        if (manifest["context_dim"], shape[0]) != (config.context_dim, config.latent_channels) \
                or shape[1] % config.patch_size or shape[2] % config.patch_size:
            raise ValueError(f"--load {ckpt} records no training data and does not fit the built-in dataset "
                             f"(text width {config.context_dim}, {config.latent_channels} latent channels, patch "
                             f"size {config.patch_size}; the built-in data: {manifest['context_dim']}, {shape[0]}, "
                             f"{shape[1]}x{shape[2]} images): give its encoders with {NEEDS_FOLDERS}")
    where = f"--data-path {data_path} (the data of --load {ckpt})"
    recorded_vae = (manifest or {}).get("vae") if isinstance((manifest or {}).get("vae"), dict) else {}

    # text encoder
    if text_encoder is None:
        recorded = (manifest or {}).get("text_encoder")
        if kind == "shards":  # MiniLM states, unless their width says otherwise
            if manifest["context_dim"] != ENCODER_DIM:
                raise ValueError(f"{where} holds {manifest['context_dim']}-wide text states of an encoder it does "
                                 "not record (not MiniLM's); give it with --text-encoder DIR or --pipeline DIR")
            text_encoder = "minilm"
        elif isinstance(recorded, dict) and recorded.get("kind") == "minilm":
            text_encoder = "minilm"
        elif isinstance(recorded, dict):
            raise ValueError(f"{where} was encoded with the text encoder {recorded.get('name')!r} "
                             f"({recorded.get('model_type') or recorded.get('kind')}); give its folder with "
                             "--text-encoder DIR or --pipeline DIR")
        else:
            raise ValueError(f"no text encoder for --load {ckpt}: give one with --text-encoder DIR or --pipeline DIR")
    recorded = (manifest or {}).get("text_encoder")
    # Sana's complex human instruction: the pipeline's default, unless the data was encoded without
    # it (a manifest that does not record one predates it: encoded without)
    instruction = True
    if kind == "latent" and isinstance(recorded, dict) and recorded.get("kind") == "transformers":
        instruction = bool(recorded.get("complex_human_instruction"))
    info = text_encoder_info(text_encoder, instruction)
    te_name = "minilm" if text_encoder == "minilm" else f"{te_flag} {text_encoder}"
    if info["dim"] != config.context_dim:
        raise ValueError(f"{te_name} gives {info['dim']}-wide text states; the model of --load {ckpt} takes "
                         f"{config.context_dim}")
    if kind == "latent" and isinstance(recorded, dict):
        for key in ("kind", "model_type", "template"):
            if key in recorded and recorded[key] != info.get(key):
                raise ValueError(f"{te_name} is not the text encoder of {where}: {key} {info.get(key)!r} vs the "
                                 f"data's {recorded[key]!r}")

    # VAE
    if vae is None:
        if kind == "shards":
            vae = "none"
        elif kind == "latent" and recorded_vae.get("cls") == "none":
            vae = "none"
        elif kind == "latent":
            raise ValueError(f"{where} holds latents of the VAE {recorded_vae.get('name')!r} "
                             f"({recorded_vae.get('cls')}); give its folder with --vae DIR or --pipeline DIR")
        else:
            raise ValueError(f"no VAE for --load {ckpt}: give one with --vae DIR (or 'none') or --pipeline DIR")
    vae_name = f"{vae_flag} {vae}"
    if vae == "none":
        channels = config.latent_channels
        if kind == "shards" and manifest.get("image_shape"):
            channels = manifest["image_shape"][0]
        elif kind == "latent":
            channels = recorded_vae.get("image_channels", channels)
        if channels not in (1, 3):
            raise ValueError(f"--vae none: the model of --load {ckpt} makes {channels}-channel latents, not images "
                             "(1 or 3 channels); give its VAE with --vae DIR or --pipeline DIR")
        geom = vae_geometry("none", channels)
    else:
        geom = vae_geometry(vae, 3)
    if kind == "latent":
        why = geometry_mismatch(geom, recorded_vae)
        if why:
            raise ValueError(f"{vae_name} does not decode the latents of {where}: {why}")
    if geom["latent_channels"] != config.latent_channels:
        raise ValueError(f"{vae_name} has {geom['latent_channels']} latent channels; the model of --load {ckpt} "
                         f"makes {config.latent_channels}")

    # defaults
    inputs = SamplingInputs(text_encoder=text_encoder, tokenizer=tokenizer, vae=vae, geom=geom,
                            complex_human_instruction=instruction,
                            max_text_len=max_text_len or (manifest or {}).get("max_text_len")
                            or info["default_max_text_len"],
                            default_grid=_family_grid(config, geom["factor"]),
                            data_path=data_path if manifest else None, manifest=manifest)
    if kind == "latent":
        inputs.default_grid = _square_bucket(manifest.get("used_buckets") or manifest["buckets"])
    elif kind == "shards" and manifest.get("image_shape"):
        inputs.default_grid = tuple(manifest["image_shape"][1:])
    if manifest is not None:
        inputs.dataset = manifest.get("dataset")
        if manifest.get("class_prompts"):
            inputs.prompts = list(manifest["class_prompts"])
            inputs.labels = np.arange(len(inputs.prompts))
        else:
            names = [s.get("name") for s in _shard_entries(manifest, kind)]
            inputs.prompts = dataset_captions(data_path, names, DEFAULT_CAPTIONS) or None
    return inputs


def _shard_entries(manifest: dict, kind: str) -> list:
    if kind == "latent":
        return [s for s in manifest.get("shards", []) if isinstance(s, dict)]
    train = (manifest.get("splits") or {}).get("train") or {}
    return [s for s in train.get("shards", []) if isinstance(s, dict)]


def latent_grid(inputs: SamplingInputs, config, height: Optional[int] = None, width: Optional[int] = None,
                grid: Optional[str] = None) -> Tuple[int, int]:
    """The latent (height, width) from --height/--width (pixels) or --grid HxW (latents), else the default."""
    p, f = config.patch_size, inputs.geom["factor"]
    if grid is not None and (height is not None or width is not None):
        raise ValueError("--grid and --height/--width both give the size: give one of them")
    if grid is not None:
        try:
            h, w = (int(v) for v in grid.lower().split("x"))
        except ValueError:
            raise ValueError(f"--grid {grid!r}: expected HxW in latents, e.g. 64x64") from None
        if h < 1 or w < 1 or h % p or w % p:
            raise ValueError(f"--grid {grid}: sides must be positive multiples of the model's patch size {p}")
        return h, w
    if height is None and width is None:
        return tuple(inputs.default_grid)
    if height is None or width is None:
        raise ValueError("--height and --width go together (pixels); give both")
    step = f * p
    for flag, value in (("--height", height), ("--width", width)):
        if value < 1 or value % step:
            raise ValueError(f"{flag} {value}: must be a positive multiple of {step} (the VAE's downsampling {f} x "
                             f"the model's patch size {p})")
    return height // f, width // f
