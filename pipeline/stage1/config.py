"""PrecomputeConfig: every setting of a precompute run, and each one's command-line option.

A field is defined once: its default, and in its metadata (``opt``) its help, its type (the range,
checked by click when the command line or ``--config FILE`` is parsed) and its flags. ``cli.py
precompute`` is generated from these fields (``pipeline.options.config_options``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import click

from storage.api import BACKENDS, DEFAULT_BACKEND
from storage.leases import DEFAULT_TTL

from ..options import (
    MAX_EPOCHS,
    SEED,
    at_least,
    batch_size_opt,
    default_workers,
    device_opt,
    model_kwargs_opt,
    opt,
    positive,
    shard_size_opt,
    shards_opt,
    workers_opt,
)
from ..sources import formats_in_words  # the --data help names the registry's formats


@dataclass
class PrecomputeConfig:
    data: str = field(metadata=opt(f"{formats_in_words()[:1].upper()}{formats_in_words()[1:]} (dir, glob, {{a..b}})."))
    out: str = field(metadata=opt("Label store to create or resume."))
    teacher: str = field(metadata=opt("timm model name or name.tag (e.g. regnety_160.deit_in1k)."))
    teacher_weights: str | None = field(default=None, metadata=opt(
        "Local .pth/.pt/.safetensors weights for the teacher."))
    views: int = field(default=300, metadata=opt("Views per sample (epoch e uses e mod V).",
                                                 type=at_least(1, MAX_EPOCHS)))
    topk: int = field(default=10, metadata=opt("Soft labels: keep the teacher's top-k.", type=at_least(1)))
    hard: bool = field(default=False, metadata=opt("Store only the teacher's argmax."))
    # store the tempered tail's log-sum-exp at each
    taus: list[float] = field(default_factory=list, metadata=opt(
        "Soft labels: also store the tempered tail mass at temperature T (repeatable), which makes "
        "`train --tau T` targets exact in top-k weights and tail mass. Each T is one float16 per view: "
        "2 bytes/view uncompressed, about 1-1.8 as stored (blosc; less at higher T; benchmarks/tau_bytes.py).",
        flags=("--tau",), multiple=True, type=positive(), metavar="T"))
    recipe: str = field(default="deit", metadata=opt("Augmentation preset: deit or crop-flip."))
    overrides: list[str] = field(default_factory=list, metadata=opt(
        "Override a recipe value.", flags=("--set",), multiple=True, metavar="KEY=VALUE"))
    seed: int = field(default=0, metadata=opt("Seed of every view's augmentation (stored; train replays it).",
                                              type=SEED))
    input_size: int | None = field(default=None, metadata=opt("View size in pixels [recipe: 224].", type=at_least(1)))
    shard_size: int = field(default=1024, metadata=shard_size_opt())
    shards: str = field(default="auto", metadata=shards_opt())  # shard layout (sources.index_source)
    views_per_unit: int = field(default=10, metadata=opt("Views per work unit.", type=at_least(1)))
    batch_size: int = field(default=256, metadata=batch_size_opt("Teacher batch (within a unit)."))
    workers: int = field(default_factory=default_workers, metadata=workers_opt())
    device: str = field(default="auto", metadata=device_opt())
    backend: str = field(default=DEFAULT_BACKEND, metadata=opt(
        "Label store backend.", flags=("--format",), type=click.Choice(list(BACKENDS))))
    model_kwargs: dict = field(default_factory=dict, metadata=model_kwargs_opt("teacher"))
    compile: bool = field(default=False, metadata=opt("torch.compile the teacher (CUDA)."))
    rank: int | None = field(default=None, metadata=opt("This process's rank (else RANK or SLURM_PROCID).",
                                                        type=at_least(0)))
    world_size: int | None = field(default=None, metadata=opt("Fleet size (else WORLD_SIZE or SLURM_NTASKS).",
                                                              type=at_least(1)))
    # after its own share, take over other ranks' pending units (leases)
    claim: bool = field(default=True, metadata=opt(
        "After this rank's own share, take over other ranks' pending units through leases "
        "(--no-claim: the static split, unit i on rank i mod world only).", flags=("--claim/--no-claim",)))
    # no rank or world size: claim pending units until none is left
    join: bool = field(default=False, metadata=opt(
        "No rank or world size: claim pending units until none is left (any number of processes, "
        "started at any time, on machines sharing the store's filesystem)."))
    # seconds a lease lives without renewal before others may take it over
    lease_ttl: float = field(default=DEFAULT_TTL, metadata=opt(
        "A lease not renewed for this long (a frozen or lost worker) may be taken over.",
        type=positive(), metavar="SECONDS"))
    overwrite: bool = field(default=False, metadata=opt("Delete an existing store at --out first."))
    # allow a teacher without weights (tests, smoke runs): its labels are noise
    random_teacher: bool = field(default=False, metadata=opt(
        "Allow a teacher with neither --teacher-weights nor a pretrained tag: randomly initialised, "
        "its labels are noise (tests and smoke runs only)."))
    progress: bool = True          # the start banner and the progress bar (rank 0, or a --join process): not an option
