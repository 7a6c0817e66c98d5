"""Weights files: a state_dict from any ``.pth``/``.pt``/``.safetensors`` a user may hand us, loaded as
data only, checked against the model before loading, and hashed for the teacher's identity."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import torch

from storage import checkpoint

from .teacher_runtime import TeacherError


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from a .pth/.pt/.safetensors file: bare, or nested under a container key
    (storage.checkpoint.CONTAINERS: ``model``, ``state_dict``, ``model_ema``, ``state_dict_ema``,
    ``ema``), with DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes removed."""
    path = check_weights_file(path)
    obj = checkpoint.load_data(path, context=f"cannot read teacher weights {path}", error=TeacherError,
                               fix="pass a .pth/.pt/.safetensors file holding a state_dict")
    state = checkpoint.unwrap_state_dict(obj)
    if state is None:
        found = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, Mapping) else type(obj).__name__
        raise TeacherError(
            f"teacher weights {path} hold no state_dict (found: {found}); pass a file with a bare "
            f"state_dict or one under {'/'.join(checkpoint.CONTAINERS)}"
        )
    return state


def trained_data_config(path: str | os.PathLike) -> dict | None:
    """input_size/mean/std of the views a `cli.py train` checkpoint was trained on; None for files that
    are not train checkpoints of ours (bare state_dicts, safetensors, other tools' checkpoints).

    Plain training keeps its recipe in the checkpoint's config; training from a label store keeps
    the store's spec (with its recipe) in the checkpoint's identity. A train checkpoint whose config or
    recipe is missing or does not read is refused in one line: labelling at the architecture's
    default size instead would give labels of views the teacher never saw.
    """
    path = check_weights_file(path)
    if path.endswith(".safetensors"):
        return None
    obj = checkpoint.load_data(path, context=f"cannot read teacher weights {path}", error=TeacherError,
                               fix="pass a .pth/.pt/.safetensors file holding a state_dict")
    if not checkpoint.is_train_checkpoint(obj):
        return None
    from ..recipes import Recipe, create_recipe

    fix = "restore the checkpoint as `cli.py train` wrote it, or train the teacher again"
    ckpt = checkpoint.TrainCheckpoint.from_dict(obj, path)
    if checkpoint.missing(obj, (checkpoint.CONFIG,)):
        raise TeacherError(f"teacher weights {path} are a `cli.py train` checkpoint without its config (the "
                           f"size and normalisation of the views it was trained on); {fix}")
    store = (ckpt.identity or {}).get("store") if isinstance(ckpt.identity, Mapping) else None
    try:
        if isinstance(store, Mapping) and isinstance(store.get("recipe"), Mapping):
            recipe = Recipe.from_dict(dict(store["recipe"]))
        else:
            config = ckpt.config
            size = config.get("input_size")
            recipe = create_recipe(config.get("recipe") or "deit",
                                   list(config.get("overrides") or []) + ([f"input_size={size}"] if size else []))
    except Exception as e:  # noqa: BLE001 - a RecipeError, or a TypeError/KeyError of a damaged dict
        raise TeacherError(f"teacher weights {path} are a `cli.py train` checkpoint whose recipe does not read "
                           f"({type(e).__name__}: {' '.join(str(e).split())[:160]}); {fix}") from None
    return {"input_size": recipe.input_size, "mean": tuple(recipe.mean), "std": tuple(recipe.std)}


def load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], name: str, path: str) -> None:
    # Diagnose before loading: torch's strict error lists every key over many lines, while the
    # first mismatch is enough to tell a wrong architecture or head from a corrupt file.
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    fix = f"pass the timm name (and --model-kwargs) that {os.path.basename(path)} was trained with"
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing key {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        if unexpected:
            parts.append(
                f"unexpected key {unexpected[0]!r}"
                + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            )
        raise TeacherError(f"teacher weights {path} do not fit {name}: {', '.join(parts)}; {fix}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise TeacherError(
                f"teacher weights {path} do not fit {name}: {k!r} is {tuple(state[k].shape)} in the "
                f"file, {tuple(v.shape)} in the model; {fix}"
            )
    model.load_state_dict(state, strict=True)


def check_weights_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TeacherError(
            f"teacher weights file {path} does not exist; pass an existing file to --teacher-weights"
        )
    return path


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
