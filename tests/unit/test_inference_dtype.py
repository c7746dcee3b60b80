"""A --bf16 run's checkpoint samples in float32 on a CPU unless asked otherwise."""

import dataclasses

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the float32 default applies without CUDA")


def _bf16_checkpoint(tmp_path):
    from megatron_apex.families import build_model, get_model_config
    from megatron_apex.parallel import init_distributed
    from megatron_apex import checkpoint

    init_distributed(1, 1)
    config = get_model_config("qwen-image-tiny-test", params_dtype="bfloat16")
    model = build_model(config)
    state = {"iteration": 1, "model_name": "qwen-image-tiny-test", "model_config": dataclasses.asdict(config),
             "has_ema": False, "has_teacher": False}
    checkpoint.save_checkpoint(str(tmp_path / "run"), 1, {"model": model.sharded_state_dict(prefix="model.")},
                                  state)
    return model


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_bf16_checkpoint_loads_as_asked(tmp_path, dtype):
    from megatron_apex.inference.loading import load_model_for_inference

    saved = _bf16_checkpoint(tmp_path)
    model, _ = load_model_for_inference(str(tmp_path / "run"), dtype=dtype)
    want = dtype or torch.float32
    params = dict(model.named_parameters())
    assert {p.dtype for p in params.values()} == {want}
    for name, p in saved.named_parameters():
        assert torch.equal(params[name].to(torch.float32), p.to(torch.float32)), name
