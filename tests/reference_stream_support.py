"""Stream statistics of the project's training stream and of DeiT/timm's, on labels alone.

Used by tests/test_reference_stream.py (with tolerances) and benchmarks/stream_fidelity.py (the
figures). A *step* is one optimizer step's global batch, as the sample ids it holds (one entry
per view, so a sample's repeated copies appear several times); a *pair* is two sample ids
mixed with each other. No image is read: the statistics depend on labels and layout only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.recipes import create_recipe
from pipeline.sources import Manifest, apply_layout


@dataclass
class EpochSample:
    steps: list[np.ndarray]   # per optimizer step: sample ids (global manifest rows), one per view
    pairs: np.ndarray         # [P, 2] sample ids mixed with each other (each pair once)


# ---- synthetic labelled sources --------------------------------------------------------------
def synthetic_labels(n: int, classes: int, *, class_sorted: bool, seed: int = 0) -> np.ndarray:
    """Balanced labels (n // classes or one more per class), in class order or shuffled."""
    labels = np.arange(n) % classes
    if class_sorted:
        return np.sort(labels)
    return np.random.Generator(np.random.Philox(key=[seed, 77])).permutation(labels)


def synthetic_wds(labels: np.ndarray, per_tar: int) -> Manifest:
    """A WebDataset manifest of tars written in label order (no files: statistics only)."""
    n = len(labels)
    idx = np.arange(n)
    table = pa.table({
        "key": [f"s{i:07d}" for i in range(n)], "label": pa.array(labels.astype(np.int32)),
        "shard": pa.array((idx // per_tar).astype(np.int32)), "position": pa.array((idx % per_tar).astype(np.int32)),
        "path": [f"s{i:07d}.jpg" for i in range(n)], "offset": pa.array(idx * 1536), "size": pa.array(np.full(n, 1024)),
    })
    tars = [f"shard-{j:06d}.tar" for j in range(-(-n // per_tar))]
    return Manifest("wds", "/nonexistent", tars, [str(c) for c in range(int(labels.max()) + 1)], table)


def project_manifest(labels: np.ndarray, per_tar: int, *, shards: str = "auto", seed: int = 0) -> Manifest:
    """What ``index_source`` makes of such tars (the same layout decision)."""
    return apply_layout(synthetic_wds(labels, per_tar), shards=shards, shard_size=per_tar, seed=seed)


# ---- the two streams -------------------------------------------------------------------------
def project_epoch(manifest: Manifest, epoch: int, global_batch: int, *, repeats: int = 3, seed: int = 0,
                  max_steps: int | None = None) -> EpochSample:
    """The project's training stream (student.data.plan_epoch, no store), cut into global batches."""
    from pipeline.views import slot_order
    from student.data import TrainData, plan_epoch

    data = TrainData(manifest, create_recipe("deit", {"repeats": repeats}), seed)
    plan = plan_epoch(data, epoch, global_batch)
    sizes = np.asarray(manifest.shard_sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    # flat[starts[j] + s] = the manifest row slot s of shard j holds in this view
    flat = np.concatenate([starts[j] + slot_order(seed, plan.view, j, int(sizes[j]), repeats)
                           for j in range(len(sizes))])
    steps = plan.steps if max_steps is None else min(plan.steps, max_steps)
    used = plan.stream[:steps * global_batch]
    idx = starts[used[:, 0]] + used[:, 1]
    sample = flat[idx]
    lead = (used[:, 1] % 2 == 0) & (used[:, 1] + 1 < sizes[used[:, 0]])
    pairs = np.stack([flat[idx[lead]], flat[idx[lead] + 1]], axis=1)
    return EpochSample([sample[t * global_batch:(t + 1) * global_batch] for t in range(steps)], pairs)


def timm_epoch(n: int, epoch: int, world: int, batch: int, *, repeats: int = 3,
               max_steps: int | None = None) -> EpochSample:
    """timm's RepeatAugSampler (DeiT's RASampler) on each rank, batches of ``batch`` (drop_last, as
    DeiT's loader), and timm's Mixup pairing inside each rank's batch: i with the flipped i."""
    from timm.data.distributed_sampler import RepeatAugSampler

    per_rank = []
    for rank in range(world):
        s = RepeatAugSampler(range(n), num_replicas=world, rank=rank, num_repeats=repeats)
        s.set_epoch(epoch)
        per_rank.append(np.fromiter(iter(s), dtype=np.int64))
    num_steps = min(len(r) for r in per_rank) // batch
    num_steps = num_steps if max_steps is None else min(num_steps, max_steps)
    steps, pairs = [], []
    for t in range(num_steps):
        local = [r[t * batch:(t + 1) * batch] for r in per_rank]
        steps.append(np.concatenate(local))
        for b in local:  # timm's Mixup: x.flip(0), so i and batch-1-i mix; each pair once
            half = batch // 2
            pairs.append(np.stack([b[:half], b[::-1][:half]], axis=1))
    return EpochSample(steps, np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64))


# ---- statistics -------------------------------------------------------------------------------
def coverage(e: EpochSample, n: int) -> float:
    """Distinct samples seen in the epoch / samples in the source."""
    return len(np.unique(np.concatenate(e.steps))) / n


def copies_in_one_step(e: EpochSample) -> float:
    """Of the samples seen, the fraction whose every copy is in a single optimizer step."""
    ids = np.concatenate(e.steps)
    step = np.concatenate([np.full(len(s), t) for t, s in enumerate(e.steps)])
    order = np.argsort(ids, kind="stable")
    ids, step = ids[order], step[order]
    first = np.r_[True, ids[1:] != ids[:-1]]
    group = np.cumsum(first) - 1
    lo = np.minimum.reduceat(step, np.flatnonzero(first))
    hi = np.maximum.reduceat(step, np.flatnonzero(first))
    return float(np.mean(lo == hi)) if len(group) else 0.0


def same_class_partner_rate(e: EpochSample, labels: np.ndarray) -> float:
    return float(np.mean(labels[e.pairs[:, 0]] == labels[e.pairs[:, 1]]))


def classes_per_step(e: EpochSample, labels: np.ndarray) -> np.ndarray:
    return np.array([len(np.unique(labels[s])) for s in e.steps])


def distinct_per_step(e: EpochSample) -> np.ndarray:
    return np.array([len(np.unique(s)) for s in e.steps])


# ---- what random sampling gives (the reference the tolerances come from) ------------------------
def same_class_probability(labels: np.ndarray) -> float:
    """P(two distinct random samples share a class): sum_c n_c (n_c - 1) / (N (N - 1))."""
    counts = np.bincount(labels).astype(np.float64)
    n = counts.sum()
    return float((counts * (counts - 1)).sum() / (n * (n - 1)))


def expected_classes(labels: np.ndarray, draw: int) -> tuple[float, float]:
    """Mean and a variance bound of the distinct classes in ``draw`` distinct random samples.

    Mean: sum_c 1 - C(N - n_c, d) / C(N, d) (hypergeometric: class c absent). The indicators
    "class c present" are negatively correlated, so their sum's variance is at most the sum of
    their Bernoulli variances, sum_c q_c (1 - q_c).
    """
    counts = np.bincount(labels)
    n = len(labels)
    absent = np.array([math.exp(math.lgamma(n - c + 1) - math.lgamma(n - c - draw + 1)
                                - math.lgamma(n + 1) + math.lgamma(n - draw + 1)) if n - c >= draw else 0.0
                       for c in counts])
    present = 1.0 - absent
    return float(present.sum()), float((present * absent).sum())


def same_shard_rate(e: EpochSample, shard_of: np.ndarray) -> float:
    """P(two distinct samples of a global batch come from one shard), averaged over the steps."""
    rates = []
    for s in e.steps:
        counts = np.bincount(shard_of[np.unique(s)]).astype(np.float64)
        d = counts.sum()
        rates.append((counts * (counts - 1)).sum() / (d * (d - 1)))
    return float(np.mean(rates))
