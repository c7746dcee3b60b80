"""Bad input is refused early, in one line: contradicting flags name both flags, abbreviated
flags are refused, the launcher's own defaults never contradict a user's choice, and a bad
--load, --pretrained-checkpoint or --data-path fails before anything is built."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_apex.training.arguments import (PAPER_ONLY_FIELDS, RELEASED_ONLY_FIELDS, _SHARED_APEX_FIELDS,
                                              given_dests, parse_args)

REPO = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------- contradicting flags

# (id, refused command line, what the one line must name, the nearest consistent command line)
CONTRADICTIONS = [
    ("apex-start-past-end", ["--apex-start-iter", "5000", "--train-iters", "2000"],
     ("--apex-start-iter 5000", "--train-iters 2000"), ["--apex-start-iter", "1500", "--train-iters", "2000"]),
    ("apex-start-at-end", ["--apex-start-iter", "3", "--train-iters", "3"], ("--apex-start-iter", "--train-iters"),
     ["--apex-start-iter", "2", "--train-iters", "3"]),
    ("fm-lam", ["--objective", "fm", "--lam", "0.3"], ("--lam", "--objective fm"), ["--objective", "fm"]),
    ("fm-variant", ["--objective", "fm", "--apex-variant", "released"], ("--apex-variant", "--objective fm"),
     ["--objective", "apex", "--apex-variant", "released"]),
    ("fm-start", ["--objective", "fm", "--apex-start-iter", "0"], ("--apex-start-iter", "--objective fm"),
     ["--objective", "fm"]),
    ("fm-teacher", ["--objective", "fm", "--teacher", "frozen"], ("--teacher", "--objective fm"),
     ["--objective", "fm"]),
    ("fm-apex-option", ["--objective", "fm", "--apex-option", "w_dm=1"], ("--apex-option w_dm", "--objective fm"),
     ["--objective", "fm"]),
    ("fm-apex-preset", ["--objective", "fm", "--apex-preset", "release"], ("--apex-preset", "--objective fm"),
     ["--objective", "apex", "--apex-preset", "release"]),
    ("preset-paper", ["--apex-preset", "release", "--apex-variant", "paper"],
     ("--apex-variant paper", "--apex-preset release"), ["--apex-preset", "release"]),
    ("fm-shift-a", ["--objective", "fm", "--shift-a", "-0.5"], ("--shift-a", "--objective fm"),
     ["--objective", "fm", "--shift-kind", "diagonal", "--shift-a", "-0.5"]),  # a learnable shift's init
    ("fm-shift-site", ["--objective", "fm", "--shift-site", "input"], ("--shift-site", "--objective fm"),
     ["--objective", "apex", "--shift-site", "input"]),
    ("released-lam", ["--apex-variant", "released", "--lam", "0.3"], ("--lam", "--apex-variant released"),
     ["--apex-variant", "paper", "--lam", "0.3"]),
    ("released-lambda-e", ["--apex-variant", "released", "--lambda-e", "2"], ("--lambda-e", "--apex-variant released"),
     ["--apex-variant", "paper", "--lambda-e", "2"]),
    ("released-weighting", ["--apex-variant", "released", "--weighting", "endpoint"],
     ("--weighting", "--apex-variant released"), ["--apex-variant", "paper", "--weighting", "endpoint"]),
    ("released-fake-grad", ["--apex-variant", "released", "--fake-grad", "through"],
     ("--fake-grad", "--apex-variant released"), ["--apex-variant", "paper", "--fake-grad", "through"]),
    ("released-paper-field-option", ["--apex-variant", "released", "--apex-option", "lambda_p=2"],
     ("--apex-option lambda_p", "--apex-variant released"), ["--apex-variant", "paper", "--apex-option", "lambda_p=2"]),
    ("paper-teacher", ["--apex-variant", "paper", "--teacher", "online"], ("--teacher", "--apex-variant paper"),
     ["--apex-variant", "released", "--teacher", "online"]),
    ("paper-w-dm", ["--apex-variant", "paper", "--apex-option", "w_dm=1.0"],
     ("--apex-option w_dm", "--apex-variant paper"), ["--apex-variant", "released", "--apex-option", "w_dm=1.0"]),
    ("paper-cfg-scale", ["--apex-variant", "paper", "--apex-option", "cfg_scale=0.8"],
     ("--apex-option cfg_scale", "--apex-variant paper"),
     ["--apex-variant", "released", "--apex-option", "cfg_scale=0.8"]),
    # no --apex-variant: the default (paper) is the variant in effect, and the message says so
    ("default-variant-teacher", ["--teacher", "online"], ("--teacher", "--apex-variant paper (the default)"),
     ["--apex-variant", "released", "--teacher", "online"]),
    ("default-variant-dm-clamp", ["--apex-option", "dm_clamp=none"],
     ("--apex-option dm_clamp", "--apex-variant paper (the default)"),
     ["--apex-variant", "released", "--apex-option", "dm_clamp=none"]),
    ("apex-option-shift", ["--apex-option", "shift_a=-0.5"], ("--apex-option shift_a", "--shift-a"),
     ["--shift-a", "-0.5"]),
]


@pytest.mark.parametrize("argv, needles, consistent", [pytest.param(*c[1:], id=c[0]) for c in CONTRADICTIONS])
def test_contradicting_flags_are_refused_in_one_line_naming_both(argv, needles, consistent):
    with pytest.raises(ValueError) as err:
        parse_args(argv)
    message = str(err.value)
    assert "\n" not in message
    assert all(n in message for n in needles), message
    parse_args(consistent)  # the nearest consistent command line is accepted


def test_defaults_never_contradict():
    """A flag counts only when the command line gives it: every default combination parses, and
    the defaults of the other objective or variant reach no config."""
    assert parse_args([]).objective.apex == {}
    fm = parse_args(["--objective", "fm"])
    assert fm.objective.objective == "fm" and fm.objective.apex == {} and fm.model_overrides == {}
    assert parse_args(["--apex-variant", "released"]).objective.apex == {"variant": "released"}
    assert parse_args(["--apex-variant", "paper"]).objective.apex == {"variant": "paper"}


def test_given_dests_are_the_flags_on_the_command_line():
    assert given_dests([]) == set()
    assert given_dests(["--lam", "0.3", "--objective=fm", "--apex-option", "a=1", "--apex-option", "b=2",
                        "--no-progress"]) == {"lam", "objective", "apex_option", "no_progress"}
    # a flag given with its default value is still given
    assert given_dests(["--teacher", "frozen", "--apex-start-iter", "0"]) == {"teacher", "apex_start_iter"}


def test_variant_field_lists_cover_apex_config():
    from megatron_apex.objectives.apex import APEXConfig

    fields = {f.name for f in dataclasses.fields(APEXConfig)}
    lists = (PAPER_ONLY_FIELDS, RELEASED_ONLY_FIELDS, _SHARED_APEX_FIELDS)
    assert sum(len(x) for x in lists) == len(set().union(*lists)), "a field is in two lists"
    assert set().union(*lists) == fields


# A value other than the default for each field one variant alone reads.
OTHER_VALUE = {"lam": 0.2, "lambda_p": 2.0, "lambda_e": 0.5, "weighting": "endpoint", "fake_grad": "through",
               "w_base": 0.5, "w_fake": 0.3, "w_dm": 2.0, "dm_clamp": None, "dm_normalize": True,
               "dm_warmup_steps": 5, "fresh_t_min": 0.2, "fresh_t_max": 0.8, "cfg_scale": 0.8, "w_consistency": 1.0,
               "consistency_step": 0.2, "consistency_clamp": None, "batch_split": 0.5, "fuse_forwards": False,
               "fake_time_flag": True, "loss": "pseudo_huber", "huber_c": 0.01, "tan_weight": True,
               "any_step": True, "any_step_order": 3}


@pytest.mark.parametrize("variant, others", [("paper", RELEASED_ONLY_FIELDS), ("released", PAPER_ONLY_FIELDS)])
def test_the_other_variants_fields_do_not_change_the_loss(variant, others):
    """What the contradiction check refuses is really ignored: changing a field of the other
    variant leaves this variant's loss and gradients as they were (or APEXConfig refuses it)."""
    from _toy_models import ToyVelocityModel, make_batch
    from megatron_apex.objectives.apex import APEXConfig, apex_loss

    assert set(OTHER_VALUE) == set(PAPER_ONLY_FIELDS) | set(RELEASED_ONLY_FIELDS)
    model = ToyVelocityModel().double()
    batch = make_batch()

    def loss_and_grads(cfg):
        model.zero_grad()
        out = apex_loss(model, *batch, cfg, generator=torch.Generator().manual_seed(0), step=0)
        out["loss"].backward()
        return out["loss"].detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ref_loss, ref_grads = loss_and_grads(APEXConfig(variant=variant))
    assert ref_loss.item() != 0.0 and any(g.abs().sum() > 0 for g in ref_grads)
    for name in others:
        try:
            cfg = APEXConfig(variant=variant, **{name: OTHER_VALUE[name]})
        except ValueError:
            continue  # refused by APEXConfig itself
        loss, grads = loss_and_grads(cfg)
        assert torch.equal(loss, ref_loss), name
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads)), name


