"""The plan of a view: which sample every slot holds, who mixes with whom, and the parameters' shapes.

The pure part of the view contract (``pipeline.views``): a counter-based generator keyed by
``(seed, purpose)``, the slot layout of a view of a shard (``slot_order``, repeated augmentation's
``ra_window``), the mixing pairs (``partner``), and the dataclasses the draws fill in
(``pipeline.views_draws``) and rendering applies (``pipeline.views_render``). Nothing here looks
at an image, and nothing here touches ``random``, ``numpy.random``'s global state or torch's
global generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .augment_ops import Op  # a slot's drawn RandAugment op

# Independent streams of the counter-based generator: one purpose each, so adding a draw to
# one purpose never shifts the numbers of another.
STREAM_SLOT, STREAM_MIX, STREAM_ORDER, STREAM_EPOCH = 1, 2, 3, 4
_U64 = (1 << 64) - 1


def generator(seed: int, stream: int, *counter: int) -> np.random.Generator:
    """A Philox generator keyed by (seed, stream) and positioned by up to three counter words.

    Word 0 of Philox's 256-bit counter is left for the draws themselves, so two keys never
    walk into each other's numbers however many draws one of them makes.
    """
    words = [0, *counter, *([0] * (3 - len(counter)))]
    return np.random.Generator(np.random.Philox(counter=[w & _U64 for w in words], key=[seed & _U64, stream]))


def ra_window(repeats: int) -> tuple[int, np.ndarray]:
    """(w, template): repeated augmentation's window of ``w`` samples laid out in ``R * w`` slots.

    The window is R rounds of a round-robin schedule (the circle method) over w players: each
    round pairs every player once, so every sample appears R times, each time with another
    partner, and no pair holds a sample twice. w = R + 1 for odd R (all R rounds of R + 1
    players: R = 3 is 4 samples, 3 pairings, 12 slots), R + 2 for even R (R of the R + 1
    rounds), 2 for R = 1 (one pair). ``template[s]`` is the player of slot s; players are
    numbered by first appearance, so round 0 is ``0, 1, ..., w - 1`` (a window cut short uses
    its first players first).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    w = 2 if repeats == 1 else repeats + 1 if repeats % 2 else repeats + 2
    rounds = []
    for r in range(repeats):  # circle method: player w-1 fixed, the others rotate
        pairs = [(r % (w - 1), w - 1)] + [((r + i) % (w - 1), (r - i) % (w - 1)) for i in range(1, w // 2)]
        rounds.extend(p for pair in pairs for p in pair)
    first = {}
    for p in rounds:
        first.setdefault(p, len(first))
    return w, np.asarray([first[p] for p in rounds], dtype=np.int64)


def slot_order(seed: int, view: int, shard: int, n: int, repeats: int = 1) -> np.ndarray:
    """Slot -> position within the shard for one view: ``n`` slots.

    repeats = 1: a seeded permutation of the ``n`` samples. repeats = R: the permutation is cut
    into windows of w samples (``ra_window``), each laid out as R rounds of w / 2 pairs in
    ``R * w`` consecutive slots, cut to ``n`` slots (a partial last window uses its first
    samples; about ``n / R`` samples are chosen, as DeiT's RASampler does per epoch). The R
    copies of a sample are thus at most ``R * w - 1`` slots apart (12 slots for R = 3), so they
    land in one optimizer step, each copy has another mixing partner (slots ``(2m, 2m+1)``), and
    no pair holds a sample twice. Each copy is its own slot, hence its own augmentation.
    """
    g = generator(seed, STREAM_ORDER, view, shard)
    order = g.permutation(n)
    if repeats == 1:
        return order
    w, template = ra_window(repeats)
    windows = -(-n // len(template))
    # Every index is < n: a full window k needs (k + 1) * w <= n samples, a cut one only its first.
    idx = (np.arange(windows, dtype=np.int64)[:, None] * w + template[None, :]).ravel()[:n]
    return order[idx]


def partner(slot: int, n: int) -> int | None:
    """The mixing partner of a slot: (2m, 2m+1) pair up; an odd last slot has none."""
    other = slot ^ 1
    return other if other < n else None


# ---- parameters: dataclasses a person can print ----------------------------------------
@dataclass(frozen=True)
class Crop:
    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class Erase:
    top: int
    left: int
    height: int
    width: int
    noise_seed: int  # per-pixel N(0, 1) noise is drawn from a generator keyed by this


@dataclass(frozen=True)
class SlotParams:
    crop: Crop
    flip: bool
    ops: tuple[Op, ...] = ()
    erase: tuple[Erase, ...] = ()


@dataclass(frozen=True)
class MixParams:
    mode: str = "none"  # "none", "mixup" or "cutmix"
    lam: float = 1.0     # weight of the slot's own sample (for cutmix: corrected to the box area)
    box: tuple[int, int, int, int] | None = None  # cutmix (y0, y1, x0, x1) in output pixels


@dataclass(frozen=True)
class SlotView:
    """Everything about one slot of one view, before the image is known."""
    view: int
    shard: int
    slot: int
    position: int
    partner_slot: int | None
    partner_position: int | None
    mix: MixParams = field(default_factory=MixParams)
