"""The teacher at run time: a timm model in eval mode that labels recipe-normalised views.

``Teacher.__call__`` takes views normalised with the *recipe's* mean/std (the student's tensors,
after erasing and mixing) and re-expresses them in the teacher's own normalisation and input size,
so the teacher labels the same pixels the student trains on (docs/DESIGN.md, the contract).
Building one is ``pipeline.stage1.teacher.create_teacher``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from storage.errors import UserError


class TeacherError(UserError):
    """A teacher that cannot be built as asked; the message is one line: cause, then fix."""


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
        self.num_classes = class_count(model)
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


def class_count(model: torch.nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, torch.nn.Linear):
        return head.out_features
    raise TeacherError(
        f"cannot tell the class count of {type(model).__name__}; use a timm classifier as teacher"
    )
