"""Leases: which fleet member is working on which unit, kept beside the units in ``<store>/leases/``.

    leases/<shard>_<block>.json   {"worker", "host", "pid", "since", "ttl"}; its mtime is the last renewal

A lease only avoids duplicated work; it never guards the bytes. Those are safe without it: a unit's
commit is atomic (a reader trusts a unit only through its marker or tar) and idempotent (the teacher is
deterministic for a fixed batch cut, so two workers finishing the same unit write the same bytes, and
the second commit finds them there and writes nothing). So every race below costs at most a unit
computed twice, never a wrong label.

- claim: ``open(O_CREAT | O_EXCL)``: of the workers racing for a free unit exactly one creates the file.
- renew: ``os.utime`` on a lease whose worker is us (a heartbeat thread, every ttl / 4), so the
  renewal time is the filesystem's mtime, not a field each host writes with its own clock.
- take over: a lease not renewed for ``ttl`` seconds belongs to a worker that is dead, frozen or cut off
  (a lease whose holder ran on this host and whose process is gone is stale at once: ``holder_gone``).
  The taker renames it aside to a name of its own (of racing takers exactly one rename finds the
  source), checks that what it moved is still the stale lease it judged (a renewal in between: put it
  back with ``os.link``, which, like O_EXCL, refuses to replace a lease someone made meanwhile), then
  claims the unit with O_EXCL like a free one.
- release: the holder removes its lease after the commit (if it is still its own).

What the filesystem must give: atomic rename, exclusive create, and mtimes on a clock that the hosts'
own clocks agree with to well within ttl (expiry compares the lease's mtime with the reader's clock).
Without them (old NFS without O_EXCL, skewed clocks) two workers may compute the same unit: wasted time,
same bytes. A lease renewed in the future (its holder's clock, or the file server's, is ahead of ours)
is logged once and counted as renewed when this book first saw that renewal: it is taken over once it
goes ttl seconds without another, never kept for as long as the clocks disagree.

On a bucket (s3://, gs://; storage/bucket.py) there is no rename, link or utime, and the clocks are the
server's: a claim is a conditional create (``If-None-Match: *`` on S3, ``ifGenerationMatch=0`` on GCS); a
heartbeat rewrites the lease object, conditional on its ETag (so it never overwrites a taker's lease); a
lease's renewal time is its ``Last-Modified`` and its age is measured against the server's clock now (an
object written and read back), so no host's clock enters it and a skewed one cannot hold a unit; a take-over
replaces the stale lease conditional on the ETag it judged (of racing takers exactly one PUT matches). Whether
the server honours conditional writes is checked once, at the first claim: one that ignores them is refused
with one line (two workers would both hold a unit).

A lease file is read like every store file (fsutil.read_regular: a FIFO or a symlink is never opened
for reading) and its fields are checked (schema.py): a malformed lease (not JSON, a pid that is no pid,
a NaN or infinite time, an unprintable or huge worker id) is logged and treated as stale, never a
traceback. An empty one is a claim being written (judged by its mtime).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import schema as sc
from .base import parse_unit_name, unit_name
from .bucket import ObjPath, as_path, require_conditional_writes
from .fsutil import listdir, read_regular
from .spec import StoreCorrupt

log = logging.getLogger(__name__)

LEASES_DIR = "leases"
DEFAULT_TTL = 120.0  # seconds without a renewal before a lease may be taken over
# What a lease's fields can be: a pid within Linux's PID_MAX_LIMIT (2**22), times within the epoch's first
# 3000 years, a ttl up to ~30 years (tests use 1e9 s for "never expires"), ids of bounded printable text.
MAX_PID = 2 ** 22
MAX_TIME = 1e11
MAX_TTL = 1e9
LEASE_LIMIT = 64 << 10


@dataclass(frozen=True)
class Lease:
    """A lease as read back from disk; renewed is the file's mtime (epoch seconds)."""

    unit: tuple[int, int]
    worker: str
    host: str
    pid: int
    since: float
    renewed: float
    ttl: float | None = None  # the holder's ttl (what `inspect` judges it by; a taker uses its own)
    malformed: str = ""  # why its body failed its check (then it is stale at once), else ""
    tag: str = ""  # on a bucket: the ETag of the lease object read (a take-over or renewal is conditional on it)
    version: str = ""  # ... and its generation on GCS, which conditions a replace on that, not on the ETag

    def age(self, now: float | None = None) -> float:
        """Seconds since the last renewal."""
        return (time.time() if now is None else now) - self.renewed

    def expired(self, ttl: float, now: float | None = None) -> bool:
        return self.age(now) > ttl

    def holder_gone(self) -> bool:
        """The holder ran on this host and its process no longer exists: the lease is stale now, not
        after ttl, so rerunning a killed precompute on the same machine resumes at once. A reused pid
        reads as alive (then the ttl decides: the safe side); a stopped process is alive."""
        if self.host != socket.gethostname() or not 0 < self.pid <= MAX_PID:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except (PermissionError, OverflowError, OSError):  # alive, another user's (or no pid to ask)
            return False
        return False

    def stale(self, ttl: float, now: float | None = None) -> bool:
        """May be taken over: not renewed for ttl seconds, malformed, or its holder on this host is gone."""
        return bool(self.malformed) or self.expired(ttl, now) or self.holder_gone()


