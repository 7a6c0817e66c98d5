"""Rank-level read-ahead of tar samples on a bucket, shared by the rank's DataLoader workers.

Why: a lockstep batch's samples are scattered through each tar (a seeded slot order), and a worker
renders only 1/W of the steps, so neither one batch (too few neighbours) nor one worker (it would read
the samples of the other workers' steps too) can merge reads well. The main process knows the epoch's
rows of the rank, hence every sample each step needs, so it reads for all its workers:

- ``plan_ranges`` (vectorised but for one linear pass): the samples the epoch needs, in file order, merged
  into range requests across the smallest gaps first, as long as the bytes in gaps fit a budget, a range
  stays under ``SPAN`` bytes, and its samples are needed within ``HORIZON`` steps of each other (a range
  is cached from its first step to its last, so this bounds how long it stays). The budget: the plan
  reads at most ``READ_PER_USED`` bytes per byte the steps use (each step's distinct samples, as the
  loader's batches read them; a sample used by two steps counts twice, as two batches reading it
  directly would read it twice), whatever the data; the rest up to 1.5 is room for direct reads.
- ``ReadAhead``: a thread of the main process fetches the ranges in the order of the first step that
  needs them (``INFLIGHT`` requests at once), at most ``AHEAD`` steps ahead of the slowest consumer, into a
  node-local cache: one file per range (a 16-byte header: file index and start offset, then the bytes)
  in a temporary folder under /dev/shm (else the system's temporary folder), and the sample's entry in a
  shared int64 array set to the file's number once it is whole. A range's file is deleted once every
  consumer is past the last step that needs it.
- ``CacheView``: what a worker holds (picklable: shared tensors and the folder). ``BucketTars.read_many``
  takes a sample from it when ready, waits up to ``wait_s`` for one still pending, and otherwise reads it
  directly (today's coalesced path): the prefetcher never decides what a batch holds, only how fast it
  comes, so batches are the same bytes with it, without it, or with it stopped.

Bound: the cache holds the ranges whose [first step, last step] meets [slowest - 1, slowest + AHEAD]:
about (AHEAD + HORIZON) steps' samples x READ_PER_USED, and never more than ``cap`` bytes (2 GiB, or
half the folder's free space if less; the prefetcher waits for deletions; a consumer that needs a range
not fetched yet reads it directly, as it does a range that could not be written).
Counters: ``requests``/``bytes_read`` are the prefetcher's requests plus every consumer's direct reads,
in a small shared array (one row per writer, so no two processes add to one number).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import weakref
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np
import torch

READ_PER_USED = 1.45          # the plan reads at most this many bytes per byte the steps use (target 1.5)
SPAN = 64 * 1024 * 1024       # one range request at most this many bytes
HORIZON = 32                  # the samples of one range are needed within this many steps
AHEAD = 24                    # the prefetcher stays at most this many steps ahead of the slowest consumer
INFLIGHT = 4                  # range requests in flight at once
CAP_BYTES = 2 * 1024 ** 3     # the cache never holds more (the prefetcher waits)
WAIT_S = 30.0                 # a consumer waits this long for a pending sample before reading it itself
_HEADER = 16                  # a range file starts with (file index, start offset), int64 little-endian
PENDING = -1                  # a slot's value: planned, not fetched yet (0: not planned, or gone; > 0: ready)
_FILE_SHIFT = 40              # the key of a sample: file << 40 | offset (tars under 1 TB)


_PREFIX = "deit-readahead-"


def cache_dir() -> str:
    """A folder for the cache: under /dev/shm (memory) where it is writable, else the temporary folder. Its
    name holds this process's pid; the folders of processes that are gone (killed: no finalizer ran) are
    removed first, so a run killed mid-epoch leaves at most its own cache in memory until the next start."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    sweep_dead(base)
    return tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=base)


def sweep_dead(base: str) -> list[str]:
    """Remove the cache folders under ``base`` whose process is gone; the ones removed."""
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        pid = name[len(_PREFIX):].split("-", 1)[0]
        if not name.startswith(_PREFIX) or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # gone (another user's live process raises PermissionError: kept)
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
            removed.append(name)
        except OSError:
            pass
    return removed


