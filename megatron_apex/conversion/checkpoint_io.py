"""Diffusers folders <-> our megatron-core distributed checkpoints, streamed, for any model
family that has a mapping table (tools/convert_hf.py is the command line; docs/conversion.md
the user guide).

import: the safetensors headers are checked against the keys and shapes the table expects
before anything is read. The checkpoint is then written by megatron's ``dist_checkpointing``
from this ONE process (it accepts several shards of a key from one rank) through
``streaming_save``: when the writer reaches a tensor, its HF tensors are read, converted (QKV
fused), cut into the tensor-parallel pieces a TP=T run would save, written and dropped.
Pipeline stages address layers by their global index, so a checkpoint has no pipeline layout
of its own: any TP/PP run (and any other) loads it, resharding on load.

export: the checkpoint's full (TP=1) tensors are read with torch DCP (which assembles whatever
TP/PP pieces were saved) in groups of about the largest tensor's size; each tensor is split
back into diffusers' keys and written straight into its safetensors shard, whose layout was
computed beforehand from the shapes alone. Memory holds about one group, whatever the model and shard sizes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from megatron_apex import checkpoint
from megatron_apex.conversion import hf_io, pipeline_io
from megatron_apex.conversion.engine import EXTRA_STATE_SUFFIX, ParamRule, expand, iter_ours_to_hf, ours_to_hf

APEX_CONFIG_NAME = "megatron_apex_config.json"
EXTRAS_MODES = ("inline", "separate", "drop")
WEIGHTS = ("model", "ema")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MAX_LISTED = 12


# ============================================================================ model families
@dataclass(frozen=True)
class ModelFamily:
    """Everything family-specific the generic import/export/verify need. A new family (Sana)
    is one more instance of this: its table, config translation and model builder."""

    name: str
    diffusers_class: str
    arch_fields: Tuple[str, ...]  # config fields that config.json determines
    config_from_diffusers: Callable[..., Any]  # (config.json dict, **overrides) -> our config
    config_to_diffusers: Callable[[Any], Dict]
    config_from_saved: Callable[[Dict], Any]  # train_state.json -> our config
    mapping_table: Callable[[Any], List[ParamRule]]
    transform_context: Callable[[Any], Dict]
    hf_to_ours: Callable[..., Mapping[str, torch.Tensor]]  # (HF mapping, config, source=, lazy=) -> TP=1 state dict
    build_model: Callable[[Any], torch.nn.Module]  # TP=1, every layer, on the current default device
    model_names: Callable[[], Mapping[str, Callable[[], Any]]]  # registry: name -> config factory
    default_model_name: str
    load_reference: Callable[[str], torch.nn.Module]  # the diffusers model of a folder
    reference_forward: Callable[..., torch.Tensor]  # (hf model, config, x, t, ctx, mask) -> velocity
    context_dim: Callable[[Any], int]  # width of the text states the model takes
    # config.json fields a pipeline's other components fix (latent channels, text width)
    pipeline_fields: Tuple[str, ...] = ()

    def num_layers(self, config) -> int:
        return config.num_layers


def _qwen_image_family() -> ModelFamily:
    from megatron_apex.conversion import qwen_image_mapping as qm

    def build(config):
        from megatron_apex.models.qwen_image.model import QwenImageModel
        from megatron_apex.models.specs import get_qwen_image_layer_spec

        return QwenImageModel(config, spec=get_qwen_image_layer_spec("local"), layer_range=(0, config.num_layers))

    def from_saved(state):
        from megatron_apex.models.registry import get_model_config

        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in state["model_config"].items()}
        return get_model_config(state["model_name"], **saved)

    def names():
        from megatron_apex.models.qwen_image.config import QwenImageConfig
        from megatron_apex.models.registry import MODEL_REGISTRY

        return {name: make for name, make in MODEL_REGISTRY.items() if isinstance(make(), QwenImageConfig)}

    def load_reference(path):
        from diffusers import QwenImageTransformer2DModel

        return QwenImageTransformer2DModel.from_pretrained(path, torch_dtype=torch.float32).eval()

    def reference_forward(hf_model, config, x, t, ctx, mask):
        from megatron_apex.models.qwen_image.model import pack_latents, unpack_latents

        b, _, h, w = x.shape
        p = config.patch_size
        out = hf_model(hidden_states=pack_latents(x, p), encoder_hidden_states=ctx, encoder_hidden_states_mask=mask,
                       timestep=t, img_shapes=[(1, h // p, w // p)] * b, return_dict=False)[0]
        return unpack_latents(out, h, w, p)

    return ModelFamily(
        name="qwen-image", diffusers_class=qm.DIFFUSERS_CLASS, arch_fields=tuple(qm.DIFFUSERS_ARCH_FIELDS),
        config_from_diffusers=qm.config_from_diffusers, config_to_diffusers=qm.config_to_diffusers,
        config_from_saved=from_saved, mapping_table=qm.qwen_image_mapping_table,
        transform_context=qm.transform_context, hf_to_ours=qm.hf_to_megatron, build_model=build,
        model_names=names, default_model_name="qwen-image-20b", load_reference=load_reference,
        reference_forward=reference_forward, context_dim=lambda config: config.joint_attention_dim,
        pipeline_fields=("in_channels", "out_channels", "joint_attention_dim"),
    )


def _sana_family() -> ModelFamily:
    from megatron_apex.conversion import sana_mapping as sm

    def build(config):
        from megatron_apex.models.sana.model import SanaModel
        from megatron_apex.models.specs import get_sana_layer_spec

        return SanaModel(config, spec=get_sana_layer_spec("local"), layer_range=(0, config.num_layers))

    def from_saved(state):
        from megatron_apex.models.registry import get_model_config

        return get_model_config(state["model_name"], **state["model_config"])

    def names():
        from megatron_apex.models.registry import MODEL_REGISTRY
        from megatron_apex.models.sana.config import SanaConfig

        return {name: make for name, make in MODEL_REGISTRY.items() if isinstance(make(), SanaConfig)}

    def load_reference(path):
        from diffusers import SanaTransformer2DModel

        return SanaTransformer2DModel.from_pretrained(path, torch_dtype=torch.float32).eval()

    def reference_forward(hf_model, config, x, t, ctx, mask):
        # Sana's pipelines pass timestep = 1000 * sigma; our t is sigma (SanaModel docstring).
        return hf_model(hidden_states=x, encoder_hidden_states=ctx, encoder_attention_mask=mask,
                        timestep=t * 1000.0, return_dict=False)[0]

    return ModelFamily(
        name="sana", diffusers_class=sm.DIFFUSERS_CLASS, arch_fields=tuple(sm.DIFFUSERS_ARCH_FIELDS),
        config_from_diffusers=sm.config_from_diffusers, config_to_diffusers=sm.config_to_diffusers,
        config_from_saved=from_saved, mapping_table=sm.sana_mapping_table,
        transform_context=sm.transform_context, hf_to_ours=sm.hf_to_megatron, build_model=build,
        model_names=names, default_model_name="sana-1.6b", load_reference=load_reference,
        reference_forward=reference_forward, context_dim=lambda config: config.caption_channels,
        pipeline_fields=("in_channels", "out_channels", "caption_channels"),
    )


FAMILIES: Dict[str, Callable[[], ModelFamily]] = {"qwen-image": _qwen_image_family, "sana": _sana_family}
AUTO = "auto"


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"--model {name!r}: unknown model family; choose one of {', '.join(sorted(FAMILIES))} "
                         f"(or {AUTO})")
    return FAMILIES[name]()


def _stock_class(name):
    """A folder saved by one of our APEX transformer classes (megatron_apex.inference.diffusers_apex:
    ``Apex<stock class>``) converts as its stock class: same keys, plus the extras the table knows."""
    return name[len("Apex"):] if isinstance(name, str) and name.startswith("Apex") else name


def family_of_folder(folder: str, flag: str = "--hf-path") -> ModelFamily:
    """The family whose diffusers class a folder's ``config.json`` names (``--model auto``)."""
    found = _stock_class(hf_io.read_config(folder, flag).get("_class_name"))
    for make in FAMILIES.values():
        family = make()
        if family.diffusers_class == found:
            return family
    known = ", ".join(f"{make().diffusers_class} (--model {name})" for name, make in FAMILIES.items())
    raise ValueError(f"{flag} {folder}: config.json _class_name is {found!r}; convertible classes: {known}")


