"""One training step, DeiT's (engine.train_one_epoch's body): forward, loss, backward, clip, optimizer step.

``cli.py train`` takes every step through ``train_step`` (``student.train.Run``), and so does
``student.api.Lockstep.step``, so an own loop that calls it steps exactly as the trainer does. The
loop keeps what is not the step: the learning-rate schedule, the EMA, the loss sums, logging.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


def train_step(model, x: torch.Tensor, y: torch.Tensor, teacher, criterion, optimizer, *, scaler=None,
               autocast=nullcontext, clip_grad: float | None = None) -> tuple[torch.Tensor, ...]:
    """One optimizer step of ``model`` on images ``x`` with targets ``y`` (both on the model's device).

    ``criterion(outputs, y, teacher)`` returns ``(loss, base, kd)`` as ``losses.deit_loss_terms`` does;
    they come back as tensors, unread: a ``float()`` here would make the host wait for the device
    every step. ``scaler``: a ``torch.amp.GradScaler`` (fp16), None for a plain backward; ``autocast``:
    a context factory for the forward (``nullcontext``: full precision).
    """
    scaler = scaler if scaler is not None else torch.amp.GradScaler("cuda", enabled=False)  # a pass-through
    with autocast():
        out = model(x)
        loss, base, kd = criterion(out, y, teacher)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return loss, base, kd
