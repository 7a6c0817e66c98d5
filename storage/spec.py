"""What a label store holds (StoreSpec), what it returns (Labels), and how it fails (errors).

Everything here is plain data: the spec is fixed when a store is created, written into the
store as JSON, and compared field by field whenever the store is reopened, so that a resumed
or second fleet can never mix labels made under different settings.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields

import numpy as np

from . import schema as sc
from .errors import UserError

MODES = ("topk", "hard")

# Validity flags, one uint8 per (view, shard, slot).
PADDING = 0  # never written, or a slot beyond the shard's size
WRITTEN = 1  # a teacher label is stored
INVALID = 2  # the image could not be decoded; train skips it


class StoreError(UserError):
    """A label store cannot do what was asked. Messages are one line: cause, where, and the fix."""


class StoreMismatch(StoreError):
    """The store on disk was made with a different spec than the caller's."""


class StoreCorrupt(StoreError):
    """Bytes on disk do not match what the store recorded when it wrote them."""


def id_dtype(num_classes: int) -> np.dtype:
    """Class ids fit int16 for up to 32767 classes (ImageNet-21k needs int32)."""
    return np.dtype(np.int16) if num_classes <= 32767 else np.dtype(np.int32)


def _canon(x):
    """JSON-normalise a value (tuples -> lists, sorted keys) so that equal specs compare equal."""
    return json.loads(json.dumps(x, sort_keys=True))



def shard_starts(shard_sizes) -> np.ndarray:
    """int64 [num_shards]: the row of each shard's first sample when the shards lie end to end in shard
    order, as a manifest's samples (sorted by shard, position) and a view read flat do."""
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


