"""A PNG contact sheet of replayed views, each captioned with the ground truth and the teacher's top-3.

The tiles are the exact tensors the teacher labelled (``ViewRenderer.render_slot``: crop, flip,
RandAugment, erasing, mixing), de-normalised for display only. Two layouts: one sample across
views (``sample=``), or the first ``count`` slots of one view, shard by shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from storage import INVALID, WRITTEN
from storage.outputs import check_output_path

from .lookup import (
    InspectError,
    class_names,
    find_sample,
    load_image,
    pick_views,
    slots_of,
    source_manifest,
    top_labels,
)

CAPTION_LINES = 6
LINE_PX = 13
TEACHER = "teacher"  # the prefix of a caption's teacher lines (its stored top-3)
PAD = 4


@dataclass
class Tile:
    view: int
    shard: int
    slot: int
    pixels: np.ndarray   # uint8 HWC, the view de-normalised
    caption: list[str]


@dataclass
class Sheet:
    path: str
    tiles: int
    size: tuple[int, int]  # (width, height) in pixels


def to_display(x, mean, std) -> np.ndarray:
    """Normalised float CHW tensor -> uint8 HWC for display (erasing noise and all)."""
    m = np.asarray(mean, np.float32)[:, None, None]
    s = np.asarray(std, np.float32)[:, None, None]
    img = np.clip(x.numpy() * s + m, 0.0, 1.0)
    return (img.transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)


def _caption(key, gt, sv, partner_gt, lab, names, view) -> list[str]:
    head = f"v{view} slot{sv.slot} {key}"
    if sv.mix.mode != "none" and sv.partner_position is not None:
        gt_lines = [f"GT {sv.mix.lam:.2f} {gt}", f"+ {1 - sv.mix.lam:.2f} {partner_gt} ({sv.mix.mode})"]
    else:
        gt_lines = [f"GT {gt}", ""]
    if lab is None:
        return [head, *gt_lines, "(not computed yet)"]
    if lab.valid[0] == INVALID:
        return [head, *gt_lines, "INVALID (undecodable)"]
    if lab.valid[0] != WRITTEN:
        return [head, *gt_lines, "(no label)"]
    top = [f"{TEACHER} {name}" if p is None else f"{TEACHER} {p:.2f} {name}" for name, p in top_labels(lab, names, 3)]
    return [head, *gt_lines, *top]


def _tile(reader, renderer, manifest, data, view, shard, slot, names, done, cache) -> Tile:
    spec = reader.spec
    n = spec.shard_sizes[shard]
    plan = cache.setdefault((view, shard), renderer.plan(spec.seed, view, shard, n))
    sv = plan[slot]
    labels, keys = manifest.labels(shard), manifest.keys(shard)
    lab = reader.read_slot(view, shard, slot) if (shard, spec.block_of(view)) in done else None
    partner_gt = names[labels[sv.partner_position]] if sv.partner_position is not None else None
    caption = _caption(keys[sv.position], names[labels[sv.position]], sv, partner_gt, lab, names, view)
    if lab is not None and lab.valid[0] == INVALID:
        # precompute could not decode this view's image (or its partner's): a grey tile, captioned INVALID
        size = renderer.recipe.input_size
        return Tile(view, shard, slot, np.full((size, size, 3), 128, np.uint8), caption)
    img = load_image(manifest, shard, sv.position, data)
    partner = None
    if sv.partner_position is not None and sv.mix.mode != "none":
        partner = load_image(manifest, shard, sv.partner_position, data)
    x = renderer.render_slot(spec.seed, sv, img, partner)
    return Tile(view, shard, slot, to_display(x, renderer.recipe.mean, renderer.recipe.std), caption)


def _slots_for_view(spec, done, view, count) -> list[tuple[int, int]]:
    out = []
    for shard in range(spec.num_shards):
        if (shard, spec.block_of(view)) not in done:
            continue
        out += [(shard, slot) for slot in range(spec.shard_sizes[shard])]
        if len(out) >= count:
            break
    return out[:count]


def collect_tiles(reader, data, sample=None, views=(), count=16) -> list[Tile]:
    from ..recipes import Recipe
    from ..views import ViewRenderer

    spec = reader.spec
    manifest = source_manifest(reader, data)
    renderer = ViewRenderer(Recipe.from_dict(spec.recipe))
    names = class_names(spec)
    done = set(reader.completed_units())
    cache: dict = {}
    if sample is not None:
        shard, position, _ = find_sample(manifest, sample)
        n = spec.shard_sizes[shard]
        where = [(v, shard, slot) for v in pick_views(spec, done, shard, views, spec.views)
                 for slot in slots_of(renderer, spec.seed, v, shard, n, position)][:count]
    else:
        complete = [v for v in range(spec.views) if any((s, spec.block_of(v)) in done for s in range(spec.num_shards))]
        if not views and not complete:
            raise InspectError("the store has no complete unit yet; run precompute (it resumes)")
        for v in views:
            spec.check_view(v)
        asked = list(dict.fromkeys(views)) or complete[:1]
        per_view = -(-count // len(asked))  # every asked view on the sheet, the tiles shared among them
        where = []
        for view in asked:
            slots = _slots_for_view(spec, done, view, min(per_view, count - len(where)))
            if not slots:
                raise InspectError(f"view {view} has no complete unit yet; pick another --view or run precompute")
            where += [(view, shard, slot) for shard, slot in slots]
    return [_tile(reader, renderer, manifest, data, v, s, slot, names, done, cache) for v, s, slot in where]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def draw_sheet(tiles: list[Tile], columns: int | None = None) -> Image.Image:
    """Tiles in a grid, each above its caption; small views are enlarged (nearest) to stay readable.
    A cell is as wide as its longest caption line needs: captions are never cut."""
    side = tiles[0].pixels.shape[0]
    scale = max(1, math.ceil(160 / side))
    tile_px = side * scale
    cols = columns or min(len(tiles), 8, max(1, math.ceil(math.sqrt(len(tiles)))))
    rows = math.ceil(len(tiles) / cols)
    font = _font(11)
    text_px = max(_text_width(font, line) for t in tiles for line in t.caption[:CAPTION_LINES] or [""])
    cell_w, cell_h = max(tile_px, text_px) + 2 * PAD, tile_px + CAPTION_LINES * LINE_PX + 2 * PAD
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, t in enumerate(tiles):
        x0, y0 = (i % cols) * cell_w + PAD, (i // cols) * cell_h + PAD
        img = Image.fromarray(t.pixels)
        if scale > 1:
            img = img.resize((tile_px, tile_px), Image.Resampling.NEAREST)
        sheet.paste(img, (x0, y0))
        for j, line in enumerate(t.caption[:CAPTION_LINES]):
            draw.text((x0, y0 + tile_px + 1 + j * LINE_PX), line, fill="black", font=font)
    return sheet


def _text_width(font, text: str) -> int:
    return math.ceil(font.getlength(text)) if hasattr(font, "getlength") else 6 * len(text)


def render_sheet(reader, out: str, data: str | None, sample=None, views=(), count: int = 16) -> Sheet:
    if count < 1:
        raise InspectError(f"--count must be >= 1, got {count}")
    # before any work: an image extension, never an input nor a file inside the store
    check_output_path(out, "image", option="--render", inputs=(str(reader.path), data))
    tiles = collect_tiles(reader, data, sample, views, count)
    sheet = draw_sheet(tiles)
    sheet.save(out, optimize=True)
    return Sheet(out, len(tiles), sheet.size)
