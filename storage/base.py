"""What both backends share: the store directory, its metadata, input checks, and the read paths.

Layout of a store directory (both backends):

    store.json          format name and version, backend, spec, library versions, creation meta
    manifest.parquet    the source manifest, byte for byte as given
    meta/<key>.json     set_meta(key, value): probes, versions, anything added after creation
    units/              one completion record per finished unit (the backend decides its form)

A backend subclass implements how a unit's arrays are written and found again: the abstract
methods below (_unit_complete, _complete_units; the writer's _write_unit, _retract; the reader's
_read_view_block, _check_unit, _count_flags). Nothing outside storage/ knows a backend's files:
adding a backend means a module here, an entry in api.BACKENDS, and its case in the conformance
tests (tests/test_storage.py).

store.json holds a ``generation``, a random id drawn when the store is created. A writer checks,
before and after every commit, that store.json still holds the generation it opened: a store
deleted or rebuilt under it (``precompute --overwrite`` while another precompute still runs) stops
the old writer with one line instead of letting it commit labels of other settings into the new
store; a commit that raced the rebuild is taken back.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from importlib import metadata as importlib_metadata
from pathlib import Path

import crc32c
import numpy as np

from . import schema as sc
from .bucket import BucketError, ObjPath, as_path
from .encoding import decode_values, encode_values, pad_slots
from .fsutil import atomic_write, read_if_exists, read_regular
from .meta import PROBES, SOFT_ERROR, VERSIONS
from .spec import INVALID, WRITTEN, Flags, Labels, Problem, StoreCorrupt, StoreError, StoreSpec

FORMAT = "deit-lockstep-labels"
# 2: repeated augmentation laid out in windows (views.slot_order), so slot -> sample differs from 1;
#    optional tail_lse array (StoreSpec.taus); a generation id in store.json; the manifest records each
#    sample's size and crc32c and the shard layout.
FORMAT_VERSION = 2
STORE_JSON = "store.json"
MANIFEST = "manifest.parquet"
MANIFEST_CRC = "manifest_crc32c"  # in store.json since issue 20; stores made before have none (not checked)

# The most a store's own small files can hold: store.json (its spec lists every class name: 4M names of
# ~16 bytes), a meta/*.json (probe hashes, teacher identity, soft-error sums), a marker or a lease.
STORE_JSON_LIMIT = 128 << 20
META_LIMIT = 64 << 20
RECORD_LIMIT = 1 << 20

_VERSIONED = ("numpy", "zarr", "numcodecs", "webdataset", "crc32c", "torch", "timm", "pillow")


def library_versions() -> dict:
    """Versions of the libraries a label depends on, read without importing them (torch is slow)."""
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def unit_name(shard: int, block: int) -> str:
    return f"{shard:06d}_{block:04d}"


def parse_unit_name(name: str) -> tuple[int, int] | None:
    stem = name.split(".", 1)[0]
    parts = stem.split("_")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1])


def read_own(path: Path, limit: int | None, fix: str) -> bytes:
    """A file the store wrote itself, read with fsutil.read_regular (never blocking, never following a
    link, never beyond limit bytes): FileNotFoundError passes through, anything else is StoreCorrupt,
    one line naming the file and the fix."""
    try:
        return read_regular(path, limit)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise StoreCorrupt(f"{path} is unreadable ({e.strerror or e}); {fix}") from None


def read_own_json(path: Path, limit: int, fix: str):
    """read_own, then JSON: a truncated or garbled file is named, not just json's line and column."""
    data = read_own(path, limit, fix)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: [[[[... nested beyond the parser's depth
        raise StoreCorrupt(f"{path} is not valid JSON ({str(e)[:80]}); {fix}") from None


def read_store_json(path: Path) -> dict:
    """store.json, checked: a JSON object of our format and version whose every field has the type and
    range the store writes (schema.py). Any other content is one line naming store.json."""
    path = as_path(path)
    damaged = "the store is damaged, recreate it (precompute --overwrite)"
    try:
        d = read_own_json(path / STORE_JSON, STORE_JSON_LIMIT, damaged)
    except FileNotFoundError:
        raise StoreError(
            f"{path} is not a label store (no {STORE_JSON}); check the path, or create one with precompute"
        ) from None
    except NotADirectoryError:
        raise StoreError(f"{path} is not a label store (it is a file); check the path") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        fmt = d.get("format") if isinstance(d, dict) else d
        raise StoreError(f"{path / STORE_JSON} holds {sc._short(fmt)}, not a {FORMAT} store; check the path")
    version = d.get("format_version")
    if isinstance(version, int) and version < FORMAT_VERSION:
        # Its labels belong to another slot layout: replaying them would pair views with wrong labels.
        raise StoreError(
            f"store at {path} has format version {version}, older than this code's {FORMAT_VERSION} "
            "(its views are laid out differently); re-run precompute into a new --out"
        )
    if version != FORMAT_VERSION:
        raise StoreError(
            f"store at {path} has format version {sc._short(version)}, this code reads "
            f"{FORMAT_VERSION}; use the deit-lockstep version that wrote it, or recompute"
        )
    try:
        sc.text(sc.field(d, "backend", "store.json"), "backend", 64)
        sc.text(sc.field(d, "generation", "store.json"), "generation", 128)
        StoreSpec.from_json(sc.field(d, "spec", "store.json"))
        if MANIFEST_CRC in d:
            sc.integer(d[MANIFEST_CRC], MANIFEST_CRC, 0, 2**32 - 1)
        sc.obj(d.get("versions", {}), "versions")
        sc.obj(d.get("meta", {}), "meta")
    except sc.Invalid as e:
        raise StoreCorrupt(f"{path / STORE_JSON}: {e}; {damaged}") from None
    return d


def _read_or_none(path: Path, limit: int) -> bytes | None:
    """A file's bytes to compare with what a writer is about to write; None when absent or not a readable
    regular file (a FIFO, a directory, too big): then it is replaced, or the replace names it."""
    try:
        return read_if_exists(path, limit)
    except OSError:
        return None


def unit_arrays(spec: StoreSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """The arrays a unit holds, as each backend stores them: name -> (shape after the (views, slots) axes,
    dtype name). What a backend finds on disk must match this exactly before anything is decoded."""
    out = {"valid": ((), "uint8")}
    if spec.mode == "topk":
        out["ids"] = ((spec.k,), spec.id_dtype.name)
        out["values"] = ((spec.k,), "uint16")
    else:
        out["ids"] = ((), spec.id_dtype.name)
    if spec.taus:
        out["tail_lse"] = ((len(spec.taus),), "float16")
    return out


def blosc_sizes(blob: bytes) -> tuple[int, int]:
    """(decompressed, compressed) sizes a blosc frame declares in its 16-byte header: checked against what
    the spec says a unit's array holds before a byte is decompressed (a lying header cannot size a buffer)."""
    if len(blob) < 16:
        return -1, -1
    return int.from_bytes(blob[4:8], "little"), int.from_bytes(blob[12:16], "little")


def max_blosc_bytes(raw: int) -> int:
    """The most a blosc frame of raw bytes can take: the raw bytes (incompressible) plus its overheads."""
    return raw + raw // 16 + 1024


class StoreReplaced(StoreError):
    """The store a writer opened was deleted or rebuilt by another process while it wrote."""


def store_generation(path: Path) -> str | None:
    """The generation id in path/store.json now; None when there is no readable store.json. A bucket that
    does not answer (or refuses us) raises its BucketError: that is not a store deleted or rebuilt, and
    StoreReplaced would send the user after another process that never was."""
    try:
        return json.loads(read_regular(as_path(path) / STORE_JSON, STORE_JSON_LIMIT)).get("generation")
    except BucketError:
        raise
    except (OSError, ValueError, AttributeError, RecursionError):
        return None


def store_json_bytes(spec: StoreSpec, backend: str, meta: dict | None, generation: str = "",
                     manifest: bytes | None = None) -> bytes:
    d = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "generation": generation,
        "backend": backend,
        "spec": spec.to_json(),
        "versions": library_versions(),
        "meta": meta or {},
    }
    if manifest is not None:  # read back by manifest_bytes: a damaged manifest.parquet is named, not parsed
        d[MANIFEST_CRC] = crc32c.crc32c(manifest)
    return (json.dumps(d, indent=1, sort_keys=True) + "\n").encode()


class _StoreBase(ABC):
    """Opened store directory: spec and metadata, plus the unit bookkeeping both roles need."""

    backend = ""
    layout: tuple[str, ...] = ()  # the backend's own top-level names in a store directory, beside units/
    layout_files: tuple[str, ...] = ()  # regexes of every path under those names (what --overwrite may delete)

    def __init__(self, path: Path):
        self.path = as_path(path)  # a pathlib.Path, or an ObjPath for a store on a bucket (storage/bucket.py)
        self._json = read_store_json(self.path)
        self.spec = StoreSpec.from_json(self._json["spec"])
        self.generation = self._json.get("generation")
        self.units_dir = self.path / "units"

    def units(self) -> list[tuple[int, int]]:
        return self.spec.units()

    def is_complete(self, shard: int, view_block: int) -> bool:
        self.spec.check_unit(shard, view_block)
        return self._unit_complete(shard, view_block)

    def completed_units(self) -> list[tuple[int, int]]:
        return sorted(self._complete_units())

    # backend hooks
    @abstractmethod
    def _unit_complete(self, shard: int, block: int) -> bool:
        """Each backend implements this."""

    @abstractmethod
    def _complete_units(self) -> set[tuple[int, int]]:
        """Each backend implements this."""


class StoreWriter(_StoreBase):
    """Commits whole work units; safe to use from many processes on disjoint or identical units."""

    def check_generation(self) -> None:
        """Raise StoreReplaced unless path/store.json still holds the generation this writer opened."""
        if store_generation(self.path) != self.generation:
            raise StoreReplaced(
                f"store at {self.path} was deleted, grown or rebuilt by another process (precompute --overwrite, "
                "or --views with more views?) while "
                "this one was writing it; this process stopped without committing more units: rerun precompute "
                "to resume the store that is there now"
            )

    def set_meta(self, key: str, value) -> None:
        """Extra JSON metadata (probe hashes, versions...). Written atomically to meta/<key>.json.

        Equal metadata already there is left alone: resuming a complete (even read-only) store writes nothing."""
        if not key.replace("_", "").replace("-", "").isalnum():
            raise StoreError(f"meta key {key!r} must be alphanumeric (with - or _), it names a file")
        data = (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()
        path = self.path / "meta" / f"{key}.json"
        if _read_or_none(path, META_LIMIT) == data:
            return
        self.check_generation()
        (self.path / "meta").mkdir(exist_ok=True)
        atomic_write(path, data)

    def write_unit(self, shard: int, view_block: int, *, values, ids, valid, tail_lse=None) -> None:
        """Store one unit: arrays in slot order shaped [views_in_block, shard_size, ...].

        tail_lse: float16 [views_in_block, shard_size, len(spec.taus)] when the spec has taus (see
        storage.soft.tail_logsumexp), else None.

        Visible to readers only once every byte is durable; rewriting a complete unit with the
        same inputs changes nothing on disk.
        """
        spec = self.spec
        spec.check_unit(shard, view_block)
        vb, n = len(spec.block_views(view_block)), spec.shard_sizes[shard]
        where = f"unit (shard={shard}, view_block={view_block})"
        valid = np.asarray(valid)
        if valid.shape != (vb, n):
            raise StoreError(
                f"{where}: valid has shape {valid.shape}, expected {(vb, n)} (views, shard_size)"
            )
        if not np.isin(valid, (WRITTEN, INVALID)).all():
            raise StoreError(f"{where}: valid must be 1 (written) or 2 (invalid image) for every slot")
        valid = valid.astype(np.uint8)
        bad = valid != WRITTEN  # zero whatever the caller put in invalid slots: bytes depend on labels only
        ids = np.asarray(ids)
        id_shape = (vb, n, spec.k) if spec.mode == "topk" else (vb, n)
        if ids.shape != id_shape:
            raise StoreError(f"{where}: ids has shape {ids.shape}, expected {id_shape} in {spec.mode} mode")
        if ids.size and (ids[~bad].min(initial=0) < 0 or ids[~bad].max(initial=0) >= spec.num_classes):
            raise StoreError(f"{where}: class ids outside [0, {spec.num_classes}); check num_classes")
        ids = ids.astype(spec.id_dtype)
        ids[bad] = 0
        enc = None
        if spec.mode == "topk":
            if values is None or np.shape(values) != id_shape:
                raise StoreError(f"{where}: values must have shape {id_shape}, got {np.shape(values)}")
            values = np.asarray(values)
            if values.dtype != np.float16:
                raise StoreError(f"{where}: values must be float16 log-probabilities, got {values.dtype}")
            values = values.copy()
            values[bad] = 0
            if values.size and not (values <= 0).all():
                raise StoreError(
                    f"{where}: values must be log-probabilities (<= 0), not raw logits; "
                    "use storage.soft.topk_logprobs"
                )
            if not (np.diff(values.astype(np.float32), axis=-1) <= 0).all():
                raise StoreError(f"{where}: values must be sorted descending along k (topk sorted=True)")
            enc = pad_slots(encode_values(values), spec.capacity)
        elif values is not None:
            raise StoreError(f"{where}: values must be None in hard mode")
        tail = None
        if spec.taus:
            want = (vb, n, len(spec.taus))
            if tail_lse is None or np.shape(tail_lse) != want or np.asarray(tail_lse).dtype != np.float16:
                got = None if tail_lse is None else (np.shape(tail_lse), np.asarray(tail_lse).dtype.name)
                raise StoreError(f"{where}: the store keeps taus {list(spec.taus)}: tail_lse must be float16 "
                                 f"{want}, got {got}; use storage.soft.tail_logsumexp")
            tail = np.asarray(tail_lse).copy()
            tail[bad] = 0
            # -inf is legitimate (k = C: no tail; or a tail that underflowed), NaN and +inf are not
            if np.isnan(tail).any() or np.isposinf(tail).any():
                raise StoreError(f"{where}: tail_lse holds NaN or +inf; recompute it from finite logits")
            tail = pad_slots(tail, spec.capacity)
        elif tail_lse is not None:
            raise StoreError(f"{where}: tail_lse given but the store keeps no taus (create it with taus)")
        cap = spec.capacity
        self.check_generation()
        committed = self._write_unit(shard, view_block, enc, pad_slots(ids, cap), pad_slots(valid, cap), tail)
        if committed is not None and store_generation(self.path) != self.generation:
            # Rebuilt between our last check and the commit: our record may sit in the new store. Take it
            # back (only if it is still ours, byte for byte), then stop.
            record, data = committed
            if _read_or_none(record, RECORD_LIMIT + len(data)) == data:
                record.unlink(missing_ok=True)
            self.check_generation()

    def retract(self, shard: int, view_block: int) -> None:
        """Mark a unit not complete (found damaged): readers stop trusting it, precompute redoes it."""
        self.spec.check_unit(shard, view_block)
        self.check_generation()
        self._retract(shard, view_block)

    @abstractmethod
    def _write_unit(self, shard, block, values_enc, ids, valid, tail_lse) -> tuple[Path, bytes] | None:
        """Each backend implements this: commit the unit, and return its completion record's path and
        bytes (None when the unit was already there with these labels and nothing was written)."""

    @abstractmethod
    def _retract(self, shard, block) -> None:
        """Each backend implements this."""


class StoreReader(_StoreBase):
    """Reads labels by (view, shard, slot); refuses units that are not complete."""

    @property
    def meta(self) -> dict:
        """store.json's creation meta merged with meta/<key>.json; a damaged entry is one line naming its file
        (each must be a JSON object: what set_meta writes for every key in storage.meta)."""
        out = dict(self._json.get("meta", {}))
        meta_dir = self.path / "meta"
        if meta_dir.is_dir():
            fix = "the store's metadata is damaged: delete that file and rerun precompute (it rewrites it)"
            for p in sorted(meta_dir.glob("*.json")):
                if p.name.startswith("."):
                    continue
                try:
                    out[p.stem] = self._checked_meta(p.stem, read_own_json(p, META_LIMIT, fix))
                except FileNotFoundError:
                    continue  # rewritten by a precompute between the listing and the read
                except sc.Invalid as e:
                    raise StoreCorrupt(f"{p}: {e}; {fix}") from None
        return out

    def _checked_meta(self, key: str, value) -> dict:
        """A meta entry checked against what precompute writes under its key (storage.meta): every entry
        is an object; probe keys name a (view, shard, slot) inside the store, versions are strings."""
        value = sc.obj(value, key)
        spec = self.spec
        if key == PROBES:
            for name, digest in value.items():
                parts = name.split("/")
                if len(parts) != 3 or not all(p.isdigit() and len(p) < 12 for p in parts):
                    raise sc.Invalid(f"probe {sc._short(name)} is not view/shard/slot")
                view, shard, slot = (int(p) for p in parts)
                sc.integer(view, f"probe {name}: view", 0, spec.views - 1)
                sc.integer(shard, f"probe {name}: shard", 0, spec.num_shards - 1)
                sc.integer(slot, f"probe {name}: slot", 0, max(spec.shard_sizes[shard] - 1, 0))
                sc.text(digest, f"probes[{name!r}]", 128)
        elif key == VERSIONS:
            for name, version in value.items():
                if version is not None:
                    sc.text(version, f"versions[{sc._short(name)}]", 256)
        elif key.startswith(SOFT_ERROR):
            for name, sums in value.items():
                sc.array(sums, f"{key}[{sc._short(name)}]", 3, lambda v, n: sc.number(v, n, 0, 1.7e308), 3)
        return value

    @property
    def versions(self) -> dict:
        return dict(self._json.get("versions", {}))

    @property
    def manifest_bytes(self) -> bytes:
        """manifest.parquet's bytes, read only if it is a regular file (its size has no bound we know)."""
        fix = "the store is damaged, recreate it (precompute --overwrite)"
        try:
            data = read_own(self.path / MANIFEST, None, fix)
        except FileNotFoundError:
            raise StoreCorrupt(f"{self.path / MANIFEST} is missing; {fix}") from None
        want = self._json.get(MANIFEST_CRC)
        if want is not None and crc32c.crc32c(data) != want:
            raise StoreCorrupt(f"{self.path / MANIFEST} is not the manifest the store was made with (its crc32c "
                               f"differs from the one {STORE_JSON} records); {fix}")
        return data

    def _require(self, shard: int, block: int):
        if not self._unit_complete(shard, block):
            raise StoreError(
                f"store at {self.path}: unit (shard={shard}, view_block={block}) is not complete; "
                "run precompute (it resumes) before reading it"
            )

    def _labels(self, values_enc, ids, valid, tail, n: int) -> Labels:
        values = None if values_enc is None else decode_values(values_enc[:n])
        return Labels(values, ids[:n], valid[:n], None if tail is None else tail[:n])

    def read(self, view: int, shard: int) -> Labels:
        """One view of one shard, in slot order (length = the shard's size)."""
        self.spec.check_view(view, shard)
        block = self.spec.block_of(view)
        self._require(shard, block)
        values_enc, ids, valid, tail = self._read_view_block(view, [shard])
        first = lambda a: None if a is None else a[0]
        return self._labels(first(values_enc), ids[0], valid[0], first(tail), self.spec.shard_sizes[shard])

    def read_view(self, view: int) -> Iterator[tuple[int, Labels]]:
        """(shard, Labels) for every shard of one view, in shard order: one epoch's labels."""
        self.spec.check_view(view)
        block = self.spec.block_of(view)
        shards = list(range(self.spec.num_shards))
        for s in shards:
            self._require(s, block)
        values_enc, ids, valid, tail = self._read_view_block(view, shards)
        at = lambda a, s: None if a is None else a[s]
        for s in shards:
            yield s, self._labels(at(values_enc, s), ids[s], valid[s], at(tail, s), self.spec.shard_sizes[s])

    def read_view_flat(self, view: int) -> Labels:
        """A whole view as one Labels, shards concatenated in order (shard s starts at row
        ``spec.shard_starts[s]``)."""
        return Labels.concat([lab for _, lab in self.read_view(view)])

    def read_slot(self, view: int, shard: int, slot: int) -> Labels:
        n = self.spec.shard_sizes[shard] if 0 <= shard < self.spec.num_shards else 0
        if not 0 <= slot < n:
            raise StoreError(f"slot {slot} is outside shard {shard} (size {n})")
        return self.read(view, shard)[slot : slot + 1]

    def check(self, full: bool = True) -> list[Problem]:
        """Integrity scan of every complete unit; full=True also decodes and checks values and flags."""
        problems = []
        for shard, block in self.completed_units():
            problems += self._check_unit(shard, block, full)
        return problems

    def check_units(self, units, full: bool = False) -> list[Problem]:
        """check() of the given units only (train checks the units its epochs read, precompute its own)."""
        return [p for shard, block in units for p in self._check_unit(shard, block, full)]

    def _check_decoded(self, shard, block, values_enc, ids, valid, tail=None) -> list[Problem]:
        """Flags and value checks on one decoded unit ([views, capacity, ...] arrays)."""
        spec, unit, out = self.spec, (shard, block), []
        n = spec.shard_sizes[shard]
        if not np.isin(valid[:, :n], (WRITTEN, INVALID)).all():
            out.append(Problem(unit, "valid flags other than 1/2 inside the shard"))
        if (valid[:, n:] != 0).any():
            out.append(Problem(unit, "valid flags set on padding slots beyond the shard size"))
        if ids.size and (ids.min() < 0 or ids.max() >= spec.num_classes):
            out.append(Problem(unit, f"class ids outside [0, {spec.num_classes})"))
        if values_enc is not None:
            v = decode_values(values_enc).astype(np.float32)
            if not (np.isfinite(v).all() and (v <= 0).all() and (np.diff(v, axis=-1) <= 0).all()):
                out.append(Problem(unit, "values are not sorted, finite log-probabilities"))
        if self.spec.taus:
            if tail is None or tail.shape[-1] != len(self.spec.taus):
                out.append(Problem(unit, f"no tail_lse for the store's taus {list(self.spec.taus)}"))
            elif np.isnan(tail).any() or np.isposinf(tail).any():
                out.append(Problem(unit, "tail_lse holds NaN or +inf"))
        return out

    def count_flags(self, units=None) -> Flags:
        """Written and invalid views over the given complete units (default: every complete unit).

        Reads only the validity flags, the smallest array (one byte per view), so that counting
        invalid views exactly stays cheap on a store of any size. A unit whose flags fail their
        checksum, do not decode or are missing is named in ``unreadable`` and not counted.
        """
        units = self._complete_units() if units is None else set(units)
        for shard, block in units:
            self.spec.check_unit(shard, block)
        flags = self._count_flags(set(units))
        flags.unreadable.sort()
        return flags

    def nbytes(self) -> int:
        """Bytes on disk under the store directory (or in the objects under its prefix)."""
        if isinstance(self.path, ObjPath):
            return sum(o["size"] for o in self.path.walk_objects())
        total = 0
        for root, _, files in os.walk(self.path):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(root, f))
                except FileNotFoundError:  # a concurrent writer's temporary vanished
                    pass
        return total

    # backend hook -> (values_enc or None [len(shards), cap, k], ids [len(shards), cap, ...],
    #                  valid [len(shards), cap], tail_lse or None [len(shards), cap, len(taus)])
    @abstractmethod
    def _read_view_block(self, view: int, shards: list[int]):
        """Each backend implements this."""

    @abstractmethod
    def _check_unit(self, shard, block, full) -> list[Problem]:
        """Each backend implements this."""

    @abstractmethod
    def _count_flags(self, units: set[tuple[int, int]]) -> Flags:
        """Each backend implements this: count_flags over these (checked) units, reading the flags alone."""
