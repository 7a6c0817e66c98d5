"""``inspect STORE --sample KEY``: one sample's views, each with its augmentation, mixing partner and
the teacher's stored labels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from storage import INVALID, WRITTEN
from storage.errors import printable

if TYPE_CHECKING:  # views imports torch; the summary path must not pay for it
    pass

from .lookup import (
    InspectError,
    _decodes,
    class_names,
    find_sample,
    load_image,
    pick_views,
    slots_of,
    source_manifest,
    top_labels,
)


# ---- one sample ----------------------------------------------------------------------------
@dataclass
class SampleView:
    view: int
    shard: int
    slot: int
    valid: int
    params: object          # pipeline.views.SlotParams
    mix: object             # pipeline.views.MixParams
    partner_key: str | None
    partner_label: str | None
    top: list[tuple[str, float | None]]   # (class name, probability; None in hard mode)


@dataclass
class SampleReport:
    key: str
    shard: int
    position: int
    label: str
    image_size: tuple[int, int]
    views: list[SampleView]
    absent_views: list[int] = field(default_factory=list)  # asked with --view, but the sample is not in them
    repeats: int = 1



def describe_sample(reader, key_or_index: str, views=(), data: str | None = None,
                    default_views: int = 8) -> SampleReport:
    from ..recipes import Recipe
    from ..views import ViewRenderer

    spec = reader.spec
    manifest = source_manifest(reader, data)
    shard, position, key = find_sample(manifest, key_or_index)
    names = class_names(spec)
    labels = manifest.labels(shard)
    keys = manifest.keys(shard)
    renderer = ViewRenderer(Recipe.from_dict(spec.recipe))
    n = spec.shard_sizes[shard]
    done = set(reader.completed_units())
    out = []
    asked = pick_views(spec, done, shard, views, default_views)
    visits = [(view, slot) for view in asked for slot in slots_of(renderer, spec.seed, view, shard, n, position)]
    if not visits:
        raise InspectError(f"sample {key!r} is in none of views {list(asked)}: repeated augmentation "
                           f"(repeats={renderer.recipe.repeats}) shows a sample in about 1/repeats of the views; "
                           "ask for more with --view")

    def flagged() -> bool:
        """Precompute could not decode this image either: a view of it is flagged while its partner decodes."""
        for view, slot in visits:
            if (shard, spec.block_of(view)) in done and reader.read_slot(view, shard, slot).valid[0] == INVALID:
                other = renderer.plan(spec.seed, view, shard, n)[slot].partner_position
                if other is None or _decodes(manifest, shard, other):
                    return True
        return False

    img = load_image(manifest, shard, position, data, flagged=flagged)
    for view, slot in visits:
        sv = renderer.plan(spec.seed, view, shard, n)[slot]
        params = renderer.slot_params(spec.seed, view, shard, slot, img.size)
        mixed = sv.mix.mode != "none" and sv.partner_position is not None
        pkey = keys[sv.partner_position] if mixed else None
        plabel = names[labels[sv.partner_position]] if mixed else None
        if (shard, spec.block_of(view)) in done:
            lab = reader.read_slot(view, shard, slot)
            top, valid = top_labels(lab, names), int(lab.valid[0])
        else:
            top, valid = [], 0
        out.append(SampleView(view, shard, slot, valid, params, sv.mix, pkey, plabel, top))
    absent = [v for v in asked if v not in {view for view, _ in visits}] if views else []
    return SampleReport(key, shard, position, names[labels[position]], img.size, out, absent,
                        renderer.recipe.repeats)


def _params_lines(p, mix, partner_key, partner_label) -> list[str]:
    c = p.crop
    lines = [f"  crop     top={c.top} left={c.left} height={c.height} width={c.width}   flip={p.flip}"]
    ops = ", ".join(f"{o.name}(magnitude={o.magnitude:.2f}, sign={o.sign:+d})" for o in p.ops) or "none"
    lines.append(f"  ops      {ops}")
    erase = ", ".join(f"top={e.top} left={e.left} height={e.height} width={e.width}" for e in p.erase) or "none"
    lines.append(f"  erase    {erase}")
    if mix.mode == "none" or partner_key is None:
        lines.append("  mix      none")
    else:
        box = f", box (y0,y1,x0,x1)={mix.box}" if mix.box else ""
        lines.append(f"  mix      {mix.mode} with {printable(partner_key)} ({partner_label}), "
                     f"lambda={mix.lam:.3f}{box}")
    return lines


def format_sample(r: SampleReport) -> str:
    lines = [f"sample {printable(r.key)} (shard {r.shard}, position {r.position}), ground truth: {r.label}, "
             f"image {r.image_size[0]}x{r.image_size[1]}"]
    for v in r.views:
        state = {WRITTEN: "", INVALID: " [INVALID: undecodable image]", 0: " [not computed yet]"}[v.valid]
        lines.append(f"view {v.view} (slot {v.slot}){state}")
        lines += _params_lines(v.params, v.mix, v.partner_key, v.partner_label)
        if v.valid == WRITTEN:
            lines.append("  teacher  " + ", ".join(
                name if p is None else f"{name} {p:.3f}" for name, p in v.top))
    for view in r.absent_views:
        lines.append(f"view {view}: sample {r.key} is not in this view (repeated augmentation, repeats={r.repeats}, "
                     f"shows each sample in about 1/{r.repeats} of the views)")
    return "\n".join(lines)
