"""What inspect, verify and the contact sheet all need to find: the source behind a store, a sample by key
or index, the slots a sample fills in a view, class names and ground truth.

Everything the store does not hold (which sample a slot is, its augmentation, its mixing partner and
lambda) is re-derived from the seed through ``pipeline.views``, the contract both stages use, so what
these tools show is what the teacher labelled and the student will see.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from storage import Labels
from storage.errors import UserError, printable

from ..sources import Manifest, Undecodable, decode_image, index_source, unchanged_source
from ..sources import stored_manifest as parsed_manifest

if TYPE_CHECKING:  # views imports torch; the summary path must not pay for it
    from ..views import ViewRenderer


NAME_LIMIT = 60  # characters of a class name shown: a report line stays a line


class InspectError(UserError, ValueError):
    """A question inspect cannot answer as asked: one line, cause and fix."""


# ---- class names and ground truth ----------------------------------------------------------
def class_names(spec) -> list[str]:
    """Readable names: timm's ImageNet descriptions for 1000 classes, else the store's names, made
    safe to print (they come from the dataset: ClassLabel names, classes.txt, folder names)."""
    if spec.num_classes == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i).split(",")[0] for i in range(1000)]
    if spec.class_names:
        return [printable(n, NAME_LIMIT) for n in spec.class_names]
    return [str(i) for i in range(spec.num_classes)]


def dominant_targets(labels: np.ndarray, plan) -> tuple[np.ndarray, np.ndarray]:
    """(ground-truth class of each slot's dominant source, mixed flag) for one view of one shard.

    Unmixed slots: the sample's own label. Mixed slots: the own label when lambda >= 0.5, else
    the partner's (the source that covers most of the view).
    """
    target = np.empty(len(plan), dtype=np.int64)
    mixed = np.zeros(len(plan), dtype=bool)
    for sv in plan:
        own = labels[sv.position]
        if sv.mix.mode == "none" or sv.partner_position is None:
            target[sv.slot] = own
        else:
            mixed[sv.slot] = True
            target[sv.slot] = own if sv.mix.lam >= 0.5 else labels[sv.partner_position]
    return target, mixed


# ---- the source behind a store -------------------------------------------------------------
def stored_manifest(reader) -> Manifest:
    """The store's manifest.parquet, checked to be the manifest its spec was made from: the same
    fingerprint, class count and shard sizes. A store.json and manifest that disagree (one of them
    damaged or swapped) would send a tool to slots and samples that do not exist."""
    where = f"{reader.path}/manifest.parquet"
    fix = "the store is damaged: recreate it (precompute --overwrite)"
    m = parsed_manifest(reader)  # parsed and checked on its own (pipeline.sources)
    spec, fingerprint = reader.spec, m.fingerprint
    if fingerprint != spec.manifest_fingerprint:
        raise InspectError(f"{where} is not the manifest store.json was made from (fingerprint {fingerprint[:12]}, "
                           f"store.json records {spec.manifest_fingerprint[:12]}); {fix}")
    if m.num_classes != spec.num_classes or m.shard_sizes != spec.shard_sizes:
        raise InspectError(f"store.json's spec ({spec.num_classes} classes, {spec.num_shards} shards of "
                           f"{sum(spec.shard_sizes)} samples) disagrees with its {where} ({m.num_classes} classes, "
                           f"{len(m.shard_sizes)} shards of {m.num_samples} samples, or other shard sizes); {fix}")
    return m


def source_manifest(reader, data: str | None) -> Manifest:
    """The manifest to read images from: --data indexed the way the store's was, else the stored one
    (whose recorded root must still hold the files). A foreign source is refused."""
    stored = stored_manifest(reader)
    if data is None:
        return stored
    # The stored manifest where each source file's stamp holds (no re-index), else indexed again.
    m = unchanged_source(stored, data) or index_source(
        data, shard_size=stored.shard_size or 1024, seed=stored.seed, shards=stored.layout, checksums=False)
    if m.fingerprint != reader.spec.manifest_fingerprint:
        raise InspectError(
            f"{data} is not the source this store was made from (manifest fingerprint "
            f"{m.fingerprint[:12]} != store's {reader.spec.manifest_fingerprint[:12]}; "
            f"{m.num_samples} vs {stored.num_samples} samples); pass the --data given to precompute"
        )
    return m.with_checksums_of(stored)  # every read checks the bytes precompute labelled


def load_image(manifest: Manifest, shard: int, position: int, data: str | None, flagged=lambda: False):
    """The decoded image; an InspectError whose fix fits the case: the store flagged the image
    undecodable at precompute (``flagged()``: nothing to show), the file changed since (restore it),
    or the recorded root no longer holds the source (pass --data)."""
    sample = manifest.read_sample(shard, position)  # SourceChanged: one line of its own, not "cannot decode"
    img = decode_image(sample.data)
    if not isinstance(img, Undecodable):
        return img
    why, key = img.reason, printable(sample.key)
    if flagged():
        msg = (f"sample {key!r} is undecodable ({why}), as it was at precompute: the store flags its "
               "views invalid and train skips them, so there is nothing to show; pick another sample")
    elif data:
        msg = (f"sample {key!r} in --data {data} cannot be decoded ({why}), but precompute decoded it: "
               "the file was changed or damaged since; restore it from the source given to precompute")
    else:
        msg = (f"cannot decode sample {key!r} from the recorded source root {manifest.root} ({why}); "
               "pass --data SRC pointing at the source given to precompute")
    raise InspectError(msg)


def _decodes(manifest: Manifest, shard: int, position: int) -> bool:
    return not isinstance(decode_image(manifest.read_sample(shard, position).data), Undecodable)



def find_sample(manifest: Manifest, key_or_index: str) -> tuple[int, int, str]:
    """(shard, position, key) of a sample given by key, or by its index in manifest order."""
    keys = manifest.samples.column("key").to_pylist()
    if key_or_index in keys:
        i = keys.index(key_or_index)
    elif key_or_index.lstrip("-").isdigit() and 0 <= int(key_or_index) < len(keys):
        i = int(key_or_index)
    else:
        raise InspectError(f"no sample {key_or_index!r} in the store's manifest; give a key (e.g. {keys[0]!r}) "
                           f"or an index in 0..{len(keys) - 1}")
    shard = int(manifest.samples.column("shard")[i].as_py())
    position = int(manifest.samples.column("position")[i].as_py())
    return shard, position, keys[i]


def slots_of(renderer: ViewRenderer, seed: int, view: int, shard: int, n: int, position: int) -> list[int]:
    """The slots of a view holding the sample: one, or with repeated augmentation 0 or R of them."""
    return [int(s) for s in np.flatnonzero(renderer.slot_order(seed, view, shard, n) == position)]


def pick_views(spec, done: set, shard: int, views: tuple[int, ...] | list[int], default: int) -> list[int]:
    """The asked views (checked), or the first ``default`` complete views of the shard."""
    for v in views:
        spec.check_view(v)
    if views:
        return list(views)
    ok = [v for v in range(spec.views) if (shard, spec.block_of(v)) in done]
    if not ok:
        raise InspectError(f"shard {shard} has no complete view yet; run precompute (it resumes)")
    return ok[:default]


def top_labels(lab: Labels, names: list[str], n: int | None = None) -> list[tuple[str, float | None]]:
    """(name, probability) of one slot's stored labels, best first."""
    if lab.values is None:
        return [(names[int(lab.ids[0])], None)]
    ids, vals = lab.ids[0], np.exp(lab.values[0].astype(np.float32))
    return [(names[int(i)], float(p)) for i, p in list(zip(ids, vals, strict=True))[:n]]
