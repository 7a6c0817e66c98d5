"""Evaluation each epoch with --val: DeiT's top-1/top-5, for each head of a distilled student."""

from __future__ import annotations

import torch

from .distributed import Dist, all_sum
from .model import _bare, eval_logits


@torch.no_grad()
def evaluate(model, loader, d: Dist, autocast) -> dict:
    """Top-1/top-5 (%) of the class head, the distillation head and their average, over all ranks."""
    model = _bare(model)
    was_training = model.training
    model.eval()
    keys = ("cls", "dist", "avg")
    counts = [0.0] * (2 * len(keys) + 1)
    for item in loader:
        if item is None:
            continue
        x, y = item
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        with autocast():
            logits = eval_logits(model, x)
        for i, k in enumerate(keys):
            top = logits[k].float().topk(min(5, logits[k].shape[1]), dim=1).indices
            hit = top == y[:, None]
            counts[2 * i] += hit[:, 0].sum().item()
            counts[2 * i + 1] += hit.any(dim=1).sum().item()
        counts[-1] += len(y)
    model.train(was_training)
    counts = all_sum(counts, d)
    n = max(counts[-1], 1)
    out = {"n": int(counts[-1])}
    for i, k in enumerate(keys):
        out[f"{k}_top1"], out[f"{k}_top5"] = 100 * counts[2 * i] / n, 100 * counts[2 * i + 1] / n
    return out