@dataclass(frozen=True)
class StoreSpec:
    mode: str  # "topk" or "hard"
    k: int  # top-k size (0 in hard mode)
    num_classes: int
    class_names: tuple[str, ...]
    views: int  # V
    shard_sizes: tuple[int, ...]  # samples per shard, in shard order (capacity = max)
    views_per_unit: int  # a work unit = (shard, block of views_per_unit consecutive views)
    recipe: dict = field(default_factory=dict)  # the augmentation recipe as data
    seed: int = 0
    manifest_fingerprint: str = ""
    # {"name", "fingerprint"}: the sha256 of what decides the labels (architecture, weights sha256, model
    # kwargs, input size, mean, std); the full identity sits in meta (storage.meta.TEACHER_IDENTITY)
    teacher: dict = field(default_factory=dict)
    # Temperatures whose tempered tail mass is stored per view (top-k mode): for each tau, the
    # float16 logsumexp over the classes outside the top-k of l_j / tau (l = log_softmax(z)), which
    # makes soft targets at that tau exact in their top-k weights and their tail mass (storage/soft.py).
    taus: tuple[float, ...] = ()

    def __post_init__(self):
        # Normalise containers so that a spec read back from JSON equals the one written.
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "shard_sizes", tuple(int(n) for n in self.shard_sizes))
        object.__setattr__(self, "recipe", _canon(dict(self.recipe)))
        object.__setattr__(self, "teacher", _canon(dict(self.teacher)))
        # sorted and de-duplicated: `--tau 3 --tau 1` and `--tau 1 --tau 3` make the same store
        object.__setattr__(self, "taus", tuple(sorted({float(t) for t in self.taus})))
        self._validate()

    def _validate(self):
        def bad(what):
            raise StoreError(f"invalid StoreSpec: {what}")

        if self.mode not in MODES:
            bad(f"mode={self.mode!r}, expected one of {MODES}")
        if self.num_classes < 1:
            bad(f"num_classes={self.num_classes} must be >= 1")
        if self.mode == "topk" and not 1 <= self.k <= self.num_classes:
            bad(f"k={self.k} must be in [1, num_classes={self.num_classes}] in topk mode")
        if self.mode == "hard" and self.k != 0:
            bad(f"k={self.k} must be 0 in hard mode")
        if self.class_names and len(self.class_names) != self.num_classes:
            bad(f"{len(self.class_names)} class_names for num_classes={self.num_classes} (give all or none)")
        if self.views < 1 or self.views_per_unit < 1:
            bad(f"views={self.views} and views_per_unit={self.views_per_unit} must be >= 1")
        if self.taus and self.mode != "topk":
            bad(f"taus={list(self.taus)} need topk mode (a hard store has no distribution to temper)")
        if any(not (math.isfinite(t) and t > 0) for t in self.taus):
            bad(f"taus={list(self.taus)} must be finite and > 0")
        if not self.shard_sizes or min(self.shard_sizes) < 0 or max(self.shard_sizes) < 1:
            bad(f"shard_sizes must be non-negative with at least one sample, got {self.shard_sizes[:8]}")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return len(self.shard_sizes)

    @property
    def capacity(self) -> int:
        return max(self.shard_sizes)

    @property
    def shard_starts(self) -> np.ndarray:
        return shard_starts(self.shard_sizes)

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.views / self.views_per_unit)

    @property
    def id_dtype(self) -> np.dtype:
        return id_dtype(self.num_classes)

    def block_views(self, block: int) -> range:
        """Views held by a view block; the last block may be shorter."""
        v0 = block * self.views_per_unit
        return range(v0, min(self.views, v0 + self.views_per_unit))

    def block_of(self, view: int) -> int:
        return view // self.views_per_unit

    def units(self) -> list[tuple[int, int]]:
        """All work units (shard, view_block), shard-major."""
        return [(s, b) for s in range(self.num_shards) for b in range(self.num_blocks)]

    def unit_views(self, unit: tuple[int, int]) -> int:
        """Stored views in a unit (shard, view_block): the block's views times the shard's samples."""
        shard, block = unit
        return len(self.block_views(block)) * self.shard_sizes[shard]

    def views_in(self, units) -> int:
        """Stored views in these units (all of the store's: ``views_in(spec.units())``)."""
        return sum(self.unit_views(u) for u in units)

    def tau_index(self, tau: float) -> int | None:
        """Column of tail_lse holding temperature tau (within float rounding), or None if not stored."""
        for i, t in enumerate(self.taus):
            if math.isclose(t, tau, rel_tol=1e-6):
                return i
        return None

    def check_unit(self, shard: int, block: int):
        if not (0 <= shard < self.num_shards and 0 <= block < self.num_blocks):
            raise StoreError(
                f"unit (shard={shard}, view_block={block}) is outside the store "
                f"({self.num_shards} shards x {self.num_blocks} view blocks)"
            )

    def check_view(self, view: int, shard: int | None = None):
        if not 0 <= view < self.views:
            raise StoreError(f"view {view} is outside the store (views 0..{self.views - 1})")
        if shard is not None and not 0 <= shard < self.num_shards:
            raise StoreError(f"shard {shard} is outside the store (shards 0..{self.num_shards - 1})")

    # ---- JSON ----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return _canon({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_json(cls, d) -> StoreSpec:
        """The spec a store.json holds, every field checked for type and range first (schema.Invalid
        names the field): nothing is derived from a value before it is known to be sane."""
        d = sc.obj(d, "spec")
        get = lambda key: sc.field(d, key, "spec")
        num_classes = sc.integer(get("num_classes"), "spec.num_classes", 1, sc.MAX_CLASSES)
        spec = dict(
            mode=sc.choice(get("mode"), "spec.mode", MODES),
            k=sc.integer(get("k"), "spec.k", 0, num_classes),
            num_classes=num_classes,
            class_names=sc.array(get("class_names"), "spec.class_names", num_classes,
                                 lambda v, n: sc.text(v, n, printable=False)),
            views=sc.integer(get("views"), "spec.views", 1, sc.MAX_VIEWS),
            shard_sizes=sc.array(get("shard_sizes"), "spec.shard_sizes", sc.MAX_SHARDS,
                                 lambda v, n: sc.integer(v, n, 0, sc.MAX_SHARD_SIZE), min_len=1),
            views_per_unit=sc.integer(get("views_per_unit"), "spec.views_per_unit", 1, sc.MAX_VIEWS),
            recipe=sc.obj(get("recipe"), "spec.recipe"),
            seed=sc.integer(get("seed"), "spec.seed", 0, sc.MAX_SEED),
            manifest_fingerprint=sc.text(get("manifest_fingerprint"), "spec.manifest_fingerprint", 128),
            teacher=sc.obj(get("teacher"), "spec.teacher"),
            taus=sc.array(get("taus"), "spec.taus", 64, lambda v, n: sc.number(v, n, 5e-324, 1.7e308)),
        )
        try:
            return cls(**spec)
        except StoreError as e:  # consistent types, inconsistent values (k > num_classes in hard mode...)
            raise sc.Invalid(str(e).removeprefix("invalid StoreSpec: ")) from None

    def first_difference(self, other: StoreSpec) -> tuple[str, object, object] | None:
        """(field, mine, theirs) for the first differing field, descending into dicts, else None."""
        for f in fields(self):
            a, b = _canon(getattr(self, f.name)), _canon(getattr(other, f.name))
            if a == b:
                continue
            name = f.name
            if isinstance(a, dict) and isinstance(b, dict):  # name the first differing key: recipe.mixup
                for key in sorted(set(a) | set(b)):
                    if a.get(key, "<absent>") != b.get(key, "<absent>"):
                        return f"{name}.{key}", a.get(key, "<absent>"), b.get(key, "<absent>")
            return name, a, b
        return None


