"""What a precompute run is about to do, said before it starts: a few lines on stderr.

A first run with the wrong teacher, layout or size used to show nothing but a progress bar; these
lines name every choice that decides the labels or the cost (teacher and its weights, source and
shard layout, views and their size, store, device), so a useless run is caught in its first second.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..sources import SKEW_THRESHOLD, Manifest, class_diversity


@dataclass(frozen=True)
class StartState:
    """What run_precompute knows once the teacher is built and the store is open."""
    rank: int
    world: int
    worker: str                # a --join process's worker id ("" otherwise)
    size_from: str             # where the view size came from (--input-size, the teacher checkpoint, ...)
    existed: bool              # the store was there before this run
    grown_from: int | None     # the store's views before this run grew it
    units_complete: int        # in the whole store, after damaged units were retracted
    units_total: int


def start_banner(cfg, teacher, manifest: Manifest, recipe, spec, device, state: StartState) -> str:
    lines = [
        f"precompute: {_teacher_line(teacher)}",
        f"  source   {cfg.data}: {manifest.kind}, {manifest.num_samples:,} samples, {manifest.num_classes} classes, "
        f"{_layout_text(cfg.shards, manifest, state.existed)}",
        f"  views    {_views_text(cfg, recipe, teacher, spec, state.size_from)}",
        f"  store    {cfg.out} ({cfg.backend}): {_store_text(state, spec)}",
        f"  run      device {device}, {cfg.workers} workers, batch size {cfg.batch_size}, {_fleet_text(cfg, state)}",
    ]
    return "\n".join(lines)


def _teacher_line(teacher) -> str:
    ident = teacher.identity
    params = sum(p.numel() for p in teacher.model.parameters())
    weights = ident.get("weights")
    if weights is None:
        source = "RANDOM weights (--random-teacher): its labels are noise, for tests and smoke runs only"
    elif str(weights).startswith(("hub:", "pypi:")):
        source = f"weights {weights}"
    else:
        source = f"weights {weights} (sha256 {ident['weights_sha256'][:12]})"
    kwargs = f", model_kwargs {ident['model_kwargs']}" if ident.get("model_kwargs") else ""
    return (f"teacher {teacher.name} ({params / 1e6:.2f}M parameters, {teacher.num_classes} classes{kwargs}), "
            f"{source}")


def _layout_text(asked: str, m: Manifest, existed: bool) -> str:
    n = len(m.shards)
    if m.files:  # tar or parquet files re-cut into seeded virtual shards
        why = ("--shards shuffle" if asked == "shuffle" else "--shards auto: the store's layout" if existed
               else "--shards auto: the files are class-skewed")
        return f"re-cut from {len(m.files)} files into {n} virtual shards of {m.shard_size} ({why})"
    if m.layout == "shuffle":  # an ImageFolder's seeded virtual shards
        return f"{n} virtual shards of {m.shard_size} (a seeded shuffle of the folder)"
    what = "the files as they are" if m.file_count is not None else "in folder order"
    text = f"{n} shards as-is ({what})"
    d = class_diversity(m)
    if n > 1 and d.ratio < SKEW_THRESHOLD:
        text += (f"; CLASS-SKEWED: {d.observed.mean():.1f} classes per shard where random shards would hold "
                 f"{d.expected.mean():.1f}, so mixing partners and batches come from few classes; "
                 "--shards shuffle re-cuts them")
    return text


def _views_text(cfg, recipe, teacher, spec, size_from: str) -> str:
    size = recipe.input_size
    seen = "" if teacher.input_size == size else f"; the teacher sees them resized to {teacher.input_size} px"
    labels = "hard labels (argmax)" if cfg.hard else f"top-{cfg.topk} log-probs"
    if spec.taus:
        labels += " + tail at tau " + ", ".join(f"{t:g}" for t in spec.taus)
    return (f"{cfg.views} per sample at {size} px (from {size_from}){seen}; {len(spec.units()):,} units of up to "
            f"{cfg.views_per_unit} views of one shard; {labels}; recipe {recipe.name}, seed {cfg.seed}")


def _store_text(state: StartState, spec) -> str:
    if not state.existed:
        return "new"
    left = state.units_total - state.units_complete
    grown = f"grown from {state.grown_from} to {spec.views} views; " if state.grown_from is not None else ""
    if left == 0:
        return f"{grown}resumed, already complete ({state.units_total:,} units): nothing to do"
    return f"{grown}resumed, {state.units_complete:,}/{state.units_total:,} units already complete, {left:,} to do"


def _fleet_text(cfg, state: StartState) -> str:
    if cfg.join:
        return f"--join as worker {state.worker} (claims units any process left)"
    if state.world == 1:
        return "one process"
    claim = ", then claims others' pending units" if cfg.claim else " only (--no-claim)"
    return f"rank {state.rank} of {state.world}: units i with i mod {state.world} == {state.rank}{claim}"
