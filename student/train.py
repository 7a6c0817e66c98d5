"""Stage two: train a DeiT student from stored teacher labels, no teacher in the loop.

    python cli.py train --data SRC --labels STORE --out RUN --model deit_small_distilled_patch16_224
    torchrun --nproc-per-node 8 cli.py train ...

The loop is DeiT's (facebookresearch/deit, main.py + engine.py) with timm's optimizer,
scheduler and EMA factories; the teacher's forward is replaced by a read of the store, joined
to each view by ``student.data``. The whole step is ``train_one_epoch`` below.

Reproducibility: the data order is a pure function of (seed, epoch, global batch) and drop
path's random masks come from torch's global RNG reseeded at each epoch from (seed, epoch,
rank), so ``--resume`` from an epoch's checkpoint continues bit for bit (on CPU) where an
uninterrupted run would be.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from pipeline.devices import resolve_device
from pipeline.progress import progress_bar
from pipeline.sources import check_outside_source
from storage import checkpoint
from storage.checkpoint import TrainCheckpoint

from .curves import append_summary
from .data import LockstepLoader, check_complete, eval_loader, open_train_data
from .errors import TrainError
from .losses import TeacherLabels, deit_loss_terms
from .model import _bare, check_views_fit, create_student, eval_logits, has_distillation_token
from .results import (
    METRICS_FILE,
    SUMMARY_CSV,
    SUMMARY_FILE,
    EpochMetrics,
    EpochStats,
    FinalMetrics,
    TrainSummary,
    plural,
)

CHECKPOINT = checkpoint.FILENAME  # its schema, save and load: storage/checkpoint.py
# What a run writes in its folder: a folder holding any of them holds a run (--resume or --overwrite).
RUN_FILES = (CHECKPOINT, METRICS_FILE, SUMMARY_CSV, SUMMARY_FILE)


from .config import TrainConfig  # noqa: E402  (its own module now; still importable from here)

# Fields that may differ on --resume without changing what is trained.
RUNTIME_FIELDS = {"out", "resume", "overwrite", "workers", "device", "progress", "log_every", "stop_after_epochs",
                  "data", "labels", "val", "eval_batch_size", "compile"}
# Fields whose change on --resume is an error, not an override.
IDENTITY_FIELDS = ("model", "model_kwargs")


# ---- distributed -------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK; a process group only when WORLD_SIZE > 1."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)


def all_sum(values: list[float], d: Dist) -> list[float]:
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


# ---- checks before the first step ----------------------------------------------------------
def resolve_mode(cfg: TrainConfig, data) -> str:
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


def resume_path(cfg: TrainConfig) -> str | None:
    """The checkpoint --resume continues from: RUN's own, or the one --resume PATH names; None for a new run."""
    if not cfg.resume:
        return None
    return cfg.resume if isinstance(cfg.resume, str) else os.path.join(cfg.out, CHECKPOINT)


def run_files(run: str) -> list[str]:
    """The run files (RUN_FILES) that the folder ``run`` holds."""
    return [name for name in RUN_FILES if os.path.exists(os.path.join(run, name))]


def check_run_folder(cfg: TrainConfig) -> None:
    """A new run never writes into another run's folder: its checkpoint would be replaced and its
    metrics.jsonl and summary.csv appended to, so that `plot` draws the epochs of two runs as one."""
    if cfg.resume and cfg.overwrite:
        raise TrainError("--resume continues the run in --out, --overwrite deletes it: pass one of them")
    continues_here = cfg.resume and os.path.dirname(os.path.abspath(resume_path(cfg))) == os.path.abspath(cfg.out)
    found = run_files(cfg.out)
    if found and not continues_here and not cfg.overwrite:
        raise TrainError(f"--out {cfg.out} already holds a run ({', '.join(found)}); continue it with --resume, "
                         "start over with --overwrite (deletes those files, keeps the rest), or pass a new --out")


def clear_run_files(run: str) -> list[str]:
    """--overwrite: delete the previous run's files (only RUN_FILES; anything else in the folder stays)."""
    found = run_files(run)
    for name in found:
        os.remove(os.path.join(run, name))
    return found


