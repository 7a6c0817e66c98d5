"""Parquet images read alone (pipeline.sources.parquet_pages): the page map is pyarrow's values byte for byte,
files it does not understand fall back to row groups, hostile pages are refused, and the training
loader reads under 2 bytes per byte it uses, counted through the file seam (no timing)."""

import io
import os
import pickle

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import ClassLabel, Features, Image

from pipeline.recipes import create_recipe
from pipeline.sources import SampleReader, SourceChanged, index_source
from pipeline.sources.hf_parquet import ParquetRows
from pipeline.sources.parquet_pages import Unmapped, map_column
from pipeline.views import ViewRenderer
from student.stream import epoch_stream


class CountingFile(io.FileIO):
    """A file whose reads add the bytes they return to ``counter[0]``: the seam every reader goes through."""

    def __init__(self, path, counter):
        super().__init__(path, "rb")
        self.counter = counter

    def read(self, n=-1):
        data = super().read(n)
        self.counter[0] += len(data or b"")
        return data

    def readinto(self, b):
        n = super().readinto(b)
        self.counter[0] += n or 0
        return n

    def readall(self):
        data = super().readall()
        self.counter[0] += len(data)
        return data


def counting_opener():
    counter = [0]
    return counter, (lambda path: CountingFile(path, counter))


def blobs(n, seed=0, lo=2_000, hi=9_000):
    """Incompressible bytes of JPEG-like sizes (the reader never decodes: bytes are bytes)."""
    rng = np.random.default_rng(seed)
    return [rng.bytes(int(s)) for s in rng.integers(lo, hi, n)]


def write_datasets(path, images, labels, classes, **kw):
    features = Features({"image": Image(), "label": ClassLabel(names=[str(c) for c in range(classes)])})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)],
                                     "label": labels}, features=features)
    ds.to_parquet(str(path), **kw)


