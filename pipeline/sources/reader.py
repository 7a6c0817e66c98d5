"""The one sample reader: bytes and labels by (shard, position) for every stage (stage one, the loader,
probes, verify, inspect), whatever the source's format.

The manifest's columns are held as arrays (numpy, and arrow for the strings), never as Python objects
per sample: a DataLoader worker forked from the main process shares their pages, and reading a sample
touches no refcount of a per-sample object, so a worker's memory does not grow with the dataset. A key
becomes a ``str`` only to name a sample (a failure, or a ``Sample`` handed out). Samples are read in
file order (by file, then offset): a tar is read forwards, a parquet row group once per batch or shard.
Every sample's bytes are checked against the size and crc32c the manifest recorded (``check_sample``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import crc32c
import numpy as np
import pyarrow as pa

from storage.errors import printable

from ..source_errors import SourceChanged, SourceError
from .base import FILE_COLUMN, NO_CRC, FileReader
from .registry import FORMATS

SHARD_BLOCK = 256  # samples of a shard read at once by a reader that merges neighbours (iter_shard)


@dataclass(frozen=True)
class Sample:
    key: str
    label: int
    shard: int
    position: int
    data: bytes


def check_sample(key: str, path: str, data: bytes, size: int, crc: int) -> None:
    """Raise SourceChanged when bytes read differ from those indexed (size, then crc32c)."""
    if crc == NO_CRC:
        return
    if len(data) != size or crc32c.crc32c(data) != crc:
        raise SourceChanged(
            f"sample {printable(key)!r} in {path} changed since it was indexed ({size} bytes crc32c {crc:08x} then, "
            f"{len(data)} bytes crc32c {crc32c.crc32c(data):08x} now): the source changed, the label store "
            "is not damaged; re-run precompute on the new source (--overwrite), or restore the original file")


def _one_chunk(col: pa.ChunkedArray) -> pa.Array:
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


class SampleReader:
    """Bytes and labels of a manifest's samples by (shard, position). Picklable: DataLoader workers get a
    copy, without open files or caches (the format's ``FileReader`` opens what it needs)."""

    def __init__(self, manifest):
        t = manifest.samples
        self.kind = manifest.kind
        self.sizes = np.asarray(manifest.shard_sizes, dtype=np.int64)
        self.starts = manifest.shard_starts
        self.labels = t.column("label").to_numpy().astype(np.int64)
        self.keys = _one_chunk(t.column("key"))    # arrow: a str only to name a sample
        self.paths = _one_chunk(t.column("path"))
        self.offsets = t.column("offset").to_numpy()  # the address within the file: byte offset or row
        self.nbytes = t.column("size").to_numpy()
        self.crcs = t.column("crc32c").to_numpy()  # the bytes precompute labelled (-1: not recorded)
        # Which file holds each row: the shard itself, or (a re-cut source) the "file" column.
        self.file_index = (t.column(FILE_COLUMN) if manifest.files else t.column("shard")).to_numpy().astype(np.int64)
        self.file_reader = FORMATS[manifest.kind].open_files(manifest.root, list(manifest.files or manifest.shards))
        self.file_reader.use_sizes(self.file_index, self.offsets, self.nbytes)

    def __len__(self) -> int:
        return len(self.labels)

    def row(self, shard: int, position: int) -> int:
        return int(self.starts[shard] + position)

    def key(self, row: int) -> str:
        return self.keys[row].as_py()

    def _read_row(self, i: int) -> bytes:
        file, path, size, crc = int(self.file_index[i]), self.paths[i].as_py(), int(self.nbytes[i]), int(self.crcs[i])
        data = self.file_reader.read(file, int(self.offsets[i]), size, path)
        if crc != NO_CRC and (len(data) != size or crc32c.crc32c(data) != crc):
            check_sample(self.key(i), self.file_reader.where(file, path), data, size, crc)  # raises SourceChanged
        return data

    def read(self, shard: int, position: int) -> bytes:
        """A sample's bytes, checked against the size and crc32c indexed (SourceChanged if they differ)."""
        return self._read_row(self.row(shard, position))

    def read_many(self, samples: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """Bytes of several (shard, position)s, read in file order: a parquet row group (or a tar
        region) that several of them share is read once, not once per sample. b"" for a sample
        that cannot be read now (undecodable: its views are skipped and counted)."""
        rows = {s: self.row(*s) for s in samples}
        order = sorted(rows, key=lambda s: (int(self.file_index[rows[s]]), int(self.offsets[rows[s]]), rows[s]))
        wanted = [(int(self.file_index[rows[s]]), int(self.offsets[rows[s]]), int(self.nbytes[rows[s]]),
                   self.paths[rows[s]].as_py()) for s in order]
        got = self.file_reader.read_many(wanted)  # None: raised reading (undecodable); SourceError: stop
        out = {}
        for s, (file, _off, size, path), data in zip(order, wanted, got, strict=True):
            crc = int(self.crcs[rows[s]])
            if data is None:  # unreadable now (its views are skipped and counted), as a read that raised
                out[s] = b""
                continue
            if crc != NO_CRC and (len(data) != size or crc32c.crc32c(data) != crc):
                check_sample(self.key(rows[s]), self.file_reader.where(file, path), data, size, crc)  # raises
            out[s] = data
        return out

    def at_step(self, consumer: int, step: int) -> None:
        """Consumer ``consumer`` (a loader worker, 0 without) now renders step ``step``: a read-ahead shared
        by the rank's consumers (a bucket's ``bucket_cache``) frees what every consumer is past."""
        cache = getattr(self.file_reader, "cache", None)
        if cache is not None:
            cache.at_step(consumer, step)

    def read_sample(self, shard: int, position: int) -> Sample:
        i = self.row(shard, position)
        return Sample(self.key(i), int(self.labels[i]), shard, position, self._read_row(i))

    def iter_shard(self, shard: int) -> Iterator[Sample]:
        """A whole shard in position order, its samples read in file order: a tar as-is front to back,
        a re-cut shard by one seek per sample, a parquet row group once. Read as it is yielded when the
        two orders agree (a tar as-is, an ImageFolder), else the shard's bytes are read first."""
        start, n = int(self.starts[shard]), int(self.sizes[shard])
        rows = np.arange(start, start + n)
        order = rows[np.lexsort((rows, self.offsets[rows], self.file_index[rows]))]
        if type(self.file_reader).read_many is not FileReader.read_many:
            # a reader that merges neighbours' reads (an object store: a request per sample otherwise):
            # the shard in blocks of samples, each block's neighbours one range request
            for block in range(0, n, SHARD_BLOCK):
                pos = list(range(block, min(n, block + SHARD_BLOCK)))
                got = self.read_many([(shard, p) for p in pos])
                for p in pos:
                    i = start + p
                    yield Sample(self.key(i), int(self.labels[i]), shard, p, got.pop((shard, p)))
            return
        if np.array_equal(order, rows):
            for i in rows.tolist():
                data = self._read_row(i)
                yield Sample(self.key(i), int(self.labels[i]), shard, i - start, data)
            return
        data = {i: self._read_row(i) for i in order.tolist()}
        for i in rows.tolist():
            yield Sample(self.key(i), int(self.labels[i]), shard, i - start, data.pop(i))


def source_errors_in_one_line(items):
    """Iterate a DataLoader; a SourceError raised in a worker process is re-raised with its own line.

    torch re-raises a worker's exception as the same type whose message is "Caught X in DataLoader
    worker ...", the traceback, and last "module.X: message"; only that last message is ours."""
    try:
        yield from items
    except SourceError as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        prefix = f"{type(e).__module__}.{type(e).__name__}: "
        raise type(e)(last[len(prefix):] if last.startswith(prefix) else last) from None