def last_saved_epoch(run: str) -> int | None:
    """The epoch of the last line of RUN/metrics.jsonl (written right after its checkpoint), or None."""
    try:
        with open(os.path.join(run, METRICS_FILE)) as f:
            last = f.read().rstrip("\n").rpartition("\n")[2]
        return int(json.loads(last)["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def console(line: str) -> None:
    """A line for the user: on stderr beside the progress bar, as ``train: ...`` (rank 0 only: see train)."""
    print(f"train: {line}", file=sys.stderr, flush=True)


def load_checkpoint(cfg: TrainConfig, say=console) -> tuple[TrainConfig, TrainCheckpoint | None]:
    """With --resume: the checkpoint's config (which wins) and its state."""
    path = resume_path(cfg)
    if path is None:
        return cfg, None
    if not os.path.isfile(path):
        raise TrainError(f"--resume: there is no checkpoint {path}; drop --resume to start a new run"
                         + ("" if isinstance(cfg.resume, str) else " in --out, or pass --resume RUN/checkpoint.pth"))
    # a torn, foreign or code-carrying file is never loaded: one line, not torch's advice
    obj = checkpoint.load_data(path, context=f"--resume: {path} is not a readable checkpoint of this tool",
                               fix="restore it or delete it to start over", error=TrainError)
    lacks = checkpoint.missing(obj)
    if lacks:
        raise TrainError(f"--resume: {path} is not a checkpoint written by `cli.py train` (it lacks "
                         f"{', '.join(lacks)}); use a new --out, or --finetune to start from its weights")
    ckpt = TrainCheckpoint.from_dict(obj, path)
    try:
        saved = TrainConfig(**ckpt.config)
    except TypeError as e:
        raise TrainError(f"--resume: {path} holds a config this version does not know ({e}); use a new --out") from None
    for name in IDENTITY_FIELDS:
        if getattr(saved, name) != getattr(cfg, name):
            raise TrainError(f"--resume: {cfg.out} was trained with {name}={getattr(saved, name)!r}, the command "
                             f"line says {getattr(cfg, name)!r}; use a new --out or the checkpoint's {name}")
    if (saved.labels is None) != (cfg.labels is None):
        raise TrainError(f"--resume: {cfg.out} was trained {'with --labels' if saved.labels else 'without --labels'}; "
                         "the command line differs; use a new --out or the same label store")
    merged = dataclasses.replace(saved, **{k: getattr(cfg, k) for k in RUNTIME_FIELDS})
    overridden = [f"{f.name}={getattr(saved, f.name)!r} (command line: {getattr(cfg, f.name)!r})"
                  for f in dataclasses.fields(cfg)
                  if f.name not in RUNTIME_FIELDS and getattr(saved, f.name) != getattr(cfg, f.name)]
    if overridden:
        say(f"warning: --resume: the checkpoint's settings win: {'; '.join(overridden)}")
    return merged, ckpt


def load_ema(ema: ModelEmaV3, ckpt: TrainCheckpoint) -> None:
    """The EMA weights of a checkpoint (under the current key or, unwrapped, the one older checkpoints used)."""
    if ckpt.ema is not None:
        ema.module.load_state_dict(ckpt.ema)
    else:
        raise TrainError("--resume: the checkpoint's config says ema=True but it holds no EMA weights; "
                         "restore the checkpoint or use a new --out")


def check_identity(ckpt: TrainCheckpoint, identity: dict, cfg: TrainConfig) -> None:
    """A resumed run must read the same source and the same store, wherever they now live."""
    have = ckpt.identity
    if have["source"] != identity["source"]:
        raise TrainError(f"--resume: --data {cfg.data} is not the source {cfg.out} was trained on "
                         "(manifest fingerprint differs); point --data at that source")
    if have.get("stream") != identity["stream"]:
        raise TrainError(f"--resume: {cfg.out} was trained on another epoch stream ({have.get('stream')} vs "
                         f"{identity['stream']}, another deit-lockstep version); use a new --out")
    if have["store"] != identity["store"]:
        raise TrainError(f"--resume: --labels {cfg.labels} is not the label store {cfg.out} was trained from "
                         "(store spec differs); point --labels at that store")


def soft_target_note(cfg: TrainConfig, reader, mode: str) -> str | None:
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


# ---- the run -----------------------------------------------------------------------------
def train(cfg: TrainConfig) -> TrainSummary:
    t_start = time.perf_counter()
    d = init_distributed(cfg.device)
    if cfg.finetune and cfg.resume:
        raise TrainError("--finetune starts a new run from a checkpoint's weights, --resume continues the run in "
                         f"{cfg.out} from its own checkpoint: pass one of them")

    def say(line: str) -> None:  # rank 0 alone speaks
        if d.main:
            console(line)

    check_run_folder(cfg)
    check_outside_source(cfg.data, cfg.out)  # a run folder inside an ImageFolder would become one of its classes
    cfg, ckpt = load_checkpoint(cfg, say)
    data = open_train_data(cfg.data, labels=cfg.labels, recipe=cfg.recipe, overrides=cfg.overrides,
                           seed=cfg.seed, input_size=cfg.input_size, shard_size=cfg.shard_size,
                           repeats=cfg.repeats, shards=cfg.shards)
    mode = resolve_mode(cfg, data)
    soft_note = soft_target_note(cfg, data.reader, mode)
    if soft_note:
        say(soft_note)
    if ckpt is not None:
        check_identity(ckpt, data.identity(), cfg)
    start_epoch = ckpt.epoch if ckpt else 0
    end_epoch = cfg.epochs if cfg.stop_after_epochs is None else min(cfg.epochs, start_epoch + cfg.stop_after_epochs)
    # Only the epochs this run will do: with --stop-after-epochs, training can go ahead on the views a
    # fleet has finished while it still writes later ones (each --resume checks its own epochs).
    check_complete(data, range(start_epoch, end_epoch))
    cuda = d.device.type == "cuda"
    loader = LockstepLoader(data, batch_size=cfg.batch_size, rank=d.rank, world=d.world, workers=cfg.workers,
                            pin_memory=cuda, max_steps_per_epoch=cfg.max_steps_per_epoch)
    val = None
    if cfg.val:
        val = eval_loader(cfg.val, data, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size, rank=d.rank,
                          world=d.world, workers=min(cfg.workers, 4), shard_size=cfg.shard_size, pin_memory=cuda)

    torch.manual_seed(data.seed)  # the same initial weights on every rank and for every world size
    model = create_student(cfg.model, num_classes=data.num_classes, model_kwargs=cfg.model_kwargs,
                           drop_path_rate=cfg.drop_path).to(d.device)
    check_views_fit(model, data.recipe.input_size, d.device)
    finetuned = None
    if cfg.finetune and ckpt is None:  # a resumed fine-tune continues from its own checkpoint instead
        from .finetune import load_finetune

        finetuned = load_finetune(model, cfg.finetune, data.recipe.input_size).describe()
        say(f"--finetune: {finetuned}")
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    global_batch = cfg.batch_size * d.world
    optimizer = create_optimizer_v2(model, opt="adamw", lr=cfg.lr * global_batch / 512,
                                    weight_decay=cfg.weight_decay)
    steps_per_epoch = loader.nominal_steps()
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg.epochs,
                                       warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
                                       min_lr=cfg.min_lr, step_on_epochs=False,
                                       updates_per_epoch=steps_per_epoch)
    amp_dtype = torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16
    use_amp = cfg.amp and cuda
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.ema else None
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
        optimizer.load_state_dict(ckpt.optimizer)
        scheduler.load_state_dict(ckpt.scheduler)
        scaler.load_state_dict(ckpt.scaler)
        if ema is not None:
            load_ema(ema, ckpt)
        step = ckpt.step
    net = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if cuda else None)
    if cfg.compile:
        net = torch.compile(net)

    run = Run(cfg, d, mode, data, net, optimizer, scheduler, scaler, ema, amp_dtype if use_amp else None)
    for line in start_banner(cfg, d, data, model, mode, len(loader.files), steps_per_epoch, ckpt, end_epoch):
        say(line)
    for line in start_warnings(cfg, data, end_epoch, global_batch):
        say(f"warning: {line}")
    if d.main:
        os.makedirs(cfg.out, exist_ok=True)
        if cfg.overwrite and not cfg.resume:  # every check has passed: the old run goes only now
            deleted = clear_run_files(cfg.out)
            if deleted:
                say(f"--overwrite: deleted the previous run's {', '.join(deleted)} in {cfg.out}")
    distilled = has_distillation_token(model)
    images = invalid = skipped = 0
    train_seconds, metrics = 0.0, None
    for epoch in range(start_epoch, end_epoch):
        epoch_iter = loader.epoch(epoch)
        t0 = time.perf_counter()
        stats = run.train_one_epoch(epoch, epoch_iter, step)
        train_seconds += time.perf_counter() - t0
        step = stats.step
        images += stats.images
        invalid += epoch_iter.invalid
        skipped += int(all_sum([epoch_iter.skipped], d)[0])
        metrics = EpochMetrics(epoch, stats, invalid_views=epoch_iter.invalid, skipped_views=skipped)
        if val is not None:
            metrics.val = evaluate(model, val, d, run.autocast)
            if ema is not None:
                metrics.val_ema = evaluate(ema.module, val, d, run.autocast)
        if d.main:
            checkpoint.save(os.path.join(cfg.out, CHECKPOINT), TrainCheckpoint(
                model=model.state_dict(), ema=None if ema is None else ema.module.state_dict(),
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                epoch=epoch + 1, step=step, config=dataclasses.asdict(cfg), identity=data.identity(),
                # what `cli.py export` writes into the timm config, without needing the source or store
                recipe=data.recipe.to_dict(), class_names=list(data.manifest.class_names)))
            row = metrics.to_json()
            with open(os.path.join(cfg.out, METRICS_FILE), "a") as f:
                f.write(json.dumps(row) + "\n")
            append_summary(cfg.out, row)  # timm's summary.csv, the same numbers as a table
            say(metrics.report(cfg.epochs, distilled))
        if d.world > 1:
            dist.barrier()  # nobody starts the next epoch (or exits) before the checkpoint is whole

    summary = TrainSummary(
        model=cfg.model, distillation=mode, epochs=cfg.epochs, epochs_this_run=end_epoch - start_epoch,
        finished=end_epoch == cfg.epochs, step=step, global_batch=global_batch, world=d.world, rank=d.rank,
        device=str(d.device), images=images, wall_seconds=time.perf_counter() - t_start,
        train_seconds=train_seconds, img_per_s=images / train_seconds if train_seconds else 0.0,
        invalid_views_skipped=invalid + skipped, first_step_loss=run.first_step_loss,
        final=FinalMetrics.of(metrics), finetune=finetuned, soft_targets=soft_note, distillation_token=distilled)
    if d.main:
        summary.save(cfg.out)
    return summary


