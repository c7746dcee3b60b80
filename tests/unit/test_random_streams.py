"""The training run's counter-based random streams (megatron_apex/training/random_streams.py):
no two keys of a long run share a stream, a key always gives the same numbers, and the torch
generator really runs the Mersenne Twister from the key's state (numpy's MT19937 as the
independent reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_apex.training.random_streams import (
    MT_WORDS,
    RandomPurpose,
    key_words,
    stream_generator,
    stream_state_words,
)

SEED = 1234
ITERATIONS, MICRO_BATCHES = 10_000, 64

# numpy's SeedSequence constants (numpy/random/bit_generator.pyx)
INIT_A, MULT_A, INIT_B, MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
MIX_MULT_L, MIX_MULT_R, XSHIFT, POOL = 0xCA01F9DD, 0x4973F715, 16, 4
MASK = 0xFFFFFFFF


def seed_sequence_prefix(entropy: np.ndarray, n_words: int) -> np.ndarray:
    """SeedSequence(entropy[k]).generate_state(n_words) for every row k of a (K, W) uint32 array
    at once (the same algorithm, vectorised over keys; checked against numpy below)."""
    u32 = np.uint32
    hash_a = [INIT_A]

    def hashmix(value):
        value = value ^ u32(hash_a[0])
        hash_a[0] = (hash_a[0] * MULT_A) & MASK
        value = value * u32(hash_a[0])
        return value ^ (value >> u32(XSHIFT))

    def mix(x, y):
        result = u32(MIX_MULT_L) * x - u32(MIX_MULT_R) * y
        return result ^ (result >> u32(XSHIFT))

    zeros = np.zeros(len(entropy), dtype=u32)
    pool = [hashmix(entropy[:, i] if i < entropy.shape[1] else zeros) for i in range(POOL)]
    for src in range(POOL):
        for dst in range(POOL):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(POOL, entropy.shape[1]):
        for dst in range(POOL):
            pool[dst] = mix(pool[dst], hashmix(entropy[:, src]))
    out, hash_b = [], INIT_B
    for i in range(n_words):
        value = pool[i % POOL] ^ u32(hash_b)
        hash_b = (hash_b * MULT_B) & MASK
        value = value * u32(hash_b)
        out.append(value ^ (value >> u32(XSHIFT)))
    return np.stack(out, axis=1)


def all_keys_words() -> np.ndarray:
    """key_words of every (SEED, iteration, purpose, micro-batch) of the grid, (K, 8) uint32."""
    it, purpose, mb = np.meshgrid(np.arange(ITERATIONS), np.array([int(p) for p in RandomPurpose]),
                                  np.arange(MICRO_BATCHES), indexing="ij")
    columns = []
    for value in (np.full(it.size, SEED), it.ravel(), purpose.ravel(), mb.ravel()):
        value = value.astype(np.uint64)
        columns += [(value & MASK).astype(np.uint32), (value >> np.uint64(32)).astype(np.uint32)]
    return np.stack(columns, axis=1)


def test_vectorised_seed_sequence_is_numpys():
    gen = np.random.default_rng(0)
    keys = [(SEED, 0, 0, 0), (-1, 2**40, 1, 7), (2**32, 0, 0, 0), (0, 1, 0, 0)] + \
        [(int(s), int(i), int(p), int(m)) for s, i, p, m in zip(gen.integers(0, 2**40, 20), gen.integers(0, 2**20, 20),
                                                                gen.integers(0, len(RandomPurpose), 20),
                                                                gen.integers(0, 2**10, 20))]
    words = np.stack([key_words(*k) for k in keys])
    mine = seed_sequence_prefix(words, 6)
    for key, row in zip(keys, mine):
        np.testing.assert_array_equal(row, stream_state_words(*key)[:6])
        np.testing.assert_array_equal(row, np.random.SeedSequence(key_words(*key)).generate_state(6))


def test_no_two_streams_of_a_long_run_share_their_state():
    """10,000 iterations x 64 micro-batches x every purpose: the first 64 bits of the
    generators' states are all different (so are their streams)."""
    prefix = seed_sequence_prefix(all_keys_words(), 2).astype(np.uint64)
    first64 = prefix[:, 0] | (prefix[:, 1] << np.uint64(32))
    assert len(np.unique(first64)) == ITERATIONS * MICRO_BATCHES * len(RandomPurpose)


