"""create_store / open_store: the two entry points, and race-safe creation.

Creation is built in a private temporary directory next to the target and renamed into place
in one step: of N processes racing (a fleet starting), exactly one rename wins, the others see
an existing store, throw their copy away and open the winner's after checking its spec.

``overwrite=True`` first moves the old store aside in one rename (so the path is free at once and
a writer still running on the old store sees its generation gone at its next commit, see base.py),
then deletes it. It deletes only what is a label store of ours: one by its store.json, or a half-made
one (no readable store.json) whose every file, at any depth, is a name the store format lists (see
``_LAYOUT_FILES``); anything else is refused, and nothing in it is touched. A symlink given as the
path stays: the store it points to is rebuilt in place (a store on another disk linked into a
project keeps working).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from .base import FORMAT, MANIFEST, STORE_JSON, STORE_JSON_LIMIT, read_store_json, store_json_bytes
from .bucket import ObjPath, as_path
from .fsutil import atomic_write, fsync_path, read_regular
from .leases import LEASES_DIR
from .spec import StoreError, StoreMismatch, StoreSpec, mismatch_error
from .wds_backend import WdsReader, WdsWriter
from .wds_backend import init_layout as _init_wds
from .zarr_backend import ZarrReader, ZarrWriter
from .zarr_backend import grow_arrays as _grow_zarr
from .zarr_backend import init_arrays as _init_zarr


class Backend(NamedTuple):
    writer: type
    reader: type
    init: Callable  # (root, spec): lay out a new store's backend files in its temporary directory
    grow: Callable  # (root, old spec, new spec): make room for more views (grow_store)


# The backend registry. The CLI's --format choices, the names --overwrite may delete and the
# conformance tests are built from it, so a new backend is a module in storage/, one entry here and
# its case in tests/test_storage.py's _damage.
BACKENDS = {
    "zarr": Backend(ZarrWriter, ZarrReader, _init_zarr, _grow_zarr),
    "wds": Backend(WdsWriter, WdsReader, _init_wds, lambda root, old, new: None),  # one tar per unit: nothing sized
}
DEFAULT_BACKEND = "zarr"


def _backend(name: str, path):
    if name not in BACKENDS:
        raise StoreError(f"store at {path}: unknown backend {name!r}; use one of {sorted(BACKENDS)}")
    return BACKENDS[name]


# What a store directory may hold: the shared files, and each backend's own (_StoreBase.layout).
_LAYOUT = {STORE_JSON, MANIFEST, "meta", "units", LEASES_DIR} | {n for b in BACKENDS.values() for n in b.writer.layout}
# ... and every path under it, as regexes of the path relative to the store (for a half-made store, which
# has no store.json to say whose it is): meta/<key>.json, one record per unit named <shard>_<block>.<ext>
# (storage.base.unit_name), leases and the grow lock, each backend's own files (_StoreBase.layout_files),
# and the hidden temporaries our atomic writes and lease takeovers leave (storage.fsutil, storage.leases).
_LAYOUT_FILES = re.compile("|".join(f"(?:{p})" for p in (
    re.escape(STORE_JSON), re.escape(MANIFEST), "meta", r"meta/[\w-]+\.json", "units", r"units/\d+_\d+(\.\w+)+",
    re.escape(LEASES_DIR), rf"{re.escape(LEASES_DIR)}/(\d+_\d+\.json|\.grow\.lock)",
    r"(.+/)?\.[^/]+\.(tmp|tmp\d+|stale-[0-9a-f]+)",
    # on a bucket: the probes storage.bucket writes beside the leases (the server's clock, conditional writes)
    rf"{re.escape(LEASES_DIR)}/\.(clock|conditional-probe)-[0-9a-f]+",
    *(p for b in BACKENDS.values() for p in b.writer.layout_files))))


def _not_a_store(path: Path) -> str | None:
    """Why path is not a label store of ours (complete or half made), or None if it is one.

    A store by its store.json (readable, our format) may hold anything under its layout's names. Without
    a readable store.json nothing says whose the folder is, so every file and folder in it, at any depth,
    must be a name the store format lists: a folder that merely has meta/ and units/ is not a store."""
    if not path.is_dir():
        return "is not a directory"
    entries = os.listdir(path)
    foreign = sorted(e for e in entries if e not in _LAYOUT and not (e.startswith(".") and e.endswith(".tmp")))
    if foreign:
        return f"holds {foreign[0]!r}, which a label store never does"
    if STORE_JSON in entries:
        try:
            # a FIFO or device in its place must not hang --overwrite: read only a regular file
            fmt = json.loads(read_regular(path / STORE_JSON, STORE_JSON_LIMIT)).get("format")
        except (OSError, ValueError, AttributeError):
            fmt = None  # damaged: it says nothing, the files must
        if fmt == FORMAT:
            return None
        if fmt is not None:
            return f"holds a {fmt!r} store.json, not a {FORMAT} store"
    return _foreign_file(path)


def _foreign_file(path: Path) -> str | None:
    """Why a folder without a store.json of ours is not a half-made store: its first path the format
    does not list (symlinks included, never followed), or None when every path is one of ours."""
    for root, dirs, files in os.walk(path):
        for name in sorted(dirs) + sorted(files):
            rel = (Path(root) / name).relative_to(path).as_posix()
            if rel == STORE_JSON:
                continue
            if not _LAYOUT_FILES.fullmatch(rel) or os.path.islink(Path(root) / name):
                return f"holds {rel!r}, which a label store never does"
    return None


def _delete_store(path: Path) -> None:
    """Delete a store of ours at path (refusing anything else): rename aside, then remove."""
    if not os.path.lexists(path):
        return
    why = _not_a_store(path)
    if why is not None:
        raise StoreError(f"--overwrite refused: {path} {why}; it deletes label stores only, choose another --out")
    aside = path.parent / f".{path.name}.deleting-{uuid.uuid4().hex}"
    os.rename(path, aside)  # atomic: the path is free now, and the old generation gone from it
    shutil.rmtree(aside, ignore_errors=True)


def _build(path: Path, spec: StoreSpec, backend: str, manifest: bytes, meta: dict | None, init) -> bool:
    """Build a store in a private temporary and rename it to path; False if path was taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.creating-{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        (tmp / "units").mkdir()
        (tmp / "meta").mkdir()
        (tmp / MANIFEST).write_bytes(manifest)
        init(tmp, spec)
        (tmp / STORE_JSON).write_bytes(store_json_bytes(spec, backend, meta, uuid.uuid4().hex, manifest))
        for root, _, files in os.walk(tmp):
            for f in files:
                fsync_path(Path(root) / f)
        try:
            os.rename(tmp, path)  # atomic; fails if another process's store is already there
        except OSError:
            return False
        fsync_path(path.parent)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remote_not_a_store(path: ObjPath, objects: list[dict]) -> str | None:
    """_not_a_store for a prefix in a bucket: its store.json is ours, or every key under it is a name the
    store format lists."""
    try:
        fmt = json.loads((path / STORE_JSON).read(STORE_JSON_LIMIT)).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt == FORMAT:
        return None
    if fmt is not None:
        return f"holds a {fmt!r} store.json, not a {FORMAT} store"
    for o in objects:
        rel = o["path"][len(path.key):].lstrip("/")
        if rel != STORE_JSON and not _LAYOUT_FILES.fullmatch(rel):
            return f"holds {rel!r}, which a label store never does"
    return None


def _delete_remote(path: ObjPath) -> None:
    """_delete_store on a bucket: store.json goes first (a writer still running sees its generation gone at
    its next commit), then every other object under the prefix. Only a label store of ours is deleted."""
    objects = path.walk_objects()
    if not objects:
        return
    why = _remote_not_a_store(path, objects)
    if why is not None:
        raise StoreError(f"--overwrite refused: {path} {why}; it deletes label stores only, choose another --out")
    (path / STORE_JSON).unlink(missing_ok=True)
    for o in objects:
        ObjPath(path.scheme, path.bucket, o["path"]).unlink(missing_ok=True)


def _build_remote(path: ObjPath, spec: StoreSpec, backend: str, manifest: bytes, meta: dict | None, init) -> bool:
    """_build on a bucket, where nothing renames a folder into place: the store's files are laid out in a
    local temporary as on a disk, then each is created with a conditional PUT (one already there must hold
    the same bytes: a creator racing us with the same settings, or one that stopped half way), and
    store.json is created last, conditionally: of N creators exactly one makes it. False when another
    creator's files (other settings) or store.json are there."""
    with tempfile.TemporaryDirectory(prefix="deit-lockstep-store-") as d:
        tmp = Path(d) / "store"
        tmp.mkdir()
        (tmp / MANIFEST).write_bytes(manifest)
        init(tmp, spec)
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            data, target = f.read_bytes(), path / f.relative_to(tmp).as_posix()
            if not target.create(data) and target.read() != data:
                return False
    return (path / STORE_JSON).create(store_json_bytes(spec, backend, meta, uuid.uuid4().hex, manifest))


def _create_remote(path: ObjPath, spec: StoreSpec, backend: str, manifest: bytes, meta, overwrite: bool, fix: str):
    """create_store for a store on a bucket (see _build_remote and _delete_remote)."""
    chosen = _backend(backend, path)
    if overwrite:
        _delete_remote(path)
    if not (path / STORE_JSON).is_file() and not _build_remote(path, spec, backend, manifest, meta, chosen.init):
        if not (path / STORE_JSON).is_file():
            raise StoreError(f"{path} holds a half-made label store of other settings (no {STORE_JSON}: a writer "
                             "stopped while its store was made?); rebuild it with --overwrite")
    d = read_store_json(path)
    _check_same(path, backend, spec, fix, d)
    writer = chosen.writer(path)
    if writer.generation != d.get("generation"):
        _check_same(path, backend, spec, fix, writer._json)
    return writer


def _check_same(path: Path, backend: str, spec: StoreSpec, fix: str, d: dict | None = None) -> None:
    d = read_store_json(path) if d is None else d
    if d["backend"] != backend:
        raise StoreMismatch(
            f"store at {path} was made with backend={d['backend']}, you asked for backend={backend}; {fix}"
        )
    err = mismatch_error(path, StoreSpec.from_json(d["spec"]), spec, fix)
    if err is not None:
        raise err


def create_store(
    path,
    spec: StoreSpec,
    *,
    backend: str = DEFAULT_BACKEND,
    manifest: bytes = b"",
    meta: dict | None = None,
    overwrite: bool = False,
):
    """Create a store, or open an existing one with an equal spec for writing (resume, fleet member).

    overwrite=True deletes the label store at path first (never anything else, see the module doc):
    call it from one process only.
    """
    path = as_path(path)
    fix = "use a new --out or --overwrite"
    if isinstance(path, ObjPath):
        return _create_remote(path, spec, backend, manifest, meta, overwrite, fix)
    if path.is_symlink():  # rebuild where the link points; the link itself stays
        path = Path(os.path.realpath(path))
    chosen = _backend(backend, path)
    writer_cls, init = chosen.writer, chosen.init
    if overwrite:
        _delete_store(path)
    for _ in range(3):
        if (path / STORE_JSON).exists() or _build(path, spec, backend, manifest, meta, init):
            break
        if (path / STORE_JSON).exists():
            break  # another process's store won the rename
        why = _not_a_store(path)
        if why is not None:
            raise StoreError(f"{path} exists and {why}; use a new --out")
        if not overwrite:
            raise StoreError(f"{path} holds a half-made label store (no {STORE_JSON}: a writer stopped while its "
                             "store was rebuilt?); rebuild it with --overwrite")
        _delete_store(path)  # a stopped writer's last files reappeared between our delete and rename
    else:
        raise StoreError(f"{path}: another process keeps writing here; stop it, then rerun with --overwrite")
    d = read_store_json(path)
    _check_same(path, backend, spec, fix, d)
    writer = writer_cls(path)
    if writer.generation != d.get("generation"):  # rebuilt between the check and the open: check what was opened
        _check_same(path, backend, spec, fix, writer._json)
    return writer


def open_store(path, expect: StoreSpec | None = None):
    """Open a store for reading; with expect, refuse one made with a different spec."""
    path = as_path(path)
    d = read_store_json(path)
    reader_cls = _backend(d["backend"], path).reader
    if expect is not None:
        err = mismatch_error(
            path,
            StoreSpec.from_json(d["spec"]),
            expect,
            "point at the store made with these settings, or recompute it",
        )
        if err is not None:
            raise err
    return reader_cls(path)


def _lock(lock) -> None:
    """Create the lock file (a conditional PUT on a bucket); FileExistsError when it is there."""
    if isinstance(lock, ObjPath):
        if not lock.create(b""):
            raise FileExistsError(lock)
        return
    os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))


