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
from pipeline.recipes import Recipe
from pipeline.sources import (
    SampleReader,
    Undecodable,
    decode_image,
    source_errors_in_one_line,
)
from pipeline.sources.bucket_cache import ReadAhead
from pipeline.sources.bucket_files import BucketTars
from pipeline.sources.hf_parquet import BucketParquet
from pipeline.sources.local_copies import CopyFiller
from pipeline.views import ViewRenderer, mixed_targets
from storage import WRITTEN
from storage.bucket import worker_start

from .errors import TrainError
from .stream import epoch_stream
from .train_data import TrainData


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
            self.files.at_step(wid, t)  # a bucket's read-ahead frees what every worker is past
            yield self.render(renderer, plan, t, epoch.step_rows(t))
        self.files.at_step(wid, epoch.steps)

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


def step_needs(files: SampleReader, renderer: ViewRenderer, seed: int, view: int, rows: np.ndarray,
               batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(step, manifest row) of every image the steps of ``rows`` read (a slot's sample and its pair
    partner's, as ``ReplayBatches.render`` reads them), vectorised per shard: what a read-ahead fetches."""
    shards, slots = rows[:, 0], rows[:, 1]
    steps = np.arange(len(rows), dtype=np.int64) // batch_size
    pos = np.zeros(len(rows), np.int64)
    other = np.full(len(rows), -1, np.int64)
    by_shard = np.argsort(shards, kind="stable")
    found, first = np.unique(shards[by_shard], return_index=True)
    for shard, idx in zip(found.tolist(), np.split(by_shard, first[1:]), strict=True):
        n = int(files.sizes[shard])
        order = renderer.slot_order(seed, view, shard, n)
        s = slots[idx]
        pos[idx] = order[s]
        partner = s ^ 1  # slots (2m, 2m+1) pair up; an odd last slot has none
        has = partner < n
        other[idx[has]] = order[partner[has]]
    base = np.asarray(files.starts, np.int64)[shards]
    has = other >= 0
    return np.concatenate([steps, steps[has]]), np.concatenate([base + pos, (base + other)[has]])


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
                 pin_memory: bool = False, max_steps_per_epoch: int | None = None, read_ahead: bool = True,
                 source_cache: str | None = None, source_cache_bytes: int | None = None):
        if batch_size < 1:
            raise TrainError(f"--batch-size must be >= 1, got {batch_size}")
        self.data, self.batch_size, self.rank, self.world = data, batch_size, rank, world
        self.workers, self.pin_memory, self.limit = workers, pin_memory, max_steps_per_epoch
        self.files = SampleReader(data.manifest)
        self.global_batch = batch_size * world
        if self.global_batch > len(self.files):
            raise TrainError(f"global batch {self.global_batch} (--batch-size {batch_size} x {world} processes) "
                             f"is more than the {len(self.files)} samples of the source; use a smaller --batch-size")
        self._dl = self._channel = None
        self._started = 0  # epochs started: an EpochIter reads on only while its epoch is the last started
        # Tars and parquet on a bucket: the main process reads ahead for all workers by the epoch's plan (bucket_cache);
        # local files are read directly (a pread is already cheap).
        self.read_ahead = None
        f = self.files
        if read_ahead and isinstance(f.file_reader, BucketTars):
            self.read_ahead = ReadAhead(f.file_reader, f.file_index, f.offsets, f.nbytes, workers, shared=workers > 0)
        elif read_ahead and isinstance(f.file_reader, BucketParquet):  # its rows' byte addresses: files mapped here
            offsets, sizes = f.file_reader.byte_addresses(f.file_index, f.offsets)
            self.read_ahead = ReadAhead(f.file_reader, f.file_index, offsets, sizes, workers, shared=workers > 0)
        # --source-cache: whole objects kept on node-local disk, read there from the first epoch they are whole
        self.copy_filler = None
        if source_cache is not None and isinstance(f.file_reader, BucketTars | BucketParquet):
            r = f.file_reader
            self.copy_filler = CopyFiller(source_cache, [r.where(i, "") for i in range(len(r.files))],
                                          source_cache_bytes, shared=workers > 0)
            r.copies = self.copy_filler.copies

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
                # forkserver once this process used a bucket (a source or the store): see worker_start;
                # always with a read-ahead, whose thread runs the object-store client in this process
                multiprocessing_context=("forkserver" if self.workers and (self.read_ahead or self.copy_filler)
                                         else worker_start(self.workers)),
                generator=torch.Generator().manual_seed(0))  # never draw from the global RNG
        self._channel.publish(view, rows)  # before iter(): workers read it when the epoch's iteration starts
        if self.read_ahead is not None or self.copy_filler is not None:  # after the DataLoader exists (forkserver)
            step, row = step_needs(self.files, ViewRenderer(self.data.recipe), self.data.seed, view, rows,
                                   self.batch_size)
            if self.copy_filler is not None:  # (the first epoch's order; later epochs change nothing)
                self.copy_filler.start(self.files.file_index[row[np.argsort(step, kind="stable")]])
            if self.read_ahead is not None:
                self.read_ahead.start(step, row)
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
