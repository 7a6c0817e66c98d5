"""Reading the same images from WebDataset tars and from Hugging Face parquet files, side by side.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 HF_HUB_OFFLINE=1 python benchmarks/parquet_bench.py

The same photo-like JPEGs (ImageNet's typical 500x375 by default) in the same order go into tars of
``--per-file`` samples and into parquet files of as many rows, written by the ``datasets`` library
(``--row-group`` rows a row group; 0, the default, is what ``datasets`` writes today: one row group
up to 100 MB, pages of 256 KiB..1 MiB cut by content; older releases wrote 100 images a group).
Timed interleaved in one process, warm page cache:

- precompute's read: every shard front to back (``Manifest.iter_shard``): a tar is read once, a
  parquet file once (each image alone, by the page map);
- the loader's read: one epoch of the lockstep stream in batches (``SampleReader.read_many``, as
  ``ReplayBatches`` calls it), the same for both sources, parquet read two ways: by row group (the
  reader before the page map: ``ParquetRows(pages=False)``) and by page map (each image alone);
- the loader's read by row group with a one-row-group cache and samples read in stream order: what
  reading a row group per sample would cost.

The row-group reader keeps ``--cache-fraction`` of a row group's bytes (0.64: ImageNet's 100 MB row
groups against the 64 MB a loader worker keeps), so a small run reads as ImageNet would.

It prints seconds per image, row groups read per image, and the ratios parquet / tar, next to the
cost of decoding the image (what a reader pays anyway); then bytes read per byte used by the loader's
epoch, counted through the files (every read of the file, footers included), old and new side by side.
"""

import argparse
import os
import sys
import tempfile

import pyarrow.parquet as pq
from common import interleaved, photo_like_jpegs

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from test_parquet_pages import CountingFile, loader_batches  # noqa: E402 - the counting the test asserts on, reused

from pipeline.sources import SampleReader, decode_image, index_source, write_wds_shards


