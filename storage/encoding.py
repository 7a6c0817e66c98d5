"""Lossless array transforms shared by both backends, so that they store the same bytes before compression.

Top-k log-probabilities are sorted descending and all <= 0, so their float16 bit patterns
(sign bit set, then |l| in exponent/mantissa order) *increase* monotonically along k. Storing
the first pattern and then differences along k (mod 2^16) turns 16 noisy bits per value into
small numbers whose high bytes are zero, which blosc's byte-shuffle + zstd removes almost entirely
(both backends byte-shuffle: on real teacher outputs it beats bit-shuffle, see zarr_backend.py).
This is exact: decoding is a cumulative sum in uint16, which wraps the same way.
"""

from __future__ import annotations

import numpy as np


def encode_values(values: np.ndarray) -> np.ndarray:
    """float16 [..., k] sorted descending -> uint16 [..., k]: first bit pattern, then deltas along k."""
    bits = np.ascontiguousarray(values, dtype=np.float16).view(np.uint16)
    out = bits.copy()
    out[..., 1:] = np.diff(bits, axis=-1)  # uint16 arithmetic wraps: exact either way
    return out


def decode_values(encoded: np.ndarray) -> np.ndarray:
    """Inverse of encode_values."""
    return np.cumsum(encoded, axis=-1, dtype=np.uint16).view(np.float16)


def pad_slots(a: np.ndarray, capacity: int) -> np.ndarray:
    """Pad axis 1 (slots) of [views, n, ...] with zeros up to capacity: padding is flagged valid=0."""
    n = a.shape[1]
    if n == capacity:
        return np.ascontiguousarray(a)
    out = np.zeros((a.shape[0], capacity) + a.shape[2:], dtype=a.dtype)
    out[:, :n] = a
    return out
