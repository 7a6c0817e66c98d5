"""Probe views: a few rendered views hashed at precompute time and re-rendered before use.

If Pillow, timm or torch change how a view renders (an upgrade, another platform), the stored
labels no longer describe the views the student sees. Re-rendering a handful of views and
comparing sha256 of their bytes catches that before a GPU-month is spent (docs/DESIGN.md, "Drift is detected").
"""

from __future__ import annotations

import hashlib

from .sources import Manifest, Undecodable, decode_image
from .views import ViewRenderer


def render_probe(renderer: ViewRenderer, manifest: Manifest, seed: int, view: int, shard: int, slot: int) -> str | None:
    """sha256 of one rendered view's float32 bytes; None when its image (or partner) does not decode
    (such a view cannot be a probe). A changed or unreadable source raises its SourceError."""
    sv = renderer.plan(seed, view, shard, manifest.shard_sizes[shard])[slot]
    img = decode_image(manifest.read_sample(shard, sv.position).data)
    partner = None
    if sv.partner_position is not None:
        partner = decode_image(manifest.read_sample(shard, sv.partner_position).data)
    if isinstance(img, Undecodable) or isinstance(partner, Undecodable):
        return None
    x = renderer.render_slot(seed, sv, img, partner)
    return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()


def probe_hashes(renderer: ViewRenderer, manifest: Manifest, seed: int, views: int, count: int = 4) -> dict[str, str]:
    """{"view/shard/slot": hash} for the first ``count`` renderable slots of shard 0 in the first and last view."""
    out = {}
    for view in sorted({0, views - 1}):
        found = 0
        for slot in range(manifest.shard_sizes[0]):
            if found == count:
                break
            digest = render_probe(renderer, manifest, seed, view, 0, slot)
            if digest is not None:  # an undecodable image cannot be a probe
                out[f"{view}/0/{slot}"] = digest
                found += 1
    return out


def drifted_probes(stored: dict[str, str], renderer: ViewRenderer, manifest: Manifest, seed: int) -> list[str]:
    """The probes whose re-rendered bytes differ from the stored hashes (empty: no drift). A changed
    source raises SourceChanged (the source changed, not the renderer: say so, not "drift")."""
    bad = []
    for key, digest in sorted(stored.items()):
        view, shard, slot = (int(p) for p in key.split("/"))
        if render_probe(renderer, manifest, seed, view, shard, slot) != digest:
            bad.append(key)
    return bad
