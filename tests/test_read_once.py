"""A fresh fleet reads the source once in total, not once per rank (issue 22 item 2).

Counted, not timed: every way the source's files are read (``open``, tarfile's own ``open``, and
``os.open`` with ``os.read`` / ``os.fdopen``) is wrapped, and each read records which bytes of which
file it returned. 4 ranks start together in 4 threads on a fresh store; before each rank starts its
first unit, the bytes all of them read are counted byte by byte."""

import builtins
import json
import os
import tarfile
import threading
import time
from collections import defaultdict

import numpy as np
from conftest import write_wds
from test_faults import pconfig

import pipeline.stage1.index_once as index_once
import pipeline.stage1.precompute as pc
from pipeline.sources import stored_manifest, tar_headers
from pipeline.stage1.fleet import INDEX_UNIT, IndexLease
from pipeline.stage1.precompute import PrecomputeConfig, run_precompute
from pipeline.stage1.units import UnitViews
from storage import open_store

RANKS = 4


class _SourceReads:
    """Every read of a file under ``root``: (path, offset, bytes) per read, by phase."""

    def __init__(self, root: str):
        self.root = os.path.realpath(root) + os.sep
        self.lock = threading.Lock()
        self.local = threading.local()  # .unit_started, .probing: this thread's phase
        self.reads = defaultdict(list)  # phase -> [(path, offset, n)]
        self.fds: dict[int, str] = {}

    def ours(self, path) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.realpath(path).startswith(self.root)

    def record(self, path, offset: int, n: int) -> None:
        if getattr(self.local, "unit_started", False):
            phase = "units"  # past this rank's first unit: units read their shards, as they must
        else:
            phase = "probes" if getattr(self.local, "probing", False) else "start"
        with self.lock:
            self.reads[phase].append((os.path.realpath(path), offset, n))

    def install(self, monkeypatch) -> None:
        reads = self

        class Counted:
            def __init__(self, f, path):
                self._f, self._path = f, path

            def read(self, n=-1):
                pos = self._f.tell()
                data = self._f.read(n)
                reads.record(self._path, pos, len(data))
                return data

            def readinto(self, b):
                pos = self._f.tell()
                n = self._f.readinto(b)
                reads.record(self._path, pos, n or 0)
                return n

            def readline(self, *a):
                raise AssertionError("a source read this test does not count")

            readlines = read1 = readall = readline

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._f.close()

        def wrap_open(real):
            def opener(file, mode="r", *a, **kw):
                f = real(file, mode, *a, **kw)
                if not (reads.ours(file) and "r" in mode):
                    return f
                if "b" not in mode:  # text (classes.txt): read whole, line by line; counted whole at open
                    reads.record(file, 0, os.path.getsize(file))
                    return f
                return Counted(f, file)
            return opener

        real_os_open, real_os_read, real_close, real_fdopen = os.open, os.read, os.close, os.fdopen

        def os_open(path, flags, *a, **kw):
            fd = real_os_open(path, flags, *a, **kw)
            if reads.ours(path):
                with reads.lock:
                    reads.fds[fd] = os.fspath(path)
            return fd

        def os_read(fd, n):
            path = reads.fds.get(fd)
            pos = os.lseek(fd, 0, os.SEEK_CUR) if path is not None else 0
            data = real_os_read(fd, n)
            if path is not None:
                reads.record(path, pos, len(data))
            return data

        real_pread = os.pread

        def os_pread(fd, n, offset):  # the tar header walk (sources.tar_headers.read_at)
            data = real_pread(fd, n, offset)
            path = reads.fds.get(fd)
            if path is not None:
                reads.record(path, offset, len(data))
            return data

        def os_close(fd):
            with reads.lock:
                reads.fds.pop(fd, None)
            return real_close(fd)

        def os_fdopen(fd, *a, **kw):
            f = real_fdopen(fd, *a, **kw)
            path = reads.fds.get(fd)
            return Counted(f, path) if path is not None else f

        monkeypatch.setattr(builtins, "open", wrap_open(builtins.open))
        monkeypatch.setattr(tarfile, "bltn_open", wrap_open(tarfile.bltn_open))
        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "pread", os_pread)
        monkeypatch.setattr(tar_headers, "read_at", os_pread)
        monkeypatch.setattr(os, "read", os_read)
        monkeypatch.setattr(os, "close", os_close)
        monkeypatch.setattr(os, "fdopen", os_fdopen)

        real_render = UnitViews.render_unit

        def render_unit(self, *a, **kw):
            reads.local.unit_started = True
            return real_render(self, *a, **kw)
        monkeypatch.setattr(UnitViews, "render_unit", render_unit)

        real_probes = pc.probe_hashes

        def probe_hashes(*a, **kw):
            reads.local.probing = True
            try:
                return real_probes(*a, **kw)
            finally:
                reads.local.probing = False
        monkeypatch.setattr(pc, "probe_hashes", probe_hashes)


