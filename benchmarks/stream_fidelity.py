"""How close the training stream is to DeiT's, side by side: DeiT/timm, this project before
(format 1: repeats as R rounds over a shard, shards streamed one after another, tars as-is)
and now (windows, interleave of 8 shards, class-sorted tars re-cut).

DeiT/timm is timm's RepeatAugSampler (DeiT's RASampler) per rank with batches of the per-rank
size and timm's Mixup pairing (i with the flipped batch's i). Synthetic labels only (no images):
8192 samples in 8 tars of 1024 written in class order, 1000 classes (the issue's setting), and
the same with shuffled tars; R = 3; figures averaged over 3 epochs.

    python benchmarks/stream_fidelity.py
"""

from __future__ import annotations

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from reference_stream_support import (  # noqa: E402
    EpochSample,
    classes_per_step,
    copies_in_one_step,
    coverage,
    distinct_per_step,
    expected_classes,
    project_epoch,
    project_manifest,
    same_class_partner_rate,
    same_class_probability,
    synthetic_labels,
    timm_epoch,
)

from pipeline.views import STREAM_ORDER, generator  # noqa: E402
from storage.spec import shard_starts  # noqa: E402
from student.stream import epoch_shard_order  # noqa: E402

N, PER_TAR, R, CLASSES, EPOCHS = 8192, 1024, 3, 1000, (0, 1, 2)


# ---- the old layout, kept callable here only (git show 97c5ed3:pipeline/views.py) -------------
def old_slot_order(seed: int, view: int, shard: int, n: int, repeats: int = 1) -> np.ndarray:
    g = generator(seed, STREAM_ORDER, view, shard)
    order = g.permutation(n)
    if repeats == 1 or n < 3:
        return order
    chosen = order[:max(2, -(-n // repeats))]
    slots = np.concatenate([g.permutation(chosen) for _ in range(repeats)])[:n]
    for m in range(0, n - 2, 2):
        if slots[m] == slots[m + 1]:
            slots[m + 1], slots[m + 2] = slots[m + 2], slots[m + 1]
    return slots


def old_epoch(sizes: list[int], epoch: int, global_batch: int, seed: int = 0,
              max_steps: int | None = None) -> EpochSample:
    """Old plan_epoch: shards in a seeded order, each shard's slots in order; tars as-is."""
    sizes = np.asarray(sizes)
    starts = shard_starts(sizes)
    sample, pairs, total = [], [], 0
    limit = None if max_steps is None else max_steps * global_batch
    for j in epoch_shard_order(seed, epoch, len(sizes)):
        order = old_slot_order(seed, epoch, int(j), int(sizes[j]), R) + starts[j]
        sample.append(order)
        pairs.append(order[: len(order) // 2 * 2].reshape(-1, 2))
        total += len(order)
        if limit is not None and total >= limit:
            break
    sample = np.concatenate(sample)
    steps = len(sample) // global_batch if max_steps is None else min(len(sample) // global_batch, max_steps)
    pairs = np.concatenate(pairs)[: steps * global_batch // 2]
    return EpochSample([sample[t * global_batch:(t + 1) * global_batch] for t in range(steps)], pairs)


SHAPES = ((8, 32), (4, 16), (1, 256), (8, 128))


def measure(title, labels, per_tar, epochs, max_steps=None):
    n = len(labels)
    new_m = project_manifest(labels, per_tar)
    new_labels = new_m.samples.column("label").to_numpy().astype(np.int64)
    streams = {
        "DeiT/timm": (lambda e, w, b: timm_epoch(n, e, w, b, max_steps=max_steps), labels),
        "old": (lambda e, w, b: old_epoch([per_tar] * (n // per_tar) + ([n % per_tar] if n % per_tar else []),
                                          e, w * b, max_steps=max_steps), labels),
        "new": (lambda e, w, b: project_epoch(new_m, e, w * b, max_steps=max_steps), new_labels),
    }
    rows = []
    for name, (make, lab) in streams.items():
        copies = {k: float(np.mean([copies_in_one_step(make(e, *k)) for e in epochs])) for k in SHAPES}
        big = [make(e, 8, 128) for e in epochs]
        rows.append((name, copies, np.mean([same_class_partner_rate(e, lab) for e in big]),
                     np.mean([classes_per_step(e, lab).mean() for e in big]),
                     np.mean([distinct_per_step(e).mean() for e in big]),
                     None if max_steps else np.mean([coverage(e, n) for e in big])))
    distinct = rows[-1][4]
    rows.append(("random", None, same_class_probability(labels), expected_classes(labels, int(round(distinct)))[0],
                 distinct, None))
    print(f"\n{title} (layout chosen: {new_m.layout})")
    print(f"{'stream':<11}{'copies 8x32':>12}{'4x16':>7}{'1x256':>7}{'8x128':>7}"
          f"{'same-class':>12}{'classes/1024':>14}{'distinct':>10}{'coverage':>10}")
    for name, copies, same, classes, dist, cov in rows:
        c = ("".join(f"{copies[k]:>{wd}.3f}" for k, wd in zip(SHAPES, (12, 7, 7, 7), strict=True))
             if copies else f"{'-':>12}{'-':>7}{'-':>7}{'-':>7}")
        print(f"{name:<11}{c}{same:>12.4f}{classes:>14.1f}{dist:>10.1f}{'-' if cov is None else f'{cov:.3f}':>10}")


def main():
    print(f"stream fidelity, R={R}: copies = samples whose {R} copies share an optimizer step (world x per-rank "
          "batch); same-class = mixing partners of one class; classes/1024 = distinct classes in a global batch "
          "of 1024 (8 x 128); random = a random draw of that many distinct samples")
    for class_sorted in (True, False):
        measure(f"{N} samples in {N // PER_TAR} tars of {PER_TAR}, {CLASSES} classes, "
                f"{'tars in class order' if class_sorted else 'shuffled tars'}, mean of {len(EPOCHS)} epochs",
                synthetic_labels(N, CLASSES, class_sorted=class_sorted), PER_TAR, EPOCHS)
    measure(f"{N} samples in {N // PER_TAR} tars of {PER_TAR}, 10 classes, tars in class order, mean of "
            f"{len(EPOCHS)} epochs", synthetic_labels(N, 10, class_sorted=True), PER_TAR, EPOCHS)
    measure("ImageNet-like: 1000 classes x 1281 samples in 1251 tars of 1024 in class order, epoch 0, first 64 "
            "steps of each shape", synthetic_labels(1000 * 1281, 1000, class_sorted=True), PER_TAR, (0,),
            max_steps=64)


if __name__ == "__main__":
    main()
