"""The encoders of tools/prepare_data.py: an image autoencoder and a text encoder, both optional
downloads given as local folders (nothing here reaches the network).

Image side (`--vae`): a diffusers folder saved with save_pretrained, one of
  - AutoencoderKL (SD/FLUX-style): latents = (posterior mode - shift_factor) * scaling_factor;
  - AutoencoderKLQwenImage (Qwen-Image): the image as a one-frame video, posterior mode,
    (z - latents_mean[c]) / latents_std[c] as QwenImagePipeline normalises image latents;
  - AutoencoderDC (Sana's DC-AE): encode(x).latent * scaling_factor, as SanaPipeline does;
or `none`: the pixels in [-1, 1] are the "latent" (the tiny pixel-space models).

Text side (`--text-encoder`): `minilm` (megatron_apex/data/text_encoder.py), or a transformers
folder (a pipeline's `text_encoder` folder with its tokenizer files beside the weights). The
states are what the diffusers pipelines feed their transformers: for Qwen2.5-VL the last hidden
state of the Qwen-Image prompt template, minus the template's leading tokens
(QwenImagePipeline._get_qwen_prompt_embeds); for any other model (Gemma-2 for Sana: SanaPipeline
without complex_human_instruction) the last hidden state of the caption. Only the real tokens
are kept; the loader pads.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

VAE_CLASSES = ("AutoencoderKL", "AutoencoderKLQwenImage", "AutoencoderDC")

# QwenImagePipeline's prompt template; its first QWEN_DROP tokens (the system part, in the Qwen2
# tokenizer) are dropped from the states
QWEN_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                 "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                 "<|im_end|>\n<|im_start|>assistant\n")
QWEN_DROP = 34


# ------------------------------------------------------------------------------ image side

def _class_defaults(class_name: str) -> dict:
    import diffusers

    params = inspect.signature(getattr(diffusers, class_name).__init__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def read_vae_config(vae: str) -> Optional[dict]:
    """config.json of --vae completed with the class's defaults; None for 'none'."""
    if vae == "none":
        return None
    path = Path(vae) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--vae {vae}: no config.json (expected a local diffusers autoencoder folder "
                                f"saved with save_pretrained: {', '.join(VAE_CLASSES)}; or 'none')")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--vae {vae}: config.json is not valid JSON ({exc})") from None
    cls = config.get("_class_name") if isinstance(config, dict) else None
    if cls not in VAE_CLASSES:
        raise ValueError(f"--vae {vae}: is a {cls}, expected one of {', '.join(VAE_CLASSES)}")
    return {**_class_defaults(cls), **config}


def vae_geometry(vae: str, channels: int) -> dict:
    """class, downsampling factor, latent and image channels, normalisation of --vae."""
    config = read_vae_config(vae)
    if config is None:
        if channels not in (1, 3):
            raise ValueError(f"--channels must be 1 or 3, got {channels}")
        return dict(name="none", cls="none", factor=1, latent_channels=channels, image_channels=channels,
                    scaling_factor=1.0, shift_factor=0.0)
    cls = config["_class_name"]
    geom = dict(name=os.path.basename(os.path.normpath(vae)), cls=cls)
    if cls == "AutoencoderKL":
        geom.update(factor=2 ** (len(config["block_out_channels"]) - 1), latent_channels=int(config["latent_channels"]),
                    image_channels=int(config["in_channels"]), scaling_factor=float(config["scaling_factor"] or 1.0),
                    shift_factor=float(config["shift_factor"] or 0.0))
    elif cls == "AutoencoderKLQwenImage":
        z = int(config["z_dim"])
        mean, std = list(map(float, config["latents_mean"])), list(map(float, config["latents_std"]))
        if len(mean) != z or len(std) != z:
            raise ValueError(f"--vae {vae}: latents_mean/latents_std need z_dim={z} entries")
        geom.update(factor=2 ** len(config["temperal_downsample"]), latent_channels=z,
                    image_channels=int(config["input_channels"]), latents_mean=mean, latents_std=std)
    else:  # AutoencoderDC
        geom.update(factor=2 ** (len(config["encoder_block_out_channels"]) - 1),
                    latent_channels=int(config["latent_channels"]), image_channels=int(config["in_channels"]),
                    scaling_factor=float(config["scaling_factor"]))
    if geom["image_channels"] not in (1, 3):
        raise ValueError(f"--vae {vae}: takes {geom['image_channels']}-channel images; only 1 (grey) or 3 (RGB) "
                         "are supported")
    return geom


def load_vae(vae: str):
    """The diffusers module of --vae in float32 eval mode, or None for 'none'."""
    config = read_vae_config(vae)
    if config is None:
        return None
    import diffusers

    return getattr(diffusers, config["_class_name"]).from_pretrained(vae).float().eval()


