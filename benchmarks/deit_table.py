"""The DeiT paper's Table 3 (distillation variants) in miniature, on Fashion-MNIST, through the CLI.

    .venv/bin/python benchmarks/deit_table.py                      # ~15 min on 2 CPU cores
    .venv/bin/python benchmarks/deit_table.py --epochs 20 --train 20000   # larger, slower (trains its teacher)

Rows, all the same student size, recipe, views, epochs, steps and seed (the views of one top-10
label store, so every run sees the same pixels in the same order):

- no distillation: a student without distillation token (``deit_tiny_patch16_224``), labels only;
- usual (soft) distillation on the class head: the same student, ``--distillation soft``
  (the paper's tau = 3, lambda = 0.1);
- hard distillation on the class head: the same student, ``--distillation hard``;
- hard distillation with the distillation token (``deit_tiny_distilled_patch16_224``): one run,
  evaluated with the class head, the distillation head, and both averaged.

The data and the teacher are the demo's (``demo.py``): Fashion-MNIST as WebDataset shards,
a ConvNet trained with ``cli.py train --distillation none``. A teacher already trained by
``cli.py demo`` on the same shards is reused (``--data-dir``, default ``demo-out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import demo  # noqa: E402


def reusable_teacher(run: str, train_dir: str, size: demo.Size) -> bool:
    """A finished teacher run of this architecture, epochs and lr on these training shards."""
    import torch

    ckpt_path, summary_path = os.path.join(run, "checkpoint.pth"), os.path.join(run, "summary.json")
    if not (os.path.exists(ckpt_path) and os.path.exists(summary_path)):
        return False
    with open(summary_path) as f:
        if not json.load(f).get("finished"):
            return False
    cfg = torch.load(ckpt_path, map_location="cpu", weights_only=True)["config"]
    return (os.path.abspath(cfg["data"]) == os.path.abspath(train_dir) and cfg["model"] == size.teacher_model
            and cfg["epochs"] == size.teacher_epochs and cfg["lr"] == size.lr
            and list(cfg["overrides"]) == demo.RECIPE_SET and cfg["input_size"] == size.input_size)


def main(argv=None) -> int:
    base = demo.SIZES["default"]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks-out/deit_table", help="Store and student runs.")
    p.add_argument("--data-dir", default="demo-out", help="Where the demo writes shards and its teacher.")
    p.add_argument("--train", type=int, default=base.train, help="Training images.")
    p.add_argument("--test", type=int, default=base.test, help="Test images.")
    # Four student runs: 6 epochs each keeps the default near 15 minutes on 2 cores (the demo's students run 10).
    p.add_argument("--epochs", type=int, default=6, help="Student epochs (= views stored).")
    p.add_argument("--teacher-epochs", type=int, default=base.teacher_epochs)
    p.add_argument("--student-kwargs", default=json.dumps(base.student_kwargs), help="JSON for both students.")
    p.add_argument("--batch-size", type=int, default=base.batch_size)
    p.add_argument("--lr", type=float, default=base.lr, help="For a global batch of 512 (scaled).")
    p.add_argument("--tau", type=float, default=3.0, help="Soft distillation temperature (paper: 3).")
    p.add_argument("--soft-alpha", type=float, default=0.1, help="Soft distillation weight (paper: 0.1).")
    p.add_argument("--workers", type=int, default=base.workers)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    kwargs = json.loads(args.student_kwargs)
    size = demo._replace(base, train=args.train, test=args.test, student_epochs=args.epochs,
                         teacher_epochs=args.teacher_epochs, batch_size=args.batch_size, lr=args.lr,
                         student_kwargs=kwargs, workers=args.workers)
    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    data = demo.write_fashion_mnist(args.data_dir, size.train, size.test, per_shard=size.per_shard)

    teacher_run = os.path.join(args.data_dir, "teacher")
    if reusable_teacher(teacher_run, data["train"], size):
        print(f"reusing the teacher in {teacher_run} (same shards, model, epochs, recipe)", flush=True)
        teacher = demo.read_run(teacher_run, 0.0)
        with open(os.path.join(teacher_run, "summary.json")) as f:
            teacher["seconds"] = json.load(f)["wall_seconds"]  # the demo's run: its own wall time
    else:
        teacher = demo.train_teacher(size, data, args.out, args.device)
    store = demo.precompute_labels(size, data, args.out, teacher["path"], views=size.student_epochs, hard=False,
                                   topk=10, device=args.device, name="labels-top10")

    def student(name, model, distillation, extra=()):
        run = os.path.join(args.out, name)
        shutil.rmtree(run, ignore_errors=True)
        seconds = demo.run_cli(demo.train_args(size, data, run, model=model, kwargs=kwargs,
                                               epochs=size.student_epochs, distillation=distillation,
                                               labels=store["path"], device=args.device, extra=extra))
        return demo.read_run(run, seconds)

    plain, token = "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"
    none = student("none", plain, "none")
    soft = student("soft-cls", plain, "soft", ["--tau", args.tau, "--alpha", args.soft_alpha])
    hard = student("hard-cls", plain, "hard")
    tok = student("hard-token", token, "hard")

    rows = [
        ("teacher", f"{size.teacher_model} (ConvNet)", "-", teacher, "cls"),
        ("none", "no distillation", "class", none, "cls"),
        ("usual distillation", f"soft, tau {args.tau:g}, lambda {args.soft_alpha:g}", "class", soft, "cls"),
        ("hard distillation", "hard, class token", "class", hard, "cls"),
        ("DeiT: hard + distillation token", "hard, class + distillation tokens", "class", tok, "cls"),
        ("DeiT: hard + distillation token", "hard, class + distillation tokens", "distillation", tok, "dist"),
        ("DeiT: hard + distillation token", "hard, class + distillation tokens", "class + distillation", tok, "avg"),
    ]
    lines = ["| method | supervision | test head | top-1 (%) | wall (s) |", "|---|---|---|---:|---:|"]
    for method, sup, head_name, run, head in rows:
        lines.append(f"| {method} | {sup} | {head_name} | {run['final'][f'{head}_top1']:.2f} | {run['seconds']:.0f} |")
    total = time.perf_counter() - t_start
    cmd = "python benchmarks/deit_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\n## DeiT Table 3 in miniature: Fashion-MNIST, {size.train} train / {size.test} test images at "
          f"{size.input_size}px, student {json.dumps(kwargs)}, {size.student_epochs} epochs, seed 0\n")
    print("\n".join(lines))
    print(f"\nlabel store: top-10, {store['bytes_per_view']:.2f} bytes/view; precompute {store['seconds']:.0f}s; "
          f"total {total:.0f}s; command: `{cmd.strip()}`", flush=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
