"""Writing a megatron-core distributed checkpoint whose tensors are produced one at a time.

``dist_checkpointing.save`` wants every tensor in the sharded state dict, and megatron's torch
DCP writer resolves all of them before its worker processes write: the whole model in memory.
Here the sharded state dict carries meta-device tensors (shapes and dtypes only, which is all
the planning, the metadata and the sharding checks read), and a save planner whose
``resolve_data`` asks a :class:`PieceSource` for a write item's data when the writer reaches
it. The writer writes the items one after another into one file and drops each before asking
for the next, so memory holds one converted tensor (and one of its tensor-parallel pieces) at
a time. The checkpoint is megatron's own format, written by megatron's save (its
``metadata.json`` and ``common.pt``, torch DCP's ``.metadata``) through a strategy that only
swaps the writer and the planner; any megatron load (any TP/PP) reads it.

Written against megatron-core 0.16 (``TorchDistSaveShardedStrategy``, its planner and writer
classes) and torch 2.13's DCP ``_write_item``, as megatron's own writer uses them.
"""

from __future__ import annotations

import inspect
import os
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

PieceKey = Tuple[str, Tuple[int, ...]]  # (sharded key, global offsets of the piece)


class PieceSource:
    """The tensor-parallel pieces of converted tensors, made on request.

    ``tensors[key]`` makes our full (TP=1) tensor; piece ``rank`` of a key split along ``dim``
    is its ``rank``-th of ``tp`` contiguous chunks. The full tensor of the key asked for last is
    kept until all its pieces have been handed out (the writer asks for a key's pieces one
    after another), so each tensor is converted once. ``on_convert`` (tests) sees each
    conversion.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, Tuple[int, ...]],
                 split_dims: Mapping[str, Optional[int]], tp: int, dtype: torch.dtype,
                 on_convert: Optional[Callable[[str, torch.Tensor], None]] = None):
        self.tensors, self.shapes, self.split_dims, self.tp, self.dtype = tensors, shapes, split_dims, tp, dtype
        self.on_convert = on_convert
        self.conversions = 0
        self._key: Optional[str] = None
        self._full: Optional[torch.Tensor] = None
        self._left: set = set()

    def pieces_of(self, key: str) -> int:
        return 1 if self.split_dims.get(key) is None or self.tp == 1 else self.tp

    def _convert(self, key: str) -> torch.Tensor:
        tensor = self.tensors[key].to(self.dtype)
        if tuple(tensor.shape) != tuple(self.shapes[key]):
            raise ValueError(f"converted {key!r} has shape {tuple(tensor.shape)}, the model {tuple(self.shapes[key])}")
        self.conversions += 1
        if self.on_convert is not None:
            self.on_convert(key, tensor)
        return tensor

    def piece(self, key: str, rank: int) -> torch.Tensor:
        if self._key != key:
            self._key, self._full = None, None  # let the previous one go before making the next
            self._full, self._key, self._left = self._convert(key), key, set(range(self.pieces_of(key)))
        full = self._full
        self._left.discard(rank)
        if not self._left:
            self._key, self._full = None, None
        if self.pieces_of(key) == 1:
            return full.contiguous()
        dim = self.split_dims[key]
        # a clone: a view would be saved with its whole storage
        return full.chunk(self.tp, dim=dim)[rank].clone(memory_format=torch.contiguous_format)


def lazy_sharded_state_dict(template: Mapping, source: PieceSource, prefix: str) -> Tuple[Dict, Dict[PieceKey, Tuple]]:
    """The sharded state dict ``tp`` ranks would save together, with meta-device data, and
    {(sharded key, offsets): (our key, rank)} to find each piece's maker. ``template`` is a
    TP=1 model's ``sharded_state_dict(prefix)``: its ShardedObjects (extra state) are kept."""
    from megatron.core.dist_checkpointing import ShardedTensor

    out, index = {}, {}
    for name, entry in template.items():
        if not isinstance(entry, ShardedTensor):
            out[name] = entry
            continue
        key = entry.key[len(prefix):]
        shape = tuple(entry.global_shape)
        pieces = source.pieces_of(key)
        dim = source.split_dims.get(key)
        for rank in range(pieces):
            local = list(shape)
            offsets = [0] * len(shape)
            if pieces > 1:
                if shape[dim] % pieces:
                    raise ValueError(f"{key!r} dim {dim} ({shape[dim]}) is not divisible by "
                                     f"--tensor-model-parallel-size {pieces}")
                local[dim] //= pieces
                offsets[dim] = rank * local[dim]
            data = torch.empty(local, dtype=source.dtype, device="meta")
            rank_offsets = ((dim, rank, pieces),) if pieces > 1 else ()
            sharded = ShardedTensor.from_rank_offsets(entry.key, data, *rank_offsets, replica_id=entry.replica_id)
            out[name if pieces == 1 else f"{name}/tp{rank}"] = sharded
            index[(entry.key, tuple(offsets))] = (key, rank)
    return out, index


