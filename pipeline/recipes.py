"""Augmentation recipes as data: a named preset plus ``key=value`` overrides.

The numbers of the ``deit`` preset are the official DeiT repo's defaults (docs/DESIGN.md, "Recipe defaults").
A recipe is part of a label store's identity: the stored teacher labels are only valid for
views rendered with exactly this recipe.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass

from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from storage.errors import UserError


class RecipeError(UserError, ValueError):
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
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        if isinstance(values.get("auto_augment"), str) and values["auto_augment"].strip().lower() in _AA_OFF:
            values["auto_augment"] = None
        return cls(**values)

    def __post_init__(self):
        check_recipe(self)  # every way of making a recipe (preset, --set, a store's JSON) is checked here

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
    if value.strip().lower() in _AA_OFF and key == "auto_augment":
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


# ---- ranges: a bad value is refused when the recipe is made, before any store or view exists ----
_AA_OFF = ("", "none", "null", "off")
MAX_INPUT_SIZE = 4096   # a view is 3 x size^2 float32: 4096 px is 200 MB per view already
MAX_RE_COUNT = 64       # erasing boxes per view (timm's default is 1)
# Repeated augmentation lays R copies of R + 1 samples into an R * (R + 1)-slot window (views.ra_window):
# the window grows as R squared, and past a few dozen copies a view is mostly repeats of few samples.
MAX_REPEATS = 64


def _number(key: str, value, kind=float) -> float:
    """A finite number of the field's type (an int field takes ints only; bools are not numbers)."""
    ok_types = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types) or not math.isfinite(value):
        raise RecipeError(f"recipe {key} must be a finite {'integer' if kind is int else 'number'}, got {value!r}; "
                          f"fix --set {key}=...")
    return value


def _in(key: str, value, lo: float, hi: float, lo_open=False, hi_open=False, kind=float, why: str = "") -> None:
    v = _number(key, value, kind)
    if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
        if math.isinf(hi):
            where = f"be {'>' if lo_open else '>='} {lo:g}"
        else:
            where = f"lie in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise RecipeError(f"recipe {key} must {where}{why}, got {value!r}; fix --set {key}=...")


def _pair(key: str, value, n: int = 2) -> tuple:
    if not isinstance(value, tuple | list) or len(value) != n:
        raise RecipeError(f"recipe {key} must be {n} numbers, got {value!r}; e.g. --set {key}="
                          f"{','.join(['0.5'] * n)}")
    return tuple(_number(key, v) for v in value)


def _known_interpolations() -> tuple[str, ...]:
    # views.py maps the name with both of timm's tables (torchvision for the crop, PIL for RandAugment)
    from timm.data.transforms import _str_to_pil_interpolation, _str_to_torch_interpolation

    return tuple(k for k in _str_to_torch_interpolation if k in _str_to_pil_interpolation)


def check_recipe(r: Recipe) -> None:
    """Every recipe value against its range; RecipeError (one line, the key and the fix) on the first bad one."""
    if not isinstance(r.name, str):
        raise RecipeError(f"recipe name must be a string, got {r.name!r}")
    _in("input_size", r.input_size, 8, MAX_INPUT_SIZE, kind=int, why=" pixels")
    lo, hi = _pair("scale", r.scale)
    if not 0 < lo <= hi <= 1:
        raise RecipeError(f"recipe scale must be (lo, hi) with 0 < lo <= hi <= 1 (crop area / image area), "
                          f"got {list(r.scale)}; e.g. --set scale=0.08,1")
    lo, hi = _pair("ratio", r.ratio)
    if not 0 < lo <= hi:
        raise RecipeError(f"recipe ratio must be (lo, hi) with 0 < lo <= hi (crop aspect ratio), got "
                          f"{list(r.ratio)}; e.g. --set ratio=0.75,1.3333")
    known = _known_interpolations()
    if r.interpolation not in known:
        raise RecipeError(f"recipe interpolation {r.interpolation!r} is not one timm knows; choose one of: "
                          f"{', '.join(known)}")
    _in("hflip", r.hflip, 0, 1, why=" (a probability)")
    mean, std = _pair("mean", r.mean, 3), _pair("std", r.std, 3)
    if not all(0 <= m <= 1 for m in mean):
        raise RecipeError(f"recipe mean must be 3 values in [0, 1] (pixel means on a 0-1 scale), got {list(mean)}")
    if not all(1e-3 <= s <= 1 for s in std):
        raise RecipeError(f"recipe std must be 3 values in [0.001, 1] (pixel stds on a 0-1 scale), got {list(std)}")
    _in("re_prob", r.re_prob, 0, 1, why=" (a probability)")
    _in("re_count", r.re_count, 1, MAX_RE_COUNT, kind=int, why=" (erasing boxes per view)")
    _in("re_min_area", r.re_min_area, 0, 1, lo_open=True, why=" (a fraction of the view)")
    _in("re_max_area", r.re_max_area, r.re_min_area, 1, why=" (from re_min_area to the whole view)")
    _in("re_min_aspect", r.re_min_aspect, 0, 1, lo_open=True, why=" (boxes take aspects from it to its inverse)")
    for key in ("mixup_alpha", "cutmix_alpha"):
        _in(key, getattr(r, key), 0, math.inf, hi_open=True, why=" (0 turns it off)")
    for key in ("mix_prob", "switch_prob"):
        _in(key, getattr(r, key), 0, 1, why=" (a probability)")
    _in("label_smoothing", r.label_smoothing, 0, 1, hi_open=True)
    _in("repeats", r.repeats, 1, MAX_REPEATS, kind=int, why=" (1 turns repeated augmentation off; DeiT uses 3)")
    _in("eval_crop_pct", r.eval_crop_pct, 0, 1, lo_open=True, why=" (the centre crop's share of the resized image)")
    if r.auto_augment is not None:
        _check_auto_augment(r.auto_augment, r.input_size, tuple(mean), r.interpolation)


@functools.lru_cache(maxsize=64)
def _check_auto_augment(config: str, input_size: int, mean: tuple, interpolation: str) -> None:
    """The string must be a RandAugment config timm parses, and every op it makes must apply:
    each op is tried once at magnitude 0 and at its maximum, both signs, on a small image."""
    fix = "e.g. rand-m9-mstd0.5-inc1 (DeiT's), or none to turn it off"
    if not isinstance(config, str) or not config.startswith("rand"):
        raise RecipeError(f"recipe auto_augment {config!r} is not a RandAugment config; {fix}")
    from PIL import Image

    from .augment_ops import Op, apply_augment_op, build_rand_augment

    try:
        ra = build_rand_augment(config, input_size, mean, interpolation)
        if not 0 <= ra.num_layers <= len(ra.ops):
            raise ValueError(f"n{ra.num_layers}: choose 0 to {len(ra.ops)} ops per view")
        img = Image.new("RGB", (16, 16), (120, 60, 200))
        for aug in ra.ops:
            for magnitude in (0.0, float(aug.magnitude_max or 10.0)):
                for sign in (1, -1):
                    apply_augment_op(aug, img, Op(aug.name, magnitude, sign))
    except Exception as e:  # noqa: BLE001 - timm asserts, raises KeyError/ValueError for bad strings
        detail = " ".join(str(e).split())[:120] or type(e).__name__
        raise RecipeError(f"recipe auto_augment {config!r} is not a RandAugment config timm can apply "
                          f"({detail}); {fix}") from None
