"""The whole run of tools/prepare_data.py: settings resolved, inputs listed, this process's
shards built (in this process or in --workers processes), and rank 0's manifest once every rank
is done. Under torchrun each process builds the shards s with s % WORLD_SIZE == RANK."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import multiprocessing as mp
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_apex.data.buckets import bucket_table
from megatron_apex.data.empty_prompt import EMPTY_PROMPT, EMPTY_PROMPT_FILE
from megatron_apex.data.encoders import read_vae_config, text_encoder_info, vae_geometry
from megatron_apex.data.latent_format import LATENT_FORMAT, MANIFEST_NAME, shard_names
from megatron_apex.data.prepare.config import (PrepareConfig, check_positive, resolve_decoder, resolve_device,
                                               resolve_dtype)
from megatron_apex.data.prepare.encode import encode_texts
from megatron_apex.data.prepare.inputs import InputItem, list_inputs
from megatron_apex.data.prepare.shard import atomic_write, build_shard, existing_entry, npy_bytes
from megatron_apex.parallel.initialize import TIMEOUT_ENV


class Ranks:
    """This process among torchrun's (WORLD_SIZE, RANK, LOCAL_RANK; one process: rank 0 of 1).
    Shard s is built by rank s % world; the ranks meet (gloo, so a CPU-only machine can run it)
    only to agree that the folder is ready, and that every shard is done before rank 0 writes
    the manifest. A rank's error reaches every rank there, so none waits forever."""

    # a rank that finished its shards waits for the slowest one: a long job must not time out
    TIMEOUT_DAYS = 7

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.group = None
        self._owned = False

    def start(self) -> None:
        if self.world == 1 or self.group is not None:
            return
        seconds = self.TIMEOUT_DAYS * 86400
        if os.environ.get(TIMEOUT_ENV):  # a test harness's shorter limit: a failing rank fails the test fast
            seconds = min(seconds, float(os.environ[TIMEOUT_ENV]))
        timeout = datetime.timedelta(seconds=seconds)
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timeout)
            self._owned = True
        self.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo",
                                                                                            timeout=timeout)

    def agree(self, error: Optional[BaseException]) -> None:
        """Every rank passes its error (or None); all raise the first rank's error, or all go on."""
        if self.world == 1:
            if error is not None:
                raise error
            return
        errors: list = [None] * self.world
        dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}",
                               group=self.group)
        if error is not None:
            raise error
        for rank, message in enumerate(errors):
            if message is not None:
                raise ValueError(f"rank {rank} of {self.world} failed: {message}")

    def total(self, value: int) -> int:
        if self.world == 1:
            return value
        values: list = [None] * self.world
        dist.all_gather_object(values, value, group=self.group)
        return sum(values)

    def close(self) -> None:
        if self._owned:
            dist.destroy_process_group()
            self._owned = False
        self.group = None


def _worker_init(num_threads: int) -> None:
    torch.set_num_threads(num_threads)


def _build_job(job):
    return build_shard(*job)


def resolve_config(cfg: PrepareConfig, ranks: Optional[Ranks] = None) -> PrepareConfig:
    """cfg with auto settings made concrete for this process: device, dtype, decoder and the
    text length (the text encoder family's when not given)."""
    ranks = ranks or Ranks()
    device = resolve_device(cfg.device, ranks.local_rank, ranks.world)
    max_text_len = cfg.max_text_len
    if max_text_len is None:
        max_text_len = text_encoder_info(cfg.text_encoder, cfg.complex_human_instruction)["default_max_text_len"]
    return dataclasses.replace(cfg, device=device, dtype=resolve_dtype(cfg.dtype, device),
                               decoder=resolve_decoder(cfg.decoder, device), max_text_len=max_text_len)


