"""TrainConfig: every setting of a training run, and each one's command-line option.

A field is defined once: its default, and in its metadata (``opt``) its help, its type (the range,
checked by click when the command line or ``--config FILE`` is parsed) and its flags. ``cli.py train``
is generated from these fields (``pipeline.options.config_options``). This module imports no torch:
cli.py reads it to build its options.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import click

from pipeline.options import (
    MAX_EPOCHS,
    SEED,
    at_least,
    batch_size_opt,
    default_workers,
    device_opt,
    model_kwargs_opt,
    non_negative,
    opt,
    positive,
    shard_size_opt,
    shards_opt,
    unit_interval,
    workers_opt,
)

from .errors import TrainError

MODES = ("none", "hard", "soft")          # --distillation (student.losses.deit_loss_terms' mode)
KD_REDUCTIONS = ("batchmean", "deit")     # --kd-reduction


def check_objective(mode: str, kd_reduction: str = "batchmean") -> None:
    """The library's check of a distillation mode and KD reduction (the loss and student.api call it); on
    the command line and in --config FILE the options' Choice types, made of the same tuples, check them."""
    if mode not in MODES:
        raise TrainError(f"distillation mode must be one of {', '.join(MODES)}, got {mode!r}")
    if kd_reduction not in KD_REDUCTIONS:
        raise TrainError(f"kd_reduction must be one of {', '.join(KD_REDUCTIONS)}, got {kd_reduction!r}")

FINETUNE_HELP = ("Start from a checkpoint's weights (ours or timm/DeiT) at the store's input size and classes "
                 "(pos_embed resampled, heads reset if the class count changed); the defaults of --epochs, --lr, "
                 "--min-lr, --weight-decay, --warmup-epochs become DeiT's fine-tuning recipe: 30, 5e-6, the "
                 "scaled lr (flat), 1e-8, 0.")


