"""The whole pipeline on real data, as a user would run it: `python cli.py demo` / `make demo`.

1. Fashion-MNIST (Debian's ``dataset-fashion-mnist``) is written as WebDataset shards, train and test.
2. A small ConvNet teacher is trained with ``cli.py train --distillation none``.
3. ``cli.py precompute`` stores its hard labels for every view of every student epoch (V = epochs).
4. A small DeiT student with a distillation token is trained from the store, hard distillation.
5. The same student, same recipe, epochs, steps and seed, is trained without distillation.

Every stage is a subprocess of ``cli.py`` (its progress bars pass through), so the demo exercises
exactly the commands a user types; each command is printed before it runs. At the end: a table
(top-1 and wall time of the three runs, the store's bytes per view) and ``curves.png``.

Fashion-MNIST images are 28x28: DeiT's default crop scale (0.08, 1) leaves a few pixels of them,
so the recipe keeps everything of the deit preset but the crop scale (``scale=0.35,1``); the
teacher and both students use the same recipe.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from storage.errors import UserError

FASHION_DIR = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASS_NAMES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle_boot"]
INSTALL_HINT = "install it with: sudo apt-get install -y dataset-fashion-mnist"
CLI = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cli.py")
RECIPE_SET = ["scale=0.35,1"]


class DemoError(UserError, RuntimeError):
    """A demo that cannot run (missing data, a failed stage): one line, cause and fix."""


@dataclass(frozen=True)
class Size:
    """Everything the demo's budget decides. Both students share every field but distillation."""

    train: int                      # training images (the first n of Fashion-MNIST's 60k)
    test: int                       # test images (the first n of its 10k)
    teacher_epochs: int
    student_epochs: int
    batch_size: int
    teacher_model: str = "resnet10t"
    student_model: str = "deit_tiny_distilled_patch16_224"
    student_kwargs: dict = field(default_factory=dict)
    input_size: int = 32
    per_shard: int = 1000
    warmup_epochs: int = 1
    workers: int = 2
    # --lr is "for a global batch of 512" and scaled down linearly: 8e-3 at batch 64 is AdamW at 1e-3,
    # what a few-epoch budget needs (the 300-epoch default, 5e-4, would be 6e-5 here and learn nothing).
    lr: float = 8e-3


SIZES = {
    "quick": Size(train=2000, test=1000, teacher_epochs=3, student_epochs=4, batch_size=64,
                  student_kwargs=dict(img_size=32, patch_size=4, embed_dim=96, depth=3, num_heads=3),
                  per_shard=500, warmup_epochs=1),
    "default": Size(train=8000, test=2000, teacher_epochs=8, student_epochs=10, batch_size=64,
                    student_kwargs=dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3)),
    # A GPU: all of Fashion-MNIST and a longer schedule; the data loader is what bounds it there.
    "gpu": Size(train=60000, test=10000, teacher_epochs=20, student_epochs=60, batch_size=256,
                student_kwargs=dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3),
                per_shard=5000, warmup_epochs=5, workers=8, lr=4e-3),
    "gpu-quick": Size(train=10000, test=2000, teacher_epochs=5, student_epochs=10, batch_size=128,
                      student_kwargs=dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3),
                      workers=8),
}


def choose_size(quick: bool, device: str) -> Size:
    from pipeline.devices import resolve_device

    gpu = resolve_device(device).type == "cuda"
    if gpu:
        return SIZES["gpu-quick" if quick else "gpu"]
    size = SIZES["quick" if quick else "default"]
    # Rendering views runs in DataLoader workers; the train step takes the rest of the cores.
    return size if (os.cpu_count() or 2) >= 2 else _replace(size, workers=0)


def _replace(size: Size, **kw) -> Size:
    import dataclasses

    return dataclasses.replace(size, **kw)


# ---- data ----------------------------------------------------------------------------------
def check_dataset(root: str = FASHION_DIR) -> None:
    """Raise DemoError naming the package when Fashion-MNIST's files are missing."""
    missing = [os.path.join(root, f) for pair in FASHION_FILES.values() for f in pair
               if not os.path.exists(os.path.join(root, f))]
    if missing:
        raise DemoError(f"Fashion-MNIST is missing ({missing[0]}"
                        f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}); {INSTALL_HINT}")