def _short(x, limit: int = 60) -> str:
    s = json.dumps(x, sort_keys=True) if not isinstance(x, str) else x
    return s if len(s) <= limit else s[: limit - 3] + "..."


def mismatch_error(path, on_disk: StoreSpec, asked: StoreSpec, fix: str) -> StoreMismatch | None:
    diff = on_disk.first_difference(asked)
    if diff is None:
        return None
    name, have, want = diff
    return StoreMismatch(
        f"store at {path} was made with {name}={_short(have)}, you asked for {name}={_short(want)}; {fix}"
    )


@dataclass
class Labels:
    """Labels of consecutive slots: topk values/ids are [n, k], hard ids are [n]."""

    values: np.ndarray | None  # float16 log-probabilities [n, k], sorted descending; None in hard mode
    ids: np.ndarray  # int16/int32 class ids, [n, k] or [n]
    valid: np.ndarray  # uint8 [n]: WRITTEN, INVALID or PADDING
    # float16 [n, len(spec.taus)]: logsumexp over the non-top-k classes of l_j / tau, one column per
    # spec.taus entry; None when the store keeps no temperatures
    tail_lse: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.valid)

    def __getitem__(self, idx) -> Labels:
        pick = lambda a: None if a is None else a[idx]
        return Labels(pick(self.values), self.ids[idx], self.valid[idx], pick(self.tail_lse))

    @staticmethod
    def concat(parts: list[Labels]) -> Labels:
        def cat(name):
            return None if getattr(parts[0], name) is None else np.concatenate([getattr(p, name) for p in parts])

        return Labels(cat("values"), cat("ids"), cat("valid"), cat("tail_lse"))


@dataclass(frozen=True)
class Problem:
    """One thing check() found wrong; unit is (shard, view_block), or None for store-wide problems."""

    unit: tuple[int, int] | None
    what: str

    def __str__(self) -> str:
        where = "store" if self.unit is None else f"unit (shard={self.unit[0]}, view_block={self.unit[1]})"
        return f"{where}: {self.what}"


@dataclass
class Flags:
    """What StoreReader.count_flags found: written and invalid views over the units it read, and the
    units whose flags did not decode or failed their checksum (named, not counted)."""

    written: int = 0
    invalid: int = 0
    unreadable: list[tuple[int, int]] = field(default_factory=list)

    def add(self, valid: np.ndarray) -> None:
        counts = np.bincount(np.asarray(valid, np.uint8).ravel(), minlength=3)
        self.written += int(counts[WRITTEN])
        self.invalid += int(counts[INVALID])
