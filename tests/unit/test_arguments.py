"""Flag parsing: Megatron names land in the right dataclass fields; bad flags give one-line errors."""

import pytest

from megatron_apex.training.arguments import parse_args


def test_megatron_flags_map_to_configs():
    cfg = parse_args(["--tensor-model-parallel-size", "2", "--micro-batch-size", "8", "--global-batch-size", "32",
                      "--train-iters", "7", "--lr", "3e-4", "--seed", "5", "--save", "/tmp/x",
                      "--objective", "fm", "--shift-a", "-0.5", "--shift-b", "1", "--shift-site", "input",
                      "--apex-variant", "paper", "--lam", "0.3", "--apex-option", "dm_clamp=none",
                      "--apex-option", "dm_weight=0.5", "--time-sampler", "logit_normal"])
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert (cfg.train.micro_batch_size, cfg.train.global_batch_size, cfg.train.train_iters) == (8, 32, 7)
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.train.seed == 5
    assert cfg.checkpoint.save == "/tmp/x" and cfg.objective.objective == "fm"
    assert cfg.model_overrides == {"shift_a": -0.5, "shift_b": 1.0, "shift_site": "input"}
    assert cfg.objective.apex == {"variant": "paper", "lam": 0.3, "dm_clamp": None, "dm_weight": 0.5}
    assert cfg.objective.time_sampler == {"kind": "logit_normal"}


def test_later_flag_overrides_earlier():
    # examples/pretrain_apex_dit.sh relies on this: user arguments come after its defaults.
    cfg = parse_args(["--train-iters", "1600", "--lr", "1e-3", "--train-iters", "3"])
    assert cfg.train.train_iters == 3


@pytest.mark.parametrize("argv, needle", [
    (["--objective", "gan"], "--objective"),
    (["--apex-option", "dm_clamp"], "--apex-option"),
    (["--train-iters", "0"], "--train-iters"),
    (["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size"),
    (["--apex-variant", "nope"], "--apex-variant"),
    (["--lam", "1.5"], "--lam"),
    (["--time-sampler", "beta"], "--time-sampler"),
    (["--apex-option", "no_such_field=1"], "no_such_field"),
    (["--time-option", "t_min=2"], "--time-option"),
])
def test_bad_flags_name_the_flag(argv, needle):
    with pytest.raises(ValueError, match=needle):
        parse_args(argv)


def test_unknown_flag_exits_with_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--no-such-flag"])
    assert exc.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err
