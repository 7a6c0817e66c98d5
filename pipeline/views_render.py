"""Rendering a view: the drawn parameters applied to a decoded image, then mixed with its partner's.

The image operations are timm's and torchvision's own (RandomResizedCrop via ``F.resized_crop``,
timm's RandAugment op functions, timm's erasing and mixing semantics); the parameters come from
``pipeline.views_draws``, so rendering draws nothing (the erasing noise is generated from the
seed the draws recorded). ``mixed_targets`` is the ground-truth side of the same mixing.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image
from timm.data.transforms import str_to_interp_mode

from .augment_ops import Op, apply_augment_op
from .recipes import Recipe
from .views_draws import ViewDraws
from .views_plan import MixParams, SlotParams, SlotView, generator


class ViewRenderer(ViewDraws):
    """Draws parameters and renders views for one recipe. Holds no random state.

    >>> r = ViewRenderer(create_recipe("deit"))
    >>> sv = r.plan(seed, view, shard, n)[slot]       # or r.slot_view(seed, view, shard, slot, order)
    >>> x = r.render_slot(seed, sv, img, partner_img)  # exact tensor; partner_img: sv.partner_position's image
    """

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        self.size = (recipe.input_size, recipe.input_size)
        self.interp = str_to_interp_mode(recipe.interpolation)
        # (x / 255 - mean) / std as x * scale + bias: ToTensor + Normalize in two passes, not four.
        std = np.asarray(recipe.std, dtype=np.float64)
        self._scale = (1.0 / (255.0 * std)).astype(np.float32).reshape(3, 1, 1)
        self._bias = (-np.asarray(recipe.mean) / std).astype(np.float32).reshape(3, 1, 1)

    @cached_property
    def _ops_by_name(self):
        return {op.name: op for op in self._rand_augment.ops}

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
