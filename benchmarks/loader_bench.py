"""The stage-two loader's own time (beyond decode + render), before and after per-slot planning.

ImageNet-like shard counts, simulated: a manifest of 1251 shards x 1024 samples whose bytes
are one real JPEG reused (decode and render stay real; the disk is left out), world 8 x
per-rank batch 128 (DeiT's global 1024) and 10 DataLoader workers, of which we run what worker
0 of rank 0 renders: steps 0, 10, 20, ... (the rest of the fleet does the same work).

- before: the format-1 loader: the old stream (shards one after another) and a whole shard's
  plan (``renderer.plan``: every slot's SlotView and mixing draws) per shard a batch touches;
  with 10 workers each batch of a worker is another shard, so a 1024-slot plan per 128 views.
- after: the new stream (windows of 8 shards interleaved) and ``slot_view`` for the slots of
  the batch only, each shard's slot order cached.

Both run side by side (interleaved rounds) in one process, one thread (as a worker does). Decode,
render and collate (``torch.stack`` of the batch: what any PyTorch loader, timm's included, does
with the views) are timed inside the same runs by wrapping those calls; the loader's own work
(planning, reading, targets) is the rest: total - decode - render - collate.

    python benchmarks/loader_bench.py [--input-size 224] [--jpeg 160x120] [--batches 3]
"""

from __future__ import annotations

import argparse
import time
from functools import lru_cache

import numpy as np
import pyarrow as pa
import torch
from common import interleaved, photo_like_jpegs

import student.loader as sd  # the loader's own module: its globals are what the patches below replace
from pipeline.recipes import create_recipe
from pipeline.sources import NO_CRC, Manifest
from pipeline.views import ViewRenderer
from student.stream import epoch_shard_order

SHARDS, PER_SHARD, CLASSES, WORLD, BATCH, WORKERS = 1251, 1024, 1000, 8, 128, 10


