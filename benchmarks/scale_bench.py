"""What a start costs as the dataset grows: the issue-22 table, old checkout vs this one, side by side.

    python benchmarks/scale_bench.py --sizes 10k,100k --baseline /tmp/old     # /tmp/old: git worktree of an old commit
    python benchmarks/scale_bench.py --sizes 1.28M --baseline /tmp/old         # ~2.6 GB of tars, ~30 min
    python benchmarks/scale_bench.py --sizes 14M ...                            # ~30 GB; at the users' scale

Builds synthetic WebDataset sources (tars of 1,024 tiny PNGs, labels drawn from 1,000 classes, written
once and cached under --work) and, for every checkout (the baseline, then this one, row by row so that
both see the same machine load), a top-10 label store written through that checkout's storage API
(what `precompute` writes, without running a teacher over 1.28M views). Then each row runs in a fresh
process of that checkout:

- index, names only / with checksums: ``index_source`` over the tars, microseconds per sample;
- train start: ``cli.py train --labels`` from process start to the end of its first step (a 1-layer
  student at 32 px, 0 workers, so the time is the start's, not the model's);
- inspect: ``cli.py inspect STORE``, process start to exit;
- plan_epoch and read_view: one epoch's plan, and one view's labels (all shards) read from the store;
- class_diversity at ImageNet-21k's shape (21,841 classes, 14.2M samples in 1,024-sample shards):
  seconds and peak traced memory.

Times are wall seconds on a noisy machine (+-30%); the growth from row to row is what matters. The
counts that tests assert (stat calls, bytes read, objects per sample) live in tests/test_scale_counts.py.
Worker memory after an epoch: benchmarks/worker_memory.py. Bytes a fleet start reads: tests/test_fleet*.py.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SIZES = {"10k": 10_000, "100k": 100_000, "1.28M": 1_281_167, "14M": 14_197_122}
PER_TAR, CLASSES, VIEWS, TOPK = 1024, 1000, 2, 10
TARGETS = {"index_names": "well under 10 us/sample", "index_crc": "once per fleet",
           "train_start": "seconds", "inspect": "seconds", "class_diversity": "< 1 s, < 200 MB",
           "fleet_bytes": "each source byte read once before the first unit", "worker_uss": "< 30 MB"}


# ---- the synthetic source (cached) ---------------------------------------------------------------
def tiny_pngs(n: int = 64) -> list[bytes]:
    from PIL import Image

    g = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(g.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def build_source(root: str, n: int) -> str:
    """``n`` samples in tars of PER_TAR, labels drawn from CLASSES classes; written once per size."""
    done = os.path.join(root, "DONE")
    if os.path.exists(done):
        return root
    os.makedirs(root, exist_ok=True)
    pngs, g = tiny_pngs(), np.random.default_rng(n)
    labels = g.integers(0, CLASSES, n)
    t = time.perf_counter()
    for start in range(0, n, PER_TAR):
        name = os.path.join(root, f"shard-{start // PER_TAR:06d}.tar")
        with tarfile.open(name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(n, start + PER_TAR)):
                png, cls = pngs[i % len(pngs)], str(labels[i]).encode()
                for member, data in ((f"s{i:09d}.png", png), (f"s{i:09d}.cls", cls)):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    open(os.path.join(root, "classes.txt"), "w").write("".join(f"class{c:04d}\n" for c in range(CLASSES)))
    open(done, "w").close()
    print(f"  wrote {n:,} samples in {-(-n // PER_TAR)} tars in {time.perf_counter() - t:.0f} s", flush=True)
    return root


# ---- rows, each run in a fresh process of one checkout ----------------------------------------------
def child(what: str, src: str, store: str) -> dict:
    t0 = time.perf_counter()
    if what == "store":  # a top-10 store as precompute writes it, labels drawn at random
        from pipeline.recipes import create_recipe
        from pipeline.sources import index_source
        from storage import StoreSpec, create_store

        m = index_source(src, checksums=True)
        spec = StoreSpec(mode="topk", k=TOPK, num_classes=m.num_classes, class_names=tuple(m.class_names),
                         views=VIEWS, shard_sizes=m.shard_sizes, views_per_unit=VIEWS,
                         recipe=create_recipe("deit", ["input_size=32"]).to_dict(), seed=0,
                         manifest_fingerprint=m.fingerprint, teacher={"name": "synthetic", "fingerprint": "0"})
        w = create_store(store, spec, manifest=m.to_bytes(), meta=creation_meta(m), overwrite=True)
        g = np.random.default_rng(0)
        for shard, n in enumerate(spec.shard_sizes):
            ids = g.integers(0, m.num_classes - TOPK, (VIEWS, n, 1)) + np.arange(TOPK)  # k distinct classes
            values = -np.sort(np.abs(g.standard_normal((VIEWS, n, TOPK))), axis=-1)  # log-probs, best first
            values = values.astype(np.float16)
            w.write_unit(shard, 0, values=values, ids=ids, valid=np.ones((VIEWS, n), np.uint8))
        return {"seconds": time.perf_counter() - t0}
    if what in ("index_names", "index_crc"):
        from pipeline.sources import index_source

        t, cpu = time.perf_counter(), time.process_time()
        m = index_source(src, checksums=what == "index_crc")
        # CPU time too: on a shared machine it moves less than the wall clock
        return {"us_per_sample": (time.perf_counter() - t) / m.num_samples * 1e6,
                "cpu_us_per_sample": (time.process_time() - cpu) / m.num_samples * 1e6}
    if what == "plan_read":
        from storage import open_store
        from student.data import open_train_data, plan_epoch

        t = time.perf_counter()
        data = open_train_data(src, labels=store)
        opened = time.perf_counter() - t
        t = time.perf_counter()
        plan_epoch(data, 0, 64)
        planned = time.perf_counter() - t
        reader = open_store(store)
        t = time.perf_counter()
        for _ in reader.read_view(0):
            pass
        return {"open_train_data_s": opened, "plan_epoch_s": planned, "read_view_s": time.perf_counter() - t}
    if what == "class_diversity":
        import tracemalloc

        import pyarrow as pa

        from pipeline.sources import Manifest, class_diversity

        n, classes = SIZES["14M"], 21_841
        shard = (np.arange(n) // PER_TAR).astype(np.int32)  # int32 columns, as a manifest holds them
        label = np.random.default_rng(0).integers(0, classes, n, dtype=np.int32)
        names = [f"v{i}" for i in range(int(shard[-1]) + 1)]
        m = Manifest(kind="imagefolder", root="", shards=names,
                     class_names=[str(c) for c in range(classes)],
                     samples=pa.table({"shard": pa.array(shard), "label": pa.array(label)}))
        m.shard_sizes  # noqa: B018 - the shard table is the manifest's, not class_diversity's
        tracemalloc.start()
        t = time.perf_counter()
        class_diversity(m)
        seconds = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
        return {"seconds": seconds, "peak_MB": peak / 2**20}
    if what == "fleet_bytes":
        return fleet_bytes(src, store)
    raise SystemExit(f"unknown row {what}")


def worker_uss(repo: str, n: int, workers: int = 2) -> dict:
    """A DataLoader worker's private memory after one epoch of ``n`` samples: ``worker_memory.py`` (its
    read path, batch 256) run on ``repo``'s loader."""
    script = os.path.join(HERE, "worker_memory.py")
    r = subprocess.run([sys.executable, script, "--samples", str(n), "--workers", str(workers), "--batch", "256",
                        "--epochs", "1", "--child"], cwd=repo, env={**os.environ, "PYTHONPATH": repo},
                       capture_output=True, text=True)
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return {"uss_MiB_max": max(json.loads(r.stdout.strip().splitlines()[-1])[0]["uss"]) / 2**20}


