"""Sample a trained checkpoint: `PREFIX.png` (a grid, one row per prompt), `PREFIX/` (one PNG per
image, `PPP_KKK.png` = prompt PPP, sample KKK) and `PREFIX.npz` (`images` uint8 N x H x W x C,
`prompts`, and `labels` for the built-in class prompts).

    python tools/sample.py --load runs/apex-tiny --nfe 1 --out runs/apex-tiny/samples_nfe1
    python tools/sample.py --load runs/qwen --pipeline Qwen-Image/ --prompt "a red fox" --height 1024 \\
        --width 768 --nfe 4 --out runs/qwen/fox

Every model family and every kind of checkpoint: trained (on the built-in data or on
tools/prepare_data.py shards), imported with tools/convert_hf.py, or a LoRA run (loaded with the
base it records, or --pretrained-checkpoint BASE). Text states and latents come from the encoders
the run's data was prepared with (megatron_apex/data/encoders.py), decoded by its VAE as the
diffusers pipelines decode: the data's manifest records which; their folders are given with
--pipeline DIR (a diffusers pipeline folder: text_encoder/, tokenizer/, vae/) or --text-encoder
DIR and --vae DIR (megatron_apex/inference/sampling_inputs.py). On a GPU the model and VAE run
in bf16, on the CPU in float32.
"""

import argparse
import os
import re
import shutil
import sys

import numpy as np
import torch

from megatron_apex.cli import OneLineErrorParser, add_progress_option, show_progress

IMAGE_NAME = re.compile(r"\d{3,}_\d{3,}\.png")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv=None):
    from megatron_apex.inference.loading import WEIGHTS
    from megatron_apex.inference.samplers import METHODS

    p = OneLineErrorParser(prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="save directory (follows its `latest`) or one iter_* directory")
    p.add_argument("--nfe", type=_positive_int, default=1, help="number of function evaluations (steps)")
    p.add_argument("--num-per-prompt", type=_positive_int, default=8)
    p.add_argument("--seed", type=int, default=0, help="names every image of the call: all noise is drawn from it")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.png, PREFIX/ and PREFIX.npz")
    p.add_argument("--method", default="flowmap", choices=METHODS, help=" | ".join(METHODS))
    p.add_argument("--weights", default="auto", choices=WEIGHTS,
                   help="auto (EMA when the checkpoint has it) | ema | model")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line; default: the data's class "
                   "prompts, else its first captions")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance scale (1 = off; a model trained with --caption-dropout)")
    p.add_argument("--pretrained-checkpoint", default=None,
                   help="LoRA runs: the base weights (default: the base recorded in the checkpoint)")
    enc = p.add_argument_group("encoders (default: the run's data; see the module doc)")
    enc.add_argument("--pipeline", default=None, help="a diffusers pipeline folder: text_encoder/, tokenizer/, vae/")
    enc.add_argument("--text-encoder", default=None, help="a transformers folder (tokenizer inside or in "
                     "../tokenizer), or 'minilm'")
    enc.add_argument("--vae", default=None, help="a diffusers autoencoder folder, or 'none' (pixels)")
    enc.add_argument("--max-text-len", type=_positive_int, default=None,
                     help="text tokens kept per prompt (default: the data's, else the pipeline's)")
    size = p.add_argument_group("image size (default: the data's square bucket, else the pipeline's)")
    size.add_argument("--height", type=_positive_int, default=None, help="pixels")
    size.add_argument("--width", type=_positive_int, default=None, help="pixels")
    size.add_argument("--grid", default=None, metavar="HxW", help="latent height x width instead")
    run = p.add_argument_group("device")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when available")
    run.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                     help="of the model and VAE; auto: bf16 on cuda, fp32 on cpu")
    run.add_argument("--batch-size", type=_positive_int, default=64, help="images per sampler batch")
    add_progress_option(p, "per-batch")
    return p.parse_args(argv)


def device_and_dtype(args):
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if args.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, torch.bfloat16 if args.dtype == "bf16" else torch.float32


def given_prompts(args):
    """--prompt and --prompts, in that order (checked before anything loads)."""
    from megatron_apex.inference.prompts import read_prompt_file

    prompts = list(args.prompt or [])
    if any(not p.strip() for p in prompts):
        raise ValueError("--prompt: an empty prompt (use --guidance-scale for the unconditional one)")
    if args.prompts:
        prompts += read_prompt_file(args.prompts)
    return prompts


def default_prompts(inputs):
    """(prompts, class ids or None) of the run's data."""
    if inputs.prompts:
        return list(inputs.prompts), inputs.labels
    where = f"--data-path {inputs.data_path}" if inputs.data_path else "the checkpoint"
    raise ValueError(f"{where} offers no default prompts; pass --prompt TEXT or --prompts FILE")


def check_image_folder(folder: str) -> None:
    """PREFIX/ is replaced only when it holds nothing but our image files."""
    if not os.path.lexists(folder):
        return
    if not os.path.isdir(folder) or os.path.islink(folder):
        raise FileExistsError(f"--out: {folder} exists and is not a folder of samples; choose another --out")
    others = [n for n in os.listdir(folder) if not IMAGE_NAME.fullmatch(n)]
    if others:
        raise FileExistsError(f"--out: {folder} holds other files ({', '.join(sorted(others)[:3])}); choose "
                              "another --out")