def new_worker_id() -> str:
    """host-pid-random: unique per process, readable in `inspect`."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _read(path: Path, unit: tuple[int, int] | None = None) -> Lease | None:
    """The lease at path, or None if there is none. An empty file is a claim being written (a claim writes
    its body right after the exclusive create): judged by its mtime, never stale at once. A body that fails
    its check is a malformed lease (Lease.malformed says why), stale at once. unit: the lease's unit when
    path's name does not say it (a lease renamed aside)."""
    unit = unit or parse_unit_name(path.name)
    if isinstance(path, ObjPath):
        return _read_object(path, unit)
    try:
        data = read_regular(path, LEASE_LIMIT)
        st = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as e:  # a FIFO, a directory, a symlink, a huge file where a lease goes
        return _malformed(path, unit, f"unreadable: {e.strerror or e}")
    lease = _parse(data, unit, st.st_mtime)
    return _malformed(path, unit, lease.malformed) if lease.malformed else lease


def _read_object(path: ObjPath, unit) -> Lease | None:
    """_read on a bucket: one GET gives the body, its Last-Modified (the server's clock) and its ETag."""
    import dataclasses

    import obstore

    try:
        result = path._call(obstore.get, path.key)
    except FileNotFoundError:
        return None
    meta = result.meta
    if meta["size"] > LEASE_LIMIT:
        return Lease(unit, "", "", 0, 0.0, meta["last_modified"].timestamp(), malformed="larger than a lease",
                     tag=meta.get("e_tag") or "", version=meta.get("version") or "")
    lease = _parse(bytes(result.bytes()), unit, meta["last_modified"].timestamp())
    return dataclasses.replace(lease, tag=meta.get("e_tag") or "", version=meta.get("version") or "")


def _parse(data: bytes, unit, mtime: float) -> Lease:
    """A lease's body checked field by field; mtime is its last renewal."""
    if not data:
        return Lease(unit, "", "", 0, mtime, mtime)
    try:
        body = sc.obj(json.loads(data), "lease")
        ttl = body.get("ttl")
        return Lease(unit, sc.text(sc.field(body, "worker", "lease"), "worker", 256),
                     sc.text(body.get("host", ""), "host", 256), sc.integer(body.get("pid", 0), "pid", 0, MAX_PID),
                     sc.number(body.get("since", mtime), "since", 0, MAX_TIME), mtime,
                     None if ttl is None else sc.number(ttl, "ttl", 1e-3, MAX_TTL))
    except (ValueError, RecursionError) as e:  # schema.Invalid is a ValueError
        mtime = mtime if math.isfinite(mtime) else 0.0
        return Lease(unit, "", "", 0, mtime, mtime, malformed=str(e)[:120])


