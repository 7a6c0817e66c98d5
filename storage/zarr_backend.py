"""zarr v3 backend (the default).

    labels.zarr/ids      int16/int32 [V, S, cap, k] (topk) or [V, S, cap] (hard)
    labels.zarr/values   uint16 [V, S, cap, k]: float16 log-prob bit patterns, delta-coded along k
    labels.zarr/valid    uint8  [V, S, cap]
    labels.zarr/tail_lse float16 [V, S, cap, len(taus)]: only when the spec has taus (storage/soft.py)
    units/<shard>_<block>.json   completion marker: each chunk's key, size and crc32c

One chunk = one work unit, (views_per_unit, 1, cap, ...), so a unit writes whole chunks only and
two workers never touch the same chunk; shapes are allocated up front because only one process
may write zarr.json. zarr's LocalStore writes each chunk to a temporary and renames it, so a
chunk file is always whole; we then fsync the chunks, and only then atomically create the
marker. A reader trusts a unit only through its marker, so a writer killed at any moment leaves
the unit absent, never torn.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import crc32c
import numpy as np
import zarr
import zarr.codecs as zc

from .base import StoreReader, StoreWriter, parse_unit_name, unit_name
from .fsutil import atomic_write, disk_full, fsync_path, is_disk_full
from .spec import Flags, Problem, StoreCorrupt, StoreSpec

ARRAYS_DIR = "labels.zarr"


def _compressors():
    # Byte-shuffle beats bit-shuffle on real teacher outputs (ids 9.2 vs 12.5 bytes/view for
    # top-10, delta-coded values 12.2 vs 13.2; benchmarks/store_bench.py prints the ablation).
    # Crc32c lets zarr itself refuse a flipped byte.
    return [zc.BloscCodec(cname="zstd", clevel=5, shuffle=zc.BloscShuffle.shuffle), zc.Crc32cCodec()]


def _array_shapes(spec: StoreSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    base = (spec.views, spec.num_shards, spec.capacity)
    shapes = {"valid": (base, "uint8")}
    if spec.mode == "topk":
        shapes["ids"] = (base + (spec.k,), spec.id_dtype.name)
        shapes["values"] = (base + (spec.k,), "uint16")
    else:
        shapes["ids"] = (base, spec.id_dtype.name)
    if spec.taus:
        shapes["tail_lse"] = (base + (len(spec.taus),), "float16")
    return shapes


def init_arrays(root: Path, spec: StoreSpec) -> None:
    """Allocate every array at full size (called once, in the creating process's temp dir)."""
    group = zarr.open_group(str(root / ARRAYS_DIR), mode="w", zarr_format=3)
    for name, (shape, dtype) in _array_shapes(spec).items():
        chunks = (spec.views_per_unit, 1) + shape[2:]
        group.create_array(
            name,
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            fill_value=0,
            compressors=_compressors(),
            # always write a chunk, even all zeros, so that a missing chunk file means damage
            config={"write_empty_chunks": True},
            attributes={"encoding": "float16 bit patterns, first then deltas along k (mod 2^16)"}
            if name == "values"
            else {},
        )


class _ZarrMixin:
    layout = (ARRAYS_DIR,)
    # zarr v3: the group's and each array's zarr.json, chunks under <array>/c/<index>/<index>/...
    layout_files = (r"labels\.zarr(/zarr\.json)?", r"labels\.zarr/\w+(/zarr\.json|/c(/\d+)*)?")

    def _open_arrays(self, mode: str):
        root = str(self.path / ARRAYS_DIR)
        self._arrays = {}
        for name in _array_shapes(self.spec):
            try:
                # write_empty_chunks is a runtime setting, not stored: without it an all-zero chunk (a
                # unit whose argmax is class 0 everywhere) is silently not written and the unit is torn.
                arr = zarr.open_array(root, path=name, mode=mode).with_config({"write_empty_chunks": True})
            except Exception as e:  # a truncated or missing zarr.json: name it, not json's column number
                raise StoreCorrupt(
                    f"store at {self.path}: {ARRAYS_DIR}/{name}/zarr.json is unreadable ({type(e).__name__}); "
                    "the store's array metadata is damaged: recreate the store (precompute --overwrite)"
                ) from None
            self._arrays[name] = arr

    def _marker(self, shard, block) -> Path:
        return self.units_dir / f"{unit_name(shard, block)}.json"

    def _unit_complete(self, shard, block) -> bool:
        return self._marker(shard, block).exists()

    def _complete_units(self):
        if not self.units_dir.is_dir():
            return set()
        files = [f for f in os.listdir(self.units_dir) if f.endswith(".json") and f[0] != "."]
        names = (parse_unit_name(f) for f in files)
        return {u for u in names if u is not None}

    def _chunk_path(self, name: str, shard: int, block: int) -> Path:
        arr = self._arrays[name]
        key = arr.metadata.encode_chunk_key((block, shard) + (0,) * (arr.ndim - 2))
        return self.path / ARRAYS_DIR / name / key

    def _unit_selection(self, shard, block):
        views = self.spec.block_views(block)
        return (slice(views.start, views.stop), slice(shard, shard + 1))

    def _read_unit(self, shard, block):
        sel = self._unit_selection(shard, block)
        return {name: arr[sel][:, 0] for name, arr in self._arrays.items()}


class ZarrWriter(_ZarrMixin, StoreWriter):
    backend = "zarr"

    def __init__(self, path):
        super().__init__(path)
        self._open_arrays("r+")

    def _retract(self, shard, block):
        self._marker(shard, block).unlink(missing_ok=True)  # two fleets may retract the same unit
        fsync_path(self.units_dir)

    def _write_unit(self, shard, block, values_enc, ids, valid, tail_lse=None):
        new = {"ids": ids, "valid": valid}
        if values_enc is not None:
            new["values"] = values_enc
        if tail_lse is not None:
            new["tail_lse"] = tail_lse
        marker = self._marker(shard, block)
        if marker.exists():
            old = self._read_unit(shard, block)
            if all(np.array_equal(old[k], v) for k, v in new.items()):
                return None  # same labels: touch nothing, so the bytes stay identical
            # Different labels (a non-deterministic teacher): retract the unit first, so that a
            # crash mid-rewrite leaves it absent rather than half old, half new.
            os.unlink(marker)
            fsync_path(self.units_dir)
        sel = self._unit_selection(shard, block)
        try:
            for name, data in new.items():
                self._arrays[name][sel] = data[:, None]
        except OSError as e:
            if is_disk_full(e):
                raise disk_full(self.path / ARRAYS_DIR) from None
            raise
        chunks = {}
        for name in sorted(new):
            p = self._chunk_path(name, shard, block)
            data = p.read_bytes()
            fsync_path(p)
            fsync_path(p.parent)  # the chunk's rename into place
            key = str(p.relative_to(self.path))
            chunks[name] = {"key": key, "nbytes": len(data), "crc32c": crc32c.crc32c(data)}
        views = self.spec.block_views(block)
        record = {"unit": [shard, block], "views": [views.start, views.stop], "chunks": chunks}
        self.check_generation()  # the chunks took a while: is this still the store we opened?
        self.units_dir.mkdir(exist_ok=True)
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
        atomic_write(marker, data)
        return marker, data


class ZarrReader(_ZarrMixin, StoreReader):
    """cache_bytes: reading a whole view decodes every chunk of its block (views_per_unit views)
    anyway, so the reader keeps the decoded block when it fits this budget and serves the block's
    other views from memory: epochs e, e+1, ... then cost one decode per block, not per view."""

    backend = "zarr"

    def __init__(self, path, cache_bytes: int = 2 << 30):
        super().__init__(path)
        self._open_arrays("r")
        self.cache_bytes = cache_bytes
        self._block_key, self._block = None, None

    def _read_view_block(self, view, shards):
        block = self.spec.block_of(view)
        every = len(shards) == self.spec.num_shards
        if every and self._block_key == block:
            i = view - self.spec.block_views(block).start
            return tuple(None if a is None else a[i] for a in self._block)
        for s in shards:  # zarr reads a missing chunk as zeros: refuse instead of inventing labels
            for name in self._arrays:
                if not self._chunk_path(name, s, block).exists():
                    raise StoreCorrupt(
                        f"store at {self.path}: unit (shard={s}, view_block={block}) lost its {name} chunk; "
                        f"delete units/{unit_name(s, block)}.json and rerun precompute"
                    )
        views = self.spec.block_views(block)
        per_view = sum(int(np.prod(a.shape[1:])) * a.dtype.itemsize for a in self._arrays.values())
        whole_block = every and per_view * len(views) <= self.cache_bytes
        out = {}
        for name, arr in self._arrays.items():
            try:
                if whole_block:
                    out[name] = arr[views.start : views.stop]
                else:
                    out[name] = arr[view] if every else np.stack([arr[view, s] for s in shards])
            except Exception as e:  # crc32c mismatch or undecodable chunk
                raise StoreCorrupt(
                    f"store at {self.path}: view {view} of shards {shards[0]}..{shards[-1]} does not decode "
                    f"({type(e).__name__}: {e}); `verify STORE --full` names the unit, rerunning precompute heals it"
                ) from None
        result = out.get("values"), out["ids"], out["valid"], out.get("tail_lse")
        if whole_block:
            self._block_key, self._block = block, result
            return tuple(None if a is None else a[view - views.start] for a in result)
        return result

    def _check_unit(self, shard, block, full):
        unit = (shard, block)
        fix = f"delete units/{unit_name(shard, block)}.json and rerun precompute"
        try:
            record = json.loads(self._marker(shard, block).read_text())
            chunks = record["chunks"]
        except (ValueError, KeyError, OSError) as e:
            return [Problem(unit, f"completion marker unreadable ({e}); {fix}")]
        problems = []
        for name in self._arrays:
            if name not in chunks:
                problems.append(Problem(unit, f"marker lists no {name} chunk; {fix}"))
                continue
            p = self.path / chunks[name]["key"]
            try:
                data = p.read_bytes()
            except FileNotFoundError:
                problems.append(Problem(unit, f"{name} chunk missing ({chunks[name]['key']}); {fix}"))
                continue
            if len(data) != chunks[name]["nbytes"] or crc32c.crc32c(data) != chunks[name]["crc32c"]:
                what = f"{name} chunk checksum mismatch ({chunks[name]['key']}); {fix}"
                problems.append(Problem(unit, what))
        if problems or not full:
            return problems
        try:
            arrays = self._read_unit(shard, block)
        except Exception as e:
            return [Problem(unit, f"chunks do not decode ({type(e).__name__}); {fix}")]
        return self._check_decoded(shard, block, arrays.get("values"), arrays["ids"], arrays["valid"],
                                   arrays.get("tail_lse"))

    def _count_flags(self, units):
        spec, out, arr = self.spec, Flags(), self._arrays["valid"]
        for block in range(spec.num_blocks):
            shards = [s for s in range(spec.num_shards) if (s, block) in units]
            # zarr reads a missing chunk as zeros, which would count as neither written nor invalid
            lost = [s for s in shards if not self._chunk_path("valid", s, block).exists()]
            out.unreadable += [(s, block) for s in lost]
            shards = [s for s in shards if s not in lost]
            if not shards:
                continue
            vs = spec.block_views(block)
            try:
                flags = arr[vs.start:vs.stop]  # one read of the whole block: every shard's chunk at once
            except Exception:  # a damaged chunk (crc32c mismatch, undecodable): shard by shard, to name it
                for s in shards:
                    try:
                        out.add(arr[vs.start:vs.stop, s])
                    except Exception:
                        out.unreadable.append((s, block))
                continue
            out.add(flags[:, shards])
        return out

def grow_arrays(root: Path, old: StoreSpec, new: StoreSpec) -> None:
    """Resize every array from old.views to new.views along the view axis (store growth, see
    api.grow_store). Chunks of the views already there are untouched; zarr.json then reads as a store
    made with new.views from the start (same shape, same chunking)."""
    if new.views < old.views:
        raise ValueError("zarr arrays only grow here")
    group = zarr.open_group(str(root / ARRAYS_DIR), mode="r+", zarr_format=3)
    for name, (shape, _) in _array_shapes(new).items():
        group[name].resize(shape)
