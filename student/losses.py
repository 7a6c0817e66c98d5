"""DeiT's training loss, fed by stored teacher labels instead of a live teacher.

    loss = (1 - alpha) * CE(cls_head, y) + alpha * KD(dist_head, teacher)

    y      the mixed, label-smoothed ground truth (rows sum to 1), so CE is a soft-target
           cross entropy (timm's SoftTargetCrossEntropy).
    hard   KD = CE(dist_head, argmax of the teacher), no smoothing (DeiT's best setting).
    soft   KD = tau^2 * KL(softmax(teacher / tau) || softmax(dist_head / tau)).

This is the official repo's DistillationLoss (facebookresearch/deit, losses.py) with one
change: the teacher's output arrives as a `TeacherLabels` read from the label store. A student
without a distillation token (any timm model) takes both terms on its one head, as DeiT's
"usual distillation" baseline does.

Soft KD reductions. The official repo divides the summed KL by `numel` = batch * classes, so
its soft KD is 1/num_classes of the true per-sample KL (and alpha no longer means what it
says). `kd_reduction="deit"` reproduces that exactly, for comparisons with published runs;
`"batchmean"` (the default) divides by the batch size only, which is the real KL and what
timm's TokenDistillationTask uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import KD_REDUCTIONS, MODES, check_objective  # noqa: F401  (defined once, with their options)


@dataclass
class TeacherLabels:
    """What the teacher said about one batch of views.

    ids:       [B] int, the teacher's argmax (hard distillation's target).
    log_probs: [B, C] float32, the teacher's distribution *at temperature tau*, as
               log-probabilities (soft distillation's target); None for a hard-label store.
    tau:       the temperature `log_probs` was tempered with; `deit_loss_terms` checks it matches its
               own, because a teacher tempered twice or not at all is a silent wrong label.
    """

    ids: torch.Tensor
    log_probs: torch.Tensor | None = None
    tau: float = 1.0

    @classmethod
    def from_logits(cls, logits: torch.Tensor, tau: float = 1.0) -> TeacherLabels:
        """From a teacher's full logits. Kept as public API although nothing of ours calls it: it is how an
        own loop feeds a live teacher (online distillation) to ``deit_loss_terms``, and the exact
        distribution the tests hold the stored top-k rebuild (``from_topk``) and the loss against."""
        logits = logits.detach().float()
        return cls(ids=logits.argmax(dim=1), log_probs=F.log_softmax(logits / tau, dim=1), tau=tau)

    @classmethod
    def from_topk(
        cls, values: torch.Tensor, ids: torch.Tensor, num_classes: int, tau: float = 1.0,
        tail_lse: torch.Tensor | None = None,
    ) -> TeacherLabels:
        """From a soft store's rows: top-k teacher log-probs (sorted descending) and their class ids.

        The dense tempered distribution is rebuilt by `storage.soft.soft_targets`, which owns the
        tail convention (the mass outside the top-k spread uniformly over the other classes; its
        total exact at tau = 1, and at any tau whose tail log-sum-exp the store keeps: `tail_lse`,
        [B], the store's column for this tau). Tempering has to happen there, on the stored
        log-probs, not here on the rebuilt tensor: it is the rebuild that knows how big the tail is.
        """
        from storage.soft import soft_targets  # storage/ never imports student/, so no cycle

        probs = soft_targets(values, ids, num_classes, tau=tau, tail_lse=tail_lse).float()
        # A probability that underflowed to 0 (a far tail at small tau) would give log 0 = -inf and
        # then 0 * inf = nan inside kl_div; the smallest normal float contributes exactly nothing.
        log_probs = probs.clamp_min(torch.finfo(torch.float32).tiny).log()
        return cls(ids=ids[:, 0].long(), log_probs=log_probs, tau=tau)

    @classmethod
    def hard(cls, ids: torch.Tensor) -> TeacherLabels:
        """From a hard store's rows: the teacher's argmax per view."""
        return cls(ids=ids.long())

    @classmethod
    def from_batch(cls, batch, spec, mode: str, tau: float = 1.0, device=None) -> TeacherLabels | None:
        """The stored labels of a lockstep ``Batch`` (student.data) from a store with ``spec``, as
        ``deit_loss_terms`` takes them for ``mode``: None without distillation, the argmax for hard, and
        for soft the tempered rebuild, with the store's exact tail mass when it keeps this tau."""
        if mode == "none":
            return None
        ids = batch.teacher_ids.to(device, non_blocking=True)
        if mode == "hard":
            return cls.hard(ids[:, 0] if ids.dim() == 2 else ids)
        values = batch.teacher_values.to(device, non_blocking=True)
        col = spec.tau_index(tau)
        tail = None if col is None else batch.teacher_tail_lse[:, col].to(device, non_blocking=True)
        return cls.from_topk(values, ids, spec.num_classes, tau=tau, tail_lse=tail)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross entropy against a distribution (mixup/cutmix + label smoothing), mean over the batch."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def deit_loss_terms(
    outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    target: torch.Tensor,
    teacher: TeacherLabels | None,
    *,
    mode: str = "hard",
    alpha: float = 0.5,
    tau: float = 1.0,
    kd_reduction: str = "batchmean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeiT's loss for one batch: (loss, base, kd), base and kd detached 0-d tensors (kd a zero on
    base's device for mode "none"), kept on the device so that a loop need not wait for it each step
    (call ``.item()`` on them to log).

    outputs: [B, C] logits of a one-head student, or (cls_logits, dist_logits) from a timm
             `*distilled*` model in distilled training mode.
    target:  [B, C] mixed, smoothed ground truth.
    mode:    "none" is plain training: alpha, tau and teacher are ignored. A two-head student
             then takes the mean of its two heads' cross entropies. The official repo trains
             the class head only there, which leaves the distillation head random and the
             test-time average of the two heads meaningless; training both keeps all three
             of eval_logits' numbers honest at no cost.
    """
    check_objective(mode, kd_reduction)  # a TrainError, which is a ValueError
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")

    two_heads = isinstance(outputs, (tuple, list))
    cls_logits, dist_logits = outputs if two_heads else (outputs, outputs)

    if mode == "none":
        base = soft_target_cross_entropy(cls_logits, target)
        if two_heads:
            base = (base + soft_target_cross_entropy(dist_logits, target)) / 2
        return base, base.detach(), torch.zeros((), dtype=base.dtype, device=base.device)

    if teacher is None:
        raise ValueError(f"distillation mode {mode!r} needs teacher labels")
    base = soft_target_cross_entropy(cls_logits, target)
    # Logits may arrive in bf16 under autocast; the softmaxes and the KL sum want fp32.
    dist_logits = dist_logits.float()

    if mode == "hard":
        kd = F.cross_entropy(dist_logits, teacher.ids.long())  # stores keep ids as int16
    else:
        if teacher.log_probs is None:
            raise ValueError("soft distillation needs teacher log-probs; this label store holds hard labels")
        if not math.isclose(teacher.tau, tau):
            raise ValueError(f"teacher labels were tempered at tau={teacher.tau}, the loss uses tau={tau}")
        T = tau
        kd = F.kl_div(
            F.log_softmax(dist_logits / T, dim=1),
            teacher.log_probs.detach(),
            reduction="sum",
            log_target=True,
        ) * (T * T)
        kd = kd / (dist_logits.numel() if kd_reduction == "deit" else dist_logits.shape[0])

    loss = (1 - alpha) * base + alpha * kd
    return loss, base.detach(), kd.detach()