def _signature(cfg: PrepareConfig, text: dict, items: list[InputItem], buckets: list, geom: dict) -> str:
    """Everything the shards' bytes depend on: inputs and settings, the encoders' device kind,
    dtype and the image decoder (not the GPU's number, nor how many processes build them)."""
    settings = dict(vae=cfg.vae if cfg.vae == "none" else os.path.abspath(cfg.vae),
                    vae_config=read_vae_config(cfg.vae), text_encoder=text,
                    text_encoder_path=cfg.text_encoder if cfg.text_encoder == "minilm" else os.path.abspath(
                        cfg.text_encoder), resolution=cfg.resolution, patch_size=cfg.patch_size,
                    channels=geom["image_channels"], max_text_len=cfg.max_text_len,
                    samples_per_shard=cfg.samples_per_shard, compress=cfg.compress, buckets=buckets,
                    device=cfg.device.split(":")[0], dtype=cfg.dtype, decoder=cfg.decoder,
                    inputs=[dataclasses.astuple(it) for it in items])
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def prepare(cfg: PrepareConfig, log=print) -> dict:
    """Write the shards that are missing and the manifest; return a summary dict. Under torchrun
    each process builds its share of the shards and rank 0 writes the manifest."""
    ranks = Ranks()
    try:
        return _prepare(cfg, log, ranks)
    finally:
        ranks.close()


