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
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import crc32c
import numpy as np
from numcodecs import Blosc

from .base import StoreReader, StoreWriter, parse_unit_name, unit_name
from .fsutil import atomic_write, read_if_exists
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


def _parse_tar(path: Path) -> tuple[dict, dict[str, bytes]]:
    with tarfile.open(path, mode="r") as tar:
        members = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    header = json.loads(members.pop("json"))
    return header, {name[: -len(".blosc")]: blob for name, blob in members.items()}


class _WdsMixin:
    def _tar(self, shard, block) -> Path:
        return self.units_dir / f"{unit_name(shard, block)}.tar"

    def _unit_complete(self, shard, block) -> bool:
        return self._tar(shard, block).exists()

    def _complete_units(self):
        if not self.units_dir.is_dir():
            return set()
        names = (parse_unit_name(f) for f in os.listdir(self.units_dir) if f.endswith(".tar") and f[0] != ".")
        return {u for u in names if u is not None}


class WdsWriter(_WdsMixin, StoreWriter):
    backend = "wds"

    def _retract(self, shard, block):
        self._tar(shard, block).unlink(missing_ok=True)  # the tar is the unit: a damaged one goes

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
        if read_if_exists(path) == data:
            return None  # same labels, same bytes: leave the file alone
        atomic_write(path, data)
        return path, data


class WdsReader(_WdsMixin, StoreReader):
    backend = "wds"

    def __init__(self, path):
        super().__init__(path)
        self._cache_key, self._cache = None, None  # the last decoded unit: read_slot loops stay cheap

    def _decode(self, header, blobs, verify: bool):
        out = {}
        for name, info in header["arrays"].items():
            blob = blobs[name]
            if verify and crc32c.crc32c(blob) != info["crc32c"]:
                raise ValueError(f"{name} checksum mismatch")
            out[name] = np.frombuffer(_BLOSC.decode(blob), dtype=info["dtype"]).reshape(info["shape"])
        return out

    def _load_unit(self, shard, block):
        if self._cache_key != (shard, block):
            try:
                header, blobs = _parse_tar(self._tar(shard, block))
                arrays = self._decode(header, blobs, verify=True)
            except Exception as e:
                raise StoreCorrupt(
                    f"store at {self.path}: unit (shard={shard}, view_block={block}) is unreadable "
                    f"({type(e).__name__}: {e}); delete units/{unit_name(shard, block)}.tar, rerun precompute"
                ) from None
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
        fix = f"delete units/{unit_name(shard, block)}.tar and rerun precompute"
        try:
            header, blobs = _parse_tar(self._tar(shard, block))
            arrays = self._decode(header, blobs, verify=True)
        except Exception as e:
            return [Problem(unit, f"tar unreadable or checksum mismatch ({type(e).__name__}: {e}); {fix}")]
        expected = ({"ids", "valid"} | ({"values"} if self.spec.mode == "topk" else set())
                    | ({"tail_lse"} if self.spec.taus else set()))
        if set(arrays) != expected:
            return [Problem(unit, f"tar holds arrays {sorted(arrays)}, expected {sorted(expected)}; {fix}")]
        vb, cap = len(self.spec.block_views(block)), self.spec.capacity
        for name, a in arrays.items():
            if a.shape[:2] != (vb, cap):
                return [Problem(unit, f"{name} has shape {a.shape}, expected ({vb}, {cap}, ...); {fix}")]
        if not full:
            return []
        return self._check_decoded(shard, block, arrays.get("values"), arrays["ids"], arrays["valid"],
                                   arrays.get("tail_lse"))

    def _count_flags(self, units):
        out = Flags()
        for shard, block in sorted(units):
            key = unit_name(shard, block)
            try:  # extract the header and the valid member only, never the labels
                with tarfile.open(self._tar(shard, block), mode="r") as tar:
                    header = json.loads(tar.extractfile(f"{key}.json").read())
                    blob = tar.extractfile(f"{key}.valid.blosc").read()
                info = header["arrays"]["valid"]
                if crc32c.crc32c(blob) != info["crc32c"]:
                    raise ValueError("valid checksum mismatch")
                out.add(np.frombuffer(_BLOSC.decode(blob), dtype=info["dtype"]))
            except Exception:
                out.unreadable.append((shard, block))
        return out
