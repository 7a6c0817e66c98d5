"""The student: any timm classifier, with DeiT's distillation token when the model has one.

timm's `deit_*_distilled_*` (and `levit_*`) models carry a second token and a second head,
`head_dist`. In training with `set_distilled_training(True)` they return (cls_logits,
dist_logits), which is what `student.losses.deit_loss_terms` takes; in eval mode they return the
average of the two heads, which is DeiT's test-time rule. Every other timm model has one head,
and takes both loss terms on it.
"""

from __future__ import annotations

import difflib

import timm
import torch
import torch.nn as nn

from .errors import TrainError


def _bare(model: nn.Module) -> nn.Module:
    """Look through DistributedDataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def has_distillation_token(model: nn.Module) -> bool:
    """True for timm models with a distillation head (DeiT distilled ViTs, LeViT)."""
    model = _bare(model)
    has_second_head = isinstance(getattr(model, "head_dist", None), nn.Module)
    return has_second_head and hasattr(model, "set_distilled_training")


def create_student(
    name: str,
    *,
    num_classes: int,
    model_kwargs: dict | None = None,
    drop_path_rate: float | None = 0.1,
    pretrained: bool = False,
    img_size: int | None = None,
) -> nn.Module:
    """Build a timm student. `model_kwargs` (e.g. depth, embed_dim) shrink it for tests and demos.

    `drop_path_rate` and `img_size` are dropped when None (timm then keeps the model's own
    default; `img_size` only means something to models that take it, such as ViTs). A key given
    both in `model_kwargs` and as an argument must agree: a silently overridden class count or
    input size is the kind of mistake that shows up only after a day of training.
    """
    kwargs = dict(model_kwargs or {})
    arguments = {"num_classes": num_classes, "drop_path_rate": drop_path_rate, "img_size": img_size}
    for key, value in arguments.items():
        if value is None:
            continue
        if key in kwargs and kwargs[key] != value:
            raise TrainError(
                f"{key} given twice for {name}: {value} as an argument, {kwargs[key]} in model_kwargs"
            )
        kwargs[key] = value
    if not timm.is_model(name):
        near = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(near)}?" if near else "see timm.list_models() for names"
        raise TrainError(f"unknown student --model {name!r}; {hint}")
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:  # noqa: BLE001 - timm's models assert, raise TypeError/ValueError/RuntimeError on bad kwargs
        raise TrainError(f"timm cannot build {name} with {model_kwargs or {}} ({type(e).__name__}: "
                         f"{_one_line(e)}); fix --model-kwargs") from None
    if has_distillation_token(model):
        # Only affects train mode: there the model returns (cls, dist) for deit_loss_terms; in eval
        # mode it still returns the two heads' average.
        model.set_distilled_training(True)
    return model


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 160 else text[:157] + "..."


@torch.no_grad()
def check_views_fit(model: nn.Module, input_size: int, device: torch.device | str = "cpu") -> None:
    """The student must take the views as they are: a ViT is built for one image size (img_size in
    --model-kwargs), and any other mismatch shows up in one forward of one view, before training."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None and not getattr(model, "dynamic_img_size", False) \
            and tuple(img_size) != (input_size, input_size):
        raise TrainError(f"the student is built for {img_size[0]}x{img_size[1]} px, the views are {input_size} px; "
                         f"add \"img_size\": {input_size} to --model-kwargs")
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, input_size, input_size, device=device))
    except Exception as e:  # noqa: BLE001 - any architecture's complaint, as one line
        raise TrainError(f"the student cannot take {input_size} px views ({type(e).__name__}: {_one_line(e)}); "
                         "fix --model/--model-kwargs") from None
    finally:
        model.train(was_training)


@torch.no_grad()
def eval_logits(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits of the class head, the distillation head and their average (DeiT's test-time rule).

    For a one-head model all three are that head. The model must be in eval mode: in train mode
    drop path and dropout would be on, and a distilled model would return a tuple.
    """
    model = _bare(model)
    if model.training:
        raise ValueError("eval_logits needs model.eval() (drop path and dropout are on in train mode)")
    if not has_distillation_token(model):
        logits = model(x)
        return {"cls": logits, "dist": logits, "avg": logits}

    # Catch each head's output on the way through one ordinary forward pass. The model's own
    # output is the average, so the rule stays timm's and no internals (token layout, pooling,
    # which differ between DeiT and LeViT) are repeated here.
    heads = {}
    hooks = [
        module.register_forward_hook(lambda _m, _inp, out, key=key: heads.__setitem__(key, out))
        for key, module in (("cls", model.head), ("dist", model.head_dist))
    ]
    try:
        avg = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return {"cls": heads["cls"], "dist": heads["dist"], "avg": avg}
