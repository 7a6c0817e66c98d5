"""WebDataset sources: ``.tar`` shards, each sample an image member (``.jpg/.jpeg/.png/.webp``) and a
``.cls`` member holding its class index, grouped by key (the member path up to the first dot of its
name). Class names from ``classes.txt`` beside the shards, else "0".."C-1".

A sample's ``path`` is its image member, ``offset`` the byte offset of the member's data in the tar and
``size`` its length, so any sample is one seek and one read (the tar must be uncompressed, as indexing
requires). Indexing refuses what it cannot index faithfully: two members of one name, two images of
one key, an image without a label, a label that is no class index.
"""

from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterator

import crc32c
import numpy as np
import pyarrow as pa

from storage.bucket import is_source_url
from storage.errors import printable

from ..source_errors import SourceError, check_label_bound, permission_error
from .base import IMAGE_EXTS, NO_CRC, SCHEMA, FileReader, Indexed, SourceFormat, check_files, classes_txt_names
from .stamps import stamps_of
from .tar_index import LABEL_EXT, MAX_LABEL_BYTES, TarRows, index_tar, rows_in_order


class TarFiles(FileReader):
    """Samples by one seek into their tar; the last few tars read stay open (a loader batch, or a re-cut
    shard, spans several)."""

    OPEN_TARS = 16

    def __init__(self, root: str, files: list[str]):
        self.root, self.files = root, list(files)
        self._open: OrderedDict[int, object] = OrderedDict()

    def __getstate__(self):
        return {**self.__dict__, "_open": OrderedDict()}

    def where(self, file: int, path: str) -> str:
        return os.path.join(self.root, self.files[file])

    def read(self, file: int, offset: int, size: int, path: str) -> bytes:
        f = self._open.pop(file, None)
        try:
            if f is None:
                f = open(self.where(file, path), "rb")
                while len(self._open) >= self.OPEN_TARS:
                    self._open.popitem(last=False)[1].close()
            self._open[file] = f  # most recently used last
            f.seek(offset)
            data = f.read(size)
        except PermissionError:
            raise permission_error(self.where(file, path)) from None
        except OSError:
            return b""  # gone or unreadable now
        # the tar ends inside this sample (cut after indexing, or cut already then): as a tar reader
        # that stops at the cut, nothing of it is read
        return data if len(data) == size else b""


class WebDataset(SourceFormat):
    kind, ext, what, recut = "wds", ".tar", "WebDataset .tar shards", True
    sizes_without_content = True  # the member headers

    def index(self, src, files, *, checksums, shard_size, seed, shuffle) -> Indexed:
        return _index_wds(src, files, checksums=checksums)

    def open_files(self, root, files) -> FileReader:
        if is_source_url(root):  # on a bucket: range requests, a batch's neighbours merged into one
            from .bucket_files import BucketTars

            return BucketTars(root, files)
        return TarFiles(root, files)


FORMAT = WebDataset()


