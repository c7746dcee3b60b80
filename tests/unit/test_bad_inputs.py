"""Every bad input we tried, fed to the entry point a user reaches it through: each fails with
ONE line naming the offending flag, file or key, and a clear error type (ValueError and its
file-system cousins, or exit code 2 with the line on stderr for the command-line tools).

One table, one parametrised test per row. docs/bad_inputs.md is generated from this table with
the messages the code produces today:

    python tests/unit/test_bad_inputs.py docs/bad_inputs.md

Fixtures are tiny and built once per module: a 4-sample shard set, three 1-iteration checkpoints
of qwen-image-tiny-test (a base, another base, a LoRA on the first) and a diffusers folder of a
2-layer Qwen-Image transformer; each row copies what it breaks into its own tmp_path.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import io
import json
import os
import pickle
import shutil
import sys
import tarfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------- entry points


def _load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Tools:
    """The command-line entry points, imported from their files once (they are scripts)."""

    @cached_property
    def pretrain(self):
        return _load_script(REPO / "examples" / "pretrain_apex_dit.py", "bad_inputs_pretrain")

    @cached_property
    def convert_hf(self):
        return _load_script(REPO / "tools" / "convert_hf.py", "bad_inputs_convert_hf")

    @cached_property
    def sample(self):
        return _load_script(REPO / "tools" / "sample.py", "bad_inputs_sample")

    @cached_property
    def evaluate(self):
        return _load_script(REPO / "tools" / "evaluate.py", "bad_inputs_evaluate")

    @cached_property
    def export_lora(self):
        return _load_script(REPO / "tools" / "export_lora.py", "bad_inputs_export_lora")


TOOLS = Tools()

# ----------------------------------------------------------------------------- fixtures

TEXT_DIM, TEXT_LEN = 24, 4  # qwen-image-tiny-test's joint_attention_dim; tokens per caption
LORA_FLAGS = ["--lora-rank", "2", "--lora-targets", "attn"]
HF_ARCH = dict(patch_size=2, in_channels=8, out_channels=2, num_layers=2, attention_head_dim=8,
               num_attention_heads=4, joint_attention_dim=12, axes_dims_rope=(2, 2, 4))


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=array.dtype.hasobject)
    return buf.getvalue()


def good_members(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {"image.npy": npy(rng.integers(0, 256, (1, 8, 8), dtype=np.uint8)),
            "ctx.npy": npy(rng.standard_normal((2, TEXT_DIM)).astype(np.float16)),
            "mask.npy": npy(np.ones(2, dtype=bool)), "txt": f"caption {i}".encode(), "cls": str(i % 2).encode()}


def write_raw_dataset(root: Path, samples: list, manifest_edits: Optional[dict] = None,
                      member_names: Optional[Callable[[str], str]] = None) -> Path:
    """A one-shard dataset whose tar members are exactly ``samples`` ({ext: bytes} per sample),
    with a correct manifest (then ``manifest_edits``): how a broken sample reaches the reader."""
    from megatron_apex.data.shard_writer import SHARD_FORMAT, write_manifest

    root.mkdir(parents=True, exist_ok=True)
    shard = root / "train-000000.tar.gz"
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for i, members in enumerate(samples):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:07d}.{ext}" if member_names is None else member_names(f"{i:07d}.{ext}"))
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    shard.write_bytes(gzip.compress(raw.getvalue(), mtime=0))
    entry = dict(name=shard.name, count=len(samples), sha256=hashlib.sha256(shard.read_bytes()).hexdigest(),
                 bytes=shard.stat().st_size)
    manifest = dict(format=SHARD_FORMAT, splits={"train": dict(count=len(samples), shards=[entry])},
                    max_text_len=TEXT_LEN, context_dim=TEXT_DIM, image_shape=[1, 8, 8])
    manifest.update(manifest_edits or {})
    write_manifest(root, manifest)
    return root


class Assets:
    """Good inputs, built on first use; rows copy and break them."""

    def __init__(self, root: Path):
        self.root = root

    @cached_property
    def dataset(self) -> Path:
        return write_raw_dataset(self.root / "data", [good_members(i) for i in range(4)])

    @property
    def train_flags(self) -> list:
        """A valid one-iteration run on the tiny dataset: each row adds the one bad flag."""
        return ["--model", "qwen-image-tiny-test", "--micro-batch-size", "2", "--global-batch-size", "2",
                "--train-iters", "1", "--log-interval", "1", "--no-progress", "--data-path", str(self.dataset)]

    def _train(self, name: str, *flags) -> Path:
        from megatron_apex.training.arguments import parse_args
        from megatron_apex.training.loop import Trainer

        save = self.root / name
        Trainer(parse_args([*self.train_flags, "--save", str(save), *flags])).train()
        return save

    @cached_property
    def base(self) -> Path:
        return self._train("base", "--seed", "7")

    @cached_property
    def other_base(self) -> Path:
        return self._train("other_base", "--seed", "8")

    @cached_property
    def lora(self) -> Path:
        return self._train("lora", *LORA_FLAGS, "--pretrained-checkpoint", str(self.base))

    @cached_property
    def hf_folder(self) -> Path:
        import torch
        from diffusers import QwenImageTransformer2DModel

        torch.manual_seed(0)
        path = self.root / "hf" / "transformer"
        QwenImageTransformer2DModel(**HF_ARCH).save_pretrained(path)
        return path


# ----------------------------------------------------------------------------- observing a failure

CLEAR_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)


@dataclass
class Outcome:
    kind: str      # the exception's type, "exit N" for a tool that printed and returned, or "no error"
    message: str   # the exception's text, or the tool's stderr lines holding "error:"
    clear: bool    # a clear error type (CLEAR_ERRORS, or exit code 2 without a traceback)


def observe(call: Callable[[], object]) -> Outcome:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = call()
    except SystemExit as exc:  # argparse
        code = exc.code
    except CLEAR_ERRORS as exc:
        return Outcome(type(exc).__name__, str(exc), True)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - an unclear error (torch's CheckpointException is a BaseException)
        return Outcome(type(exc).__name__, str(exc), False)
    if code in (None, 0):
        return Outcome("no error", err.getvalue()[-2000:], False)
    text = err.getvalue()
    lines = [line for line in text.splitlines() if "error:" in line]
    # stderr may also hold Python warnings; a traceback or argparse's usage dump makes it more than one line
    dumped = "Traceback" in text or any(line.startswith("usage:") for line in text.splitlines())
    return Outcome(f"exit {code}", "\n".join(lines) or text[-2000:], code == 2 and not dumped)


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    id: str
    input: str                          # what was tried (docs column 1)
    given: str                          # where it is given (docs column 2)
    needles: Tuple[str, ...]            # the offending item's name(s): all must be in the line
    run: Callable[[Assets, Path], object]
    xfail: Optional[str] = None         # a known bad error, left for the owner of that code
    absent: Optional[str] = None        # nothing may be left at tmp_path/absent afterwards


CASES: list = []


def case(id, input, given, needles, xfail=None, absent=None):
    def register(run):
        CASES.append(Case(id, input, given, tuple([needles] if isinstance(needles, str) else needles), run,
                          xfail, absent))
        return run
    return register


@contextlib.contextmanager
def _argv0(script: str):
    """sys.argv[0] as when the script runs (a parser without its own prog prints that name)."""
    saved = sys.argv[0]
    sys.argv[0] = script
    try:
        yield
    finally:
        sys.argv[0] = saved


def train(a: Assets, *flags):
    with _argv0("examples/pretrain_apex_dit.py"):
        return TOOLS.pretrain.main([*a.train_flags, *map(str, flags)])


def dry_run(a: Assets, *flags):
    with _argv0("examples/pretrain_apex_dit.py"):
        return TOOLS.pretrain.main(["--dry-run", *a.train_flags, *map(str, flags)])


def _with_file(folder: Path, name: str, array) -> Path:
    np.save(folder / name, array)
    return folder


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- flags of the trainer (examples/pretrain_apex_dit.py, in process)
TRAIN = "`pretrain_apex_dit.py` flag"

for _id, _argv, _needle, _what in [
    ("flag-unknown-model", ["--model", "qwen-image-7b"], "--model", "an unknown registry model"),
    ("flag-unknown-flag", ["--no-such-flag"], "--no-such-flag", "a flag that does not exist"),
    ("flag-not-an-int", ["--micro-batch-size", "two"], "--micro-batch-size", "a word for an integer flag"),
    ("flag-tp-zero", ["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size", "tensor parallel size 0"),
    ("flag-train-iters-zero", ["--train-iters", "0"], "--train-iters", "0 training iterations"),
    ("flag-pp-not-dividing-layers", ["--pipeline-model-parallel-size", "3"], "--pipeline-model-parallel-size",
     "3 pipeline stages for 2 layers"),
    ("flag-batch-not-divisible", ["--micro-batch-size", "3", "--global-batch-size", "8"], "--global-batch-size",
     "global batch 8 with micro batch 3"),
    ("flag-num-heads-zero", ["--num-attention-heads", "0"], "--num-attention-heads", "0 attention heads"),
    ("flag-ema-decay-one", ["--ema-decay", "1.5"], "--ema-decay", "EMA decay outside [0, 1)"),
    ("flag-caption-dropout-one", ["--caption-dropout", "1"], "--caption-dropout", "caption dropout outside [0, 1)"),
    ("flag-unknown-objective", ["--objective", "gan"], "--objective", "an unknown objective"),
    ("flag-unknown-apex-variant", ["--apex-variant", "turbo"], "--apex-variant", "an unknown APEX variant"),
    ("flag-lam-out-of-range", ["--lam", "1.5"], "--lam", "lambda outside [0, 1]"),
    ("flag-unknown-time-sampler", ["--time-sampler", "beta"], "--time-sampler", "an unknown time sampler"),
    ("flag-apex-option-no-value", ["--apex-option", "dm_clamp"], "--apex-option", "--apex-option without =VALUE"),
    ("flag-apex-option-unknown-key", ["--apex-option", "no_such_field=1"], "no_such_field",
     "--apex-option with an unknown APEXConfig field"),
    ("flag-apex-option-bad-value", ["--apex-variant", "released", "--apex-option", "dm_clamp=abc"], "dm_clamp",
     "--apex-option with a word for a number"),
    ("flag-time-option-bad-value", ["--time-option", "t_min=2"], "--time-option", "--time-option t_min=2 (> 1)"),
    ("flag-keep-last-without-save", ["--keep-last", "2"], "--keep-last", "--keep-last without --save"),
    ("flag-keep-last-zero", ["--keep-last", "0", "--save", "/tmp/never"], "--keep-last", "--keep-last 0"),
    ("flag-exit-duration-zero", ["--exit-duration-in-mins", "0"], "--exit-duration-in-mins",
     "a zero wall-time limit"),
    ("flag-max-skipped-negative", ["--max-skipped-iters", "-1"], "--max-skipped-iters", "a negative skip limit"),
    ("flag-finetune-without-load", ["--finetune"], "--finetune", "--finetune without --load"),
    ("flag-lora-rank-negative", ["--lora-rank", "-1"], "--lora-rank", "a negative LoRA rank"),
    ("flag-lora-alpha-without-rank", ["--lora-alpha", "8"], "--lora-alpha", "--lora-alpha with LoRA off"),
    ("flag-lora-dropout-one", ["--lora-rank", "4", "--lora-dropout", "1.0"], "--lora-dropout", "LoRA dropout 1"),
    ("flag-lora-targets-empty", ["--lora-rank", "4", "--lora-targets", " , "], "--lora-targets",
     "an empty --lora-targets"),
    ("flag-lora-base-reference-fm", ["--lora-rank", "4", "--lora-fake-reference", "base", "--objective", "fm"],
     "--lora-fake-reference", "--lora-fake-reference base with flow matching"),
    ("flag-lora-base-reference-without-rank", ["--lora-fake-reference", "base"], "--lora-fake-reference",
     "--lora-fake-reference with LoRA off"),
    ("flag-lora-alpha-negative", ["--lora-rank", "4", "--lora-alpha", "-2"], "--lora-alpha", "a negative LoRA alpha"),
    ("flag-lora-init-seed-negative", ["--lora-rank", "4", "--lora-init-seed", "-3"], "--lora-init-seed",
     "a negative LoRA init seed"),
    ("flag-two-starting-weights", ["--pretrained-checkpoint", "/a", "--load", "/b", "--finetune"],
     "--pretrained-checkpoint", "--pretrained-checkpoint and --load --finetune together"),
    ("flag-tp-larger-than-world", ["--tensor-model-parallel-size", "2"], "--tensor-model-parallel-size",
     "TP 2 in a one-process run"),
    ("flag-patch-size-mismatch", ["--patch-size", "3"], "--patch-size", "a patch size the channels do not fit"),
    ("flag-batch-larger-than-data", ["--micro-batch-size", "8", "--global-batch-size", "8"], "--global-batch-size",
     "a global batch larger than the dataset"),
    ("flag-data-path-missing", ["--data-path", "/nonexistent/shards"], "--data-path", "a --data-path that does not exist"),
    ("flag-load-missing", ["--load", "/nonexistent/checkpoint"], "--load", "a --load that does not exist"),
    ("flag-abbreviated", ["--train-it", "2"], "--train-it", "an abbreviated flag (--train-it for --train-iters)"),
    ("flag-apex-start-past-end", ["--apex-start-iter", "5", "--train-iters", "2"],
     ("--apex-start-iter", "--train-iters"), "APEX starting at or past the last iteration"),
    ("flag-apex-start-negative", ["--apex-start-iter", "-1"], "--apex-start-iter", "a negative APEX start"),
    ("flag-apex-option-with-fm", ["--objective", "fm", "--apex-option", "w_dm=1"],
     ("--apex-option w_dm", "--objective fm"), "an --apex-option with flow matching"),
    ("flag-lam-with-fm", ["--objective", "fm", "--lam", "0.3"], ("--lam", "--objective fm"), "--lam with flow matching"),
    ("flag-shift-a-with-fm", ["--objective", "fm", "--shift-a", "-0.5"], ("--shift-a", "--objective fm"),
     "a fixed condition shift with flow matching"),
    ("flag-paper-option-with-released", ["--apex-variant", "released", "--lam", "0.3"],
     ("--lam", "--apex-variant released"), "a paper-variant flag with the released variant"),
    ("flag-teacher-with-paper", ["--apex-variant", "paper", "--teacher", "online"],
     ("--teacher", "--apex-variant paper"), "--teacher with the paper variant"),
    ("flag-released-option-with-paper", ["--apex-option", "w_dm=1.0"],
     ("--apex-option w_dm", "--apex-variant paper"), "a released-variant option with the paper variant (the default)"),
    ("flag-apex-option-shift", ["--apex-option", "shift_a=-0.5"], ("--apex-option shift_a", "--shift-a"),
     "the condition shift as an --apex-option"),
]:
    case(_id, _what, TRAIN, _needle)(lambda a, tmp, argv=tuple(_argv): train(a, *argv))

for _id, _argv, _needle, _what in [
    ("flag-negative-lr", ["--lr", "-0.001"], "--lr", "a negative learning rate"),
    ("flag-adam-beta1-above-one", ["--adam-beta1", "1.5"], "--adam-beta1", "Adam beta1 1.5"),
    ("flag-negative-weight-decay", ["--weight-decay", "-1"], "--weight-decay", "a negative weight decay"),
    ("flag-min-lr-above-lr", ["--min-lr", "1"], "--min-lr", "--min-lr above --lr"),
    ("flag-negative-clip-grad", ["--clip-grad", "-1"], "--clip-grad", "a negative --clip-grad"),
    ("flag-negative-warmup", ["--lr-warmup-iters", "-1"], "--lr-warmup-iters", "negative warm-up iterations"),
    ("flag-kv-channels-zero", ["--kv-channels", "0"], "--kv-channels", "0 channels per attention head"),
    ("flag-shift-a-nan", ["--shift-a", "nan"], "--shift-a", "a NaN condition-shift scale"),
]:
    case(_id, _what, TRAIN, _needle)(lambda a, tmp, argv=tuple(_argv): train(a, *argv))


# ---- recipes: what examples/recipes/*.sh pass through `--dry-run`
RECIPE = "recipe `--dry-run`"
case("recipe-bad-latent-grid", "latent grid without HxW", RECIPE, "--dry-run-latent-grid")(
    lambda a, tmp: dry_run(a, "--dry-run-latent-grid", "64"))
case("recipe-world-not-multiple-of-tp-pp", "3 GPUs for TP 2", RECIPE, "--dry-run-world-size")(
    lambda a, tmp: dry_run(a, "--dry-run-world-size", "3", "--tensor-model-parallel-size", "2"))
case("recipe-world-size-not-int", "--dry-run-world-size of a word", RECIPE, "--dry-run-world-size")(
    lambda a, tmp: dry_run(a, "--dry-run-world-size", "x"))
case("recipe-batch-not-divisible-by-dp", "global batch 2 on 4 data-parallel GPUs", RECIPE, "--global-batch-size")(
    lambda a, tmp: dry_run(a, "--dry-run-world-size", "4"))


# ---- checkpoints
SAMPLE_LOAD = "`tools/sample.py --load`"


def sample(a: Assets, load, *flags):
    return TOOLS.sample.main(["--load", str(load), "--out", str(a.root / "never" / "out"), *map(str, flags)])


def save_dir(tmp: Path, latest: Optional[str] = None, partial=()) -> Path:
    save = tmp / "save"
    save.mkdir()
    for name in partial:  # a killed save, or an iter_* directory without train_state.json
        (save / name).mkdir()
    if latest is not None:
        (save / "latest").write_text(latest)
    return save


def broken_state(a: Assets, tmp: Path, edit: Callable[[dict], object], source: Optional[Path] = None) -> Path:
    ckpt = copy(source or a.base, tmp / "ckpt")
    path = ckpt / "iter_0000001" / "train_state.json"
    state = json.loads(path.read_text())
    result = edit(state)
    path.write_text(result if isinstance(result, str) else json.dumps(state))
    return ckpt


case("ckpt-load-missing", "a --load directory that does not exist", SAMPLE_LOAD, "--load")(
    lambda a, tmp: sample(a, tmp / "nowhere"))
case("ckpt-no-marker-no-iter", "a directory with no `latest` and no iter_*", SAMPLE_LOAD, ("--load", "latest"))(
    lambda a, tmp: sample(a, save_dir(tmp, None, partial=("iter_0000003", ".tmp_iter_0000003"))))
case("ckpt-marker-garbage", "`latest` holding a word, no complete checkpoint", SAMPLE_LOAD, ("--load", "latest"))(
    lambda a, tmp: sample(a, save_dir(tmp, "x", partial=("iter_0000003",))))
case("ckpt-marker-names-missing-iter", "`latest` naming a missing iteration", SAMPLE_LOAD, "iter_0000003")(
    lambda a, tmp: sample(a, save_dir(tmp, "3\n", partial=(".tmp_iter_0000003",))))
case("ckpt-train-state-not-json", "train_state.json that is not JSON", SAMPLE_LOAD, "train_state.json")(
    lambda a, tmp: sample(a, broken_state(a, tmp, lambda s: "{not json")))
case("ckpt-train-state-no-model-config", "train_state.json without `model_config`", SAMPLE_LOAD,
     ("train_state.json", "model_config"))(
    lambda a, tmp: sample(a, broken_state(a, tmp, lambda s: s.pop("model_config"))))
case("ckpt-train-state-unknown-model", "train_state.json naming an unregistered model", SAMPLE_LOAD,
     ("train_state.json", "model_name"))(
    lambda a, tmp: sample(a, broken_state(a, tmp, lambda s: s.update(model_name="qwen-image-7b"))))
case("ckpt-train-state-unknown-field", "train_state.json model_config with an unknown field", SAMPLE_LOAD,
     ("train_state.json", "no_such_field"))(
    lambda a, tmp: sample(a, broken_state(a, tmp, lambda s: s["model_config"].update(no_such_field=1))))
case("ckpt-train-state-no-iteration", "train_state.json without `iteration`, resumed", "`pretrain_apex_dit.py --load`",
     ("train_state.json", "iteration"))(
    lambda a, tmp: train(a, "--load", broken_state(a, tmp, lambda s: s.pop("iteration"))))
case("ckpt-tensor-file-missing", "a checkpoint with one tensor file deleted", SAMPLE_LOAD, "__0_0.distcp")(
    lambda a, tmp: sample(a, _without(copy(a.base, tmp / "ckpt"), "iter_0000001/__0_0.distcp")))
case("ckpt-metadata-garbage", "a checkpoint whose .metadata is not a pickle", SAMPLE_LOAD, ".metadata")(
    lambda a, tmp: sample(a, _overwrite(copy(a.base, tmp / "ckpt"), "iter_0000001/.metadata", b"garbage")))
case("ckpt-metadata-pickle-payload", "a checkpoint whose .metadata pickle would run os.mkdir", SAMPLE_LOAD,
     (".metadata", "posix.mkdir"), absent="ran")(
    lambda a, tmp: sample(a, _overwrite(copy(a.base, tmp / "ckpt"), "iter_0000001/.metadata",
                                        pickle.dumps(_Payload(tmp / "ran")))))
def _planted_byte_item(root: Path, marker: Path) -> Path:
    """A pickle written over the first non-tensor item of a .distcp file, `.metadata` untouched."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megatron_apex.checkpoint import load_data_pickle

    ckpt = root / "iter_0000001"
    metadata = load_data_pickle(str(ckpt / ".metadata"))
    index, info = next((i, v) for i, v in metadata.storage_data.items()
                       if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata))
    with open(ckpt / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        f.write(pickle.dumps(_Payload(marker)))
    return root


def _truncated(root: Path, rel: str) -> Path:
    data = (root / rel).read_bytes()
    (root / rel).write_bytes(data[: len(data) // 2])
    return root


case("ckpt-byte-item-pickle-payload", "a pickle written over a .distcp non-tensor item (would run os.mkdir)",
     SAMPLE_LOAD, ("__0_0.distcp", "_extra_state"), absent="ran")(
    lambda a, tmp: sample(a, _planted_byte_item(copy(a.base, tmp / "ckpt"), tmp / "ran")))
case("ckpt-tensor-file-truncated", "a .distcp file cut to half its length", SAMPLE_LOAD, ("__0_1.distcp", "truncated"))(
    lambda a, tmp: sample(a, _truncated(copy(a.base, tmp / "ckpt"), "iter_0000001/__0_1.distcp")))
case("ckpt-megatron-metadata-garbage", "megatron's metadata.json that is not JSON", SAMPLE_LOAD, "metadata.json")(
    lambda a, tmp: sample(a, _overwrite(copy(a.base, tmp / "ckpt"), "iter_0000001/metadata.json", b"{nope")))
case("ckpt-fresh-start-over-a-run", "a fresh start whose --save holds a complete checkpoint of another run",
     "`pretrain_apex_dit.py --save`", ("--save", "iter_0000001"))(
    lambda a, tmp: train(a, "--save", copy(a.base, tmp / "save")))
case("ckpt-weights-ema-absent", "--weights ema on a run without EMA", "`tools/sample.py --weights`", "--weights ema")(
    lambda a, tmp: sample(a, a.base, "--weights", "ema"))
case("ckpt-other-model", "--load of a 2-layer run with --num-layers 3", "`pretrain_apex_dit.py --load`",
     ("--load", "num_layers"))(
    lambda a, tmp: train(a, "--load", a.base, "--num-layers", "3"))
case("data-no-empty-prompt", "--caption-dropout on shards without empty_prompt.npy (nor a MiniLM encoder)",
     "`pretrain_apex_dit.py --data-path`", ("--caption-dropout", "empty_prompt.npy"))(
    lambda a, tmp: train(a, "--caption-dropout", "0.1"))
case("data-empty-prompt-bad-shape", "an empty_prompt.npy with the wrong width", "`pretrain_apex_dit.py --data-path`",
     "empty_prompt.npy")(
    lambda a, tmp: train(a, "--caption-dropout", "0.1", "--data-path",
                         _with_file(copy(a.dataset, tmp / "data"), "empty_prompt.npy", np.zeros((2, 3), np.float16))))
case("ckpt-other-shift-resumed", "resume (no --finetune) with another --shift-a", "`pretrain_apex_dit.py --load`",
     ("--load", "shift_a"))(
    lambda a, tmp: train(a, "--load", a.base, "--shift-a", "-0.5", "--train-iters", "2"))
case("ckpt-finetune-learnable-shift", "--finetune a fixed-shift run with a learnable --shift-kind diagonal",
     "`pretrain_apex_dit.py --load --finetune`", ("--load", "shift_kind"))(
    lambda a, tmp: train(a, "--load", a.base, "--finetune", "--shift-kind", "diagonal", "--save", tmp / "ft"))
case("ckpt-pretrained-missing", "--pretrained-checkpoint that does not exist", "`pretrain_apex_dit.py "
     "--pretrained-checkpoint`", "--pretrained-checkpoint")(
    lambda a, tmp: train(a, *LORA_FLAGS, "--pretrained-checkpoint", tmp / "nowhere"))
case("ckpt-lora-other-rank", "resume a rank-2 LoRA run with --lora-rank 4", "`pretrain_apex_dit.py --load`",
     "--lora-rank")(
    lambda a, tmp: train(a, "--lora-rank", "4", "--lora-targets", "attn", "--load", a.lora))
case("ckpt-lora-other-targets", "resume a LoRA run with other --lora-targets", "`pretrain_apex_dit.py --load`",
     "--lora-targets")(
    lambda a, tmp: train(a, "--lora-rank", "2", "--lora-targets", "attn,img_in", "--load", a.lora))
case("ckpt-lora-without-lora-flags", "resume a LoRA run without --lora-rank", "`pretrain_apex_dit.py --load`",
     ("--load", "--lora-rank"))(
    lambda a, tmp: train(a, "--load", a.lora))
case("ckpt-lora-other-model", "resume a 2-layer LoRA run with --num-layers 1", "`pretrain_apex_dit.py --load`",
     ("--load", "num_layers"))(
    lambda a, tmp: train(a, *LORA_FLAGS, "--load", a.lora, "--num-layers", "1"))
case("ckpt-lora-other-base", "resume a LoRA run on another base", "`pretrain_apex_dit.py --pretrained-checkpoint`",
     "--pretrained-checkpoint")(
    lambda a, tmp: train(a, *LORA_FLAGS, "--load", a.lora, "--pretrained-checkpoint", a.other_base))
case("ckpt-lora-as-base", "a LoRA checkpoint as --pretrained-checkpoint", "`pretrain_apex_dit.py "
     "--pretrained-checkpoint`", ("--pretrained-checkpoint", "LoRA checkpoint"))(
    lambda a, tmp: train(a, *LORA_FLAGS, "--pretrained-checkpoint", a.lora))
case("ckpt-full-as-lora-resume", "a full checkpoint resumed as a LoRA run", "`pretrain_apex_dit.py --load`",
     ("--load", "full checkpoint"))(
    lambda a, tmp: train(a, *LORA_FLAGS, "--load", a.base))
case("ckpt-load-empty-dir", "a --load directory with no checkpoint in it", "`pretrain_apex_dit.py --load`",
     ("--load", "latest"))(lambda a, tmp: train(a, "--load", _mkdir(tmp / "empty")))
case("data-other-text-width", "shards of 24-wide text states for --model qwen-image-tiny (384)",
     "`pretrain_apex_dit.py --data-path`", ("--data-path", "--model qwen-image-tiny", "text states width 24"))(
    lambda a, tmp: train(a, "--model", "qwen-image-tiny"))


class _Payload:
    """Unpickling it creates a directory: proof that a planted pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _without(root: Path, rel: str) -> Path:
    (root / rel).unlink()
    return root


def _overwrite(root: Path, rel: str, data: bytes) -> Path:
    (root / rel).write_bytes(data)
    return root


# ---- LoRA export (tools/export_lora.py)
EXPORT = "`tools/export_lora.py`"


def export_lora(a: Assets, tmp: Path, *flags):
    return TOOLS.export_lora.main([*map(str, flags), "--out", str(tmp / "out")])


case("export-lora-full-checkpoint", "a full checkpoint to the LoRA exporter", EXPORT, ("--load", "tools/convert_hf.py"),
     absent="out")(lambda a, tmp: export_lora(a, tmp, "--load", a.base))
case("export-lora-bad-extras", "--extras inline for a LoRA file", EXPORT, "--extras", absent="out")(
    lambda a, tmp: export_lora(a, tmp, "--load", a.lora, "--extras", "inline"))
case("export-lora-extras-error", "--extras error with a trainable extra", EXPORT, "target_time_embedder",
     absent="out")(lambda a, tmp: export_lora(a, tmp, "--load", a.lora, "--extras", "error"))
case("export-lora-other-base", "--pretrained-checkpoint of another base", EXPORT, "--pretrained-checkpoint",
     absent="out")(lambda a, tmp: export_lora(a, tmp, "--load", a.lora, "--pretrained-checkpoint", a.other_base))
case("export-lora-missing", "--load that does not exist", EXPORT, "--load", absent="out")(
    lambda a, tmp: export_lora(a, tmp, "--load", tmp / "nowhere"))


# ---- data shards (megatron_apex.data.shards.load_dataset: --data-path)
SHARDS = "`--data-path` shards"


def load(root: Path, split: str = "train"):
    from megatron_apex.data.shards import load_dataset

    return load_dataset(root, split=split, memo=False)


def dataset_of(tmp: Path, *samples, **manifest_edits) -> Path:
    return write_raw_dataset(tmp / "ds", list(samples), manifest_edits)


def sample_with(**members) -> dict:
    out = good_members(0)
    for ext, data in members.items():
        ext = ext.replace("_", ".")
        if data is None:
            out.pop(ext)
        else:
            out[ext] = data
    return out


def _edit_manifest(root: Path, edit: Callable[[dict], object]) -> Path:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return root


def _shard(root: Path) -> Path:
    return root / "train-000000.tar.gz"


case("shards-manifest-missing", "a folder without manifest.json", SHARDS, "manifest.json")(
    lambda a, tmp: load(_without(copy(a.dataset, tmp / "ds"), "manifest.json")))
case("shards-manifest-not-json", "manifest.json that is not JSON", SHARDS, "manifest.json")(
    lambda a, tmp: load(_overwrite(copy(a.dataset, tmp / "ds"), "manifest.json", b"{oops")))
case("shards-manifest-other-format", "manifest.json of another format", SHARDS, ("manifest.json", "format"))(
    lambda a, tmp: load(_edit_manifest(copy(a.dataset, tmp / "ds"), lambda m: m.update(format="tfrecords.v2"))))
case("shards-manifest-no-context-dim", "manifest.json without `context_dim`", SHARDS, ("manifest.json", "context_dim"))(
    lambda a, tmp: load(_edit_manifest(copy(a.dataset, tmp / "ds"), lambda m: m.pop("context_dim"))))
case("shards-manifest-shards-not-list", "manifest.json whose split lists no shards", SHARDS,
     ("manifest.json", "shards"))(
    lambda a, tmp: load(_edit_manifest(copy(a.dataset, tmp / "ds"),
                                       lambda m: m["splits"]["train"].update(shards="train-000000.tar.gz"))))
case("shards-manifest-bad-max-text-len", "manifest.json with max_text_len \"four\"", SHARDS,
     ("manifest.json", "max_text_len"))(
    lambda a, tmp: load(_edit_manifest(copy(a.dataset, tmp / "ds"), lambda m: m.update(max_text_len="four"))))
case("shards-split-missing", "a split the manifest does not have", SHARDS, "'valid'")(
    lambda a, tmp: load(a.dataset, split="valid"))
case("shards-shard-missing", "a shard the manifest lists, deleted", SHARDS, "train-000000.tar.gz")(
    lambda a, tmp: load(_without(copy(a.dataset, tmp / "ds"), "train-000000.tar.gz")))
case("shards-shard-truncated", "a shard cut in half", SHARDS, "train-000000.tar.gz")(
    lambda a, tmp: load(_truncate(copy(a.dataset, tmp / "ds"))))
case("shards-shard-not-a-tar", "a shard of random bytes (size as listed)", SHARDS, "train-000000.tar.gz")(
    lambda a, tmp: load(_randomize(copy(a.dataset, tmp / "ds"))))
case("shards-shard-zeros", "a shard of zeros (reads as an empty tar)", SHARDS, "train-000000.tar.gz")(
    lambda a, tmp: load(_zero(copy(a.dataset, tmp / "ds"))))
case("shards-shard-gzip-then-zeros", "a gzip header followed by zeros", SHARDS, "train-000000.tar.gz")(
    lambda a, tmp: load(_zero(copy(a.dataset, tmp / "ds"), keep=10)))
case("shards-shard-empty-file", "an empty shard file", "`read_shard`", "train-000000.tar.gz")(
    lambda a, tmp: _read_shard(_overwrite(copy(a.dataset, tmp / "ds"), "train-000000.tar.gz", b"")))
case("shards-count-mismatch", "a shard with fewer samples than the manifest says", SHARDS,
     ("train-000000.tar.gz", "count"))(
    lambda a, tmp: load(_edit_manifest(copy(a.dataset, tmp / "ds"),
                                       lambda m: m["splits"]["train"]["shards"][0].update(count=5))))
case("shards-sample-no-ctx", "a sample without ctx.npy", SHARDS, ("0000000", "ctx.npy"))(
    lambda a, tmp: load(dataset_of(tmp, sample_with(ctx_npy=None))))
case("shards-sample-no-image", "a sample without image.npy / png", SHARDS, ("0000000", "image.npy"))(
    lambda a, tmp: load(dataset_of(tmp, sample_with(image_npy=None))))
case("shards-ctx-not-npy", "ctx.npy that is not an .npy array", SHARDS, ("0000000", "ctx.npy"))(
    lambda a, tmp: load(dataset_of(tmp, sample_with(ctx_npy=b"text, not an array"))))
case("shards-ctx-strings", "ctx.npy holding strings", SHARDS, ("0000000", "ctx.npy"))(
    lambda a, tmp: load(dataset_of(tmp, sample_with(ctx_npy=npy(np.array([["a"] * TEXT_DIM] * 2))))))
case("shards-ctx-wrong-width", "ctx.npy of width 7 (manifest: 24)", SHARDS, ("0000000", "ctx.npy"))(
    lambda a, tmp: load(dataset_of(tmp, sample_with(ctx_npy=npy(np.zeros((2, 7), np.float16))))))
case("shards-ctx-too-long", "ctx.npy with more tokens than max_text_len", SHARDS, ("0000000", "ctx.npy"))(
    lambda a, tmp: load(dataset_of(tmp, sample_with(ctx_npy=npy(np.zeros((9, TEXT_DIM), np.float16)),
                                                    mask_npy=npy(np.ones(9, bool))))))
case("shards-mask-wrong-length", "mask.npy shorter than ctx.npy", SHARDS, ("0000000", "mask.npy"))(
    lambda a, tmp: load(dataset_of(tmp, sample_with(mask_npy=npy(np.ones(1, bool))))))
case("shards-image-wrong-dtype", "image.npy of int64 pixels", SHARDS, ("0000000", "image.npy"))(
    lambda a, tmp: load(dataset_of(tmp, sample_with(image_npy=npy(np.zeros((1, 8, 8), np.int64))))))
case("shards-image-shapes-differ", "two samples with different image shapes", SHARDS, ("0000001", "image has shape"))(
    lambda a, tmp: load(dataset_of(tmp, good_members(0), sample_with(image_npy=npy(np.zeros((1, 9, 9), np.uint8))))))
case("shards-npy-pickle", "ctx.npy holding a pickled object array", SHARDS, ("0000000", "ctx.npy", "pickle"))(
    lambda a, tmp: load(dataset_of(tmp, sample_with(ctx_npy=npy(np.array([{"x": 1}, None], dtype=object))))))
case("shards-label-not-int", "a `cls` label that is not an integer", SHARDS, ("0000000", "cls"))(
    lambda a, tmp: load(dataset_of(tmp, sample_with(cls=b"shoe"))))
case("shards-member-escapes", "a tar member named ../0000000.ctx.npy", SHARDS, "../0000000.ctx.npy")(
    lambda a, tmp: load(write_raw_dataset(tmp / "ds", [good_members(0)],
                                          member_names=lambda n: "../" + n if n.endswith("ctx.npy") else n)))
case("shards-empty-split", "a split with no shards", SHARDS, ("train", "no samples"))(
    lambda a, tmp: load(_edit_manifest(copy(a.dataset, tmp / "ds"),
                                       lambda m: m["splits"].update(train=dict(count=0, shards=[])))))


def _read_shard(root: Path):
    from megatron_apex.data.shard_reader import read_shard

    return read_shard(_shard(root))


def _truncate(root: Path) -> Path:
    data = _shard(root).read_bytes()
    _shard(root).write_bytes(data[: len(data) // 2])
    return _edit_manifest(root, lambda m: m["splits"]["train"]["shards"][0].update(bytes=len(data) // 2))


def _randomize(root: Path) -> Path:
    size = _shard(root).stat().st_size
    _shard(root).write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    return root


def _zero(root: Path, keep: int = 0) -> Path:
    data = _shard(root).read_bytes()
    _shard(root).write_bytes(data[:keep] + bytes(len(data) - keep))
    return root


# ---- conversion inputs (tools/convert_hf.py import, in process)
CONVERT = "`tools/convert_hf.py import --hf-path`"


def convert(*argv):
    return TOOLS.convert_hf.main([str(x) for x in argv])


def import_hf(src: Path, tmp: Path, *flags):
    return convert("import", "--hf-path", src, "--save", tmp / "out", *flags)


def hf_copy(a: Assets, tmp: Path, edit_config=None, edit_weights=None) -> Path:
    from safetensors.torch import load_file, save_file

    dst = copy(a.hf_folder, tmp / "transformer")
    if edit_config is not None:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    if edit_weights is not None:
        path = dst / "diffusion_pytorch_model.safetensors"
        weights = load_file(path)
        edit_weights(weights)
        save_file(weights, path, metadata={"format": "pt"})
    return dst


def _shard_hf(a: Assets, tmp: Path, drop: bool) -> Path:
    """The folder as two shards with an index; ``drop`` deletes the second shard."""
    from safetensors.torch import load_file, save_file

    dst = hf_copy(a, tmp)
    weights = load_file(dst / "diffusion_pytorch_model.safetensors")
    (dst / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(weights)
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    for name, part in zip(names, halves):
        save_file({k: weights[k] for k in part}, dst / name)
    index = {"metadata": {}, "weight_map": {k: n for n, part in zip(names, halves) for k in part}}
    (dst / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    if drop:
        (dst / names[1]).unlink()
    return dst


def _del_keys(*keys):
    def edit(weights):
        for k in keys:
            del weights[k]
    return edit


def _set_key(key, shape):
    def edit(weights):
        import torch

        weights[key] = torch.zeros(shape)
    return edit


case("hf-folder-missing", "--hf-path that does not exist", CONVERT, "--hf-path", absent="out")(
    lambda a, tmp: import_hf(tmp / "nowhere", tmp, "--model", "qwen-image"))
case("hf-no-config", "a folder without config.json", CONVERT, ("--hf-path", "config.json"), absent="out")(
    lambda a, tmp: import_hf(_without(hf_copy(a, tmp), "config.json"), tmp))
case("hf-pipeline-folder", "a pipeline folder instead of its transformer/", CONVERT, ("--hf-path", "transformer/"),
     absent="out")(lambda a, tmp: import_hf(_pipeline_folder(a, tmp), tmp))
case("hf-config-not-json", "config.json that is not JSON", CONVERT, ("--hf-path", "config.json"), absent="out")(
    lambda a, tmp: import_hf(_overwrite(hf_copy(a, tmp), "config.json", b"{oops"), tmp))
case("hf-wrong-class", "config.json of a Sana model with --model qwen-image", CONVERT,
     ("_class_name", "SanaTransformer2DModel", "QwenImageTransformer2DModel", "--model sana"),
     absent="out")(
    lambda a, tmp: import_hf(hf_copy(a, tmp, lambda c: c.update(_class_name="SanaTransformer2DModel")), tmp,
                             "--model", "qwen-image"))
case("hf-verify-wrong-class", "verify a Sana config.json with --model qwen-image", "`tools/convert_hf.py verify "
     "--hf-path`", ("_class_name", "SanaTransformer2DModel"))(
    lambda a, tmp: convert("verify", "--model", "qwen-image", "--hf-path",
                           hf_copy(a, tmp, lambda c: c.update(_class_name="SanaTransformer2DModel"))))
def _linked_out(folder: Path, hard: bool) -> Path:
    """The folder's weights replaced by a link to the same bytes outside it."""
    weights = folder / "diffusion_pytorch_model.safetensors"
    outside = folder.parent / "elsewhere.safetensors"
    shutil.move(weights, outside)
    (os.link if hard else os.symlink)(outside, weights)
    return folder


case("hf-weights-symlink-out", "safetensors that is a symbolic link out of the folder", CONVERT,
     ("--hf-path", "diffusion_pytorch_model.safetensors", "symbolic link"), absent="out")(
    lambda a, tmp: import_hf(_linked_out(hf_copy(a, tmp), hard=False), tmp))
case("hf-weights-hard-link", "safetensors that is a hard link", CONVERT,
     ("--hf-path", "diffusion_pytorch_model.safetensors", "hard link"), absent="out")(
    lambda a, tmp: import_hf(_linked_out(hf_copy(a, tmp), hard=True), tmp))
case("hf-unknown-class", "config.json of a class nobody converts", CONVERT, "_class_name", absent="out")(
    lambda a, tmp: import_hf(hf_copy(a, tmp, lambda c: c.update(_class_name="UNet2DConditionModel")), tmp))
case("hf-unknown-family", "--model of an unknown family", CONVERT, "--model", absent="out")(
    lambda a, tmp: import_hf(a.hf_folder, tmp, "--model", "sana-9b"))
case("hf-bad-config-value", "config.json with num_layers -1", CONVERT, ("--hf-path", "num-layers"), absent="out")(
    lambda a, tmp: import_hf(hf_copy(a, tmp, lambda c: c.update(num_layers=-1)), tmp))
case("hf-no-weights", "config.json but no safetensors", CONVERT, ("--hf-path", "diffusion_pytorch_model.safetensors"),
     absent="out")(lambda a, tmp: import_hf(_without(hf_copy(a, tmp), "diffusion_pytorch_model.safetensors"), tmp))
case("hf-bin-weights", "weights as a .bin pickle only", CONVERT, ("--hf-path", "diffusion_pytorch_model.bin"),
     absent="out")(lambda a, tmp: import_hf(_bin_only(a, tmp), tmp))
case("hf-index-missing-shard", "an index naming a shard that is not there", CONVERT,
     "diffusion_pytorch_model-00002-of-00002.safetensors", absent="out")(
    lambda a, tmp: import_hf(_shard_hf(a, tmp, drop=True), tmp))
case("hf-safetensors-truncated", "a safetensors file cut short", CONVERT, "diffusion_pytorch_model.safetensors",
     absent="out")(lambda a, tmp: import_hf(_cut(hf_copy(a, tmp)), tmp))
case("hf-missing-key", "weights without proj_out.weight", CONVERT, ("missing keys", "proj_out.weight"), absent="out")(
    lambda a, tmp: import_hf(hf_copy(a, tmp, edit_weights=_del_keys("proj_out.weight")), tmp))
case("hf-unexpected-key", "weights with an extra key", CONVERT, ("unexpected keys", "transformer_blocks.0.attn.to_x"),
     absent="out")(
    lambda a, tmp: import_hf(hf_copy(a, tmp, edit_weights=_set_key("transformer_blocks.0.attn.to_x.weight", (2,))), tmp))
case("hf-shape-mismatch", "txt_in.weight of the wrong shape", CONVERT, ("shape mismatches", "txt_in.weight"),
     absent="out")(lambda a, tmp: import_hf(hf_copy(a, tmp, edit_weights=_set_key("txt_in.weight", (32, 11))), tmp))
case("hf-keys-all-wrong", "weights with missing, extra and mis-shaped keys at once", CONVERT,
     ("missing keys: proj_out.weight, transformer_blocks.0.attn.add_k_proj.bias",
      "unexpected keys: transformer_blocks.0.attn.to_x.weight",
      "shape mismatches: txt_in.weight [32, 11] (expected [32, 12])"), absent="out")(
    lambda a, tmp: import_hf(hf_copy(a, tmp, edit_weights=_all_wrong), tmp, "--model", "qwen-image"))
case("hf-extra-target-embedder", "time_text_embed_2 with --target-time-embedder none", CONVERT,
     ("unexpected keys", "time_text_embed_2"), absent="out")(
    lambda a, tmp: import_hf(hf_copy(a, tmp, edit_weights=_copy_time_embedder), tmp, "--target-time-embedder", "none"))
case("hf-tp-not-dividing", "--tensor-model-parallel-size 3 (4 heads)", CONVERT, "--tensor-model-parallel-size",
     absent="out")(lambda a, tmp: import_hf(a.hf_folder, tmp, "--tensor-model-parallel-size", "3"))
case("hf-save-not-empty", "--save naming a non-empty directory", CONVERT, ("--save", "not empty"))(
    lambda a, tmp: import_hf(a.hf_folder, _not_empty(tmp / "out").parent))
case("hf-export-load-missing", "export --load that does not exist", "`tools/convert_hf.py export --load`", "--load",
     absent="out")(lambda a, tmp: convert("export", "--model", "qwen-image", "--load", tmp / "nowhere",
                                          "--hf-path", tmp / "out"))
case("hf-export-other-family", "export --model sana of a 2-layer Qwen-Image checkpoint", "`tools/convert_hf.py "
     "export --model`", ("--model sana", "qwen-image model (2 layers, hidden size 32"), absent="out")(
    lambda a, tmp: convert("export", "--model", "sana", "--load", a.base, "--hf-path", tmp / "out"))
case("hf-export-weights-ema-absent", "export --weights ema of a run without EMA", "`tools/convert_hf.py export "
     "--weights`", "--weights ema", absent="out")(
    lambda a, tmp: convert("export", "--load", a.base, "--hf-path", tmp / "out", "--weights", "ema"))
case("hf-export-out-not-empty", "export to a non-empty --hf-path", "`tools/convert_hf.py export --hf-path`",
     ("--hf-path", "not empty"))(
    lambda a, tmp: _unchanged(_not_empty(tmp / "taken"),
                              lambda out: convert("export", "--load", a.base, "--hf-path", out)))
case("hf-verify-missing", "verify --hf-path that does not exist", "`tools/convert_hf.py verify --hf-path`",
     "--hf-path")(lambda a, tmp: convert("verify", "--model", "qwen-image", "--hf-path", tmp / "nowhere"))


def _pipeline_folder(a: Assets, tmp: Path) -> Path:
    root = tmp / "pipeline"
    root.mkdir()
    (root / "model_index.json").write_text("{}")
    shutil.copytree(a.hf_folder, root / "transformer")
    return root


def _bin_only(a: Assets, tmp: Path) -> Path:
    dst = _without(hf_copy(a, tmp), "diffusion_pytorch_model.safetensors")
    (dst / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    return dst


def _cut(folder: Path) -> Path:
    path = folder / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    return folder


def _all_wrong(weights):
    _del_keys("transformer_blocks.0.attn.add_k_proj.bias", "proj_out.weight")(weights)
    _set_key("transformer_blocks.0.attn.to_x.weight", (2,))(weights)
    _set_key("txt_in.weight", (32, 11))(weights)


def _copy_time_embedder(weights):
    for j in (1, 2):
        for p in ("weight", "bias"):
            weights[f"time_text_embed_2.timestep_embedder.linear_{j}.{p}"] = \
                weights[f"time_text_embed.timestep_embedder.linear_{j}.{p}"].clone()


def _unchanged(folder: Path, run):
    """run(folder), and the folder keeps exactly what it held (a refused output is not touched)."""
    before = sorted(os.listdir(folder))
    result = run(folder)
    assert sorted(os.listdir(folder)) == before, f"{folder} was changed"
    return result


def _not_empty(path: Path) -> Path:
    path.mkdir()
    (path / "keep.txt").write_text("x")
    return path


# ---- LoRA files (megatron_apex.conversion.lora_diffusers.load_diffusers_lora)
LORA_FILE = "`load_diffusers_lora` file"


def adapted_model(rank: int):
    from megatron_apex.lora import LoRAConfig, apply_lora
    from megatron_apex.families import build_model
    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)
    model = build_model("qwen-image-tiny-test")
    apply_lora(model, LoRAConfig(rank=rank, targets="attn"))
    return model


def lora_file(tmp: Path, rank: int = 2, edit=None) -> Path:
    from safetensors.torch import load_file, save_file

    from megatron_apex.conversion.lora_diffusers import LORA_WEIGHT_NAME, export_diffusers_lora

    export_diffusers_lora(adapted_model(rank), str(tmp / "lora"), extras="drop")
    path = tmp / "lora" / LORA_WEIGHT_NAME
    if edit is not None:
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path)
    return path


def load_lora(path: Path, rank: int = 2):
    from megatron_apex.conversion.lora_diffusers import load_diffusers_lora

    return load_diffusers_lora(adapted_model(rank), str(path))


def _kohya_alpha(tensors):
    import torch

    tensors["transformer.transformer_blocks.0.attn.to_q.alpha"] = torch.tensor(2.0)


def _drop_first_B(tensors):
    del tensors[sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]]


case("lora-file-other-rank", "a rank-4 LoRA file into rank-2 adapters", LORA_FILE, ("lora_A.weight", "rank 2"))(
    lambda a, tmp: load_lora(lora_file(tmp, rank=4)))
case("lora-file-foreign-key", "a LoRA file with a kohya `alpha` key", LORA_FILE, "to_q.alpha")(
    lambda a, tmp: load_lora(lora_file(tmp, edit=_kohya_alpha)))
case("lora-file-missing-key", "a LoRA file lacking one lora_B", LORA_FILE, "lora_B.weight")(
    lambda a, tmp: load_lora(lora_file(tmp, edit=_drop_first_B)))
case("lora-file-not-safetensors", "a LoRA file that is not safetensors", LORA_FILE, "pytorch_lora_weights.safetensors")(
    lambda a, tmp: load_lora(_overwrite(lora_file(tmp).parent, "pytorch_lora_weights.safetensors", b"junk")))
case("lora-file-missing", "a LoRA folder without the file", LORA_FILE, "pytorch_lora_weights.safetensors")(
    lambda a, tmp: load_lora(_mkdir(tmp / "empty")))


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


# ---- samples for evaluation (tools/evaluate.py --samples)
EVAL = "`tools/evaluate.py --samples`"


def evaluate(path: Path, *flags):
    return TOOLS.evaluate.main(["--samples", str(path), "--json", str(path) + ".json", *flags])


def samples_npz(tmp: Path, **arrays) -> Path:
    rng = np.random.default_rng(0)
    payload = dict(images=rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8), labels=np.arange(4))
    payload.update(arrays)
    path = tmp / "samples.npz"
    np.savez(path, **{k: v for k, v in payload.items() if v is not None})
    return path


