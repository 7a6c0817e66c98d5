"""Your own training loop on a label store: the lockstep batches and DeiT's loss, nothing else.

    from student.api import open_lockstep

    ls = open_lockstep("SRC", "STORE", batch_size=64, rank=rank, world=world, workers=8)
    model = timm.create_model("deit_small_distilled_patch16_224", num_classes=ls.num_classes)
    model.set_distilled_training(True)            # a distilled DeiT returns (class, distillation) logits
    for epoch in range(epochs):
        for batch in ls.epoch(epoch):             # this rank's share of the epoch's global batches
            out = model(batch.images.to(device))
            loss = ls.loss(out, batch)            # DeiT's loss against the stored teacher labels
            ...                                   # backward, step: yours (or ls.step(model, batch, opt):
                                                  # the trainer's own step, student/step.py)

Each ``batch`` is a ``student.data.Batch``: ``images`` [b, 3, H, W] (the very views the teacher
labelled), ``targets`` [b, C] (mixed, label-smoothed ground truth), ``teacher_ids`` /
``teacher_values`` (the stored labels) and ``rows`` ((shard, slot) of each view). The stream is
the one ``cli.py train`` replays: the same views in the same order for any worker count, and
the same global batch for any world size with the same ``batch_size x world``. What is yours:
the model, optimizer, schedule, precision, DDP wrapping, checkpoints. What stays ours: which
views, in which order, with which labels (``student/data.py``), and the loss
(``student/losses.py``).

This module is a facade and stays thin on purpose: it opens and checks (``open_train_data``,
``check_complete``), iterates (``LockstepLoader``), computes (``losses.deit_loss_terms``) and steps
(``step.train_step``, shared with ``cli.py train``), and exposes those objects for anything it does not wrap.
"""

from __future__ import annotations

import numbers
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .config import check_objective
from .data import Batch, EpochIter, LockstepLoader, TrainData, check_complete, open_train_data
from .errors import TrainError
from .losses import TeacherLabels, deit_loss_terms
from .step import train_step

__all__ = ["Lockstep", "open_lockstep", "Batch", "TeacherLabels", "TrainError"]


@dataclass
class Lockstep:
    """One rank's view of a store: ``.epoch(e)`` batches, ``.loss(outputs, batch)``."""

    data: TrainData
    loader: LockstepLoader
    mode: str                       # none | hard | soft
    alpha: float = 0.5
    tau: float = 1.0
    kd_reduction: str = "batchmean"
    _checked: set = field(default_factory=set, repr=False)

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def input_size(self) -> int:
        return self.data.recipe.input_size

    @property
    def steps_per_epoch(self) -> int:
        """Steps of an epoch with no invalid view: what a scheduler's updates-per-epoch wants."""
        return self.loader.nominal_steps()

    def epoch(self, epoch: int) -> EpochIter:
        """This rank's batches of ``epoch`` (view ``epoch mod V`` of the store), on the CPU.

        The first call for a view checks that the store holds every unit it reads, whole
        (TrainError naming the missing or damaged units otherwise). Epochs are read one at a time
        (the DataLoader workers are kept across epochs): starting to read the next epoch ends this
        one, and reading on in it raises TrainError."""
        view = self.data.view_of(epoch)
        if view not in self._checked:
            check_complete(self.data, range(epoch, epoch + 1))
            self._checked.add(view)
        return self.loader.epoch(epoch)

    def teacher(self, batch: Batch, device: torch.device | str | None = None) -> TeacherLabels | None:
        """The stored teacher labels of ``batch`` as deit_loss_terms takes them (None without distillation)."""
        spec = None if self.data.reader is None else self.data.reader.spec
        return TeacherLabels.from_batch(batch, spec, self.mode, self.tau, device)

    def loss_terms(self, outputs, targets: torch.Tensor, teacher: TeacherLabels | None):
        """DeiT's (loss, base, kd) of ``outputs`` with this run's mode, alpha, tau and KD reduction."""
        return deit_loss_terms(outputs, targets, teacher, mode=self.mode, alpha=self.alpha, tau=self.tau,
                               kd_reduction=self.kd_reduction)

    def loss(self, outputs, batch: Batch) -> torch.Tensor:
        """DeiT's loss of the student's ``outputs`` on ``batch`` (the same function ``cli.py train`` uses).

        ``outputs``: [b, C] logits, or a distilled DeiT's (class, distillation) pair in training mode.
        Targets and teacher labels are moved to the outputs' device."""
        device = (outputs[0] if isinstance(outputs, (tuple, list)) else outputs).device
        # The parts stay tensors (not .item() floats): a float would make the host wait for the device.
        loss, _, _ = self.loss_terms(outputs, batch.targets.to(device), self.teacher(batch, device))
        return loss

    def step(self, model, batch: Batch, optimizer, *, scaler=None, autocast=nullcontext,
             clip_grad: float | None = None) -> torch.Tensor:
        """One optimizer step of ``model`` on ``batch``, the very step ``cli.py train`` takes
        (``student.step.train_step``: forward, this loss, backward, clip, step); the loss comes back unread.

        The batch is moved to the device of ``model``'s parameters. Schedule, EMA, DDP: yours."""
        device = next(model.parameters()).device
        loss, _, _ = train_step(model, batch.images.to(device), batch.targets.to(device), self.teacher(batch, device),
                                self.loss_terms, optimizer, scaler=scaler, autocast=autocast, clip_grad=clip_grad)
        return loss