def plan_ranges(files: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, first: np.ndarray, last: np.ndarray,
                budget: float, span: int = SPAN, horizon: int = HORIZON):
    """Range requests for samples in file order (``files``, ``offsets`` sorted that way, one entry each, the
    steps ``first``..``last`` needing it): [R, 5] int64 (file, start, end, first step, last step) sorted by
    first step, and each sample's range number. Merges across the smallest gaps first while the gaps' bytes
    stay within ``budget`` (module doc)."""
    n = len(files)
    if n == 0:
        return np.zeros((0, 5), np.int64), np.zeros(0, np.int64)
    ends = offsets + sizes
    same = files[1:] == files[:-1]
    gaps = np.where(same, offsets[1:] - ends[:-1], np.iinfo(np.int64).max)
    ok = np.sort(gaps[same])
    within = ok[np.cumsum(ok, dtype=np.float64) <= budget]
    threshold = int(within[-1]) if len(within) else -1  # merge gaps up to this many bytes
    candidate = (gaps <= threshold).tolist()
    out, member = [], np.empty(n, np.int64)
    fl, of, en, fi, la = files.tolist(), offsets.tolist(), ends.tolist(), first.tolist(), last.tolist()
    cur = [fl[0], of[0], en[0], fi[0], la[0]]
    member[0] = 0
    for i in range(1, n):
        lo, hi = min(cur[3], fi[i]), max(cur[4], la[i])
        if candidate[i - 1] and max(cur[2], en[i]) - cur[1] <= span and hi - lo <= horizon:
            cur[2], cur[3], cur[4] = max(cur[2], en[i]), lo, hi
        else:
            out.append(cur)
            cur = [fl[i], of[i], en[i], fi[i], la[i]]
        member[i] = len(out)
    out.append(cur)
    ranges = np.asarray(out, dtype=np.int64)
    order = np.argsort(ranges[:, 3], kind="stable")
    renumber = np.empty(len(order), np.int64)
    renumber[order] = np.arange(len(order))
    return ranges[order], renumber[member]


class CacheView:
    """A consumer's side of the cache (module doc). Picklable: shared tensors and the folder's path."""

    def __init__(self, folder: str, keys: torch.Tensor, slots: torch.Tensor, progress: torch.Tensor,
                 counts: torch.Tensor, wait_s: float):
        self.folder, self.wait_s = folder, wait_s
        self._keys, self._slots, self._progress, self._counts = keys, slots, progress, counts
        self.consumer = -1  # not a consumer (yet): direct reads count in the last row

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_np",)}

    def _arrays(self):
        if "_np" not in self.__dict__:
            self._np = (self._keys.numpy(), self._slots.numpy(), self._counts.numpy())
        return self._np

    def at_step(self, consumer: int, step: int) -> None:
        """Consumer ``consumer`` now renders step ``step`` (its earlier steps are done)."""
        self.consumer = consumer
        if consumer < len(self._progress):
            self._progress[consumer] = step

    def count(self, requests: int, nbytes: int) -> None:
        """A direct read of this consumer (its own row: no two processes add to one number)."""
        counts = self._arrays()[2]
        counts[1 + self.consumer if 0 <= self.consumer < len(counts) - 2 else -1] += (requests, nbytes)

    def totals(self) -> tuple[int, int]:
        requests, nbytes = self._arrays()[2].sum(axis=0).tolist()
        return int(requests), int(nbytes)

    def take(self, wanted: list[tuple[int, int, int, str]]) -> list[bytes | None]:
        """Each (file, offset, size, path) from the cache, None for what is not there: one still pending is
        waited for up to ``wait_s`` (polling), one not planned or gone is None at once."""
        keys, slots, _ = self._arrays()
        want = np.asarray([(f << _FILE_SHIFT) | o for f, o, _s, _p in wanted], dtype=np.int64)
        k = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
        k = np.where(keys[k] == want, k, -1)
        out: list[bytes | None] = [None] * len(wanted)
        todo = list(range(len(wanted)))
        deadline = time.monotonic() + self.wait_s
        while todo:
            later = []
            for i in todo:
                cid = int(slots[k[i]]) if k[i] >= 0 else 0
                if cid > 0:
                    out[i] = self._read(cid, *wanted[i][:3])
                elif cid == PENDING:
                    later.append(i)
            if not later or time.monotonic() >= deadline:
                break
            todo = later
            time.sleep(0.002)
        return out

    def _read(self, cid: int, file: int, offset: int, size: int) -> bytes | None:
        try:
            fd = os.open(os.path.join(self.folder, str(cid)), os.O_RDONLY)
        except OSError:  # deleted meanwhile: read directly
            return None
        try:
            head = np.frombuffer(os.pread(fd, _HEADER, 0), dtype="<i8")
            if len(head) != 2 or int(head[0]) != file or not 0 <= offset - int(head[1]):
                return None
            data = os.pread(fd, size, _HEADER + offset - int(head[1]))
            return data if len(data) == size else None
        finally:
            os.close(fd)


