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


def atomic_write(path: Path, data: bytes) -> None:
    """Write, fsync, then os.replace: readers see the old file or the whole new one, never a part.

    The temporary name is unique per call so that two processes writing the same file (two
    fleets by mistake) never write into each other's temporary.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
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


def load_error_cause(e: BaseException) -> str:
    """Why torch.load (or safetensors) refused a file, in one line, leaving out torch's advice to
    retry with unpickling switched on: that would run the file's code, which this tool never does.
    Shared by the teacher (pipeline/) and checkpoints (student/), which may not import each other."""
    advice = ("weights_only", "trusted source", "documentation", "add_safe_globals", "safe_globals")
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    cause = next((ln for ln in lines if not any(a in ln for a in advice)), type(e).__name__)
    if "Weights only load failed" in str(e):
        cause = f"it holds Python objects, not only tensors, and is never unpickled ({cause})"
    return cause if len(cause) <= 200 else cause[:197] + "..."