def fleet_bytes(src: str, store: str, ranks: int = 4) -> dict:
    """``ranks`` precompute ranks started together (threads) on a fresh store: how many times each source byte
    was read before each rank's first unit, counted by ``tests/test_read_once.py``'s wrappers of every way a
    file is read. Each rank stops at its first unit (the units read their shards, as they must)."""
    import shutil
    import threading

    import pytest
    import timm
    import torch

    sys.path.insert(0, os.path.join(REPO, "tests"))  # (this script's tree: its counting wrappers)
    try:
        from test_read_once import _SourceReads, _times_read

        from pipeline.stage1.precompute import PrecomputeConfig, run_precompute
        from pipeline.stage1.units import UnitViews
    except ImportError as e:
        return {"error": f"not measurable in this tree ({e})"}
    shutil.rmtree(store, ignore_errors=True)
    teacher = store + "-teacher.pth"
    g = torch.Generator().manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=CLASSES)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    torch.save(model.state_dict(), teacher)

    class FirstUnit(Exception):
        pass

    mp = pytest.MonkeyPatch()
    reads = _SourceReads(src)
    reads.install(mp)

    def render_unit(self, *a, **kw):  # the first unit starts: what follows is the units' reading
        reads.local.unit_started = True
        raise FirstUnit
    mp.setattr(UnitViews, "render_unit", render_unit)
    start, errors = threading.Barrier(ranks), []

    def rank(r: int) -> None:
        try:
            start.wait()
            run_precompute(PrecomputeConfig(
                data=src, out=store, teacher="resnet10t", teacher_weights=teacher, views=VIEWS, views_per_unit=1,
                topk=TOPK, input_size=32, batch_size=8, workers=0, model_kwargs={"num_classes": CLASSES},
                progress=False, rank=r, world_size=ranks, lease_ttl=600.0))
        except FirstUnit:
            pass
        except BaseException as e:  # noqa: BLE001 (reported)
            errors.append(f"rank {r}: {e}")
    t = time.perf_counter()
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(ranks)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    mp.undo()
    if errors:
        return {"error": "; ".join(errors)[:300]}
    times = _times_read(reads.reads["start"])
    source = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".tar"))
    tars = [c for p, c in times.items() if p.endswith(".tar")]
    return {"source_read_x": sum(int(c.sum()) for c in tars) / source,
            "bytes_read_twice": sum(int((c > 1).sum()) for c in tars), "seconds": time.perf_counter() - t}


