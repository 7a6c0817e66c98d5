"""The sample table a precompute run labels: read from the source once per store, not once per process.

A new store needs every sample's size and crc32c (each later read checks its bytes against them), and
taking them reads the whole source (140 GB for ImageNet). A fresh fleet does that once in total: the
process that wins the index lease (``fleet.IndexLease``) indexes and creates the store while holding it;
the others wait with a progress line and then take the manifest the store holds, as does any process
started on an existing store (a resumed rank, a restarted fleet, a ``--join`` process): the sample
table comes from the store's ``manifest.parquet``, its root re-based on the ``--data`` given (the same
shards copied elsewhere are the same source), and ``check_source`` checks the source cheaply
against it before any unit. A changed sample is still a one-line SourceChanged when a unit reads it:
every read is checked against the stored crc32c.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time

from storage import StoreError, open_store
from storage.base import STORE_JSON
from storage.bucket import ObjPath, as_path, is_source_url
from storage.leases import Heartbeat

from ..sources import (
    Manifest,
    ManifestError,
    expand_files,
    index_source,
    layout_for_store,
    stored_manifest,
    unchanged_source,
)
from .errors import PrecomputeError
from .fleet import IndexLease

log = logging.getLogger("deit_lockstep.precompute")

SAY_EVERY = 30.0  # seconds between a waiting process's progress lines


@contextlib.contextmanager
def source_manifest(cfg, worker: str, show: bool, fleet: bool):
    """Context manager giving the manifest to label: the store's (an existing store), or a fresh index of
    the source whose index lease is held until the block ends, so the caller creates the store before
    any other process of the fleet stops waiting. show: print the waiting line (rank 0, a --join); fleet:
    other processes may be waiting (world > 1, --join): the indexing process says so."""
    if cfg.overwrite or not _fresh_path(cfg.out):
        # --overwrite (one process: rank 0 alone), or something at --out that is no readable store:
        # index, and create_store names what is wrong there
        stored = None if cfg.overwrite else _stored(cfg.out)
        yield _resumed(cfg, stored, waited=False) if stored is not None else _index(cfg)
        return
    lease, since, said = IndexLease(cfg.out, worker, cfg.lease_ttl), time.monotonic(), 0.0
    while True:
        if not _fresh_path(cfg.out):  # made meanwhile by the process that held the lease
            stored = _stored(cfg.out)
            yield _resumed(cfg, stored, waited=True) if stored is not None else _index(cfg)
            return
        if lease.claim():
            try:
                if _fresh_path(cfg.out):  # (made and released between our look and our claim: take it)
                    with Heartbeat(lease.book):
                        if cfg.progress and fleet:
                            print(f"precompute: indexing {cfg.data} (every sample's size and crc32c) for the new "
                                  f"store {cfg.out}; other processes of the fleet wait for it", file=sys.stderr,
                                  flush=True)
                        yield _index(cfg)
                    return
            finally:
                lease.release()
            continue
        if show and time.monotonic() - said >= SAY_EVERY:
            said = time.monotonic()
            print(f"precompute: waiting {said - since:.0f} s for {lease.holder()} to index {cfg.data} and create "
                  f"the store {cfg.out}; the source is read once for the whole fleet", file=sys.stderr, flush=True)
        time.sleep(min(max(cfg.lease_ttl / 8, 0.05), 0.5))


def check_source(manifest: Manifest, data: str) -> Manifest | None:
    """Is the source at ``data`` still the one the store's manifest describes? None when it is, else the
    source's own manifest, names and labels only, which the store then refuses naming the first
    difference (``create_store``: other shards, samples or classes). The one place a resumed run or a
    --join checks its source; every sample read is checked against its crc32c besides. Where every source
    file's stamp (name, size, mtime) holds, nothing is read (``sources.unchanged_source``: one stat per file,
    a changed file re-indexed alone); else the source is indexed names-only and compared whole."""
    if unchanged_source(manifest, data) is not None:
        return None
    m = index_source(data, shard_size=manifest.shard_size or 1024, seed=manifest.seed, shards=manifest.layout,
                     checksums=False)
    return None if m.fingerprint == manifest.fingerprint else m


def _index(cfg) -> Manifest:
    """Every sample's size and crc32c: one full read of the source."""
    return index_source(cfg.data, shard_size=cfg.shard_size, seed=cfg.seed, shards=cfg.shards)


def _resumed(cfg, stored: Manifest, waited: bool) -> Manifest:
    """The store's manifest for a run on an existing store, its root the --data given. waited: this
    process watched the store being made in this start (a fresh fleet): the source was read for it a
    moment ago, so it is not checked again (the fleet reads the source once)."""
    layout, wrong_layout = layout_for_store(cfg.shards, stored, cfg.out)
    if wrong_layout:
        raise PrecomputeError(f"{wrong_layout}, or --overwrite to start over")
    if stored.shard_size and cfg.shard_size != stored.shard_size:  # (files as-is: no shard size)
        raise PrecomputeError(f"the store {cfg.out} was made with --shard-size {stored.shard_size}, not "
                              f"--shard-size {cfg.shard_size}; pass --shard-size {stored.shard_size}, or "
                              "--overwrite to start over")
    if not waited:
        other = check_source(stored, cfg.data)
        if other is not None:
            return other  # another source: create_store refuses it, naming the difference
    return dataclasses.replace(stored, root=_root_of(cfg.data, stored.kind))


def _root_of(data: str, kind: str) -> str:
    """The directory a manifest's relative paths start from, for the source at data (as indexing sets it)."""
    if kind == "imagefolder":
        return os.path.abspath(data)
    first = expand_files(data)[0]
    if is_source_url(first):  # a bucket's or web server's prefix (abspath would make it a local folder)
        return first.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(first))


def _fresh_path(out: str) -> bool:
    """Nothing at out yet (or an empty folder): a store is to be made there. On a bucket: no store.json
    yet, since a store being created there appears object by object, store.json last (a waiter that saw
    the first objects would index the source again instead of waiting for the store). A URL taken for a
    local path never exists: every process on a bucket store read the whole source, as if it were new."""
    path = as_path(out)
    try:
        if isinstance(path, ObjPath):
            return not (path / STORE_JSON).exists()
        return not path.exists() or (path.is_dir() and not path.is_symlink() and not any(path.iterdir()))
    except OSError:
        return False  # unreadable: create_store says what is wrong


def _stored(out: str) -> Manifest | None:
    """The manifest of the store at out; None when there is no readable store (create_store says why)."""
    if not (as_path(out) / STORE_JSON).exists():
        return None
    try:
        return stored_manifest(open_store(out))
    except (StoreError, ManifestError, OSError, ValueError, KeyError):
        return None
