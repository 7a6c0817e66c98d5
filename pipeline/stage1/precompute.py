"""Stage one: run the teacher over every view of every sample and store its answers.

Work is cut into units ``(shard, block of views)``. A unit is independent and idempotent:
its DataLoader worker reads the shard once (a tar front to back; a virtual shard by one seek per
sample), decodes each image once, renders all the unit's
views from the decoded images, and the main process runs the teacher and writes the unit in
one atomic commit. Each rank works through its own share first (unit i goes to rank i mod world),
then through the other ranks' pending units from the back of their lists, taking each unit by a lease
beside the store (``storage.leases``): a straggler's units go to whoever is free, and a dead or frozen
worker's are taken over once its lease is ``--lease-ttl`` seconds old. A ``--join`` process (no rank)
takes any pending unit the same way; ``--no-claim`` keeps the static split (its own share, no leases).
Units already complete are skipped, so a fleet needs no coordinator and rerunning the same command
resumes; a unit two workers computed anyway (a lease race) has the same bytes, committed once.

Batches never span units: a unit's views are cut into fixed chunks of ``batch_size`` in
(view, slot) order. A view therefore meets the same batch-mates whatever the fleet size or
worker count, and the store's bytes do not depend on either (most units fill every batch;
only a unit's last chunk may be short).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from storage import (
    INVALID,
    WRITTEN,
    StoreError,
    StoreSpec,
    create_store,
    open_store,
    soft_targets,
    tail_logsumexp,
    target_error,
    topk_logprobs,
)
from storage.api import grow_store
from storage.base import library_versions
from storage.errors import UserError
from storage.leases import Heartbeat, Leases, new_worker_id
from storage.meta import PROBES, TEACHER_IDENTITY, VERSIONS, soft_error_key
from storage.soft import recorded_soft_error

from ..devices import resolve_device, single_thread_worker
from ..options import check_values
from ..probes import probe_hashes
from ..progress import progress_bar
from ..recipes import create_recipe, parse_overrides
from ..sources import (
    Manifest,
    ManifestError,
    SourceChanged,
    Undecodable,
    check_outside_source,
    decode_image,
    index_source,
    layout_for_store,
    source_errors_in_one_line,
    stored_manifest,
)
from ..views import ViewRenderer
from .banner import StartState, start_banner
from .teacher import check_teacher_has_weights, create_teacher, trained_view_size

log = logging.getLogger("deit_lockstep.precompute")


class PrecomputeError(UserError, ValueError):
    """Bad settings for a precompute run: one line, cause and fix."""


from .config import PrecomputeConfig  # noqa: E402  (its own module now; still importable from here)


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


def fleet_position(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world) from the flags, torchrun's RANK/WORLD_SIZE, or SLURM's PROCID/NTASKS."""
    env = os.environ
    if rank is None:
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    if world_size is None:
        world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    if world_size < 1 or not 0 <= rank < world_size:
        raise PrecomputeError(f"rank {rank} is outside a fleet of {world_size}; set --rank in [0, --world-size)")
    return rank, world_size


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


def _index(cfg: PrecomputeConfig) -> Manifest:
    """The source's manifest with every sample's size and crc32c.

    A new store reads every sample once for them. Resuming (a restarted rank, a fleet member joining)
    indexes names only and takes the checksums the store's manifest recorded: each read then checks
    the bytes, so a sample changed since the store was begun is still a one-line SourceChanged, and a
    resume does not read a whole ImageNet to start."""
    if not cfg.overwrite:
        try:
            stored = stored_manifest(open_store(cfg.out))
        except (StoreError, ManifestError, OSError, ValueError, KeyError):
            stored = None  # no store there yet, or a damaged one or not one of ours: create_store says so
        if stored is not None:
            # --shards auto means the store's layout, as in `train --labels`: auto alone might pick another
            layout, wrong_layout = layout_for_store(cfg.shards, stored, cfg.out)
            if wrong_layout:
                raise PrecomputeError(f"{wrong_layout}, or --overwrite to start over")
            m = index_source(cfg.data, shard_size=cfg.shard_size, seed=cfg.seed, shards=layout, checksums=False)
            # another source: create_store refuses it (manifest fingerprint), no need for checksums
            return m.with_checksums_of(stored) if m.fingerprint == stored.fingerprint else m
    return index_source(cfg.data, shard_size=cfg.shard_size, seed=cfg.seed, shards=cfg.shards)


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


