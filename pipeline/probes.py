"""Probe views: a few rendered views hashed at precompute time and re-rendered before use.

If Pillow, timm or torch change how a view renders (an upgrade, another platform), the stored
labels no longer describe the views the student sees. Re-rendering a handful of views and
comparing sha256 of their bytes catches that before a GPU-month is spent (docs/DESIGN.md, "Drift is detected").
"""

from __future__ import annotations

import hashlib

from .sources import Manifest, SourceError, decode_image
from .views import ViewRenderer


def render_probe(renderer: ViewRenderer, manifest: Manifest, seed: int, view: int, shard: int, slot: int) -> str:
    """sha256 of one rendered view's float32 bytes; raises if its image (or partner) does not decode."""
    sv = renderer.plan(seed, view, shard, manifest.shard_sizes[shard])[slot]
    img = decode_image(manifest.read_sample(shard, sv.position).data)
    partner = None
    if sv.partner_position is not None:
        partner = decode_image(manifest.read_sample(shard, sv.partner_position).data)
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
            try:
                out[f"{view}/0/{slot}"] = render_probe(renderer, manifest, seed, view, 0, slot)
                found += 1
            except SourceError:  # a changed or unreadable source is no undecodable image: stop
                raise
            except (OSError, ValueError):  # an undecodable image cannot be a probe
                continue
    return out


def drifted_probes(stored: dict[str, str], renderer: ViewRenderer, manifest: Manifest, seed: int) -> list[str]:
    """The probes whose re-rendered bytes differ from the stored hashes (empty: no drift)."""
    bad = []
    for key, digest in sorted(stored.items()):
        view, shard, slot = (int(p) for p in key.split("/"))
        try:
            same = render_probe(renderer, manifest, seed, view, shard, slot) == digest
        except SourceError:  # the source changed, not the renderer: say so, not "drift"
            raise
        except (OSError, ValueError):
            same = False
        if not same:
            bad.append(key)
    return bad
