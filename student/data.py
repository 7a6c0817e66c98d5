"""The lockstep loader: replays the views a label store was made from, joined with their labels.

Epoch ``e`` replays view ``v = e mod V`` of the store (without a store: ``v = e``, views drawn
from ``--recipe/--seed``). The epoch is one **global stream** of views, the same on every rank
and in every worker:

    for group in epoch_shard_order(seed, e, S), cut into groups of STREAM_GROUP_SHARDS (8):
        for window in the windows of the group's shards, in a seeded order per (epoch, group):
            for slot s in window:                       # R * w consecutive slots of one shard
                (j, s)                                  # skipped if the store flags it invalid

(``pipeline.views.epoch_stream``). A window holds the R copies of a few samples, each copy
with another mixing partner (slots (2m, 2m+1)), so copies land in one optimizer step as with
DeiT's RASampler, and a global batch draws from several shards, so its batch-mates change from
epoch to epoch as with a global shuffle.

Global step ``t`` takes views ``[t*G, (t+1)*G)`` of the stream (G = batch_size x world); rank
``r`` takes the contiguous slice ``[t*G + r*B, t*G + (r+1)*B)``; the stream's tail that does
not fill a global batch is dropped. So:

- every rank runs the same number of steps (``len(stream) // G``), and
- the global batch of step ``t`` is the same set of views, in the same order, for any world
  size with the same G: one process with batch 8 sees exactly the union of two processes
  with batch 4 (what makes a 1-GPU and an 8-GPU run the same experiment).

DataLoader workers split a rank's *batches* round-robin (worker w renders steps w, w+W, ...), which
is the order a DataLoader returns an IterableDataset's items in, so the batches are the same bytes
for 0, 1 or 13 workers. Workers are forked once per loader and kept across epochs; each epoch
reaches them as one shared int64 array of the rank's rows (``EpochChannel``), never a Python object
per step or per sample (a forked worker copies each page whose objects it touches). A worker plans
only the slots of its batch (``ViewRenderer.slot_view``, with each shard's slot order cached), reads
the samples it needs in file order (``SampleReader.read_many``; the manifest records where each is):
a webdataset sample by one seek into its tar (a few tars stay open), a parquet sample from its row
group (a few files open and the last row groups kept, so a batch's samples from one row group cost
one read), an ImageFolder sample by one file read; each checked against the size and crc32c the
store's manifest recorded (``check_sample``). It decodes each sample once per batch, renders each
mixing pair once (``ViewRenderer.render_pair``, the very call precompute labelled), and builds the
mixed, smoothed ground truth of the whole batch at once (``pipeline.views.mixed_targets``). The
teacher's labels are joined in the main process from one ``reader.read_view(view)`` per epoch.

Invalid views (the store flagged their image, or its mixing partner, undecodable) are left out
of the stream up front, so batches stay full; an image that fails to decode now (no store, or
a file damaged after precompute) is dropped from its batch. Both are counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from pipeline.devices import single_thread_worker
from pipeline.recipes import Recipe, create_recipe, parse_overrides
from pipeline.sources import (
    Manifest,
    SampleReader,
    SourceError,
    Undecodable,
    check_same_classes,
    decode_image,
    index_source,
    layout_for_store,
    source_errors_in_one_line,
    stored_manifest,
)
from pipeline.views import ViewRenderer, mixed_targets
from storage import WRITTEN, open_store
from storage.bucket import is_url
from storage.errors import printable

from .errors import TrainError
from .stream import STREAM_GROUP_SHARDS, epoch_stream, window_slots


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
    manifest = index_source(data, shard_size=stored.shard_size or shard_size, seed=stored.seed, shards=layout,
                            checksums=False)
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


# ---- one epoch's plan ----------------------------------------------------------------------
@dataclass
class EpochPlan:
    epoch: int
    view: int
    stream: np.ndarray      # [N, 2] int64 (shard, slot): the global stream, invalid views left out
    invalid: int            # views the store flagged invalid (left out)
    labels: dict | None     # shard -> storage Labels of this view (main process only)
    global_batch: int

    @property
    def steps(self) -> int:
        return len(self.stream) // self.global_batch

    def rank_rows(self, rank: int, batch_size: int, limit: int | None = None) -> np.ndarray:
        """One rank's rows of the epoch, [steps * batch_size, 2]: step t is rows [t*B, (t+1)*B), the
        slice [t*G + rank*B, t*G + (rank+1)*B) of the global stream. One array, not one object per step."""
        steps = self.steps if limit is None else min(self.steps, limit)
        g = self.global_batch
        per_step = self.stream[:steps * g].reshape(steps, g, 2)[:, rank * batch_size:(rank + 1) * batch_size]
        return np.ascontiguousarray(per_step).reshape(-1, 2)

    def rank_batches(self, rank: int, batch_size: int, limit: int | None = None) -> list[np.ndarray]:
        rows = self.rank_rows(rank, batch_size, limit)
        return [rows[t * batch_size:(t + 1) * batch_size] for t in range(len(rows) // batch_size)]


def plan_epoch(data: TrainData, epoch: int, global_batch: int) -> EpochPlan:
    view = data.view_of(epoch)
    sizes = data.manifest.shard_sizes
    stream = epoch_stream(data.seed, epoch, sizes, data.recipe.repeats)
    labels, invalid = None, 0
    if data.reader is not None:
        labels = dict(data.reader.read_view(view))  # one sequential read of the epoch's labels
        starts = data.manifest.shard_starts
        valid = np.concatenate([labels[j].valid[:sizes[j]] for j in range(len(sizes))]) == WRITTEN
        ok = valid[starts[stream[:, 0]] + stream[:, 1]]
        invalid = int((~ok).sum())
        stream = stream[ok]
    return EpochPlan(epoch, view, stream, invalid, labels, global_batch)


# ---- rendering: what a DataLoader worker does ------------------------------------------------
@dataclass(frozen=True)
class RankSteps:
    """What one rank renders in one epoch: view ``view``, step t from rows [t*B, (t+1)*B) of ``rows``
    (``EpochPlan.rank_rows``). ``current()`` is itself: a fixed epoch, for ReplayBatches without a channel."""

    view: int
    rows: np.ndarray    # [steps * batch_size, 2] int64 (shard, slot)
    batch_size: int

    @property
    def steps(self) -> int:
        return len(self.rows) // self.batch_size

    def step_rows(self, t: int) -> np.ndarray:
        return self.rows[t * self.batch_size:(t + 1) * self.batch_size]  # a view: no copy, no per-row object

    def current(self) -> RankSteps:
        return self


class EpochChannel:
    """The epoch a rank's DataLoader workers render next, in shared memory.

    Workers are forked once and kept (``persistent_workers``); each epoch the main process writes
    the rank's rows (``EpochPlan.rank_rows``) and the view here *before* it starts the epoch's
    iteration, and a worker reads them when its iterator starts (torch starts it on the epoch's
    resume message, which the main process sends after this write). A worker thus holds one shared
    int64 array, never a list of per-step objects, and reads only the rows of its own steps.
    Capacity: the rows of an epoch without invalid views, 16 bytes a row, once per rank (not per
    worker), in /dev/shm when ``shared`` (with workers): 20 MB for one rank at 1.28M samples.
    """

    def __init__(self, capacity_rows: int, batch_size: int, shared: bool = True):
        self.batch_size = batch_size
        self._rows = torch.zeros((max(capacity_rows, 1), 2), dtype=torch.int64)
        self._head = torch.zeros(2, dtype=torch.int64)  # view, rows
        if shared:  # forked workers see the main process's writes
            self._rows.share_memory_()
            self._head.share_memory_()

    def publish(self, view: int, rows: np.ndarray) -> None:
        if len(rows) > len(self._rows):
            raise ValueError(f"{len(rows)} rows do not fit the channel's {len(self._rows)}")
        self._rows[:len(rows)] = torch.from_numpy(rows)
        self._head[0], self._head[1] = view, len(rows)

    def current(self) -> RankSteps:
        view, n = self._head.tolist()
        return RankSteps(view, self._rows.numpy()[:n], self.batch_size)


class ReplayBatches(torch.utils.data.IterableDataset):
    """Renders one rank's batches of the epoch ``epochs.current()`` names (an EpochChannel, or one
    RankSteps); worker w of W takes batches w, w+W, ..."""

    def __init__(self, files: SampleReader, recipe: Recipe, seed: int, num_classes: int, epochs):
        self.files, self.recipe, self.seed, self.epochs = files, recipe, seed, epochs
        self.num_classes = num_classes

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        epoch = self.epochs.current()  # read when this epoch's iteration starts, never earlier
        view = epoch.view
        renderer = ViewRenderer(self.recipe)
        # Only the slots a batch renders are planned (slot_view); the slot order of each shard
        # is cached: a batch spans up to STREAM_GROUP_SHARDS shards, and the next batches the same.
        order = lru_cache(maxsize=64)(lambda shard: renderer.slot_order(self.seed, view, shard,
                                                                        int(self.files.sizes[shard])))

        @lru_cache(maxsize=1024)  # a pair's lead slot is asked for twice
        def plan(shard: int, slot: int):  # slot 2m: the pair (2m, 2m+1), rendered and mixed at once
            return renderer.slot_view(self.seed, view, shard, slot, order(shard))

        for t in range(wid, epoch.steps, nw):
            yield self.render(renderer, plan, t, epoch.step_rows(t))

    def render(self, renderer: ViewRenderer, plan, step: int, rows: np.ndarray) -> dict:
        files, smoothing = self.files, self.recipe.label_smoothing
        images, keep, decoded, pairs = [], [], {}, {}
        own, other, lams = [], [], []  # per kept view: its label, its partner's (-1: none), lambda (NaN: unmixed)

        # Every image of the batch read first, in file order (one read per parquet row group).
        raw = files.read_many(sorted({(shard, pos) for shard, slot in rows.tolist()
                                      for pos in _pair_positions(plan(shard, slot & ~1))}))

        def image(shard, position):
            if (shard, position) not in decoded:
                img = decode_image(raw.pop((shard, position)))
                # an undecodable image: its views are skipped and counted
                decoded[shard, position] = None if isinstance(img, Undecodable) else img
            return decoded[shard, position]

        for i, (shard, slot) in enumerate(rows.tolist()):
            lead = plan(shard, slot & ~1)  # slot 2m+1 is the pair's other half: same mix, positions swapped
            if (shard, lead.slot) not in pairs:
                a = image(shard, lead.position)
                b = None if lead.partner_position is None else image(shard, lead.partner_position)
                broken = a is None or (lead.partner_position is not None and b is None)
                pairs[shard, lead.slot] = None if broken else renderer.render_pair(self.seed, lead, a, b)
            pair = pairs[shard, lead.slot]
            if pair is None:
                continue
            images.append(pair[slot - lead.slot])
            position, partner = ((lead.position, lead.partner_position) if slot == lead.slot
                                 else (lead.partner_position, lead.position))
            own.append(files.labels[files.row(shard, position)])
            other.append(-1 if partner is None else files.labels[files.row(shard, partner)])
            lams.append(np.nan if lead.mix.mode == "none" else lead.mix.lam)
            keep.append(i)
        size = self.recipe.input_size
        targets = mixed_targets(np.asarray(own, np.int64), np.asarray(other, np.int64), np.asarray(lams, np.float64),
                                self.num_classes, smoothing)  # the whole batch at once
        return {
            "step": step,
            "images": torch.stack(images) if images else torch.zeros(0, 3, size, size),
            "targets": torch.from_numpy(targets),
            "rows": torch.from_numpy(rows[keep]) if keep else torch.zeros(0, 2, dtype=torch.int64),
            "skipped": len(rows) - len(keep),
        }


def _pair_positions(lead) -> tuple[int, ...]:
    return (lead.position,) if lead.partner_position is None else (lead.position, lead.partner_position)


@dataclass
class Batch:
    step: int                              # step within the epoch
    images: torch.Tensor                   # [b, 3, H, W] float32, the exact views the teacher saw
    targets: torch.Tensor                  # [b, C] mixed, label-smoothed ground truth
    rows: torch.Tensor                     # [b, 2] (shard, slot) of each view
    skipped: int                           # views of this batch dropped (image undecodable now)
    teacher_ids: torch.Tensor | None = None     # [b] (hard store) or [b, k] (top-k store)
    teacher_values: torch.Tensor | None = None  # [b, k] fp16 top-k log-probs; None for a hard store
    teacher_tail_lse: torch.Tensor | None = None  # [b, len(spec.taus)] fp16 tempered tail LSE; None if no taus

    def __len__(self) -> int:
        return len(self.images)


class LockstepLoader:
    """One rank's batches, epoch by epoch. ``loader.epoch(e)`` is an iterable of Batch.

    With workers, one DataLoader lives as long as the loader: its workers are forked at the first
    epoch and kept (``persistent_workers``), each epoch handed through an EpochChannel. So one
    epoch is read at a time: starting the next epoch's batches ends the previous epoch's (reading
    on in it raises TrainError)."""

    def __init__(self, data: TrainData, *, batch_size: int, rank: int = 0, world: int = 1, workers: int = 0,
                 pin_memory: bool = False, max_steps_per_epoch: int | None = None):
        if batch_size < 1:
            raise TrainError(f"--batch-size must be >= 1, got {batch_size}")
        self.data, self.batch_size, self.rank, self.world = data, batch_size, rank, world
        self.workers, self.pin_memory, self.limit = workers, pin_memory, max_steps_per_epoch
        if workers and is_url(data.manifest.root):
            # obstore's runtime (its threads) does not survive the fork of a DataLoader worker: a worker
            # forked after the source was listed would wait on it forever
            raise TrainError(f"--workers {workers} with a source on a bucket ({data.manifest.root}): bucket "
                             "sources are read in the main process for now; pass --workers 0")
        self.files = SampleReader(data.manifest)
        self.global_batch = batch_size * world
        if self.global_batch > len(self.files):
            raise TrainError(f"global batch {self.global_batch} (--batch-size {batch_size} x {world} processes) "
                             f"is more than the {len(self.files)} samples of the source; use a smaller --batch-size")
        self._dl = self._channel = None
        self._started = 0  # epochs started: an EpochIter reads on only while its epoch is the last started

    def nominal_steps(self) -> int:
        """Steps of an epoch without invalid views (the schedule's updates per epoch)."""
        steps = len(self.files) // self.global_batch
        return steps if self.limit is None else min(steps, self.limit)

    def epoch(self, epoch: int) -> EpochIter:
        return EpochIter(self, plan_epoch(self.data, epoch, self.global_batch))

    def _start(self, view: int, rows: np.ndarray):
        """Hand an epoch to the (persistent) DataLoader; its iterable, and the start's number."""
        if self._dl is None:
            self._channel = EpochChannel(self.nominal_steps() * self.batch_size, self.batch_size, self.workers > 0)
            ds = ReplayBatches(self.files, self.data.recipe, self.data.seed, self.data.num_classes, self._channel)
            self._dl = torch.utils.data.DataLoader(
                ds, batch_size=None, num_workers=self.workers, worker_init_fn=single_thread_worker,
                pin_memory=self.pin_memory, prefetch_factor=4 if self.workers else None,
                persistent_workers=self.workers > 0,
                generator=torch.Generator().manual_seed(0))  # never draw from the global RNG
        self._channel.publish(view, rows)  # before iter(): workers read it when the epoch's iteration starts
        self._started += 1
        return self._dl, self._started


class EpochIter:
    def __init__(self, loader: LockstepLoader, plan: EpochPlan):
        self.loader, self.plan = loader, plan
        self.rows = plan.rank_rows(loader.rank, loader.batch_size, loader.limit)  # this rank's, one array
        self.skipped = 0  # views dropped from batches so far (undecodable now)

    def __len__(self) -> int:
        return len(self.rows) // self.loader.batch_size

    @property
    def invalid(self) -> int:
        """Views the store flagged invalid in this epoch's view (all ranks: the stream is global)."""
        return self.plan.invalid

    def __iter__(self):
        lo, p = self.loader, self.plan
        dl, started = lo._start(p.view, self.rows)
        items = source_errors_in_one_line(dl)  # a worker's SourceChanged: its line, not torch's text
        while True:
            if lo._started != started:  # the workers now render a later epoch: what follows is not ours
                raise TrainError(f"epoch {p.epoch}'s batches were read on after a later epoch's started; "
                                 "a loader reads one epoch at a time: finish (or drop) one before the next")
            item = next(items, None)
            if item is None:
                return
            batch = Batch(**item)
            self.skipped += batch.skipped
            if p.labels is not None:
                batch.teacher_ids, batch.teacher_values, batch.teacher_tail_lse = self._teacher(batch.rows)
            yield batch

    def _teacher(self, rows: torch.Tensor):
        ids, values, tails = [], [], []
        for shard, slot in rows.tolist():
            lab = self.plan.labels[shard]
            ids.append(lab.ids[slot])
            if lab.values is not None:
                values.append(lab.values[slot])
            if lab.tail_lse is not None:
                tails.append(lab.tail_lse[slot])
        if not ids:
            return None, None, None
        stack = lambda xs: torch.from_numpy(np.stack(xs)) if xs else None
        return torch.from_numpy(np.stack(ids)).long(), stack(values), stack(tails)


# ---- evaluation --------------------------------------------------------------------------
class EvalImages(torch.utils.data.Dataset):
    """Every ``world``-th sample of a validation source (from ``rank``), eval-transformed."""

    def __init__(self, manifest: Manifest, recipe: Recipe, rank: int = 0, world: int = 1):
        self.files, self.recipe = SampleReader(manifest), recipe
        self.index = np.arange(rank, len(self.files), world)
        self.shard_of = np.searchsorted(self.files.starts, np.arange(len(self.files)), side="right") - 1
        self._transform = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        row = int(self.index[i])
        shard = int(self.shard_of[row])
        if self._transform is None:
            self._transform = ViewRenderer(self.recipe).eval_transform()
        try:
            data = self.files.read(shard, row - int(self.files.starts[shard]))
        except SourceError:  # an unreadable file (permission): an error, never a silently dropped image
            raise
        except Exception:  # noqa: BLE001 - unreadable now (a tar gone): left out, like an undecodable image
            return None
        img = decode_image(data)
        if isinstance(img, Undecodable):
            return None
        return self._transform(img), int(self.files.labels[row])


def _collate_valid(items):
    items = [it for it in items if it is not None]
    if not items:
        return None
    x, y = zip(*items, strict=True)
    return torch.stack(x), torch.tensor(y)


def eval_loader(val: str, train: TrainData, *, batch_size: int, rank: int = 0, world: int = 1,
                workers: int = 0, shard_size: int = 1024, pin_memory: bool = False):
    """Batches (images, labels) of the validation source, this rank's share; same classes as training."""
    manifest = index_source(val, shard_size=shard_size, seed=train.seed, checksums=False)
    check_same_classes(train.manifest, manifest, val_src=val)
    ds = EvalImages(manifest, train.recipe, rank, world)
    return _OneLineSourceErrors(torch.utils.data.DataLoader(
        ds, batch_size=batch_size, num_workers=workers, collate_fn=_collate_valid,
        worker_init_fn=single_thread_worker, pin_memory=pin_memory))


class _OneLineSourceErrors:
    """A DataLoader whose workers' SourceErrors surface as their own one line (see source_errors_in_one_line)."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return source_errors_in_one_line(self.loader)
