"""Stage two: train a DeiT student from stored teacher labels, no teacher in the loop.

    python cli.py train --data SRC --labels STORE --out RUN --model deit_small_distilled_patch16_224
    torchrun --nproc-per-node 8 cli.py train ...

The loop is DeiT's (facebookresearch/deit, main.py + engine.py) with timm's optimizer,
scheduler and EMA factories; the teacher's forward is replaced by a read of the store, joined
to each view by ``student.data``. ``train`` below is the whole run, ``Run.train_one_epoch`` the
epoch, ``student.step.train_step`` the step (the one ``student.api`` offers an own loop). What is
checked and said before the first step sits beside: ``student.resume`` (the run folder, --resume),
``student.start`` (mode, banner, warnings); ``student.evaluate`` is --val.

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
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from pipeline.progress import progress_bar
from pipeline.sources import check_outside_source
from storage import checkpoint
from storage.checkpoint import TrainCheckpoint

from .config import TrainConfig  # its own module now; still importable from here
from .curves import append_summary
from .data import LockstepLoader, TrainData, check_complete, eval_loader, open_train_data
from .distributed import Dist, all_sum, init_distributed
from .errors import TrainError, console
from .evaluate import evaluate
from .losses import TeacherLabels, deit_loss_terms
from .model import _bare, check_views_fit, create_student, has_distillation_token
from .results import METRICS_FILE, EpochMetrics, EpochStats, FinalMetrics, TrainSummary
from .resume import CHECKPOINT, check_identity, check_run_folder, clear_run_files, load_checkpoint, load_ema
from .start import resolve_mode, soft_target_note, start_banner, start_warnings
from .step import train_step


# ---- the run -----------------------------------------------------------------------------
def train(cfg: TrainConfig) -> TrainSummary:
    """DeiT's main.py: open and check everything (``start_run``), then the epochs, a checkpoint after each."""
    t_start = time.perf_counter()
    d = init_distributed(cfg.device)

    def say(line: str) -> None:  # rank 0 alone speaks
        if d.main:
            console(line)

    s = start_run(cfg, d, say)
    cfg, run, model = s.cfg, s.run, s.model
    step, images, invalid, skipped, train_seconds, metrics = s.step, 0, 0, 0, 0.0, None
    for epoch in range(s.start_epoch, s.end_epoch):
        batches = s.loader.epoch(epoch)
        t0 = time.perf_counter()
        stats = run.train_one_epoch(epoch, batches, step)
        train_seconds += time.perf_counter() - t0
        step, images, invalid = stats.step, images + stats.images, invalid + batches.invalid
        skipped += int(all_sum([batches.skipped], d)[0])
        metrics = EpochMetrics(epoch, stats, invalid_views=batches.invalid, skipped_views=skipped)
        if s.val is not None:
            metrics.val = evaluate(model, s.val, d, run.autocast)
            if run.ema is not None:
                metrics.val_ema = evaluate(run.ema.module, s.val, d, run.autocast)
        if d.main:
            save_epoch(cfg, run, model, s.data, epoch, step, metrics)
            say(metrics.report(cfg.epochs, s.distilled))
        if d.world > 1:
            dist.barrier()  # nobody starts the next epoch (or exits) before the checkpoint is whole

    summary = TrainSummary(
        model=cfg.model, distillation=s.mode, epochs=cfg.epochs, epochs_this_run=s.end_epoch - s.start_epoch,
        finished=s.end_epoch == cfg.epochs, step=step, global_batch=s.global_batch, world=d.world, rank=d.rank,
        device=str(d.device), images=images, wall_seconds=time.perf_counter() - t_start,
        train_seconds=train_seconds, img_per_s=images / train_seconds if train_seconds else 0.0,
        invalid_views_skipped=invalid + skipped, first_step_loss=run.first_step_loss,
        final=FinalMetrics.of(metrics), finetune=s.finetuned, soft_targets=s.soft_note, distillation_token=s.distilled)
    if d.main:
        summary.save(cfg.out)
    return summary


def save_epoch(cfg: TrainConfig, run: Run, model, data: TrainData, epoch: int, step: int,
               metrics: EpochMetrics) -> None:
    """Rank 0, after each epoch: the checkpoint, then its metrics.jsonl line and summary.csv row."""
    ema = run.ema
    checkpoint.save(os.path.join(cfg.out, CHECKPOINT), TrainCheckpoint(
        model=model.state_dict(), ema=None if ema is None else ema.module.state_dict(),
        optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(), scaler=run.scaler.state_dict(),
        epoch=epoch + 1, step=step, config=dataclasses.asdict(cfg), identity=data.identity(),
        # what `cli.py export` writes into the timm config, without needing the source or store
        recipe=data.recipe.to_dict(), class_names=list(data.manifest.class_names)))
    row = metrics.to_json()
    with open(os.path.join(cfg.out, METRICS_FILE), "a") as f:
        f.write(json.dumps(row) + "\n")
    append_summary(cfg.out, row)  # timm's summary.csv, the same numbers as a table


