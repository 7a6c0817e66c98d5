"""zarr v3 backend (the default).

    labels.zarr/ids      int16/int32 [V, S, cap, k] (topk) or [V, S, cap] (hard)
    labels.zarr/values   uint16 [V, S, cap, k]: float16 log-prob bit patterns, delta-coded along k
    labels.zarr/valid    uint8  [V, S, cap]
    labels.zarr/tail_lse float16 [V, S, cap, len(taus)]: only when the spec has taus (storage/soft.py)
    units/<shard>_<block>.json   completion marker: the unit, its views, and per chunk its key, size
                                 and data_crc32c (see below)

One chunk = one work unit, (views_per_unit, 1, cap, ...), so a unit writes whole chunks only and
two workers never touch the same chunk; shapes are allocated up front because only one process
may write zarr.json. zarr's LocalStore writes each chunk to a temporary and renames it, so a
chunk file is always whole; we then fsync the chunks, and only then atomically create the
marker. A reader trusts a unit only through its marker, so a writer killed at any moment leaves
the unit absent, never torn.

What a marker proves: ``data_crc32c`` is the crc32c of the chunk's bytes before the 4-byte
checksum zarr's crc32c codec appends (which is that same number). The crc32c of a whole chunk,
what markers recorded before, is the CRC residue, one constant for every chunk: it told a chunk of
another unit, copied over this one, from the right one not at all. A marker's chunk key must equal
the key the spec derives for the unit (compared, never opened as given), and its unit and views
must be the unit's own. Every read of labels (read, read_view, read_slot, the block cache), check()
and precompute's resume check the chunk against its marker; the reader decodes a chunk itself
(blosc, after checking the declared size against the spec's chunk shape) from bytes read by
fsutil.read_regular, so a FIFO, a device or a symlink in a chunk's place is refused unread.
A marker without data_crc32c (written before this check existed) proves nothing: its unit is
reported damaged, and a resumed precompute recomputes it (DESIGN.md, "The label store").
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import crc32c
import numpy as np
import zarr
import zarr.codecs as zc
from numcodecs import Blosc

from . import schema as sc
from .base import (
    RECORD_LIMIT,
    StoreReader,
    StoreWriter,
    blosc_sizes,
    max_blosc_bytes,
    parse_unit_name,
    read_own,
    read_own_json,
    unit_arrays,
    unit_name,
)
from .bucket import ObjPath, object_errors, zarr_store
from .fsutil import atomic_write, disk_full, fsync_path, is_disk_full, lexists, listdir, read_regular, unlink
from .schema import UnitDamaged
from .spec import Flags, Problem, StoreCorrupt, StoreSpec

ARRAYS_DIR = "labels.zarr"


def _compressors():
    # Byte-shuffle beats bit-shuffle on real teacher outputs (ids 9.2 vs 12.5 bytes/view for
    # top-10, delta-coded values 12.2 vs 13.2; benchmarks/store_bench.py prints the ablation).
    # Crc32c lets zarr itself refuse a flipped byte.
    return [zc.BloscCodec(cname="zstd", clevel=5, shuffle=zc.BloscShuffle.shuffle), zc.Crc32cCodec()]


def _array_shapes(spec: StoreSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    base = (spec.views, spec.num_shards, spec.capacity)
    return {name: (base + tail, dtype) for name, (tail, dtype) in unit_arrays(spec).items()}


def _zarr_target(path):
    """What zarr opens: a local folder's name, or zarr's ObjectStore for a prefix in a bucket."""
    return zarr_store(path) if isinstance(path, ObjPath) else str(path)


def init_arrays(root: Path, spec: StoreSpec) -> None:
    """Allocate every array at full size (called once, in the creating process's temp dir)."""
    group = zarr.open_group(_zarr_target(root / ARRAYS_DIR), mode="w", zarr_format=3)
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


CONTENT = "data_crc32c"  # the marker field that identifies a chunk's content (module doc)
ZARR_JSON_LIMIT = 1 << 20


def chunk_key(name: str, shape_len: int, shard: int, block: int) -> str:
    """Where zarr (default v3 chunk key encoding, checked in zarr.json) keeps a unit's chunk of array name."""
    return "/".join([ARRAYS_DIR, name, "c", str(block), str(shard)] + ["0"] * (shape_len - 2))


def view_nbytes(spec: StoreSpec) -> int:
    """Decoded bytes of one view of every shard (every array, capacity slots a shard): what the reader's
    cache holds per view. Top-10 over 21,841 classes (int16 ids) is 41 bytes a slot: ~0.55 GiB at 14M."""
    return sum(int(np.prod(shape[2:])) * np.dtype(dtype).itemsize  # [cap, ...]: a shard of one view
               for shape, dtype in _array_shapes(spec).values()) * spec.num_shards


MIN_CACHE_BYTES = 2 << 30  # the label cache's floor: what any machine that trains can spare a rank


def machine_memory() -> int:
    """This machine's memory in bytes, or its container's limit where that is lower (cgroup v2, then v1)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def label_cache_bytes(spec: StoreSpec, *, memory: int | None = None, local_ranks: int | None = None) -> int:
    """The reader's default cache budget: a whole block of views (``views_per_unit`` of them), so each block
    is decoded once per pass of its views, where a quarter of this machine's memory, shared by the ranks
    torchrun starts on it (``LOCAL_WORLD_SIZE``), holds one; else that quarter; never under 2 GiB.
    At 14M samples (top-10, 21,841 classes) a block of 10 views is 5.4 GiB: one rank of a 24 GiB machine
    holds it (6 GiB), as does each of 8 ranks on a 256 GiB node; 8 ranks on 64 GiB get 2 GiB each and
    decode a block 4 times per 10 epochs."""
    block = spec.views_per_unit * view_nbytes(spec)
    memory = machine_memory() if memory is None else memory
    if local_ranks is None:
        text = os.environ.get("LOCAL_WORLD_SIZE", "1")
        local_ranks = int(text) if text.isdigit() and int(text) > 0 else 1
    return max(MIN_CACHE_BYTES, min(block, memory // (4 * local_ranks)))


def _max_chunk_bytes(raw: int) -> int:
    """A chunk is a blosc frame of its raw bytes plus zarr's 4-byte checksum."""
    return max_blosc_bytes(raw) + 4


class _ZarrMixin:
    layout = (ARRAYS_DIR,)
    # zarr v3: the group's and each array's zarr.json, chunks under <array>/c/<index>/<index>/...
    layout_files = (r"labels\.zarr(/zarr\.json)?", r"labels\.zarr/\w+(/zarr\.json|/c(/\d+)*)?")

    def _check_array_metadata(self) -> None:
        """Each array's zarr.json must describe what init_arrays made for this spec (shape, chunks, dtype,
        codecs), read as a regular file: a store.json and arrays that disagree are a damaged store, found
        before any chunk is read or any buffer sized."""
        for name, (shape, dtype) in _array_shapes(self.spec).items():
            path = self.path / ARRAYS_DIR / name / "zarr.json"
            fix = "the store's array metadata is damaged: recreate the store (precompute --overwrite)"
            try:
                meta = read_own_json(path, ZARR_JSON_LIMIT, fix)
            except FileNotFoundError:
                raise StoreCorrupt(f"{path} is missing; {fix}") from None
            if isinstance(meta, dict) and isinstance(meta.get("shape"), list) and meta["shape"][1:] == list(shape[1:]) \
                    and isinstance(meta["shape"][0], int) and meta["shape"][0] >= shape[0]:
                # grow_store resizes the arrays before it rewrites store.json: one opened in between sees more
                # views in the arrays than in the spec, which is authoritative (views past it are never read)
                shape = (meta["shape"][0], *shape[1:])
            want = {"shape": list(shape), "data_type": dtype, "zarr_format": 3, "node_type": "array",
                    "chunk_grid": {"name": "regular",
                                   "configuration": {"chunk_shape": [self.spec.views_per_unit, 1, *shape[2:]]}},
                    "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}}}
            if not isinstance(meta, dict):
                raise StoreCorrupt(f"{path} is not a JSON object; {fix}")
            for key, value in want.items():
                if meta.get(key) != value:
                    raise StoreCorrupt(f"{path}: {key} is {sc._short(meta.get(key), 60)}, the store's spec "
                                       f"(store.json) says {sc._short(value, 60)}; {fix}")
            codecs = meta.get("codecs")
            names = [c.get("name") for c in codecs if isinstance(c, dict)] if isinstance(codecs, list) else None
            endian = (codecs[0].get("configuration") or {}).get("endian", "little") if names else None
            if names != ["bytes", "blosc", "crc32c"] or endian != "little":
                raise StoreCorrupt(f"{path}: codecs {sc._short(codecs, 60)} are not the store's "
                                   f"(bytes little-endian, blosc, crc32c); {fix}")

    def _marker(self, shard, block) -> Path:
        return self.units_dir / f"{unit_name(shard, block)}.json"

    def _unit_complete(self, shard, block) -> bool:
        return self._marker(shard, block).exists()

    def _complete_units(self):
        try:
            files = [f for f in listdir(self.units_dir) if f.endswith(".json") and f[0] != "."]
        except (FileNotFoundError, NotADirectoryError):
            return set()
        names = (parse_unit_name(f) for f in files)
        return {u for u in names if u is not None and self._in_spec(u)}

    def _in_spec(self, unit) -> bool:
        return 0 <= unit[0] < self.spec.num_shards and 0 <= unit[1] < self.spec.num_blocks

    def _chunk_key(self, name: str, shard: int, block: int) -> str:
        return chunk_key(name, len(_array_shapes(self.spec)[name][0]), shard, block)

    def _chunk_path(self, name: str, shard: int, block: int) -> Path:
        return self.path / self._chunk_key(name, shard, block)

    def _chunk_raw(self, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
        """(chunk shape, little-endian dtype, raw bytes) of one chunk of array name."""
        shape, dtype = _array_shapes(self.spec)[name]
        chunk = (self.spec.views_per_unit, 1) + tuple(shape[2:])
        dt = np.dtype(dtype).newbyteorder("<")
        return chunk, dt, int(np.prod(chunk)) * dt.itemsize

    def _fix(self, shard, block) -> str:
        return "rerun precompute: it re-checks every complete unit and recomputes the damaged ones"

    def _record(self, shard: int, block: int) -> dict:
        """The unit's marker, checked: its unit and views are the unit's own, it lists exactly the spec's
        arrays, each with the key the spec derives (compared, never used as a path), a size a chunk can
        have and the data_crc32c that identifies its content. Raises UnitDamaged."""
        path = self._marker(shard, block)
        try:
            record = json.loads(read_regular(path, RECORD_LIMIT))
        except FileNotFoundError:
            raise UnitDamaged("is not complete (its marker is gone)") from None
        except OSError as e:
            raise UnitDamaged(f"completion marker {path.name} unreadable ({e.strerror or e})") from None
        except (ValueError, RecursionError) as e:
            raise UnitDamaged(f"completion marker {path.name} is not valid JSON ({str(e)[:60]})") from None
        views = self.spec.block_views(block)
        try:
            sc.obj(record, "marker")
            if sc.field(record, "unit", "marker") != [shard, block]:
                raise sc.Invalid(f"it is the marker of unit {sc._short(record['unit'])} (copied here?)")
            if sc.field(record, "views", "marker") != [views.start, views.stop]:
                raise sc.Invalid(f"it records views {sc._short(record['views'])}, the unit holds "
                                 f"{[views.start, views.stop]}")
            chunks = sc.obj(sc.field(record, "chunks", "marker"), "marker chunks")
            want = set(_array_shapes(self.spec))
            if set(chunks) != want:
                raise sc.Invalid(f"it lists chunks {sorted(chunks)[:6]}, the store has {sorted(want)}")
            for name in sorted(want):
                c = sc.obj(chunks[name], f"chunks.{name}")
                if sc.field(c, "key", f"chunks.{name}") != self._chunk_key(name, shard, block):
                    raise sc.Invalid(f"chunks.{name}.key is {sc._short(c['key'])}, not the unit's chunk "
                                     f"{self._chunk_key(name, shard, block)}")
                sc.integer(sc.field(c, "nbytes", f"chunks.{name}"), f"chunks.{name}.nbytes", 20,
                           _max_chunk_bytes(self._chunk_raw(name)[2]))
                if CONTENT not in c:
                    raise sc.Invalid("it was written by an older deit-lockstep and does not identify its "
                                     "chunks' content (no data_crc32c)")
                sc.integer(c[CONTENT], f"chunks.{name}.{CONTENT}", 0, 2**32 - 1)
        except sc.Invalid as e:
            raise UnitDamaged(f"completion marker {path.name} does not prove the unit: {e}") from None
        return chunks

    def _verified_chunk(self, name: str, shard: int, block: int, info: dict) -> np.ndarray:
        """One chunk read as a regular file and decoded by us, [views of the block, cap, ...]: its bytes must
        be the ones the marker identifies and declare the size the spec gives the chunk. Raises UnitDamaged."""
        key = info["key"]
        try:
            data = read_own(self.path / key, info["nbytes"], "")
        except FileNotFoundError:
            raise UnitDamaged(f"{name} chunk missing ({key})") from None
        except StoreCorrupt as e:
            raise UnitDamaged(f"{name} chunk {key} is unreadable ({str(e).split('(', 1)[-1].split(')')[0]})") from None
        body = data[:-4]
        crc = crc32c.crc32c(body)
        if len(data) != info["nbytes"] or crc != info[CONTENT] or data[-4:] != crc.to_bytes(4, "little"):
            raise UnitDamaged(f"{name} chunk {key} is not the chunk its marker recorded (checksum mismatch: "
                              "damaged, or another unit's chunk)")
        chunk, dt, raw = self._chunk_raw(name)
        if blosc_sizes(body) != (raw, len(body)):
            raise UnitDamaged(f"{name} chunk {key} declares another size than the store's chunks")
        out = np.empty(raw, np.uint8)
        try:
            Blosc().decode(body, out=out)
        except Exception as e:  # noqa: BLE001 (any decoder failure is damage)
            raise UnitDamaged(f"{name} chunk {key} does not decode ({type(e).__name__})") from None
        nv = len(self.spec.block_views(block))
        return out.view(dt).reshape(chunk)[:nv, 0].astype(dt.newbyteorder("="), copy=False)

    def _load_unit(self, shard: int, block: int) -> dict[str, np.ndarray]:
        """Every array of one complete unit, checked against its marker. Raises UnitDamaged."""
        record = self._record(shard, block)
        return {name: self._verified_chunk(name, shard, block, record[name]) for name in _array_shapes(self.spec)}


class ZarrWriter(_ZarrMixin, StoreWriter):
    backend = "zarr"

    def __init__(self, path):
        super().__init__(path)
        self._check_array_metadata()
        self._arrays = {}
        for name in _array_shapes(self.spec):
            # write_empty_chunks is a runtime setting, not stored: without it an all-zero chunk (a
            # unit whose argmax is class 0 everywhere) is silently not written and the unit is torn.
            with object_errors(self.path / ARRAYS_DIR / name):
                arr = zarr.open_array(_zarr_target(self.path / ARRAYS_DIR), path=name, mode="r+")
            self._arrays[name] = arr.with_config({"write_empty_chunks": True})

    def _retract(self, shard, block):
        self._unlink_marker(self._marker(shard, block))  # two fleets may retract the same unit

    def _write_unit(self, shard, block, values_enc, ids, valid, tail_lse=None):
        new = {"ids": ids, "valid": valid}
        if values_enc is not None:
            new["values"] = values_enc
        if tail_lse is not None:
            new["tail_lse"] = tail_lse
        marker = self._marker(shard, block)
        if lexists(marker):
            try:
                old = self._load_unit(shard, block)
                same = all(np.array_equal(old[k], v) for k, v in new.items())
            except UnitDamaged:
                same = False
            if same:
                return None  # same labels, proven by the marker: touch nothing, so the bytes stay identical
            # Different labels (a non-deterministic teacher) or a damaged unit: retract it first, so that a
            # crash mid-rewrite leaves it absent rather than half old, half new.
            self._unlink_marker(marker)
        sel = (slice(self.spec.block_views(block).start, self.spec.block_views(block).stop), slice(shard, shard + 1))
        try:
            for name, data in new.items():
                with object_errors(self._chunk_path(name, shard, block)):
                    self._arrays[name][sel] = data[:, None]
        except OSError as e:
            if is_disk_full(e):
                raise disk_full(self.path / ARRAYS_DIR) from None
            raise
        chunks = {}
        for name in sorted(new):
            p = self._chunk_path(name, shard, block)
            data = read_own(p, None, "rerun precompute")
            fsync_path(p)
            fsync_path(p.parent)  # the chunk's rename into place
            content = crc32c.crc32c(data[:-4])
            # "crc32c" (of the whole chunk, always the same residue) stays for deit-lockstep versions before
            # data_crc32c, which read it; this one checks data_crc32c.
            chunks[name] = {"key": self._chunk_key(name, shard, block), "nbytes": len(data),
                            "crc32c": crc32c.crc32c(data), CONTENT: content}
        views = self.spec.block_views(block)
        record = {"unit": [shard, block], "views": [views.start, views.stop], "chunks": chunks}
        self.check_generation()  # the chunks took a while: is this still the store we opened?
        self.units_dir.mkdir(exist_ok=True)
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
        atomic_write(marker, data)
        return marker, data

    def _unlink_marker(self, marker: Path) -> None:
        try:
            unlink(marker)
        except IsADirectoryError:  # a directory where the marker goes: not ours to delete
            raise StoreCorrupt(f"{marker} is a directory where the store keeps a unit's marker; remove it and "
                               "rerun precompute") from None
        except FileNotFoundError:
            pass
        fsync_path(self.units_dir)


class ZarrReader(_ZarrMixin, StoreReader):
    """A cache of decoded views, keyed by view and bounded by ``cache_bytes`` (default ``label_cache_bytes``:
    a block where the machine can spare it, else at least 2 GiB).

    A chunk holds a unit's views_per_unit views and decodes whole, so reading one view of all shards
    decodes its whole block. The reader keeps, of what it decoded, the views from the one asked for
    on to the block's end (the views the next epochs read: epoch e reads view e mod V), as many as
    fit the budget, least recently read evicted first. A block is thus decoded once per
    ceil(views_per_unit / views_that_fit) of its views, not once per epoch; once per block when the
    budget holds a block (``cache_bytes >= views_per_unit * view_nbytes()``). A view larger than the
    budget is not kept (every read of it decodes its block). Each view is its own array, so the bytes
    counted are the bytes held: the cache never holds more than ``cache_bytes``. Only chunks checked
    against their markers enter the cache."""

    backend = "zarr"

    def __init__(self, path, cache_bytes: int | None = None):
        super().__init__(path)
        self._check_array_metadata()
        self.cache_bytes = label_cache_bytes(self.spec) if cache_bytes is None else cache_bytes
        self._views: OrderedDict[int, tuple] = OrderedDict()  # view -> (values, ids, valid, tail), each [S, cap, ...]

    def view_nbytes(self) -> int:
        return view_nbytes(self.spec)

    def cached_bytes(self) -> int:
        return sum(a.nbytes for arrays in self._views.values() for a in arrays if a is not None)

    def _unit_or_raise(self, shard: int, block: int) -> dict[str, np.ndarray]:
        try:
            return self._load_unit(shard, block)
        except UnitDamaged as e:
            raise StoreCorrupt(f"store at {self.path}: unit (shard={shard}, view_block={block}) {e}; "
                               f"{self._fix(shard, block)}") from None

    def _read_view_block(self, view, shards):
        if view in self._views:
            self._views.move_to_end(view)
            arrays = self._views[view]
            if len(shards) == self.spec.num_shards:
                return arrays
            return tuple(None if a is None else a[shards] for a in arrays)
        block = self.spec.block_of(view)
        views = self.spec.block_views(block)
        fit = self.cache_bytes // max(self.view_nbytes(), 1) if len(shards) == self.spec.num_shards else 0
        keep = range(view, min(views.stop, view + max(fit, 1)))  # this view, then the next ones that fit
        out: dict[int, dict[str, np.ndarray]] = {v: {} for v in keep}
        for k, s in enumerate(shards):
            for name, a in self._unit_or_raise(s, block).items():  # one unit decoded at a time
                for v in keep:
                    if name not in out[v]:
                        out[v][name] = np.empty((len(shards),) + a.shape[1:], a.dtype)
                    out[v][name][k] = a[v - views.start]
        result = {v: (o.get("values"), o["ids"], o["valid"], o.get("tail_lse")) for v, o in out.items()}
        if fit >= 1:
            while self._views and self.cached_bytes() + len(keep) * self.view_nbytes() > self.cache_bytes:
                self._views.popitem(last=False)
            for v in reversed(keep):  # the asked-for view last: the most recently read
                self._views[v] = result[v]
        return result[view]

    def _check_unit(self, shard, block, full):
        unit = (shard, block)
        try:
            arrays = self._load_unit(shard, block)
        except UnitDamaged as e:
            return [Problem(unit, f"{e}; {self._fix(shard, block)}")]
        if not full:
            return []
        return self._check_decoded(shard, block, arrays.get("values"), arrays["ids"], arrays["valid"],
                                   arrays.get("tail_lse"))

    def _count_flags(self, units):
        out = Flags()
        for shard, block in sorted(units):
            try:  # the valid chunk alone, checked against the marker like every read
                out.add(self._verified_chunk("valid", shard, block, self._record(shard, block)["valid"]))
            except UnitDamaged:
                out.unreadable.append((shard, block))
        return out


def grow_arrays(root: Path, old: StoreSpec, new: StoreSpec) -> None:
    """Resize every array from old.views to new.views along the view axis (store growth, see
    api.grow_store). Chunks of the views already there are untouched; zarr.json then reads as a store
    made with new.views from the start (same shape, same chunking)."""
    if new.views < old.views:
        raise ValueError("zarr arrays only grow here")
    with object_errors(root / ARRAYS_DIR):  # on a bucket: its one-line errors, as a chunk write's
        group = zarr.open_group(_zarr_target(root / ARRAYS_DIR), mode="r+", zarr_format=3)
        for name, (shape, _) in _array_shapes(new).items():
            group[name].resize(shape)