# ----------------------------------------------------------------------------- abbreviations


def test_abbreviated_flag_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--train-it", "3"])
    assert exit_info.value.code == 2
    assert "--train-it" in capsys.readouterr().err
    assert parse_args(["--train-iters", "3"]).train.train_iters == 3
    assert parse_args(["--train-iters=3"]).train.train_iters == 3


def test_abbreviated_subcommand_flag_is_refused(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("flag_validation_convert_hf", REPO / "tools" / "convert_hf.py")
    convert_hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert_hf)
    parser = convert_hf.build_parser()
    assert parser.parse_args(["export", "--load", "x", "--hf-path", "y"]).load == "x"
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--lo", "x", "--hf-path", "y"])
    assert "--lo" in capsys.readouterr().err


def _parser_calls(path: Path):
    """(constructor name, its keyword arguments, line) of every argparse parser built in a file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in ("ArgumentParser", "OneLineErrorParser"):
                yield name, {k.arg: k.value for k in node.keywords}, node.lineno


def test_every_parser_refuses_abbreviations():
    """Every parser of the project: argparse's own with allow_abbrev=False, or OneLineErrorParser
    (which defaults to it) without turning it back on."""
    files = [p for d in ("megatron_apex", "examples", "tools") for p in sorted((REPO / d).rglob("*.py"))]
    seen, bad = 0, []
    for path in files:
        for name, keywords, line in _parser_calls(path):
            seen += 1
            value = keywords.get("allow_abbrev")
            refuses = isinstance(value, ast.Constant) and value.value is False
            if not refuses and not (name == "OneLineErrorParser" and value is None):
                bad.append(f"{path.relative_to(REPO)}:{line}")
    assert seen >= 15 and not bad, bad
    from megatron_apex.cli import OneLineErrorParser

    assert OneLineErrorParser().allow_abbrev is False


# ----------------------------------------------------------------------------- the launcher's defaults

FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$ARGV_OUT"
"""