def start_banner(cfg: TrainConfig, d: Dist, data, model, mode: str, samples: int, steps_per_epoch: int,
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


def start_warnings(cfg: TrainConfig, data, end_epoch: int, global_batch: int) -> list[str]:
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


class Run:
    """The objects one training step needs, and the step itself."""

    def __init__(self, cfg, d, mode, data, net, optimizer, scheduler, scaler, ema, amp_dtype):
        self.cfg, self.d, self.mode, self.data = cfg, d, mode, data
        self.net, self.optimizer, self.scheduler, self.scaler, self.ema = net, optimizer, scheduler, scaler, ema
        self.amp_dtype = amp_dtype
        self.first_step_loss = None

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.d.device.type, dtype=self.amp_dtype)

    def teacher(self, batch) -> TeacherLabels | None:
        spec = None if self.data.reader is None else self.data.reader.spec
        return TeacherLabels.from_batch(batch, spec, self.mode, self.cfg.tau, self.d.device)

    def train_one_epoch(self, epoch: int, batches, step: int) -> EpochStats:
        cfg, d, net, opt = self.cfg, self.d, self.net, self.optimizer
        net.train()
        # Drop path draws from torch's global RNG: reseed per (epoch, rank) so that a resumed
        # run draws the same masks as an uninterrupted one.
        torch.manual_seed((self.data.seed * 1_000_003 + epoch) * 4096 + d.rank)
        channels_last = torch.channels_last if d.device.type == "cuda" else torch.contiguous_format
        bar = progress_bar(total=len(batches), desc=f"epoch {epoch}", unit="step", dynamic_ncols=True,
                           disable=not (cfg.progress and d.main), smoothing=0.1)
        try:  # closed on the way out too: a Ctrl-C message must not be followed by a redrawn bar
            sums = LossSums(self.mode, cfg.alpha)
            n_images, n_steps = 0, 0
            t0 = time.perf_counter()
            for batch in batches:
                x = batch.images.to(d.device, non_blocking=True).contiguous(memory_format=channels_last)
                y = batch.targets.to(d.device, non_blocking=True)
                teacher = self.teacher(batch)
                with self.autocast():
                    out = net(x)
                    loss, base, kd = deit_loss_terms(out, y, teacher, mode=self.mode, alpha=cfg.alpha, tau=cfg.tau,
                                                     kd_reduction=cfg.kd_reduction)
                # No float() here: reading the loss would make the host wait for the device every step.
                # The parts stay on the device until the next log line, where a non-finite one stops the run.
                sums.add(base, kd, step)
                opt.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if cfg.clip_grad:
                    self.scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_grad)
                self.scaler.step(opt)
                self.scaler.update()
                step += 1
                self.scheduler.step_update(num_updates=step)
                if self.ema is not None:
                    self.ema.update(_bare(net), step=step)
                n_steps += 1
                n_images += len(batch) * d.world
                bar.update()
                if sums.full:  # a long log interval: read back anyway, so that pending tensors stay few
                    self._flush(sums, epoch, bar)
                if n_steps % cfg.log_every == 0 or n_steps == len(batches):
                    self._flush(sums, epoch, bar)
                    rate = n_images / (time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{sums.loss / n_steps:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}",
                                    img_s=f"{rate:.1f}")
            self._flush(sums, epoch, bar)  # an iterator that ran short of len(batches)
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
        loss, base, kd = (v / d.world / max(n_steps, 1) for v in all_sum([sums.loss, sums.base, sums.kd], d))
        return EpochStats(step=step, steps=n_steps, images=n_images, seconds=seconds,
                          img_per_s=n_images / seconds if seconds else 0.0, loss=loss, base=base, kd=kd,
                          lr=opt.param_groups[0]["lr"])

    def _flush(self, sums: LossSums, epoch: int, bar) -> None:
        """Bring the pending loss parts to the host (one sync); stop on the first non-finite one."""
        bad = sums.flush()
        if self.first_step_loss is None and sums.first is not None:
            self.first_step_loss = all_sum([sums.first], self.d)[0] / self.d.world
        if bad is not None:  # diverged: one line, the fix, exit 2
            bar.close()
            value, at = bad
            raise TrainError(f"training diverged: the loss is {value} at epoch {epoch}, step {at}; lower --lr "
                             f"(it is {self.cfg.lr:g}) or set --clip-grad, with a new --out")


