"""Flag parsing: Megatron names land in the right dataclass fields (bad flags and their one-line
errors: tests/unit/test_bad_inputs.py)."""

import pytest

from megatron_apex.training.arguments import parse_args


def test_megatron_flags_map_to_configs():
    cfg = parse_args(["--tensor-model-parallel-size", "2", "--micro-batch-size", "8", "--global-batch-size", "32",
                      "--train-iters", "7", "--lr", "3e-4", "--seed", "5", "--save", "/tmp/x",
                      "--objective", "apex", "--shift-a", "-0.5", "--shift-b", "1", "--shift-site", "input",
                      "--apex-variant", "released", "--apex-option", "dm_clamp=none",
                      "--apex-option", "w_dm=0.5", "--time-sampler", "logit_normal"])
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert (cfg.train.micro_batch_size, cfg.train.global_batch_size, cfg.train.train_iters) == (8, 32, 7)
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.train.seed == 5
    assert cfg.checkpoint.save == "/tmp/x" and cfg.objective.objective == "apex"
    assert cfg.model_overrides == {"shift_a": -0.5, "shift_b": 1.0, "shift_site": "input"}
    assert cfg.objective.apex == {"variant": "released", "dm_clamp": None, "w_dm": 0.5}
    assert cfg.objective.time_sampler == {"kind": "logit_normal"}
    paper = parse_args(["--apex-variant", "paper", "--lam", "0.3", "--lambda-e", "2", "--weighting", "endpoint"])
    assert paper.objective.apex == {"variant": "paper", "lam": 0.3, "lambda_e": 2.0, "weighting": "endpoint"}
    assert parse_args(["--objective", "fm"]).objective.objective == "fm"


def test_later_flag_overrides_earlier():
    # examples/pretrain_apex_dit.sh relies on this: user arguments come after its defaults.
    cfg = parse_args(["--train-iters", "1600", "--lr", "1e-3", "--train-iters", "3"])
    assert cfg.train.train_iters == 3


def test_lora_flags_map_to_lora_args():
    cfg = parse_args(["--lora-rank", "8", "--lora-alpha", "16", "--lora-targets", "attn,img_in", "--lora-dropout",
                      "0.1", "--lora-init-seed", "3", "--lora-extra-trainable", "proj_out.*",
                      "--lora-fake-reference", "base", "--pretrained-checkpoint", "/ckpt/base"])
    lora = cfg.lora
    assert lora.enabled and (lora.rank, lora.alpha, lora.dropout, lora.init_seed) == (8, 16.0, 0.1, 3)
    assert lora.fake_reference == "base" and cfg.checkpoint.pretrained_checkpoint == "/ckpt/base"
    config = lora.lora_config()
    assert config.targets == ("attn", "img_in") and config.extra_trainable == ("proj_out.*",)
    assert config.scale == 2.0
    off = parse_args([])
    assert not off.lora.enabled and off.lora.fake_reference == "adapted"
    assert parse_args(["--lora-rank", "4"]).lora.lora_config().to_dict() == \
        type(config)(rank=4).to_dict()  # unset flags: LoRAConfig's defaults