case("eval-samples-missing", "--samples that does not exist", EVAL, "--samples")(
    lambda a, tmp: evaluate(tmp / "nowhere.npz"))
case("eval-samples-not-npz", "--samples that is a text file", EVAL, "--samples")(
    lambda a, tmp: evaluate(_write(tmp / "samples.npz", b"not a zip")))
case("eval-no-labels", "an npz without `labels`", EVAL, ("--samples", "'labels'"))(
    lambda a, tmp: evaluate(samples_npz(tmp, labels=None)))
case("eval-images-pickled", "an npz whose `images` is a pickled object array", EVAL, ("--samples", "'images'"))(
    lambda a, tmp: evaluate(samples_npz(tmp, images=np.array([None, {"x": 1}], dtype=object))))
case("eval-images-float", "float `images` in [0, 1]", EVAL, ("--samples", "'images'"))(
    lambda a, tmp: evaluate(samples_npz(tmp, images=np.zeros((4, 8, 8, 1), np.float32))))
case("eval-labels-count", "5 labels for 4 images", EVAL, ("--samples", "'labels'"))(
    lambda a, tmp: evaluate(samples_npz(tmp, labels=np.arange(5))))
case("eval-labels-float", "`labels` of fractions", EVAL, ("--samples", "'labels'"))(
    lambda a, tmp: evaluate(samples_npz(tmp, labels=np.linspace(0, 1, 4))))