def write_pyarrow(path, images, **kw):
    """struct<bytes, path> images (None: a null image, b"" kept as empty bytes) and labels, by pyarrow."""
    img = pa.array([None if b is None else {"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)],
                   pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": img, "label": pa.array(range(len(images)), pa.int64())}), str(path), **kw)


def mapped(path):
    meta = pq.ParquetFile(str(path)).metadata
    col = next(i for i in range(meta.num_columns) if meta.schema.column(i).path == "image.bytes")
    c = meta.schema.column(col)
    with open(path, "rb", buffering=0) as f:
        return map_column(f, meta, col, c.max_definition_level, c.max_repetition_level)


def pyarrow_values(path):
    return [None if v is None else v["bytes"] for v in pq.read_table(str(path), columns=["image"])
            .column("image").to_pylist()]


PLAIN_UNCOMPRESSED = {"use_dictionary": False, "compression": "none"}


@pytest.mark.parametrize("writer", [
    "datasets default", "datasets row groups of 7",
    "pyarrow v1 pages, nulls", "pyarrow v2 pages, nulls", "pyarrow one page a value",
])
def test_the_page_map_is_pyarrows_values_byte_for_byte(tmp_path, writer):
    path = tmp_path / "f.parquet"
    images = blobs(60, lo=1, hi=40_000)
    if writer.startswith("datasets"):
        write_datasets(path, images, [i % 3 for i in range(60)], 3,
                       **({"batch_size": 7} if "7" in writer else {}))
    else:
        images[3] = images[40] = None  # null images: no value in the pages, a level says so
        images[7] = b""
        write_pyarrow(path, images, **PLAIN_UNCOMPRESSED, row_group_size=25,
                      data_page_version="2.0" if "v2" in writer else "1.0",
                      data_page_size=1 if "one page" in writer else 64 << 10)
    rows = mapped(path)
    data = path.read_bytes()
    got = [None if s < 0 else data[o:o + s] for o, s in zip(rows.offsets.tolist(), rows.sizes.tolist(), strict=True)]
    assert got == pyarrow_values(path) == images


@pytest.mark.parametrize("writer", ["datasets default", "datasets row groups of 7", "pyarrow one page a value",
                                    "pyarrow v2 pages, page index"])
def test_the_offset_index_and_known_sizes_map_as_the_page_walk_does(tmp_path, writer):
    """With each row's size known (a manifest with checksums), the offset index (datasets writes one) places
    every value without a page header but one a row group; pyarrow's files without one are Unmapped."""
    from pipeline.sources.parquet_pages import Unmapped, footer, map_by_offset_index

    path = tmp_path / "f.parquet"
    images = blobs(60, lo=1, hi=40_000)
    if writer.startswith("datasets"):
        write_datasets(path, images, [i % 3 for i in range(60)], 3, **({"batch_size": 7} if "7" in writer else {}))
    else:
        write_pyarrow(path, images, **PLAIN_UNCOMPRESSED, row_group_size=25, write_page_index="index" in writer,
                      data_page_version="2.0" if "v2" in writer else "1.0",
                      data_page_size=1 if "one page" in writer else 64 << 10)
    want = mapped(path)
    with open(path, "rb", buffering=0) as f:
        meta, thrift = footer(f)
        col = next(i for i in range(meta.num_columns) if meta.schema.column(i).path == "image.bytes")
        c = meta.schema.column(col)
        args = (f, thrift, meta, col, c.max_definition_level, c.max_repetition_level)
        if "pyarrow" in writer and "index" not in writer:
            with pytest.raises(Unmapped, match="offset index"):
                map_by_offset_index(*args, want.sizes)
            return
        got = map_by_offset_index(*args, want.sizes)
        assert got.offsets.tolist() == want.offsets.tolist() and got.sizes.tolist() == want.sizes.tolist()
        wrong = want.sizes.copy()
        wrong[0] += 1  # a size that is not the file's: the first page's walk disagrees
        with pytest.raises(Unmapped):
            map_by_offset_index(*args, wrong)


@pytest.mark.parametrize("kw", [{}, {"use_dictionary": False}, {"compression": "none"}],
                         ids=["pyarrow defaults", "snappy", "dictionary"])
def test_files_the_map_does_not_understand_are_read_by_row_group(tmp_path, kw):
    images = blobs(30)
    write_pyarrow(tmp_path / "f.parquet", images, row_group_size=10, **kw)
    with pytest.raises(Unmapped):
        mapped(tmp_path / "f.parquet")
    rows = ParquetRows(str(tmp_path), ["f.parquet"])
    assert [rows.image(0, r) for r in range(30)] == images
    assert (rows.group_reads, rows.direct_reads) == (3, 0)


def test_a_mangled_page_header_is_refused_or_stays_in_the_file(tmp_path):
    """Any byte of the first page headers flipped: the walk refuses (Unmapped) or maps values that lie
    inside the file; ParquetRows never raises, and the crc32c check downstream catches wrong bytes."""
    path = tmp_path / "f.parquet"
    images = blobs(6, lo=50, hi=300)
    write_datasets(path, images, [0] * 6, 1, batch_size=2)
    good = path.read_bytes()
    start = pq.ParquetFile(str(path)).metadata.row_group(0).column(0).data_page_offset
    refused = 0
    for at in range(start, start + 48):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(good)
            bad[at] ^= flip
            path.write_bytes(bytes(bad))
            try:
                rows = mapped(path)
            except Unmapped:
                refused += 1
            else:
                ok = rows.sizes >= 0
                assert np.all(rows.offsets[ok] + rows.sizes[ok] <= len(bad))
            reader = ParquetRows(str(tmp_path), ["f.parquet"])
            assert all(isinstance(reader.image(0, r), bytes) for r in range(6))
    assert refused > 0  # the walk does check what it reads


def test_a_reopened_file_is_not_mapped_again_and_copies_start_empty(tmp_path):
    images = [blobs(20, seed=s) for s in range(2)]
    for f in range(2):
        write_datasets(tmp_path / f"{f}.parquet", images[f], [0] * 20, 1)
    counter, opener = counting_opener()
    rows = ParquetRows(str(tmp_path), ["0.parquet", "1.parquet"], open_files=1, opener=opener)
    assert rows.image(0, 0) == images[0][0] and rows.image(1, 0) == images[1][0]  # both mapped
    before = counter[0]
    for r in range(1, 20):  # alternating: each read closes the other file (one open at a time)
        for f in range(2):
            assert rows.image(f, r) == images[f][r]
    assert counter[0] - before == sum(len(images[f][r]) for f in range(2) for r in range(1, 20))
    rows.opener = None  # the test's counting opener is a closure; the default opener pickles
    copy = pickle.loads(pickle.dumps(rows))
    assert (len(copy._maps), len(copy._handles)) == (0, 0)  # a worker's copy maps what it reads
    assert copy.image(1, 5) == images[1][5] and list(copy._maps) == [1]


def loader_batches(manifest, batch, repeats=3):
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


@pytest.fixture(scope="module")
def recut(tmp_path_factory):
    """Class-sorted files as datasets writes them by default (one row group of up to 100 MB each, pages
    cut by content), re-cut into seeded virtual shards: the loader's batches span files."""
    root = tmp_path_factory.mktemp("recut")
    images, classes, per_file = blobs(480, seed=1, lo=20_000, hi=60_000), 4, 80
    order = sorted(range(len(images)), key=lambda i: (i % classes, i))
    for f in range(len(images) // per_file):
        idx = order[f * per_file:(f + 1) * per_file]
        write_datasets(root / f"train-{f:05d}.parquet", [images[i] for i in idx], [i % classes for i in idx], classes)
    m = index_source(str(root), shard_size=60)
    assert m.layout == "shuffle" and len(m.files) == 6
    return m


def loader_bytes(manifest, pages):
    """(bytes read, bytes used) by one epoch of the loader's batches through SampleReader.read_many."""
    counter, opener = counting_opener()
    files = SampleReader(manifest)
    files.file_reader.rows.opener, files.file_reader.rows.pages = opener, pages
    # ImageNet as datasets writes it: row groups of ~100 MB (900 images), over the 64 MB a loader
    # worker keeps; here a row group is ~3 MB, so the kept bytes are scaled to the same fraction.
    group = pq.ParquetFile(os.path.join(manifest.root, manifest.files[0])).metadata.row_group(0).total_byte_size
    files.file_reader.rows.cache_bytes = group * 64 // 100
    used = 0
    for batch in loader_batches(manifest, 32):
        used += sum(len(b) for b in files.read_many(batch).values())
    return counter[0], used


def test_the_loader_reads_under_2_bytes_per_byte_it_uses(recut):
    read, used = loader_bytes(recut, pages=True)
    assert read / used < 2
    before, used_before = loader_bytes(recut, pages=False)  # a row group per file a batch touches
    assert used_before == used and before / used > 10


def test_bytes_changed_after_mapping_are_a_changed_source(recut, tmp_path):
    """The map says where the bytes were; if the file changed since, the crc32c check says so."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(recut.root, root)
    m = index_source(str(root), shard_size=60)
    files = SampleReader(m)
    first = loader_batches(m, 32)[0]
    files.read_many(first)  # the files touched are mapped
    i = files.row(*first[0])
    file, row = int(files.file_index[i]), int(files.offsets[i])
    mapped = files.file_reader.rows._maps[file]
    at, size = int(mapped.offsets[row]), int(mapped.sizes[row])
    with open(os.path.join(root, m.files[file]), "r+b") as f:  # the image zeroed in place, same length
        f.seek(at)
        f.write(bytes(size))
    with pytest.raises(SourceChanged):
        files.read(*first[0])


def test_a_fifo_swapped_in_for_a_file_is_a_changed_source_not_a_hang(recut, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(recut.root, root)
    m = index_source(str(root), shard_size=60)
    files = SampleReader(m)
    i = files.row(0, 0)
    name = os.path.join(root, m.files[int(files.file_index[i])])
    os.remove(name)
    os.mkfifo(name)  # opened for reading, a FIFO without a writer would wait forever
    with pytest.raises(SourceChanged):
        files.read(0, 0)
