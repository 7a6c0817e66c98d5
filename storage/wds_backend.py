"""webdataset backend: one tar per work unit, units/<shard>_<block>.tar.

Each tar is a one-sample WebDataset shard (key = the unit's name) with members

    <key>.json          unit, views, and each array's dtype, shape and crc32c of its bytes
    <key>.ids.blosc     [views_in_block, cap, k] or [views_in_block, cap]
    <key>.values.blosc  topk only: uint16 delta-coded float16 log-prob patterns (see encoding.py)
    <key>.valid.blosc   uint8 [views_in_block, cap]
    <key>.tail_lse.blosc  float16 [views_in_block, cap, len(taus)]: only when the spec has taus

Arrays are blosc(zstd, byte-shuffle) compressed exactly as the zarr backend's chunks, so the
two stay within a tar header of each other in size. The tar is built in memory, written to a
temporary name, fsynced and os.replace'd: the tar existing *is* the unit being complete.
Tar headers carry no timestamps or owners, so rewriting a unit with the same labels produces
the same bytes (and is skipped).

What a tar proves: each blob's crc32c identifies its content, and the header names the unit it
belongs to, so the header's unit and views must be the unit's own (a tar of another unit copied
over this one is refused) and its arrays exactly the spec's, with the spec's dtypes and shapes. The
tar is read by fsutil.read_regular, no larger than a unit of this spec can be; only regular members
with the unit's own names are accepted; a blob's declared decompressed size must be the spec's before
it is decompressed.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import crc32c
import numpy as np
from numcodecs import Blosc

from . import schema as sc
from .base import (
    StoreReader,
    StoreWriter,
    blosc_sizes,
    max_blosc_bytes,
    parse_unit_name,
    read_own,
    unit_arrays,
    unit_name,
)
from .fsutil import atomic_write, listdir, read_if_exists
from .schema import UnitDamaged
from .spec import Flags, Problem, StoreCorrupt, StoreSpec

_BLOSC = Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE)


def init_layout(root: Path, spec: StoreSpec) -> None:
    """Nothing to allocate: units/ (made by create_store) fills up with one tar per unit."""


def _tar_bytes(key: str, header: dict, blobs: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    members = [(f"{key}.json", (json.dumps(header, sort_keys=True) + "\n").encode())]
    members += [(f"{key}.{name}.blosc", blob) for name, blob in sorted(blobs.items())]
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)  # mtime 0, uid 0, no owner names: deterministic bytes
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    # Drop tarfile's padding to a 10 KiB record: readers only need the two end-of-archive blocks,
    # and the padding would cost more than a small unit's labels.
    return buf.getvalue()[: tar.offset]


def _members(data: bytes, key: str, names: set[str]) -> dict[str, bytes]:
    """The tar's members by suffix (json, ids.blosc, ...): only regular files named key.<suffix>."""
    out = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar:
                suffix = m.name[len(key) + 1:] if m.name.startswith(key + ".") else None
                if m.type != tarfile.REGTYPE or suffix not in names or suffix in out:
                    raise UnitDamaged(f"holds a member {sc._short(m.name)} that a unit's tar never does")
                out[suffix] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UnitDamaged(f"is not a readable tar ({type(e).__name__}: {str(e)[:60]})") from None
    if set(out) != names:
        raise UnitDamaged(f"lacks {sorted(names - set(out))}")
    return out