def check_process_arguments(batch_size: int, rank: int, world: int, workers: int) -> None:
    """Checked before anything is opened: world=0 divides by zero, a rank outside 0..world-1 would
    silently get no batches, and workers=-1 would fail only at the first iteration."""
    for name, value in (("batch_size", batch_size), ("rank", rank), ("world", world), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TrainError(f"{name} must be an integer, got {value!r}")
    if batch_size < 1:
        raise TrainError(f"batch_size must be >= 1, got {batch_size}")
    if world < 1:
        raise TrainError(f"world must be >= 1 (the number of processes), got {world}")
    if not 0 <= rank < world:
        raise TrainError(f"rank must lie in 0..{world - 1} (world={world}), got {rank}")
    if workers < 0:
        raise TrainError(f"workers must be >= 0 (0: load in this process), got {workers}")


def open_lockstep(data: str, labels: str | None, batch_size: int, rank: int = 0, world: int = 1, workers: int = 0,
                  *, distillation: str | None = None, alpha: float = 0.5, tau: float = 1.0,
                  kd_reduction: str = "batchmean", pin_memory: bool = False, source_cache: str | None = None,
                  source_cache_bytes: int | None = None, **train_data) -> Lockstep:
    """Open ``data`` (the source) with its label store ``labels`` for rank ``rank`` of ``world``.

    ``batch_size`` is per rank. ``distillation`` defaults to what ``cli.py train`` does: hard with a
    store (a top-k store's argmax), none without; "soft" needs a top-k store. ``train_data`` goes to
    ``student.data.open_train_data`` (e.g. ``recipe``, ``overrides``, ``seed``, ``input_size`` without
    a store). ``source_cache``: a node-local folder that keeps a bucket source's objects whole across
    epochs (``cli.py train --source-cache``), at most ``source_cache_bytes``. Raises TrainError (one line:
    cause and fix) for bad arguments or a store that does not fit the source."""
    check_process_arguments(batch_size, rank, world, workers)
    opened = open_train_data(data, labels=labels, **train_data)
    if distillation is None:
        distillation = "none" if opened.reader is None else "hard"  # as `cli.py train`: DeiT's best setting
    check_objective(distillation, kd_reduction)
    if distillation != "none" and opened.reader is None:
        raise TrainError(f"distillation {distillation!r} needs teacher labels: pass labels=STORE")
    if distillation == "soft" and opened.reader.spec.mode == "hard":
        raise TrainError(f"the store {labels} holds hard labels only: use distillation='hard'")
    loader = LockstepLoader(opened, batch_size=batch_size, rank=rank, world=world, workers=workers,
                            pin_memory=pin_memory, source_cache=source_cache, source_cache_bytes=source_cache_bytes)
    return Lockstep(opened, loader, distillation, alpha, tau, kd_reduction)