# ---- rendering: what a DataLoader worker does ------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    """Up to batch_size rendered views of one unit, ready for the teacher."""
    unit: int                 # index into the rank's unit list
    start: int                # first flat index (view_in_block * n + slot) in the unit
    views: torch.Tensor       # [b, 3, H, W] float32 (zeros where invalid)
    valid: torch.Tensor       # [b] bool
    invalid_keys: tuple[str, ...] = ()


class UnitViews(torch.utils.data.IterableDataset):
    """Renders this rank's pending units; DataLoader workers split the units among themselves."""

    def __init__(self, manifest: Manifest, recipe, seed: int, units: list[tuple[int, range]], batch_size: int,
                 claimer: _Claimer | None = None):
        self.manifest, self.recipe, self.seed = manifest, recipe, seed
        self.units, self.batch_size = units, batch_size
        self.claimer = claimer  # None: every unit given is ours (the static split)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        renderer = ViewRenderer(self.recipe)
        for u in range(wid, len(self.units), nw):
            shard, views = self.units[u]
            if self.claimer is not None and not self.claimer.take(shard, views.start):
                continue  # done or being done by another worker
            yield from self.render_unit(renderer, u)

    def render_unit(self, renderer: ViewRenderer, u: int):
        shard, views = self.units[u]
        images, bad = {}, {}
        for s in self.manifest.iter_shard(shard):  # one read of the shard, one decode per image
            img = decode_image(s.data)
            if isinstance(img, Undecodable):  # flag its views, keep going
                bad[s.position] = f"{s.key} ({img.reason})"
            else:
                images[s.position] = img
        n = self.manifest.shard_sizes[shard]
        size = self.recipe.input_size
        buf, ok, keys, start = [], [], [], 0
        for view in views:
            for sv in renderer.plan(self.seed, view, shard, n)[::2]:
                pair = [sv.position] + ([sv.partner_position] if sv.partner_position is not None else [])
                broken = [bad[p] for p in pair if p in bad]
                if broken:  # a view that shows a broken image (itself or its mixing partner) is invalid
                    buf.extend(torch.zeros(3, size, size) for _ in pair)  # placeholders, never seen by the teacher
                    ok.extend(False for _ in pair)
                    keys.extend(broken)
                else:
                    partner_img = images[sv.partner_position] if len(pair) == 2 else None
                    buf.extend(renderer.render_pair(self.seed, sv, images[sv.position], partner_img))
                    ok.extend(True for _ in pair)
                while len(buf) >= self.batch_size:
                    yield self._chunk(u, start, buf[:self.batch_size], ok[:self.batch_size], keys)
                    start += self.batch_size
                    buf, ok, keys = buf[self.batch_size:], ok[self.batch_size:], []
        if buf:
            yield self._chunk(u, start, buf, ok, keys)

    @staticmethod
    def _chunk(u, start, buf, ok, keys) -> Chunk:
        return Chunk(u, start, torch.from_numpy(np.stack([b.numpy() for b in buf])), torch.tensor(ok), tuple(keys))


# ---- the run ---------------------------------------------------------------------------------
class _UnitBuffer:
    """Collects one unit's labels chunk by chunk; full when every view of the unit has arrived."""

    def __init__(self, vb: int, n: int, k: int, hard: bool, taus: int = 0):
        self.n, self.filled = n, 0
        self.ids = np.zeros((vb * n,) if hard else (vb * n, k), dtype=np.int64)
        self.values = None if hard else np.zeros((vb * n, k), dtype=np.float16)
        self.tail = np.zeros((vb * n, taus), dtype=np.float16) if taus else None
        self.valid = np.full(vb * n, WRITTEN, dtype=np.uint8)
        self.vb = vb

    def add(self, start: int, ids, values, tail, valid: np.ndarray) -> bool:
        end = start + len(valid)
        self.ids[start:end] = ids
        if self.values is not None:
            self.values[start:end] = values
        if self.tail is not None:
            self.tail[start:end] = tail
        self.valid[start:end] = np.where(valid, WRITTEN, INVALID)
        self.filled += len(valid)
        return self.filled == len(self.valid)

    def arrays(self):
        shape = (self.vb, self.n)
        out = dict(values=None if self.values is None else self.values.reshape(*shape, -1),
                   ids=self.ids.reshape(*shape, *self.ids.shape[1:]), valid=self.valid.reshape(shape))
        if self.tail is not None:
            out["tail_lse"] = self.tail.reshape(*shape, -1)
        return out