def _lock_age(lock) -> float:
    """Seconds since the lock was made: by the server's clock on a bucket (no host's clock enters it)."""
    if isinstance(lock, ObjPath):
        return lock.parent.server_now() - lock.mtime()
    return time.time() - lock.stat().st_mtime


def grow_store(path, views: int, *, lock_wait: float = 600.0) -> bool:
    """Give a store made with V views ``views`` > V views: views V..views-1 become pending units, and the
    store then holds exactly what a store made with ``views`` from the start would hold once they are
    done (the plan of view v depends on the seed, the recipe and v, never on V). True if it grew.

    Under an exclusive lock file (fleet members started together all ask): zarr arrays are resized;
    the units of a last view block that was partial (V not a multiple of views_per_unit) are retracted,
    because their block now spans more views, and are recomputed whole; then store.json takes the
    new spec and a new generation, so a writer still running with the old V stops at its next commit
    instead of writing a unit of the old shape. Shrinking is not done here (the caller refuses it)."""
    path = as_path(path)
    lock = path / LEASES_DIR / ".grow.lock"
    lock.parent.mkdir(exist_ok=True)
    deadline = time.monotonic() + lock_wait
    while True:
        try:
            _lock(lock)
            break
        except FileExistsError:
            try:
                stale = _lock_age(lock) > 120  # a grower killed mid-way: growing takes seconds
            except FileNotFoundError:
                continue
            if stale:
                lock.unlink(missing_ok=True)
            elif time.monotonic() > deadline:
                raise StoreError(f"store at {path}: another process has been growing it for {lock_wait:.0f}s; "
                                 f"if none is, delete {lock} and rerun") from None
            else:
                time.sleep(0.1)
    try:
        d = read_store_json(path)
        old = StoreSpec.from_json(d["spec"])
        if old.views >= views:
            return False  # another fleet member grew it first
        new = dataclasses.replace(old, views=views)
        backend = _backend(d["backend"], path)
        writer = backend.writer(path)
        backend.grow(path, old, new)
        last = old.num_blocks - 1
        if len(old.block_views(last)) < old.views_per_unit:
            for shard in range(old.num_shards):
                writer.retract(shard, last)
        d["spec"] = new.to_json()
        d["generation"] = uuid.uuid4().hex
        atomic_write(path / STORE_JSON, (json.dumps(d, indent=1, sort_keys=True) + "\n").encode())
        return True
    finally:
        lock.unlink(missing_ok=True)
