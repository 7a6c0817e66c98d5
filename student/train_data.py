"""What a run trains on: the source, recipe, seed and label store, opened and checked against each other.

``open_train_data`` takes the sample table from the store's manifest when the source's stamps hold
(``pipeline.sources.unchanged_source``; else it indexes names only), refuses another source, recipe or
seed than the store's, and re-renders the store's probe views; ``check_complete`` refuses a store that
lacks a unit the run will read, before the first step. The loader (``student.loader``) and evaluation
data (``student.eval_data``) take a ``TrainData``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.recipes import Recipe, create_recipe, parse_overrides
from pipeline.sources import (
    Manifest,
    index_source,
    layout_for_store,
    stored_manifest,
    unchanged_source,
)
from pipeline.views import ViewRenderer
from storage import open_store
from storage.errors import printable

from .errors import TrainError
from .stream import STREAM_GROUP_SHARDS, window_slots


# ---- what a run trains on ------------------------------------------------------------------
@dataclass
class TrainData:
    """The source, recipe, seed and label store of a run, checked against each other."""

    manifest: Manifest
    recipe: Recipe
    seed: int
    reader: object | None = None  # a storage reader, or None for plain training
    labels_path: str | None = None

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def views(self) -> int | None:
        """V of the store; None without one (each epoch is then a new view)."""
        return None if self.reader is None else self.reader.spec.views

    def view_of(self, epoch: int) -> int:
        return epoch if self.reader is None else epoch % self.reader.spec.views

    def identity(self) -> dict:
        """What a checkpoint must match on resume: the source, and the store (if any)."""
        # The stream layout (views.epoch_stream) decides which views each step trains on.
        out = {"source": self.manifest.fingerprint, "store": None,
               "stream": {"group_shards": STREAM_GROUP_SHARDS, "window_slots": window_slots(self.recipe.repeats)}}
        if self.reader is not None:
            out["store"] = self.reader.spec.to_json()
        return out


def open_train_data(data: str, *, labels: str | None = None, recipe: str | None = None,
                    overrides: list[str] | tuple[str, ...] = (), seed: int | None = None,
                    input_size: int | None = None, shard_size: int = 1024,
                    check_probes: bool = True, repeats: int | None = None, shards: str = "auto") -> TrainData:
    """Index ``data`` and, with ``labels``, check it against the store: same source, same recipe
    and seed (taken from the store), views that still render the same. Raises TrainError.

    ``shards`` is the shard layout (``index_source``); with ``labels``, "auto" means the store's."""
    overrides = list(overrides) + ([f"input_size={input_size}"] if input_size is not None else [])
    overrides += [f"repeats={repeats}"] if repeats is not None else []  # --repeats R: recipe.repeats
    if labels is None:
        r = create_recipe(recipe or "deit", overrides)
        seed = 0 if seed is None else seed
        return TrainData(index_source(data, shard_size=shard_size, seed=seed, shards=shards, checksums=False),
                         r, seed)

    reader = open_store(labels)
    spec = reader.spec
    stored = stored_manifest(reader)
    # An ImageFolder's virtual shards depend on the shard size and seed it was indexed with.
    # Names and labels only (no full read of the source at every start); reads check content below.
    layout, wrong_layout = layout_for_store(shards, stored, labels)
    if wrong_layout:
        raise TrainError(wrong_layout)
    # The stored manifest where each source file's stamp holds (no re-index at start), else indexed again.
    manifest = unchanged_source(stored, data) or index_source(
        data, shard_size=stored.shard_size or shard_size, seed=stored.seed, shards=layout, checksums=False)
    if manifest.fingerprint != spec.manifest_fingerprint:
        raise TrainError(f"--data {data} is not the source the store {labels} was made from: "
                         f"{_manifest_difference(manifest, stored)}; point --data at that source")
    manifest = manifest.with_checksums_of(stored)  # each read checks the bytes the teacher labelled
    if spec.num_classes != manifest.num_classes:
        raise TrainError(f"store {labels} has {spec.num_classes} classes, --data {data} has "
                         f"{manifest.num_classes}; recompute the store for this source")
    store_recipe = Recipe.from_dict(spec.recipe)
    if recipe is not None or overrides:
        have = store_recipe.to_dict()
        # --set alone adjusts the store's recipe; --recipe names a whole preset to compare with.
        base = {} if recipe is not None else {k: v for k, v in have.items() if k != "name"}
        asked = create_recipe(recipe or store_recipe.name, {**base, **parse_overrides(overrides)}).to_dict()
        diff = next((k for k in have if have[k] != asked[k]), None)
        if diff is not None:
            raise TrainError(f"recipe.{diff}={asked[diff]} on the command line, but the store {labels} "
                             f"was made with recipe.{diff}={have[diff]}; with --labels the recipe comes "
                             "from the store: drop --recipe/--set/--input-size/--repeats")
    if seed is not None and seed != spec.seed:
        raise TrainError(f"--seed {seed}, but the store {labels} was made with seed={spec.seed}; with "
                         "--labels the seed comes from the store: drop --seed")
    out = TrainData(manifest, store_recipe, spec.seed, reader, labels)
    if check_probes:
        check_probe_drift(out)
    return out


