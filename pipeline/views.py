"""The view contract: which sample every slot holds, how it is augmented, and the exact tensor.

Both stages render every view through this module, so they agree on what the student sees:
``precompute`` renders each view and stores the teacher's answer at ``(view, shard, slot)``;
``train`` renders the same view again and reads the answer back. The rest of the contract lives
beside it: which image a ``(shard, position)`` holds is the manifest's (``pipeline.sources``), the
augmentation settings are the recipe's (``pipeline.recipes``), and ``pipeline.probes`` re-renders a
few views before use to catch a Pillow, timm or torch that renders them differently now.

A view is a pure function of ``(seed, recipe, view, shard, slot)`` (and the decoded image):

- ``slot_order``: within shard ``j``, view ``v`` visits the shard's samples in a seeded
  permutation; slot ``s`` holds the sample at position ``slot_order(...)[s]``. With repeated
  augmentation (``recipe.repeats = R > 1``, DeiT's default 3) a view holds about ``n / R`` of
  the samples, each R times, as DeiT's RASampler does per epoch, laid out in windows of a few
  samples (``ra_window``: R round-robin rounds, 12 slots for R = 3) so that the copies of a
  sample fall in one optimizer step, each with another mixing partner; each repeat is its own
  slot, hence its own augmentation, and no sample is ever mixed with itself.
- slots ``(2m, 2m+1)`` are mixing partners. They share one ``MixParams`` (mode, lambda, box):
  slot ``2m`` is ``A`` with ``B`` mixed in, slot ``2m+1`` is ``B`` with ``A`` mixed in (timm's
  Mixup with each pair as a batch of two). Mixing therefore never depends on batch size,
  worker count or GPU count. An odd last slot is left unmixed.
- every slot's crop, flip, RandAugment ops and magnitudes, and erasing boxes are drawn by
  ``slot_params`` from a counter-based generator (numpy's Philox) keyed by the numbers above;
  the erasing noise comes from a seed drawn there too. Nothing here touches ``random``,
  ``numpy.random``'s global state or torch's global generator.

The image operations are timm's and torchvision's own (RandomResizedCrop via
``F.resized_crop``, timm's RandAugment op functions, timm's erasing and mixing semantics);
only the *draws* are ours, so that they can be replayed.

Three rooms, one job each, and this module their front door (every name below is theirs):
``views_plan`` (the generator, the slot layout, the partners, the parameter dataclasses: no
image), ``views_draws`` (``ViewDraws``: the parameters of a slot or a pair, as timm draws them)
and ``views_render`` (``ViewRenderer``, a ``ViewDraws`` that renders; ``mix_pair``,
``mixed_targets``). The order training visits views in an epoch is stage two's
(``student.stream``).
"""

from .augment_ops import Op
from .views_draws import ViewDraws
from .views_plan import (
    STREAM_EPOCH,
    STREAM_MIX,
    STREAM_ORDER,
    STREAM_SLOT,
    Crop,
    Erase,
    MixParams,
    SlotParams,
    SlotView,
    generator,
    partner,
    ra_window,
    slot_order,
)
from .views_render import ViewRenderer, mix_pair, mixed_targets

__all__ = [
    "STREAM_EPOCH", "STREAM_MIX", "STREAM_ORDER", "STREAM_SLOT", "Crop", "Erase", "MixParams", "Op", "SlotParams",
    "SlotView", "ViewDraws", "ViewRenderer", "generator", "mix_pair", "mixed_targets", "partner", "ra_window",
    "slot_order",
]