def _malformed(path: Path, unit, why: str) -> Lease | None:
    try:
        mtime = path.lstat().st_mtime
    except FileNotFoundError:
        return None
    mtime = mtime if math.isfinite(mtime) else 0.0
    return Lease(unit, "", "", 0, mtime, mtime, malformed=why)


class Leases:
    """The lease book of one store as seen by one worker (``worker``). Thread-safe in the sense that
    every operation is one or a few atomic filesystem calls; it keeps no state but the worker id."""

    def __init__(self, store_path, worker: str | None = None, ttl: float = DEFAULT_TTL):
        if not ttl > 0:
            raise ValueError(f"lease ttl must be > 0 seconds, got {ttl}")
        self.dir = as_path(store_path) / LEASES_DIR
        self.bucket = isinstance(self.dir, ObjPath)
        self._conditional_checked = False
        self._clock: tuple[float, float] | None = None  # on a bucket: (server time, time.monotonic()) read together
        self.worker = worker or new_worker_id()
        self.ttl = float(ttl)
        # (unit, worker, renewed) of a lease renewed in the future -> when first seen (time.monotonic);
        # (unit, why) of a malformed lease already logged
        self._future: dict[tuple, float] = {}
        # the process that owns the book: a DataLoader worker claiming on its behalf records its parent
        self.host, self.pid = socket.gethostname(), os.getpid()

    def path(self, unit: tuple[int, int]) -> Path:
        return self.dir / f"{unit_name(*unit)}.json"

    def read(self, unit: tuple[int, int]) -> Lease | None:
        return _read(self.path(unit))

    def _names(self) -> list[str]:
        """The lease files now in leases/ (one listing), in unit-name order."""
        try:
            return sorted(n for n in listdir(self.dir) if n.endswith(".json") and not n.startswith(".")
                          and parse_unit_name(n) is not None)
        except (FileNotFoundError, NotADirectoryError):  # no leases/ yet; a file there: _create names it
            return []

    def units_with_lease(self) -> set[tuple[int, int]]:
        """Units that have a lease file (held or stale), from one listing and no read: a unit not in it is
        free without looking further."""
        return {parse_unit_name(n) for n in self._names()}

    def all(self) -> list[Lease]:
        """Every lease now on disk (held or expired), in unit order."""
        out = []
        for name in self._names():
            lease = _read(self.dir / name)
            if lease is not None:
                out.append(lease)
        return out

    def free(self, unit: tuple[int, int], now: float | None = None) -> bool:
        """No lease, or a stale one: claim() may succeed."""
        lease = self.read(unit)
        return lease is None or self.stale(lease, now)

    def stale(self, lease: Lease, now: float | None = None) -> bool:
        """lease.stale by this book's ttl, with two things only a book can know: a malformed lease is
        logged, and a lease renewed in the future (a skewed clock) counts as renewed when we first saw
        that renewal, so it is taken over after ttl, not after the clocks' difference plus ttl."""
        if now is None:  # on a bucket: the server's clock, the one that stamped the lease's Last-Modified
            now = self.server_now() if self.bucket else time.time()
        if lease.malformed:
            if (lease.unit, lease.malformed) not in self._future:
                self._future[(lease.unit, lease.malformed)] = 0.0  # log once per lease and cause
                log.warning("lease %s is malformed (%s): treating it as stale, taking it over",
                            self.path(lease.unit), lease.malformed)
            return True
        if lease.age(now) >= 0:
            return lease.stale(self.ttl, now)
        key = (lease.unit, lease.worker, lease.renewed)
        if key not in self._future:
            self._future[key] = time.monotonic()
            log.warning("lease %s (worker %s on %s) was renewed %.0f s in the future: that host's clock (or the "
                        "file server's) is ahead of this one's; it is taken over if not renewed within %g s",
                        self.path(lease.unit), lease.worker, lease.host, -lease.age(now), self.ttl)
        return time.monotonic() - self._future[key] > self.ttl or lease.holder_gone()

    def server_now(self) -> float:
        """The server's clock now: read from the server (three requests) at most every ttl / 8 seconds
        and carried forward in between by this host's monotonic clock, which no clock setting moves."""
        mono = time.monotonic()
        if self._clock is None or mono - self._clock[1] > min(self.ttl / 8, 5.0):
            self._clock = (self.dir.server_now(), time.monotonic())
        return self._clock[0] + (time.monotonic() - self._clock[1])

    def claim(self, unit: tuple[int, int]) -> bool:
        """Take the unit if nobody holds it (or its holder's lease expired); True if it is ours now."""
        path = self.path(unit)
        if self.bucket:
            return self._claim_object(path, unit)
        if self._create(path):
            return True
        lease = _read(path)
        if lease is None:  # released between our create and read: try once more
            return self._create(path)
        if lease.worker == self.worker and not lease.malformed:
            return True
        if not self.stale(lease):
            return False
        aside = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(path, aside)  # of racing takers, one finds the source
        except FileNotFoundError:
            return False
        moved = _read(aside, unit)
        if moved is not None and (moved.worker != lease.worker or not self.stale(moved)):
            # renewed (or replaced by a fresh claim) between our read and the rename: give it back
            with contextlib.suppress(OSError):
                os.link(aside, path)
            with contextlib.suppress(OSError):
                os.unlink(aside)
            return False
        with contextlib.suppress(OSError):
            os.unlink(aside)
        return self._create(path)

    def _claim_object(self, path: ObjPath, unit) -> bool:
        """claim on a bucket: a conditional create; a stale lease is replaced conditional on its ETag."""
        if not self._conditional_checked:
            require_conditional_writes(self.dir)  # once per book: a server ignoring them is refused
            self._conditional_checked = True
        if path.create(self._body()):
            return True
        lease = _read(path, unit)
        if lease is None:  # released between our create and read: try once more
            return path.create(self._body())
        if lease.worker == self.worker and not lease.malformed:
            return True
        if not self.stale(lease):
            return False
        return path.replace_if(self._body(), lease.tag, lease.version)  # of racing takers, one matches it

    def _body(self) -> bytes:
        return (json.dumps({"worker": self.worker, "host": self.host, "pid": self.pid, "since": time.time(),
                            "ttl": self.ttl}, sort_keys=True) + "\n").encode()

    def _create(self, path: Path) -> bool:
        body = {"worker": self.worker, "host": self.host, "pid": self.pid, "since": time.time(),
                "ttl": self.ttl}
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except FileNotFoundError:  # no leases/ yet (a store made before leases existed)
            try:
                self.dir.mkdir(exist_ok=True)
            except FileExistsError:  # a file named leases
                raise self._not_a_dir() from None
            return self._create(path)
        except NotADirectoryError:
            raise self._not_a_dir() from None
        try:
            os.write(fd, (json.dumps(body, sort_keys=True) + "\n").encode())
        finally:
            os.close(fd)
        return True

    def _not_a_dir(self) -> StoreCorrupt:
        return StoreCorrupt(f"{self.dir} is not a directory: the store's lease book is damaged; remove it "
                            "(precompute makes a new one) and rerun")

    def held(self) -> list[tuple[int, int]]:
        """Units whose lease is ours."""
        return [lease.unit for lease in self.all() if lease.worker == self.worker]

    def renew(self) -> int:
        """Touch every lease of ours (the heartbeat); returns how many."""
        n = 0
        if self.bucket:  # rewrite each lease object of ours, conditional on the ETag we read
            for lease in self.all():
                if lease.worker == self.worker and self.path(lease.unit).replace_if(
                        (json.dumps({"worker": lease.worker, "host": lease.host, "pid": lease.pid,
                                     "since": lease.since, "ttl": lease.ttl}, sort_keys=True) + "\n").encode(),
                        lease.tag, lease.version):
                    n += 1
            return n
        for unit in self.held():
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path(unit))
                n += 1
        return n

    def release(self, unit: tuple[int, int]) -> None:
        """Drop our lease on a unit (after its commit); someone else's lease is left alone."""
        lease = self.read(unit)
        if lease is not None and lease.worker == self.worker:
            with contextlib.suppress(FileNotFoundError):
                self.path(unit).unlink() if self.bucket else os.unlink(self.path(unit))