def _times_read(reads: list[tuple[str, int, int]]) -> dict[str, np.ndarray]:
    """path -> how many times each of its bytes was read."""
    out = {}
    for path, offset, n in reads:
        counts = out.setdefault(path, np.zeros(os.path.getsize(path), np.int64))
        counts[offset:offset + n] += 1
    return out


def test_four_ranks_started_together_on_a_fresh_store_read_each_source_byte_once(tmp_path, tiny_teacher,
                                                                                 monkeypatch):
    src = write_wds(tmp_path / "src", n=24, per_shard=8)
    out = tmp_path / "store"
    reads = _SourceReads(src)
    # "Started together": the process that won the index lease reads the source only once the other
    # three are waiting for it (each saw its own claim refused), whatever the threads' timing.
    waiting, indexed = set(), []
    real_claim, real_index = IndexLease.claim, index_once.index_source

    def claim(self):
        ok = real_claim(self)
        if not ok:
            waiting.add(threading.get_ident())
        return ok

    def index_source(*a, **kw):
        if kw.get("checksums", True):
            indexed.append(threading.get_ident())
            for _ in range(1200):
                if len(waiting) >= RANKS - 1:
                    break
                threading.Event().wait(0.05)
        return real_index(*a, **kw)

    monkeypatch.setattr(IndexLease, "claim", claim)
    monkeypatch.setattr(index_once, "index_source", index_source)
    reads.install(monkeypatch)

    start, results, errors = threading.Barrier(RANKS), [None] * RANKS, []

    def rank(r: int) -> None:
        try:
            start.wait()
            cfg = PrecomputeConfig(**pconfig(src, out, tiny_teacher, rank=r, world_size=RANKS, lease_ttl=30.0))
            results[r] = run_precompute(cfg)
        except BaseException as e:  # noqa: BLE001  (reported below, with its rank)
            errors.append((r, e))
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(RANKS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    assert not errors, errors
    assert len(indexed) == 1 and len(waiting) == RANKS - 1, "one rank indexed while the other three waited"

    before_units = _times_read(reads.reads["start"])
    twice = {os.path.basename(p): int((c > 1).sum()) for p, c in before_units.items() if (c > 1).any()}
    assert not twice, f"source bytes read more than once before the first unit: {twice}"
    # ... and that one read took every sample's bytes (their crc32c): the source was read, once
    manifest = stored_manifest(open_store(out))
    tars = {os.path.realpath(os.path.join(src, s)): s for s in manifest.shards}
    assert set(before_units) >= set(tars)
    for row in manifest.samples.to_pylist():
        counts = before_units[os.path.realpath(os.path.join(src, manifest.shards[row["shard"]]))]
        assert (counts[row["offset"]:row["offset"] + row["size"]] == 1).all(), row["key"]
    # rank 0's probe views read a few samples again (first and last view, 4 slots, a partner each)
    sizes = manifest.samples.column("size").to_numpy()
    assert sum(n for _, _, n in reads.reads["probes"]) <= 16 * int(sizes.max())
    store = open_store(out)
    assert store.completed_units() == store.spec.units() and store.check(full=True) == []
    assert sum(s.units_done for s in results) == len(store.spec.units())


def test_an_index_lease_whose_holder_died_is_taken_over_and_the_store_made(tmp_path, tiny_teacher):
    """The process that took the index lease died while reading the source (on another host: its lease
    just stops being renewed): a waiter takes the lease over once it is ttl old, indexes, and makes the store."""
    src = write_wds(tmp_path / "src", n=8, per_shard=8)
    out = tmp_path / "store"
    dead = IndexLease(str(out), "a-lost-node-1-0dead", ttl=2.0)
    assert dead.claim()
    path = dead.book.path(INDEX_UNIT)
    body = json.loads(path.read_text())
    path.write_text(json.dumps({**body, "host": "a-lost-node"}))
    old = time.time() - 20.0
    os.utime(path, (old, old))
    summary = run_precompute(PrecomputeConfig(**pconfig(src, out, tiny_teacher, lease_ttl=2.0)))
    assert summary.units_complete == summary.units_total > 0
    assert not (tmp_path / ".store.indexing").exists(), "the index lease is gone with the store made"
