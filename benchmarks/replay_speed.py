"""Replaying lockstep views vs timm's own DeiT training transform, on the same JPEGs, in one run.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python benchmarks/replay_speed.py

Both sides decode every JPEG (PIL; each with its own loader) and produce the final normalised tensor. timm's side is
``create_transform(224, is_training=True, auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25,
re_mode='pixel', interpolation='bicubic')``; ours draws the same augmentations from the view's
seeded generator and also mixes each pair (mixup/cutmix), which timm leaves to a batch step.
Target: ratio >= 1.0.
"""

import argparse
import io

import torch
from common import interleaved, photo_like_jpegs
from PIL import Image
from timm.data import create_transform

from pipeline.recipes import create_recipe
from pipeline.sources import decode_image
from pipeline.views import ViewRenderer


def timm_decode(data: bytes) -> Image.Image:
    # what timm's ImageDataset loader does: open, convert("RGB")
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    jpegs = photo_like_jpegs(args.images)
    timm_tf = create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
                               re_mode="pixel", interpolation="bicubic")
    renderer = ViewRenderer(create_recipe("deit"))
    # the same work as timm's transform: no mixing (timm leaves mixup/cutmix to a batch step)
    renderer_nomix = ViewRenderer(create_recipe("deit", {"mix_prob": 0}))
    epoch = [0]

    crashes = [0]

    def run_timm():
        for data in jpegs:
            img = timm_decode(data)
            try:
                timm_tf(img)
            except ValueError:  # Pillow 13 refuses timm's 0-bit posterize (docs/DESIGN.md, known pitfalls)
                crashes[0] += 1
                timm_tf(img)

    def lockstep(r):
        def run():
            epoch[0] += 1  # a new view each round, like a new epoch
            plan = r.plan(0, epoch[0], 0, len(jpegs))
            for sv in plan[::2]:
                a = decode_image(jpegs[sv.position])
                b = decode_image(jpegs[sv.partner_position]) if sv.partner_position is not None else None
                r.render_pair(0, sv, a, b)
        return run

    t = interleaved({"timm": run_timm, "lockstep": lockstep(renderer_nomix), "mixing": lockstep(renderer)},
                    rounds=args.rounds)
    n = len(jpegs)
    print(f"images: {n} photo-like JPEGs 500x375, decode included, 1 thread, median of {args.rounds} rounds")
    print(f"{'pipeline':<44}{'views/s':>10}{'vs timm':>10}")
    rows = [("timm create_transform (deit)", "timm"), ("lockstep replay (deit, same work as timm)", "lockstep"),
            ("lockstep replay (deit + pair mixing)", "mixing")]
    for label, key in rows:
        print(f"{label:<44}{n / t[key]:>10.1f}{t['timm'] / t[key]:>10.3f}")
    print(f"timm's transform raised Pillow's 0-bit posterize ValueError on {crashes[0]} of "
          f"{n * args.rounds} views (retried); lockstep renders those as black, as older Pillow did")
    print(f"ratio lockstep/timm: {t['timm'] / t['lockstep']:.3f}  (target >= 1.0; with mixing, which timm "
          f"does later in the batch: {t['timm'] / t['mixing']:.3f})")


if __name__ == "__main__":
    main()
