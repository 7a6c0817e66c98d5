"""TrainConfig: every setting of a training run (cut from train.py unchanged)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.options import default_workers


@dataclass
class TrainConfig:
    data: str
    out: str
    labels: str | None = None
    model: str = "deit_small_distilled_patch16_224"
    model_kwargs: dict = field(default_factory=dict)
    distillation: str | None = None     # none | hard | soft; default: hard with --labels, else none
    alpha: float = 0.5
    tau: float = 1.0
    kd_reduction: str = "batchmean"
    epochs: int = 300
    batch_size: int = 64                # per process; the global batch is batch_size x world
    lr: float = 5e-4                    # for a global batch of 512, scaled linearly
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: int = 5
    weight_decay: float = 0.05
    drop_path: float = 0.1
    clip_grad: float | None = None
    ema: bool = True
    model_ema_decay: float = 0.99996
    val: str | None = None
    eval_batch_size: int | None = None  # default: 2 x batch_size
    workers: int = field(default_factory=default_workers)
    device: str = "auto"
    amp: bool = True                    # bf16 autocast on CUDA (fp16 + GradScaler where bf16 is missing)
    compile: bool = False
    resume: bool | str = False          # True: RUN's own checkpoint; a path: that checkpoint
    overwrite: bool = False             # start over in a RUN that holds a run (its run files deleted)
    finetune: str | None = None         # start from this checkpoint's weights (student/finetune.py)
    # plain training (no --labels) draws views from these; with --labels they come from the store
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    seed: int | None = None
    input_size: int | None = None
    repeats: int | None = None          # repeated augmentation, recipe.repeats (deit preset: 3)
    shard_size: int = 1024
    shards: str = "auto"                # shard layout: auto, as-is, shuffle (pipeline.sources.index_source)
    # run control
    log_every: int = 50
    max_steps_per_epoch: int | None = None  # cap each epoch (smoke tests, benchmarks)
    stop_after_epochs: int | None = None    # end this run after N more epochs (preemptible jobs)
    progress: bool = True
