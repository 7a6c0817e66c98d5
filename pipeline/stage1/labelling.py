"""Labelling: a pass over pending units, batch by batch through the teacher into the store.

A DataLoader over ``units.UnitViews`` yields ``ViewBatch``es; ``_label`` runs the teacher on a batch's
valid views (top-k log-probabilities, or the argmax with ``--hard``, and the tail's log-sum-exp at each
``--tau``); ``_UnitBuffer`` collects a unit's labels until every view of it has arrived, then the writer
commits the unit in one atomic write and its lease is released. ``SoftError`` measures how far the soft
targets rebuilt from what is stored are from the teacher's full softmax. A unit is the unit of work,
(shard, view block): ``units.py`` says what the words mean.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from storage import INVALID, WRITTEN, StoreSpec, open_store, soft_targets, tail_logsumexp, target_error, topk_logprobs
from storage.bucket import worker_start
from storage.meta import soft_error_key
from storage.soft import recorded_soft_error

from ..devices import single_thread_worker
from ..sources import source_errors_in_one_line
from .fleet import Claimer
from .units import UnitViews, ViewBatch


class _UnitBuffer:
    """Collects one unit's labels batch by batch; full when every view of the unit has arrived."""

    def __init__(self, vb: int, n: int, k: int, hard: bool, taus: int = 0):
        self.n, self.filled = n, 0
        self.ids = np.zeros((vb * n,) if hard else (vb * n, k), dtype=np.int64)
        self.values = None if hard else np.zeros((vb * n, k), dtype=np.float16)
        self.tail = np.zeros((vb * n, taus), dtype=np.float16) if taus else None
        self.valid = np.full(vb * n, WRITTEN, dtype=np.uint8)
        self.vb = vb

    def add(self, start: int, ids, values, tail, valid: np.ndarray) -> bool:
        end = start + len(valid)
        self.ids[start:end] = ids
        if self.values is not None:
            self.values[start:end] = values
        if self.tail is not None:
            self.tail[start:end] = tail
        self.valid[start:end] = np.where(valid, WRITTEN, INVALID)
        self.filled += len(valid)
        return self.filled == len(self.valid)

    def arrays(self):
        shape = (self.vb, self.n)
        out = dict(values=None if self.values is None else self.values.reshape(*shape, -1),
                   ids=self.ids.reshape(*shape, *self.ids.shape[1:]), valid=self.valid.reshape(shape))
        if self.tail is not None:
            out["tail_lse"] = self.tail.reshape(*shape, -1)
        return out



class Labeller:
    """One process's labelling loop: DataLoader passes over the pending units, commits, counters."""

    def __init__(self, cfg, spec, manifest, recipe, teacher, device, writer, leases, bar, fleet: bool):
        self.cfg, self.spec, self.manifest, self.recipe = cfg, spec, manifest, recipe
        self.teacher, self.device, self.writer, self.leases, self.bar = teacher, device, writer, leases, bar
        self.fleet = fleet
        self.soft_error = SoftError.start(spec)
        self.units_done = self.written = self.invalid = 0
        self.invalid_keys: list[str] = []
        self.last_poll = time.monotonic()

    def show_fleet(self, every: float = 10.0) -> None:
        """Move the bar to the fleet's progress, not ours (at most every `every` seconds)."""
        if self.fleet and time.monotonic() - self.last_poll > every:
            self.last_poll = time.monotonic()
            self.bar.n = max(self.bar.n, self.spec.views_in(self.writer.completed_units()))
            self.bar.refresh()

    def finish_bar(self) -> None:
        """End the bar where the store is: a --join process or a fleet rank whose last units were finished
        by others would otherwise stop at 60-80% and look stalled."""
        self.bar.n = self.spec.views_in(self.writer.completed_units())
        self.bar.refresh()

    def one_pass(self, pending: list[tuple[int, int]]) -> None:
        cfg, spec = self.cfg, self.spec
        units = [(shard, spec.block_views(block)) for shard, block in pending]
        claimer = Claimer(self.leases, cfg.out, spec.views_per_unit) if self.leases is not None else None
        dataset = UnitViews(self.manifest, self.recipe, cfg.seed, units, cfg.batch_size, claimer)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=cfg.workers, worker_init_fn=single_thread_worker,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if cfg.workers else None,
            multiprocessing_context=worker_start(cfg.workers))  # forkserver once a bucket was used: no fork hang
        buffers: dict[int, _UnitBuffer] = {}
        for batch in source_errors_in_one_line(loader):
            shard, views = units[batch.index]
            buf = buffers.get(batch.index)
            if buf is None:
                buf = buffers[batch.index] = _UnitBuffer(len(views), spec.shard_sizes[shard], spec.k, cfg.hard,
                                                        len(spec.taus))
            ids, values, tail = _label(self.teacher, batch, self.recipe, spec, self.soft_error)
            self.invalid_keys.extend(batch.invalid_keys)
            if buf.add(batch.start, ids, values, tail, batch.valid.numpy()):
                block = spec.block_of(views.start)
                self.writer.write_unit(shard, block, **buffers.pop(batch.index).arrays())
                if self.leases is not None:
                    self.leases.release((shard, block))
                self.units_done += 1
                self.written += buf.valid.size
                self.invalid += int((buf.valid == INVALID).sum())
            self.bar.update(len(batch.valid))
            self.show_fleet()



