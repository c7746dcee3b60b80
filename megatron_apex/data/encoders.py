"""The encoders of tools/prepare_data.py: an image autoencoder and a text encoder, both optional
downloads given as local folders (nothing here reaches the network).

Image side (`--vae`): a diffusers folder saved with save_pretrained, one of
  - AutoencoderKL (SD/FLUX-style): latents = (posterior mode - shift_factor) * scaling_factor;
  - AutoencoderKLQwenImage (Qwen-Image): the image as a one-frame video, posterior mode,
    (z - latents_mean[c]) / latents_std[c] as QwenImagePipeline normalises image latents;
  - AutoencoderDC (Sana's DC-AE): encode(x).latent * scaling_factor, as SanaPipeline does;
or `none`: the pixels in [-1, 1] are the "latent" (the tiny pixel-space models).

Text side (`--text-encoder`): `minilm` (megatron_apex/data/text_encoder.py), or a transformers
folder (a pipeline's `text_encoder` folder: its tokenizer files beside the weights, or in the
pipeline's `tokenizer/` folder next to it). The
states are what the diffusers pipelines feed their transformers for the same prompt (only the
real tokens are kept; the loader pads):
  - Qwen2.5-VL (Qwen-Image): QwenImagePipeline.encode_prompt: the last hidden state of the
    prompt template, minus the template's leading tokens, at most max_length tokens;
  - Gemma-2 (Sana): SanaPipeline.encode_prompt as SanaPipeline.__call__ calls it: the caption
    lower-cased and stripped, after the complex human instruction (the pipeline's default, and
    what Sana trains with), keeping the first token and the last max_length - 1 positions of the
    padded sequence; negative prompts (the empty prompt) without the instruction, as the
    pipeline encodes them;
  - any other model: the last hidden state of the caption.

Both encoders take a device and a dtype (float32 on the CPU by default, as before).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megatron_apex.data.text_encoder import ENCODER_DIM, ENCODER_NAME, MiniLMTextEncoder

VAE_CLASSES = ("AutoencoderKL", "AutoencoderKLQwenImage", "AutoencoderDC")

# QwenImagePipeline's prompt template; its first QWEN_DROP tokens (the system part, in the Qwen2
# tokenizer) are dropped from the states
QWEN_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                 "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                 "<|im_end|>\n<|im_start|>assistant\n")
QWEN_DROP = 34
# QwenImagePipeline.tokenizer_max_length: its tokenizer cuts template + caption at this + QWEN_DROP
# tokens, and encode_prompt then keeps the first max_sequence_length states
QWEN_TOKENIZER_MAX_LENGTH = 1024

# SanaPipeline.__call__'s default complex_human_instruction (joined with newlines before each caption)
SANA_COMPLEX_HUMAN_INSTRUCTION = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing "
    "street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering "
    "glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)

# text length of each family when --max-text-len is not given: the recipes' TEXT_LEN
# (examples/recipes: Qwen-Image 256; Sana 300, SanaPipeline's max_sequence_length)
FAMILY_MAX_TEXT_LEN = {"qwen-image": 256, "sana": 300}
DEFAULT_MAX_TEXT_LEN = 256
_FAMILY_OF_MODEL_TYPE = {"qwen2_5_vl": "qwen-image", "gemma2": "sana"}


def torch_dtype(dtype):
    """None / 'float32' / 'bfloat16' / a torch.dtype -> torch.dtype (None: float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    known = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype not in known:
        raise ValueError(f"--dtype {dtype}: expected float32 or bfloat16")
    return known[dtype]


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


def load_vae(vae: str, device=None, dtype=None):
    """The diffusers module of --vae in eval mode on `device` in `dtype` (default: CPU, float32),
    or None for 'none'."""
    config = read_vae_config(vae)
    if config is None:
        return None
    import diffusers

    # the dtype at loading: diffusers keeps a class's float32-only modules in float32
    module = getattr(diffusers, config["_class_name"]).from_pretrained(vae, torch_dtype=torch_dtype(dtype))
    return module.to(device=device or "cpu").eval()


def encode_images(vae, geom: dict, pixels):
    """(B, C, H, W) float tensor in [-1, 1] -> normalised latents (B, c, H/f, W/f) float32 on the
    VAE's device (the pixels are moved there and cast to its dtype; the normalisation runs in
    float32)."""
    if vae is None:
        return pixels
    weight = next(vae.parameters())
    pixels = pixels.to(device=weight.device, dtype=weight.dtype)
    with torch.inference_mode():
        if geom["cls"] == "AutoencoderDC":
            return vae.encode(pixels).latent.float() * geom["scaling_factor"]
        if geom["cls"] == "AutoencoderKLQwenImage":
            # the posterior's mode (not a sample): latents are a function of the image
            z = vae.encode(pixels[:, :, None]).latent_dist.mode()[:, :, 0].float()
            mean = torch.tensor(geom["latents_mean"], device=z.device).view(1, -1, 1, 1)
            std = torch.tensor(geom["latents_std"], device=z.device).view(1, -1, 1, 1)
            return (z - mean) / std
        z = vae.encode(pixels).latent_dist.mode().float()
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


def text_encoder_info(text_encoder: str, complex_human_instruction: bool = True) -> dict:
    """name, kind, dim (states width), template, family (qwen-image | sana | None), the family's
    default text length and, for Sana, the complex human instruction of --text-encoder, without
    loading weights. `complex_human_instruction=False` encodes Sana captions without it."""
    if text_encoder == "minilm":
        return dict(name=ENCODER_NAME, kind="minilm", dim=ENCODER_DIM, template="", drop=0, family=None,
                    complex_human_instruction="", default_max_text_len=DEFAULT_MAX_TEXT_LEN)
    folder = Path(text_encoder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--text-encoder {text_encoder}: expected 'minilm' or a local transformers model "
                                "folder with config.json and tokenizer files")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--text-encoder {text_encoder}: config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"--text-encoder {text_encoder}: config.json is not a JSON object")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    dim = text.get("hidden_size")
    if not isinstance(dim, int):
        raise ValueError(f"--text-encoder {text_encoder}: config.json has no hidden_size")
    family = _FAMILY_OF_MODEL_TYPE.get(config.get("model_type"))
    instruction = "\n".join(SANA_COMPLEX_HUMAN_INSTRUCTION) if family == "sana" and complex_human_instruction \
        else ""
    return dict(name=os.path.basename(os.path.normpath(text_encoder)), kind="transformers",
                model_type=config.get("model_type"), dim=dim,
                template=QWEN_TEMPLATE if family == "qwen-image" else "", family=family,
                complex_human_instruction=instruction,
                default_max_text_len=FAMILY_MAX_TEXT_LEN.get(family, DEFAULT_MAX_TEXT_LEN),
                fingerprint=_folder_fingerprint(folder))


