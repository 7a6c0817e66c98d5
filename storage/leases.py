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
same bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .base import parse_unit_name, unit_name

LEASES_DIR = "leases"
DEFAULT_TTL = 120.0  # seconds without a renewal before a lease may be taken over


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

    def age(self, now: float | None = None) -> float:
        """Seconds since the last renewal."""
        return (time.time() if now is None else now) - self.renewed

    def expired(self, ttl: float, now: float | None = None) -> bool:
        return self.age(now) > ttl

    def holder_gone(self) -> bool:
        """The holder ran on this host and its process no longer exists: the lease is stale now, not
        after ttl, so rerunning a killed precompute on the same machine resumes at once. A reused pid
        reads as alive (then the ttl decides: the safe side); a stopped process is alive."""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def stale(self, ttl: float, now: float | None = None) -> bool:
        """May be taken over: not renewed for ttl seconds, or its holder on this host is gone."""
        return self.expired(ttl, now) or self.holder_gone()


def new_worker_id() -> str:
    """host-pid-random: unique per process, readable in `inspect`."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _read(path: Path) -> Lease | None:
    """The lease at path, or None if there is none (or it is being written: a claim writes its body
    right after the exclusive create, so an empty file is a claim in progress, never stale)."""
    try:
        st = path.stat()
        body = json.loads(path.read_bytes())
        unit = parse_unit_name(path.name)
        ttl = body.get("ttl")
        return Lease(unit, str(body["worker"]), str(body.get("host", "")), int(body.get("pid", 0)),
                     float(body.get("since", st.st_mtime)), st.st_mtime, None if ttl is None else float(ttl))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        try:  # unreadable body: judge it by its mtime alone, so a torn claim still expires
            st = path.stat()
        except FileNotFoundError:
            return None
        return Lease(parse_unit_name(path.name), "", "", 0, st.st_mtime, st.st_mtime)


class Leases:
    """The lease book of one store as seen by one worker (``worker``). Thread-safe in the sense that
    every operation is one or a few atomic filesystem calls; it keeps no state but the worker id."""

    def __init__(self, store_path, worker: str | None = None, ttl: float = DEFAULT_TTL):
        if not ttl > 0:
            raise ValueError(f"lease ttl must be > 0 seconds, got {ttl}")
        self.dir = Path(store_path) / LEASES_DIR
        self.worker = worker or new_worker_id()
        self.ttl = float(ttl)
        # the process that owns the book: a DataLoader worker claiming on its behalf records its parent
        self.host, self.pid = socket.gethostname(), os.getpid()

    def path(self, unit: tuple[int, int]) -> Path:
        return self.dir / f"{unit_name(*unit)}.json"

    def read(self, unit: tuple[int, int]) -> Lease | None:
        return _read(self.path(unit))

    def _names(self) -> list[str]:
        """The lease files now in leases/ (one listing), in unit-name order."""
        try:
            return sorted(n for n in os.listdir(self.dir) if n.endswith(".json") and not n.startswith(".")
                          and parse_unit_name(n) is not None)
        except FileNotFoundError:
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
        return lease is None or lease.stale(self.ttl, now)

    def claim(self, unit: tuple[int, int]) -> bool:
        """Take the unit if nobody holds it (or its holder's lease expired); True if it is ours now."""
        path = self.path(unit)
        if self._create(path):
            return True
        lease = _read(path)
        if lease is None:  # released between our create and read: try once more
            return self._create(path)
        if lease.worker == self.worker:
            return True
        if not lease.stale(self.ttl):
            return False
        aside = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(path, aside)  # of racing takers, one finds the source
        except FileNotFoundError:
            return False
        moved = _read(aside)
        if moved is not None and (moved.worker != lease.worker or not moved.stale(self.ttl)):
            # renewed (or replaced by a fresh claim) between our read and the rename: give it back
            with contextlib.suppress(OSError):
                os.link(aside, path)
            with contextlib.suppress(OSError):
                os.unlink(aside)
            return False
        with contextlib.suppress(OSError):
            os.unlink(aside)
        return self._create(path)

    def _create(self, path: Path) -> bool:
        body = {"worker": self.worker, "host": self.host, "pid": self.pid, "since": time.time(),
                "ttl": self.ttl}
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except FileNotFoundError:  # no leases/ yet (a store made before leases existed)
            self.dir.mkdir(exist_ok=True)
            return self._create(path)
        try:
            os.write(fd, (json.dumps(body, sort_keys=True) + "\n").encode())
        finally:
            os.close(fd)
        return True

    def held(self) -> list[tuple[int, int]]:
        """Units whose lease is ours."""
        return [lease.unit for lease in self.all() if lease.worker == self.worker]

    def renew(self) -> int:
        """Touch every lease of ours (the heartbeat); returns how many."""
        n = 0
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
                os.unlink(self.path(unit))


def completion_times(store_path) -> list[float]:
    """When each complete unit was committed (the mtime of its record in units/: a zarr marker or a wds
    tar, both named <shard>_<block>.<ext>), sorted: the fleet's pace, for `inspect`."""
    units = Path(store_path) / "units"
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
    now = time.time() if now is None else now
    leases = [lease for lease in Leases(store_path).all() if lease.unit not in complete]
    live = {lease.unit for lease in leases if not lease.stale(lease.ttl or DEFAULT_TTL, now)}
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
            with contextlib.suppress(OSError):  # a transient filesystem error: try again next beat
                self.leases.renew()

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