def save(sharded_state_dict: Dict, index: Mapping[PieceKey, Tuple], source: PieceSource, checkpoint_dir: str) -> None:
    """``dist_checkpointing.save`` of a :func:`lazy_sharded_state_dict`, streaming its tensors."""
    from megatron.core import dist_checkpointing

    def produce(fqn: str, offsets: Tuple[int, ...]) -> torch.Tensor:
        key, rank = index[(fqn, tuple(offsets))]
        return source.piece(key, rank)

    dist_checkpointing.save(sharded_state_dict, checkpoint_dir, sharded_strategy=_strategy(produce))


def _strategy(produce: Callable[[str, Tuple[int, ...]], torch.Tensor]):
    """megatron's torch_dist save strategy with the streaming writer and the on-demand planner
    (classes built here so that importing this module does not import megatron)."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    from megatron.core.dist_checkpointing.strategies.state_dict_saver import save_state_dict_async_plan
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner, TorchDistSaveShardedStrategy, _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict)
    from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _write_item
    from torch.distributed.checkpoint.planner import WriteItemType

    class OnDemandPlanner(MCoreSavePlanner):
        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            return produce(write_item.index.fqn, tuple(write_item.index.offset))

    class StreamingWriter(FileSystemWriterAsync):
        """Writes the plan's items in order into one file, each resolved just before it is
        written and dropped right after."""

        def prepare_write_data(self, plan, planner) -> None:
            self._plan, self._planner, self._results = plan, planner, None

        def get_save_function_and_args(self):
            return self._write_all, None, []

        def _write_all(self) -> None:
            items = [i for i in self._plan.items if i.type == WriteItemType.BYTE_IO]
            items += [i for i in self._plan.items if i.type != WriteItemType.BYTE_IO]
            name = f"{self._plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
            transforms = [self.transforms] if hasattr(self, "transforms") else []
            extra = {}
            if "serialization_format" in inspect.signature(_write_item).parameters:
                from torch.distributed.checkpoint.filesystem import SerializationFormat

                extra["serialization_format"] = SerializationFormat.TORCH_SAVE
            results = []
            with open(os.path.join(self.checkpoint_dir, name), "wb") as stream:
                for item in items:
                    data = self._planner.resolve_data(item)
                    if isinstance(data, torch.Tensor):
                        data = data.detach()
                        if data.untyped_storage().nbytes() != data.numel() * data.element_size():
                            data = data.clone()  # torch.save writes a view's whole storage
                    results.append(_write_item(*transforms, stream, data, item, name, **extra))
                    del data
                stream.flush()
                os.fsync(stream.fileno())
            self._results = results

        def retrieve_write_results(self):
            if self._results is None:
                raise RuntimeError("the streaming checkpoint writer has not written its items")
            return self._results

    class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
        def async_save(self, sharded_state_dict, checkpoint_dir):
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            pyt_state_dict = mcore_to_pyt_state_dict(flat, False)
            writer = StreamingWriter(checkpoint_dir, thread_count=1)
            planner = OnDemandPlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                      flatten_state_dict=False)
            planned = save_state_dict_async_plan(pyt_state_dict, writer, None, 0, planner=planner)
            return self._get_save_and_finalize_callbacks(writer, planned[0])

    return StreamingSaveStrategy("torch_dist", 1)