def _index_wds(src: str, files: list[str], checksums: bool = True) -> Indexed:
    root = check_files(src, files)
    stamps = stamps_of(root, files)  # before reading: a tar changed meanwhile fails its stamp next time
    parts: list[TarRows] = []
    for path in files:
        rows = _index_tar_rows(path, checksums, _open_url(path))
        if len(rows) and rows.labels.min() < 0:  # numpy would read -1 as the last class
            i = int(np.argmax(rows.labels < 0))
            raise SourceError(f"{path}: sample {printable(rows.keys[i].as_py())!r} has label {rows.labels[i]} in its "
                              ".cls; labels are class indices 0..C-1: fix the label")
        parts.append(rows)
    counts = np.array([len(p) for p in parts], np.int64)
    if not counts.sum():
        raise SourceError(f"{src}: the shards hold no images ({', '.join(IMAGE_EXTS)})")
    labels = np.concatenate([p.labels for p in parts])
    shard = np.repeat(np.arange(len(parts), dtype=np.int64), counts)
    position = np.arange(len(labels), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    keys = pa.chunked_array([p.keys for p in parts], pa.string())
    table = pa.Table.from_arrays([
        keys, pa.array(labels, pa.int32()), pa.array(shard, pa.int32()), pa.array(position, pa.int32()),
        pa.chunked_array([p.members for p in parts], pa.string()), pa.array(np.concatenate([p.offsets for p in parts])),
        pa.array(np.concatenate([p.sizes for p in parts])), pa.array(np.concatenate([p.crcs for p in parts]))],
        schema=SCHEMA)
    num_classes = int(labels.max()) + 1
    names = classes_txt_names(root, num_classes)
    if labels.max() >= len(names):  # classes.txt is shorter than the labels used
        i = int(np.argmax(labels >= len(names)))
        raise SourceError(f"{files[shard[i]]}: sample {printable(keys[i].as_py())!r} has label {labels[i]}, but "
                          f"{os.path.join(root, 'classes.txt')} lists {len(names)} classes (0..{len(names) - 1}); "
                          "fix the label or classes.txt")
    return Indexed("wds", root, [os.path.basename(f) for f in files], names, table, stamps=stamps)


def _open_url(path: str):
    """A tar on a bucket as a file of range requests (headers read, members' data skipped by offset);
    None for a local path (tarfile opens it)."""
    if not is_source_url(path):
        return None
    from .bucket_files import RangeFile

    return RangeFile(path)


def _index_tar_rows(path: str, checksums: bool = True, fileobj=None) -> TarRows:
    """``_index_tar`` column-wise: from the header walk where it reads the tar (no Python object per member),
    else from the ``tarfile`` loop's rows."""
    fast = None if fileobj is not None else index_tar(path, checksums)  # (the header walk reads local files)
    return fast if fast is not None else TarRows.of(_index_tar(path, checksums, fileobj, fast=False))


def _index_tar(path: str, checksums: bool = True, fileobj=None, fast: bool = True
               ) -> list[tuple[str, str, int, int, int, int]]:
    """(key, image member, data offset, size, label, crc32c) per sample, in tar order; one pass. ``fileobj``:
    the tar's bytes as a seekable reader (a bucket's ``RangeFile``), else ``path`` is opened.

    Two members of one name (valid in a tar: ``tar -r`` appends a second copy) are refused: a
    sequential reader would take one copy and a seek by offset the other.

    The headers are read directly (``tar_index``, ~8x faster than ``tarfile``); this ``tarfile`` loop
    reads the tars that needs (see ``tar_headers``), by the same rules."""
    rows = None if fileobj is not None or not fast else index_tar(path, checksums)  # (the walk reads local files)
    if rows is not None:
        return rows.tuples()
    images: dict[str, tarfile.TarInfo] = {}
    crcs: dict[str, int] = {}
    labels: dict[str, int] = {}
    order: list[str] = []
    seen: set[str] = set()
    names: set[str] = set()
    try:
        with tarfile.open(path, mode="r:", fileobj=fileobj) as tar:
            for m in _members_until_cut(tar):
                if not m.isfile():
                    continue
                if m.name in names:
                    raise SourceError(f"{path}: member {printable(m.name)!r} appears twice (appended with tar -r?); "
                                      "readers would disagree on which copy is the sample: rewrite the shard "
                                      "with one copy")
                names.add(m.name)
                base = os.path.basename(m.name)
                # WebDataset's convention: the key is the path up to the first dot of the basename.
                key = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0])
                ext = "." + base.split(".", 1)[1].lower() if "." in base else ""
                if key not in seen:  # (a key once, where any of its members comes first: a .json before the image too)
                    seen.add(key)
                    order.append(key)
                if ext in IMAGE_EXTS:
                    if key in images:
                        raise SourceError(f"{path}: sample {printable(key)!r} has two images "
                                          f"({printable(images[key].name)}, {printable(m.name)}); "
                                          "keep one per sample")
                    images[key] = m
                    if checksums:
                        try:
                            crcs[key] = crc32c.crc32c(tar.extractfile(m).read())
                        except (tarfile.ReadError, EOFError, OSError):
                            crcs[key] = NO_CRC  # the file ends inside this image (a cut copy): undecodable
                elif ext == LABEL_EXT:
                    try:  # a class index is a few digits: a longer .cls is no label, read no more of it
                        text = tar.extractfile(m).read(min(m.size, MAX_LABEL_BYTES)).decode(errors="replace").strip()
                    except tarfile.ReadError:
                        break  # the file ends inside this label: the tar was cut here
                    try:
                        if m.size > MAX_LABEL_BYTES:
                            raise ValueError
                        labels[key] = int(text)
                    except ValueError:
                        raise SourceError(f"{path}: sample {printable(key)!r} has a non-integer label "
                                          f"{printable(text, 40)!r} in its .cls") from None
                    check_label_bound(labels[key], f"{path}: sample {printable(key)!r}")
    except tarfile.ReadError as e:
        raise SourceError(f"{path}: not a readable tar ({e}); re-create the shard") from None
    except PermissionError:
        raise permission_error(path) from None
    return rows_in_order(path, order, {key: (m.name, m.offset_data, m.size, crcs.get(key, NO_CRC))
                                       for key, m in images.items()}, labels)


def _members_until_cut(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """A tar's members up to where the file ends early (a copy cut off mid-member): the member
    being cut is indexed and, undecodable, gets its views flagged; the run goes on. A tar that is
    unreadable from its first header still raises."""
    while True:
        try:
            m = tar.next()
        except tarfile.ReadError:
            if tar.offset == 0:
                raise
            return
        if m is None:
            return
        yield m


def write_wds_shards(samples: list[tuple[str, bytes, str, int]], out_dir: str, *, per_shard: int,
                     prefix: str = "shard", class_names: list[str] | None = None) -> list[str]:
    """Write (key, image bytes, image ext, label) samples as WebDataset tars; used by the demo and tests.

    Each file appears whole or not at all, and durably (storage.fsutil): a demo killed mid-write leaves
    no torn shard for the next run to index."""
    import webdataset as wds

    from storage.fsutil import atomic_file, atomic_write

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for start in range(0, len(samples), per_shard):
        path = os.path.join(out_dir, f"{prefix}-{start // per_shard:06d}.tar")
        with atomic_file(path) as f, wds.TarWriter(f) as sink:
            for key, data, ext, label in samples[start:start + per_shard]:
                sink.write({"__key__": key, ext: data, "cls": str(label).encode()})
        paths.append(path)
    if class_names is not None:
        atomic_write(os.path.join(out_dir, "classes.txt"), ("\n".join(class_names) + "\n").encode())
    return paths
