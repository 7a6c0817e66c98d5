"""PrecomputeConfig: every setting of a precompute run (cut from precompute.py unchanged)."""

from __future__ import annotations

from dataclasses import dataclass, field

from storage import DEFAULT_BACKEND
from storage.leases import DEFAULT_TTL


@dataclass
class PrecomputeConfig:
    data: str
    out: str
    teacher: str
    teacher_weights: str | None = None
    views: int = 300
    topk: int = 10
    hard: bool = False
    taus: list[float] = field(default_factory=list)  # store the tempered tail's log-sum-exp at each
    recipe: str = "deit"
    overrides: list[str] = field(default_factory=list)
    seed: int = 0
    input_size: int | None = None
    shard_size: int = 1024
    shards: str = "auto"          # shard layout (sources.index_source): auto, as-is, shuffle
    views_per_unit: int = 10
    batch_size: int = 256
    workers: int = 8
    device: str = "auto"
    backend: str = DEFAULT_BACKEND
    model_kwargs: dict = field(default_factory=dict)
    compile: bool = False
    rank: int | None = None
    world_size: int | None = None
    claim: bool = True             # after its own share, take over other ranks' pending units (leases)
    join: bool = False             # no rank or world size: claim pending units until none is left
    lease_ttl: float = DEFAULT_TTL  # seconds a lease lives without renewal before others may take it over
    overwrite: bool = False
    random_teacher: bool = False   # allow a teacher without weights (tests, smoke runs): its labels are noise
    progress: bool = True          # the start banner and the progress bar (rank 0, or a --join process)
