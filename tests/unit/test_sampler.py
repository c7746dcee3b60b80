"""GlobalBatchSampler: deterministic order, exact resume, DP/micro-batch split."""

import itertools

import pytest
import torch

from megatron_apex.data.sampler import GlobalBatchSampler, micro_batch_slices, micro_batches


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def reference_batches(num_samples, g, seed, epochs, drop_last=True):
    """Independent re-statement of the contract: randperm(seed + epoch), cut into batches."""
    out = []
    for e in range(epochs):
        gen = torch.Generator().manual_seed(seed + e)
        perm = torch.randperm(num_samples, generator=gen).tolist()
        usable = num_samples - num_samples % g if drop_last else num_samples
        out += [perm[i : min(i + g, usable)] for i in range(0, usable, g)]
    return out


@pytest.mark.parametrize("drop_last", [True, False])
def test_order_matches_seeded_permutations(drop_last):
    ref = reference_batches(103, 8, seed=5, epochs=3, drop_last=drop_last)
    got = take(GlobalBatchSampler(103, 8, seed=5, drop_last=drop_last), len(ref))
    assert got == ref
    per_epoch = 12 if drop_last else 13
    for e in range(3):
        flat = [i for b in got[e * per_epoch : (e + 1) * per_epoch] for i in b]
        assert len(set(flat)) == len(flat)  # no repeats inside an epoch
    assert take(GlobalBatchSampler(103, 8, seed=6), 3) != got[:3]


@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_gives_the_next_batches_of_an_uninterrupted_run(drop_last):
    full = take(GlobalBatchSampler(103, 8, seed=1, drop_last=drop_last), 40)
    for k in (0, 1, 11, 12, 13, 25):
        consumed = sum(len(b) for b in full[:k])
        s = GlobalBatchSampler(103, 8, seed=1, consumed_samples=consumed, drop_last=drop_last)
        assert take(s, 10) == full[k : k + 10], k
        assert s.consumed_samples == consumed + sum(len(b) for b in full[k : k + 10])


def test_consumed_samples_tracks_progress_for_checkpoints():
    s = GlobalBatchSampler(50, 10, seed=0)
    it = iter(s)
    first = [next(it) for _ in range(7)]
    resumed = GlobalBatchSampler(50, 10, seed=0, consumed_samples=s.consumed_samples)
    assert s.consumed_samples == 70 and resumed.epoch == 1
    assert take(resumed, 3) == [next(it) for _ in range(3)]
    assert first[5] != first[0]


@pytest.mark.parametrize("mbs,dp", [(1, 1), (2, 1), (1, 4), (2, 2), (2, 4), (8, 1)])
def test_micro_batches_partition_the_global_batch(mbs, dp):
    batch = take(GlobalBatchSampler(100, 16, seed=3), 2)[1]
    per_rank = [micro_batches(batch, mbs, r, dp) for r in range(dp)]
    for mb in per_rank:
        assert len(mb) == 16 // (mbs * dp) and all(len(m) == mbs for m in mb)
    assert [i for mb in per_rank for m in mb for i in m] == batch


@pytest.mark.parametrize("g,mbs,dp", [(8, 4, 1), (8, 2, 2), (16, 2, 4), (12, 3, 2), (6, 1, 6)])
def test_micro_batch_slices_are_the_ranks_contiguous_micro_batches(g, mbs, dp):
    # written out by hand: rank r starts at r * G / dp, micro-batch m at that plus m * mbs
    for r in range(dp):
        want = [(r * (g // dp) + m * mbs, r * (g // dp) + (m + 1) * mbs) for m in range(g // (mbs * dp))]
        got = micro_batch_slices(g, mbs, r, dp)
        assert [(s.start, s.stop) for s in got] == want
        indices = list(range(100, 100 + g))  # the indices the slices pick are micro_batches'
        assert [indices[s] for s in got] == micro_batches(indices, mbs, r, dp)


def test_global_batches_do_not_depend_on_the_split():
    # The sampler has no mbs/dp input; a run with another split sees the same samples per step.
    a = take(GlobalBatchSampler(64, 16, seed=9), 6)
    for mbs, dp in [(1, 2), (4, 4)]:
        seen = [sorted(i for r in range(dp) for m in micro_batches(b, mbs, r, dp) for i in m)
                for b in take(GlobalBatchSampler(64, 16, seed=9), 6)]
        assert seen == [sorted(b) for b in a]


def test_bad_divisibility_and_arguments_are_clear():
    with pytest.raises(ValueError, match=r"--global-batch-size \(12\).*--micro-batch-size \(5\).*data-parallel size \(1\)"):
        micro_batches(list(range(12)), 5, 0, 1)
    with pytest.raises(ValueError, match="data-parallel size"):
        micro_batches(list(range(12)), 2, 0, 4)
    with pytest.raises(ValueError, match="rank 3"):
        micro_batches(list(range(12)), 2, 3, 2)
    with pytest.raises(ValueError, match=r"--global-batch-size \(12\).*--micro-batch-size \(5\)"):
        micro_batch_slices(12, 5, 0, 1)
    with pytest.raises(ValueError, match="--global-batch-size 20"):
        GlobalBatchSampler(10, 20, seed=0)
    assert take(GlobalBatchSampler(10, 20, seed=0, drop_last=False), 1)[0].__len__() == 10