def manifest() -> Manifest:
    n = SHARDS * PER_SHARD
    idx = np.arange(n)
    table = pa.table({
        "key": pa.array(np.char.add("s", idx.astype(str))), "label": pa.array((idx * 7919 % CLASSES).astype(np.int32)),
        "shard": pa.array((idx // PER_SHARD).astype(np.int32)),
        "position": pa.array((idx % PER_SHARD).astype(np.int32)),
        "path": pa.array(np.char.add("s", idx.astype(str))), "offset": pa.array(np.zeros(n, np.int64)),
        "size": pa.array(np.zeros(n, np.int64)),
        "crc32c": pa.array(np.full(n, NO_CRC, np.int64)),  # OneJpeg's bytes are not the indexed ones: unchecked
    })
    return Manifest("wds", "/nonexistent", [f"shard-{j:06d}.tar" for j in range(SHARDS)],
                    [str(c) for c in range(CLASSES)], table)


class OneJpeg(sd.SampleReader):
    """Every sample's bytes are the same real JPEG (no disk: the loader's CPU work is measured)."""

    def __init__(self, m: Manifest, jpeg: bytes):
        super().__init__(m)
        self.jpeg = jpeg

    def read(self, shard: int, position: int) -> bytes:
        self.row(shard, position)
        return self.jpeg


class WholeShardPlan(sd.ReplayBatches):
    """The format-1 worker: a whole shard's plan (every slot) for any batch that touches the shard."""

    def __iter__(self):
        renderer, epoch = ViewRenderer(self.recipe), self.epochs.current()
        whole = lru_cache(maxsize=4)(lambda shard: renderer.plan(self.seed, epoch.view, shard,
                                                                 int(self.files.sizes[shard])))
        for t in range(epoch.steps):
            yield self.render(renderer, lambda shard, slot: whole(shard)[slot], t, epoch.step_rows(t))


def old_stream(seed: int, epoch: int, sizes) -> np.ndarray:
    """The format-1 epoch stream: shards in a seeded order, each one's slots in order."""
    return np.concatenate([np.stack([np.full(sizes[j], j), np.arange(sizes[j])], axis=1)
                           for j in epoch_shard_order(seed, epoch, len(sizes))]).astype(np.int64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--jpeg", default="160x120", help="WxH of the reused JPEG")
    ap.add_argument("--batches", type=int, default=3, help="batches of worker 0 of rank 0 per round")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    w, h = (int(v) for v in a.jpeg.split("x"))
    jpeg = photo_like_jpegs(1, size=(w, h))[0]
    m = manifest()
    files = OneJpeg(m, jpeg)
    recipe = create_recipe("deit", {"input_size": a.input_size})
    data = sd.TrainData(m, recipe, 0)
    epoch = 1
    g = WORLD * BATCH
    new = sd.plan_epoch(data, epoch, g)
    old = sd.EpochPlan(epoch, epoch, old_stream(0, epoch, m.shard_sizes), 0, None, g)
    # rank 0's batches; worker 0 of 10 renders steps 0, 10, 20, ...
    pick = slice(0, WORKERS * a.batches, WORKERS)
    steps = lambda plan: sd.RankSteps(epoch, np.concatenate(plan.rank_batches(0, BATCH)[pick]), BATCH)
    jobs = {"before": WholeShardPlan(files, recipe, 0, CLASSES, steps(old)),
            "after": sd.ReplayBatches(files, recipe, 0, CLASSES, steps(new))}

    torch.set_num_threads(1)  # as in a DataLoader worker (pipeline.devices.single_thread_worker)
    spent = {"decode": 0.0, "render": 0.0, "collate": 0.0}
    decode, render_pair, stack = sd.decode_image, ViewRenderer.render_pair, torch.stack

    def timed_stack(*args, **kw):
        t = time.perf_counter()
        try:
            return stack(*args, **kw)
        finally:
            spent["collate"] += time.perf_counter() - t

    def timed_decode(data):
        t = time.perf_counter()
        try:
            return decode(data)
        finally:
            spent["decode"] += time.perf_counter() - t

    def timed_render(self, *args):
        t = time.perf_counter()
        try:
            return render_pair(self, *args)
        finally:
            spent["render"] += time.perf_counter() - t

    sd.decode_image, ViewRenderer.render_pair, sd.torch.stack = timed_decode, timed_render, timed_stack
    parts = ("decode", "render", "collate")
    inside = {k: {p: [] for p in (*parts, "total")} for k in jobs}

    def run(name):
        def go():
            spent.update(decode=0.0, render=0.0, collate=0.0)
            t = time.perf_counter()
            views = sum(len(b["images"]) for b in jobs[name])
            inside[name]["total"].append(time.perf_counter() - t)
            for k in parts:
                inside[name][k].append(spent[k])
            assert views == a.batches * BATCH
        return go

    interleaved({k: run(k) for k in jobs}, rounds=a.rounds)
    print(f"loader: {SHARDS} shards x {PER_SHARD}, world {WORLD} x batch {BATCH}, {WORKERS} workers (worker 0 of "
          f"rank 0: {a.batches} batches per round, {a.rounds} rounds), deit recipe at {a.input_size} px, "
          f"one {w}x{h} JPEG reused")
    print(f"{'':<8}{'ms/batch':>10}{'decode':>9}{'render':>9}{'collate':>9}{'loader':>9}{'loader share':>14}"
          f"{'+ collate':>11}")
    for name, r in inside.items():
        tot, dec, ren, col = (float(np.median(r[k])) / a.batches * 1e3 for k in ("total", *parts))
        own = tot - dec - ren - col
        print(f"{name:<8}{tot:>10.1f}{dec:>9.1f}{ren:>9.1f}{col:>9.1f}{own:>9.1f}{own / tot:>13.1%}"
              f"{(own + col) / tot:>11.1%}")
    print("loader = planning + reading + targets (total - decode - render - collate); share of the batch's time")


if __name__ == "__main__":
    main()