def encode_text(inputs, prompts, guidance: bool, device=None, dtype=None):
    """(context (N, L, D), mask (N, L), uncond (context (L, D), mask (L,)) or None) on the host;
    the empty prompt's states are the data's when it has them (what the model was trained with),
    else encoded as the pipelines encode a negative prompt."""
    from megatron_apex.data.empty_prompt import EMPTY_PROMPT, empty_prompt_context
    from megatron_apex.data.encoders import load_text_encoder
    from megatron_apex.inference.prompts import encode_prompts, pad_states

    encoder = load_text_encoder(inputs.text_encoder, device=device, dtype=dtype,
                                complex_human_instruction=inputs.complex_human_instruction, tokenizer=inputs.tokenizer)
    states = encode_prompts(encoder, prompts, inputs.max_text_len)
    if guidance and inputs.manifest is not None:
        ctx, mask = empty_prompt_context(inputs.manifest, inputs.data_path, "--guidance-scale")
        states.append(ctx[mask])
    elif guidance:
        states += encode_prompts(encoder, [EMPTY_PROMPT], inputs.max_text_len, negative=True)
    del encoder
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    length = max([inputs.pad_length or 0] + [len(s) for s in states])
    context, mask = pad_states(states, length)
    if guidance:
        return context[:-1], mask[:-1], (context[-1], mask[-1])
    return context, mask, None


def save_grid(images: np.ndarray, rows: int, path: str, max_cols: int = 10, tile: int = 256) -> None:
    """One row per prompt, its first `max_cols` samples, each scaled to about `tile` pixels on
    its long side (small images by whole multiples)."""
    from PIL import Image

    n, h, w, c = images.shape
    per_row = n // rows
    cols = min(per_row, max_cols)
    grid = images[: rows * per_row].reshape(rows, per_row, h, w, c)[:, :cols]
    if max(h, w) > tile:
        th, tw = max(1, round(h * tile / max(h, w))), max(1, round(w * tile / max(h, w)))
        small = [np.asarray(Image.fromarray(im[..., 0] if c == 1 else im).resize((tw, th), Image.BICUBIC))
                 for im in grid.reshape(-1, h, w, c)]
        grid = np.stack(small).reshape(rows, cols, th, tw, c)
        h, w = th, tw
    grid = grid.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
    scale = max(1, tile // max(h, w))
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


def save_images(images: np.ndarray, per_prompt: int, folder: str) -> None:
    """One PNG per image into `folder`, written beside it first and then swapped in."""
    from PIL import Image

    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for i, image in enumerate(images):
        p, k = divmod(i, per_prompt)
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        pil.save(os.path.join(tmp, f"{p:03d}_{k:03d}.png"))
    check_image_folder(folder)  # nothing else appeared there meanwhile
    if os.path.isdir(folder):
        old = f"{folder}.old-{os.getpid()}"
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    from megatron_apex.inference.decoding import to_uint8 as convert

    return convert(images)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_apex.data.encoders import load_vae
    from megatron_apex.inference.decoding import decode_latents
    from megatron_apex.inference.loading import load_model_for_inference, model_config_of
    from megatron_apex.inference.sampling_inputs import latent_grid, resolve
    from megatron_apex.inference.samplers import sample_seeded

    guidance = args.guidance_scale != 1.0
    try:
        prompts, labels = given_prompts(args), None
        device, dtype = device_and_dtype(args)
        check_image_folder(args.out)
        # the weights first: a broken checkpoint is named before anything else. They wait on the
        # host while the text encoder runs; the device then holds one model at a time
        model, state = load_model_for_inference(args.load, args.weights, args.pretrained_checkpoint, dtype=dtype)
        config = model_config_of(state["checkpoint"], state)
        inputs = resolve(state["checkpoint"], state, config, text_encoder=args.text_encoder, vae=args.vae,
                         pipeline=args.pipeline, max_text_len=args.max_text_len)
        grid = latent_grid(inputs, config, args.height, args.width, args.grid)
        if not prompts:
            prompts, labels = default_prompts(inputs)
        context, mask, uncond = encode_text(inputs, prompts, guidance, device, dtype)
    except (ValueError, OSError) as err:
        print(f"sample.py: error: {err}", file=sys.stderr)
        return 2

    model.to(device)
    k = args.num_per_prompt
    extra = {}
    if uncond is not None:
        extra = dict(guidance_scale=args.guidance_scale, uncond_context=uncond[0], uncond_mask=uncond[1])
    latents = sample_seeded(model, context.repeat_interleave(k, dim=0), mask.repeat_interleave(k, dim=0),
                            (config.latent_channels, *grid), nfe=args.nfe, method=args.method, seed=args.seed,
                            batch_size=args.batch_size, progress=show_progress(args), **extra)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    vae = load_vae(inputs.vae, device=device, dtype=dtype)
    images = to_uint8(decode_latents(vae, inputs.geom, latents))
    del vae

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_grid(images, len(prompts), args.out + ".png")
    save_images(images, k, args.out)
    payload = {"images": images, "prompts": np.array(np.repeat(prompts, k)), "nfe": args.nfe,
               "guidance_scale": args.guidance_scale, "method": args.method, "seed": args.seed}
    if inputs.dataset:
        payload["dataset"] = inputs.dataset
    if labels is not None:
        payload["labels"] = np.repeat(labels, k)
    tmp = args.out + ".tmp.npz"
    np.savez_compressed(tmp, **payload)
    os.replace(tmp, args.out + ".npz")
    lora = f" (LoRA on {state.get('lora_base') or 'its randomly initialised base'})" if state.get("lora") else ""
    h, w = images.shape[1:3]
    print(f"wrote {args.out}.png, {args.out}/ and {args.out}.npz ({images.shape[0]} images of {h}x{w}, "
          f"NFE={args.nfe} {args.method}, {state['weights']} weights of {state['checkpoint']}{lora}, "
          f"{device.type} {str(dtype).replace('torch.', '')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
