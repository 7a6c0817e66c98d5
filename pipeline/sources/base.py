"""What every source format implements (``SourceFormat``), and what the formats share: the manifest's
columns, the indexer's result (``Indexed``), the image extensions and ``classes.txt``.

A format is one module of this package (``folder``, ``tar``, ``hf_parquet``) holding one ``SourceFormat``
instance, listed in ``registry.FORMATS``. It does two things, and nothing else knows how:

- ``index``: its files -> one row per sample (``SCHEMA``), each sample's address within its file in the
  ``file`` and ``offset`` columns, with or without every sample's size and crc32c (``checksums``);
- ``open_files``: a picklable ``FileReader`` giving a sample's bytes by that address, which the one
  ``reader.SampleReader`` drives for every stage (stage one, the loader, probes, verify, inspect).

Everything else (the manifest and its fingerprint, the re-cut of class-sorted files, content checks,
path patterns) is format-neutral. Adding a format: docs/DESIGN.md, "Adding a source format".
"""

from __future__ import annotations

import os
import stat
from abc import ABC, abstractmethod
from dataclasses import dataclass

import pyarrow as pa

from ..source_errors import SourceChanged, SourceError, check_class_count, permission_error

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
NO_CRC = -1  # crc32c column value of a sample whose bytes were not read at indexing

# One row per sample. ``path``: the image's name (a file under the root, a tar member, a parquet row's
# image.path); ``offset``: the sample's address within its file, a byte offset (tar) or a row (parquet),
# 0 for a file of its own. A re-cut source adds ``file`` (int32): the index of the sample's file in
# ``Manifest.files`` (as-is, a shard is its file).
SCHEMA = pa.schema([
    ("key", pa.string()), ("label", pa.int32()), ("shard", pa.int32()), ("position", pa.int32()),
    ("path", pa.string()), ("offset", pa.int64()), ("size", pa.int64()), ("crc32c", pa.int64()),
])
FILE_COLUMN = "file"


@dataclass
class Indexed:
    """What a format's ``index`` returns: the manifest's fields (``manifest.Manifest``) before any re-cut."""
    kind: str
    root: str
    shards: list[str]
    class_names: list[str]
    samples: pa.Table  # SCHEMA
    shard_size: int = 0
    seed: int = 0
    layout: str = ""
    skipped: tuple[str, ...] = ()
    stamps: dict | None = None  # each file's name, size, mtime_ns at indexing (sources.stamps)


class FileReader(ABC):
    """A sample's bytes by its address (file index, offset, size, path). Picklable: a DataLoader worker
    gets a copy and opens what it needs itself (no open file or cache is carried across)."""

    @abstractmethod
    def read(self, file: int, offset: int, size: int, path: str) -> bytes:
        """The sample's bytes; b"" when the file is gone, cut short or unreadable now (the caller's crc32c
        check then calls the source changed, or the image undecodable). A permission problem raises its
        SourceError: an unreadable file is an error, never a silently dropped image."""

    @abstractmethod
    def where(self, file: int, path: str) -> str:
        """The file to name in a message about this sample."""

    def use_sizes(self, file_index, offsets, sizes) -> None:
        """The manifest's address and size columns (numpy, one row per sample), for a reader that finds
        samples faster knowing their sizes (a parquet file on a bucket: no read per row to learn where
        each image starts). Kept by reference: SampleReader holds the same arrays. Others ignore them."""
        return None

    def read_many(self, wanted: list[tuple[int, int, int, str]]) -> list[bytes | None]:
        """Each (file, offset, size, path)'s bytes as ``read`` gives them, asked in file order; None for one
        whose read raised (undecodable now; a SourceError still stops the run). A format that can merge
        neighbours' reads (a tar on a bucket) does so here."""
        out = []
        for w in wanted:
            try:
                out.append(self.read(*w))
            except SourceError:
                raise
            except Exception:  # noqa: BLE001 - unreadable now: undecodable, its views skipped
                out.append(None)
        return out


