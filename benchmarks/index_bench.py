"""Indexing an ImageFolder with and without reading every file (size + crc32c per sample), side by side.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python benchmarks/index_bench.py

Precompute indexes with checksums (it reads every image once, so that every later read can tell
a changed source from a damaged store); a train or verify start indexes names only and takes the
checksums from the store. This prints both indexing times on the same folder of small images
(10,000 JPEGs of 64x48 by default, in 10 classes, warm page cache), their ratio, and what the
check costs a reader: crc32c of every image vs decoding every image.

    python benchmarks/index_bench.py --tar-samples 50000

Then a tar of tiny samples (an image and its .cls each), indexed names-only through ``tarfile``'s
members (the loop before issue 22) and through the headers read directly (``tar_index``), side by
side in one run, in us per sample.
"""

import argparse
import os
import tempfile
import time

import crc32c
from common import interleaved, photo_like_jpegs

from pipeline.sources import decode_image, index_source, tar_headers, write_wds_shards
from pipeline.sources.tar import _index_tar, _index_tar_rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tar-samples", type=int, default=50_000, help="samples in the tar indexed (0: skip)")
    ap.add_argument("--skip-imagefolder", action="store_true")
    args = ap.parse_args()
    if args.tar_samples:
        tar_old_vs_new(args.tar_samples, args.rounds)
    if not args.skip_imagefolder:
        imagefolder(args)


def tar_old_vs_new(n: int, rounds: int):
    """Names-only indexing of one tar of ``n`` tiny samples: tarfile's members vs the headers read directly."""
    with tempfile.TemporaryDirectory() as root:
        write_wds_shards([(f"{i:08d}", b"\xff\xd8" + bytes(30), "jpg", i % 1000) for i in range(n)], root,
                         per_shard=n)
        path = os.path.join(root, "shard-000000.tar")
        real_scan = tar_headers.scan

        def by_tarfile():
            tar_headers.scan = lambda p: None  # sources.tar._index_tar's own tarfile loop
            try:
                return _index_tar(path, checksums=False)
            finally:
                tar_headers.scan = real_scan

        old, new = by_tarfile(), _index_tar_rows(path, checksums=False).tuples()
        assert old == new, "the two readers disagree"
        # (the headers' rows column-wise, as index_source takes them; tarfile's as its loop makes them)
        med = interleaved({"tarfile": by_tarfile, "headers": lambda: _index_tar_rows(path, checksums=False)},
                          rounds=rounds)
        print(f"tar of {n} samples ({os.path.getsize(path) / 2**20:.0f} MiB), names only: "
              f"tarfile {med['tarfile'] / n * 1e6:6.2f} us/sample | headers {med['headers'] / n * 1e6:6.2f} "
              f"us/sample | {med['tarfile'] / med['headers']:.1f}x")


def imagefolder(args):
    base = photo_like_jpegs(50, size=(64, 48))
    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        for i in range(args.images):
            d = os.path.join(root, f"class{i % args.classes:03d}")
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"img{i:06d}.jpg"), "wb") as f:
                f.write(base[i % len(base)])
        print(f"wrote {args.images} JPEGs ({len(base[0])} bytes each, about) in {time.perf_counter() - t:.1f}s")
        med = interleaved({
            "names only": lambda: index_source(root, checksums=False),
            "with size + crc32c": lambda: index_source(root, checksums=True),
        }, rounds=args.rounds)
        for name, s in med.items():
            print(f"index {args.images} images, {name:20s} {s:7.3f} s  ({s / args.images * 1e6:6.1f} us/image)")
        print(f"ratio with checksums / names only: {med['with size + crc32c'] / med['names only']:.2f}x")
        data = [base[i % len(base)] for i in range(args.images)]
        read = interleaved({
            "crc32c": lambda: [crc32c.crc32c(b) for b in data],
            "decode": lambda: [decode_image(b) for b in data],
        }, rounds=args.rounds)
        print(f"per read: crc32c {read['crc32c'] / args.images * 1e6:.2f} us/image, decode "
              f"{read['decode'] / args.images * 1e6:.1f} us/image: the check costs "
              f"{read['crc32c'] / read['decode'] * 100:.2f}% of the decode")


if __name__ == "__main__":
    main()
