"""ImageFolder sources: one sub-folder per class, one image file per sample.

Indexing walks the class folders in sorted order, then cuts the images into fixed-size virtual shards
after one seeded shuffle, so every shard mixes classes (a shard is the unit of work and of streaming; a
shard of one class would feed a batch of one class). ``--shards as-is`` keeps the folder order.
Non-regular files (FIFOs, devices, sockets, dangling links) named like images are skipped, counted and
reported, never opened. A sample's ``path`` is its file under the root; ``offset`` is 0.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

import crc32c
import numpy as np
import pyarrow as pa

from ..source_errors import SourceError, permission_error
from .base import IMAGE_EXTS, NO_CRC, SCHEMA, FileReader, Indexed, SourceFormat, read_file, read_regular_file

log = logging.getLogger("deit_lockstep.sources")


class FolderFiles(FileReader):
    """One file per sample: read whole, by its path under the root."""

    def __init__(self, root: str):
        self.root = root

    def read(self, file: int, offset: int, size: int, path: str) -> bytes:
        return read_file(os.path.join(self.root, path))

    def where(self, file: int, path: str) -> str:
        return os.path.join(self.root, path)


class ImageFolder(SourceFormat):
    kind, ext, what, recut = "imagefolder", None, "an ImageFolder directory", False
    sizes_without_content = False

    def index(self, src, files, *, checksums, shard_size, seed, shuffle) -> Indexed:
        return _index_imagefolder(src, shard_size=shard_size, seed=seed, shuffle=shuffle, checksums=checksums)

    def open_files(self, root, files) -> FolderFiles:
        return FolderFiles(root)


FORMAT = ImageFolder()


def _report_skipped(root: str, skipped: list[str]) -> None:
    if skipped:
        log.warning("%s: skipped %d non-regular file(s) named like images (FIFO, device, socket or dangling "
                    "link), e.g. %s; they are not images and are never opened", root, len(skipped), skipped[0])


def _index_imagefolder(root: str, *, shard_size: int, seed: int, shuffle: bool = True,
                       checksums: bool = True) -> Indexed:
    if shard_size < 1:
        raise SourceError(f"--shard-size must be >= 1, got {shard_size}")
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except PermissionError:
        raise permission_error(root, "list this folder") from None
    if not classes:
        raise SourceError(f"{root}: no class folders found; an ImageFolder source needs one sub-folder per class")

    def unlistable(e: OSError):  # os.walk skips a folder it cannot list: a class would vanish silently
        if e.errno in (errno.EACCES, errno.EPERM):
            raise permission_error(e.filename, "list this folder") from None
        raise SourceError(f"{e.filename}: cannot list this folder ({e.strerror}); fix or remove it") from None

    paths, labels, sizes, crcs, skipped = [], [], [], [], []
    for label, name in enumerate(classes):
        for dirpath, dirnames, files in os.walk(os.path.join(root, name), onerror=unlistable):
            dirnames.sort()
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTS):
                    full = os.path.join(dirpath, f)
                    rel = os.path.relpath(full, root)
                    try:
                        st = os.stat(full)  # follows links: a link to an image is an image
                    except PermissionError:
                        raise permission_error(full) from None
                    except FileNotFoundError:
                        st = None  # a dangling link
                    if st is None or not stat.S_ISREG(st.st_mode):
                        skipped.append(rel)  # opening a FIFO would hang the run
                        continue
                    if checksums:
                        data = read_regular_file(full)
                        sizes.append(len(data))
                        crcs.append(crc32c.crc32c(data))
                    paths.append(rel)
                    labels.append(label)
    _report_skipped(root, skipped)
    if not paths:
        raise SourceError(f"{root}: no images ({', '.join(IMAGE_EXTS)}) in its class folders")
    # One seeded shuffle, then fixed-size virtual shards: every shard mixes classes.
    order = np.random.Generator(np.random.Philox(key=[seed, 0x5eed])).permutation(len(paths))
    n = len(paths)
    if not shuffle:  # --shards as-is: folder order (class-sorted shards, on request)
        order = np.arange(n)
    idx = np.arange(n)
    table = pa.table({
        "key": [os.path.splitext(paths[i])[0] for i in order],
        "label": pa.array(np.asarray(labels, dtype=np.int32)[order]),
        "shard": pa.array((idx // shard_size).astype(np.int32)),
        "position": pa.array((idx % shard_size).astype(np.int32)),
        "path": [paths[i] for i in order],
        "offset": pa.array(np.zeros(n, dtype=np.int64)),
        "size": pa.array(np.asarray(sizes, np.int64)[order] if checksums else np.zeros(n, dtype=np.int64)),
        "crc32c": pa.array(np.asarray(crcs, np.int64)[order] if checksums else np.full(n, NO_CRC, np.int64)),
    }, schema=SCHEMA)
    num_shards = (n + shard_size - 1) // shard_size
    shards = [f"virtual-{i:06d}" for i in range(num_shards)]
    return Indexed("imagefolder", os.path.abspath(root), shards, classes, table, shard_size, seed,
                   "shuffle" if shuffle else "as-is", skipped=tuple(skipped))
