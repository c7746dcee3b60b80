"""Images + captions -> `megatron_apex.latent_shards.v1` shards for `--data-path` (docs/data.md).

    python tools/prepare_data.py --input images/ --output data/mine --vae path/to/vae_folder \
        --resolution 256 --samples-per-shard 1000 --workers 4
    python tools/prepare_data.py --input captions.jsonl --output data/pixels --vae none \
        --channels 1 --resolution 28 --patch-size 4
    # one process per GPU, each encoding its share of the shards
    torchrun --nproc-per-node 8 tools/prepare_data.py --input images/ --output data/qwen \
        --vae ckpt/qwen-image/vae --text-encoder ckpt/qwen-image/text_encoder --resolution 1024

A rerun with the same inputs and settings keeps the finished shards and writes the rest.
"""

import sys

from megatron_apex.cli import OneLineErrorParser
from megatron_apex.data.prepare import PrepareConfig, prepare


def parse_args(argv=None) -> PrepareConfig:
    p = OneLineErrorParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", action="append", required=True,
                   help="image folder (captions in <stem>.txt or <stem>.json {\"caption\": ...}), tar file of "
                        'those, or jsonl of {"path", "caption"}; repeat for several')
    p.add_argument("--output", required=True, help="folder for manifest.json and the shards")
    p.add_argument("--vae", default="none",
                   help="local diffusers folder of an AutoencoderKL, AutoencoderKLQwenImage (Qwen-Image) or "
                        "AutoencoderDC (Sana), or 'none' (pixels in [-1, 1])")
    p.add_argument("--text-encoder", default="minilm",
                   help="'minilm', or a local transformers folder with its tokenizer (Qwen2.5-VL: the Qwen-Image "
                        "prompt template; Gemma-2: Sana's, with its complex human instruction; any other: its last "
                        "hidden state)")
    p.add_argument("--resolution", type=int, default=256, help="bucket area ~ resolution^2 pixels")
    p.add_argument("--patch-size", type=int, default=2, help="latent sides are multiples of this")
    p.add_argument("--channels", type=int, default=3, choices=[1, 3], help="pixel channels with --vae none")
    p.add_argument("--max-text-len", type=int, default=None,
                   help="text tokens kept per caption (default: 300 for Gemma-2 / Sana, 256 otherwise, as the "
                        "recipes' TEXT_LEN)")
    p.add_argument("--no-complex-human-instruction", action="store_true",
                   help="Gemma-2 (Sana): encode the bare captions, without SanaPipeline's default instruction")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda or cuda:N for the encoders (default: cuda when available, else cpu; under "
                        "torchrun 'cuda' is cuda:LOCAL_RANK)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="encoder dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--decoder", default="auto", choices=["auto", "pil", "dali"],
                   help="image decoding and resizing: PIL, or NVIDIA DALI (GPU; its CPU operators with --device "
                        "cpu). Default: DALI on a GPU when installed, else PIL")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1,
                   help="processes per torchrun rank, one shard each at a time (CPU; on GPUs use torchrun)")
    p.add_argument("--compress", action="store_true", help="gzip the shards")
    p.add_argument("--vae-batch-size", type=int, default=16)
    p.add_argument("--text-batch-size", type=int, default=64)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    return PrepareConfig(inputs=a.input, output=a.output, vae=a.vae, text_encoder=a.text_encoder,
                         resolution=a.resolution, patch_size=a.patch_size, channels=a.channels,
                         max_text_len=a.max_text_len, samples_per_shard=a.samples_per_shard, workers=a.workers,
                         compress=a.compress, vae_batch_size=a.vae_batch_size, text_batch_size=a.text_batch_size,
                         progress=not a.no_progress, device=a.device, dtype=a.dtype, decoder=a.decoder,
                         complex_human_instruction=not a.no_complex_human_instruction)


def main(argv=None) -> int:
    try:
        prepare(parse_args(argv))
    except (ValueError, FileNotFoundError) as err:
        print(f"prepare_data.py: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
