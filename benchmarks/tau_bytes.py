"""What one ``precompute --tau T`` costs per view, uncompressed and as stored (zarr and wds).

    python benchmarks/tau_bytes.py [--images 256] [--views 10]

One real precompute (the ImageNet Lite0 teacher shipped on PyPI, DeiT views of photo-like JPEGs, one
shard of --images samples, one unit of --views views: the size of a unit at the default
--views-per-unit 10 with a 256-sample shard) stores top-10 labels and the tail at tau 1 and 3. Its arrays
are then written again, unchanged, into stores with no tau, each single tau and both, in both backends:
the difference in store bytes per view is what a tau costs there (compressed by blosc zstd with the
store's own settings, container overhead included). Uncompressed, a tau is one float16 per view.

Measured (2 shared CPU cores, --images 256 --views 10: 2,560 views in one unit):

    zarr: top-10 alone 22.50 bytes/view; +tau 1: +1.75; +tau 3: +0.99; +tau 1,3: +2.82
    wds:  top-10 alone 24.00 bytes/view; +tau 1: +2.00; +tau 3: +1.20; +tau 1,3: +3.00

(wds pads each tar member to 512 bytes, so its figures move in steps of 0.2 at this unit size.) The
tail's log-sum-exp varies less at a higher T, so it compresses better; soft_topk.py measured +1.6 at
T 3 on real photo crops. Hence `--tau`'s help: 2 bytes/view uncompressed, about 1-1.8 as stored.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import photo_like_jpegs  # noqa: E402
from pipeline.sources import write_wds_shards  # noqa: E402
from pipeline.stage1.precompute import PrecomputeConfig, run_precompute  # noqa: E402
from pipeline.stage1.teacher import PYPI_EFFICIENTNET_LITE0  # noqa: E402
from storage import create_store, open_store  # noqa: E402

TAUS = (1.0, 3.0)


def unit_arrays(path: str) -> dict:
    """The one unit of the store at path, as write_unit takes it."""
    r = open_store(path)
    (shard, block), = r.completed_units()
    labels = [r.read(view, shard) for view in r.spec.block_views(block)]
    return {"values": np.stack([x.values for x in labels]), "ids": np.stack([x.ids for x in labels]),
            "valid": np.stack([x.valid for x in labels]), "tail_lse": np.stack([x.tail_lse for x in labels])}


def bytes_per_view(path: str, spec, arrays: dict, taus: tuple[int, ...], backend: str) -> float:
    """Store bytes per view of these arrays with the tail columns `taus` (indices into TAUS) kept."""
    out = f"{path}-{backend}-{'-'.join(map(str, taus)) or 'none'}"
    s = dataclasses.replace(spec, taus=tuple(TAUS[i] for i in taus))
    w = create_store(out, s, backend=backend, manifest=open_store(path).manifest_bytes)
    empty = open_store(out).nbytes()
    tail = arrays["tail_lse"][..., list(taus)] if taus else None
    w.write_unit(0, 0, values=arrays["values"], ids=arrays["ids"], valid=arrays["valid"], tail_lse=tail)
    return (open_store(out).nbytes() - empty) / arrays["valid"].size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        samples = [(f"img{i:06d}", data, "jpg", i % 1000) for i, data in enumerate(photo_like_jpegs(args.images))]
        write_wds_shards(samples, os.path.join(tmp, "data"), per_shard=args.images,
                         class_names=[str(i) for i in range(1000)])
        store = os.path.join(tmp, "store")
        run_precompute(PrecomputeConfig(
            data=os.path.join(tmp, "data"), out=store, teacher=PYPI_EFFICIENTNET_LITE0, views=args.views,
            views_per_unit=args.views, topk=10, taus=list(TAUS), workers=args.workers, batch_size=64,
            device="cpu", progress=False))
        spec, arrays = open_store(store).spec, unit_arrays(store)
        n = arrays["valid"].size
        print(f"{n} views (Lite0 teacher, top-10, one unit); uncompressed a tau is "
              f"{arrays['tail_lse'].dtype.itemsize} bytes/view (float16)")
        for backend in ("zarr", "wds"):
            base = bytes_per_view(store, spec, arrays, (), backend)
            row = [f"{backend}: top-10 alone {base:.2f} bytes/view"]
            for taus in ((0,), (1,), (0, 1)):
                extra = bytes_per_view(store, spec, arrays, taus, backend) - base
                row.append(f"+tau {','.join(f'{TAUS[i]:g}' for i in taus)}: +{extra:.2f}")
            print("; ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
