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

from pipeline.views import STREAM_ORDER, epoch_shard_order, generator  # noqa: E402

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


def old_epoch(labels_sizes: list[int], epoch: int, global_batch: int, seed: int = 0) -> EpochSample:
    """Old plan_epoch: shards in a seeded order, each shard's slots in order; tars as-is."""
    sizes = np.asarray(labels_sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    sample, pairs = [], []
    for j in epoch_shard_order(seed, epoch, len(sizes)):
        order = old_slot_order(seed, epoch, int(j), int(sizes[j]), R) + starts[j]
        sample.append(order)
        pairs.append(order[: len(order) // 2 * 2].reshape(-1, 2))
    sample = np.concatenate(sample)
    steps = len(sample) // global_batch
    return EpochSample([sample[t * global_batch:(t + 1) * global_batch] for t in range(steps)], np.concatenate(pairs))


def mean(f, epochs):
    return float(np.mean([f(e) for e in epochs]))


def main():
    rows = []
    for class_sorted in (True, False):
        labels = synthetic_labels(N, CLASSES, class_sorted=class_sorted)
        new_m = project_manifest(labels, PER_TAR)
        new_labels = new_m.samples.column("label").to_numpy().astype(np.int64)
        q = same_class_probability(labels)
        streams = {
            "DeiT/timm": (lambda e, w, b: timm_epoch(N, e, w, b), labels),
            "old": (lambda e, w, b: old_epoch([PER_TAR] * (N // PER_TAR), e, w * b), labels),
            "new": (lambda e, w, b: project_epoch(new_m, e, w * b), new_labels),
        }
        for name, (make, lab) in streams.items():
            copies = {}
            for w, b in ((8, 32), (4, 16), (1, 256), (8, 128)):
                copies[w, b] = mean(lambda e: copies_in_one_step(make(e, w, b)), EPOCHS)  # noqa: B023
            big = [make(e, 8, 128) for e in EPOCHS]
            classes = np.mean([classes_per_step(e, lab).mean() for e in big])
            distinct = np.mean([distinct_per_step(e).mean() for e in big])
            rows.append((class_sorted, name, copies, np.mean([same_class_partner_rate(e, lab) for e in big]),
                         classes, distinct, np.mean([coverage(e, N) for e in big])))
        rows.append((class_sorted, "random", None, q, expected_classes(labels, int(round(distinct)))[0], distinct,
                     None))
    head = (f"{'tars':<8}{'stream':<11}{'copies 8x32':>12}{'4x16':>7}{'1x256':>7}{'8x128':>7}"
            f"{'same-class':>12}{'classes/1024':>14}{'distinct':>10}{'coverage':>10}")
    print(f"stream fidelity: {N} samples, {N // PER_TAR} tars of {PER_TAR}, {CLASSES} classes, R={R}, "
          f"mean of {len(EPOCHS)} epochs")
    print(head)
    for class_sorted, name, copies, same, classes, distinct, cov in rows:
        c = ("".join(f"{copies[k]:>{wd}.3f}" for k, wd in zip(((8, 32), (4, 16), (1, 256), (8, 128)),
                                                               (12, 7, 7, 7), strict=True))
             if copies else f"{'-':>12}{'-':>7}{'-':>7}{'-':>7}")
        print(f"{'sorted' if class_sorted else 'shuffled':<8}{name:<11}{c}{same:>12.4f}{classes:>14.1f}"
              f"{distinct:>10.1f}{'-' if cov is None else f'{cov:.3f}':>10}")
    print("copies: samples whose 3 copies share an optimizer step (world x per-rank batch); same-class: mixing "
          "partners of one class; classes/1024: distinct classes in a global batch of 1024 (8 x 128), "
          "'random' = a random draw of that many distinct samples")


if __name__ == "__main__":
    main()
