"""Images + captions -> `megatron_apex.latent_shards.v1` shards of pre-encoded latents and text states.

Inputs (any mix, each `--input`): a folder (PNG/JPEG files, captions in a sidecar `<stem>.txt`;
tar files inside it are read too), a tar file of such pairs, or a jsonl of
{"path", "caption"} lines (paths relative to the jsonl's folder).

Inputs never lead outside their folder (the folder given, or the jsonl's folder): an image,
caption or tar file there that is a symbolic link to a place outside it, or a hard link (its
other names may lie anywhere), is skipped and listed with the reason, as is a jsonl path outside
the jsonl's folder; link members of a tar are never followed, and are skipped and listed too.

Output folder: `manifest.json` + `shard-NNNNNN.tar` (+ `.tar.gz` with compress) + one
`shard-NNNNNN.json` per shard (its manifest entry, with the inputs it skipped) + one
`shard-NNNNNN.idx.npy` per shard (where each sample's members lie, its latent grid and text
length: the loader's start-up reads these instead of the tar headers). Per sample (webdataset
key = the input's index in the sorted input list, 8 digits): `latent.npy` float16 (C, h, w),
`ctx.npy` float16 (n, D) the n real text tokens, `mask.npy` bool (n,), `txt` the caption, `json`
{"original_size": [H, W], "bucket": [h, w] pixels, "latent_size": [h', w'], "source": input name}.
`empty_prompt.npy` float16 (n, D): the text encoder's states of the empty prompt, for caption
dropout and classifier-free guidance.

Encoders run on `--device` (a GPU when there is one) in `--dtype` (bfloat16 on a GPU, float32 on
the CPU); images are decoded and resized by PIL, or by NVIDIA DALI on the GPU when it is installed
(megatron_apex/data/dali_decode.py). Under torchrun each process builds the shards s with
s % WORLD_SIZE == RANK on its own GPU, and rank 0 writes the manifest once all are done.

Determinism: the input list is sorted; input i goes to shard i // samples_per_shard whether or
not it decodes (a skipped input leaves its shard one sample shorter, so later shards never
move); tar members carry mtime 0, uid/gid 0, no user names; gzip mtime 0. A rerun keeps every
shard whose tar, index and entry exist (written to temporary names, then renamed) and rebuilds
the rest byte for byte, as long as the inputs and settings are the same (a signature in every
entry; a mismatch is an error, not a silent mix). Encoders run with a fixed batch composition
per shard, so a shard's bytes depend neither on which process builds it nor on how many there
are (with the same device kind, dtype, decoder and thread count).

Modules, bottom up: config (the settings), inputs (listing the inputs, reading one), encode
(decoding the images, the encoders), shard (one shard), run (the whole run, torchrun's ranks);
the format's names and index columns, shared with the loader: megatron_apex/data/latent_format.py.
"""

from megatron_apex.data.prepare.config import PrepareConfig, resolve_decoder, resolve_device, resolve_dtype
from megatron_apex.data.prepare.inputs import InputItem, list_inputs
from megatron_apex.data.prepare.run import prepare, resolve_config
from megatron_apex.data.prepare.shard import build_shard

__all__ = ["InputItem", "PrepareConfig", "build_shard", "list_inputs", "prepare", "resolve_config",
           "resolve_decoder", "resolve_device", "resolve_dtype"]