def encode_images(vae, geom: dict, pixels):
    """(B, C, H, W) float32 tensor in [-1, 1] -> normalised latents (B, c, H/f, W/f) float32."""
    import torch

    if vae is None:
        return pixels
    with torch.inference_mode():
        if geom["cls"] == "AutoencoderDC":
            return vae.encode(pixels).latent * geom["scaling_factor"]
        if geom["cls"] == "AutoencoderKLQwenImage":
            # the posterior's mode (not a sample): latents are a function of the image
            z = vae.encode(pixels[:, :, None]).latent_dist.mode()[:, :, 0]
            mean = torch.tensor(geom["latents_mean"]).view(1, -1, 1, 1)
            std = torch.tensor(geom["latents_std"]).view(1, -1, 1, 1)
            return (z - mean) / std
        z = vae.encode(pixels).latent_dist.mode()
        return (z - geom["shift_factor"]) * geom["scaling_factor"]


# ------------------------------------------------------------------------------ text side

def _folder_fingerprint(folder: Path) -> str:
    """Names, sizes and config contents of a model folder: changes when the model does."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        h.update(f"{rel}:{path.stat().st_size}\n".encode())
        if path.suffix == ".json":
            h.update(path.read_bytes())
    return h.hexdigest()


def text_encoder_info(text_encoder: str) -> dict:
    """name, kind, dim (states width), template and drop of --text-encoder, without loading weights."""
    if text_encoder == "minilm":
        from megatron_apex.data.text_encoder import ENCODER_DIM, ENCODER_NAME

        return dict(name=ENCODER_NAME, kind="minilm", dim=ENCODER_DIM, template="", drop=0)
    folder = Path(text_encoder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--text-encoder {text_encoder}: expected 'minilm' or a local transformers model "
                                "folder with config.json and tokenizer files")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--text-encoder {text_encoder}: config.json is not valid JSON ({exc})") from None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    dim = text.get("hidden_size")
    if not isinstance(dim, int):
        raise ValueError(f"--text-encoder {text_encoder}: config.json has no hidden_size")
    qwen = config.get("model_type") == "qwen2_5_vl"
    return dict(name=os.path.basename(os.path.normpath(text_encoder)), kind="transformers",
                model_type=config.get("model_type"), dim=dim, template=QWEN_TEMPLATE if qwen else "",
                fingerprint=_folder_fingerprint(folder))


class TransformersTextEncoder:
    """`encode(captions, max_length) -> [float32 (n_i, D)]`: the real tokens' states of each caption."""

    def __init__(self, folder: str):
        import torch
        import transformers

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: fail fast instead of reaching out
        info = text_encoder_info(folder)
        self.template = info["template"]
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        # the pipelines read the states of right-padded batches: with causal attention the real
        # tokens then never see padding, so a caption's states do not depend on its batch
        self.tokenizer.padding_side = "right"
        config = transformers.AutoConfig.from_pretrained(folder)
        arch = (getattr(config, "architectures", None) or ["AutoModel"])[0]
        cls = getattr(transformers, arch, None) or transformers.AutoModel
        self.model = cls.from_pretrained(folder, dtype=torch.float32).eval()
        self.drop = 0
        if self.template:
            # QwenImagePipeline drops 34 tokens: the template's system part in the Qwen2 tokenizer;
            # another tokenizer (tests) drops its own count of those tokens
            prefix = self.template.split("{}")[0]
            self.drop = QWEN_DROP if type(self.tokenizer).__name__.startswith("Qwen2") else len(
                self.tokenizer(prefix, add_special_tokens=True)["input_ids"]) - self._trailing_specials()

    def _trailing_specials(self) -> int:
        with_special = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        lead = with_special.index(plain[0]) if plain and plain[0] in with_special else 0
        return len(with_special) - len(plain) - lead

    def encode(self, captions: list[str], max_length: int) -> list[np.ndarray]:
        import torch

        texts = [self.template.format(c) for c in captions] if self.template else list(captions)
        enc = self.tokenizer(texts, max_length=max_length + self.drop, padding=True, truncation=True,
                             return_tensors="pt")
        with torch.inference_mode():
            out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             output_hidden_states=True)
        states = out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]
        mask = enc["attention_mask"].bool()
        return [states[i][mask[i]][self.drop:].float().numpy() for i in range(len(texts))]


class MiniLMStates:
    """MiniLMTextEncoder with the same interface: the real tokens' states of each caption."""

    def __init__(self):
        from megatron_apex.data.text_encoder import MiniLMTextEncoder

        self.encoder = MiniLMTextEncoder()

    def encode(self, captions: list[str], max_length: int) -> list[np.ndarray]:
        states, masks = self.encoder.encode(list(captions), max_length)
        # right padding: the real tokens come first
        return [s[: int(m.sum())] for s, m in zip(states, masks)]


def load_text_encoder(text_encoder: str):
    return MiniLMStates() if text_encoder == "minilm" else TransformersTextEncoder(text_encoder)
