"""Reading the same images from WebDataset tars and from Hugging Face parquet files, side by side.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 HF_HUB_OFFLINE=1 python benchmarks/parquet_bench.py

The same photo-like JPEGs (ImageNet's typical 500x375 by default) in the same order go into tars of
``--per-file`` samples and into parquet files of as many rows, written by the ``datasets`` library
(row groups of ``--row-group`` rows; 100 is what ``datasets`` writes for image columns). Timed
interleaved in one process, warm page cache:

- precompute's read: every shard front to back (``Manifest.iter_shard``): a tar is read once, a
  parquet file once per row group;
- the loader's read: one epoch of the lockstep stream in batches (``SampleReader.read_many``, as
  ``ReplayBatches`` calls it), the same for both sources;
- the loader's read with a one-row-group cache and samples read in stream order: what reading a
  row group per sample would cost (the grouping ``read_many`` does is what avoids it).

It prints seconds per image, row groups read per image, and the ratios parquet / tar, next to the
cost of decoding the image (what a reader pays anyway).
"""

import argparse
import os
import tempfile

from common import interleaved, photo_like_jpegs

from pipeline.recipes import create_recipe
from pipeline.sources import SampleReader, decode_image, index_source, write_wds_shards
from pipeline.views import ViewRenderer, epoch_stream


def write_parquet(jpegs, labels, root, per_file, row_group):
    from datasets import ClassLabel, Dataset, Features, Image

    names = [str(c) for c in range(max(labels) + 1)]
    for f, start in enumerate(range(0, len(jpegs), per_file)):
        rows = range(start, min(start + per_file, len(jpegs)))
        ds = Dataset.from_dict({"image": [{"bytes": jpegs[i], "path": f"{i}.jpg"} for i in rows],
                                "label": [labels[i] for i in rows]},
                               features=Features({"image": Image(), "label": ClassLabel(names=names)}))
        ds.to_parquet(os.path.join(root, f"train-{f:05d}.parquet"), batch_size=row_group)


def loader_batches(manifest, batch: int, repeats: int = 3):
    """The (shard, position)s of each batch of epoch 0's stream, as ReplayBatches reads them."""
    renderer = ViewRenderer(create_recipe("deit", [f"repeats={repeats}"]))
    sizes = manifest.shard_sizes
    order = {j: renderer.slot_order(0, 0, j, sizes[j]) for j in range(len(sizes))}
    stream = epoch_stream(0, 0, sizes, repeats)
    out = []
    for t in range(len(stream) // batch):
        need = set()
        for shard, slot in stream[t * batch:(t + 1) * batch].tolist():
            lead = renderer.slot_view(0, 0, shard, slot & ~1, order[shard])
            need.add((shard, lead.position))
            if lead.partner_position is not None:
                need.add((shard, lead.partner_position))
        out.append(sorted(need))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--per-file", type=int, default=500)
    ap.add_argument("--row-group", type=int, default=100)
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
        files = {k: SampleReader(m) for k, m in src.items()}
        naive = SampleReader(src["parquet"])
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
            "loader parquet per sample": lambda: per_sample(naive),
            "decode": decode,
        }, rounds=args.rounds)
        once = fresh(src["parquet"])
        shards(once)
        groups_shards = once.file_reader.rows.group_reads
        files["parquet"].file_reader.rows.group_reads = naive.file_reader.rows.group_reads = 0
        loader(files["parquet"])
        per_sample(naive)
        n = args.images
        dec = med["decode"] / 200
        print(f"{n} JPEGs of {sum(map(len, jpegs)) // n} bytes, {n // args.per_file} files of {args.per_file}, "
              f"parquet row groups of {args.row_group}; loader: {len(batches)} batches of {args.batch}, "
              f"{reads} reads")
        print(f"decode one image: {dec * 1e6:.0f} us")
        for what, count, tar, pq, groups in (
                ("precompute (every shard front to back)", n, "shards tar", "shards parquet", groups_shards),
                ("loader (epoch 0's batches, read_many)", reads, "loader tar", "loader parquet",
                 files["parquet"].file_reader.rows.group_reads),
                ("loader, a row group per sample", reads, "loader tar", "loader parquet per sample",
                 naive.file_reader.rows.group_reads)):
            t, p = med[tar] / count, med[pq] / count
            print(f"{what:42s} tar {t * 1e6:7.1f} us/image  parquet {p * 1e6:7.1f} us/image  "
                  f"ratio parquet/tar {p / t:6.2f}x  ({groups / count:.3f} row groups read per image; "
                  f"parquet read = {p / dec * 100:.0f}% of a decode)")


if __name__ == "__main__":
    main()