def read_idx(path: str) -> np.ndarray:
    """An IDX file (MNIST's format: magic, dims as big-endian uint32, then uint8 data)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DemoError(f"{path} is not an IDX file of unsigned bytes; reinstall dataset-fashion-mnist")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_fashion_mnist(out: str, n_train: int, n_test: int, per_shard: int = 1000,
                        root: str = FASHION_DIR) -> dict[str, str]:
    """Write the first n images of each split as WebDataset shards of grayscale PNGs (+ classes.txt).

    Returns {"train": dir, "test": dir}. A split already written with the same count is kept.
    """
    from PIL import Image

    from pipeline.sources import write_wds_shards

    check_dataset(root)
    dirs = {}
    for split, n in (("train", n_train), ("test", n_test)):
        d = os.path.join(out, f"fashion-mnist-{split}")
        stamp = os.path.join(d, ".demo-complete")
        want = {"n": n, "per_shard": per_shard}
        dirs[split] = d
        if os.path.exists(stamp):
            with open(stamp) as f:
                if json.load(f) == want:
                    continue
        shutil.rmtree(d, ignore_errors=True)
        images_file, labels_file = FASHION_FILES[split]
        images = read_idx(os.path.join(root, images_file))[:n]
        labels = read_idx(os.path.join(root, labels_file))[:n]
        samples = []
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            buf = io.BytesIO()
            Image.fromarray(img, "L").save(buf, format="PNG")  # the source decoder makes it RGB
            samples.append((f"{split}-{i:05d}", buf.getvalue(), "png", int(label)))
        write_wds_shards(samples, d, per_shard=per_shard, prefix=split, class_names=CLASS_NAMES)
        with open(stamp, "w") as f:
            json.dump(want, f)
        print(f"wrote {n} {split} images as {-(-n // per_shard)} WebDataset shards in {d}", flush=True)
    return dirs


# ---- stages as a user runs them ------------------------------------------------------------
def run_cli(args: list[str], env: dict | None = None) -> float:
    """Run `python cli.py ARGS` with the terminal passed through; returns the wall seconds."""
    cmd = [sys.executable, CLI, *map(str, args)]
    print(f"\n$ python cli.py {' '.join(shlex.quote(str(a)) for a in args)}", flush=True)
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, env=full_env).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise DemoError(f"`python cli.py {args[0]}` failed with exit code {rc} (its error is printed above)")
    return seconds


def train_args(size: Size, data: dict, run: str, *, model: str, kwargs: dict | None, epochs: int,
               distillation: str, labels: str | None = None, device: str = "auto", extra=()) -> list[str]:
    args = ["train", "--data", data["train"], "--val", data["test"], "--out", run, "--model", model,
            "--distillation", distillation, "--epochs", epochs, "--batch-size", size.batch_size,
            "--warmup-epochs", size.warmup_epochs, "--workers", size.workers, "--device", device,
            "--lr", size.lr, "--no-ema", "--log-every", 10]
    if kwargs:
        args += ["--model-kwargs", json.dumps(kwargs, separators=(",", ":"))]
    if labels:
        args += ["--labels", labels]
    else:
        args += ["--input-size", size.input_size, "--seed", 0]
        for s in RECIPE_SET:
            args += ["--set", s]
    return args + list(extra)


def train_teacher(size: Size, data: dict, out: str, device: str = "auto") -> dict:
    run = os.path.join(out, "teacher")
    shutil.rmtree(run, ignore_errors=True)
    seconds = run_cli(train_args(size, data, run, model=size.teacher_model, kwargs=None,
                                 epochs=size.teacher_epochs, distillation="none", device=device))
    return read_run(run, seconds)


def precompute_labels(size: Size, data: dict, out: str, teacher_run: str, *, views: int, hard: bool = True,
                      topk: int = 10, device: str = "auto", name: str = "labels") -> dict:
    store = os.path.join(out, name)
    args = ["precompute", "--data", data["train"], "--out", store, "--teacher", size.teacher_model,
            "--teacher-weights", os.path.join(teacher_run, "checkpoint.pth"),
            "--model-kwargs", json.dumps({"num_classes": len(CLASS_NAMES)}), "--views", views,
            "--views-per-unit", min(views, 10), "--input-size", size.input_size, "--seed", 0,
            "--workers", size.workers, "--batch-size", 256, "--device", device, "--overwrite"]
    args += ["--hard"] if hard else ["--topk", topk]
    for s in RECIPE_SET:
        args += ["--set", s]
    seconds = run_cli(args)
    return {"path": store, "seconds": seconds, **store_summary(store)}


def store_summary(store: str) -> dict:
    """`cli.py inspect STORE --json`, run as a user would, reduced to what the table shows."""
    proc = subprocess.run([sys.executable, CLI, "inspect", store, "--json"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise DemoError(f"`python cli.py inspect {store}` failed: {proc.stderr.strip().splitlines()[-1:]}")
    s = json.loads(proc.stdout)
    return {"bytes_per_view": s["bytes_per_view"], "nbytes": s["nbytes"], "views": s["views"],
            "samples": s["samples"]}


def read_run(run: str, seconds: float) -> dict:
    """What the table and the plot take from a run directory: its epochs' metrics and its summary."""
    from student.curves import read_epochs
    from student.results import TrainSummary

    epochs = read_epochs(run)
    return {"path": run, "seconds": seconds, "train_seconds": TrainSummary.read(run).train_seconds,
            "epochs": epochs, "final": epochs[-1]["val"]}


