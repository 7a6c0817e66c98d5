"""Training speed side by side, one process, interleaved: (a) plain training, no teacher; (b) training
from a label store, hard and soft; (c) online distillation with timm's TokenDistillationTask, the
teacher running every step. Same student, batch, device and batches.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824 \\
        .venv/bin/python benchmarks/train_bench.py                      # CPU: small views, minutes
    .venv/bin/python benchmarks/train_bench.py --input-size 224 --student deit_small_distilled_patch16_224 \\
        --teachers resnet50,regnety_160 --batch-size 128 --images 2048 --workers 8   # a GPU

"(b) store, soft, loss read each step" is (b) soft with --log-every 1: the loss read back on the host
after every step, as the loop did before; on a GPU that waits for the device once per step.

"step" rows time the train step alone on ready batches from the same lockstep loader (the teacher's
cost isolated); "end to end" rows include the loader (decode, replay, label join) with --workers.
Teachers have random weights: speed does not depend on them, and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import MALLOC_ENV, interleaved, photo_like_jpegs  # noqa: E402
from pipeline.devices import resolve_device  # noqa: E402
from pipeline.sources import write_wds_shards  # noqa: E402
from student.data import LockstepLoader, open_train_data  # noqa: E402
from student.losses import soft_target_cross_entropy  # noqa: E402
from student.model import create_student  # noqa: E402
from student.train import Dist, Run, TrainConfig  # noqa: E402


def build_run(args, data, mode, device, log_every=10**9):
    """The training objects `student.train.train` builds, for one mode (fresh student each)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = create_student(args.student, num_classes=args.classes, drop_path_rate=0.1,
                           img_size=args.input_size).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = create_optimizer_v2(model, opt="adamw", lr=5e-4 * args.batch_size / 512, weight_decay=0.05)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=300, warmup_epochs=5, warmup_lr=1e-6,
                                   min_lr=1e-5, step_on_epochs=False, updates_per_epoch=100)
    cuda = device.type == "cuda"
    cfg = TrainConfig(data="", out="", distillation=mode, progress=False, log_every=log_every)
    return Run(cfg, Dist(0, 1, device), mode, data, model, opt, sched,
               torch.amp.GradScaler("cuda", enabled=False), ModelEmaV3(model, decay=0.99996),
               torch.bfloat16 if cuda else None)