def run_precompute(cfg: PrecomputeConfig) -> PrecomputeSummary:
    t0 = time.perf_counter()
    _check(cfg)
    # before the source is indexed (a full read of it for a new store): offline, nothing built or fetched
    check_teacher_has_weights(cfg.teacher, cfg.teacher_weights, allow_random=cfg.random_teacher)
    rank, world = (0, 1) if cfg.join else fleet_position(cfg.rank, cfg.world_size)
    recipe, size_from = _recipe(cfg)
    manifest = _index(cfg)
    if not cfg.hard and cfg.topk > manifest.num_classes:
        raise PrecomputeError(f"--topk {cfg.topk} is more than the source's {manifest.num_classes} classes; "
                              f"use --topk <= {manifest.num_classes} or --hard")
    device = resolve_device(cfg.device)
    teacher = create_teacher(cfg.teacher, weights=cfg.teacher_weights, num_classes=manifest.num_classes,
                             model_kwargs=cfg.model_kwargs, device=device, compile=cfg.compile)
    spec = build_spec(cfg, manifest, recipe, teacher)
    if cfg.overwrite and (rank != 0 or cfg.join):
        raise PrecomputeError("--overwrite deletes the store: use it on a single process, not in a fleet")
    existed = not cfg.overwrite and _existing_store(cfg.out)
    grown_from = _grow_if_asked(cfg.out, spec) if existed else None
    writer = create_store(cfg.out, spec, backend=cfg.backend, manifest=manifest.to_bytes(),
                          meta={TEACHER_IDENTITY: _identity_with_path(teacher.identity)}, overwrite=cfg.overwrite)
    # Same names and labels (the spec's fingerprint matched), but the bytes? A resumed run must not
    # label half the views from one image and half from another.
    changed = manifest.first_changed_sample(stored_manifest(open_store(cfg.out)))
    if changed is not None:
        raise SourceChanged(f"{cfg.data}: {changed}: the source changed since the store {cfg.out} was begun; "
                            "restore it, or re-run precompute on the new source with --overwrite")
    if rank == 0:
        renderer = ViewRenderer(recipe)
        writer.set_meta(PROBES, probe_hashes(renderer, manifest, cfg.seed, cfg.views))
        writer.set_meta(VERSIONS, library_versions())

    worker = new_worker_id()
    leases = Leases(cfg.out, worker, cfg.lease_ttl) if cfg.claim else None
    everything = spec.units()
    mine = [u for i, u in enumerate(everything) if i % world == rank]
    # A unit marked complete whose bytes were damaged since (flipped byte, lost chunk, torn marker)
    # would be skipped forever: crc32c-check this rank's complete units on every start and redo the
    # damaged ones. Automatic rather than a flag, because it is cheap: it reads the store's labels
    # once (~26 bytes/view), while the run reads every image once per unit.
    for shard, block in sorted({p.unit for p in open_store(cfg.out).check_units(
            [u for u in mine if writer.is_complete(*u)])}):
        log.warning("unit (shard=%d, view_block=%d) is damaged: recomputing it", shard, block)
        writer.retract(shard, block)
    skipped = sum(writer.is_complete(*u) for u in mine)
    complete_at_start = len(writer.completed_units())
    if cfg.progress and rank == 0:  # rank 0, or every --join process (they all run as rank 0 of 1)
        state = StartState(rank=rank, world=world, worker=worker if cfg.join else "", size_from=size_from,
                           existed=existed, grown_from=grown_from, units_complete=complete_at_start,
                           units_total=len(everything))
        print(start_banner(cfg, teacher, manifest, recipe, spec, device, state), file=sys.stderr, flush=True)
    # Own share first, front to back; then the others' units from the back of their lists, where
    # their owners (working front to back) arrive last.
    order = mine + ([u for i, u in enumerate(everything) if i % world != rank][::-1] if cfg.claim else [])

    total_views = spec.views_in(everything)
    bar = progress_bar(total=total_views, unit="view", desc="precompute", disable=not cfg.progress or rank != 0,
               dynamic_ncols=True, smoothing=0.05)
    bar.update(spec.views_in(writer.completed_units()))
    run = _Run(cfg, spec, manifest, recipe, teacher, device, writer, leases, bar,
               fleet=cfg.claim or world > 1)
    try:  # close the bar on any error, so the one-line error starts its own line
        with Heartbeat(leases) if leases is not None else contextlib.nullcontext():
            while True:
                pending = _pending(order, writer)
                if not pending:
                    break
                if leases is not None and not _any_free(leases, pending):
                    # Every unit left is leased by a live worker: wait for its commit, or for its lease to
                    # expire (a frozen or lost worker) and take it over.
                    time.sleep(min(max(cfg.lease_ttl / 8, 0.05), 0.5))
                    run.show_fleet()
                    continue
                run.one_pass(pending)
                if leases is None:
                    break  # static split: one pass over our own share
        run.finish_bar()
    finally:
        bar.close()
        if leases is not None:
            for unit in leases.held():  # stopped by an error: free our units for the others at once
                leases.release(unit)
    run.soft_error.save(writer, soft_error_key(f"join-{worker}" if cfg.join else rank))
    for key in sorted(set(run.invalid_keys)):
        log.warning("undecodable image %s: its views are flagged invalid", key)
    return PrecomputeSummary(
        rank=rank, world_size=world, units_done=run.units_done, units_skipped=skipped,
        units_complete_at_start=complete_at_start,
        views_written=run.written, views_invalid=run.invalid, invalid_keys=sorted(set(run.invalid_keys)),
        units_complete=len(writer.completed_units()), units_total=len(everything),
        store_bytes=open_store(cfg.out).nbytes(),
        stored_views=spec.views_in(writer.completed_units()), seconds=time.perf_counter() - t0,
        soft_error=run.soft_error.summary(), worker=worker if cfg.join else "")


