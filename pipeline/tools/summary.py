"""``inspect STORE``: a summary of a label store that answers in seconds on a store of any size.

It reads only what it must: the spec and metadata, the unit markers (completion), the validity flags
(invalid views; the smallest array), the bytes on disk, and a bounded random sample of ``(view, shard)``
blocks for the label statistics (agreement with the ground truth, probabilities, frequent classes),
which the report says are a sample.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from storage import WRITTEN, Labels, StoreCorrupt
from storage.leases import fleet_status
from storage.meta import PROBES, TEACHER_IDENTITY, VERSIONS

if TYPE_CHECKING:  # views imports torch; the summary path must not pay for it
    pass

from .lookup import class_names, dominant_targets, stored_manifest

DEFAULT_SAMPLE_BLOCKS = 32      # (view, shard) blocks read for the label statistics
DEFAULT_SAMPLE_VIEWS = 200_000  # ... and at most this many views in them


# ---- summary -------------------------------------------------------------------------------
@dataclass
class Agreement:
    views: int = 0
    top1: float | None = None
    top5: float | None = None


@dataclass
class Summary:
    path: str
    backend: str
    mode: str
    k: int
    num_classes: int
    views: int
    shards: int
    samples: int
    units_total: int
    units_complete: int
    missing_units: list[tuple[int, int]]
    complete_views: list[int]
    stored_views: int
    written_views: int
    invalid_views: int
    unreadable_units: list[tuple[int, int]]
    nbytes: int
    sample_blocks: int = 0
    sample_views: int = 0
    unmixed: Agreement = field(default_factory=Agreement)
    mixed: Agreement = field(default_factory=Agreement)
    mean_top1_prob: float | None = None
    mean_tail_mass: float | None = None
    top_classes: list[tuple[str, float]] = field(default_factory=list)
    recipe: dict = field(default_factory=dict)
    seed: int = 0
    teacher: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    probes: int = 0
    # the shards behind the store: layout, and distinct classes per shard vs a random draw of that size
    shard_layout: str = ""
    source_kind: str = ""                          # imagefolder, wds or parquet
    source_files: int | None = None                # its tars or parquet files (None: an image folder)
    classes_per_shard: float | None = None         # mean distinct classes per shard
    classes_per_shard_min: int | None = None
    classes_per_shard_random: float | None = None  # expected for random shards of the same sizes
    seconds: float = 0.0
    taus: list[float] = field(default_factory=list)  # temperatures whose tempered tail mass is stored
    fleet: dict = field(default_factory=dict)  # storage.leases.fleet_status: complete/leased/pending, rate, ETA

    @property
    def bytes_per_view(self) -> float | None:
        return self.nbytes / self.stored_views if self.stored_views else None

    def to_json(self) -> dict:
        d = asdict(self)
        d["bytes_per_view"] = self.bytes_per_view
        d["missing_units"] = [list(u) for u in self.missing_units]
        d["unreadable_units"] = [list(u) for u in self.unreadable_units]
        return d


def complete_views(spec, done: set[tuple[int, int]]) -> list[int]:
    blocks = {b for b in range(spec.num_blocks) if all((s, b) in done for s in range(spec.num_shards))}
    return [v for v in range(spec.views) if spec.block_of(v) in blocks]


def sample_blocks(spec, done, max_blocks: int, max_views: int, seed: int) -> list[tuple[int, int]]:
    """Distinct (view, shard) blocks drawn at random (seeded) among complete units, within both budgets."""
    g = np.random.Generator(np.random.Philox(key=[seed, 0x1175]))
    units = sorted(u for u in done if spec.shard_sizes[u[0]] > 0)
    available = sum(len(spec.block_views(b)) for _, b in units)
    chosen: set[tuple[int, int]] = set()
    views = 0
    while units and len(chosen) < min(max_blocks, available):
        shard, block = units[int(g.integers(0, len(units)))]
        vs = spec.block_views(block)
        pick = (int(vs.start + g.integers(0, len(vs))), shard)
        if pick in chosen:
            continue
        if chosen and views + spec.shard_sizes[shard] > max_views:
            break
        chosen.add(pick)
        views += spec.shard_sizes[shard]
    return sorted(chosen)


@dataclass
class _Tally:
    hits1: np.ndarray = field(default_factory=lambda: np.zeros(2, np.int64))  # [unmixed, mixed]
    hits5: np.ndarray = field(default_factory=lambda: np.zeros(2, np.int64))
    count: np.ndarray = field(default_factory=lambda: np.zeros(2, np.int64))
    top1_prob: float = 0.0
    tail: float = 0.0
    n: int = 0
    top1_ids: Counter = field(default_factory=Counter)

    def add(self, lab: Labels, target: np.ndarray, mixed: np.ndarray) -> None:
        ok = lab.valid == WRITTEN
        if not ok.any():
            return
        ids = lab.ids[ok]
        top = ids[:, :5] if ids.ndim == 2 else ids[:, None]
        t, m = target[ok], mixed[ok].astype(np.int64)
        h1 = top[:, 0] == t
        h5 = (top == t[:, None]).any(axis=1)
        for j in (0, 1):
            sel = m == j
            self.count[j] += sel.sum()
            self.hits1[j] += h1[sel].sum()
            self.hits5[j] += h5[sel].sum()
        if lab.values is not None:
            p = np.exp(lab.values[ok].astype(np.float32))
            self.top1_prob += float(p[:, 0].sum())
            self.tail += float(np.clip(1.0 - p.sum(axis=1), 0.0, 1.0).sum())
        self.n += int(ok.sum())
        self.top1_ids.update(top[:, 0].tolist())

    def agreement(self, j: int, topk: bool) -> Agreement:
        c = int(self.count[j])
        if not c:
            return Agreement()
        return Agreement(c, float(self.hits1[j] / c), float(self.hits5[j] / c) if topk else None)


def summarize(reader, *, max_blocks: int = DEFAULT_SAMPLE_BLOCKS, max_views: int = DEFAULT_SAMPLE_VIEWS,
              seed: int = 0) -> Summary:
    """The store at a glance; label statistics come from a bounded random sample (see module doc)."""
    t0 = time.perf_counter()
    spec = reader.spec
    done = set(reader.completed_units())
    flags = reader.count_flags(done)
    meta = reader.meta
    s = Summary(
        path=str(reader.path), backend=reader.backend, mode=spec.mode, k=spec.k, num_classes=spec.num_classes,
        views=spec.views, shards=spec.num_shards, samples=sum(spec.shard_sizes),
        units_total=len(spec.units()), units_complete=len(done),
        missing_units=[u for u in spec.units() if u not in done], complete_views=complete_views(spec, done),
        stored_views=spec.views_in(done), written_views=flags.written, invalid_views=flags.invalid,
        unreadable_units=flags.unreadable, nbytes=reader.nbytes(), recipe=spec.recipe, seed=spec.seed,
        teacher=meta.get(TEACHER_IDENTITY) or dict(spec.teacher),
        versions=meta.get(VERSIONS) or reader.versions, probes=len(meta.get(PROBES, {})),
        taus=list(spec.taus),
        fleet=_fleet(reader.path, spec, done),
    )
    _shard_diversity(reader, s)
    readable = done - set(flags.unreadable)
    blocks = sample_blocks(spec, readable, max_blocks, max_views, seed)
    if blocks:
        _label_statistics(reader, s, blocks)
    s.seconds = time.perf_counter() - t0
    return s


def _fleet(path, spec, done) -> dict:
    """fleet_status, without a pace on a store no one works on: a finished store's last commits are history,
    not a rate (and no ETA)."""
    f = fleet_status(path, spec.units(), done,
                     {(sh, b): len(spec.block_views(b)) * spec.shard_sizes[sh] for sh, b in spec.units()})
    if not f["units_pending"] and not f["units_leased"]:
        f.update(units_per_s=None, views_per_s=None, eta_s=None)
    return f


def _shard_diversity(reader, s: Summary) -> None:
    """Class-sorted shards make same-class mixing partners and one-class batches: show it."""
    from ..sources import class_diversity

    manifest = stored_manifest(reader)
    d = class_diversity(manifest)
    s.shard_layout, s.source_kind = manifest.layout, manifest.kind
    s.source_files = manifest.file_count
    s.classes_per_shard = float(d.observed.mean())
    s.classes_per_shard_min = int(d.observed.min())
    s.classes_per_shard_random = float(d.expected.mean())


def _label_statistics(reader, s: Summary, blocks: list[tuple[int, int]]) -> None:
    from ..recipes import Recipe
    from ..views import ViewRenderer

    spec = reader.spec
    renderer = ViewRenderer(Recipe.from_dict(spec.recipe))
    manifest = stored_manifest(reader)
    starts = manifest.shard_starts
    all_labels = manifest.samples.column("label").to_numpy()
    tally = _Tally()
    for view, shard in blocks:
        try:
            lab = reader.read(view, shard)
        except StoreCorrupt:
            s.unreadable_units.append((shard, spec.block_of(view)))
            continue
        n = spec.shard_sizes[shard]
        labels = all_labels[starts[shard]: starts[shard] + n]
        target, mixed = dominant_targets(labels, renderer.plan(spec.seed, view, shard, n))
        tally.add(lab, target, mixed)
        s.sample_blocks += 1
    s.sample_views = tally.n
    topk = spec.mode == "topk" and spec.k >= 5
    s.unmixed, s.mixed = tally.agreement(0, topk), tally.agreement(1, topk)
    if spec.mode == "topk" and tally.n:
        s.mean_top1_prob, s.mean_tail_mass = tally.top1_prob / tally.n, tally.tail / tally.n
    names = class_names(spec)
    s.top_classes = [(names[c], cnt / tally.n) for c, cnt in tally.top1_ids.most_common(5)] if tally.n else []


def _units_text(units: list[tuple[int, int]], limit: int = 12) -> str:
    shown = " ".join(f"({a},{b})" for a, b in units[:limit])
    return shown + (f" ... (+{len(units) - limit} more)" if len(units) > limit else "")


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    parts, start = [], xs[0]
    for prev, x in zip(xs, xs[1:] + [None], strict=True):
        if x != prev + 1 if x is not None else True:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = x
    return ", ".join(parts)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _agreement_text(a: Agreement, what: str) -> str:
    if not a.views:
        return f"no {what} views in the sample"
    top5 = f", top-5 {_pct(a.top5)}" if a.top5 is not None else ""
    return f"top-1 {_pct(a.top1)}{top5} on {a.views:,} {what} views"


def format_summary(s: Summary) -> str:
    labels = f"top-{s.k} log-probabilities" if s.mode == "topk" else "hard labels (teacher argmax)"
    if s.taus:
        labels += f" + tempered tail mass at tau {', '.join(f'{t:g}' for t in s.taus)}"
    total_views = s.views * s.samples
    bpv = f", {s.bytes_per_view:.2f} bytes/view" if s.bytes_per_view else ""
    status = "complete" if not s.missing_units else "INCOMPLETE"
    lines = [
        f"store       {s.path} ({s.backend})",
        f"labels      {labels}, {s.num_classes} classes",
        f"size        {total_views:,} views = {s.views} views x {s.samples:,} samples in {s.shards} shards",
        f"completion  {s.units_complete}/{s.units_total} units ({status}); complete views: "
        f"{_ranges(s.complete_views)}",
    ]
    if s.missing_units:
        lines.append(f"missing     units (shard,view_block): {_units_text(s.missing_units)}; "
                     "rerun precompute (it resumes)")
    lines += _fleet_lines(s.fleet)
    if s.unreadable_units:
        lines.append(f"unreadable  units (shard,view_block): {_units_text(sorted(set(s.unreadable_units)))}; "
                     "run verify --full")
    share = s.invalid_views / max(s.written_views + s.invalid_views, 1)
    if s.classes_per_shard is not None:
        recut = s.source_files is not None and s.shard_layout != "as-is"
        cut = f", re-cut from {s.source_files} {s.source_kind} files" if recut else ""
        ratio = s.classes_per_shard / max(s.classes_per_shard_random, 1e-12)
        warn = "; class-skewed: precompute with --shards shuffle" if ratio < 0.5 else ""
        lines.append(f"shards      layout {s.shard_layout}{cut}; distinct classes per shard mean "
                     f"{s.classes_per_shard:.1f} (min {s.classes_per_shard_min}), random shards "
                     f"{s.classes_per_shard_random:.1f} (ratio {ratio:.2f}){warn}")
    lines += [
        f"invalid     {s.invalid_views:,} views ({_pct(share)}) of undecodable images; train skips them",
        f"disk        {s.nbytes:,} bytes{bpv}",
    ]
    if s.sample_views:
        lines += [
            f"sample      {s.sample_views:,} views from {s.sample_blocks} random (view, shard) blocks "
            "(the statistics below)",
            f"agreement   with ground truth: {_agreement_text(s.unmixed, 'unmixed')}; "
            f"{_agreement_text(s.mixed, 'mixed')} (vs their dominant source, lambda >= 0.5)",
        ]
        if s.mean_top1_prob is not None:
            lines.append(f"probability mean top-1 {s.mean_top1_prob:.3f}, mean tail mass outside top-{s.k} "
                         f"{s.mean_tail_mass:.4f}")
        lines.append("top classes " + ", ".join(f"{n} {_pct(f)}" for n, f in s.top_classes))
    t = s.teacher
    lines += [
        f"teacher     {t.get('name')} (fingerprint {str(t.get('fingerprint', ''))[:16]}, weights "
        f"{t.get('weights')}, input {t.get('input_size')})",
        f"recipe      {_recipe_text(s.recipe)}",
        f"seed        {s.seed}; {s.probes} probe views recorded",
        "versions    " + ", ".join(f"{k} {v}" for k, v in sorted(s.versions.items()) if v),
        f"time        {s.seconds:.2f}s",
    ]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, sec = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def _fleet_lines(f: dict, limit: int = 8) -> list[str]:
    """Who is working on the store and how fast: shown while units are missing or leases are held."""
    if not f or (not f["leases"] and not f["units_pending"] and not f["units_leased"]):
        return []
    if f["views_per_s"]:
        pace = (f"{f['recent_units']} units in the last {_duration(f['window_s'])}, {f['views_per_s']:.1f} views/s"
                + (f", ETA {_duration(f['eta_s'])}" if f["eta_s"] else ""))
    else:
        pace = f"no unit completed in the last {_duration(f['window_s'])}"
    lines = [f"fleet       {f['units_complete']} units complete, {f['units_leased']} leased, "
             f"{f['units_pending']} pending; {pace}"]
    now = time.time()
    for lease in f["leases"][:limit]:
        state = "EXPIRED (may be taken over)" if lease["expired"] else "renewed"
        lines.append(f"  lease     unit ({lease['unit'][0]},{lease['unit'][1]}) held by {lease['worker']} "
                     f"(host {lease['host']}, pid {lease['pid']}) for {_duration(now - lease['since'])}, "
                     f"{state} {lease['renewed_age_s']:.0f}s ago")
    if len(f["leases"]) > limit:
        lines.append(f"  lease     ... (+{len(f['leases']) - limit} more)")
    return lines


def _recipe_text(r: dict) -> str:
    keys = ("name", "input_size", "scale", "hflip", "auto_augment", "re_prob", "mixup_alpha", "cutmix_alpha",
            "mix_prob", "switch_prob")
    return ", ".join(f"{k}={r[k]}" for k in keys if k in r)