class SourceFormat(ABC):
    """One source format. ``kind`` is stored in manifests (never rename it: stores carry it)."""

    kind: str        # "imagefolder", "wds", "parquet"
    ext: str | None  # the extension of its files; None: a directory of its own (ImageFolder)
    what: str        # for help and errors: "an ImageFolder directory", ".tar shards", ...
    recut: bool      # its shards are its files, re-cut into seeded virtual shards by --shards; False:
                     # it cuts its own virtual shards (an ImageFolder)
    sizes_without_content: bool  # its index records each sample's size without checksums (a tar's headers)

    @abstractmethod
    def index(self, src: str, files: list[str], *, checksums: bool, shard_size: int, seed: int,
              shuffle: bool) -> Indexed:
        """Index ``files`` (or the directory ``src``, for a format without ``ext``): one line SourceError
        for what cannot be indexed faithfully. ``shard_size``/``seed``/``shuffle`` matter only to a format
        that cuts its own shards (``recut`` False)."""

    @abstractmethod
    def open_files(self, root: str, files: list[str]) -> FileReader:
        """A reader of this format's files (names relative to ``root``, in the manifest's file order)."""


def check_files(src: str, files: list[str]) -> str:
    """The files of a source exist, are regular and sit in one directory: that directory (a bucket
    source: the prefix its objects sit under, their existence checked by ``expand_url``)."""
    from storage.bucket import is_source_url

    if files and is_source_url(files[0]):  # on a bucket: the prefix its objects sit under
        root = files[0].rsplit("/", 1)[0]
        if any(f.rsplit("/", 1)[0] != root for f in files):
            raise SourceError(f"{src}: shards must sit under one prefix")
        return root
    for f in files:
        if not os.path.isfile(f):
            what = "not a regular file (a FIFO or device?)" if os.path.exists(f) else "no such file"
            raise SourceError(f"{f}: {what}; check the path or pattern given to --data")
    root = os.path.dirname(os.path.abspath(files[0]))
    if any(os.path.dirname(os.path.abspath(f)) != root for f in files):
        raise SourceError(f"{src}: shards must sit in one directory")
    return root


def classes_txt_names(root: str, num_classes: int) -> list[str]:
    """Class names from ``classes.txt`` (one per line) beside the files, else "0".."C-1".

    ``num_classes`` comes from the largest label, which the caller bounded (check_label_bound)."""
    path = os.path.join(root, "classes.txt")
    from storage.bucket import BucketError, is_source_url, source_path

    if is_source_url(root):
        try:
            data = source_path(path).read(MAX_CLASSES_TXT)
        except FileNotFoundError:
            data = None
        except BucketError as e:  # a SourceError: no OSError handler of the indexers may swallow it
            raise SourceError(str(e)) from None
        return _names_of(data.decode(errors="replace").splitlines(), path) if data is not None else \
            [str(i) for i in range(num_classes)]
    if os.path.isfile(path):
        names = []
        with open(path, errors="replace") as f:
            for line in f:
                if line.strip():
                    names.append(line.strip())
                    check_class_count(len(names), path)  # stop reading a hostile file early
        return names  # fewer names than labels used: the format's indexer names the sample
    return [str(i) for i in range(num_classes)]


MAX_CLASSES_TXT = 64 * 1024 * 1024  # a bucket's classes.txt is read whole: refused past this size


def _names_of(lines, path: str) -> list[str]:
    names = []
    for line in lines:
        if line.strip():
            names.append(line.strip())
            check_class_count(len(names), path)
    return names


def read_regular_file(path: str) -> bytes:
    """A file's bytes. Never blocks on a FIFO or device swapped in after indexing (O_NONBLOCK, then
    only a regular file is read); a permission problem is a one-line SourceError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except PermissionError:
        raise permission_error(path) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SourceChanged(f"{path} is not a regular file any more (a FIFO, device or socket?); "
                                "restore the image file, or re-run precompute on the new source")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def read_file(path: str) -> bytes:
    """``read_regular_file``, or b"" for a file gone or unreadable (EIO): the crc32c check then calls it a
    changed source when the manifest recorded its bytes, else it is an undecodable image whose views get
    flagged. A SourceError (permission denied, not a regular file) is no OSError: it propagates."""
    try:
        return read_regular_file(path)
    except OSError:
        return b""
