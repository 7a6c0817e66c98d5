"""Helpers shared by the benchmark scripts: realistic test images and side-by-side timing."""

from __future__ import annotations

import io
import os
import statistics
import sys
import time

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MALLOC_ENV = "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824"


def photo_like_jpegs(n: int, size=(500, 375), quality=90, seed=0) -> list[bytes]:
    """JPEGs with photo-like statistics (smooth shapes, texture, sensor noise) of ImageNet's typical size.

    Uniform noise would decode slower and compress worse than a photo; flat colour faster and
    better. Blurred random shapes plus mild noise sit close to a real photo's decode cost.
    """
    g = np.random.Generator(np.random.Philox(key=seed))
    out = []
    w, h = size
    for _ in range(n):
        low = g.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize(size, Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.int16) + g.integers(-12, 13, (h, w, 3))
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def interleaved(fns: dict, rounds: int = 5) -> dict[str, float]:
    """Run each fn once per round, alternating, and return the median seconds per fn.

    Alternating inside one process cancels machine noise (other load, frequency, malloc state)
    that would bias two separate runs.
    """
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