def _pending(order: list[tuple[int, int]], writer) -> list[tuple[int, int]]:
    """The units of ``order`` not complete yet, in that order. One listing of the store's units/, not
    one stat per unit: ranks poll this about every 0.5 s in the endgame, over every unit (37.5k at
    ImageNet and 300 views)."""
    done = set(writer.completed_units())
    return [u for u in order if u not in done]


def _any_free(leases: Leases, pending: list[tuple[int, int]]) -> bool:
    """Whether some pending unit has no lease or a stale one (``Leases.free``). One listing of leases/
    answers for every unit without a lease file; only the pending units that have one are read (to
    judge staleness), and only until one is free: in the endgame, the few units live workers hold."""
    with_lease = leases.units_with_lease()
    if any(u not in with_lease for u in pending):
        return True
    return any(leases.free(u) for u in pending)


@dataclass
class _Claimer:
    """Decides, inside a DataLoader worker, whether this process renders a unit: it is not complete
    and the lease on it is ours. Picklable (a path and the lease book), so DataLoader workers claim
    the unit they are about to render, not the main process ahead of time: a process holds only the
    leases of units it is actually working on."""

    leases: Leases
    store: str
    views_per_unit: int

    def take(self, shard: int, first_view: int) -> bool:
        unit = (shard, first_view // self.views_per_unit)
        if self._complete(unit) or not self.leases.claim(unit):
            return False
        if self._complete(unit):  # committed and released by another worker just before our claim
            self.leases.release(unit)
            return False
        return True

    def _complete(self, unit) -> bool:
        if getattr(self, "_reader", None) is None:
            self._reader = open_store(self.store)
        return self._reader.is_complete(*unit)


class _Run:
    """One process's labelling loop: DataLoader passes over the pending units, commits, counters."""

    def __init__(self, cfg, spec, manifest, recipe, teacher, device, writer, leases, bar, fleet: bool):
        self.cfg, self.spec, self.manifest, self.recipe = cfg, spec, manifest, recipe
        self.teacher, self.device, self.writer, self.leases, self.bar = teacher, device, writer, leases, bar
        self.fleet = fleet
        self.soft_error = SoftError.start(spec)
        self.units_done = self.written = self.invalid = 0
        self.invalid_keys: list[str] = []
        self.last_poll = time.monotonic()

    def show_fleet(self, every: float = 10.0) -> None:
        """Move the bar to the fleet's progress, not ours (at most every `every` seconds)."""
        if self.fleet and time.monotonic() - self.last_poll > every:
            self.last_poll = time.monotonic()
            self.bar.n = max(self.bar.n, self.spec.views_in(self.writer.completed_units()))
            self.bar.refresh()

    def finish_bar(self) -> None:
        """End the bar where the store is: a --join process or a fleet rank whose last units were finished
        by others would otherwise stop at 60-80% and look stalled."""
        self.bar.n = self.spec.views_in(self.writer.completed_units())
        self.bar.refresh()

    def one_pass(self, pending: list[tuple[int, int]]) -> None:
        cfg, spec = self.cfg, self.spec
        units = [(shard, spec.block_views(block)) for shard, block in pending]
        claimer = _Claimer(self.leases, cfg.out, spec.views_per_unit) if self.leases is not None else None
        dataset = UnitViews(self.manifest, self.recipe, cfg.seed, units, cfg.batch_size, claimer)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=cfg.workers, worker_init_fn=single_thread_worker,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if cfg.workers else None)
        buffers: dict[int, _UnitBuffer] = {}
        for chunk in source_errors_in_one_line(loader):
            shard, views = units[chunk.unit]
            buf = buffers.get(chunk.unit)
            if buf is None:
                buf = buffers[chunk.unit] = _UnitBuffer(len(views), spec.shard_sizes[shard], spec.k, cfg.hard,
                                                        len(spec.taus))
            ids, values, tail = _label(self.teacher, chunk, self.recipe, spec, self.soft_error)
            self.invalid_keys.extend(chunk.invalid_keys)
            if buf.add(chunk.start, ids, values, tail, chunk.valid.numpy()):
                block = spec.block_of(views.start)
                self.writer.write_unit(shard, block, **buffers.pop(chunk.unit).arrays())
                if self.leases is not None:
                    self.leases.release((shard, block))
                self.units_done += 1
                self.written += buf.valid.size
                self.invalid += int((buf.valid == INVALID).sum())
            self.bar.update(len(chunk.valid))
            self.show_fleet()


