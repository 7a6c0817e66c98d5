"""The work plan of stage one: what a unit is, in which order a process takes units, and how a
DataLoader worker renders a unit's views.

One word, one meaning: a *unit* is the unit of work and of storage, ``(shard, view block)``, as the
store names it (``StoreSpec.units()``, ``units/<shard>_<block>``): the views ``block_views(block)`` of
every sample of one shard. It is independent and idempotent: its DataLoader worker reads the shard
once (a tar front to back; a virtual shard by one seek per sample), decodes each image once, renders
all the unit's views from the decoded images, and the main process labels them and commits the unit
in one atomic write. A *view block* is the views of a unit (``--views-per-unit`` consecutive views).
A *batch* (``ViewBatch``) is what the teacher sees in one forward: a unit's views are cut into fixed
batches of ``batch_size`` in (view, slot) order, never spanning units, so a view meets the same
batch-mates whatever the fleet size or worker count, and the store's bytes depend on neither (most
units fill every batch; only a unit's last batch may be short). Storage's own word for a unit's
array piece on disk is a *chunk* (zarr); stage one does not use that word.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..sources import Manifest, Undecodable, decode_image
from ..views import ViewRenderer

Unit = tuple[int, int]  # (shard, view block): the unit of work, as the store names it


def own_share(units: list[Unit], rank: int, world: int) -> list[Unit]:
    """A rank's own share of the store's units: unit i goes to rank i mod world."""
    return [u for i, u in enumerate(units) if i % world == rank]


def work_order(units: list[Unit], rank: int, world: int, claim: bool) -> list[Unit]:
    """The order a rank takes units in: its own share front to back; then (claiming) the other ranks'
    units from the back of their lists, where their owners (working front to back) arrive last."""
    others = [u for i, u in enumerate(units) if i % world != rank][::-1] if claim else []
    return own_share(units, rank, world) + others


@dataclass(frozen=True)
class ViewBatch:
    """Up to batch_size rendered views of one unit, ready for the teacher."""
    index: int                # which unit: its index in the pass's list (UnitViews.units)
    start: int                # first flat index (view_in_block * n + slot) in the unit
    views: torch.Tensor       # [b, 3, H, W] float32 (zeros where invalid)
    valid: torch.Tensor       # [b] bool
    invalid_keys: tuple[str, ...] = ()


class UnitViews(torch.utils.data.IterableDataset):
    """Renders a pass's pending units as ViewBatches; DataLoader workers split the units among
    themselves. units: each unit as (shard, its views), the views as a range (``spec.block_views``)."""

    def __init__(self, manifest: Manifest, recipe, seed: int, units: list[tuple[int, range]], batch_size: int,
                 claimer=None):
        self.manifest, self.recipe, self.seed = manifest, recipe, seed
        self.units, self.batch_size = units, batch_size
        self.claimer = claimer  # fleet.Claimer; None: every unit given is ours (the static split)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        renderer = ViewRenderer(self.recipe)
        for u in range(wid, len(self.units), nw):
            shard, views = self.units[u]
            if self.claimer is not None and not self.claimer.take(shard, views.start):
                continue  # done or being done by another worker
            yield from self.render_unit(renderer, u)

    def render_unit(self, renderer: ViewRenderer, u: int):
        shard, views = self.units[u]
        images, bad = {}, {}
        for s in self.manifest.iter_shard(shard):  # one read of the shard, one decode per image
            img = decode_image(s.data)
            if isinstance(img, Undecodable):  # flag its views, keep going
                bad[s.position] = f"{s.key} ({img.reason})"
            else:
                images[s.position] = img
        n = self.manifest.shard_sizes[shard]
        size = self.recipe.input_size
        buf, ok, keys, start = [], [], [], 0
        for view in views:
            for sv in renderer.plan(self.seed, view, shard, n)[::2]:
                pair = [sv.position] + ([sv.partner_position] if sv.partner_position is not None else [])
                broken = [bad[p] for p in pair if p in bad]
                if broken:  # a view that shows a broken image (itself or its mixing partner) is invalid
                    buf.extend(torch.zeros(3, size, size) for _ in pair)  # placeholders, never seen by the teacher
                    ok.extend(False for _ in pair)
                    keys.extend(broken)
                else:
                    partner_img = images[sv.partner_position] if len(pair) == 2 else None
                    buf.extend(renderer.render_pair(self.seed, sv, images[sv.position], partner_img))
                    ok.extend(True for _ in pair)
                while len(buf) >= self.batch_size:
                    yield self._batch(u, start, buf[:self.batch_size], ok[:self.batch_size], keys)
                    start += self.batch_size
                    buf, ok, keys = buf[self.batch_size:], ok[self.batch_size:], []
        if buf:
            yield self._batch(u, start, buf, ok, keys)

    @staticmethod
    def _batch(u, start, buf, ok, keys) -> ViewBatch:
        return ViewBatch(u, start, torch.from_numpy(np.stack([b.numpy() for b in buf])), torch.tensor(ok),
                         tuple(keys))
