"""What ``train`` checks and says before the first step: the distillation mode, the soft-target
caveat, the start banner and the warnings about settings that run, but not as expected.

Said once, by rank 0, before any time is spent (``cfg`` is a ``student.config.TrainConfig``).
"""

from __future__ import annotations

import math

from storage.checkpoint import TrainCheckpoint

from .distributed import Dist
from .errors import TrainError
from .model import has_distillation_token
from .results import plural
from .resume import resume_path


def resolve_mode(cfg, data) -> str:
    # the values of --distillation, --kd-reduction, --alpha, --epochs...: checked by their option types
    # (student/config.py) on the command line, and by the loss (check_objective) in library calls
    mode = cfg.distillation or ("hard" if cfg.labels else "none")
    if mode != "none" and data.reader is None:
        raise TrainError(f"--distillation {mode} needs teacher labels: pass --labels STORE "
                         "(made by `cli.py precompute`), or use --distillation none")
    if mode == "soft" and data.reader.spec.mode == "hard":
        raise TrainError(f"--distillation soft needs a top-k store, but {cfg.labels} holds hard labels only; "
                         "use --distillation hard or precompute with --topk")
    kw_classes = cfg.model_kwargs.get("num_classes")
    if kw_classes is not None and kw_classes != data.num_classes:
        source = f"the store {cfg.labels}" if cfg.labels else f"--data {cfg.data}"
        raise TrainError(f"--model-kwargs num_classes={kw_classes}, but {source} has {data.num_classes} classes; "
                         "drop num_classes from --model-kwargs")
    return mode


def soft_target_note(cfg, reader, mode: str) -> str | None:
    """What soft distillation at --tau will train on, when it is not the teacher's exact softmax(z / tau):
    the figure precompute measured (meta soft_error_*), or how to measure it. None when exact or not soft."""
    from storage.soft import recorded_soft_error

    if mode != "soft" or reader is None:
        return None
    spec, tau = reader.spec, cfg.tau
    if spec.k >= spec.num_classes or math.isclose(tau, 1.0):
        return None  # k = C: exact; tau 1: top-k and tail mass exact, stored or not
    where = f"`cli.py verify {cfg.labels} --data {cfg.data} --tau {tau:g}`"
    if spec.tau_index(tau) is None:
        kept = f"it keeps taus {', '.join(f'{t:g}' for t in spec.taus)}" if spec.taus else "it keeps none"
        return (f"soft targets at tau {tau:g} from top-{spec.k} of {spec.num_classes} classes use the UNIFORM-tail "
                f"approximation (the store has no tail log-sum-exp at tau {tau:g}; {kept}), which biases the "
                f"tempered tail mass; run {where} to measure it, or precompute with --tau {tau:g}")
    err = recorded_soft_error(reader.meta, tau)
    if err is None:
        return (f"soft targets at tau {tau:g}: top-{spec.k} weights and tail mass exact, the tail split uniformly "
                f"over {spec.num_classes - spec.k} classes; run {where} to measure the distance to the teacher")
    s, u = err["stored"], err.get("uniform", {})
    return (f"soft targets at tau {tau:g}: top-{spec.k} weights and tail mass exact (stored tail log-sum-exp), tail "
            f"split uniformly; precompute measured on {err['views']} views: total variation to the teacher's "
            f"softmax(z/{tau:g}) mean {s['tv_mean']:.4f} (max {s['tv_max']:.4f}), KL mean {s['kl_mean']:.4f}"
            + (f" (uniform-tail approximation: TV {u['tv_mean']:.4f}, KL {u['kl_mean']:.4f})" if u else ""))


def start_banner(cfg, d: Dist, data, model, mode: str, samples: int, steps_per_epoch: int,
                 ckpt: TrainCheckpoint | None, end_epoch: int) -> list[str]:
    """What this run is about to do, said before the first step."""
    global_batch = cfg.batch_size * d.world
    params = sum(p.numel() for p in model.parameters())
    token = "with a distillation token" if has_distillation_token(model) else "one head, no distillation token"
    if data.reader is None:
        labels = f"no labels (ground truth only), views drawn from recipe {data.recipe.name}, seed {data.seed}"
    else:
        labels = f"labels {cfg.labels} ({plural(data.views, 'view')}, {data.reader.spec.mode}), {mode} distillation"
    ema = f"EMA on (decay {cfg.model_ema_decay:g})" if cfg.ema else "EMA off"
    lines = [
        f"model {cfg.model}, {params / 1e6:.2f}M parameters, {token}, {data.num_classes} classes",
        f"data {cfg.data}: {samples} samples, {data.recipe.input_size} px; {labels}",
        f"{plural(cfg.epochs, 'epoch')} x {plural(steps_per_epoch, 'step')}, global batch {global_batch} "
        f"({cfg.batch_size} x {plural(d.world, 'process')}), lr {cfg.lr * global_batch / 512:.3g} "
        f"(--lr {cfg.lr:g} x {global_batch}/512), warm-up {plural(cfg.warmup_epochs, 'epoch')}, {ema}",
        f"device {d.device}, {plural(cfg.workers, 'worker')}; writing {cfg.out}",
    ]
    if ckpt is not None and ckpt.epoch >= cfg.epochs:
        lines.append(f"{resume_path(cfg)} has finished all {plural(cfg.epochs, 'epoch')}: nothing left to train")
    elif ckpt is not None:
        lines.append(f"resuming at epoch {ckpt.epoch} of {cfg.epochs} from {resume_path(cfg)}"
                     + (f", stopping after epoch {end_epoch - 1}" if end_epoch < cfg.epochs else ""))
    return lines


def start_warnings(cfg, data, end_epoch: int, global_batch: int) -> list[str]:
    """Settings that run, but not as a user new to them would expect: said once, before the first step."""
    out = []
    if 0 < cfg.epochs <= cfg.warmup_epochs:
        peak = cfg.lr * global_batch / 512
        reached = cfg.warmup_lr + (peak - cfg.warmup_lr) * cfg.epochs / cfg.warmup_epochs
        out.append(f"--epochs {cfg.epochs} <= --warmup-epochs {cfg.warmup_epochs}: the whole run is warm-up, the lr "
                   f"climbs from {cfg.warmup_lr:g} to about {reached:.2g} and never reaches {peak:.2g}; pass "
                   f"--warmup-epochs {max(cfg.epochs // 5, 0)} (or more --epochs)")
    if data.views is not None and end_epoch > data.views:
        out.append(f"--epochs {cfg.epochs} > the store's {plural(data.views, 'view')}: epoch e replays view e mod "
                   f"{data.views}, so views repeat from epoch {data.views}; precompute --views {cfg.epochs} for a new "
                   "view every epoch")
    return out
