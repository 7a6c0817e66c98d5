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
- ``epoch_stream``: the order training visits (shard, slot) in one epoch; whole windows of a
  group of shards interleaved, so a global batch spans shards.
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image
from timm.data.transforms import str_to_interp_mode

from .augment_ops import Op, apply_augment_op, build_rand_augment  # Op is re-exported: a slot's drawn op
from .recipes import Recipe

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


def window_slots(repeats: int) -> int:
    """Slots per repeated-augmentation window (R * w): the unit the epoch stream moves whole."""
    w, template = ra_window(repeats)
    return len(template)


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


# ---- the renderer -------------------------------------------------------------------------
class ViewRenderer:
    """Draws parameters and renders views for one recipe. Holds no random state.

    >>> r = ViewRenderer(create_recipe("deit"))
    >>> sv = r.plan(seed, view, shard, n)[slot]       # or r.slot_view(seed, view, shard, slot, order)
    >>> x = r.render_slot(seed, sv, img, partner_img)  # exact tensor; partner_img: sv.partner_position's image
    """

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.size = (recipe.input_size, recipe.input_size)
        self.interp = str_to_interp_mode(recipe.interpolation)
        # (x / 255 - mean) / std as x * scale + bias: ToTensor + Normalize in two passes, not four.
        std = np.asarray(recipe.std, dtype=np.float64)
        self._scale = (1.0 / (255.0 * std)).astype(np.float32).reshape(3, 1, 1)
        self._bias = (-np.asarray(recipe.mean) / std).astype(np.float32).reshape(3, 1, 1)

    @cached_property
    def _rand_augment(self):
        """timm's RandAugment, built with the hparams ``timm.data.create_transform`` uses."""
        r = self.recipe
        return build_rand_augment(r.auto_augment, r.input_size, r.mean, r.interpolation)

    @cached_property
    def _ops_by_name(self):
        return {op.name: op for op in self._rand_augment.ops}

    # -- draws ---------------------------------------------------------------------------
    def slot_params(self, seed: int, view: int, shard: int, slot: int, image_size: tuple[int, int]) -> SlotParams:
        """Crop, flip, RandAugment and erasing for one slot; ``image_size`` is PIL's (w, h)."""
        r = self.recipe
        g = generator(seed, STREAM_SLOT, view, shard, slot)
        crop = _random_resized_crop(g, image_size, r.scale, r.ratio)
        flip = bool(g.random() < r.hflip)
        ops = self._draw_ops(g) if r.auto_augment else ()
        erase = _random_erasing(g, r) if r.re_prob > 0 else ()
        return SlotParams(crop, flip, ops, erase)

    def _draw_ops(self, g: np.random.Generator) -> tuple[Op, ...]:
        # Same sampling as timm's RandAugment.__call__ and AugmentOp.__call__, from our generator.
        ra = self._rand_augment
        if ra.choice_weights is None:
            chosen = g.integers(0, len(ra.ops), ra.num_layers)
        else:
            chosen = g.choice(len(ra.ops), ra.num_layers, replace=False, p=ra.choice_weights)
        ops = []
        for i in chosen:
            op = ra.ops[int(i)]
            fires = op.prob >= 1.0 or g.random() <= op.prob
            magnitude = float(op.magnitude)
            if op.magnitude_std == float("inf"):
                magnitude = float(g.uniform(0, magnitude))
            elif op.magnitude_std > 0:
                magnitude = float(g.normal(magnitude, op.magnitude_std))
            magnitude = max(0.0, min(magnitude, op.magnitude_max or 10.0))
            sign = -1 if g.random() > 0.5 else 1
            if fires:
                ops.append(Op(op.name, magnitude, sign))
        return tuple(ops)

    def mix_params(self, seed: int, view: int, shard: int, pair: int) -> MixParams:
        """Mode, lambda and cutmix box shared by slots (2*pair, 2*pair+1); timm's Mixup draws."""
        r = self.recipe
        if not r.mixes:
            return MixParams()
        g = generator(seed, STREAM_MIX, view, shard, pair)
        if not g.random() < r.mix_prob:
            return MixParams()
        if r.mixup_alpha > 0 and r.cutmix_alpha > 0:
            use_cutmix = bool(g.random() < r.switch_prob)
        else:
            use_cutmix = r.cutmix_alpha > 0
        alpha = r.cutmix_alpha if use_cutmix else r.mixup_alpha
        lam = float(g.beta(alpha, alpha))
        if not use_cutmix:
            return MixParams("mixup", lam)
        h = w = r.input_size
        ratio = math.sqrt(1 - lam)
        cut_h, cut_w = int(h * ratio), int(w * ratio)
        cy, cx = int(g.integers(0, h)), int(g.integers(0, w))
        y0, y1 = int(np.clip(cy - cut_h // 2, 0, h)), int(np.clip(cy + cut_h // 2, 0, h))
        x0, x1 = int(np.clip(cx - cut_w // 2, 0, w)), int(np.clip(cx + cut_w // 2, 0, w))
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)  # timm's correct_lam: lambda = uncovered area
        return MixParams("cutmix", lam, (y0, y1, x0, x1))

    def slot_order(self, seed: int, view: int, shard: int, n: int) -> np.ndarray:
        return slot_order(seed, view, shard, n, self.recipe.repeats)

    def slot_view(self, seed: int, view: int, shard: int, slot: int, order: np.ndarray) -> SlotView:
        """One slot of one view, given the view's ``slot_order`` (cache it per shard): what a
        loader needs for the slots of one batch, without planning the whole shard."""
        n = len(order)
        p = partner(slot, n)
        mix = self.mix_params(seed, view, shard, slot // 2) if p is not None else MixParams()
        return SlotView(view, shard, slot, int(order[slot]), p, None if p is None else int(order[p]), mix)

    def plan(self, seed: int, view: int, shard: int, n: int) -> list[SlotView]:
        """Every slot of one view of one shard, in slot order."""
        order = self.slot_order(seed, view, shard, n)
        return [self.slot_view(seed, view, shard, slot, order) for slot in range(n)]

    # -- rendering -------------------------------------------------------------------------
    def apply(self, img: Image.Image, params: SlotParams) -> torch.Tensor:
        """Decoded image + parameters -> the exact normalised float32 tensor [3, H, W] (before mixing)."""
        c = params.crop
        img = F.resized_crop(img, c.top, c.left, c.height, c.width, list(self.size), self.interp)
        if params.flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for op in params.ops:
            img = self._apply_op(img, op)
        x = self.to_float(np.asarray(img, dtype=np.uint8))
        for e in params.erase:
            noise = generator(e.noise_seed, 0).standard_normal((3, e.height, e.width), dtype=np.float32)
            x[:, e.top:e.top + e.height, e.left:e.left + e.width] = noise
        return torch.from_numpy(x)

    def to_float(self, hwc: np.ndarray) -> np.ndarray:
        """uint8 HWC RGB -> normalised float32 CHW (contiguous).

        The view path computes in numpy on purpose: numpy's elementwise ops are single-threaded,
        while torch's intra-op threads fight the teacher (or a busy machine) for cores and made a
        0.2 ms normalisation take 10 ms.
        """
        chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))  # a uint8 copy: cheap
        x = np.multiply(chw, self._scale, dtype=np.float32)
        x += self._bias
        return x

    def _apply_op(self, img: Image.Image, op: Op) -> Image.Image:
        return apply_augment_op(self._ops_by_name[op.name], img, op)

    def render_slot(self, seed: int, sv: SlotView, img: Image.Image, partner_img: Image.Image | None) -> torch.Tensor:
        """The final tensor the teacher labels and the student trains on, for one slot."""
        x = self.apply(img, self.slot_params(seed, sv.view, sv.shard, sv.slot, img.size))
        if sv.partner_slot is None or sv.mix.mode == "none":
            return x
        y = self.apply(partner_img, self.slot_params(seed, sv.view, sv.shard, sv.partner_slot, partner_img.size))
        return mix_pair(x, y, sv.mix)

    def render_pair(self, seed: int, a: SlotView, img_a: Image.Image, img_b: Image.Image | None) -> list[torch.Tensor]:
        """Both slots of pair ``a.slot // 2`` at once (each image augmented once): [x_2m, x_2m+1]."""
        xa = self.apply(img_a, self.slot_params(seed, a.view, a.shard, a.slot, img_a.size))
        if a.partner_slot is None:
            return [xa]
        xb = self.apply(img_b, self.slot_params(seed, a.view, a.shard, a.partner_slot, img_b.size))
        if a.mix.mode == "none":
            return [xa, xb]
        return [mix_pair(xa, xb, a.mix), mix_pair(xb, xa, a.mix)]

    def eval_transform(self):
        """Resize then centre crop (crop_pct), normalise: DeiT's evaluation transform."""
        from timm.data import create_transform

        r = self.recipe
        return create_transform(r.input_size, is_training=False, interpolation=r.interpolation,
                                mean=r.mean, std=r.std, crop_pct=r.eval_crop_pct)


def mix_pair(own: torch.Tensor, other: torch.Tensor, mix: MixParams) -> torch.Tensor:
    """timm's Mixup for one sample: ``other`` mixed into ``own`` with weight ``1 - lam``."""
    a, b = own.numpy(), other.numpy()
    if mix.mode == "cutmix":
        y0, y1, x0, x1 = mix.box
        out = a.copy()
        out[:, y0:y1, x0:x1] = b[:, y0:y1, x0:x1]
        return torch.from_numpy(out)
    if mix.mode == "mixup":
        out = np.multiply(a, np.float32(mix.lam))
        out += np.multiply(b, np.float32(1.0 - mix.lam))
        return torch.from_numpy(out)
    return own


def mixed_targets(labels: np.ndarray, partner_labels: np.ndarray, lams: np.ndarray, num_classes: int,
                  smoothing: float) -> np.ndarray:
    """Ground truth of a batch of slots, [b, C] float32: label-smoothed one-hots mixed with each view's
    lambda (timm's mixup_target, one row per slot; a row's bytes do not depend on its batch-mates).

    ``partner_labels[i] < 0`` or ``lams[i]`` NaN means unmixed (no partner, or mode "none").
    """
    b = len(labels)
    rows = np.arange(b)
    t = np.full((b, num_classes), np.float32(smoothing / num_classes), dtype=np.float32)
    t[rows, labels] += np.float32(1.0 - smoothing)
    mixed = (partner_labels >= 0) & ~np.isnan(lams)
    if mixed.any():
        m = rows[mixed]
        u = np.full((len(m), num_classes), np.float32(smoothing / num_classes), dtype=np.float32)
        u[np.arange(len(m)), partner_labels[m]] += np.float32(1.0 - smoothing)
        lam = lams[m].astype(np.float64)
        t[m] = t[m] * lam.astype(np.float32)[:, None] + u * (1.0 - lam).astype(np.float32)[:, None]
    return t


# ---- the draws, as timm makes them -------------------------------------------------------
def _random_resized_crop(g: np.random.Generator, image_size, scale, ratio) -> Crop:
    """timm's RandomResizedCropAndInterpolation.get_params, drawn from ``g``."""
    img_w, img_h = image_size
    area = img_w * img_h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = g.uniform(*scale) * area
        aspect = math.exp(g.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if w <= img_w and h <= img_h:
            return Crop(int(g.integers(0, img_h - h + 1)), int(g.integers(0, img_w - w + 1)), h, w)
    in_ratio = img_w / img_h  # fallback: central crop
    if in_ratio < min(ratio):
        w, h = img_w, int(round(img_w / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(img_h * max(ratio))), img_h
    else:
        w, h = img_w, img_h
    return Crop((img_h - h) // 2, (img_w - w) // 2, h, w)


def _random_erasing(g: np.random.Generator, r: Recipe) -> tuple[Erase, ...]:
    """timm's RandomErasing (mode pixel) box draws on the output size, from ``g``."""
    if not g.random() < r.re_prob:
        return ()
    h_img = w_img = r.input_size
    area = h_img * w_img
    log_aspect = (math.log(r.re_min_aspect), math.log(1 / r.re_min_aspect))
    boxes = []
    for _ in range(r.re_count):
        for _ in range(10):
            target_area = g.uniform(r.re_min_area, r.re_max_area) * area / r.re_count
            aspect = math.exp(g.uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < w_img and h < h_img:
                top = int(g.integers(0, h_img - h + 1))
                left = int(g.integers(0, w_img - w + 1))
                boxes.append(Erase(top, left, h, w, int(g.integers(0, 1 << 63))))
                break
    return tuple(boxes)
