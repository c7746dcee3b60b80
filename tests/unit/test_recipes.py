"""Every example recipe dry-runs on the CPU: its printed architecture parameter count equals
diffusers' class built from the registry config here, and the memory plan and the launch
command are printed. The recipes resume their own save directory (the trainer's start
decision is tested here with stubbed builders; a killed and re-run recipe in
tests/integration/test_recipe_resume.py), and --tiny sizes a recipe for the CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.name for p in (REPO / "examples" / "recipes").glob("*.sh") if not p.name.startswith("_"))
# (recipe, its environment): the Sana recipe covers both sizes.
RUNS = [(r, {}) for r in RECIPES if r != "sana_full.sh"] + [("sana_full.sh", {"SANA_SIZE": s}) for s in ("0.6b", "1.6b")]


def diffusers_count(model_name: str) -> int:
    import diffusers

    from megatron_apex.families import get_model_config, qwen_image, sana

    mapping = sana if model_name.startswith("sana") else qwen_image
    arch = dict(mapping.config_to_diffusers(get_model_config(model_name)))
    with torch.device("meta"):
        model = getattr(diffusers, arch.pop("_class_name"))(**arch)
    return sum(p.numel() for p in model.parameters())


def test_there_are_recipes_for_the_papers_runs():
    assert {"qwen_image_20b_lora.sh", "qwen_image_20b_full.sh", "sana_full.sh"} <= set(RECIPES)


# Where the recipes are told to start from and save to (every dry run below: one run per recipe).
DIRS = {"BASE": "/ckpt/base", "SAVE": "/runs/mine"}
_dry_runs = {}


def dry_run(recipe: str, *args: str, **env: str) -> str:
    """stdout of a recipe's --dry-run (cached: each takes seconds)."""
    key = (recipe, args, tuple(sorted(env.items())))
    if key not in _dry_runs:
        proc = subprocess.run(["bash", f"examples/recipes/{recipe}", "--dry-run", *args], capture_output=True,
                              text=True, cwd=REPO,
                              env={**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", **DIRS, **env})
        assert proc.returncode == 0, proc.stderr[-3000:]
        _dry_runs[key] = proc.stdout
    return _dry_runs[key]


def launch_command(out: str) -> list:
    """The words of the launch command a dry run prints."""
    return out.split("launch command:", 1)[1].split()


def flag_values(command: list, flag: str) -> list:
    return [value for word, value in zip(command, command[1:]) if word == flag]


@pytest.mark.parametrize("recipe, extra_env", RUNS, ids=[f"{r}{''.join(f'-{v}' for v in e.values())}" for r, e in RUNS])
def test_dry_run(recipe, extra_env):
    out = dry_run(recipe, **extra_env)
    model = re.search(r"dry run: (\S+) on (\d+) GPU", out).group(1)
    if "SANA_SIZE" in extra_env:
        assert model == f"sana-{extra_env['SANA_SIZE']}"
    ours = int(re.search(r"parameters \(ours, meta device\): ([\d,]+)", out).group(1).replace(",", ""))
    assert ours == diffusers_count(model)
    assert re.search(r"peak per GPU: [\d.]+ GiB", out)
    assert "torch.distributed.run" in out and "examples/pretrain_apex_dit.py" in out


@pytest.mark.parametrize("recipe, extra_env", RUNS, ids=[f"{r}{''.join(f'-{v}' for v in e.values())}" for r, e in RUNS])
def test_recipes_start_from_base_once_and_resume_their_save(recipe, extra_env):
    """BASE is the first start's weights and SAVE both where the run resumes and where it
    saves: no --finetune (which restarts at iteration 0 on every run)."""
    command = launch_command(dry_run(recipe, **extra_env))
    assert flag_values(command, "--pretrained-checkpoint") == [DIRS["BASE"]]
    assert flag_values(command, "--load") == flag_values(command, "--save") == [DIRS["SAVE"]]
    assert "--finetune" not in command


@pytest.mark.parametrize("flag", ["--save", "--load=/x", "--pretrained-checkpoint"])
def test_recipes_refuse_their_directories_as_flags(flag):
    """A --save given to a recipe would not be resumed (its --load stays SAVE): one line
    pointing to the variables."""
    proc = subprocess.run(["bash", "examples/recipes/sana_full.sh", flag, "/x"], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHON": "false"})
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and flag.split("=")[0] in lines[0] and "SAVE=DIR" in lines[0], proc.stderr


def test_tiny_keeps_the_recipe_but_its_sizes():
    """--tiny (here of the Sana recipe; the Qwen-Image one trains in test_recipe_resume.py):
    the family's tiny model, one process, small batch and iteration counts, the built-in data;
    every other flag as the recipe has it."""
    full = launch_command(dry_run("sana_full.sh", SANA_SIZE="0.6b"))
    tiny = launch_command(dry_run("sana_full.sh", "--tiny", SANA_SIZE="0.6b"))
    assert flag_values(tiny, "--nproc-per-node") == flag_values(tiny, "--nnodes") == ["1"]
    sized = {"--model": "sana-tiny", "--tensor-model-parallel-size": "1", "--pipeline-model-parallel-size": "1",
             "--micro-batch-size": "2", "--global-batch-size": "4", "--train-iters": "8", "--lr-warmup-iters": "2",
             "--save-interval": "2", "--log-interval": "1", "--apex-option": "dm_warmup_steps=2"}
    expected, words = [], full[full.index("examples/pretrain_apex_dit.py"):]
    i = 0
    while i < len(words):
        flag = words[i]
        if flag == "--data-path":
            i += 2
            continue
        if flag in sized and not (flag == "--apex-option" and not words[i + 1].startswith("dm_warmup_steps=")):
            expected += [flag, sized[flag]]
            i += 2
            continue
        expected.append(flag)
        i += 1
    assert tiny[tiny.index("examples/pretrain_apex_dit.py"):] == expected
    # data prepared for the tiny model (the walkthrough's rehearsal) is kept
    mine = launch_command(dry_run("sana_full.sh", "--tiny", SANA_SIZE="0.6b", DATA_PATH="/data/tiny"))
    assert flag_values(mine, "--data-path") == ["/data/tiny"]
    assert [w for w in mine if w not in ("--data-path", "/data/tiny")] == tiny


# ----------------------------------------------------------------------------- the trainer's start decision
# With --load SAVE --save SAVE the recipes rely on two rules of the trainer: SAVE without any
# checkpoint is the first start (from --pretrained-checkpoint), and no run writes over a complete
# checkpoint of its --save. Checked before anything is built (stubbed builders).
from test_flag_validation import MODEL, Built, builders, fake_checkpoint  # noqa: E402,F401


def saved_run(save: Path, *iterations: int) -> Path:
    """A save directory holding complete checkpoints (train states only) at ``iterations``."""
    for it in iterations:
        fake_checkpoint(save / f"iter_{it:07d}", iteration=it)
    (save / "latest").write_text(f"{max(iterations)}\n")
    return save


def start(tmp_path, *flags):
    from megatron_apex.training.arguments import parse_args
    from megatron_apex.training.loop import Trainer

    return Trainer(parse_args(["--model", MODEL, "--train-iters", "9", *map(str, flags)]))


@pytest.mark.parametrize("save_state", ["missing", "empty", "killed-in-its-first-save"])
def test_first_start_of_its_own_save_starts_from_the_pretrained_weights(builders, tmp_path, capsys, save_state):
    save = tmp_path / "run"
    if save_state != "missing":
        save.mkdir()
    if save_state == "killed-in-its-first-save":  # what the next save removes; metrics to be recomputed
        (save / ".tmp_iter_0000002").mkdir()
        (save / "metrics.jsonl").write_text('{"iteration": 1}\n')
    with pytest.raises(Built):
        start(tmp_path, "--pretrained-checkpoint", fake_checkpoint(tmp_path / "base"), "--load", save, "--save", save)
    assert builders == ["init_distributed"]
    assert f"--load {save} holds no checkpoint yet: first start, from the weights of --pretrained-checkpoint" in \
        capsys.readouterr().out


@pytest.mark.parametrize("case, flags, error, needles", [
    # a --load other than the run's own --save is never a first start: a typo stays an error
    ("other-load-missing", lambda t: ["--load", t / "typo", "--save", t / "run"], FileNotFoundError,
     ("--load", "typo")),
    # `latest` without a complete checkpoint: a damaged run, not a fresh one
    ("own-save-damaged", lambda t: ["--load", t / "run", "--save", t / "run", "--pretrained-checkpoint",
                                    fake_checkpoint(t / "base")], FileNotFoundError, ("--load", "iter_0000005")),
    # a fresh start over a run's checkpoints would overwrite them one by one
    ("fresh-over-a-run", lambda t: ["--save", saved_run(t / "run", 2, 4)], ValueError,
     ("--save", "past iteration 0", "iter_0000002, iter_0000004", "--load")),
    ("finetune-over-a-run", lambda t: ["--load", fake_checkpoint(t / "base"), "--finetune", "--save",
                                       saved_run(t / "run", 2)], ValueError, ("--save", "iter_0000002")),
    # resuming an older checkpoint than the newest of the same --save
    ("resume-older", lambda t: ["--load", saved_run(t / "run", 3, 6) / "iter_0000003", "--save", t / "run"],
     ValueError, ("past iteration 3", "(iter_0000006)")),
], ids=lambda v: v if isinstance(v, str) else "")
def test_refused_starts(builders, tmp_path, case, flags, error, needles):
    if case == "own-save-damaged":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "latest").write_text("5\n")
    with pytest.raises(error) as err:
        start(tmp_path, *flags(tmp_path))
    message = str(err.value)
    assert all(n in message for n in needles) and "\n" not in message, message
    assert builders == []


@pytest.mark.parametrize("flags", [
    lambda t: ["--load", saved_run(t / "run", 3, 6), "--save", t / "run"],  # the newest: nothing past it
    lambda t: ["--load", saved_run(t / "other", 6), "--save", saved_run(t / "run", 3, 6)],  # iter 6 is not rewritten
    lambda t: ["--save", saved_run(t / "run", 0)],  # a fresh run never saves iteration 0
    lambda t: ["--bf16", "--pretrained-checkpoint", fake_checkpoint(t / "base")],  # cast to bf16 on load
], ids=["resume-newest", "resume-same-iteration", "fresh-over-iteration-0", "float32-weights-bf16-run"])
def test_allowed_starts(builders, tmp_path, flags):
    with pytest.raises(Built):
        start(tmp_path, *flags(tmp_path))
    assert builders == ["init_distributed"]


def test_resuming_keeps_the_dtype_check(builders, tmp_path):
    """Only a weights-only start casts: a resumed run's optimizer state is in its own dtype."""
    with pytest.raises(ValueError, match="params_dtype"):
        start(tmp_path, "--bf16", "--load", fake_checkpoint(tmp_path / "ck"))
