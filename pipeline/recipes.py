"""Augmentation recipes as data: a named preset plus ``key=value`` overrides.

The numbers of the ``deit`` preset are the official DeiT repo's defaults (docs/DESIGN.md, "Recipe defaults").
A recipe is part of a label store's identity: the stored teacher labels are only valid for
views rendered with exactly this recipe.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


class RecipeError(ValueError):
    """Unknown preset or key, or a value of the wrong type: one line, with the fix."""


@dataclass(frozen=True)
class Recipe:
    name: str = "deit"
    input_size: int = 224
    # RandomResizedCrop
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    hflip: float = 0.5
    # RandAugment, timm's config string (None: off)
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    # normalisation of the final tensor
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    # random erasing (timm RandomErasing, mode pixel: per-pixel normal noise)
    re_prob: float = 0.25
    re_count: int = 1
    re_min_area: float = 0.02
    re_max_area: float = 1 / 3
    re_min_aspect: float = 0.3
    # mixup / cutmix on slot pairs (timm Mixup semantics, lambda corrected to the box area)
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1
    # repeated augmentation (Hoffer et al.; DeiT's RASampler): in each view a shard's slots hold
    # ceil(n / repeats) of its samples, each `repeats` times, each time differently augmented
    repeats: int = 3
    # evaluation: resize then centre crop
    eval_crop_pct: float = 0.875

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise RecipeError(f"unknown recipe key(s) {unknown}; known keys: {', '.join(fields)}")
        recipe = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
        if recipe.repeats < 1:
            raise RecipeError(f"repeats must be >= 1 (1 turns repeated augmentation off), got {recipe.repeats}")
        if recipe.input_size < 8:
            raise RecipeError(f"input_size must be >= 8 pixels, got {recipe.input_size}")
        return recipe

    @property
    def mixes(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


PRESETS: dict[str, dict] = {
    "deit": {},
    # FKD-style cheap recipe: crop and flip only, so a store is valid for any later mixing-free run.
    "crop-flip": dict(auto_augment=None, re_prob=0.0, mixup_alpha=0.0, cutmix_alpha=0.0, mix_prob=0.0, repeats=1),
}


def create_recipe(name: str = "deit", overrides: dict | list[str] | tuple[str, ...] | None = None) -> Recipe:
    """A preset by name plus overrides (a dict, or ``key=value`` strings as given to ``--set``)."""
    if name not in PRESETS:
        raise RecipeError(f"unknown recipe {name!r}; choose one of: {', '.join(PRESETS)}")
    base = Recipe(name=name, **PRESETS[name]).to_dict()
    items = parse_overrides(overrides) if not isinstance(overrides, dict) else overrides
    for key, value in items.items():
        if key not in base or key == "name":
            raise RecipeError(f"unknown recipe key {key!r} in --set; known keys: "
                              f"{', '.join(k for k in base if k != 'name')}")
        base[key] = _coerce(key, value, base[key])
    return Recipe.from_dict(base)


def parse_overrides(items: list[str] | tuple[str, ...] | None) -> dict:
    out = {}
    for item in items or ():
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key=value, e.g. --set re_prob=0")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _coerce(key: str, value, default):
    """Parse a string override into the type of the preset's value."""
    if not isinstance(value, str):
        return value
    if value.lower() in ("none", "null", "off") and key == "auto_augment":
        return None
    try:
        if isinstance(default, bool):
            return value.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, list):
            parts = [float(p) for p in value.strip("()[]").split(",")]
            if len(parts) != len(default):
                raise ValueError
            return parts
    except ValueError:
        raise RecipeError(f"--set {key}={value}: expected {type(default).__name__} like {default}") from None
    return value
