"""--sequence-parallel from the command line to the run's pieces (no process group needed);
the numbers themselves are tests/integration/test_sequence_parallel.py's."""

import pytest

from megatron_apex.models.common.sequence_parallel import (check_sequence_parallel, padded_length,
                                                           replicated_input_config)
from megatron_apex.families import get_model_config
from megatron_apex.training.arguments import parse_args
from megatron_apex.training.dry_run import plan_of

TP2 = ["--tensor-model-parallel-size", "2"]


def test_flag_reaches_the_run_config_and_the_dry_run_plan():
    assert parse_args(TP2).parallel.sequence_parallel is False
    cfg = parse_args([*TP2, "--sequence-parallel"])
    assert cfg.parallel.sequence_parallel is True
    plan = plan_of(cfg, world_size=4, latent_grid=(8, 8), text_len=16)
    assert plan.sequence_parallel and plan.tensor_model_parallel_size == 2 and plan.data_parallel_size == 2


def test_without_tensor_parallelism_it_is_refused_naming_both_flags():
    with pytest.raises(ValueError) as err:
        parse_args(["--sequence-parallel"])
    assert "--sequence-parallel" in str(err.value) and "--tensor-model-parallel-size 1" in str(err.value)


@pytest.mark.parametrize("model, tp, lora, needle", [
    ("qwen-image-tiny", 1, False, "--tensor-model-parallel-size > 1"),
    ("sana-tiny", 2, False, "Sana"),
    ("qwen-image-tiny", 2, True, "--lora-rank"),
])
def test_what_it_cannot_run_with(model, tp, lora, needle):
    with pytest.raises(ValueError) as err:
        check_sequence_parallel(get_model_config(model), tp, lora=lora)
    assert needle in str(err.value) and "--sequence-parallel" in str(err.value) and "\n" not in str(err.value)


def test_qwen_image_with_tp_is_accepted():
    check_sequence_parallel(get_model_config("qwen-image-tiny"), 2)


@pytest.mark.parametrize("length, tp, expected", [(5, 2, 6), (6, 2, 6), (1, 4, 4), (256, 8, 256), (257, 8, 264)])
def test_padded_length(length, tp, expected):
    assert padded_length(length, tp) == expected


def test_linears_of_replicated_inputs_get_the_config_without_sequence_parallelism():
    import dataclasses

    config = get_model_config("qwen-image-tiny").to_transformer_config(2, 1, sequence_parallel=True)
    plain = replicated_input_config(config)
    assert config.sequence_parallel and not plain.sequence_parallel
    assert replicated_input_config(config) is plain  # built once per config
    differing = [f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(plain, f.name)]
    assert differing == ["sequence_parallel"]
    no_sp = get_model_config("qwen-image-tiny").to_transformer_config(2, 1)
    assert replicated_input_config(no_sp) is no_sp