# ---- the report ----------------------------------------------------------------------------
def table(rows: list[tuple[str, dict, str]], store: dict) -> str:
    """rows: (name, run, head) with head one of cls/dist/avg."""
    width = max(len(name) for name, _, _ in rows)
    lines = [f"| {'run':<{width}} | top-1 (%) | wall (s) |", f"|{'-' * (width + 2)}|----------:|---------:|"]
    for name, run, head in rows:
        lines.append(f"| {name:<{width}} | {run['final'][f'{head}_top1']:9.2f} | {run['seconds']:8.1f} |")
    lines.append(f"label store: {store['bytes_per_view']:.2f} bytes/view ({store['views']} views x "
                 f"{store['samples']} images, {store['nbytes']:,} bytes; precompute {store['seconds']:.1f}s)")
    return "\n".join(lines)


def plot_curves(runs: list[tuple[str, dict, str]], path: str, title: str) -> None:
    """The demo's figure is `cli.py plot`'s: loss and every head's top-1 per epoch, all runs on one figure."""
    from student.curves import plot_runs

    plot_runs([(name, run["epochs"]) for name, run, _ in runs], path, title)


def run_demo(out: str = "demo-out", quick: bool = False, device: str = "auto") -> dict:
    t_start = time.perf_counter()
    check_dataset()
    size = choose_size(quick, device)
    os.makedirs(out, exist_ok=True)
    s = size
    print(f"demo ({'quick' if quick else 'default'} size): {s.train} train / {s.test} test images at "
          f"{s.input_size}px; teacher {s.teacher_model} {s.teacher_epochs} epochs; student {s.student_model} "
          f"{json.dumps(s.student_kwargs)} {s.student_epochs} epochs; recipe deit --set {' '.join(RECIPE_SET)}",
          flush=True)

    print("\n== 1/5 data: Fashion-MNIST -> WebDataset shards", flush=True)
    t0 = time.perf_counter()
    data = write_fashion_mnist(out, s.train, s.test, per_shard=s.per_shard)
    data_seconds = time.perf_counter() - t0

    print("\n== 2/5 teacher: a ConvNet trained without distillation", flush=True)
    teacher = train_teacher(s, data, out, device)

    print(f"\n== 3/5 precompute: the teacher's hard labels for {s.student_epochs} views of every image", flush=True)
    store = precompute_labels(s, data, out, teacher["path"], views=s.student_epochs, hard=True, device=device)

    def student(name: str, distillation: str) -> dict:
        # Both students read the same store: the same views in the same order (labels unused by "none").
        run = os.path.join(out, name)
        shutil.rmtree(run, ignore_errors=True)
        return read_run(run, run_cli(train_args(s, data, run, model=s.student_model, kwargs=s.student_kwargs,
                                                epochs=s.student_epochs, distillation=distillation,
                                                labels=store["path"], device=device)))

    print("\n== 4/5 student with hard distillation (distillation token), labels from the store", flush=True)
    hard = student("student-hard", "hard")
    print("\n== 5/5 the same student without distillation: same recipe, views, epochs, steps and seed", flush=True)
    none = student("student-none", "none")

    rows = [(f"teacher {s.teacher_model} (ConvNet, {s.teacher_epochs} ep)", teacher, "cls"),
            (f"student {s.student_model.split('_patch')[0]}, no distillation ({s.student_epochs} ep)", none, "avg"),
            (f"student {s.student_model.split('_patch')[0]}, hard distillation ({s.student_epochs} ep)", hard, "avg")]
    text = table(rows, store)
    png = os.path.join(out, "curves.png")
    plot_curves(rows, png, f"Fashion-MNIST, {s.train} train images at {s.input_size}px")
    total = time.perf_counter() - t_start
    gain = hard["final"]["avg_top1"] - none["final"]["avg_top1"]
    print("\n== result (test top-1 on the first "
          f"{s.test} Fashion-MNIST test images; students: average of the two heads)\n{text}")
    print(f"hard distillation vs none: {gain:+.2f} points on the same budget")
    print(f"plot: {png}\ntotal wall time {total:.0f}s (data {data_seconds:.0f}s)", flush=True)
    result = {"size": s.__dict__, "teacher": teacher, "student_none": none, "student_hard": hard,
              "store": store, "table": text, "plot": png, "total_seconds": total, "gain": gain}
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    return result