class _WdsMixin:
    def _tar(self, shard, block) -> Path:
        return self.units_dir / f"{unit_name(shard, block)}.tar"

    def _unit_complete(self, shard, block) -> bool:
        return self._tar(shard, block).exists()

    def _complete_units(self):
        try:
            listed = listdir(self.units_dir)
        except (FileNotFoundError, NotADirectoryError):
            return set()
        names = (parse_unit_name(f) for f in listed if f.endswith(".tar") and f[0] != ".")
        spec = self.spec
        return {u for u in names if u is not None and u[0] < spec.num_shards and u[1] < spec.num_blocks}

    def _expected(self, block) -> dict[str, tuple[list[int], str]]:
        """name -> (shape, dtype) of each array of a unit in this view block, as the header must record it."""
        vb, cap = len(self.spec.block_views(block)), self.spec.capacity
        return {name: ([vb, cap, *tail], dtype) for name, (tail, dtype) in unit_arrays(self.spec).items()}

    def _load(self, shard, block, only: set[str] | None = None) -> dict[str, np.ndarray]:
        """The unit's arrays (or those in ``only``), every check of the module doc passed. Raises UnitDamaged."""
        key, expected = unit_name(shard, block), self._expected(block)
        raw = {name: int(np.prod(shape)) * np.dtype(dtype).itemsize for name, (shape, dtype) in expected.items()}
        limit = sum(max_blosc_bytes(n) + 1024 for n in raw.values()) + (64 << 10)  # + header and tar blocks
        try:
            data = read_own(self._tar(shard, block), limit, "")
        except FileNotFoundError:
            raise UnitDamaged("is not complete (its tar is gone)") from None
        except StoreCorrupt as e:
            raise UnitDamaged(f"is unreadable ({str(e).split('(', 1)[-1].split(')')[0]})") from None
        members = _members(data, key, {"json"} | {f"{name}.blosc" for name in expected})
        header = self._header(shard, block, members.pop("json"), expected)
        out = {}
        for name in expected if only is None else only:
            blob = members[f"{name}.blosc"]
            if crc32c.crc32c(blob) != header[name]["crc32c"]:
                raise UnitDamaged(f"{name} checksum mismatch")
            if blosc_sizes(blob) != (raw[name], len(blob)):
                raise UnitDamaged(f"{name} declares another size than the store's unit holds")
            buf = np.empty(raw[name], np.uint8)
            try:
                _BLOSC.decode(blob, out=buf)
            except Exception as e:  # noqa: BLE001 (any decoder failure is damage)
                raise UnitDamaged(f"{name} does not decode ({type(e).__name__})") from None
            shape, dtype = expected[name]
            out[name] = buf.view(dtype).reshape(shape)
        return out

    def _header(self, shard, block, raw_json: bytes, expected) -> dict:
        """The tar's header, checked: this unit's own, listing exactly the spec's arrays and shapes."""
        views = self.spec.block_views(block)
        try:
            header = sc.obj(json.loads(raw_json), "header")
            if sc.field(header, "unit", "header") != [shard, block]:
                raise sc.Invalid(f"it is the tar of unit {sc._short(header['unit'])} (copied here?)")
            if sc.field(header, "views", "header") != [views.start, views.stop]:
                raise sc.Invalid(f"it records views {sc._short(header['views'])}, the unit holds "
                                 f"{[views.start, views.stop]}")
            arrays = sc.obj(sc.field(header, "arrays", "header"), "header arrays")
            if set(arrays) != set(expected):
                raise sc.Invalid(f"it holds arrays {sorted(arrays)[:6]}, the store has {sorted(expected)}")
            for name, (shape, dtype) in expected.items():
                info = sc.obj(arrays[name], f"arrays.{name}")
                got = (sc.field(info, "shape", f"arrays.{name}"), sc.field(info, "dtype", f"arrays.{name}"))
                if got != (shape, dtype):
                    raise sc.Invalid(f"{name} is {sc._short(got)}, the store's spec says {(shape, dtype)}")
                sc.integer(sc.field(info, "crc32c", f"arrays.{name}"), f"arrays.{name}.crc32c", 0, 2**32 - 1)
        except (ValueError, RecursionError) as e:  # schema.Invalid is a ValueError too
            raise UnitDamaged(f"header does not prove the unit: {str(e)[:120]}") from None
        return arrays

    def _fix(self, shard, block) -> str:
        return "rerun precompute: it re-checks every complete unit and recomputes the damaged ones"


class WdsWriter(_WdsMixin, StoreWriter):
    backend = "wds"

    def _retract(self, shard, block):
        try:
            self._tar(shard, block).unlink(missing_ok=True)  # the tar is the unit: a damaged one goes
        except IsADirectoryError:  # a directory where the tar goes: not ours to delete
            raise StoreCorrupt(f"{self._tar(shard, block)} is a directory where the store keeps a unit's tar; "
                               "remove it and rerun precompute") from None

    def _write_unit(self, shard, block, values_enc, ids, valid, tail_lse=None):
        arrays = {"ids": ids, "valid": valid}
        if values_enc is not None:
            arrays["values"] = values_enc
        if tail_lse is not None:
            arrays["tail_lse"] = tail_lse
        blobs = {name: bytes(_BLOSC.encode(np.ascontiguousarray(a))) for name, a in arrays.items()}
        views = self.spec.block_views(block)
        header = {
            "unit": [shard, block],
            "views": [views.start, views.stop],
            "arrays": {
                name: {"dtype": a.dtype.name, "shape": list(a.shape), "crc32c": crc32c.crc32c(blobs[name])}
                for name, a in arrays.items()
            },
        }
        data = _tar_bytes(unit_name(shard, block), header, blobs)
        path = self._tar(shard, block)
        try:
            same = read_if_exists(path, len(data)) == data
        except OSError:  # a FIFO, a directory, a file too big where the tar goes: replaced below, or named
            same = False
        if same:
            return None  # same labels, same bytes: leave the file alone
        atomic_write(path, data)
        return path, data


class WdsReader(_WdsMixin, StoreReader):
    backend = "wds"

    def __init__(self, path):
        super().__init__(path)
        self._cache_key, self._cache = None, None  # the last decoded unit: read_slot loops stay cheap

    def _load_unit(self, shard, block):
        if self._cache_key != (shard, block):
            try:
                arrays = self._load(shard, block)
            except UnitDamaged as e:
                raise StoreCorrupt(f"store at {self.path}: unit (shard={shard}, view_block={block}) {e}; "
                                   f"{self._fix(shard, block)}") from None
            self._cache_key, self._cache = (shard, block), arrays
        return self._cache

    def _read_view_block(self, view, shards):
        block = self.spec.block_of(view)
        i = view - self.spec.block_views(block).start
        units = [self._load_unit(s, block) for s in shards]
        stack = lambda name: np.stack([u[name][i] for u in units]) if name in units[0] else None
        return stack("values"), stack("ids"), stack("valid"), stack("tail_lse")

    def _check_unit(self, shard, block, full):
        unit = (shard, block)
        try:
            arrays = self._load(shard, block)
        except UnitDamaged as e:
            return [Problem(unit, f"tar {e}; {self._fix(shard, block)}")]
        if not full:
            return []
        return self._check_decoded(shard, block, arrays.get("values"), arrays["ids"], arrays["valid"],
                                   arrays.get("tail_lse"))

    def _count_flags(self, units):
        out = Flags()
        for shard, block in sorted(units):
            try:  # decompress the valid member only, never the labels
                out.add(self._load(shard, block, only={"valid"})["valid"])
            except UnitDamaged:
                out.unreadable.append((shard, block))
        return out