def test_the_collision_check_catches_the_former_seeds():
    """The same check on the former seeds, (seed * 1_000_003 + iteration) * 7 + 1 + micro-batch
    through manual_seed (which keeps 32 bits): stream s at iteration i was stream s - 7 at i + 1."""
    it, mb = np.meshgrid(np.arange(ITERATIONS, dtype=np.int64), np.arange(MICRO_BATCHES), indexing="ij")
    former = ((SEED * 1_000_003 + it) * 7 + 1 + mb) & MASK
    assert len(np.unique(former)) < former.size // 2
    draw = lambda seed: torch.randn(4, generator=torch.Generator().manual_seed(int(seed)))  # noqa: E731
    assert torch.equal(draw(former[5, 10]), draw(former[6, 3]))


def test_a_key_always_gives_the_same_numbers():
    def draws(gen):
        return torch.randn(7, generator=gen), torch.rand(3, generator=gen), torch.randn(40, 2, generator=gen)

    for key in [(SEED, 0, RandomPurpose.GLOBAL_BATCH, 0), (SEED, 9_999, RandomPurpose.OBJECTIVE, 63),
                (-5, 2**33, RandomPurpose.OBJECTIVE, 2)]:
        a, b = draws(stream_generator(*key)), draws(stream_generator(*key))
        assert all(torch.equal(x, y) for x, y in zip(a, b)), key


def test_distinct_keys_give_distinct_first_draws():
    base = (SEED, 5, RandomPurpose.OBJECTIVE, 10)
    neighbours = [base, (SEED + 1, 5, RandomPurpose.OBJECTIVE, 10), (SEED, 6, RandomPurpose.OBJECTIVE, 10),
                  (SEED, 5, RandomPurpose.GLOBAL_BATCH, 10), (SEED, 5, RandomPurpose.OBJECTIVE, 11),
                  (SEED, 6, RandomPurpose.OBJECTIVE, 3),  # the pair the former seeds made equal
                  (2**32 + SEED, 5, RandomPurpose.OBJECTIVE, 10)]  # torch's manual_seed would fold this one
    rng = np.random.default_rng(1)
    sample = neighbours + [(SEED, int(i), RandomPurpose(int(p)), int(m)) for i, m, p in
                           zip(rng.integers(0, ITERATIONS, 200), rng.integers(0, MICRO_BATCHES, 200),
                               rng.integers(0, len(RandomPurpose), 200))]
    firsts = {}
    for key in dict.fromkeys(sample):
        firsts.setdefault(tuple(torch.randn(2, generator=stream_generator(*key)).tolist()), []).append(key)
    assert all(len(keys) == 1 for keys in firsts.values()), [k for k in firsts.values() if len(k) > 1]


def test_the_generator_runs_the_mersenne_twister_from_the_key_state():
    key = (SEED, 17, RandomPurpose.OBJECTIVE, 42)
    words = stream_state_words(*key)
    assert words.shape == (MT_WORDS,)
    reference = np.random.MT19937()
    reference.state = {"bit_generator": "MT19937", "state": {"key": words, "pos": MT_WORDS}}
    raw = reference.random_raw(16)
    # int32 random_() takes one 32-bit output per element and keeps its low 31 bits
    ours = torch.empty(16, dtype=torch.int32).random_(generator=stream_generator(*key))
    np.testing.assert_array_equal(ours.numpy(), (raw & 0x7FFFFFFF).astype(np.int64))


def test_key_words_have_a_fixed_width():
    # SeedSequence alone would read the value 2^32 as the words [0, 1], like the values (0, 1)
    assert not np.array_equal(key_words(2**32, 0, 0, 0), key_words(0, 1, 0, 0))
    assert len({key_words(*k).tobytes() for k in [(2**32, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (1, 0, 0, 0)]}) == 4
    with pytest.raises(ValueError, match="RandomPurpose"):
        stream_generator(SEED, 0, len(RandomPurpose))  # a purpose nobody named