def completion_times(store_path) -> list[float]:
    """When each complete unit was committed (the mtime of its record in units/: a zarr marker or a wds
    tar, both named <shard>_<block>.<ext>), sorted: the fleet's pace, for `inspect`."""
    units = as_path(store_path) / "units"
    if isinstance(units, ObjPath):  # Last-Modified: the server's clock
        return sorted(o["last_modified"].timestamp() for o in units.walk_objects()
                      if not o["path"].rsplit("/", 1)[-1].startswith(".")
                      and parse_unit_name(o["path"].rsplit("/", 1)[-1]) is not None)
    out = []
    try:
        names = os.listdir(units)
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith(".") or parse_unit_name(name) is None:
            continue
        with contextlib.suppress(FileNotFoundError):
            out.append((units / name).stat().st_mtime)
    return sorted(out)


def fleet_status(store_path, units: list[tuple[int, int]], complete: set[tuple[int, int]],
                 views_of: dict[tuple[int, int], int], *, window: float = 600.0, now: float | None = None) -> dict:
    """Units complete / leased / pending, the lease holders, the recent rate and an ETA, as JSON-able data.

    leased: incomplete units under a live lease (judged by its holder's ttl); an expired lease's unit
    counts as pending (anyone may take it over) and is listed with expired=True. rate: units committed
    in the last `window` seconds over the time since the first of them (a fleet that stopped shows a
    falling rate, then none); eta_s: the views left at the recent views/s."""
    book = Leases(store_path)
    if now is None:  # on a bucket, the server's clock: the one that stamps leases and units
        now = book.dir.server_now(read_only=True) if book.bucket else time.time()
    leases = [lease for lease in book.all() if lease.unit not in complete]
    live = {lease.unit for lease in leases if not lease.stale(lease.ttl or DEFAULT_TTL, now)}  # (a future one: live)
    recent = [t for t in completion_times(store_path) if t > now - window]
    span = now - recent[0] if recent else 0.0
    # views per unit differ (a short last block, shard sizes): rate in views, from the recent units' share
    views_done = sum(views_of[u] for u in complete)
    views_left = sum(views_of[u] for u in units if u not in complete)
    mean_views = views_done / max(len(complete), 1)
    units_per_s = len(recent) / span if span > 0 else None
    views_per_s = None if units_per_s is None else units_per_s * mean_views
    return {
        "units_complete": len(complete),
        "units_leased": len(live),
        "units_pending": len(units) - len(complete) - len(live),
        "leases": [{"unit": list(lease.unit), "worker": lease.worker, "host": lease.host, "pid": lease.pid,
                    "since": lease.since, "renewed_age_s": round(now - lease.renewed, 1),
                    "expired": lease.unit not in live} for lease in leases],
        "window_s": window,
        "recent_units": len(recent),
        "units_per_s": units_per_s,
        "views_per_s": views_per_s,
        "views_left": views_left,
        "eta_s": None if not views_per_s or not views_left else views_left / views_per_s,
    }


class Heartbeat:
    """A daemon thread renewing a worker's leases every ttl / 4 while its process runs. A process frozen
    (SIGSTOP, a hung driver) or killed stops renewing with it, so its leases expire: exactly the signal
    the rest of the fleet needs."""

    def __init__(self, leases: Leases):
        import threading

        self.leases = leases
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.leases.ttl / 4):
            # A failed beat (a transient filesystem error; a bucket's server down or answering 5xx, which
            # obstore raises as its own errors, not OSError) is tried again next beat: an exception here
            # would end the thread with a traceback on stderr, and the worker, renewing nothing, would
            # lose its units to others after ttl.
            with contextlib.suppress(Exception):
                self.leases.renew()

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
