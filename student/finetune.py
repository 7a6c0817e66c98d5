"""Fine-tuning a trained student at a new input size and/or on a new class set, with distillation.

    python cli.py precompute --data NEW --out STORE48 --teacher ... --input-size 48
    python cli.py train --data NEW --labels STORE48 --out RUN48 --finetune RUN32/checkpoint.pth \
        --model deit_tiny_distilled_patch16_224 --model-kwargs '{"img_size": 48, ...}'

The official DeiT repo fine-tunes (main.py ``--finetune``) but refuses to do it with distillation
(``NotImplementedError("Finetuning with distillation not yet supported")``): its teacher would have
to run at the new size next to the student. Here the teacher ran once, in ``precompute`` at the new
size, so fine-tuning with distillation is ordinary training from a store plus the start below.

What is taken from the checkpoint follows DeiT's main.py ``--finetune`` block:

- the raw weights (our ``RUN/checkpoint.pth``: ``"model"``; a timm/DeiT file: a bare state_dict or one
  under ``"model"``/``"state_dict"``; the EMA weights only in a file that holds nothing else, read by
  ``storage.checkpoint.unwrap_state_dict`` as the teacher reads its weights), never the optimizer or
  schedule: a fine-tune is a new run with its own schedule;
- ``head``/``head_dist`` (any classifier of the model, per timm's ``pretrained_cfg["classifier"]``)
  are dropped when their shape differs from the new model's, i.e. when the class count changed: the
  new model's freshly initialised heads are kept (both of them for a distilled DeiT); with the same
  classes they are loaded, as DeiT does for its 224 -> 384 fine-tune;
- the absolute position embedding is resampled to the new patch grid exactly as DeiT's main.py does
  (``F.interpolate(pos_tokens, size=new, mode='bicubic', align_corners=False)`` on the grid tokens,
  class and distillation tokens kept as they are), computed by timm's own
  ``timm.layers.resample_abs_pos_embed`` with ``antialias=False``. timm's default is antialias=True
  (what ``checkpoint_filter_fn`` uses), which is another kernel (torch's antialiased bicubic uses
  a = -0.5, the plain one a = -0.75): on random position embeddings it differs from DeiT's by 57-76%
  of the largest value when shrinking and 7-9% when growing (benchmarks/pos_embed_resample.py).
  tests/test_finetune.py compares our bytes with DeiT's formula written out.

Everything else must match the new model key for key and shape for shape; a checkpoint of another
architecture (depth, width, patch size) is a one-line TrainError naming the first mismatch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from storage import checkpoint

from .errors import TrainError

# DeiT's fine-tuning recipe, from the official README (facebookresearch/deit, README_deit.md,
# "To finetune a DeiT-base on 384 resolution images for 30 epochs"):
#   run_with_submitit.py --model deit_base_patch16_384 --batch-size 32 --nodes 2 (x 8 GPUs: global 512)
#     --finetune .../deit_base_patch16_224-b5f2ef4d.pth --input-size 384
#     --lr 5e-6 --weight-decay 1e-8 --epochs 30 --min-lr 5e-6
# main.py scales --lr by global batch / 512, as TrainConfig.lr does, so 5e-6 is "for a batch of 512";
# it does not scale --min-lr, so at its global batch of 512 lr == min-lr: a flat schedule. We keep the
# flat schedule at any batch: min_lr defaults to the *scaled* lr (finetune_defaults below); a constant
# 5e-6 would make the "cosine" climb from 7.8e-8 to 5e-6 at batch 8. Warmup: main.py's default (5 epochs
# from 1e-6) was left on in that command; we use none (a flat lr from a trained model needs no ramp).
# Everything else (augmentation, drop path 0.1, EMA, label smoothing) keeps the training defaults, as
# that command does. Each value is only a default: an explicit flag wins.
FINETUNE_DEFAULTS = {"epochs": 30, "lr": 5e-6, "min_lr": None, "weight_decay": 1e-8, "warmup_epochs": 0}


def finetune_defaults(lr: float, global_batch: int) -> dict:
    """FINETUNE_DEFAULTS with min_lr resolved: the lr after scaling by global_batch / 512 (flat schedule)."""
    return {**FINETUNE_DEFAULTS, "min_lr": lr * global_batch / 512}


def with_finetune_defaults(options: dict, explicit: set[str]) -> dict:
    """``cli.py train --finetune`` options: DeiT's fine-tuning recipe for every option not in ``explicit``
    (those the user set). The global batch is this process's batch times torchrun's WORLD_SIZE."""
    lr = options["lr"] if "lr" in explicit else FINETUNE_DEFAULTS["lr"]
    defaults = finetune_defaults(lr, options["batch_size"] * int(os.environ.get("WORLD_SIZE", 1)))
    return {**options, **{k: v for k, v in defaults.items() if k not in explicit}}


@dataclass
class FinetuneStart:
    """What loading a checkpoint into the new model did (logged, and kept in the run's summary)."""

    path: str
    loaded: int                                       # tensors taken from the checkpoint
    reset_heads: list[str] = field(default_factory=list)  # classifier keys left freshly initialised
    pos_embed: tuple[list[int], list[int]] | None = None  # (old grid, new grid) when resampled

    def describe(self) -> str:
        parts = [f"{self.loaded} tensors from {self.path}"]
        if self.pos_embed:
            (a, b), (c, d) = self.pos_embed
            parts.append(f"position embedding resampled {a}x{b} -> {c}x{d} patches")
        if self.reset_heads:
            parts.append(f"re-initialised (new class count): {', '.join(self.reset_heads)}")
        return "; ".join(parts)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The weights in a checkpoint file: bare, or under a container key (storage.checkpoint.CONTAINERS:
    "model" first, so our checkpoints give their raw weights); wrapper prefixes removed."""
    if not os.path.isfile(path):
        raise TrainError(f"--finetune {path}: no such file; pass a checkpoint (RUN/checkpoint.pth of "
                         "`cli.py train`, or a timm/DeiT .pth/.safetensors file)")
    obj = checkpoint.load_data(path, context=f"--finetune {path}: cannot read it", error=TrainError,
                               fix="pass a checkpoint holding tensors (a state_dict)")
    state = checkpoint.unwrap_state_dict(obj)
    if state is None:
        found = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, Mapping) else type(obj).__name__
        raise TrainError(f"--finetune {path}: no state_dict in it (found: {found}); pass a file holding a "
                         f"bare state_dict or one under {' or '.join(repr(k) for k in checkpoint.CONTAINERS)}")
    return state


def classifier_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the model's classifier head(s): ``head.*`` and ``head_dist.*`` for a distilled
    DeiT, ``fc.*`` for a ResNet (timm's ``pretrained_cfg["classifier"]``)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    names = (names,) if isinstance(names, str) else tuple(names)
    if hasattr(model, "head_dist") and "head_dist" not in names:
        names += ("head_dist",)
    return [k for k in model.state_dict() if any(k == n or k.startswith(n + ".") for n in names)]


def pos_embed_prefix_tokens(model: nn.Module) -> int:
    """Tokens at the front of ``pos_embed`` that are not grid positions (class, distillation), as timm counts
    them in ``checkpoint_filter_fn``."""
    return 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))


def resample_pos_embed(pos_embed: torch.Tensor, model: nn.Module) -> tuple[torch.Tensor, list[int] | None]:
    """``pos_embed`` of a checkpoint, resampled as DeiT does (bicubic, no antialias) to ``model``'s patch grid
    (square source grid, as timm and DeiT assume). Returns (tensor, old grid), old grid None when nothing changed."""
    prefix = pos_embed_prefix_tokens(model)
    new = list(model.patch_embed.grid_size)
    positions = pos_embed.shape[1] - prefix
    side = math.isqrt(max(positions, 0))
    if side * side != positions:
        raise TrainError(f"--finetune: the checkpoint's pos_embed holds {pos_embed.shape[1]} tokens, which is not "
                         f"{prefix} prefix tokens plus a square grid; it is not a {type(model).__name__} checkpoint")
    if [side, side] == new and pos_embed.shape == model.pos_embed.shape:
        return pos_embed, None
    # antialias=False: DeiT's main.py interpolates without it (timm's default is True, another kernel).
    out = resample_abs_pos_embed(pos_embed, new_size=new, old_size=[side, side], num_prefix_tokens=prefix,
                                 interpolation="bicubic", antialias=False)
    return out, [side, side]


def adapt_state_dict(state: dict[str, torch.Tensor], model: nn.Module,
                     path: str = "checkpoint") -> tuple[dict[str, torch.Tensor], FinetuneStart]:
    """The checkpoint's weights made to fit ``model``: heads of another shape dropped, pos_embed resampled.
    Pure: ``state`` is not modified. Raises TrainError on any other mismatch."""
    own = model.state_dict()
    heads = set(classifier_keys(model))
    out, reset, grids = dict(state), [], None
    for key in sorted(heads):
        if key in out and out[key].shape != own[key].shape:
            del out[key]
            reset.append(key)
    if reset:
        # Both heads together (DeiT: head and head_dist): a new class count never keeps half a classifier.
        reset = sorted(k for k in heads if k in state)
        for key in reset:
            out.pop(key, None)
    if "pos_embed" in out and getattr(model, "pos_embed", None) is not None and hasattr(model, "patch_embed"):
        out["pos_embed"], old = resample_pos_embed(out["pos_embed"], model)
        if old is not None:
            grids = (old, list(model.patch_embed.grid_size))
    missing = [k for k in own if k not in out and k not in reset]
    unexpected = [k for k in out if k not in own]
    if missing or unexpected:
        what = (f"the model has {missing[0]!r}, the checkpoint does not" if missing else
                f"the checkpoint has {unexpected[0]!r}, the model does not")
        n = len(missing) + len(unexpected)
        raise TrainError(f"--finetune {path} does not fit --model: {what} ({n} key(s) differ); pass the "
                         "--model/--model-kwargs it was trained with (img_size and classes may change)")
    for key, value in out.items():
        if value.shape != own[key].shape:
            raise TrainError(f"--finetune {path} does not fit --model: {key} is {list(value.shape)} in the "
                             f"checkpoint, {list(own[key].shape)} in the model; pass the --model/--model-kwargs "
                             "it was trained with (only img_size and the class count may change)")
    return out, FinetuneStart(path, loaded=len(out), reset_heads=reset, pos_embed=grids)


def check_input_size(model: nn.Module, input_size: int) -> None:
    """A ViT is built for one image size: it must be the store's (the views the teacher labelled)."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is None or getattr(model, "dynamic_img_size", False):
        return
    if tuple(img_size) != (input_size, input_size):
        raise TrainError(f"--finetune: the student is built for {img_size[0]}x{img_size[1]} px, the views are "
                         f"{input_size} px; add \"img_size\": {input_size} to --model-kwargs")


def load_finetune(model: nn.Module, path: str, input_size: int) -> FinetuneStart:
    """Start ``model`` (built for the new size and classes) from the checkpoint at ``path``."""
    check_input_size(model, input_size)
    state, start = adapt_state_dict(read_state_dict(path), model, path)
    own = model.state_dict()
    model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in state.items()}}, strict=True)
    return start  # student.train says start.describe() on the console
