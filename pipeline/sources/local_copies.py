"""Whole source objects from a bucket kept on node-local disk across epochs (``train --source-cache DIR``).

Why: the read-ahead (``bucket_cache``) reads only the epoch's samples, and with DeiT's repeats R = 3 an
epoch uses a random third of each tar, so one epoch cannot read much less than ~0.35 requests per sample
within 1.5 bytes per byte used. A run of 300 epochs reads the same objects 300 times. Kept whole on a
node-local disk (what webdataset's ``cache_dir`` and copying ImageNet to a node's NVMe do), each object is
read once per node, in one request, and every later epoch reads local files.

- ``LocalCopies`` (what a reader holds; picklable: shared tensors and the folder): ``ready[f]`` is set
  once file ``f``'s copy is whole, ``names[f]`` is its file name. ``read`` takes what it can from copies
  (a pread per sample, open files kept per process) and returns None for the rest: the reader then takes
  the read-ahead's cache or reads directly, so batches are the same bytes whether a copy exists or not.
- ``CopyFiller`` (the main process): a thread copies the files in the order the first epoch needs them,
  as long as they fit the budget (``--source-cache-gib``, default 90% of the folder's free space at the
  start); each is one HEAD (size, ETag) and one GET of the whole object with ``If-Match`` on that ETag,
  streamed to ``NAME.part-HOST-PID`` and renamed whole. The name is a digest of (URL, size, ETag): an
  object that changes gets a new copy, and a copy is never a mix of two versions.
- Sharing a node: the ranks of one node (one folder) copy each object once. A rank that wants an object
  creates ``NAME.claim`` (O_EXCL: host and pid) before copying it; the others wait for ``NAME`` (polled by
  their filler thread, not by the workers) and read the bucket meanwhile. A claim or part file of a
  process that is gone (this host, no such pid) is removed and the object taken over.

Nothing is evicted during a run: with every sample equally likely in every epoch a fixed set of copies
serves as many reads as any eviction order could, and copies outlive the run (the next run on the same
source starts warm). The folder is the user's to clear.
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import threading
import time
import weakref
from collections import OrderedDict

import numpy as np
import torch

NAME_LEN = 40                   # sha1 hex of (URL, size, ETag)
OPEN_FILES = 64                 # open copies per process (a pread each; reopened when evicted)
FREE_SHARE = 0.9                # the default budget: this share of the folder's free space at the start
POLL_S = 0.5                    # a filler looks again for a copy another rank is making this often
CHUNK = 16 * 1024 * 1024        # a copy streams in pieces of this size (one request for the object)


def copy_name(url: str, size: int, etag: str) -> str:
    return hashlib.sha1(f"{url}\0{size}\0{etag}".encode()).hexdigest()


class LocalCopies:
    """A reader's side (module doc). ``counts``: [1, 2] int64 shared, the filler's (requests, bytes)."""

    def __init__(self, folder: str, nfiles: int, shared: bool = True):
        self.folder = folder
        self.ready = torch.zeros(nfiles, dtype=torch.int8)
        self.names = torch.zeros((nfiles, NAME_LEN), dtype=torch.uint8)
        self.counts = torch.zeros((1, 2), dtype=torch.int64)
        if shared:
            for t in (self.ready, self.names, self.counts):
                t.share_memory_()
        self._fds: OrderedDict[int, int] = OrderedDict()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_fds"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fds = OrderedDict()

    def totals(self) -> tuple[int, int]:
        requests, nbytes = self.counts[0].tolist()
        return int(requests), int(nbytes)

    def has(self, file: int) -> bool:
        return bool(self.ready[file])

    def path(self, file: int) -> str:
        return os.path.join(self.folder, bytes(self.names[file].numpy()).decode())

    def read(self, wanted) -> list[bytes | None]:
        """Each (file, offset, size, ...)'s bytes from its copy, None where there is none (yet)."""
        out: list[bytes | None] = [None] * len(wanted)
        ready = self.ready.numpy()
        for i, (file, offset, size, *_rest) in enumerate(wanted):
            if ready[file]:
                fd = self._fd(file)
                data = os.pread(fd, size, offset) if fd is not None else b""
                out[i] = data if len(data) == size else None  # (past its end: the bucket's answer, read there)
        return out

    def _fd(self, file: int) -> int | None:
        fd = self._fds.pop(file, None)
        if fd is None:
            try:
                fd = os.open(self.path(file), os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:  # removed by hand mid-run: read from the bucket from now on
                self.ready[file] = 0
                return None
            if len(self._fds) >= OPEN_FILES:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[file] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class CopyFiller:
    """The main process's side (module doc): copies ``urls`` into ``folder`` within ``budget`` bytes."""

    def __init__(self, folder: str, urls: list[str], budget: int | None = None, shared: bool = True):
        os.makedirs(folder, exist_ok=True)
        self.folder, self.urls = os.path.abspath(folder), list(urls)
        self.copies = LocalCopies(self.folder, len(urls), shared=shared)
        st = os.statvfs(self.folder)
        self.budget = int(FREE_SHARE * st.f_bavail * st.f_frsize) if budget is None else int(budget)
        self.admitted_bytes = self.copied = self.waited = 0
        self._host = socket.gethostname()
        self._order: list[int] | None = None
        self._meta: dict[int, tuple[int, str]] = {}  # file -> (size, ETag) of the version admitted
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        sweep_stale(self.folder, self._host)
        self._finalizer = weakref.finalize(self, self._stop.set)

    def start(self, first_need: np.ndarray) -> None:
        """Copy the files in ``first_need`` order (the first epoch's: later calls change nothing)."""
        if self._order is not None:
            return
        seen = dict.fromkeys(int(f) for f in first_need)
        self._order = list(seen) + [f for f in range(len(self.urls)) if f not in seen]
        self._thread = threading.Thread(target=self._run, daemon=True, name="source-copies")
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def stop(self) -> None:
        self._stop.set()
        self.join()

    def _count(self, requests: int, nbytes: int) -> None:
        self.copies.counts[0] += torch.tensor([requests, nbytes])

    def _run(self) -> None:
        waiting: dict[int, str] = {}  # file -> the copy's name, being made by another process
        for f in self._order:
            if self._stop.is_set():
                return
            name = self._admit(f)
            if name is not None and not self._copy(f, name):
                waiting[f] = name
        while waiting and not self._stop.wait(POLL_S):
            for f, name in list(waiting.items()):
                if _whole(os.path.join(self.folder, name), self._meta[f][0]):
                    self._publish(f, name)
                    del waiting[f]
                elif not _claimed(os.path.join(self.folder, name + ".claim"), self._host):
                    if self._copy(f, name):  # its maker is gone: ours now
                        del waiting[f]

    def _admit(self, f: int) -> str | None:
        """The copy's name if file ``f`` is to be kept (it fits the budget), else None."""
        import obstore

        from storage.bucket import source_path

        p = source_path(self.urls[f])
        try:
            meta = obstore.head(p.store, p.key)
        except Exception:  # noqa: BLE001 - gone or unreachable: the readers read it (and say what is wrong)
            return None
        finally:
            self._count(1, 0)
        size, etag = int(meta["size"]), meta.get("e_tag") or ""
        if not etag:  # nothing proves a copy is of this version
            return None
        name = copy_name(self.urls[f], size, etag)
        final = os.path.join(self.folder, name)
        if _whole(final, size):
            self._publish(f, name)
            return None
        if os.path.lexists(final) and not _claimed(final + ".claim", self._host):  # cut short or replaced by hand
            with _quiet():
                os.unlink(final)
        if self.admitted_bytes + size > self.budget:
            return None
        self.admitted_bytes += size
        self._meta[f] = (size, etag)
        return name

    def _copy(self, f: int, name: str) -> bool:
        """Make the copy unless another live process is making it (False: wait for theirs)."""
        import obstore

        from storage.bucket import source_path

        final = os.path.join(self.folder, name)
        claim = final + ".claim"
        if not _take_claim(claim, self._host):
            return False
        part = f"{final}.part-{self._host}-{os.getpid()}"
        size, etag = self._meta[f]
        p = source_path(self.urls[f])
        try:
            got = obstore.get(p.store, p.key, options={"if_match": etag})
            written = 0
            with open(part, "wb") as out:
                for piece in got.stream(min_chunk_size=CHUNK):
                    out.write(piece)
                    written += len(piece)
                    if self._stop.is_set():
                        raise InterruptedError
            self._count(1, written)
            if written != size:
                raise OSError(f"{written} of {size} bytes")
            os.rename(part, final)
            self.copied += 1
            self._publish(f, name)
        except Exception:  # noqa: BLE001 - changed, gone, a full disk: no copy, the readers read the bucket
            with _quiet():
                os.unlink(part)
        finally:
            with _quiet():
                os.unlink(claim)
        return True

    def _publish(self, f: int, name: str) -> None:
        self.copies.names[f] = torch.frombuffer(bytearray(name.encode()), dtype=torch.uint8)
        self.copies.ready[f] = 1


def _whole(path: str, size: int) -> bool:
    """A copy that can be read: a regular file (not a link) of the object's size. Its bytes are trusted as the
    local disk's are; a sample that does not decode is dropped as it is from a local source."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size


def _take_claim(path: str, host: str) -> bool:
    """Create the claim (O_EXCL); a claim of a process gone from this host is removed and retaken."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _claimed(path, host):
                return False
            with _quiet():
                os.unlink(path)
            continue
        with os.fdopen(fd, "w") as out:
            out.write(f"{host} {os.getpid()}\n")
        return True
    return False


def _claimed(path: str, host: str) -> bool:
    """Whether the claim at ``path`` is held by a live process (another host's: assumed live)."""
    try:
        with open(path) as f:
            owner, pid = f.read(256).split()
        pid = int(pid)
    except FileNotFoundError:
        return False
    except (OSError, ValueError):  # half-written by a live process, or garbage: live unless old
        try:
            return time.time() - os.stat(path).st_mtime < 60
        except OSError:
            return False
    return owner != host or _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def sweep_stale(folder: str, host: str) -> list[str]:
    """Remove part files and claims this host's processes left when they were killed; the names removed."""
    removed = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if ".part-" in name:
            owner, _, pid = name.rsplit(".part-", 1)[1].rpartition("-")
            if owner == host and pid.isdigit() and not _alive(int(pid)):
                with _quiet():
                    os.unlink(path)
                    removed.append(name)
        elif name.endswith(".claim") and not _claimed(path, host):
            with _quiet():
                os.unlink(path)
                removed.append(name)
    return removed


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        return kind is not None and issubclass(kind, OSError)


__all__ = ["CopyFiller", "LocalCopies", "copy_name", "sweep_stale"]
