"""A fleet with a straggler: today's static split against claiming, side by side in one run (CPU, small).

    python benchmarks/fleet_bench.py                     # 4 workers, rank 3 four times slower
    python benchmarks/fleet_bench.py --views 24 --slow 2

Three fleets precompute the same small store (timm's tiny random test_efficientnet teacher, 32 px views, one batch
per unit), each worker a separate process:

    ideal   the N-1 healthy workers alone, claiming (--join): total work / healthy workers, measured
    static  N ranks, --no-claim (unit i on rank i mod N only), rank N-1 slowed
    claim   N ranks, claiming (the default), rank N-1 slowed

Every worker's teacher also waits --gpu-time seconds per batch, and the slow one --slow seconds more
(a monkeypatch in this script's worker mode, as tests/faults_support.py does: no hook in the product).
The wait models the forward on a GPU that each fleet member has to itself: on this machine's few
shared cores the real forward of N processes contends for the same CPUs, which a GPU fleet does not,
and "total work / healthy workers" would measure the CPU count, not the scheduling. Workers import
torch and the pipeline, then start together (a barrier file): the clock runs from the start signal to
the last exit, so it includes each run's own start (source index, teacher, store, probes). The ratio
to `ideal` is the figure. Target: claim <= 1.2x ideal where static is >= 2x. The three stores are
also compared byte for byte (unit records, zarr chunks and zarr.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def _worker(cfg_path: str, wait: float, go: str) -> None:
    """One fleet member (run as a child process of this script)."""
    import torch

    import pipeline.stage1.labelling as lab
    import pipeline.stage1.precompute as pc

    torch.set_num_threads(1)  # N processes share the CPU: one thread each
    cfg = pc.PrecomputeConfig(**json.load(open(cfg_path)))
    orig = lab._label

    def label(*a, **kw):
        time.sleep(wait)  # the forward on this worker's own (model) GPU; a slow GPU waits longer
        return orig(*a, **kw)
    lab._label = label
    open(cfg_path + ".ready", "w").close()
    while not os.path.exists(go):
        time.sleep(0.01)
    s = pc.run_precompute(cfg)
    print(json.dumps({"units_done": s.units_done, "seconds": round(s.seconds, 1)}))


def _make_data(root: str, samples: int, per_shard: int) -> tuple[str, str]:
    import io

    import numpy as np
    import timm
    import torch
    from PIL import Image

    from pipeline.sources import write_wds_shards

    out = []
    for i in range(samples):
        g = np.random.Generator(np.random.Philox(key=i))
        buf = io.BytesIO()
        Image.fromarray(g.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append((f"s{i:05d}", buf.getvalue(), "png", i % 3))
    data = os.path.join(root, "wds")
    write_wds_shards(out, data, per_shard=per_shard, class_names=["a", "b", "c"])
    teacher = os.path.join(root, "teacher.pth")
    torch.manual_seed(0)
    torch.save(timm.create_model("test_efficientnet", num_classes=3).state_dict(), teacher)
    return data, teacher


def _fleet(root: str, name: str, base: dict, members: list[tuple[dict, float]]) -> tuple[float, list[int]]:
    """Start every member together; wall seconds from the start signal until the last exits, and the
    units each computed."""
    procs, paths = [], []
    go = os.path.join(root, f"{name}.go")
    for i, (extra, wait) in enumerate(members):
        path = os.path.join(root, f"{name}-{i}.json")
        json.dump({**base, "out": os.path.join(root, name), **extra}, open(path, "w"))
        paths.append(path)
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", path, "--wait", str(wait), "--go", go],
                                      cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    while not all(os.path.exists(p + ".ready") for p in paths):
        if any(p.poll() is not None for p in procs):
            break  # a worker died while importing: its error is reported below
        time.sleep(0.05)
    t0 = time.perf_counter()
    open(go, "w").close()
    done = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{name}: a worker failed:\n{err[-3000:]}")
        r = json.loads(out.strip().splitlines()[-1])
        done.append((r["units_done"], r["seconds"]))
    return time.perf_counter() - t0, done


def _files(path: str) -> dict[str, bytes]:
    out = {}
    for sub in ("units", "labels.zarr"):
        for r, _, files in os.walk(os.path.join(path, sub)):
            for f in files:
                if not f.startswith("."):
                    p = os.path.join(r, f)
                    out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4, help="fleet size N (the last one is slowed)")
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--per-shard", type=int, default=8)
    ap.add_argument("--views", type=int, default=16, help="one view per unit: units = shards x views")
    ap.add_argument("--gpu-time", type=float, default=0.5, help="seconds per batch on each worker's model GPU")
    ap.add_argument("--slow", type=float, default=1.5, help="extra seconds per batch on the slow worker")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--wait", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--go", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _worker(args.worker, args.wait, args.go)

    root = tempfile.mkdtemp(prefix="fleet_bench_")
    try:
        data, teacher = _make_data(root, args.samples, args.per_shard)
        base = dict(data=data, teacher="test_efficientnet", teacher_weights=teacher, views=args.views, views_per_unit=1,
                    topk=3, input_size=32, batch_size=args.per_shard, workers=0, device="cpu",
                    model_kwargs={"num_classes": 3}, progress=False, overrides=["repeats=1"])
        n = args.workers
        units = (args.samples // args.per_shard) * args.views
        g, slow = args.gpu_time, args.gpu_time + args.slow
        print(f"fleet_bench: {units} units of {args.per_shard} views (one batch each), {n} workers with "
              f"{g:g} s of model GPU time per batch, rank {n - 1} at {slow:g} s ({slow / g:.1f}x slower); "
              f"{os.cpu_count()} CPUs")
        ideal, ideal_done = _fleet(root, "ideal", base, [({"join": True}, g)] * (n - 1))
        static, static_done = _fleet(root, "static", base, [
            ({"rank": r, "world_size": n, "claim": False}, slow if r == n - 1 else g) for r in range(n)])
        claim, claim_done = _fleet(root, "claim", base, [
            ({"rank": r, "world_size": n}, slow if r == n - 1 else g) for r in range(n)])
        print(f"{'fleet':<40} {'wall s':>8} {'x ideal':>8}   (units, seconds) per worker")
        for label, wall, done in [
            (f"ideal: {n - 1} healthy workers, claiming", ideal, ideal_done),
            (f"static split: {n} ranks, --no-claim", static, static_done),
            (f"claiming: {n} ranks (default)", claim, claim_done),
        ]:
            print(f"{label:<40} {wall:8.1f} {wall / ideal:8.2f}   {done}")
        ref = _files(os.path.join(root, "ideal"))
        same = all(_files(os.path.join(root, name)) == ref for name in ("static", "claim"))
        print(f"stores byte-identical (unit records, zarr chunks and zarr.json, {len(ref)} files): {same}")
        target = claim / ideal <= 1.2 and static / ideal >= 2.0
        print(f"target (claim <= 1.2x ideal where static >= 2x): {'met' if target else 'NOT met'}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