def _prepare(cfg: PrepareConfig, log, ranks: Ranks) -> dict:
    check_positive(cfg)
    cfg = resolve_config(cfg, ranks)
    geom = vae_geometry(cfg.vae, cfg.channels)
    text = text_encoder_info(cfg.text_encoder, cfg.complex_human_instruction)
    buckets = bucket_table(cfg.resolution, geom["factor"] * cfg.patch_size)
    items, list_skipped = list_inputs(cfg.inputs)
    if not items:
        raise ValueError(f"--input {' '.join(map(str, cfg.inputs))}: no PNG/JPEG images found")
    signature = _signature(cfg, text, items, buckets, geom)
    out = Path(cfg.output)
    ranks.start()
    ranks.agree(_clear_output(out) if ranks.rank == 0 else None)  # no rank writes before the stale files are gone

    sps = cfg.samples_per_shard
    num_shards = -(-len(items) // sps)
    jobs, error, kept = [], None, 0
    try:
        for s in range(ranks.rank, num_shards, ranks.world):
            if existing_entry(out, s, cfg.compress, signature) is not None:
                kept += 1
            else:
                jobs.append((cfg, s, s * sps, items[s * sps:(s + 1) * sps], buckets, geom, signature))
        _build_jobs(jobs, cfg, ranks)
    except Exception as exc:  # told to every rank at the meeting below (KeyboardInterrupt ends them all anyway)
        error = exc
    ranks.agree(error)
    written = ranks.total(len(jobs))
    if ranks.rank != 0:
        ranks.agree(None)  # rank 0's manifest
        log(f"[prepare_data] rank {ranks.rank}: {len(jobs)} shards written, {kept} kept -> {out}")
        return dict(samples=None, shards=num_shards, shards_kept=kept, shards_written=len(jobs), skipped=[],
                    manifest=str(out / MANIFEST_NAME))
    try:
        summary = _write_manifest(cfg, out, num_shards, signature, geom, text, buckets, items, list_skipped,
                                  written)
    except Exception as exc:
        ranks.agree(exc)
        raise
    ranks.agree(None)
    summary.update(shards_kept=num_shards - written, shards_written=written)
    _log_summary(log, summary, out)
    return summary


def _clear_output(out: Path) -> Optional[ValueError]:
    """Rank 0, before any shard is written: the output folder made, the half-written files of an
    interrupted run removed (one run per folder); the error that every rank should raise, if any."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("*.tmp-*"):
            if stale.name.startswith(("shard-", MANIFEST_NAME, EMPTY_PROMPT_FILE)):
                stale.unlink()
    except OSError as exc:
        return ValueError(f"--output {out}: {exc.strerror or exc}")
    return None


def _log_summary(log, summary: dict, out: Path) -> None:
    num_shards, written, skipped = summary["shards"], summary["shards_written"], summary["skipped"]
    log(f"[prepare_data] {summary['samples']} samples in {num_shards} shards ({written} written, "
        f"{num_shards - written} kept) -> {out}")
    if skipped:
        log(f"[prepare_data] skipped {len(skipped)} inputs: {_reason_counts(skipped)}")
        for sk in skipped[:20]:
            log(f"[prepare_data]   {sk['input']}: {sk['reason']}")
        if len(skipped) > 20:
            log(f"[prepare_data]   ... and {len(skipped) - 20} more (listed in the shard-*.json entries)")


def _build_jobs(jobs: list, cfg: PrepareConfig, ranks: Ranks) -> None:
    """This rank's shards: in this process, or in --workers processes."""
    bar = None
    if cfg.progress and jobs and ranks.rank == 0:
        desc = "prepare_data" if ranks.world == 1 else f"prepare_data (rank 0 of {ranks.world})"
        bar = tqdm(total=sum(len(job[3]) for job in jobs), desc=desc, unit="img", dynamic_ncols=True)
    try:
        if cfg.workers > 1 and len(jobs) > 1:
            threads = max(1, (os.cpu_count() or 1) // cfg.workers)
            with mp.get_context("spawn").Pool(min(cfg.workers, len(jobs)), _worker_init, (threads,)) as pool:
                for _, job in zip(pool.imap(_build_job, jobs), jobs):
                    if bar is not None:
                        bar.update(len(job[3]))
        else:
            for job in jobs:
                build_shard(*job, progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()


def _write_manifest(cfg: PrepareConfig, out: Path, num_shards: int, signature: str, geom: dict, text: dict,
                    buckets: list, items: list, list_skipped: list, written: int) -> dict:
    """Rank 0, once every shard is done: the manifest (and the empty prompt's states)."""
    shards = []
    for s in range(num_shards):
        entry = existing_entry(out, s, cfg.compress, signature)
        if entry is None:
            raise ValueError(f"--output {out}: {shard_names(s, cfg.compress)[0]} is missing or incomplete after "
                             "every rank finished (another run writing into the same folder?)")
        shards.append(entry)
    skipped = list_skipped + [sk for e in shards for sk in e["skipped"]]
    total = sum(e["count"] for e in shards)
    if total == 0:
        raise ValueError(f"--input {' '.join(map(str, cfg.inputs))}: none of the {len(items)} inputs could be "
                         f"used ({_reason_counts(skipped)})")
    latent_buckets = sorted({tuple(map(int, g.split("x"))) for e in shards for g in e["buckets"]})
    manifest = dict(
        format=LATENT_FORMAT, count=total,
        vae=dict(geom, downsample=geom["factor"]),
        text_encoder={k: v for k, v in text.items() if k != "fingerprint"},
        latent_channels=geom["latent_channels"], context_dim=text["dim"], max_text_len=cfg.max_text_len,
        resolution=cfg.resolution, patch_size=cfg.patch_size,
        encoded_with=dict(device=cfg.device.split(":")[0], dtype=cfg.dtype, decoder=cfg.decoder),
        pixel_buckets=[list(b) for b in buckets],
        buckets=[[h // geom["factor"], w // geom["factor"]] for h, w in buckets],
        used_buckets=[list(b) for b in latent_buckets],
        shards=[{k: e[k] for k in ("name", "count", "bytes", "sha256", "buckets", "sample_index")} for e in shards],
        skipped=len(skipped), signature=signature)
    if written or not (out / EMPTY_PROMPT_FILE).is_file():  # for caption dropout and classifier-free guidance
        empty = encode_texts([EMPTY_PROMPT], cfg, negative=True)[0]
        atomic_write(out / EMPTY_PROMPT_FILE, npy_bytes(empty.astype(np.float16)))
    atomic_write(out / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    return dict(samples=total, shards=num_shards, skipped=skipped, manifest=str(out / MANIFEST_NAME))


def _reason_counts(skipped: list[dict]) -> str:
    counts: dict = {}
    for sk in skipped:
        reason = sk["reason"].split(" (")[0]
        counts[reason] = counts.get(reason, 0) + 1
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())) or "none skipped"
