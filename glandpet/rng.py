"""Reproducible random streams: one generator per (seed, purpose key), so a result drawn for one
gland, marker or held-out atlas does not change when another one is added or removed."""

from __future__ import annotations

import zlib

import numpy as np

__all__ = ["keyed_rng"]


def keyed_rng(seed: int, *key: object) -> np.random.Generator:
    """The generator of ``seed`` and the purpose ``key`` (its parts joined by ``/`` and hashed with
    CRC-32, which is stable across Python runs, unlike ``hash``)."""
    return np.random.default_rng([int(seed), zlib.crc32("/".join(map(str, key)).encode())])