def online_step_fn(args, teacher_name, mode, device, batches):
    """timm's TokenDistillationTask: the student's step plus a teacher forward on every batch."""
    import timm
    from timm.task import TokenDistillationTask

    run = build_run(args, None, "none", device)
    teacher = timm.create_model(teacher_name, num_classes=args.classes).to(device).eval()
    if device.type == "cuda":
        teacher = teacher.to(memory_format=torch.channels_last)
    task = TokenDistillationTask(run.net, teacher, criterion=lambda out, y: soft_target_cross_entropy(out, y),
                                 distill_type=mode, task_loss_weight=0.5, device=device, verbose=False)
    task.train()
    step = [0]

    def epoch():
        for b in batches:
            x = b.images.to(device, non_blocking=True)
            with run.autocast():
                loss = task(x, b.targets.to(device, non_blocking=True))["loss"]
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            step[0] += 1
            run.scheduler.step_update(num_updates=step[0])
            run.ema.update(run.net, step=step[0])  # no loss read per step, as in (b)
    return epoch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="deit_tiny_distilled_patch16_224")
    p.add_argument("--teachers", default="resnet50,resnet18", help="comma-separated timm names")
    p.add_argument("--input-size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=128, help="training images (photo-like JPEGs)")
    p.add_argument("--image-size", default="250,188", help="JPEG width,height")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    if device.type == "cpu" and "MALLOC_MMAP_MAX_" not in os.environ:
        print(f"note: run with {MALLOC_ENV} for stable CPU numbers (docs/DESIGN.md, known pitfalls)")
    teachers = args.teachers.split(",")
    tmp = tempfile.mkdtemp(prefix="train_bench-")
    w, h = (int(v) for v in args.image_size.split(","))
    jpegs = photo_like_jpegs(args.images, size=(w, h))
    samples = [(f"i{i:06d}", data, "jpg", i % args.classes) for i, data in enumerate(jpegs)]
    write_wds_shards(samples, f"{tmp}/wds", per_shard=max(args.batch_size, args.images // 4),
                     class_names=[f"c{i}" for i in range(args.classes)])

    # Label stores from the real precompute (one view; labels' values do not change the speed).
    from pipeline.stage1.precompute import PrecomputeConfig, run_precompute

    stores = {}
    for mode, hard in (("hard", True), ("soft", False)):
        stores[mode] = f"{tmp}/store-{mode}"
        run_precompute(PrecomputeConfig(
            data=f"{tmp}/wds", out=stores[mode], teacher=teachers[-1], views=1, views_per_unit=1, topk=10,
            hard=hard, input_size=args.input_size, batch_size=args.batch_size, workers=0, device=str(device),
            model_kwargs={"num_classes": args.classes}, progress=False,
            random_teacher=True))  # a random teacher: the labels' values do not change the speed
    data = {m: open_train_data(f"{tmp}/wds", labels=s) for m, s in stores.items()}
    plain = open_train_data(f"{tmp}/wds", recipe="deit", input_size=args.input_size)
    batches = list(LockstepLoader(data["soft"], batch_size=args.batch_size).epoch(0))
    n_images = sum(len(b) for b in batches)

    runs = {"(a) plain": build_run(args, plain, "none", device),
            "(b) store, hard": build_run(args, data["hard"], "hard", device),
            "(b) store, soft": build_run(args, data["soft"], "soft", device),
            # the loss read back on the host after every step, as the loop did before issue 15
            "(b) store, soft, loss read each step": build_run(args, data["soft"], "soft", device, log_every=1)}
    fns = {name: (lambda r=r: r.train_one_epoch(0, batches, 0)) for name, r in runs.items()}
    for t in teachers:
        for mode in ("hard", "soft"):
            fns[f"(c) online {mode}, {t}"] = online_step_fn(args, t, mode, device, batches)
    for fn in fns.values():  # warm-up: allocator, kernels, first-call costs
        fn()
    secs = interleaved(fns, rounds=args.rounds)
    rate = {k: n_images / v for k, v in secs.items()}

    print(f"\ntrain step on ready batches: {args.student} at {args.input_size}px, batch {args.batch_size}, "
          f"{n_images} images/round, {args.rounds} interleaved rounds, {device}, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'mode':34s} {'img/s':>8s} {'vs (a)':>7s}")
    for k, v in rate.items():
        print(f"{k:34s} {v:8.1f} {v / rate['(a) plain']:7.3f}")
    print("\nratios")
    for mode in ("hard", "soft"):
        b = rate[f"(b) store, {mode}"]
        print(f"  (b {mode})/(a) = {b / rate['(a) plain']:.3f}   (target >= 0.95)")
        for t in teachers:
            print(f"  (b {mode})/(c {mode}, {t}) = {b / rate[f'(c) online {mode}, {t}']:.2f}")
    print(f"  (b soft)/(b soft, loss read each step) = "
          f"{rate['(b) store, soft'] / rate['(b) store, soft, loss read each step']:.3f}   (a GPU: > 1; a CPU: ~1)")

    # End to end: loader (decode, replay, label join; --workers) + step, one epoch per round.
    def e2e(d, run):
        loader = LockstepLoader(d, batch_size=args.batch_size, workers=args.workers)
        return lambda: run.train_one_epoch(0, loader.epoch(0), 0)
    e2e_fns = {"(a) plain + loader": e2e(plain, runs["(a) plain"]),
               "(b) store soft + loader": e2e(data["soft"], runs["(b) store, soft"])}
    t0 = time.perf_counter()
    secs = interleaved(e2e_fns, rounds=args.rounds)
    print(f"\nend to end with the loader ({args.workers} workers, {w}x{h} JPEGs; {time.perf_counter() - t0:.0f}s)")
    e2e_rate = {k: n_images / v for k, v in secs.items()}
    for k, v in e2e_rate.items():
        print(f"{k:34s} {v:8.1f} {v / e2e_rate['(a) plain + loader']:7.3f}")


if __name__ == "__main__":
    main()
