"""Counter-based random streams of a training run: one torch generator per key
(seed, iteration, purpose, micro-batch), each seeded from its whole key and nothing else.

A resumed run needs no RNG state and the numbers do not depend on how the global batch is
split over ranks: the key names the draw. The key is hashed by numpy's ``SeedSequence`` into
the generator's full Mersenne Twister state (624 words, as numpy seeds its own MT19937) rather
than passed to ``manual_seed``: torch's CPU generator keeps only the low 32 bits of a seed, and
a 64-bit hash folded to 32 bits would give some of the millions of streams of a long run the
same numbers (a 2^32 space; about 190 pairs over 10,000 iterations x 64 micro-batches x 2
purposes, by the birthday bound).
"""

from __future__ import annotations

import enum
import functools

import numpy as np
import torch

MT_WORDS = 624  # 32-bit words of the Mersenne Twister state
# torch's CPU generator state (CPUGeneratorImplState, kept for backward compatibility): initial
# seed (u64), left (i32), seeded (i32), next (u64), the MT words as u64 each, then the normal caches.
_STATE_BYTES = 5056
_WORDS_OFFSET = 24
_LEFT_OFFSET = 8


class RandomPurpose(enum.IntEnum):
    """What a stream's numbers are for; part of the key, so no two purposes share numbers."""

    # the global batch's noise, times and caption dropout: drawn once for the whole global batch
    # (every data-parallel rank draws the same numbers and takes its slice)
    GLOBAL_BATCH = 0
    # the objective's fresh draws (APEX's t', z', t'', z''): one stream per micro-batch of the
    # global batch, keyed by its index in the global batch (the same on any split over ranks)
    OBJECTIVE = 1


def key_words(seed: int, iteration: int, purpose: int, micro_batch: int = 0) -> np.ndarray:
    """The key as uint32 words, two per value (two's complement mod 2^64): a fixed width, so no
    two keys share their words (SeedSequence would give a value >= 2^32 two words and a smaller
    one a single word, and [2^32, 0] would read as [0, 1, 0])."""
    words = []
    for value in (seed, iteration, int(RandomPurpose(purpose)), micro_batch):
        value %= 1 << 64
        words += [value & 0xFFFFFFFF, value >> 32]
    return np.array(words, dtype=np.uint32)


def stream_state_words(seed: int, iteration: int, purpose: int, micro_batch: int = 0) -> np.ndarray:
    """The stream's Mersenne Twister state: ``MT_WORDS`` uint32 words hashed from its key."""
    return np.random.SeedSequence(key_words(seed, iteration, purpose, micro_batch)).generate_state(
        MT_WORDS, dtype=np.uint32)


def _mt_init_words(seed: int) -> np.ndarray:
    """The state mt19937's ``init_genrand(seed)`` builds (Matsumoto & Nishimura's reference)."""
    words = [seed & 0xFFFFFFFF]
    for i in range(1, MT_WORDS):
        prev = words[-1]
        words.append((1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF)
    return np.array(words, dtype=np.uint64)


@functools.lru_cache(maxsize=None)
def _state_template() -> bytes:
    """A freshly seeded torch CPU generator's state (no cached normal sample, ``left`` = 1 so the
    first draw twists the words set in), after checking that this torch lays it out as expected."""
    probe = 0x5EED_1234
    state = torch.Generator().manual_seed(probe).get_state().numpy()
    words = state[_WORDS_OFFSET:_WORDS_OFFSET + 8 * MT_WORDS].view(np.uint64)
    left = state[_LEFT_OFFSET:_LEFT_OFFSET + 4].view(np.int32)[0]
    if state.size != _STATE_BYTES or left != 1 or not np.array_equal(words, _mt_init_words(probe)):
        raise RuntimeError(f"torch {torch.__version__}'s CPU generator state is not laid out as "
                           "megatron_apex.training.random_streams expects (Mersenne Twister words at byte "
                           f"{_WORDS_OFFSET} of {_STATE_BYTES}); its per-iteration random streams cannot be seeded")
    return state.tobytes()


def stream_generator(seed: int, iteration: int, purpose: RandomPurpose, micro_batch: int = 0) -> torch.Generator:
    """A CPU generator whose numbers depend on (seed, iteration, purpose, micro_batch) only."""
    state = np.frombuffer(_state_template(), dtype=np.uint8).copy()
    words = stream_state_words(seed, iteration, purpose, micro_batch)
    state[_WORDS_OFFSET:_WORDS_OFFSET + 8 * MT_WORDS] = words.astype(np.uint64).view(np.uint8)
    # initial_seed() reports the first two words: a label of the stream, not how it was seeded
    state[:8] = np.array([int(words[0]) | int(words[1]) << 32], dtype=np.uint64).view(np.uint8)
    generator = torch.Generator()
    generator.set_state(torch.from_numpy(state))
    return generator