def family_of_checkpoint(load: str, flag: str = "--load") -> ModelFamily:
    """The family of a checkpoint's model (``--model auto`` on export): the registry name its
    train_state.json records."""
    from megatron_apex.models.registry import MODEL_REGISTRY

    state = checkpoint.read_train_state(checkpoint.resolve_checkpoint(load, flag))
    name = state.get("model_name")
    if name not in MODEL_REGISTRY:
        raise ValueError(f"{flag} {load}: train_state.json names model {name!r}, not a registered model")
    for make in FAMILIES.values():
        family = make()
        if name in family.model_names():
            return family
    raise ValueError(f"{flag} {load}: model {name!r} belongs to no convertible family ({', '.join(FAMILIES)})")


# ============================================================================ shared helpers
def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def check_family(family: ModelFamily, diffusers_config: Mapping, flag: str, path: str) -> None:
    found = _stock_class(diffusers_config.get("_class_name"))
    if found == family.diffusers_class:
        return
    other = [name for name, make in FAMILIES.items() if name != family.name and make().diffusers_class == found]
    hint = f" (use --model {other[0]})" if other else ""
    raise ValueError(f"{flag} {path}: config.json _class_name is {found!r}, not {family.diffusers_class!r} "
                     f"as --model {family.name} needs{hint}")