class LossSums:
    """Running sums of one epoch's loss parts, read from the device only when flushed (at log lines).

    The per-step (base, kd) tensors wait in ``pending``; ``flush`` reads them all with one sync and
    adds them up in step order as Python floats, so the sums are the very numbers a per-step
    ``float()`` would have given. At most ``MAX_PENDING`` steps wait (``full``): a sync per 1024 steps
    costs nothing, a pending tensor per step of a long epoch would hold device memory."""

    MAX_PENDING = 1024

    def __init__(self, mode: str, alpha: float):
        self.mode, self.alpha = mode, alpha
        self.pending: list[torch.Tensor] = []
        self.steps: list[int] = []
        self.loss = self.base = self.kd = 0.0
        self.first: float | None = None  # the epoch's first step's loss

    @property
    def full(self) -> bool:
        return len(self.steps) >= self.MAX_PENDING

    def add(self, base: torch.Tensor, kd: torch.Tensor, step: int) -> None:
        self.pending += [base, kd]
        self.steps.append(step)

    def flush(self) -> tuple[float, int] | None:
        """Add the pending steps; (loss, step) of the first whose base + kd is not finite, else None."""
        if not self.pending:
            return None
        values = torch.stack(self.pending).tolist()
        steps, self.pending, self.steps = self.steps, [], []
        for i, step in enumerate(steps):
            base, kd = values[2 * i], values[2 * i + 1]
            if not math.isfinite(base + kd):
                return base + kd, step
            value = base if self.mode == "none" else (1 - self.alpha) * base + self.alpha * kd
            if self.first is None:
                self.first = value
            self.loss, self.base, self.kd = self.loss + value, self.base + base, self.kd + kd
        return None


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
