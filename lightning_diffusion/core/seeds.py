"""Seeds of the per-rank random streams, keyed so that a resumed run draws the same numbers.

One multiplicative hash of (seed, global rank, key, salt) for every stream of the library: the
module's noise and levels per step, the global RNG reseed, the adaptive sampler's look-ahead noise.
Streams of different purposes differ by ``salt``.
"""

from __future__ import annotations

__all__ = ["stream_seed"]

_MASK = 2**63 - 1


def stream_seed(seed: int, rank: int, key: int, salt: int = 0) -> int:
    """A 63-bit seed, distinct per (seed, rank, key, salt); ``key`` is a step or draw counter."""
    mixed = seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + key * 0x94D049BB133111EB
    mixed += salt * 0xD6E8FEB86659FD93
    return mixed % _MASK
