"""A DataLoader worker's private memory (USS) after one epoch, at ImageNet's 1.28M samples: the
loader as it was (commit cccf9cc) and as it is, run side by side in one invocation.

Why a worker's memory grows: it is forked from the main process and shares its pages until it
writes one. Reading a numpy array writes nothing; touching a Python object writes its reference
count, so every page holding objects the worker touches is copied into the worker. Before, a
worker got a list of one array slice per batch and was re-forked every epoch; every sample read
made ``str(keys[i])`` of an object array of 1.28M Python strings (``SampleFiles.read``'s
``check_sample``), copying ~the whole key table into every worker. Now workers persist across
epochs and get one shared int64 array of the rank's rows, and the one reader
(``pipeline.sources.SampleReader``) keeps keys and paths as arrow arrays, a str made only to name a
failure. Two runs, each a separate process:

- old:        commit cccf9cc's student/data.py (a ``git worktree`` of it, --old-tree)
- new:        this tree's loader and reader

The read path is real (``read_many``: seek, read, size and crc32c check, every sample
of the epoch); slot planning, decode and render are left out (they make new objects per batch,
freed after it, and touch no shared one): a batch carries no images. Every sample's bytes are the
same 64-byte member of one tar. USS = Private_Clean + Private_Dirty of /proc/<pid>/smaps_rollup
(psutil's uss; psutil is not installed here), read by each worker after its last batch.

    git worktree add /tmp/old cccf9cc
    python benchmarks/worker_memory.py --old-tree /tmp/old [--samples 1281167] [--workers 2] [--batch 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_SHARD, CLASSES, PAYLOAD = 1024, 1000, b"\xff\xd8" + bytes(range(62))


def uss_bytes(pid: str = "self") -> int:
    """Unique set size: this process's private pages (what psutil.Process().memory_full_info().uss reads)."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("Private_Clean", "Private_Dirty", "Private_Hugetlb"):
                total += int(value.split()[0]) * 1024  # kB
    return total


def synthetic_manifest(root: str, n: int):
    """n samples in shards of PER_SHARD, every one the PAYLOAD member of root/one.tar, ImageNet-like keys."""
    import crc32c
    import pyarrow as pa

    from pipeline.sources import Manifest

    tar_path = os.path.join(root, "one.tar")
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as t:
        info = tarfile.TarInfo("x.jpg")
        info.size = len(PAYLOAD)
        t.addfile(info, __import__("io").BytesIO(PAYLOAD))
    idx = np.arange(n)
    label = (idx * 7919 % CLASSES).astype(np.int32)
    keys = np.char.add(np.char.add(np.char.add("n0", (1440764 + label).astype(str)), "/sample_"), idx.astype(str))
    shards = -(-n // PER_SHARD)
    neutral = "files" in Manifest.__dataclass_fields__  # the file column's name since the source registry
    table = pa.table({
        "key": pa.array(keys), "label": pa.array(label), "shard": pa.array((idx // PER_SHARD).astype(np.int32)),
        "position": pa.array((idx % PER_SHARD).astype(np.int32)), "path": pa.array(np.full(n, "")),
        "offset": pa.array(np.full(n, 512, np.int64)), "size": pa.array(np.full(n, len(PAYLOAD), np.int64)),
        "crc32c": pa.array(np.full(n, crc32c.crc32c(PAYLOAD), np.int64)),
        "file" if neutral else "tar": pa.array(np.zeros(n, np.int32)),
    })
    return Manifest("wds", root, [f"shard-{j:06d}" for j in range(shards)], [str(c) for c in range(CLASSES)],
                    table, shard_size=PER_SHARD, layout="shuffle", **{"files" if neutral else "tars": ["one.tar"]})


def child(a) -> None:
    """One run: the loader of the tree on sys.path, `epochs` epochs, each worker's USS at its last batch."""
    import importlib

    import torch

    # the loader's own module (its globals are what is patched): student.loader since the split, else student.data
    # (asked of the tree's files: an editable install would find student.loader in another checkout)
    sd = importlib.import_module("student.loader" if os.path.exists(os.path.join("student", "loader.py"))
                                 else "student.data")
    from pipeline.recipes import create_recipe

    report = tempfile.mkdtemp(prefix="uss-")

    class ReadOnly(sd.ReplayBatches):
        """The real read path of a batch (plan each pair, read its samples in file order), no decode."""

        def render(self, renderer, plan, step, rows):
            # Every row's sample read (a slot taken as its position: the same samples, each once an epoch
            # per copy), without slot_view's per-slot planning, which touches no shared object and
            # would make this run take an hour on a busy machine.
            self.files.read_many(sorted({(shard, slot) for shard, slot in rows.tolist()}))
            info = torch.utils.data.get_worker_info()
            steps = len(self.batches) if hasattr(self, "batches") else self.epochs.current().steps  # old, new
            if step + info.num_workers >= steps:  # this worker's last batch of the epoch
                uss, path = uss_bytes(), os.path.join(report, str(os.getpid()))
                with open(path + ".tmp", "w") as f:
                    f.write(str(uss))
                os.replace(path + ".tmp", path)  # the main process reads a whole number, never a truncated file
            size = self.recipe.input_size
            return {"step": step, "images": torch.zeros(0, 3, size, size), "rows": torch.from_numpy(rows.copy()),
                    "targets": torch.zeros(0, self.num_classes), "skipped": 0}

    sd.ReplayBatches = ReadOnly
    with tempfile.TemporaryDirectory() as root:
        data = sd.TrainData(synthetic_manifest(root, a.samples), create_recipe("deit", {"input_size": 32}), 0)
        loader = sd.LockstepLoader(data, batch_size=a.batch, workers=a.workers)
        out, seen = [], set()
        for epoch in range(a.epochs):
            views = sum(len(b.rows) for b in loader.epoch(epoch))
            assert views == (a.samples // a.batch) * a.batch, views
            usses = {p: int(open(os.path.join(report, p)).read()) for p in os.listdir(report) if p.isdigit()}
            # old: fresh workers every epoch (new pids); new: the same workers again
            out.append({"forked": len(set(usses) - seen), "uss": sorted(usses.values())})
            seen |= set(usses)
            for p in usses:
                os.unlink(os.path.join(report, p))
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-tree", help="a checkout of commit cccf9cc (git worktree add /tmp/old cccf9cc)")
    ap.add_argument("--samples", type=int, default=1281167)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the new loader (old: one)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    args = ["--samples", str(a.samples), "--workers", str(a.workers), "--batch", str(a.batch), "--child"]
    runs = {"new": (HERE, ["--epochs", str(a.epochs)])}
    if a.old_tree:
        runs = {"old": (os.path.abspath(a.old_tree), ["--epochs", "1"]), **runs}
    mib = lambda b: f"{b / 2**20:.1f}"
    print(f"worker USS after each epoch: {a.samples} samples in shards of {PER_SHARD}, batch {a.batch}, "
          f"{a.workers} workers, read path only (no planning, no decode)")
    print(f"{'':<11}{'epoch':>6}{'workers forked':>16}{'worker USS MiB (each)':>26}")
    for name, (tree, extra) in runs.items():
        env = {**os.environ, "PYTHONPATH": tree}
        r = subprocess.run([sys.executable, os.path.abspath(__file__), *args, *extra], cwd=tree, env=env,
                           capture_output=True, text=True, check=True)
        out = json.loads(r.stdout.strip().splitlines()[-1])
        for e, w in enumerate(out):
            print(f"{name:<11}{e:>6}{w['forked']:>16}{' '.join(mib(u) for u in w['uss']):>26}")


if __name__ == "__main__":
    main()