def _init_single_process() -> None:
    """dist_checkpointing needs a process group; this tool is one process writing every shard."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("run tools/convert_hf.py as ONE process (not under torchrun): it writes the "
                           "shards of every tensor-parallel rank itself")
    from megatron_apex.parallel import init_distributed

    init_distributed(1, 1)


def _meta_model(family: ModelFamily, config) -> torch.nn.Module:
    with torch.device("meta"):
        return family.build_model(config)


def _plain_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith(EXTRA_STATE_SUFFIX)}


def expected_hf_keys(family: ModelFamily, config) -> Tuple[Dict[str, Tuple[int, ...]], set]:
    """{diffusers key: shape} of the model ``config`` describes (found by converting the
    meta-device model's state dict), and which of those keys are optional extras."""
    table = family.mapping_table(config)
    meta = _plain_state(_meta_model(family, config))
    hf = ours_to_hf(meta, table, family.num_layers(config), family.transform_context(config))
    optional = {h for _, hf_keys, rule in expand(table, family.num_layers(config)) if rule.optional for h in hf_keys}
    return {k: tuple(v.shape) for k, v in hf.items()}, optional


def check_hf_keys(family: ModelFamily, config, source: hf_io.SafetensorsFolder, flag: str) -> None:
    """One error listing every missing, unexpected and mis-shaped key, before any tensor is read."""
    expected, optional = expected_hf_keys(family, config)
    missing = sorted(k for k in expected if k not in source and k not in optional)
    unexpected = sorted(k for k in source if k not in expected)
    mismatched = sorted(f"{k} {list(source.shape(k))} (expected {list(expected[k])})"
                        for k in expected if k in source and tuple(source.shape(k)) != expected[k])
    not_float = sorted(k for k in source if k in expected and not source.dtype(k).is_floating_point)
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched)}")
    if not_float:
        problems.append(f"non-floating-point tensors: {_listing(not_float)}")
    if problems:
        raise ValueError(f"{flag} {source.folder}: the weights do not match the {family.diffusers_class} its "
                         f"config.json describes (with these APEX options): " + "; ".join(problems))


def _apex_side_config(folder: str, family: ModelFamily) -> Dict:
    """Non-architecture fields saved by an earlier export (so export -> import restores them)."""
    path = os.path.join(folder, APEX_CONFIG_NAME)
    if not os.path.isfile(path):
        return {}
    saved = hf_io.read_json(path, "--hf-path").get("model_config", {})
    return {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k not in family.arch_fields}


