"""Durable, atomic file operations: the only way this package makes anything visible on disk.

Every function here also takes a storage.bucket.ObjPath (a key in an s3:// or gs:// bucket): there a
write is one PUT (whole or absent, as write-then-rename is on a disk), a read one GET, and fsync has
nothing to do. That is the seam that lets the backends keep one code path for disks and buckets."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import uuid
from pathlib import Path

from .bucket import ObjPath
from .errors import UserError

_FULL = (errno.ENOSPC, errno.EDQUOT)


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entry list's) data to stable storage."""
    if isinstance(path, ObjPath):
        return  # a PUT is durable when it returns
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
    """Write, fsync, then os.replace: readers see the old file or the whole new one, never a part.
    On a bucket: one PUT, which gives the same."""
    if isinstance(path, ObjPath):
        path.put(bytes(data))
        return
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


def read_if_exists(path: Path, limit: int | None = None) -> bytes | None:
    """read_regular, or None when there is no file at path."""
    try:
        return read_regular(path, limit)
    except FileNotFoundError:
        return None


class NotRegularFile(UserError, OSError):
    """A store file that is not a plain file (a FIFO, a device, a directory, a symlink), or larger than it
    can be: reading it could block forever or allocate without bound, so it is refused unread."""


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def read_regular(path, limit: int | None = None) -> bytes:
    """The bytes of the regular file at path, read so that no file can hang or exhaust the reader: opened
    with O_NONBLOCK (a FIFO opens and is then refused, instead of waiting for a writer) and O_NOFOLLOW (a
    store's own files are never symlinks: a link to /dev/zero or to a file elsewhere is refused, not
    followed), checked by fstat to be S_ISREG, and refused when larger than ``limit`` bytes. Raises
    FileNotFoundError when absent, NotRegularFile (an OSError) for all of the above. On a bucket: one
    GET, refused before its body is read when the object is larger than limit."""
    if isinstance(path, ObjPath):
        size, body = path.get()
        if limit is not None and size > limit:
            raise NotRegularFile(errno.EFBIG, f"{size} bytes, more than the {limit} it can hold", str(path))
        return body()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotRegularFile(errno.ELOOP, "a symlink where the store keeps a file", str(path)) from None
        if e.errno == errno.ENXIO:  # a socket (or a FIFO on some systems)
            raise NotRegularFile(errno.ENXIO, "not a regular file", str(path)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
            raise NotRegularFile(errno.EINVAL, f"{kind} where the store keeps a file", str(path))
        if limit is not None and st.st_size > limit:
            raise NotRegularFile(errno.EFBIG, f"{st.st_size} bytes, more than the {limit} it can hold", str(path))
        want = st.st_size if limit is None else min(st.st_size, limit)
        chunks, got = [], 0
        while True:  # to EOF: a file still growing is read as far as the limit allows
            block = os.read(fd, max(want - got, 1 << 16))
            if not block:
                break
            chunks.append(block)
            got += len(block)
            if limit is not None and got > limit:
                raise NotRegularFile(errno.EFBIG, f"more than the {limit} bytes it can hold", str(path))
        return b"".join(chunks)
    finally:
        os.close(fd)


def listdir(path) -> list[str]:
    """os.listdir for a folder or a bucket prefix (FileNotFoundError when a local folder is absent)."""
    if isinstance(path, ObjPath):
        return path.listdir()
    return os.listdir(path)


def lexists(path) -> bool:
    """os.path.lexists for a path or an object."""
    if isinstance(path, ObjPath):
        return path.head() is not None
    return os.path.lexists(path)


def unlink(path) -> None:
    """os.unlink for a path or an object (FileNotFoundError when absent)."""
    if isinstance(path, ObjPath):
        path.unlink()
        return
    os.unlink(path)
