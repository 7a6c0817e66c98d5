"""Stage one: run the teacher over every view of every sample and store its answers.

``run_precompute`` composes the parts, each in its own module with one meaning per word:

- ``units.py``: the work plan. A *unit* is the unit of work and of storage, (shard, view block); the
  order a process takes units in; ``UnitViews``, which renders a unit's views in fixed batches.
- ``fleet.py``: ranks, claims and leases, the endgame; the index lease of a fresh store.
- ``index_once.py``: the sample table, read from the source once per store (a fresh fleet's first
  process), else taken from the store's manifest and the source checked cheaply.
- ``labelling.py``: batch -> teacher -> unit buffer -> one atomic commit per unit.

Here: the settings and their checks, the store's spec, the start (teacher, store, probes, damaged
units redone) and the end-of-run summary.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass, field

from storage import StoreError, StoreSpec, create_store, open_store
from storage.api import grow_store
from storage.base import library_versions
from storage.leases import Leases, new_worker_id
from storage.meta import PROBES, SOURCE_STAMPS, TEACHER_IDENTITY, VERSIONS, soft_error_key

from ..devices import resolve_device
from ..options import check_values
from ..probes import probe_hashes
from ..progress import progress_bar
from ..recipes import create_recipe, parse_overrides
from ..sources import Manifest, SourceChanged, check_outside_source, stored_manifest
from ..views import ViewRenderer
from . import fleet
from .banner import StartState, start_banner
from .config import PrecomputeConfig  # its own module (options are its fields); still importable here
from .errors import PrecomputeError
from .index_once import source_manifest
from .labelling import Labeller
from .teacher import check_teacher_has_weights, create_teacher, trained_view_size
from .units import own_share, work_order

__all__ = ["PrecomputeConfig", "PrecomputeError", "PrecomputeSummary", "run_precompute"]

log = logging.getLogger("deit_lockstep.precompute")


@dataclass
class PrecomputeSummary:
    rank: int
    world_size: int
    units_done: int          # by this process
    units_skipped: int       # already complete when this process reached them
    views_written: int
    views_invalid: int
    invalid_keys: list[str]
    units_complete: int      # in the whole store, at the end
    units_total: int
    store_bytes: int
    stored_views: int        # views in complete units, whole store
    seconds: float
    soft_error: dict = field(default_factory=dict)  # tau -> storage.soft.recorded_soft_error (this rank's)
    worker: str = ""         # a --join process: its worker id (it has no rank)
    units_complete_at_start: int = 0  # in the whole store, when this process started

    @property
    def units_by_others(self) -> int:
        """Units other processes (fleet ranks, --join workers) completed while this one ran."""
        return max(self.units_complete - self.units_complete_at_start - self.units_done, 0)

    def report(self) -> str:
        """Who did what, in words: this process, the store before it, the others meanwhile; what is left."""
        bpv = self.store_bytes / max(self.stored_views, 1)
        who = f"worker {self.worker}" if self.worker else f"rank {self.rank} of {self.world_size}"
        did = (f"precompute: this process ({who}) labelled {_units(self.units_done)} ({self.views_written:,} views) "
               f"in {self.seconds:.1f}s ({self.views_written / max(self.seconds, 1e-9):.1f} views/s)")
        if self.units_complete_at_start:
            did += f"; {_units(self.units_complete_at_start, 'already complete when it started')}"
        if self.units_by_others:
            did += f"; {_units(self.units_by_others, 'labelled by other processes meanwhile')}"
        left = self.units_total - self.units_complete
        state = "the store is complete" if left == 0 else (
            f"{_units(left)} left: rerun the same command to finish them (or wait for the other processes)")
        lines = [did, f"store: {self.units_complete}/{self.units_total} units complete, {state}; "
                      f"{self.store_bytes:,} bytes, {bpv:.2f} bytes/view"]
        for tau, err in sorted(self.soft_error.items()):
            st, un = err["stored"], err["uniform"]
            lines.append(f"soft targets at tau {tau:g} (top-k + stored tail mass, tail split uniform), "
                         f"{err['views']} views: total variation to the teacher's softmax(z/{tau:g}) mean "
                         f"{st['tv_mean']:.4f} max {st['tv_max']:.4f}, KL mean {st['kl_mean']:.4f} "
                         f"(uniform-tail guess: TV {un['tv_mean']:.4f})")
        if self.views_invalid:
            shown = ", ".join(self.invalid_keys[:5]) + (" ..." if len(self.invalid_keys) > 5 else "")
            lines.append(f"invalid: {self.views_invalid} views of undecodable images ({shown}); "
                         "train skips them")
        return "\n".join(lines)


def _units(n: int, were: str = "") -> str:
    """'1 unit', '3 units'; with `were`: '1 unit was ...', '3 units were ...'."""
    text = f"{n:,} unit" + ("" if n == 1 else "s")
    return f"{text} {'was' if n == 1 else 'were'} {were}" if were else text




def _creation_meta(teacher, manifest: Manifest) -> dict:
    """store.json's meta: the teacher's identity, and the source files' stamps (a later start checks the
    source by them, one stat per file: ``sources.unchanged_source``; not in the manifest, whose bytes are
    the same for any copy of the source)."""
    meta = {TEACHER_IDENTITY: _identity_with_path(teacher.identity)}
    if manifest.stamps is not None:
        meta[SOURCE_STAMPS] = manifest.stamps
    return meta


def build_spec(cfg: PrecomputeConfig, manifest: Manifest, recipe, teacher) -> StoreSpec:
    return StoreSpec(
        mode="hard" if cfg.hard else "topk",
        k=0 if cfg.hard else cfg.topk,
        num_classes=manifest.num_classes,
        class_names=tuple(manifest.class_names),
        views=cfg.views,
        shard_sizes=manifest.shard_sizes,
        views_per_unit=cfg.views_per_unit,
        recipe=recipe.to_dict(),
        seed=cfg.seed,
        manifest_fingerprint=manifest.fingerprint,
        teacher={"name": teacher.name, "fingerprint": teacher.identity["fingerprint"]},
        taus=tuple(cfg.taus),
    )



def _recipe(cfg: PrecomputeConfig):
    """(the recipe views are rendered with, where its view size came from).

    Without --input-size (or --set input_size=N), a teacher that is one of our `train` checkpoints gives
    the size it was trained at: rendering at the recipe's default 224 and resizing back to the teacher's
    32 px would label blurred copies of views the teacher never trained on, cost ~50x the rendering, and
    make every student of the store train at 224 px."""
    overrides = list(cfg.overrides) + ([f"input_size={cfg.input_size}"] if cfg.input_size is not None else [])
    recipe = create_recipe(cfg.recipe, overrides)  # the user's own settings are checked first
    if "input_size" in parse_overrides(overrides):
        return recipe, "--input-size"
    trained = trained_view_size(cfg.teacher, cfg.teacher_weights)
    if trained is None:
        return recipe, f"recipe {recipe.name}'s default"
    return create_recipe(cfg.recipe, overrides + [f"input_size={trained}"]), "the teacher checkpoint's recipe"


def _identity_with_path(identity: dict) -> dict:
    """The teacher's identity plus the absolute path of its weights file (when it came from one), so
    ``verify`` run from another directory finds the file a relative --teacher-weights named."""
    if identity.get("weights_sha256_of") == "file" and identity.get("weights") and os.path.isfile(identity["weights"]):
        return {**identity, "weights_abspath": os.path.abspath(identity["weights"])}
    return identity


def _check(cfg: PrecomputeConfig) -> None:
    """Each value in its range (its option's type, in config.py: what the command line was parsed with),
    then settings that contradict each other."""
    check_values(cfg)
    if cfg.taus and cfg.hard:
        raise PrecomputeError("--tau stores the tempered tail of soft labels: drop --tau, or --hard for --topk K")
    if cfg.join and (cfg.rank is not None or cfg.world_size is not None):
        raise PrecomputeError("--join takes no rank or world size (each process claims what is left): "
                              "drop --rank/--world-size, or drop --join")
    if cfg.join and not cfg.claim:
        raise PrecomputeError("--join works by claiming units: drop --no-claim, or give --rank/--world-size")
    check_outside_source(cfg.data, cfg.out)  # a store inside an ImageFolder would become one of its classes


def _existing_store(out: str) -> bool:
    try:
        open_store(out)
    except (StoreError, OSError, ValueError, KeyError):
        return False  # no store there yet (or a damaged one): create_store says what is wrong
    return True


def _grow_if_asked(out: str, spec: StoreSpec) -> int | None:
    """More views than the store at out holds, all else equal: grow it (storage.api.grow_store) and return
    the views it held; fewer: refuse."""
    try:
        on_disk = open_store(out).spec
    except (StoreError, OSError, ValueError, KeyError):
        return None  # no store there yet (or a damaged one): create_store says what is wrong
    if on_disk.views == spec.views or dataclasses.replace(on_disk, views=spec.views) != spec:
        return None  # nothing to grow, or other settings too: create_store names the first difference
    if spec.views < on_disk.views:
        raise PrecomputeError(f"store at {out} was made with views={on_disk.views}, you asked for views={spec.views}: "
                              f"a store only grows; pass --views {on_disk.views} or more, or --overwrite to start over")
    if grow_store(out, spec.views):
        log.warning("store at %s grown from %d to %d views", out, on_disk.views, spec.views)
        return on_disk.views
    return None



def run_precompute(cfg: PrecomputeConfig) -> PrecomputeSummary:
    t0 = time.perf_counter()
    _check(cfg)
    # before the source is indexed (a full read of it for a new store): offline, nothing built or fetched
    check_teacher_has_weights(cfg.teacher, cfg.teacher_weights, allow_random=cfg.random_teacher)
    rank, world = (0, 1) if cfg.join else fleet.fleet_position(cfg.rank, cfg.world_size)
    if cfg.overwrite and (rank != 0 or cfg.join):
        raise PrecomputeError("--overwrite deletes the store: use it on a single process, not in a fleet")
    recipe, size_from = _recipe(cfg)
    worker = new_worker_id()
    show = cfg.progress and rank == 0  # rank 0, or every --join process (they all run as rank 0 of 1)
    # A fresh store: one process of the fleet reads the source, the others wait until it made the store.
    with source_manifest(cfg, worker, show, fleet=world > 1 or cfg.join) as manifest:
        if not cfg.hard and cfg.topk > manifest.num_classes:
            raise PrecomputeError(f"--topk {cfg.topk} is more than the source's {manifest.num_classes} classes; "
                                  f"use --topk <= {manifest.num_classes} or --hard")
        device = resolve_device(cfg.device)
        teacher = create_teacher(cfg.teacher, weights=cfg.teacher_weights, num_classes=manifest.num_classes,
                                 model_kwargs=cfg.model_kwargs, device=device, compile=cfg.compile)
        spec = build_spec(cfg, manifest, recipe, teacher)
        existed = not cfg.overwrite and _existing_store(cfg.out)
        grown_from = _grow_if_asked(cfg.out, spec) if existed else None
        writer = create_store(cfg.out, spec, backend=cfg.backend, manifest=manifest.to_bytes(),
                              meta=_creation_meta(teacher, manifest), overwrite=cfg.overwrite)
    # Same names and labels (the spec's fingerprint matched), but the bytes? A resumed run must not
    # label half the views from one image and half from another.
    changed = manifest.first_changed_sample(stored_manifest(open_store(cfg.out)))
    if changed is not None:
        raise SourceChanged(f"{cfg.data}: {changed}: the source changed since the store {cfg.out} was begun; "
                            "restore it, or re-run precompute on the new source with --overwrite")
    if rank == 0:
        writer.set_meta(PROBES, probe_hashes(ViewRenderer(recipe), manifest, cfg.seed, cfg.views))
        writer.set_meta(VERSIONS, library_versions())

    everything = spec.units()
    skipped = _redo_damaged(writer, cfg.out, own_share(everything, rank, world))
    complete_at_start = len(writer.completed_units())
    if show:
        state = StartState(rank=rank, world=world, worker=worker if cfg.join else "", size_from=size_from,
                           existed=existed, grown_from=grown_from, units_complete=complete_at_start,
                           units_total=len(everything))
        print(start_banner(cfg, teacher, manifest, recipe, spec, device, state), file=sys.stderr, flush=True)

    bar = progress_bar(total=spec.views_in(everything), unit="view", desc="precompute",  # tqdm's word, not ours
                       disable=not show, dynamic_ncols=True, smoothing=0.05)
    bar.update(spec.views_in(writer.completed_units()))
    leases = Leases(cfg.out, worker, cfg.lease_ttl) if cfg.claim else None
    labeller = Labeller(cfg, spec, manifest, recipe, teacher, device, writer, leases, bar,
                        fleet=cfg.claim or world > 1)
    try:  # close the bar on any error, so the one-line error starts its own line
        fleet.work_through(work_order(everything, rank, world, cfg.claim), writer, leases, labeller)
        labeller.finish_bar()
    finally:
        bar.close()
    labeller.soft_error.save(writer, soft_error_key(f"join-{worker}" if cfg.join else rank))
    for key in sorted(set(labeller.invalid_keys)):
        log.warning("undecodable image %s: its views are flagged invalid", key)
    return PrecomputeSummary(
        rank=rank, world_size=world, units_done=labeller.units_done, units_skipped=skipped,
        units_complete_at_start=complete_at_start, views_written=labeller.written,
        views_invalid=labeller.invalid, invalid_keys=sorted(set(labeller.invalid_keys)),
        units_complete=len(writer.completed_units()), units_total=len(everything),
        store_bytes=open_store(cfg.out).nbytes(),
        stored_views=spec.views_in(writer.completed_units()), seconds=time.perf_counter() - t0,
        soft_error=labeller.soft_error.summary(), worker=worker if cfg.join else "")


def _redo_damaged(writer, out: str, mine: list) -> int:
    """Retract this rank's complete units whose bytes were damaged since (flipped byte, lost chunk, torn
    marker), which would otherwise be skipped forever; the units of ``mine`` still complete after that.
    Automatic rather than a flag, because it is cheap: it reads the store's labels once (~26 bytes/view),
    while the run reads every image once per unit."""
    for shard, block in sorted({p.unit for p in open_store(out).check_units(
            [u for u in mine if writer.is_complete(*u)])}):
        log.warning("unit (shard=%d, view_block=%d) is damaged: recomputing it", shard, block)
        writer.retract(shard, block)
    return sum(writer.is_complete(*u) for u in mine)