def config_for_folder(family: ModelFamily, folder: str, overrides: Optional[Mapping] = None, flag: str = "--hf-path"):
    """(our config, config.json dict) for a diffusers folder: architecture from config.json,
    APEX fields from the folder's megatron_apex_config.json when present, then ``overrides``."""
    diffusers_config = hf_io.read_config(folder, flag)
    check_family(family, diffusers_config, flag, folder)
    fields = {**_apex_side_config(folder, family), **dict(overrides or {})}
    try:
        config = family.config_from_diffusers(diffusers_config, **fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{flag} {folder}: {err}") from None
    return config, diffusers_config


def _saved_shape(state: Mapping) -> str:
    """'N layers, hidden size H' of a checkpoint's model, from its train_state.json (for messages)."""
    saved = state.get("model_config")
    saved = saved if isinstance(saved, dict) else {}
    heads, dim = saved.get("num_attention_heads"), saved.get("attention_head_dim")
    hidden = heads * dim if isinstance(heads, int) and isinstance(dim, int) else "?"
    return f"{saved.get('num_layers', '?')} layers, hidden size {hidden}"


def _registry_name(family: ModelFamily, config) -> Tuple[str, str]:
    """(registry name to rebuild ``config`` from, how it matches: "exact" | "architecture" |
    "none"). All fields are saved, so any name rebuilds the model; the match tells the user
    which --model to train with."""
    ours = dataclasses.asdict(config)
    same_arch = None
    for name, factory in family.model_names().items():
        theirs = dataclasses.asdict(factory())
        if theirs == ours:
            return name, "exact"
        if same_arch is None and all(theirs.get(k) == ours.get(k) for k in family.arch_fields):
            same_arch = name
    return (same_arch, "architecture") if same_arch else (family.default_model_name, "none")


def _split_dims(table: Sequence[ParamRule], num_layers: int) -> Dict[str, Optional[int]]:
    return {ours: rule.tp_split_dim for ours, _, rule in expand(table, num_layers)}


def _json_ready(value):
    return json.loads(json.dumps(value, default=str))


# ============================================================================ import
def _write_checkpoint(save_dir: str, sharded: Dict, index: Mapping, source, train_state: Dict) -> str:
    """``save_dir/iter_0000000`` (tensors streamed from ``source``), its train_state.json and
    ``save_dir/latest``: the layout the trainer writes and loads."""
    from megatron_apex.conversion import streaming_save

    ckpt = checkpoint.checkpoint_dir(save_dir, 0)
    os.makedirs(ckpt)
    streaming_save.save(sharded, index, source, ckpt)
    checkpoint.write_json_atomic(os.path.join(ckpt, checkpoint.TRAIN_STATE), train_state)
    with open(os.path.join(save_dir, checkpoint.LATEST), "w") as f:
        f.write("0\n")
    return ckpt


def import_hf(family: ModelFamily, hf_path: str, save: str, tensor_model_parallel_size: int = 1,
              pipeline_model_parallel_size: int = 1, overrides: Optional[Mapping] = None,
              model_name: Optional[str] = None, on_convert: Optional[Callable] = None,
              progress: bool = False) -> Dict:
    """diffusers folder -> ``save/iter_0000000`` (+ ``latest``); returns the train state written.

    Streams: each of our tensors is read from the safetensors file(s), converted and written
    when the checkpoint writer reaches it (``streaming_save``). ``on_convert(key, tensor)``
    (tests, measurements) sees every converted tensor; ``progress``: a bar of them on stderr."""
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_apex.conversion.streaming_save import PieceSource, lazy_sharded_state_dict

    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    for flag, value in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    config, diffusers_config = config_for_folder(family, hf_path, overrides)
    hf_io.check_output_path(save, "--save")
    config.validate(tp)
    layers = family.num_layers(config)
    if layers % pp:
        raise ValueError(f"--pipeline-model-parallel-size {pp} does not divide the model's {layers} layers")
    if model_name is not None and model_name not in family.model_names():
        raise ValueError(f"--model-name {model_name!r}: not a registered model; known: "
                         f"{', '.join(sorted(family.model_names()))}")

    with hf_io.SafetensorsFolder(hf_path, "--hf-path") as source:
        check_hf_keys(family, config, source, "--hf-path")
        table = family.mapping_table(config)
        split_dims = _split_dims(table, layers)
        meta = _meta_model(family, config)
        shapes = {key: tuple(tensor.shape) for key, tensor in _plain_state(meta).items()}
        for key, shape in shapes.items():
            dim = split_dims.get(key)
            if dim is not None and shape[dim] % tp:
                raise ValueError(f"--tensor-model-parallel-size {tp} does not divide dim {dim} of {key!r} "
                                 f"({shape[dim]})")

        _init_single_process()
        prefix = "model."
        template = meta.sharded_state_dict(prefix=prefix)
        # Nothing is read yet: each tensor is read and converted when the writer asks for it.
        tensors = family.hf_to_ours(source, config, source=f"--hf-path {hf_path}", lazy=True)
        wanted = {v.key[len(prefix):] for v in template.values() if isinstance(v, ShardedTensor)}
        if set(tensors) != wanted:
            raise ValueError(f"converted keys and model disagree: only converted "
                             f"{_listing(sorted(set(tensors) - wanted))}; only in the model "
                             f"{_listing(sorted(wanted - set(tensors)))}")
        bar = progress_bar(len(tensors), "import", progress)

        def converted(key: str, tensor: torch.Tensor) -> None:
            bar.update(1)
            if on_convert is not None:
                on_convert(key, tensor)

        pieces = PieceSource(tensors, shapes, split_dims, tp, config.torch_dtype, converted)
        sharded, index = lazy_sharded_state_dict(template, pieces, prefix)
        source_dtype = source.dominant_dtype()

        name, match = (model_name, "given") if model_name else _registry_name(family, config)
        train_state = {
            "iteration": 0,
            "consumed_samples": 0,
            "model_name": name,
            "model_config": _json_ready(dataclasses.asdict(config)),
            "has_ema": False,
            "has_teacher": False,
            "args": {"model": name, "data": {"data_path": None},
                     "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}},
            "source": {
                "format": "diffusers", "family": family.name, "hf_path": os.path.abspath(hf_path),
                "config_sha256": hf_io.file_sha256(os.path.join(hf_path, hf_io.CONFIG_NAME)),
                "diffusers_config": diffusers_config,
                "dtype": str(source_dtype).replace("torch.", "") if source_dtype is not None else None,
                "weight_files": source.files,
                "registry_match": match,
            },
        }
        with bar, hf_io.atomic_output_dir(save, "--save") as tmp:
            _write_checkpoint(tmp, sharded, index, pieces, train_state)
    return train_state


# ============================================================================ export
class CheckpointTensors(Mapping[str, torch.Tensor]):
    """Our TP=1 tensors of one checkpoint (``weights`` prefix), read when asked for: keys are
    grouped in ``order`` into reads of at most ``group_bytes`` (a larger tensor is read alone;
    the read assembles full tensors from whatever TP/PP pieces were saved), the group of the
    key asked for is read, and each tensor is handed out once and forgotten, so memory holds
    one group. ``on_read(keys)`` (tests, measurements) sees every read."""

    def __init__(self, ckpt: str, entries: Mapping[str, Tuple[str, Tuple[int, ...], torch.dtype]],
                 order: Sequence[str], group_bytes: int, on_read: Optional[Callable[[List[str]], None]] = None):
        self.ckpt, self.entries, self.on_read = ckpt, dict(entries), on_read
        self.groups: List[List[str]] = []
        size = 0
        for key in order:
            _, shape, dtype = self.entries[key]
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            if not self.groups or (self.groups[-1] and size + nbytes > group_bytes):
                self.groups.append([])
                size = 0
            self.groups[-1].append(key)
            size += nbytes
        self._group_of = {key: i for i, group in enumerate(self.groups) for key in group}
        self._held: Dict[str, torch.Tensor] = {}
        self._reader = None

    def _read(self, group: List[str]) -> Dict[str, torch.Tensor]:
        """One torch-DCP read of the group's full tensors (megatron's checkpoints are torch DCP
        checkpoints keyed by ShardedTensor key; DCP assembles a full tensor from the stored
        TP pieces). Straight DCP rather than ``dist_checkpointing.load``: that one unpickles
        the checkpoint's metadata on every call, most of an export's time at ~40 ms a call."""
        import torch.distributed.checkpoint as dcp

        if self._reader is None:
            self._reader = _MetadataOnceReader(self.ckpt)
        request = {}
        for key in group:
            sharded_key, shape, dtype = self.entries[key]
            request[sharded_key] = torch.empty(shape, dtype=dtype)
        if self.on_read is not None:
            self.on_read(list(group))
        # no_dist is the point: one process reads
        with warnings.catch_warnings(), checkpoint.reading_checkpoint(self.ckpt, self._reader.read_metadata()):
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(request, storage_reader=self._reader, no_dist=True)
        return {key: request[self.entries[key][0]] for key in group}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._held:
            self._held = {}  # let the previous group go before reading the next
            self._held = self._read(self.groups[self._group_of[key]])
        return self._held.pop(key)

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key) -> bool:
        return key in self.entries


def _MetadataOnceReader(path: str):
    """torch DCP's FileSystemReader reading ``.metadata`` once for all the loads it serves
    (the caller has checked the pickle, ``checkpoint.check_checkpoint_pickles``)."""
    from torch.distributed.checkpoint import FileSystemReader

    class Reader(FileSystemReader):
        def read_metadata(self):
            if getattr(self, "_metadata", None) is None:
                self._metadata = super().read_metadata()
            return self._metadata

    return Reader(path)


class _MetaTensors(Mapping[str, torch.Tensor]):
    """The same keys as a :class:`CheckpointTensors`, as meta tensors (the export's layout)."""

    def __init__(self, entries: Mapping[str, Tuple[str, Tuple[int, ...], torch.dtype]]):
        self.entries = entries

    def __getitem__(self, key: str) -> torch.Tensor:
        _, shape, dtype = self.entries[key]
        return torch.empty(shape, dtype=dtype, device="meta")

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def _checkpoint_tensors(ckpt: str) -> Dict:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_tensors_metadata(ckpt)


def hf_items(family: ModelFamily, config, tensors: Mapping[str, torch.Tensor], out_dtype: torch.dtype, extras: str,
             source: str) -> Iterator[Tuple[str, torch.Tensor, bool]]:
    """(diffusers key, tensor in ``out_dtype``, is APEX extra) for our (TP=1) ``tensors``, one
    of ours read at a time, in table order; extras left out with ``extras == "drop"``."""
    for hf_key, tensor, rule in iter_ours_to_hf(tensors, family.mapping_table(config), family.num_layers(config),
                                                family.transform_context(config), source=source):
        if rule.optional and extras == "drop":
            continue
        yield hf_key, tensor.to(out_dtype), rule.optional


def write_hf_transformer(folder: str, family: ModelFamily, config, make_tensors: Callable[[bool], Mapping],
                         out_dtype: torch.dtype, extras: str, max_shard_size: int,
                         source: str, progress: bool = False) -> Tuple[List[str], List[str]]:
    """A diffusers transformer folder's weights (``folder`` exists), streamed: the layout is
    computed from ``make_tensors(True)`` (meta tensors), then ``make_tensors(False)`` is read
    one tensor at a time and each result written to disk at once (``progress``: a bar of them
    on stderr). Returns (files, extra keys)."""
    layout = [(key, extra) for key, _, extra in hf_items(family, config, make_tensors(True), out_dtype, extras,
                                                         source)]
    extra_keys = [key for key, extra in layout if extra]
    with progress_bar(len(layout), "export", progress) as bar:
        def items(meta: bool):
            stream = hf_items(family, config, make_tensors(meta), out_dtype, extras, source)
            return stream if meta else _counted(stream, bar)

        files = hf_io.write_tensor_stream(folder, items, max_shard_size, separate_extras=extras == "separate")
    return files, extra_keys


def progress_bar(total: int, desc: str, enabled: bool):
    """A per-tensor tqdm bar on stderr, silent unless ``enabled``."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True)


def _counted(items: Iterator, bar) -> Iterator:
    for item in items:
        yield item
        bar.update(1)


def check_pipeline_interface(family: ModelFamily, config, base: str, flag: str = "--base-pipeline") -> None:
    """The base pipeline's other components were made for its own transformer: refuse ours
    when it differs in what they fix (latent channels, text-state width), as read from the
    base's ``transformer/config.json`` (not checked when the base has none)."""
    theirs_path = os.path.join(base, pipeline_io.TRANSFORMER, hf_io.CONFIG_NAME)
    if not os.path.isfile(theirs_path):
        return
    theirs = hf_io.read_json(theirs_path, flag)
    ours = family.config_to_diffusers(config)
    differs = [f"{k} {theirs.get(k)!r} (ours {ours[k]!r})" for k in family.pipeline_fields
               if k in theirs and theirs.get(k) != ours[k]]
    if differs:
        raise ValueError(f"{flag} {base}: its other components expect a transformer with "
                         f"{', '.join(differs)}")


def export_hf(family: ModelFamily, load: str, out: str, weights: str = "model",
              max_shard_size="5GB", dtype: str = "auto", extras: str = "inline",
              base_pipeline: Optional[str] = None, read_group_bytes: Optional[int] = None,
              on_read: Optional[Callable[[List[str]], None]] = None, progress: bool = False) -> Dict:
    """Our checkpoint (any TP/PP) -> a diffusers transformer folder, or with ``base_pipeline``
    a pipeline folder: the base's other components (``pipeline_io.populate_from_base``:
    copies, links out of the base refused) and our transformer in ``transformer/``. Streams: the
    checkpoint is read in groups of at most ``read_group_bytes`` (default: the largest
    tensor's size) and every converted tensor is written to its shard at once; ``on_read``
    (tests, measurements) sees each group read; ``progress``: a bar of the tensors written on
    stderr. Returns a summary."""
    from megatron.core.dist_checkpointing import ShardedTensor

    if weights not in WEIGHTS:
        raise ValueError(f"--weights {weights!r}: choose one of {WEIGHTS}")
    if extras not in EXTRAS_MODES:
        raise ValueError(f"--extras {extras!r}: choose one of {EXTRAS_MODES}")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose auto or one of {', '.join(DTYPES)}")
    shard_bytes = hf_io.parse_size(max_shard_size)
    ckpt = checkpoint.resolve_checkpoint(load, "--load")
    state = checkpoint.read_train_state(ckpt)
    hf_io.check_output_path(out, "--hf-path")
    if weights == "ema" and not state.get("has_ema"):
        raise ValueError(f"--weights ema: {ckpt} holds no EMA weights (trained with --ema-decay 0)")
    name = state.get("model_name")
    if name not in family.model_names():
        other = [n for n, make in FAMILIES.items() if n != family.name and name in make().model_names()]
        hint = f" (use --model {other[0]})" if other else ""
        # the registry name alone misleads: an imported model of no registry shape is saved under its family's default
        raise ValueError(f"--load {ckpt}: holds a {other[0] if other else 'non-' + family.name} model "
                         f"({_saved_shape(state)}; registry name {name!r}), not a --model {family.name} model{hint}")
    try:
        config = family.config_from_saved(state)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"--load {ckpt}: cannot rebuild the model config from train_state.json ({err})") from None
    diffusers_config = family.config_to_diffusers(config)
    if base_pipeline is not None:
        pipeline_io.check_base_pipeline(base_pipeline, family.diffusers_class)
        check_pipeline_interface(family, config, base_pipeline)
    source = state.get("source") or {}
    original = source.get("diffusers_config")
    if isinstance(original, dict) and original.get("_class_name") == family.diffusers_class and \
            all(original.get(k) == diffusers_config[k] for k in family.arch_fields):
        # the imported config.json as it was (its diffusers version, fields of other versions)
        diffusers_config = original
    if dtype == "auto":
        out_dtype = DTYPES.get(source.get("dtype") or "", config.torch_dtype)
    else:
        out_dtype = DTYPES[dtype]

    checkpoint.check_checkpoint_files(ckpt, checkpoint.check_checkpoint_pickles(ckpt))
    _init_single_process()
    layers = family.num_layers(config)
    table = family.mapping_table(config)
    prefix = f"{weights}."
    template = {k: v for k, v in _meta_model(family, config).sharded_state_dict(prefix=prefix).items()
                if isinstance(v, ShardedTensor)}
    by_key = {v.key[len(prefix):]: v for v in template.values()}

    saved = _checkpoint_tensors(ckpt)
    missing = sorted(v.key for v in template.values() if v.key not in saved)
    mismatched = sorted(f"{v.key} {list(saved[v.key].global_shape)} (model {list(v.global_shape)})"
                        for v in template.values() if v.key in saved
                        and tuple(saved[v.key].global_shape) != tuple(v.global_shape))
    if missing or mismatched:
        parts = ([f"missing tensors: {_listing(missing)}"] if missing else []) + \
                ([f"shape mismatches: {_listing(mismatched)}"] if mismatched else [])
        raise ValueError(f"--load {ckpt}: does not match the model its train_state.json describes: " + "; ".join(parts))

    rules = [(o, h, r) for o, h, r in expand(table, layers) if o in by_key or not r.optional]
    absent = sorted(o for o, _, _ in rules if o not in by_key)
    unmapped = sorted(set(by_key) - {o for o, _, _ in rules})
    if absent or unmapped:
        raise ValueError(f"mapping table and model disagree: table-only {_listing(absent)}; "
                         f"model-only {_listing(unmapped)}")
    entries = {o: (by_key[o].key, tuple(by_key[o].global_shape), saved[by_key[o].key].dtype) for o, _, _ in rules}
    if read_group_bytes is None:
        read_group_bytes = max(torch.Size(shape).numel() * dt.itemsize for _, shape, dt in entries.values())

    def tensors(meta: bool) -> Mapping[str, torch.Tensor]:
        if meta:
            return _MetaTensors(entries)
        return CheckpointTensors(ckpt, entries, [o for o, _, _ in rules], read_group_bytes, on_read)

    with hf_io.atomic_output_dir(out, "--hf-path") as tmp:
        copied = None
        folder = tmp
        if base_pipeline is not None:
            copied = pipeline_io.populate_from_base(base_pipeline, tmp, family.diffusers_class,
                                                    target_time_embedder=config.target_time_embedder
                                                    and extras != "drop")
            folder = os.path.join(tmp, pipeline_io.TRANSFORMER)
            os.makedirs(folder)
        files, written_extras = write_hf_transformer(folder, family, config, tensors, out_dtype, extras, shard_bytes,
                                                     source=f"--load {ckpt}", progress=progress)
        with open(os.path.join(folder, hf_io.CONFIG_NAME), "w") as f:
            json.dump(diffusers_config, f, indent=2, sort_keys=True)
            f.write("\n")
        with open(os.path.join(folder, APEX_CONFIG_NAME), "w") as f:
            json.dump({"family": family.name, "model_name": state.get("model_name"),
                       "model_config": state["model_config"], "weights": weights, "checkpoint": os.path.abspath(ckpt),
                       "iteration": state.get("iteration"), "extras": extras, "extra_keys": written_extras,
                       "dtype": str(out_dtype).replace("torch.", ""),
                       "base_pipeline": os.path.abspath(base_pipeline) if base_pipeline else None},
                      f, indent=1, sort_keys=True)
            f.write("\n")
    return {"files": files, "extras": written_extras, "dtype": out_dtype, "checkpoint": ckpt, "weights": weights,
            "base_pipeline": copied}


