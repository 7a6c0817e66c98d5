"""Precompute cost breakdown: the teacher alone vs the whole pipeline, in one run.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824 \
        python benchmarks/precompute_bench.py                      # CPU: the real ImageNet Lite0 teacher
    python benchmarks/precompute_bench.py --teacher regnety_160 --images 2048 --batch-size 256 \
        --workers 12 --device cuda                                 # GPU, real size (random weights)

(a) the teacher's forward alone on ready tensors (same batch size, same number of views);
(b) the full precompute: read shard, decode, render every view, forward, top-k, write units;
(r) decode + render alone (the DataLoader side, no teacher).
Targets: on a GPU (b)/(a) >= 0.9. On this CPU, where rendering and the forward share 2 cores,
precompute's wall time should stay within 1.1x of render time + forward time measured apart.
Decode amortisation: the same run with --views-per-unit 1 (one decode per view) vs 10.
"""

import argparse
import os
import shutil
import tempfile
import time

import torch
from common import photo_like_jpegs

from pipeline.devices import resolve_device
from pipeline.recipes import create_recipe
from pipeline.sources import index_source, write_wds_shards
from pipeline.stage1.precompute import PrecomputeConfig, run_precompute
from pipeline.stage1.teacher import create_teacher
from pipeline.stage1.units import UnitViews


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="tf_efficientnet_lite0.pypi_in1k")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    tmp = tempfile.mkdtemp(prefix="precompute-bench-")
    try:
        jpegs = photo_like_jpegs(args.images)
        samples = [(f"img{i:06d}", data, "jpg", i % 1000) for i, data in enumerate(jpegs)]
        write_wds_shards(samples, os.path.join(tmp, "data"), per_shard=args.images,
                         class_names=[str(i) for i in range(1000)])
        data = os.path.join(tmp, "data")
        n_views = args.images * args.views
        recipe = create_recipe("deit")
        teacher = create_teacher(args.teacher, num_classes=1000, device=device)

        # (a) forward alone on ready tensors
        x = torch.randn(args.batch_size, 3, 224, 224)
        teacher(x.to(device), recipe.mean, recipe.std)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for start in range(0, n_views, args.batch_size):
            b = min(args.batch_size, n_views - start)
            teacher(x[:b].to(device, non_blocking=True), recipe.mean, recipe.std).cpu()
        forward = time.perf_counter() - t

        # (r) decode + render alone, on one process, views_per_unit = views
        def render_only(vpu):
            manifest = index_source(data)
            units = [(0, range(v, min(v + vpu, args.views))) for v in range(0, args.views, vpu)]
            ds = UnitViews(manifest, recipe, 0, units, args.batch_size)
            from pipeline.views import ViewRenderer
            r = ViewRenderer(recipe)
            t = time.perf_counter()
            for u in range(len(units)):
                for _ in ds.render_unit(r, u):
                    pass
            return time.perf_counter() - t

        render10, render1 = render_only(args.views), render_only(1)

        # (b) the full precompute
        def full(vpu, workers):
            out = os.path.join(tmp, f"store-{vpu}-{workers}")
            cfg = PrecomputeConfig(data=data, out=out, teacher=args.teacher, views=args.views, topk=10,
                                   views_per_unit=vpu, batch_size=args.batch_size, workers=workers,
                                   device=str(device), progress=False,
                                   random_teacher=True)  # a bare --teacher: speed only, the labels do not matter
            t = time.perf_counter()
            s = run_precompute(cfg)
            wall = time.perf_counter() - t
            shutil.rmtree(out)
            return wall, s

        full10_w0, s = full(args.views, 0)
        full10_w, _ = full(args.views, args.workers)
        full1_w, _ = full(1, args.workers)

        def rate(sec):
            return n_views / sec
        print(f"teacher {args.teacher} on {device}, batch {args.batch_size}, {args.images} photo-like JPEGs "
              f"500x375 x {args.views} views = {n_views} views, top-10, torch threads {torch.get_num_threads()}")
        print(f"{'what':<58}{'seconds':>9}{'views/s':>10}")
        rows = [("(a) teacher forward alone, ready tensors", forward),
                ("(r) read + decode + render alone (10 views/unit)", render10),
                ("(r1) read + decode + render alone (1 view/unit)", render1),
                ("(b) full precompute, workers 0, 10 views/unit", full10_w0),
                (f"(b) full precompute, workers {args.workers}, 10 views/unit", full10_w),
                (f"(b1) full precompute, workers {args.workers}, 1 view/unit", full1_w)]
        for label, sec in rows:
            print(f"{label:<58}{sec:>9.2f}{rate(sec):>10.1f}")
        best = min(full10_w0, full10_w)
        print(f"(b)/(a) throughput: {forward / best:.3f}   (GPU target >= 0.9)")
        print(f"precompute wall / (render + forward): {best / (render10 + forward):.3f}   (CPU target <= 1.1)")
        print(f"decode amortisation: render 1 view/unit / 10 views/unit = {render1 / render10:.2f}x; "
              f"full run {full1_w / full10_w:.2f}x")
        print(f"store: {s.store_bytes / max(s.stored_views, 1):.2f} bytes/view (top-10, random-ish labels)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