class ReadAhead:
    """The main process's side: plans an epoch's ranges and fetches them ahead (module doc).

    ``tars`` is the ``BucketTars`` its consumers read through (it gets the ``CacheView``); ``files``,
    ``offsets``, ``sizes``: every sample's address (a ``SampleReader``'s columns); ``consumers``: the
    DataLoader's workers (1 without). ``shared``: tensors in shared memory (workers)."""

    def __init__(self, tars, files: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, consumers: int, *,
                 shared: bool = True, ahead: int = AHEAD, horizon: int = HORIZON, read_per_used: float = READ_PER_USED,
                 cap: int = CAP_BYTES, wait_s: float = WAIT_S, inflight: int = INFLIGHT):
        keys = (np.asarray(files, np.int64) << _FILE_SHIFT) | np.asarray(offsets, np.int64)
        self._order = np.argsort(keys, kind="stable")  # sample k (file order) is row _order[k]
        self._kfiles, self._koffsets = np.asarray(files, np.int64)[self._order], np.asarray(offsets)[self._order]
        self._ksizes = np.asarray(sizes, np.int64)[self._order]
        self._k_of_row = np.empty(len(keys), np.int64)
        self._k_of_row[self._order] = np.arange(len(keys))
        consumers = max(consumers, 1)
        t = dict(keys=torch.from_numpy(keys[self._order].copy()), slots=torch.zeros(len(keys), dtype=torch.int64),
                 progress=torch.zeros(consumers, dtype=torch.int64),
                 # row 0: the prefetcher, 1 + c: consumer c, last: direct reads of a process that is neither
                 counts=torch.zeros((consumers + 2, 2), dtype=torch.int64))
        if shared:
            for v in t.values():
                v.share_memory_()
        self.tars, self.folder = tars, cache_dir()
        st = os.statvfs(self.folder)  # a container's /dev/shm may be small: at most half of what is free
        cap = min(cap, st.f_bavail * st.f_frsize // 2)
        self.view = CacheView(self.folder, wait_s=wait_s, **t)
        self.ahead, self.horizon, self.read_per_used = ahead, horizon, read_per_used
        self.cap, self.inflight = cap, inflight
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._next_id = 1
        self.cached_bytes = self.peak_bytes = 0
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.folder, True)
        tars.cache = self.view

    @property
    def requests(self) -> int:
        return self.view.totals()[0]

    @property
    def bytes_read(self) -> int:
        return self.view.totals()[1]

    def start(self, need_step: np.ndarray, need_row: np.ndarray, paused: bool = False) -> None:
        """Read ahead for an epoch whose step ``need_step[i]`` needs manifest row ``need_row[i]``. Stops the
        previous epoch's read-ahead and deletes its cache first. ``paused``: plan, but fetch nothing (the
        tests' prefetcher that never arrives)."""
        self.stop()
        k = self._k_of_row[np.asarray(need_row, np.int64)]
        step = np.asarray(need_step, np.int64)
        keep = self._ksizes[k] > 0  # (0: no address, e.g. a parquet file that cannot be mapped: read directly)
        copies = getattr(self.tars, "copies", None)
        if copies is not None:  # samples of a file kept whole on local disk are read there (local_copies)
            keep &= copies.ready.numpy()[self._kfiles[k]] == 0
        k, step = k[keep], step[keep]
        uk, inv = np.unique(k, return_inverse=True)
        n = len(self._ksizes)
        used = int(self._ksizes[np.unique(step * n + k) % n].sum())  # each step's distinct samples
        first = np.full(len(uk), np.iinfo(np.int64).max)
        last = np.full(len(uk), -1, np.int64)
        np.minimum.at(first, inv, step)
        np.maximum.at(last, inv, step)
        sizes = self._ksizes[uk]
        budget = max(0.0, self.read_per_used * used - float(sizes.sum()))  # bytes in gaps the plan may read
        ranges, member = plan_ranges(self._kfiles[uk], self._koffsets[uk], sizes, first, last, budget,
                                     horizon=self.horizon)
        self.view._progress.zero_()
        slots = self.view._slots
        slots[torch.from_numpy(uk)] = PENDING
        if paused:
            return
        bounds = np.cumsum(np.bincount(member, minlength=len(ranges)))[:-1]
        by_range = np.split(uk[np.argsort(member, kind="stable")], bounds)  # each range's samples
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ranges, by_range, self._stop), daemon=True,
                                        name="bucket-read-ahead")
        self._thread.start()

    def stop(self) -> None:
        """Stop fetching, delete the cache, and let every consumer read what it needs directly."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.view._slots.zero_()
        for name in os.listdir(self.folder):
            with _quiet():
                os.unlink(os.path.join(self.folder, name))
        self.cached_bytes = 0

    def close(self) -> None:
        self.stop()
        self._finalizer()

    def _run(self, ranges: np.ndarray, members: list[np.ndarray], stop: threading.Event) -> None:
        from storage.bucket import as_path

        slots, progress = self.view._slots, self.view._progress
        counts = self.view._counts.numpy()
        copies = getattr(self.tars, "copies", None)
        copied = copies.ready.numpy() if copies is not None else None
        lock = threading.Lock()
        held: dict[int, tuple[int, int, str]] = {}  # range -> (last step, bytes, file path)
        state = {"next": 0}

        def fetch(r: int):
            file, start, end = (int(x) for x in ranges[r, :3])
            url = self.tars.where(file, "")
            p = as_path(url)
            try:
                data = _get(p, start, end, url)
            except Exception:  # noqa: BLE001 - the consumers read it directly (and raise what they must)
                data = None
            with lock:
                counts[0] += (1, 0 if data is None else len(data))
            if data is None or len(data) != end - start:
                return r, None
            cid = self._claim_id()
            path = os.path.join(self.folder, str(cid))
            tmp = path + ".part"
            try:
                with open(tmp, "wb") as f:
                    f.write(np.asarray([file, start], dtype="<i8").tobytes())
                    f.write(data)
                os.rename(tmp, path)
            except OSError:  # the folder full (a small /dev/shm) or gone: the consumers read it directly
                with _quiet():
                    os.unlink(tmp)
                return r, None
            return r, (cid, path, len(data))

        pool = ThreadPoolExecutor(self.inflight, thread_name_prefix="bucket-read-ahead")
        inflight = set()
        try:
            while not stop.is_set():
                slow = int(progress.min())
                for r in [r for r, (last, _, _) in held.items() if last < slow]:  # every consumer is past it
                    _last, nbytes, path = held.pop(r)
                    slots[torch.from_numpy(members[r])] = 0
                    with _quiet():
                        os.unlink(path)
                    self.cached_bytes -= nbytes
                while (state["next"] < len(ranges) and len(inflight) < self.inflight
                       and ranges[state["next"], 3] <= slow + self.ahead
                       and (self.cached_bytes + int(ranges[state["next"], 2] - ranges[state["next"], 1]) <= self.cap
                            or not held)):
                    r = state["next"]
                    state["next"] += 1
                    if copied is not None and copied[ranges[r, 0]]:  # its file was kept whole meanwhile
                        slots[torch.from_numpy(members[r])] = 0
                        continue
                    inflight.add(pool.submit(fetch, r))
                if not inflight and state["next"] >= len(ranges) and not held:
                    return
                if not inflight:  # ahead enough, or the cap: wait for the consumers (a step takes far longer)
                    time.sleep(0.005)
                    continue
                done, inflight = wait(inflight, timeout=0.02, return_when=FIRST_COMPLETED)
                for fut in done:
                    r, got = fut.result()
                    if got is None:
                        slots[torch.from_numpy(members[r])] = 0  # not fetched: read directly at once
                        continue
                    cid, path, nbytes = got
                    slots[torch.from_numpy(members[r])] = cid
                    held[r] = (int(ranges[r, 4]), nbytes, path)
                    self.cached_bytes += nbytes
                    self.peak_bytes = max(self.peak_bytes, self.cached_bytes)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            pending = slots == PENDING
            slots[pending] = 0  # what was not fetched: read directly, no one waits for it

    def _claim_id(self) -> int:
        with _ID_LOCK:
            cid, self._next_id = self._next_id, self._next_id + 1
        return cid


_ID_LOCK = threading.Lock()


def _get(p, start: int, end: int, url: str) -> bytes:
    from .bucket_files import fetch_range

    return fetch_range(p.store, p.key, start, end, url)


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        return kind is not None and issubclass(kind, OSError)


__all__ = ["CacheView", "ReadAhead", "plan_ranges"]
