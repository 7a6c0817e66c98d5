"""Probe views: a few rendered views hashed at precompute time and re-rendered before use.

If Pillow, timm or torch change how a view renders (an upgrade, another platform), the stored
labels no longer describe the views the student sees. Re-rendering a handful of views and
comparing sha256 of their bytes catches that before a GPU-month is spent (DESIGN.md, point 5).
"""

from __future__ import annotations

import hashlib

from .sources import Manifest, decode_image
from .views import ViewRenderer


def probe_slots(views: int, shard_sizes: tuple[int, ...], count: int = 4) -> list[tuple[int, int, int]]:
    """(view, shard, slot) of the probes: the first slots of the first and last view of shard 0."""
    n = shard_sizes[0]
    slots = list(range(min(count, n)))
    return sorted({(v, 0, s) for v in (0, views - 1) for s in slots})


def probe_hashes(renderer: ViewRenderer, manifest: Manifest, seed: int, views: int, count: int = 4) -> dict[str, str]:
    """{"view/shard/slot": sha256 of the rendered float32 tensor}."""
    out = {}
    for view, shard, slot in probe_slots(views, manifest.shard_sizes, count):
        sv = renderer.plan(seed, view, shard, manifest.shard_sizes[shard])[slot]
        img = decode_image(manifest.read_sample(shard, sv.position).data)
        partner = None
        if sv.partner_position is not None:
            partner = decode_image(manifest.read_sample(shard, sv.partner_position).data)
        x = renderer.render_slot(seed, sv, img, partner)
        out[f"{view}/{shard}/{slot}"] = hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()
    return out


def drifted_probes(stored: dict[str, str], renderer: ViewRenderer, manifest: Manifest, seed: int,
                   views: int) -> list[str]:
    """The probes whose re-rendered bytes differ from the stored hashes (empty: no drift)."""
    now = probe_hashes(renderer, manifest, seed, views, count=len({k.split("/")[2] for k in stored}) or 4)
    return sorted(k for k, h in stored.items() if now.get(k) != h)