# any of these marks a folder that holds its own tokenizer
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json",
                   "spiece.model")


def has_tokenizer(folder) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_folder(text_encoder: str, tokenizer: Optional[str] = None) -> str:
    """Where the tokenizer of the text encoder folder ``text_encoder`` is: ``tokenizer`` when
    given, the folder itself when it holds tokenizer files, else a diffusers pipeline's layout,
    which keeps it apart in ``../tokenizer`` beside ``text_encoder/``."""
    if tokenizer is not None or has_tokenizer(text_encoder):
        return tokenizer or text_encoder
    sibling = Path(text_encoder).parent / "tokenizer"
    return str(sibling) if has_tokenizer(sibling) else text_encoder


class TransformersTextEncoder:
    """`encode(captions, max_length, negative=False) -> [float32 (n_i, D)]`: the real tokens'
    states of each caption, as the family's pipeline computes them (module docstring);
    `negative=True` encodes negative prompts (the empty prompt) as the pipeline encodes those."""

    def __init__(self, folder: str, device=None, dtype=None, complex_human_instruction: bool = True,
                 tokenizer: Optional[str] = None):
        import transformers

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: fail fast instead of reaching out
        info = text_encoder_info(folder, complex_human_instruction)
        self.family = info["family"]
        self.template = info["template"]
        self.instruction = info["complex_human_instruction"]
        self.device = torch.device(device or "cpu")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder(folder, tokenizer))
        # the pipelines read the states of right-padded batches: with causal attention the real
        # tokens then never see padding, so a caption's states do not depend on its batch
        self.tokenizer.padding_side = "right"
        config = transformers.AutoConfig.from_pretrained(folder)
        arch = (getattr(config, "architectures", None) or ["AutoModel"])[0]
        cls = getattr(transformers, arch, None) or transformers.AutoModel
        self.model = cls.from_pretrained(folder, dtype=torch_dtype(dtype)).to(self.device).eval()
        # a model with a language-model head (Qwen2_5_VLForConditionalGeneration): its decoder
        # alone gives the last hidden state (the pipelines' hidden_states[-1]) without the
        # vocabulary-wide logits
        self.backbone = self.model.model if hasattr(self.model, "lm_head") and hasattr(self.model, "model") \
            else self.model
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

    def _states(self, texts: list[str], limit: int):
        """(last hidden states (B, T, D) float32 on the CPU, attention mask (B, T) bool) of
        `texts` cut at `limit` tokens, right-padded to the longest."""
        enc = self.tokenizer(texts, max_length=limit, padding=True, truncation=True, add_special_tokens=True,
                             return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        with torch.inference_mode():
            out = self.backbone(input_ids=ids, attention_mask=mask)
            states = getattr(out, "last_hidden_state", None)
            if states is None:
                states = self.backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        return states.float().cpu(), enc["attention_mask"].bool()

    def encode(self, captions: list[str], max_length: int, negative: bool = False) -> list[np.ndarray]:
        if self.family == "sana":
            return self._encode_sana(captions, max_length, "" if negative else self.instruction)
        if self.template:
            # QwenImagePipeline.encode_prompt: tokens cut at its own limit, the template's system
            # part dropped, then the first max_length states kept
            states, mask = self._states([self.template.format(c) for c in captions],
                                        QWEN_TOKENIZER_MAX_LENGTH + self.drop)
            return [states[i][mask[i]][self.drop:self.drop + max_length].numpy() for i in range(len(captions))]
        states, mask = self._states(list(captions), max_length)
        return [states[i][mask[i]].numpy() for i in range(len(captions))]

    def _encode_sana(self, captions: list[str], max_length: int, instruction: str) -> list[np.ndarray]:
        """SanaPipeline.encode_prompt (clean_caption=False): the caption lower-cased and stripped,
        the instruction before it, the sequence cut at len(instruction tokens) + max_length - 2
        and padded to that length; position 0 and the last max_length - 1 positions are fed to the
        transformer, of which we keep the real ones. Without an instruction that is every real token."""
        prompts = [instruction + c.lower().strip() for c in captions]
        limit = len(self.tokenizer.encode(instruction)) + max_length - 2 if instruction else max_length
        states, mask = self._states(prompts, limit)
        first = max(1, limit - max_length + 1)  # the first of the last max_length - 1 positions
        out = []
        for i in range(len(prompts)):
            n = int(mask[i].sum())
            keep = ([0] if n else []) + list(range(first, n))
            out.append(states[i][keep].numpy())
        return out


class MiniLMStates:
    """MiniLMTextEncoder with the same interface: the real tokens' states of each caption (on the
    CPU in float32 whatever the device: the tiny models' encoder)."""

    def __init__(self):
        self.encoder = MiniLMTextEncoder()

    def encode(self, captions: list[str], max_length: int, negative: bool = False) -> list[np.ndarray]:
        states, masks = self.encoder.encode(list(captions), max_length)
        # right padding: the real tokens come first
        return [s[: int(m.sum())] for s, m in zip(states, masks)]


def load_text_encoder(text_encoder: str, device=None, dtype=None, complex_human_instruction: bool = True,
                      tokenizer: Optional[str] = None):
    """'minilm', or a transformers folder (its tokenizer: ``tokenizer_folder``)."""
    if text_encoder == "minilm":
        return MiniLMStates()
    return TransformersTextEncoder(text_encoder, device=device, dtype=dtype,
                                   complex_human_instruction=complex_human_instruction, tokenizer=tokenizer)
