"""Bytes the zarr reader decodes per epoch for ``read_view`` at ImageNet-21k's 14M samples, the
reader as it was (commit cccf9cc) and as it is, counted (the blosc decoder wrapped), never timed.

A 14M store is ~0.54 GiB a view (top-10, int16 ids: 41 bytes a slot) and 5.4 GiB a block of
10 views, over the reader's 2 GiB cache budget: before, each epoch decoded its whole block and
kept none of it (the block did not fit); now the reader keeps the views after the one read that
fit the budget. The store here is small (same per-slot arrays, shards of 1024) and the budget
is scaled by the same factor as the view, so the run decodes what a 14M store would, scaled
down; the figures are printed scaled back up to 14M.

    git worktree add /tmp/old cccf9cc
    python benchmarks/label_cache.py --old-tree /tmp/old [--views 30] [--budget-gib auto|2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES_21K, CLASSES_21K, K, PER_SHARD, SHARDS = 14_197_103, 21_841, 10, 1024, 8


def spec_of(shards: int, views: int, views_per_unit: int):
    from storage import StoreSpec

    return StoreSpec(mode="topk", k=K, num_classes=CLASSES_21K, class_names=(), views=views,
                     shard_sizes=(PER_SHARD,) * shards, views_per_unit=views_per_unit)


def view_bytes(spec) -> int:
    """Decoded bytes of one view, every shard (the arrays' shapes, as the reader decodes them)."""
    from storage.zarr_backend import _array_shapes

    return sum(int(np.prod(shape[2:])) * np.dtype(dt).itemsize for shape, dt in _array_shapes(spec).values()) \
        * spec.num_shards


def child(a) -> None:
    import storage.zarr_backend as zb
    from storage import create_store, open_store

    decoded = [0]

    class Counting(zb.Blosc):
        def decode(self, buf, out=None):
            decoded[0] += out.nbytes
            return super().decode(buf, out=out)

    spec = spec_of(SHARDS, a.views, a.views_per_unit)
    big = spec_of(-(-SAMPLES_21K // PER_SHARD), a.views, a.views_per_unit)
    scale = view_bytes(big) / view_bytes(spec)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        w = create_store(os.path.join(root, "s"), spec, backend="zarr", manifest=b"m")
        for shard, block in w.units():
            vb = len(spec.block_views(block))
            values = -np.cumsum(rng.exponential(size=(vb, PER_SHARD, K)), axis=-1).astype(np.float16)
            ids = rng.integers(0, CLASSES_21K, (vb, PER_SHARD, K))
            w.write_unit(shard, block, values=values, ids=ids, valid=np.ones((vb, PER_SHARD), np.uint8))
        zb.Blosc = Counting
        r = open_store(os.path.join(root, "s"))
        # "auto": the reader's default for a 14M store on this machine (a tree without one: 2 GiB, its default)
        budget = (getattr(zb, "label_cache_bytes", lambda spec: 2 << 30)(big) if a.budget_gib == "auto"
                  else float(a.budget_gib) * 2**30)
        r.cache_bytes = int(budget / scale)
        per_epoch = []
        for epoch in range(a.views):
            decoded[0] = 0
            for _ in r.read_view(epoch % a.views):
                pass
            per_epoch.append(decoded[0] * scale)
    print(json.dumps({"per_epoch": per_epoch, "view": view_bytes(big), "block": view_bytes(big) * a.views_per_unit,
                      "budget": budget}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-tree", help="a checkout of commit cccf9cc (git worktree add /tmp/old cccf9cc)")
    ap.add_argument("--views", type=int, default=30, help="V: epochs read, one per view")
    ap.add_argument("--views-per-unit", type=int, default=10, help="precompute's default")
    ap.add_argument("--budget-gib", default="auto",
                    help="the reader's cache_bytes in GiB, or auto: its default for a 14M store on this machine")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    runs = {"new": HERE} if not a.old_tree else {"old": os.path.abspath(a.old_tree), "new": HERE}
    gib = lambda b: b / 2**30
    rows = {}
    for name, tree in runs.items():
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--views", str(a.views),
                            "--views-per-unit", str(a.views_per_unit), "--budget-gib", str(a.budget_gib)],
                           cwd=tree, env={**os.environ, "PYTHONPATH": tree}, capture_output=True, text=True, check=True)
        rows[name] = json.loads(r.stdout.strip().splitlines()[-1])
    one = next(iter(rows.values()))
    print(f"read_view at {SAMPLES_21K} samples, top-{K}, {CLASSES_21K} classes: {gib(one['view']):.2f} GiB a view, "
          f"{gib(one['block']):.2f} GiB a block of {a.views_per_unit} views; cache budget {a.budget_gib}; "
          f"{a.views} epochs (views 0-{a.views - 1})")
    print(f"{'':<6}{'budget GiB':>11}  {'GiB decoded per epoch (first 12)':<70}{'mean':>8}{'blocks decoded':>16}")
    for name, r in rows.items():
        per = r["per_epoch"]
        first = " ".join(f"{gib(b):.1f}" for b in per[:12])
        print(f"{name:<6}{gib(r['budget']):>11.2f}  {first:<70}{gib(np.mean(per)):>8.2f}{sum(per) / r['block']:>16.1f}")


if __name__ == "__main__":
    main()