def _manifest_difference(mine: Manifest, stored: Manifest) -> str:
    """The first thing that tells two manifests apart, in words."""
    def counts(m):
        return f"{m.num_samples} samples in {len(m.shards)} shards, {m.num_classes} classes"
    if (mine.num_samples, len(mine.shards), mine.num_classes) != (stored.num_samples, len(stored.shards),
                                                                  stored.num_classes):
        return f"it has {counts(mine)}, the store's source had {counts(stored)}"
    if mine.class_names != stored.class_names:
        i = next(i for i, (a, b) in enumerate(zip(mine.class_names, stored.class_names, strict=True)) if a != b)
        return (f"class {i} is {printable(mine.class_names[i])!r} here, "
                f"{printable(stored.class_names[i])!r} in the store")
    if mine.kind != stored.kind:
        return f"it is {mine.kind}, the store's source was {stored.kind}"
    if mine.layout != stored.layout:
        return (f"its shards are laid out {mine.layout}, the store's were {stored.layout} "
                f"(--shards {stored.layout})")
    if mine.shards != stored.shards:
        i = next(i for i, (a, b) in enumerate(zip(mine.shards, stored.shards, strict=True)) if a != b)
        return f"shard {i} is {mine.shards[i]} here, {stored.shards[i]} in the store"
    for col in ("key", "label", "position"):
        a, b = mine.samples.column(col).to_pylist(), stored.samples.column(col).to_pylist()
        if a != b:
            i = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
            show = (lambda v: repr(printable(v))) if col == "key" else repr  # keys come from the dataset
            return (f"sample {i} has {col} {show(a[i])} here, {show(b[i])} in the store "
                    "(same counts, other contents)")
    return "same samples, other file layout inside the shards"


def check_probe_drift(data: TrainData) -> None:
    """Re-render the store's probe views; refuse to train if any renders differently now."""
    from pipeline.probes import drifted_probes
    from storage.base import library_versions
    from storage.meta import PROBES, VERSIONS

    meta = data.reader.meta
    stored = meta.get(PROBES)
    if not stored:
        return
    renderer = ViewRenderer(data.recipe)
    drifted = drifted_probes(stored, renderer, data.manifest, data.seed)
    if not drifted:
        return
    then = meta.get(VERSIONS) or data.reader.versions
    now = library_versions()
    changed = [f"{k} {then.get(k)} -> {now.get(k)}" for k in sorted(now) if then.get(k) != now.get(k)]
    raise TrainError(f"views no longer render the same as when the store {data.labels_path} was made "
                     f"({', '.join(changed) or 'same library versions: another platform?'}); probes "
                     f"{', '.join(drifted[:3])} differ; reinstall the versions the store was made with, "
                     "or recompute the store")


def check_complete(data: TrainData, epochs: range) -> None:
    """Refuse a store that lacks any unit the given epochs read (names the missing units)."""
    if data.reader is None or not len(epochs):
        return
    spec = data.reader.spec
    views = sorted({e % spec.views for e in epochs[:spec.views]})  # V epochs already visit every view they can
    blocks = sorted({spec.block_of(v) for v in views})
    missing = [(s, b) for b in blocks for s in range(spec.num_shards) if not data.reader.is_complete(s, b)]
    if missing:
        def unit(s, b):
            r = spec.block_views(b)
            return f"(shard {s}, views {r.start}-{r.stop - 1})"
        shown = ", ".join(unit(s, b) for s, b in missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise TrainError(f"store {data.labels_path} is missing {len(missing)} of the units epochs "
                         f"{epochs.start}-{epochs.stop - 1} read (views {views[0]}-{views[-1]}): {shown}; "
                         "run the same precompute command again (it resumes)")
    # Damage found mid-run would stop it at the epoch that reads the unit (or, for a lost chunk the
    # marker still lists, feed zeros): check the units' chunks against their markers' crc32c now.
    # Costs one read of the labels these epochs will read anyway (~26 bytes/view).
    problems = data.reader.check_units([(s, b) for b in blocks for s in range(spec.num_shards)])
    if problems:
        raise TrainError(f"store {data.labels_path} is damaged: {problems[0]}"
                         + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))