case("eval-unknown-dataset", "--dataset of an unknown dataset", "`tools/evaluate.py --dataset`", "--dataset")(
    lambda a, tmp: evaluate(samples_npz(tmp), "--dataset", "imagenet"))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---- sampling flags (tools/sample.py)
SAMPLE = "`tools/sample.py` flag"
case("sample-prompts-missing", "--prompts file that does not exist", SAMPLE, "--prompts")(
    lambda a, tmp: sample(a, a.base, "--prompts", tmp / "nowhere.txt"))
case("sample-prompts-empty", "--prompts file with blank lines only", SAMPLE, "--prompts")(
    lambda a, tmp: sample(a, a.base, "--prompts", _write(tmp / "p.txt", b"\n \n")))
case("sample-nfe-zero", "--nfe 0", SAMPLE, "--nfe")(lambda a, tmp: sample(a, a.base, "--nfe", "0"))
case("sample-unknown-method", "--method of an unknown sampler", SAMPLE, "--method")(
    lambda a, tmp: sample(a, a.base, "--method", "ddim"))
case("sample-unknown-weights", "--weights of an unknown kind", SAMPLE, "--weights")(
    lambda a, tmp: sample(a, a.base, "--weights", "best"))


# ----------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return Assets(tmp_path_factory.mktemp("bad_inputs"))