# ============================================================================ verify
def text_mask(batch: int, text_len: int) -> torch.Tensor:
    """Right-padded 1/0 mask, valid lengths spread from ``text_len`` down to 1 (all different
    when batch <= text_len)."""
    mask = torch.zeros(batch, text_len)
    for i in range(batch):
        valid = text_len if batch == 1 else text_len - round(i * (text_len - 1) / (batch - 1))
        mask[i, :max(1, valid)] = 1
    return mask


def load_ours_from_hf(family: ModelFamily, hf_path: str, overrides: Optional[Mapping] = None):
    """Our TP=1 model with a diffusers folder's weights, converted in memory."""
    config, _ = config_for_folder(family, hf_path, overrides)
    source = hf_io.SafetensorsFolder(hf_path, "--hf-path")
    check_hf_keys(family, config, source, "--hf-path")
    _init_single_process()
    model = family.build_model(config.replace(perform_initialization=False))
    state = family.hf_to_ours(source, config, source=f"--hf-path {hf_path}")
    source.close()
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(EXTRA_STATE_SUFFIX)]
    if missing or result.unexpected_keys:
        raise ValueError(f"converted weights do not fit the model: missing {missing}, unexpected {result.unexpected_keys}")
    return model.eval(), config


def verify(family: ModelFamily, hf_path: str, load: Optional[str] = None, weights: str = "model", batch: int = 2,
           grid: Tuple[int, int] = (4, 4), text_len: int = 8, seed: int = 0) -> Dict:
    """Forward of diffusers' model vs ours on the same random inputs (padded text mask, one
    valid length per sample); returns the max abs difference and the reference's scale."""
    for flag, value in (("--batch", batch), ("--text-len", text_len), ("--grid", grid[0]), ("--grid", grid[1])):
        if value < 1:
            raise ValueError(f"{flag} must be positive, got {value}")
    hf_config, _ = config_for_folder(family, hf_path)
    if load is not None:
        from megatron_apex.inference.loading import load_model_for_inference

        model, _ = load_model_for_inference(load, weights)
        config = model.model_config
        if type(config) is not type(hf_config):
            raise ValueError(f"--load {load} holds a {type(config).__name__} model, --hf-path {hf_path} a "
                             f"{family.diffusers_class} ({type(hf_config).__name__})")
        differs = [k for k in family.arch_fields if getattr(config, k) != getattr(hf_config, k)]
        if differs:
            raise ValueError(f"--load {load} and --hf-path {hf_path} describe different models "
                             f"({', '.join(f'{k}: {getattr(config, k)} vs {getattr(hf_config, k)}' for k in differs)})")
    else:
        model, config = load_ours_from_hf(family, hf_path)
    reference = family.load_reference(hf_path)

    gen = torch.Generator().manual_seed(seed)
    p = config.patch_size
    x = torch.randn(batch, config.out_channels, grid[0] * p, grid[1] * p, generator=gen)
    t = torch.rand(batch, generator=gen)
    ctx = torch.randn(batch, text_len, family.context_dim(config), generator=gen)
    mask = text_mask(batch, text_len)
    with torch.no_grad():
        ref = family.reference_forward(reference, config, x, t, ctx, mask)
        ours = model(x, t, ctx, mask)
    return {"max_abs_diff": (ours.float() - ref.float()).abs().max().item(),
            "ref_max_abs": ref.abs().max().item(), "shape": tuple(ours.shape)}
