"""Weights files: a state_dict from any ``.pth``/``.pt``/``.safetensors`` a user may hand us, loaded as
data only, checked against the model before loading, and hashed for the teacher's identity."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import torch

from storage.fsutil import load_error_cause

from .teacher_runtime import TeacherError

# Checkpoint containers, in the order we look inside them. Our own train checkpoints hold
# both "model" and "ema"; the raw weights ("model") come first because they are what the
# checkpoint's reported accuracy usually refers to.
_NESTED_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema", "ema")
# Wrappers that rename every key: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from a .pth/.pt/.safetensors file: bare, or nested under a container key
    (``model``, ``state_dict``, ``model_ema``, ``state_dict_ema``, ``ema``), with DDP's
    ``module.`` and torch.compile's ``_orig_mod.`` prefixes removed."""
    path = check_weights_file(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: Any = load_file(path, device="cpu")
        else:
            # weights_only: a checkpoint is data; never let unpickling run code from it.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch/safetensors raise many types for bad files
        raise TeacherError(
            f"cannot read teacher weights {path} ({type(e).__name__}: {load_error_cause(e)}); "
            "pass a .pth/.pt/.safetensors file holding a state_dict"
        ) from None
    state = _unwrap_state_dict(obj)
    if state is None:
        found = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, Mapping) else type(obj).__name__
        raise TeacherError(
            f"teacher weights {path} hold no state_dict (found: {found}); pass a file with a bare "
            f"state_dict or one under {'/'.join(_NESTED_KEYS)}"
        )
    return _strip_prefixes(state)


def trained_data_config(path: str | os.PathLike) -> dict | None:
    """input_size/mean/std of the views a `cli.py train` checkpoint was trained on; None for other files.

    Plain training keeps its recipe in the checkpoint's config; training from a label store keeps
    the store's spec (with its recipe) in the checkpoint's identity.
    """
    if str(path).endswith(".safetensors"):
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - load_state_dict_file reports unreadable files
        return None
    if not isinstance(obj, Mapping) or not isinstance(obj.get("config"), Mapping):
        return None
    from ..recipes import Recipe, create_recipe

    config, store = obj["config"], (obj.get("identity") or {}).get("store")
    if isinstance(store, Mapping) and isinstance(store.get("recipe"), Mapping):
        recipe = Recipe.from_dict(dict(store["recipe"]))
    else:
        size = config.get("input_size")
        recipe = create_recipe(config.get("recipe") or "deit",
                               list(config.get("overrides") or []) + ([f"input_size={size}"] if size else []))
    return {"input_size": recipe.input_size, "mean": tuple(recipe.mean), "std": tuple(recipe.std)}


def _unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if not isinstance(obj, Mapping):
        return None
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    for key in _NESTED_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    return None


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


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
