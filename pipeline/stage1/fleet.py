"""The fleet: who takes which unit, and how processes that share a store stay out of each other's way.

A unit is the unit of work, (shard, view block) (``units.py``). Each rank works through its own share
first (unit i goes to rank i mod world), then through the other ranks' pending units from the back of
their lists (``units.work_order``), taking each unit by a lease beside the store (``storage.leases``):
a straggler's units go to whoever is free, and a dead or frozen worker's are taken over once its lease
is ``--lease-ttl`` seconds old. A ``--join`` process (no rank) takes any pending unit the same way;
``--no-claim`` keeps the static split (its own share, no leases). Units already complete are skipped,
so a fleet needs no coordinator and rerunning the same command resumes; a unit two workers computed
anyway (a lease race) has the same bytes, committed once. In the endgame every unit left is leased by
a live worker: the others poll (``pending``, ``any_free``) until it is committed or its lease expires.

Before any unit, a fresh store is made once for the whole fleet (``index_once.py``): one process holds
the index lease (``IndexLease``) while it reads the source and creates the store; the rest wait for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from storage import open_store
from storage.bucket import ObjPath, as_path, is_url
from storage.leases import Heartbeat, Leases

from .errors import PrecomputeError
from .units import Unit

log = logging.getLogger(__name__)


def fleet_position(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world) from the flags, torchrun's RANK/WORLD_SIZE, or SLURM's PROCID/NTASKS."""
    env = os.environ
    if rank is None:
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    if world_size is None:
        world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    if world_size < 1 or not 0 <= rank < world_size:
        raise PrecomputeError(f"rank {rank} is outside a fleet of {world_size}; set --rank in [0, --world-size)")
    return rank, world_size


def pending(order: list[Unit], writer) -> list[Unit]:
    """The units of ``order`` not complete yet, in that order. One listing of the store's units/, not
    one stat per unit: ranks poll this about every 0.5 s in the endgame, over every unit (37.5k at
    ImageNet and 300 views)."""
    done = set(writer.completed_units())
    return [u for u in order if u not in done]


def any_free(leases: Leases, pending: list[Unit]) -> bool:
    """Whether some pending unit has no lease or a stale one (``Leases.free``). One listing of leases/
    answers for every unit without a lease file; only the pending units that have one are read (to
    judge staleness), and only until one is free: in the endgame, the few units live workers hold."""
    with_lease = leases.units_with_lease()
    if any(u not in with_lease for u in pending):
        return True
    return any(leases.free(u) for u in pending)


@dataclass
class Claimer:
    """Decides, inside a DataLoader worker, whether this process renders a unit: it is not complete
    and the lease on it is ours. Picklable (a path and the lease book), so DataLoader workers claim
    the unit they are about to render, not the main process ahead of time: a process holds only the
    leases of units it is actually working on."""

    leases: Leases
    store: str
    views_per_unit: int

    def take(self, shard: int, first_view: int) -> bool:
        unit = (shard, first_view // self.views_per_unit)
        if self._complete(unit) or not self.leases.claim(unit):
            return False
        if self._complete(unit):  # committed and released by another worker just before our claim
            self.leases.release(unit)
            return False
        return True

    def _complete(self, unit) -> bool:
        if getattr(self, "_reader", None) is None:
            self._reader = open_store(self.store)
        return self._reader.is_complete(*unit)


def work_through(order: list[Unit], writer, leases: Leases | None, labeller) -> None:
    """Label the units of ``order`` until none is pending: passes of ``labeller.one_pass`` over what is
    left. Claiming (``leases``): when every unit left is leased by a live worker, wait for its commit,
    or for its lease to expire (a frozen or lost worker) and take it over. The static split (no
    leases): one pass over our own share. Stopped by an error, our leases are freed for the others."""
    try:
        with Heartbeat(leases) if leases is not None else contextlib.nullcontext():
            while True:
                left = pending(order, writer)
                if not left:
                    break
                if leases is not None and not any_free(leases, left):
                    time.sleep(min(max(leases.ttl / 8, 0.05), 0.5))
                    labeller.show_fleet()
                    continue
                labeller.one_pass(left)
                if leases is None:
                    break
    finally:
        if leases is not None:
            release_all(leases)


def release_all(leases: Leases) -> None:
    """Free our leases for the others, as far as the store lets us. A release that fails (the server or the
    filesystem gone: what stopped the run, most likely) is left, logged at debug level only: it must not
    replace, or add lines to, the one-line error being reported, and the lease it leaves is taken over
    anyway (at once by a rerun on this host, its process gone; by anyone after --lease-ttl)."""
    try:
        held = leases.held()
    except Exception as e:  # noqa: BLE001 (any failure here: the leases expire by themselves)
        log.debug("could not list our leases to release them (%s); they expire by themselves", _short(e))
        return
    for unit in held:
        try:
            leases.release(unit)
        except Exception as e:  # noqa: BLE001
            log.debug("could not release the lease on unit %s (%s); it expires by itself", unit, _short(e))


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


INDEX_UNIT = (0, 0)  # the index lease's one "unit": a lease book holds leases by unit name


class IndexLease:
    """The lease on making a new store at ``out``: whoever holds it reads the source (sizes and crc32c of
    every sample) and creates the store; every other process of a fresh fleet waits for the store
    instead of reading the source too. A lease (``storage.leases``) beside where the store will be,
    ``<parent>/.<name>.indexing/leases/0_0.json``, not inside it: the store appears whole by one
    rename. Its holder renews it (``Heartbeat``) while it indexes; one that dies or freezes stops
    renewing, and after ``ttl`` seconds (at once on its own host, its process gone) a waiter takes it
    over and indexes instead."""

    def __init__(self, out: str, worker: str, ttl: float):
        # a bucket's URL stays one (a lease object under the bucket's prefix, judged by the server's clock):
        # as a local path it was a folder named "s3:" in the working directory, one per host
        out = as_path(out) if is_url(out) else Path(os.path.abspath(out))
        self.dir = out.parent / f".{out.name}.indexing"
        self.book = Leases(self.dir, worker, ttl)

    def claim(self) -> bool:
        """Take the lease if nobody holds it (or its holder's lease went stale); True if it is ours."""
        for _ in range(3):
            self.dir.mkdir(parents=True, exist_ok=True)
            try:
                return self.book.claim(INDEX_UNIT)
            except FileNotFoundError:  # its holder made the store and removed the folder as we claimed
                continue
        return False

    def holder(self) -> str:
        """Who holds the lease now, in words (for the waiting line)."""
        lease = self.book.read(INDEX_UNIT)
        if lease is None or not lease.worker:
            return "another process"
        return f"{lease.worker} (renewed {max(lease.age(), 0.0):.0f} s ago)"

    def release(self) -> None:
        """Drop the lease (the store exists now, or indexing failed and another may try), and the
        folder it lived in when nobody else is claiming there."""
        self.book.release(INDEX_UNIT)
        if isinstance(self.dir, ObjPath):
            return  # a prefix goes with its last object
        for d in (self.book.dir, self.dir):
            with contextlib.suppress(OSError):  # another process claims there right now: leave it
                d.rmdir()
