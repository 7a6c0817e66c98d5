"""Image bytes -> an RGB image, or ``Undecodable``: the one decode every reader uses."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Undecodable:
    """What ``decode_image`` returns for bytes that are no image it can decode (``reason``: the
    exception's name). A value, not an exception: every reader (precompute, the loader, probes,
    verify, inspect) flags the image and goes on, and none can miss a kind of failure."""
    reason: str


def decode_image(data: bytes) -> Image.Image | Undecodable:
    """Bytes -> RGB PIL image, fully loaded; ``Undecodable`` for anything else, never an exception.

    Image bytes are untrusted: Pillow's plugins raise far more than OSError on hostile input
    (DecompressionBombError for a 20000x20000 PNG of 1 MB, NotImplementedError, SyntaxError,
    struct.error, ...), so every failure of the decode is caught here, in one place."""
    if not data:
        return Undecodable("empty file")
    try:
        return _to_rgb(_loaded(data))
    except Exception as e:  # noqa: BLE001 - any failure to decode hostile bytes is the image's, see above
        return Undecodable(type(e).__name__)


def _loaded(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
    # Most photos are RGB already: convert() would only copy them.
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        # 16-bit grayscale: Pillow's convert() clips to 255 (a white image). Keep the high byte, as
        # Pillow itself does for 16-bit RGB(A) PNGs, so one picture decodes the same in any of them.
        a = np.asarray(im).astype(np.int64)
        a = (np.clip(a, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(a[:, :, None], 3, axis=2), "RGB")
    return im.convert("RGB")
