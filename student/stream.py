"""The epoch stream: the order stage two visits (shard, slot) in one epoch, the same on every rank.

Whole repeated-augmentation windows (``window_slots``) of a group of shards, interleaved in a
seeded order, so that a sample's copies and every mixing pair stay contiguous while a global
batch spans shards. Only training reads views in this order (precompute walks its units), so it
lives beside the loader (``student.data``), drawn from the view contract's generator on its own
purpose (``STREAM_EPOCH``): changing the stream never changes a view.
"""

from __future__ import annotations

import numpy as np

from pipeline.views_plan import STREAM_EPOCH, generator, ra_window


def window_slots(repeats: int) -> int:
    """Slots per repeated-augmentation window (R * w): the unit the epoch stream moves whole."""
    w, template = ra_window(repeats)
    return len(template)


def epoch_shard_order(seed: int, epoch: int, num_shards: int) -> np.ndarray:
    """The order in which training visits shards in one epoch."""
    return generator(seed, STREAM_EPOCH, epoch).permutation(num_shards)


# Shards whose windows one stretch of the epoch stream interleaves. A global batch then draws
# from up to this many shards, and which samples share a batch changes every epoch. It is part
# of the stream (what a run trains on), not of the store: changing it changes training runs.
STREAM_GROUP_SHARDS = 8


def epoch_stream(seed: int, epoch: int, shard_sizes, repeats: int,
                 group: int = STREAM_GROUP_SHARDS) -> np.ndarray:
    """The epoch's global stream of (shard, slot), [N, 2] int64, before invalid views are left out.

    The shards, in ``epoch_shard_order``, are cut into groups of ``group``; within a group the
    windows (``window_slots(repeats)`` consecutive slots; a shard's last may be shorter) of all
    its shards follow each other in a seeded order. Windows move whole, so a sample's copies and
    every mixing pair stay contiguous. A pure function of its arguments: the same on every rank.
    """
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    L = window_slots(repeats)
    order = epoch_shard_order(seed, epoch, len(sizes))
    parts = []
    for gi, start in enumerate(range(0, len(order), group)):
        shards = order[start:start + group]
        nwin = -(-sizes[shards] // L)
        win_shard = np.repeat(shards, nwin)
        win_start = np.concatenate([np.arange(k, dtype=np.int64) * L for k in nwin]) if len(nwin) else win_shard
        win_len = np.minimum(L, sizes[win_shard] - win_start)
        perm = generator(seed, STREAM_EPOCH, epoch, gi + 1).permutation(len(win_shard))
        win_shard, win_start, win_len = win_shard[perm], win_start[perm], win_len[perm]
        total = int(win_len.sum())
        offsets = np.concatenate([[0], np.cumsum(win_len)[:-1]])
        slot = np.arange(total, dtype=np.int64) - np.repeat(offsets - win_start, win_len)
        parts.append(np.stack([np.repeat(win_shard, win_len), slot], axis=1))
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, 2), np.int64)
