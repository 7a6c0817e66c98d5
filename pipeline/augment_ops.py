"""timm's RandAugment ops applied at a drawn magnitude and sign, in a leaf module.

``views`` draws which ops fire and renders them; ``recipes`` checks a RandAugment config by applying
each of its ops once. Both need the ops, and ``views`` needs ``recipes``' Recipe, so the ops live here,
importing nothing of ours, and neither of the two imports the other to reach them.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image
from timm.data.auto_augment import posterize, rand_augment_transform
from timm.data.transforms import str_to_pil_interp


@dataclass(frozen=True)
class Op:
    """One RandAugment op that fired. ``sign`` replaces the coin flip timm's level functions make."""
    name: str
    magnitude: float
    sign: int = 1


def build_rand_augment(config: str, input_size: int, mean, interpolation: str):
    """timm's RandAugment for a config string, built with the hparams ``timm.data.create_transform`` uses."""
    hparams = dict(translate_const=int(input_size * 0.45),
                   img_mean=tuple(min(255, round(255 * m)) for m in mean),
                   interpolation=str_to_pil_interp(interpolation))
    return rand_augment_transform(config, hparams)


def apply_augment_op(aug, img: Image.Image, op: Op) -> Image.Image:
    """One timm AugmentOp at our drawn magnitude and sign."""
    args = aug.level_fn(op.magnitude, aug.hparams) if aug.level_fn is not None else ()
    args = _with_sign(aug.level_fn, args, op.sign)
    if aug.aug_fn is posterize and args[0] <= 0:
        # Pillow >= 13 refuses 0 bits; older Pillow (and timm's intent) gave a black image.
        return Image.new(img.mode, img.size)
    return aug.aug_fn(img, *args, **aug.kwargs)


# timm's level functions that negate their argument with a global coin flip (_randomly_negate).
# We call them for the magnitude -> argument mapping and apply our own drawn sign instead.
_SIGNED = {"_rotate_level_to_arg", "_shear_level_to_arg", "_translate_abs_level_to_arg",
           "_translate_rel_level_to_arg"}
_SIGNED_AROUND_ONE = {"_enhance_increasing_level_to_arg"}  # max(0.1, 1 +- level)


def _with_sign(level_fn, args: tuple, sign: int) -> tuple:
    name = getattr(level_fn, "__name__", "")
    if name in _SIGNED:
        return (sign * abs(args[0]),)
    if name in _SIGNED_AROUND_ONE:
        return (max(0.1, 1.0 + sign * abs(args[0] - 1.0)),)
    return tuple(args)