def creation_meta(m) -> dict:
    """What precompute puts in store.json beside the spec: the source files' stamps, where the checkout
    records them (a start then checks the source by one stat per file instead of indexing it)."""
    try:
        from storage.meta import SOURCE_STAMPS
    except ImportError:  # a checkout from before stamps
        return {}
    return {SOURCE_STAMPS: m.stamps} if m.stamps is not None else {}


def run_child(repo: str, what: str, src: str, store: str) -> dict:
    env = {**os.environ, "PYTHONPATH": repo, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", what, "--src", src, "--store", store],
                         cwd=repo, env=env, capture_output=True, text=True)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_cli(repo: str, args: list[str]) -> dict:
    """Wall seconds of ``python cli.py ARGS`` in ``repo``, process start to exit."""
    env = {**os.environ, "PYTHONPATH": repo, "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "cli.py", *args], cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return {"seconds": seconds}


def train_args(src: str, store: str, run: str) -> list[str]:
    return ["train", "--data", src, "--labels", store, "--out", run, "--model", "deit_tiny_patch16_224",
            "--model-kwargs", json.dumps(dict(img_size=32, patch_size=16, depth=1, embed_dim=32, num_heads=1)),
            "--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "8", "--workers", "0",
            "--device", "cpu", "--no-ema", "--warmup-epochs", "0"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10k,100k", help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--baseline", default=None, help="a checkout of an older commit to run side by side")
    ap.add_argument("--work", default="/tmp/scale-bench", help="where sources (cached) and stores go")
    ap.add_argument("--rows", default="index_names,index_crc,train_start,inspect,plan_read,class_diversity,"
                                      "worker_uss,fleet_bytes")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--src", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.src, args.store)))
        return
    repos = {"old": os.path.abspath(args.baseline)} if args.baseline else {}
    repos["new"] = REPO
    rows = args.rows.split(",")
    results = {}
    for size in args.sizes.split(","):
        n = SIZES[size]
        src = build_source(os.path.join(args.work, f"src-{size}"), n)
        for name, repo in repos.items():
            if not {"train_start", "inspect", "plan_read"} & set(rows):
                break  # no row reads a store
            store = os.path.join(args.work, f"store-{size}-{name}")
            r = run_child(repo, "store", src, store)
            print(f"  {size} {name}: store written in {r.get('seconds', 0):.0f} s {r.get('error', '')}", flush=True)
        for row in rows:
            if row == "class_diversity" and size != args.sizes.split(",")[0]:
                continue  # one shape (21k classes, 14.2M samples), whatever the source size
            for name, repo in repos.items():
                store = os.path.join(args.work, f"store-{size}-{name}")
                if row == "train_start":
                    # a new run folder each time: older commits lack train --overwrite
                    run = os.path.join(args.work, f"run-{name}-{size}-{time.time_ns()}")
                    r = run_cli(repo, train_args(src, store, run))
                elif row == "inspect":
                    r = run_cli(repo, ["inspect", store])
                elif row == "worker_uss":
                    r = worker_uss(repo, n)
                else:
                    r = run_child(repo, row, src, store)
                results[(size, row, name)] = r
                print(f"  {size:>6} {row:<16} {name}: {fmt(r)}", flush=True)
    print("\n| row | size | " + " | ".join(repos) + " | target |\n|---|---|" + "---|" * len(repos) + "---|")
    for size, row, name in results:
        if name != "new":
            continue
        cells = [fmt(results.get((size, row, k), {})) for k in repos]
        print(f"| {row} | {size} | " + " | ".join(cells) + f" | {TARGETS.get(row, '')} |")


def fmt(r: dict) -> str:
    if "error" in r:
        return f"error: {r['error'][:80]}"
    return ", ".join(f"{k} {v:.3g}" for k, v in r.items())


if __name__ == "__main__":
    main()