def _param(c: Case):
    marks = [pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []
    return pytest.param(c, id=c.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input_fails_with_one_line_naming_it(case, assets, tmp_path):
    out = observe(lambda: case.run(assets, tmp_path))
    assert out.clear, f"{out.kind}: {out.message}"
    assert out.message and "\n" not in out.message.strip(), out.message
    missing = [n for n in case.needles if n not in out.message]
    assert not missing, f"{missing} not in: {out.message}"
    if case.absent:  # nor a temp folder beside it (outputs are written to `.<name>.tmp-*`, then renamed)
        left = [p for p in os.listdir(tmp_path) if p == case.absent or p.startswith(f".{case.absent}.tmp")]
        assert not left, left


def test_finetune_may_change_a_fixed_scalar_shift(assets, tmp_path):
    """The counterpart of ckpt-other-shift-resumed: a fixed scalar shift holds no weights, so a
    fine-tune (Table 7's cells start from one FM checkpoint) may choose its own a and b."""
    import json

    import torch

    from megatron_apex.inference.loading import load_model_for_inference
    from megatron_apex.checkpoint import resolve_checkpoint

    save = tmp_path / "ft"
    assert train(assets, "--load", assets.base, "--finetune", "--shift-a", "-0.5", "--shift-b", "1",
                 "--shift-site", "input", "--lr", "1e-12", "--save", save) in (None, 0)
    ckpt = resolve_checkpoint(str(save))
    cfg = json.loads((Path(ckpt) / "train_state.json").read_text())["model_config"]
    base_cfg = json.loads((Path(resolve_checkpoint(str(assets.base))) / "train_state.json").read_text())["model_config"]
    assert (cfg["shift_a"], cfg["shift_b"], cfg["shift_site"]) == (-0.5, 1.0, "input")
    assert {k for k in cfg if cfg[k] != base_cfg[k]} == {"shift_a", "shift_b", "shift_site"}
    # the base's weights were loaded (a 1e-12 step away from them), not a fresh initialisation
    ours, base = (load_model_for_inference(str(p), weights="model")[0].state_dict() for p in (save, assets.base))
    assert ours.keys() == base.keys()
    for name, tensor in base.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


# ----------------------------------------------------------------------------- docs/bad_inputs.md

DOC_HEAD = """# Bad inputs and the errors they get

Each row is a case of `tests/unit/test_bad_inputs.py` (its id in the first column): the input
is built, fed to the entry point in the second column, and the test checks that the run fails
with a clear error type and ONE line that names the offending flag, file or key. The third
column is the message the code prints today (temporary paths shortened to `…/`); command-line
tools print it after `<tool>: error:` and exit with code 2. Rows marked *known bad* are strict
`xfail` cases: the message shown is today's bad one, and the test turns red once it is fixed
(then drop the mark).

Regenerate: `python tests/unit/test_bad_inputs.py docs/bad_inputs.md`.

| case | input tried | where it is given | error message shown |
|---|---|---|---|
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _shown(out: Outcome, paths) -> str:
    """The message as a user meets it: a tool's stderr line, or `Type: text` of a function's
    error; a multi-line one as its first line and how many follow; temp paths shortened."""
    if out.kind == "no error":
        return "(no error: the input is accepted)"
    message = out.message.strip()
    if not out.kind.startswith("exit"):
        message = f"{out.kind}: {message}"
    lines = message.splitlines() or [""]
    if len(lines) > 1:
        message = f"{lines[0]} ⏎ … ({len(lines) - 1} more lines)"
    for prefix in paths:
        message = message.replace(prefix, "…/")
    return message


def write_docs(path: Path) -> int:
    """Run every row on fresh fixtures, write the table; returns how many rows (not marked
    xfail) fail."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bad_inputs_") as root:
        assets = Assets(Path(root) / "assets")
        rows, bad = [], 0
        for i, c in enumerate(CASES):
            tmp = Path(root) / f"case{i}"
            tmp.mkdir()
            out = observe(lambda: c.run(assets, tmp))
            ok = out.clear and out.message.strip() and "\n" not in out.message.strip() and \
                all(n in out.message for n in c.needles)
            note = "" if ok else f" — *known bad: {c.xfail}*" if c.xfail else " — **FAILS**"
            bad += not ok and not c.xfail
            shown = _shown(out, (str(tmp) + "/", str(assets.root) + "/", root + "/"))
            rows.append(f"| `{c.id}` | {_cell(c.input)} | {_cell(c.given)} | {_cell(shown)}{note} |")
            print(f"{c.id}: {'ok' if ok else 'known bad' if c.xfail else 'FAILS'}", file=sys.stderr)
    path.write_text(DOC_HEAD + "\n".join(rows) + "\n")
    return bad


if __name__ == "__main__":
    sys.exit(1 if write_docs(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/bad_inputs.md")) else 0)
