"""A non-finite loss or gradient skips the update (no optimizer, LR or EMA step; the data is
consumed), is counted in metrics.jsonl, and --max-skipped-iters consecutive skips stop the run
with a checkpoint of the last good weights."""

import json

import pytest
import torch

from megatron_apex.training.arguments import parse_args

FLAGS = ["--model", "qwen-image-tiny", "--num-layers", "1", "--micro-batch-size", "4", "--global-batch-size", "8",
         "--lr-warmup-iters", "0", "--log-interval", "100", "--no-progress", "--objective", "apex",
         "--apex-variant", "released", "--apex-start-iter", "1", "--ema-decay", "0.9"]


def _trainer(tmp_path, *extra):
    from megatron_apex.training.loop import Trainer

    return Trainer(parse_args([*FLAGS, "--save", str(tmp_path / "run"), *extra]))


def _poison(trainer, at_iterations):
    """NaN pixels in every batch of the given iterations (None = all iterations)."""
    clean = trainer.dataset.get_batch

    def get_batch(indices):
        batch = clean(indices)
        if at_iterations is None or trainer.iteration in at_iterations:
            batch["image"] = torch.full_like(batch["image"], float("nan"))
        return batch

    trainer.dataset.get_batch = get_batch


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}


def _records(tmp_path):
    return [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]


def test_nan_batch_skips_the_update_and_training_goes_on(tmp_path):
    trainer = _trainer(tmp_path, "--train-iters", "5")
    _poison(trainer, {2})
    trainer.train_step(), trainer.train_step()  # FM, then APEX (a frozen teacher is taken)
    before, ema_before = _weights(trainer.model), _weights(trainer.ema)
    lr_steps = trainer.scheduler.num_steps

    bad = trainer.train_step()
    assert bad["update_skipped"] == 1 and bad["skipped_iters"] == 1
    assert not torch.isfinite(torch.tensor(bad["loss"]))
    after = _weights(trainer.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(ema_before[k], v) for k, v in _weights(trainer.ema).items())
    assert trainer.scheduler.num_steps == lr_steps
    assert trainer.consumed_samples == 3 * 8  # the poisoned batch is consumed, not retried

    good = trainer.train_step()
    assert good["update_skipped"] == 0 and good["skipped_iters"] == 1
    assert torch.isfinite(torch.tensor([good["loss"], good["grad_norm"]])).all()
    assert any(not torch.equal(before[k], v) for k, v in _weights(trainer.model).items())
    assert trainer.scheduler.num_steps == lr_steps + 8


def test_skips_are_logged_and_counted_in_metrics_jsonl(tmp_path):
    trainer = _trainer(tmp_path, "--train-iters", "6")
    _poison(trainer, {1, 3})
    trainer.train()
    records = {r["iteration"]: r for r in _records(tmp_path)}
    # a skipped iteration is logged even between --log-interval boundaries
    assert [it for it, r in records.items() if r["update_skipped"]] == [2, 4]
    assert records[6]["skipped_iters"] == 2 and records[6]["update_skipped"] == 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for it, r in records.items() if it == 6)


def test_consecutive_skips_stop_the_run_with_the_last_good_weights(tmp_path):
    from megatron_apex import checkpoint
    from megatron_apex.training.run_control import DivergedError

    trainer = _trainer(tmp_path, "--train-iters", "20", "--max-skipped-iters", "3")
    trainer.train_step(), trainer.train_step()
    good = _weights(trainer.model)
    _poison(trainer, None)
    with pytest.raises(DivergedError, match="--max-skipped-iters 3"):
        trainer.train()
    assert trainer.iteration == 5
    ckpt = checkpoint.resolve_checkpoint(str(tmp_path / "run"))
    state = checkpoint.read_train_state(ckpt)
    assert state["iteration"] == 5 and state["skipped_iters"] == 3
    loaded = checkpoint.load_checkpoint(ckpt, {"model": trainer.model.sharded_state_dict(prefix="model.")})
    restored = checkpoint.strip_prefix(loaded["model"], "model.")
    for k, v in good.items():
        if k in restored:
            assert torch.equal(restored[k], v), k