def _label(teacher, batch: ViewBatch, recipe, spec: StoreSpec, soft_error: SoftError | None = None):
    """Teacher labels for the valid views of a batch (invalid rows stay zero)."""
    b = len(batch.valid)
    k = spec.k
    ids = np.zeros((b,) if spec.mode == "hard" else (b, k), dtype=np.int64)
    values = None if spec.mode == "hard" else np.zeros((b, k), dtype=np.float16)
    tail = np.zeros((b, len(spec.taus)), dtype=np.float16) if spec.taus else None
    keep = batch.valid.nonzero().flatten()
    if len(keep):
        x = batch.views if len(keep) == b else batch.views[keep]
        logits = teacher(x.to(teacher.device, non_blocking=True), recipe.mean, recipe.std)
        rows = keep.numpy()
        if spec.mode == "hard":
            ids[rows] = logits.argmax(dim=1).cpu().numpy()
        else:
            v, i = topk_logprobs(logits, k)
            ids[rows] = i.cpu().numpy()
            values[rows] = v.cpu().numpy()
            if spec.taus:
                tail[rows] = tail_logsumexp(logits, i, spec.taus)
                if soft_error is not None:
                    soft_error.add(logits.float().cpu(), values[rows], ids[rows], tail[rows])
    return ids, values, tail


@dataclass
class SoftError:
    """How far the soft targets rebuilt from the store are from the teacher's full softmax(z / tau), at
    each of the store's taus, over the views this rank labelled: total variation and KL(teacher || rebuilt),
    with the stored tail log-sum-exp ("stored") and with the uniform-tail approximation ("uniform").
    Saved as meta/soft_error_rank<R>.json (a --join process: soft_error_rank-join-<worker>.json), added
    to what an earlier run of the same rank recorded;
    `train` prints it (storage/soft.py explains the two rebuilds)."""

    num_classes: int
    taus: tuple[float, ...]
    sums: dict = field(default_factory=dict)  # "tau/rebuild/metric" -> [sum, max, views]

    @classmethod
    def start(cls, spec: StoreSpec) -> SoftError:
        return cls(spec.num_classes, spec.taus)

    def add(self, logits, values, ids, tail) -> None:
        for j, tau in enumerate(self.taus):
            for rebuild, lse in (("stored", tail[:, j]), ("uniform", None)):
                target = soft_targets(values, ids, self.num_classes, tau=tau, tail_lse=lse)
                for metric, err in zip(("tv", "kl"), target_error(logits, target, tau), strict=True):
                    acc = self.sums.setdefault(f"{tau:g}/{rebuild}/{metric}", [0.0, 0.0, 0])
                    acc[0] += float(err.sum())
                    acc[1] = max(acc[1], float(err.max()))
                    acc[2] += len(err)

    def summary(self) -> dict:
        """tau -> the figures of this run's views, as storage.soft.recorded_soft_error gives them."""
        meta = {soft_error_key(0): self.sums}
        return {tau: recorded_soft_error(meta, tau) for tau in self.taus if self.sums}

    def save(self, writer, key: str) -> None:
        """key: meta/<key>.json, soft_error_rank<R> (a join process: soft_error_rank-join-<worker>)."""
        if not self.sums:
            return
        merged = {name: list(v) for name, v in writer_meta(writer).get(key, {}).items()}
        for name, (total, peak, views) in self.sums.items():
            old = merged.get(name, [0.0, 0.0, 0])
            merged[name] = [old[0] + total, max(old[1], peak), old[2] + views]
        writer.set_meta(key, merged)


def writer_meta(writer) -> dict:
    """The store's meta as a reader sees it (the writer itself does not read meta back)."""
    return open_store(writer.path).meta
