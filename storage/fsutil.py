"""Durable, atomic file operations: the only way this package makes anything visible on disk."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path

_FULL = (errno.ENOSPC, errno.EDQUOT)


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entry list's) data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path):
    """A binary file to write that appears at path whole, or not at all: written under a temporary
    name, fsynced, then os.replace'd (what atomic_write does, for writers that stream, such as
    torch.save of a checkpoint too big to hold twice in memory).

    The temporary name is unique per call so that two processes writing the same file (two
    fleets by mistake) never write into each other's temporary. On any failure (an exception in
    the body, a full disk, a failed rename) the temporary is removed and the old file stays.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # a failed write (a full disk) leaves no temporary behind
        if isinstance(e, OSError) and e.errno in _FULL:
            raise disk_full(path) from None
        raise
    fsync_path(path.parent)  # make the rename itself durable


def atomic_write(path: Path, data: bytes) -> None:
    """Write, fsync, then os.replace: readers see the old file or the whole new one, never a part."""
    with atomic_file(path) as f:
        f.write(data)


def _mount_point(path: Path) -> str:
    p = os.path.abspath(path)
    while not os.path.ismount(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return p


def disk_full(path) -> OSError:
    """ENOSPC/EDQUOT as one line naming the disk and the fix (the bare error says neither)."""
    path = Path(path)
    where = next((p for p in [path.parent, *path.parents] if p.exists()), Path("/"))
    try:
        free = f", {shutil.disk_usage(where).free // 2**20} MiB free"
    except OSError:
        free = ""
    return OSError(errno.ENOSPC, f"No space left on device: the disk mounted at {_mount_point(where)} is full{free}; "
                                 "free space there or pass an --out on a larger disk", str(path))


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in _FULL


def read_if_exists(path: Path) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None
