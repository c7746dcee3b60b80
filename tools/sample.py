"""Sample a trained checkpoint: `PREFIX.png` (a grid, one row per prompt) and `PREFIX.npz`
(`images` uint8 N x H x W x C, `prompts`, and `labels` for the built-in class prompts).

    python tools/sample.py --load runs/apex-tiny --nfe 1 --out runs/apex-tiny/samples_nfe1

A LoRA run's checkpoint loads with the base it records (or --pretrained-checkpoint BASE).
"""

import argparse
import os
import sys

import numpy as np
import torch

from megatron_apex.cli import OneLineErrorParser


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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.png and PREFIX.npz")
    p.add_argument("--method", default="flowmap", choices=METHODS, help="flowmap | euler | renoise")
    p.add_argument("--weights", default="auto", choices=WEIGHTS,
                   help="auto (EMA when the checkpoint has it) | ema | model")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line; default: one per class")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance scale (1 = off; a model trained with --caption-dropout)")
    p.add_argument("--pretrained-checkpoint", default=None,
                   help="LoRA runs: the base weights (default: the base recorded in the checkpoint)")
    return p.parse_args(argv)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, rows: int, path: str, max_cols: int = 10) -> None:
    """One row per prompt, its first `max_cols` samples (the npz holds all of them)."""
    from PIL import Image

    n, h, w, c = images.shape
    per_row = n // rows
    cols = min(per_row, max_cols)
    grid = images[: rows * per_row].reshape(rows, per_row, h, w, c)[:, :cols]
    grid = grid.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
    scale = max(1, 256 // max(h, w))
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_apex.data.builtin import build_builtin_shards
    from megatron_apex.data.empty_prompt import empty_prompt_context
    from megatron_apex.data.shards import read_manifest
    from megatron_apex.data.text_encoder import MiniLMTextEncoder
    from megatron_apex.inference.loading import load_model_for_inference
    from megatron_apex.inference.samplers import sample_seeded

    try:
        model, state = load_model_for_inference(args.load, args.weights, args.pretrained_checkpoint)
        data_path = ((state.get("args") or {}).get("data") or {}).get("data_path") or build_builtin_shards()
        manifest = read_manifest(data_path)
        if args.prompts:
            if not os.path.isfile(args.prompts):
                raise FileNotFoundError(f"--prompts {args.prompts}: no such file")
            prompts = [line.strip() for line in open(args.prompts) if line.strip()]
            if not prompts:
                raise ValueError(f"--prompts {args.prompts}: no prompts in the file")
            labels = None
        elif manifest.get("class_prompts"):
            prompts = list(manifest["class_prompts"])
            labels = np.arange(len(prompts))
        else:
            raise ValueError(f"{data_path} has no class prompts; pass --prompts FILE")
        uncond = {}
        if args.guidance_scale != 1.0:
            uc, um = empty_prompt_context(manifest, str(data_path), "--guidance-scale")
            uncond = dict(guidance_scale=args.guidance_scale, uncond_context=torch.from_numpy(uc),
                          uncond_mask=torch.from_numpy(um))
    except (ValueError, FileNotFoundError) as err:
        print(f"sample.py: error: {err}", file=sys.stderr)
        return 2

    encoder = MiniLMTextEncoder()
    context, mask = encoder.encode(prompts, max_length=int(manifest["max_text_len"]))
    context, mask = torch.from_numpy(context), torch.from_numpy(mask)
    k = args.num_per_prompt
    context = context.repeat_interleave(k, dim=0)
    mask = mask.repeat_interleave(k, dim=0)
    images = to_uint8(sample_seeded(model, context, mask, manifest["image_shape"], nfe=args.nfe,
                                    method=args.method, seed=args.seed, **uncond))

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_grid(images, len(prompts), args.out + ".png")
    payload = {"images": images, "prompts": np.array(np.repeat(prompts, k)), "nfe": args.nfe,
               "guidance_scale": args.guidance_scale}
    if manifest.get("dataset"):
        payload["dataset"] = manifest["dataset"]
    if labels is not None:
        payload["labels"] = np.repeat(labels, k)
    tmp = args.out + ".tmp.npz"
    np.savez_compressed(tmp, **payload)
    os.replace(tmp, args.out + ".npz")
    lora = f" (LoRA on {state.get('lora_base') or 'its randomly initialised base'})" if state.get("lora") else ""
    print(f"wrote {args.out}.png and {args.out}.npz ({images.shape[0]} images, NFE={args.nfe}, "
          f"{state['weights']} weights of {state['checkpoint']}{lora})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
