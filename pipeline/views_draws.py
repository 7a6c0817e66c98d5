"""The draws of a view: crop, flip, RandAugment ops, erasing boxes and mixing, as timm draws them.

Every number comes from ``views_plan.generator`` keyed by ``(seed, purpose)`` and positioned by
``(view, shard, slot)`` (or the pair), so the parameters of one slot are computed alone and
replayed anywhere; nothing here touches ``random``, ``numpy.random``'s global state or torch's
global generator. The sampling mirrors timm's (RandomResizedCropAndInterpolation.get_params,
RandAugment.__call__, RandomErasing, Mixup); only the source of the numbers is ours. Applying the
parameters to an image is ``pipeline.views_render``'s.
"""

from __future__ import annotations

import math
from functools import cached_property

import numpy as np

from .augment_ops import Op, build_rand_augment
from .recipes import Recipe
from .views_plan import (
    STREAM_MIX,
    STREAM_SLOT,
    Crop,
    Erase,
    MixParams,
    SlotParams,
    SlotView,
    generator,
    partner,
    slot_order,
)


class ViewDraws:
    """The parameters of every slot of every view for one recipe: pure functions of their keys.

    ``ViewRenderer`` (``pipeline.views_render``) is a ``ViewDraws`` that also renders.
    """

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    @cached_property
    def _rand_augment(self):
        """timm's RandAugment, built with the hparams ``timm.data.create_transform`` uses."""
        r = self.recipe
        return build_rand_augment(r.auto_augment, r.input_size, r.mean, r.interpolation)

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