@dataclass
class TrainConfig:
    data: str = field(metadata=opt("Training source: the one the label store was made from."))
    # the command line may name it by timm's --output/--experiment instead (cli.run_folder)
    out: str = field(metadata=opt(
        "Run directory: checkpoint.pth, metrics.jsonl, summary.csv, summary.json (a new one, unless "
        "--resume or --overwrite).", default=None, metavar="RUN"))
    labels: str | None = field(default=None, metadata=opt(
        "Label store from `precompute` (recipe and seed come from it)."))
    model: str = field(default="deit_small_distilled_patch16_224", metadata=opt("timm student."))
    model_kwargs: dict = field(default_factory=dict, metadata=model_kwargs_opt("student"))
    # none | hard | soft; default: hard with --labels, else none
    distillation: str | None = field(default=None, metadata=opt(
        "[default: hard with --labels, else none]", type=click.Choice(MODES)))
    alpha: float = field(default=0.5, metadata=opt("Weight of the distillation term.", type=unit_interval()))
    tau: float = field(default=1.0, metadata=opt("Soft distillation temperature.", type=positive()))
    kd_reduction: str = field(default="batchmean", metadata=opt(
        "batchmean: the true KL; deit: the official repo's numel scaling.", type=click.Choice(KD_REDUCTIONS)))
    epochs: int = field(default=300, metadata=opt("Training epochs (epoch e replays stored view e mod V).",
                                                  type=at_least(1, MAX_EPOCHS)))
    # per process; the global batch is batch_size x world
    batch_size: int = field(default=64, metadata=batch_size_opt("Per process."))
    # for a global batch of 512, scaled linearly
    lr: float = field(default=5e-4, metadata=opt("For a global batch of 512 (scaled).", type=positive()))
    min_lr: float = field(default=1e-5, metadata=opt("Cosine schedule's floor.", type=non_negative()))
    warmup_lr: float = field(default=1e-6, metadata=opt("Learning rate the warmup starts from.", type=non_negative()))
    warmup_epochs: int = field(default=5, metadata=opt("Linear warmup epochs.", type=at_least(0, MAX_EPOCHS)))
    weight_decay: float = field(default=0.05, metadata=opt("AdamW weight decay.", type=non_negative()))
    drop_path: float = field(default=0.1, metadata=opt("Stochastic depth rate.", type=unit_interval(hi_open=True)))
    clip_grad: float | None = field(default=None, metadata=opt("Clip the gradient norm to this.", type=positive()))
    ema: bool = field(default=True, metadata=opt("Keep timm's EMA of the weights.", flags=("--ema/--no-ema",)))
    model_ema_decay: float = field(default=0.99996, metadata=opt("EMA decay per step.", type=unit_interval()))
    val: str | None = field(default=None, metadata=opt(
        "Validation source, evaluated each epoch (resize, centre crop)."))
    eval_batch_size: int | None = field(default=None, metadata=opt(  # default: 2 x batch_size
        "[default: 2 x --batch-size]", type=at_least(1)))
    workers: int = field(default_factory=default_workers, metadata=workers_opt())
    device: str = field(default="auto", metadata=device_opt())
    # bf16 autocast on CUDA (fp16 + GradScaler where bf16 is missing)
    amp: bool = field(default=True, metadata=opt("bf16 autocast on CUDA.", flags=("--amp/--no-amp",)))
    compile: bool = field(default=False, metadata=opt("torch.compile the student."))
    # True: RUN's own checkpoint; a path: that checkpoint (the command line's bare --resume: "", see cli.run_folder)
    resume: bool | str = field(default=False, metadata=opt(
        "Continue the run from RUN/checkpoint.pth, or from CHECKPOINT (a run's checkpoint.pth or its folder; the "
        "run goes on in that folder unless --out says another); its settings win.",
        default=None, is_flag=False, flag_value="", metavar="[CHECKPOINT]"))
    # start over in a RUN that holds a run (its run files deleted)
    overwrite: bool = field(default=False, metadata=opt(
        "Start over in an --out that holds a run: its run files (checkpoint.pth, metrics.jsonl, summary.csv, "
        "summary.json) are deleted once the new run's checks pass; other files are kept."))
    # start from this checkpoint's weights (student/finetune.py)
    finetune: str | None = field(default=None, metadata=opt(FINETUNE_HELP, metavar="CKPT"))
    # plain training (no --labels) draws views from these; with --labels they come from the store
    recipe: str | None = field(default=None, metadata=opt("Without --labels: augmentation preset [deit]."))
    overrides: list[str] = field(default_factory=list, metadata=opt(
        "Without --labels: recipe override.", flags=("--set",), multiple=True, metavar="KEY=VALUE"))
    seed: int | None = field(default=None, metadata=opt("Without --labels: view seed [0].", type=SEED))
    input_size: int | None = field(default=None, metadata=opt(
        "Without --labels: view size [recipe: 224].", type=at_least(1)))
    # repeated augmentation, recipe.repeats (deit preset: 3)
    repeats: int | None = field(default=None, metadata=opt(
        "Repeated augmentation R [recipe: 3]; with --labels it must be the store's.", type=at_least(1)))
    shard_size: int = field(default=1024, metadata=shard_size_opt())
    shards: str = field(default="auto", metadata=shards_opt())  # shard layout (pipeline.sources.index_source)
    # run control
    log_every: int = field(default=50, metadata=opt(
        "Progress bar update, in steps; the loss is read back from the device (and a non-finite one stops the "
        "run) only then.", type=at_least(1)))
    # cap each epoch (smoke tests, benchmarks)
    max_steps_per_epoch: int | None = field(default=None, metadata=opt(
        "Cap every epoch at N steps (smoke runs).", type=at_least(1)))
    # end this run after N more epochs (preemptible jobs)
    stop_after_epochs: int | None = field(default=None, metadata=opt(
        "End this run after N epochs; --resume goes on.", type=at_least(1, MAX_EPOCHS)))
    # a bucket source's objects kept whole on node-local disk (pipeline/sources/local_copies.py)
    source_cache: str | None = field(default=None, metadata=opt(
        "With --data on a bucket: keep its objects whole in this node-local folder (shared by the node's ranks, "
        "kept after the run): the first epoch copies each once, later epochs read the copies.", metavar="DIR"))
    source_cache_gib: float | None = field(default=None, metadata=opt(
        "At most this many GiB of copies in --source-cache [default: 90% of its free space].", type=positive()))
    progress: bool = True  # the progress bar and console lines: set by code, not an option