def launcher_flags(tmp_path: Path, *user) -> list:
    """The trainer flags examples/pretrain_apex_dit.sh passes for these user arguments (a stand-in
    for $PYTHON records them instead of starting torchrun)."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "argv"
    env = {**os.environ, "PYTHON": str(fake), "ARGV_OUT": str(out), "NPROC_PER_NODE": "1", "SKIP_SAMPLES": "1"}
    subprocess.run(["bash", "examples/pretrain_apex_dit.sh", "--save", str(tmp_path / "run"), *user], check=True,
                   cwd=REPO, env=env, timeout=60)
    argv = out.read_bytes().decode().split("\0")[:-1]
    return argv[argv.index("examples/pretrain_apex_dit.py") + 1:]


@pytest.mark.parametrize("user, objective, variant, start, recipe", [
    ((), "apex", "released", 1500, "preset"),
    (("--objective", "fm"), "fm", None, 0, None),
    (("--objective=fm", "--caption-dropout", "0.1"), "fm", None, 0, None),
    (("--apex-variant", "paper"), "apex", "paper", 1500, None),
    (("--apex-variant=paper", "--lam", "0.3"), "apex", "paper", 1500, None),
    (("--apex-variant", "released", "--teacher", "online"), "apex", "released", 1500, "released"),
    (("--train-iters", "40", "--apex-start-iter", "30"), "apex", "released", 30, "preset"),
    (("--apex-preset", "release"), "apex", "released", 1500, "preset"),
], ids=["defaults", "fm", "fm-equals", "paper", "paper-equals-lam", "released-online", "short", "user-preset"])
def test_launcher_defaults_step_aside_for_the_users_choice(tmp_path, user, objective, variant, start, recipe):
    """No choice: the release preset, with caption dropout for its CFG target's empty-prompt
    branch; an explicit --apex-variant released: that variant's launcher values; anything else:
    the launcher's APEX values stay out (the preset's values are not overridden by them)."""
    from megatron_apex.objectives.apex import preset_fields

    cfg = parse_args(launcher_flags(tmp_path, *user))
    obj = cfg.objective
    assert (obj.objective, obj.apex.get("variant"), obj.apex_start_iter) == (objective, variant, start)
    expected = {"preset": preset_fields("release"),
                "released": {"variant": "released", "w_dm": 1.0, "dm_warmup_steps": 80}}.get(recipe, None)
    if expected is None:
        assert "w_dm" not in obj.apex and "any_step" not in obj.apex
    else:
        assert obj.apex == expected
    user_dropout = 0.1 if "--caption-dropout" in user else 0.0
    assert cfg.data.caption_dropout == (0.1 if recipe == "preset" else user_dropout)
    assert cfg.checkpoint.save == str(tmp_path / "run")


def test_launcher_default_start_with_a_short_run_names_both_flags(tmp_path):
    with pytest.raises(ValueError, match="--apex-start-iter 1500 is at or past --train-iters 100"):
        parse_args(launcher_flags(tmp_path, "--train-iters", "100"))


# ----------------------------------------------------------------------------- validation order

# (module, name) where the trainer looks each builder up
BUILDERS = [("megatron_apex.training.loop", "init_distributed"), ("megatron_apex.training.loop", "build_stage_model"),
            ("megatron_apex.training.loop", "build_optimizer"),
            ("megatron_apex.data.dataset", "load_dataset"), ("megatron_apex.data.dataset", "LatentShardDataset"),
            ("megatron_apex.training.strategy", "frozen_copy"), ("megatron_apex.checkpoint", "load_checkpoint")]
MODEL = "qwen-image-tiny-test"


class Built(Exception):
    """Raised by a stubbed builder: the run got past its checks."""


@pytest.fixture
def builders(monkeypatch):
    """Every step that builds something, stubbed to record its call and stop the run."""
    import importlib

    calls = []

    def stub(name):
        def record(*args, **kwargs):
            calls.append(name)
            raise Built(name)
        return record

    for module, name in BUILDERS:
        monkeypatch.setattr(importlib.import_module(module), name, stub(name))
    return calls


def fake_checkpoint(root: Path, **edits) -> Path:
    """A checkpoint directory whose train_state.json describes a run of MODEL (no tensors: every
    check under test reads the train state only)."""
    from megatron_apex.families import get_model_config

    root.mkdir(parents=True)
    state = {"model_name": MODEL, "model_config": dataclasses.asdict(get_model_config(MODEL)), "iteration": 3,
             "consumed_samples": 12, "scheduler": {}, "has_ema": False, "has_teacher": False}
    for key, value in edits.items():
        if value is None:
            state.pop(key)
        elif key == "model_config":
            state[key].update(value)
        else:
            state[key] = value
    (root / "train_state.json").write_text(json.dumps(state))
    return root


def fake_shards(root: Path, context_dim: int) -> Path:
    from megatron_apex.data.shard_writer import SHARD_FORMAT

    root.mkdir(parents=True)
    manifest = dict(format=SHARD_FORMAT, splits={"train": dict(count=4, shards=[dict(name="train-000000.tar")])},
                    max_text_len=4, context_dim=context_dim, image_shape=[1, 8, 8])
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _empty(path: Path) -> Path:
    path.mkdir()
    return path


def _latest_names_missing(path: Path) -> Path:
    path.mkdir()
    (path / "latest").write_text("5\n")
    (path / ".tmp_iter_0000005").mkdir()
    return path


BAD_STARTS = [
    ("load-missing", lambda t: ["--load", t / "nowhere"], FileNotFoundError, ("--load", "nowhere")),
    ("load-empty-dir", lambda t: ["--load", _empty(t / "empty")], FileNotFoundError, ("--load", "latest")),
    ("load-incomplete", lambda t: ["--load", _latest_names_missing(t / "save")], FileNotFoundError,
     ("--load", "iter_0000005")),
    ("load-other-model", lambda t: ["--load", fake_checkpoint(t / "ck", model_config={"num_layers": 3})], ValueError,
     ("--load", "num_layers")),
    ("load-no-model-config", lambda t: ["--load", fake_checkpoint(t / "ck", model_config=None)], ValueError,
     ("train_state.json", "model_config")),
    ("load-ema-without-ema", lambda t: ["--load", fake_checkpoint(t / "ck", has_ema=True)], ValueError,
     ("--load", "--ema-decay")),
    ("load-weights-only", lambda t: ["--load", fake_checkpoint(t / "ck", scheduler=None)], ValueError,
     ("--load", "--finetune")),
    ("load-lora-without-lora-flags",
     lambda t: ["--load", fake_checkpoint(t / "ck", lora={"config": {"rank": 2}, "base": None})], ValueError,
     ("--load", "--lora-rank")),
    ("pretrained-missing", lambda t: ["--pretrained-checkpoint", t / "nowhere"], FileNotFoundError,
     ("--pretrained-checkpoint", "nowhere")),
    ("pretrained-other-model",
     lambda t: ["--pretrained-checkpoint", fake_checkpoint(t / "ck", model_config={"attention_head_dim": 8})],
     ValueError, ("--pretrained-checkpoint", "attention_head_dim")),
    ("lora-pretrained-missing", lambda t: ["--lora-rank", "2", "--pretrained-checkpoint", t / "nowhere"],
     FileNotFoundError, ("--pretrained-checkpoint", "nowhere")),
    ("lora-resume-full", lambda t: ["--lora-rank", "2", "--load", fake_checkpoint(t / "ck")], ValueError,
     ("--load", "full checkpoint")),
    ("data-text-width", lambda t: ["--data-path", fake_shards(t / "data", context_dim=7)], ValueError,
     ("--data-path", "--model", "text states width 7")),
    ("data-not-shards", lambda t: ["--data-path", _empty(t / "data")], FileNotFoundError, ("--data-path", "manifest")),
]


@pytest.mark.parametrize("flags, error, needles", [pytest.param(*c[1:], id=c[0]) for c in BAD_STARTS])
def test_bad_checkpoint_or_data_fails_before_anything_is_built(builders, tmp_path, flags, error, needles):
    from megatron_apex.training.loop import Trainer

    cfg = parse_args(["--model", MODEL, "--train-iters", "5", *map(str, flags(tmp_path))])
    with pytest.raises(error) as err:
        Trainer(cfg)
    message = str(err.value)
    assert all(n in message for n in needles) and "\n" not in message, message
    assert builders == [], f"built {builders} before refusing: {message}"


@pytest.mark.parametrize("flags", [
    lambda t: [],
    lambda t: ["--load", fake_checkpoint(t / "ck")],
    lambda t: ["--load", fake_checkpoint(t / "ck"), "--finetune"],
    lambda t: ["--pretrained-checkpoint", fake_checkpoint(t / "ck")],
    lambda t: ["--data-path", fake_shards(t / "data", context_dim=24)],
], ids=["nothing", "load", "finetune", "pretrained", "data"])
def test_good_checkpoint_or_data_gets_to_the_builders(builders, tmp_path, flags):
    """The counterpart: the same checks let a consistent run through to the (stubbed) builders."""
    from megatron_apex.training.loop import Trainer

    with pytest.raises(Built):
        Trainer(parse_args(["--model", MODEL, "--train-iters", "5", *map(str, flags(tmp_path))]))
    assert builders == ["init_distributed"]