def write_parquet(jpegs, labels, root, per_file, row_group):
    from datasets import ClassLabel, Dataset, Features, Image

    names = [str(c) for c in range(max(labels) + 1)]
    for f, start in enumerate(range(0, len(jpegs), per_file)):
        rows = range(start, min(start + per_file, len(jpegs)))
        ds = Dataset.from_dict({"image": [{"bytes": jpegs[i], "path": f"{i}.jpg"} for i in rows],
                                "label": [labels[i] for i in rows]},
                               features=Features({"image": Image(), "label": ClassLabel(names=names)}))
        ds.to_parquet(os.path.join(root, f"train-{f:05d}.parquet"), **({"batch_size": row_group} if row_group else {}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--per-file", type=int, default=500)
    ap.add_argument("--row-group", type=int, default=0, help="rows a row group; 0: datasets' default")
    ap.add_argument("--cache-fraction", type=float, default=0.64,
                    help="row-group reader's kept bytes, in row groups (ImageNet: 64 MB / 100 MB groups)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    base = photo_like_jpegs(40)
    jpegs = [base[i % len(base)] for i in range(args.images)]
    labels = [i % args.classes for i in range(args.images)]
    with tempfile.TemporaryDirectory() as root:
        os.makedirs(f"{root}/tar")
        os.makedirs(f"{root}/pq")
        write_wds_shards([(f"s{i:06d}", jpegs[i], "jpg", labels[i]) for i in range(args.images)], f"{root}/tar",
                         per_shard=args.per_file)
        write_parquet(jpegs, labels, f"{root}/pq", args.per_file, args.row_group)
        src = {k: index_source(f"{root}/{d}", shards="as-is") for k, d in (("tar", "tar"), ("parquet", "pq"))}
        assert src["tar"].shard_sizes == src["parquet"].shard_sizes
        batches = loader_batches(src["tar"], args.batch)
        reads = sum(len(b) for b in batches)
        group_bytes = max(pq.ParquetFile(os.path.join(src["parquet"].root, name)).metadata.row_group(0).total_byte_size
                          for name in src["parquet"].shards)
        cache = int(group_bytes * args.cache_fraction)

        def parquet_files(pages, opener=None):
            f = SampleReader(src["parquet"])
            f.file_reader.rows.pages, f.file_reader.rows.cache_bytes, f.file_reader.rows.opener = pages, cache, opener
            return f

        files = {"tar": SampleReader(src["tar"]), "parquet": parquet_files(True),
                 "by group": parquet_files(False)}
        naive = parquet_files(False)
        naive.file_reader.rows.row_groups = 1

        def shards(r):
            for j in range(len(r.sizes)):
                list(r.iter_shard(j))

        def loader(f):
            for b in batches:
                f.read_many(b)

        def per_sample(f):  # stream order, one row group kept: a row group read per sample
            for b in batches:
                for s in b[::2] + b[1::2]:
                    f.read(*s)

        def decode():
            for b in jpegs[:200]:
                decode_image(b)

        def fresh(m):  # a new reader: nothing kept from the last round
            return SampleReader(m)

        med = interleaved({
            "shards tar": lambda: shards(fresh(src["tar"])),
            "shards parquet": lambda: shards(fresh(src["parquet"])),
            "loader tar": lambda: loader(files["tar"]),
            "loader parquet": lambda: loader(files["parquet"]),
            "loader parquet by row group": lambda: loader(files["by group"]),
            "loader parquet per sample": lambda: per_sample(naive),
            "decode": decode,
        }, rounds=args.rounds)
        once = fresh(src["parquet"])
        shards(once)
        groups_shards = once.file_reader.rows.group_reads
        files["parquet"], files["by group"] = parquet_files(True), parquet_files(False)  # counted from empty
        naive = parquet_files(False)
        naive.file_reader.rows.row_groups = 1
        loader(files["parquet"])
        loader(files["by group"])
        per_sample(naive)
        n = args.images
        dec = med["decode"] / 200
        print(f"{n} JPEGs of {sum(map(len, jpegs)) // n} bytes, {-(-n // args.per_file)} files of {args.per_file}, "
              f"parquet row groups of {args.row_group or 'datasets default'} ({group_bytes / 1e6:.1f} MB, "
              f"row-group reader keeps {cache / 1e6:.1f} MB); loader: {len(batches)} batches of {args.batch}, "
              f"{reads} reads")
        print(f"decode one image: {dec * 1e6:.0f} us")
        for what, count, tar, pq_, groups in (
                ("precompute (every shard front to back)", n, "shards tar", "shards parquet", groups_shards),
                ("loader, by page map (now)", reads, "loader tar", "loader parquet",
                 files["parquet"].file_reader.rows.group_reads),
                ("loader, by row group (before)", reads, "loader tar", "loader parquet by row group",
                 files["by group"].file_reader.rows.group_reads),
                ("loader, a row group per sample", reads, "loader tar", "loader parquet per sample",
                 naive.file_reader.rows.group_reads)):
            t, p = med[tar] / count, med[pq_] / count
            print(f"{what:42s} tar {t * 1e6:7.1f} us/image  parquet {p * 1e6:7.1f} us/image  "
                  f"ratio parquet/tar {p / t:6.2f}x  ({groups / count:.3f} row groups read per image; "
                  f"parquet read = {p / dec * 100:.0f}% of a decode)")
        ratios = {}
        for name, pages in (("by row group (before)", False), ("by page map (now)", True)):
            counter = [0]
            f = parquet_files(pages, lambda path, c=counter: CountingFile(path, c))
            used = sum(len(b) for batch in batches for b in f.read_many(batch).values())
            ratios[name] = counter[0] / used
        print("loader's epoch, bytes read per byte used: "
              + "  ".join(f"{k} {v:.2f}" for k, v in ratios.items()) + "  (tar: 1.00)")


if __name__ == "__main__":
    main()
