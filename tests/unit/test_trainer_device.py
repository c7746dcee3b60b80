"""The trainer draws every random number on the host and hands the objective batches on the
compute device (ParallelInfo.device): checked here with the meta device standing in for a GPU
(tests/gpu/test_trainer_cuda.py trains on a real one)."""

import dataclasses

import torch

from megatron_apex.training.arguments import parse_args

FLAGS = ["--model", "qwen-image-tiny", "--num-layers", "1", "--micro-batch-size", "4", "--global-batch-size", "8",
         "--no-progress", "--train-iters", "2", "--caption-dropout", "0.5"]


def test_micro_batches_land_on_the_compute_device(tmp_path):
    from megatron_apex.training.loop import Trainer

    trainer = Trainer(parse_args([*FLAGS, "--save", str(tmp_path / "run")]))
    host = trainer.micro_batches(list(range(8)))
    meta = torch.device("meta")
    trainer.info = dataclasses.replace(trainer.info, device=meta)
    trainer.empty_prompt = tuple(x.to(meta) for x in trainer.empty_prompt)
    moved = trainer.micro_batches(list(range(8)))
    for ref, got in zip(host, moved):
        tensors = {k for k, v in ref.items() if torch.is_tensor(v)}
        assert {"image", "noise", "t", "context", "context_mask"} <= tensors
        for k in tensors:
            assert got[k].device == meta and got[k].shape == ref[k].shape and got[k].dtype == ref[k].dtype, k
        assert got["generator"].device.type == "cpu"  # the objective's fresh draws stay on the host
