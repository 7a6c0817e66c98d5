"""What a training run reports: one ``EpochMetrics`` per epoch (a line of ``RUN/metrics.jsonl`` and a row
of ``RUN/summary.csv``) and one ``TrainSummary`` per run (``RUN/summary.json``, and the line ``cli.py
train`` prints).

The files are JSON written from these types; their keys and key order are the files' format (old runs
must still plot and read), so ``to_json`` spells them in the order earlier versions wrote them.
Readers of old files (``student.curves``) keep reading rows as dicts: a row may lack keys a newer
version writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
SUMMARY_CSV = "summary.csv"  # student.curves.append_summary writes it (timm's update_summary)


def plural(n: int, word: str) -> str:
    """"1 epoch", "2 epochs"."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def top1(val: dict, distilled: bool | None) -> str:
    """A validation's top-1 (%): the average of both heads with each head's (a distilled model: DeiT's
    test-time rule), or the one head's. None (unknown, an older summary): the three figures."""
    if distilled:
        return f"{val['avg_top1']:.2f} (cls {val['cls_top1']:.2f}, dist {val['dist_top1']:.2f})"
    if distilled is None:
        return f"cls/dist/avg {val['cls_top1']:.2f}/{val['dist_top1']:.2f}/{val['avg_top1']:.2f}"
    return f"{val['cls_top1']:.2f}"


def val_report(val: dict | None, val_ema: dict | None, distilled: bool | None) -> str:
    """"val top-1 raw X, EMA Y": both weights when the run kept an EMA."""
    if not val:
        return "no --val, accuracy not measured"
    if not val_ema:
        return f"val top-1 {top1(val, distilled)}"
    return f"val top-1 raw {top1(val, distilled)}, EMA {top1(val_ema, distilled)}"


@dataclass
class EpochStats:
    """What one epoch of training steps did on this rank (loss parts averaged over steps and ranks)."""

    step: int           # optimizer steps since the run began, after this epoch
    steps: int          # steps in this epoch
    images: int         # images in this epoch, all ranks
    seconds: float
    img_per_s: float
    loss: float         # (1 - alpha) * base + alpha * kd; base alone without distillation
    base: float         # cross entropy against the mixed, smoothed ground truth
    kd: float           # the distillation term (0 without distillation)
    lr: float           # the learning rate after the epoch's last step


@dataclass
class EpochMetrics:
    """One line of metrics.jsonl: the epoch's training stats, its invalid views and its validation."""

    epoch: int
    train: EpochStats
    invalid_views: int
    skipped_views: int  # views skipped so far this run, all ranks
    val: dict | None = None      # student.evaluate.evaluate's top-1/top-5 per head; absent without --val
    val_ema: dict | None = None  # the same for the EMA weights

    def report(self, epochs: int, distilled: bool) -> str:
        """The console line after each epoch (metrics.jsonl holds the same numbers)."""
        t = self.train
        line = (f"epoch {self.epoch} ({self.epoch + 1} of {epochs}): loss {t.loss:.4f}, lr {t.lr:.3g}, "
                f"{t.img_per_s:.1f} img/s")
        return line + (f"; {val_report(self.val, self.val_ema, distilled)}" if self.val else "")

    def to_json(self) -> dict:
        """The row as metrics.jsonl holds it: epoch, the train stats flat, then val/val_ema when measured."""
        row = {"epoch": self.epoch, **dataclasses.asdict(self.train), "invalid_views": self.invalid_views,
               "skipped_views": self.skipped_views}
        for key in ("val", "val_ema"):
            if getattr(self, key) is not None:
                row[key] = getattr(self, key)
        return row


@dataclass
class FinalMetrics:
    """The last epoch's loss and validation, as summary.json's "final" holds them."""

    loss: float | None = None
    val: dict | None = None
    val_ema: dict | None = None

    @classmethod
    def of(cls, metrics: EpochMetrics | None) -> FinalMetrics:
        if metrics is None:  # a run that had no epoch left to do
            return cls()
        return cls(metrics.train.loss, metrics.val, metrics.val_ema)


@dataclass
class TrainSummary:
    """What ``student.train.train`` returns and writes to RUN/summary.json (field order = the file's)."""

    model: str
    distillation: str
    epochs: int
    epochs_this_run: int
    finished: bool
    step: int
    global_batch: int
    world: int
    rank: int
    device: str
    images: int
    wall_seconds: float
    train_seconds: float
    img_per_s: float
    invalid_views_skipped: int
    first_step_loss: float | None
    final: FinalMetrics
    finetune: str | None
    soft_targets: str | None
    distillation_token: bool | None = None  # the student's; None in summaries written before it was kept

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, run: str) -> None:
        with open(os.path.join(run, SUMMARY_FILE), "w") as f:
            json.dump(self.to_json(), f, indent=1)

    @classmethod
    def read(cls, run: str) -> TrainSummary:
        """RUN/summary.json, as the run wrote it."""
        with open(os.path.join(run, SUMMARY_FILE)) as f:
            d = json.load(f)
        return cls(**{**d, "final": FinalMetrics(**d["final"])})

    def report(self) -> str:
        """The line ``cli.py train`` prints at the end."""
        return (f"train: {plural(self.epochs_this_run, 'epoch')}, {self.images} images in {self.train_seconds:.1f}s "
                f"({self.img_per_s:.1f} img/s); invalid views skipped: {self.invalid_views_skipped}; "
                + val_report(self.final.val, self.final.val_ema, self.distillation_token))