def check_source_cache(cfg: TrainConfig) -> None:
    """--source-cache keeps a bucket's objects on local disk: pointless for a local --data, and it must be a
    folder this process can write (checked now, not by a thread that would quietly copy nothing)."""
    if cfg.source_cache is None:
        if cfg.source_cache_gib is not None:
            raise TrainError("--source-cache-gib bounds --source-cache: pass --source-cache DIR too, or drop it")
        return
    from storage.bucket import is_source_url

    if not is_source_url(cfg.data):
        raise TrainError(f"--source-cache keeps a bucket source's objects on local disk, and --data {cfg.data} is "
                         "local already: drop --source-cache")
    try:
        os.makedirs(cfg.source_cache, exist_ok=True)
        probe = os.path.join(cfg.source_cache, f".probe-{os.getpid()}")
        open(probe, "wb").close()
        os.unlink(probe)
    except OSError as e:
        raise TrainError(f"--source-cache {cfg.source_cache}: cannot write there ({e.strerror}); pass a writable "
                         "node-local folder") from None


def cache_bytes(cfg: TrainConfig) -> int | None:
    return None if cfg.source_cache_gib is None else int(cfg.source_cache_gib * 1024 ** 3)


@dataclass
class Started:
    """What ``start_run`` opened, checked and built: everything the epochs need."""
    cfg: TrainConfig          # the checkpoint's on --resume
    data: TrainData
    mode: str
    loader: LockstepLoader
    val: object | None        # --val's loader
    model: torch.nn.Module    # the bare student (run.net may wrap it: DDP, compile)
    run: Run
    start_epoch: int
    end_epoch: int
    step: int
    global_batch: int
    distilled: bool
    finetuned: str | None
    soft_note: str | None


def start_run(cfg: TrainConfig, d: Dist, say) -> Started:
    """Every check before the first step, cheapest first, then the student, its optimizer and the banner."""
    if cfg.finetune and cfg.resume:
        raise TrainError("--finetune starts a new run from a checkpoint's weights, --resume continues the run in "
                         f"{cfg.out} from its own checkpoint: pass one of them")
    check_run_folder(cfg)
    check_outside_source(cfg.data, cfg.out)  # a run folder inside an ImageFolder would become one of its classes
    check_source_cache(cfg)
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
                            pin_memory=cuda, max_steps_per_epoch=cfg.max_steps_per_epoch,
                            source_cache=cfg.source_cache, source_cache_bytes=cache_bytes(cfg))
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
    steps_per_epoch = loader.nominal_steps()
    run = build_run(cfg, d, mode, data, model, steps_per_epoch, ckpt)

    for line in start_banner(cfg, d, data, model, mode, len(loader.files), steps_per_epoch, ckpt, end_epoch):
        say(line)
    global_batch = cfg.batch_size * d.world
    for line in start_warnings(cfg, data, end_epoch, global_batch):
        say(f"warning: {line}")
    if d.main:
        os.makedirs(cfg.out, exist_ok=True)
        if cfg.overwrite and not cfg.resume:  # every check has passed: the old run goes only now
            deleted = clear_run_files(cfg.out)
            if deleted:
                say(f"--overwrite: deleted the previous run's {', '.join(deleted)} in {cfg.out}")
    return Started(cfg, data, mode, loader, val, model, run, start_epoch, end_epoch, ckpt.step if ckpt else 0,
                   global_batch, has_distillation_token(model), finetuned, soft_note)


def build_run(cfg: TrainConfig, d: Dist, mode: str, data: TrainData, model, steps_per_epoch: int,
              ckpt: TrainCheckpoint | None) -> Run:
    """DeiT's optimizer (AdamW, lr scaled to the global batch), cosine schedule, precision and EMA; a
    checkpoint's state loaded into them on --resume; the student wrapped for DDP and compiled if asked."""
    cuda = d.device.type == "cuda"
    global_batch = cfg.batch_size * d.world
    optimizer = create_optimizer_v2(model, opt="adamw", lr=cfg.lr * global_batch / 512,
                                    weight_decay=cfg.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg.epochs,
                                       warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
                                       min_lr=cfg.min_lr, step_on_epochs=False,
                                       updates_per_epoch=steps_per_epoch)
    amp_dtype = torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16
    use_amp = cfg.amp and cuda
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.ema else None
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
        optimizer.load_state_dict(ckpt.optimizer)
        scheduler.load_state_dict(ckpt.scheduler)
        scaler.load_state_dict(ckpt.scaler)
        if ema is not None:
            load_ema(ema, ckpt)
    net = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if cuda else None)
    if cfg.compile:
        net = torch.compile(net)
    return Run(cfg, d, mode, data, net, optimizer, scheduler, scaler, ema, amp_dtype if use_amp else None)


class Run:
    """The objects one training step needs, and the epoch of steps."""

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

    def loss(self, out, y, teacher):
        """DeiT's loss terms (loss, base, kd) with this run's mode, alpha, tau and KD reduction."""
        cfg = self.cfg
        return deit_loss_terms(out, y, teacher, mode=self.mode, alpha=cfg.alpha, tau=cfg.tau,
                               kd_reduction=cfg.kd_reduction)

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
                _, base, kd = train_step(net, x, y, self.teacher(batch), self.loss, opt, scaler=self.scaler,
                                         autocast=self.autocast, clip_grad=cfg.clip_grad)
                # The parts stay on the device until the next log line, where a non-finite one stops the run.
                sums.add(base, kd, step)
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
