"""create_store / open_store: the two entry points, and race-safe creation.

Creation is built in a private temporary directory next to the target and renamed into place
in one step: of N processes racing (a fleet starting), exactly one rename wins, the others see
an existing store, throw their copy away and open the winner's after checking its spec.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from .base import MANIFEST, STORE_JSON, read_store_json, store_json_bytes
from .fsutil import fsync_path
from .spec import StoreError, StoreMismatch, StoreSpec, mismatch_error
from .wds_backend import WdsReader, WdsWriter
from .wds_backend import init_layout as _init_wds
from .zarr_backend import ZarrReader, ZarrWriter
from .zarr_backend import init_arrays as _init_zarr

BACKENDS = {
    "zarr": (ZarrWriter, ZarrReader, _init_zarr),
    "wds": (WdsWriter, WdsReader, _init_wds),
}


def _backend(name: str, path):
    if name not in BACKENDS:
        raise StoreError(f"store at {path}: unknown backend {name!r}; use one of {sorted(BACKENDS)}")
    return BACKENDS[name]


def _check_same(path: Path, backend: str, spec: StoreSpec, fix: str) -> None:
    d = read_store_json(path)
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
    backend: str = "zarr",
    manifest: bytes = b"",
    meta: dict | None = None,
    overwrite: bool = False,
):
    """Create a store, or open an existing one with an equal spec for writing (resume, fleet member).

    overwrite=True deletes whatever is at path first: call it from one process only.
    """
    path = Path(path)
    writer_cls, _, init = _backend(backend, path)
    fix = "use a new --out or --overwrite"
    if overwrite and path.exists():
        shutil.rmtree(path)
    if not (path / STORE_JSON).exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.creating-{uuid.uuid4().hex}"
        try:
            tmp.mkdir()
            (tmp / "units").mkdir()
            (tmp / "meta").mkdir()
            (tmp / MANIFEST).write_bytes(manifest)
            init(tmp, spec)
            (tmp / STORE_JSON).write_bytes(store_json_bytes(spec, backend, meta))
            for root, _, files in os.walk(tmp):
                for f in files:
                    fsync_path(Path(root) / f)
            try:
                os.rename(tmp, path)  # atomic; fails if another process's store is already there
                fsync_path(path.parent)
            except OSError:
                if not (path / STORE_JSON).exists():
                    raise StoreError(f"{path} exists and is not a label store; {fix}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _check_same(path, backend, spec, fix)
    return writer_cls(path)


def open_store(path, expect: StoreSpec | None = None):
    """Open a store for reading; with expect, refuse one made with a different spec."""
    path = Path(path)
    d = read_store_json(path)
    _, reader_cls, _ = _backend(d["backend"], path)
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