def _label(teacher, chunk: Chunk, recipe, spec: StoreSpec, soft_error: SoftError | None = None):
    """Teacher labels for the valid views of a chunk (invalid rows stay zero)."""
    b = len(chunk.valid)
    k = spec.k
    ids = np.zeros((b,) if spec.mode == "hard" else (b, k), dtype=np.int64)
    values = None if spec.mode == "hard" else np.zeros((b, k), dtype=np.float16)
    tail = np.zeros((b, len(spec.taus)), dtype=np.float16) if spec.taus else None
    keep = chunk.valid.nonzero().flatten()
    if len(keep):
        x = chunk.views if len(keep) == b else chunk.views[keep]
        logits = teacher(x.to(teacher.device, non_blocking=True), recipe.mean, recipe.std)
        rows = keep.numpy()
        if spec.mode == "hard":
            ids[rows] = logits.argmax(dim=1).cpu().numpy()
        else:
            v, i = topk_logprobs(logits, k)
            ids[rows] = i.cpu().numpy()
            values[rows] = v.cpu().numpy()
            if spec.taus:
                tail[rows] = tail_logsumexp(logits, i, spec.taus)
                if soft_error is not None:
                    soft_error.add(logits.float().cpu(), values[rows], ids[rows], tail[rows])
    return ids, values, tail


@dataclass
class SoftError:
    """How far the soft targets rebuilt from the store are from the teacher's full softmax(z / tau), at
    each of the store's taus, over the views this rank labelled: total variation and KL(teacher || rebuilt),
    with the stored tail log-sum-exp ("stored") and with the uniform-tail approximation ("uniform").
    Saved as meta/soft_error_rank<R>.json (a --join process: soft_error_rank-join-<worker>.json), added
    to what an earlier run of the same rank recorded;
    `train` prints it (storage/soft.py explains the two rebuilds)."""

    num_classes: int
    taus: tuple[float, ...]
    sums: dict = field(default_factory=dict)  # "tau/rebuild/metric" -> [sum, max, views]

    @classmethod
    def start(cls, spec: StoreSpec) -> SoftError:
        return cls(spec.num_classes, spec.taus)

    def add(self, logits, values, ids, tail) -> None:
        for j, tau in enumerate(self.taus):
            for rebuild, lse in (("stored", tail[:, j]), ("uniform", None)):
                target = soft_targets(values, ids, self.num_classes, tau=tau, tail_lse=lse)
                for metric, err in zip(("tv", "kl"), target_error(logits, target, tau), strict=True):
                    acc = self.sums.setdefault(f"{tau:g}/{rebuild}/{metric}", [0.0, 0.0, 0])
                    acc[0] += float(err.sum())
                    acc[1] = max(acc[1], float(err.max()))
                    acc[2] += len(err)

    def summary(self) -> dict:
        """tau -> the figures of this run's views, as storage.soft.recorded_soft_error gives them."""
        meta = {soft_error_key(0): self.sums}
        return {tau: recorded_soft_error(meta, tau) for tau in self.taus if self.sums}

    def save(self, writer, key: str) -> None:
        """key: meta/<key>.json, soft_error_rank<R> (a join process: soft_error_rank-join-<worker>)."""
        if not self.sums:
            return
        merged = {name: list(v) for name, v in writer_meta(writer).get(key, {}).items()}
        for name, (total, peak, views) in self.sums.items():
            old = merged.get(name, [0.0, 0.0, 0])
            merged[name] = [old[0] + total, max(old[1], peak), old[2] + views]
        writer.set_meta(key, merged)


def writer_meta(writer) -> dict:
    """The store's meta as a reader sees it (the writer itself does not read meta back)."""
    return open_store(writer.path).meta
