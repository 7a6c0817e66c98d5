"""Runs as tables and pictures: timm's ``summary.csv`` beside ``metrics.jsonl``, and loss/top-1 curves.

``cli.py train`` appends one row per epoch to ``RUN/summary.csv`` with ``timm.utils.update_summary``,
so the tools that read timm's summaries read ours: ``train_*`` columns (loss, base, kd, img/s),
``eval_*`` columns per head (``eval_cls_top1``, ``eval_dist_top1``, ``eval_avg_top1``, top-5 alike,
``eval_ema_*`` for the EMA weights) and timm's own ``eval_top1``/``eval_top5``, which here are the
averaged head's (DeiT's test-time rule). ``cli.py plot RUN [RUN ...] --out curves.png`` and the demo
draw the same figure with ``plot_runs``.
"""

from __future__ import annotations

import json
import os

from storage.errors import UserError

HEADS = ("avg", "cls", "dist")
HEAD_STYLE = {"avg": "-", "cls": "--", "dist": ":"}
HEAD_NAME = {"avg": "averaged", "cls": "class", "dist": "distillation"}


def summary_columns(metrics: dict) -> tuple[dict, dict]:
    """An epoch's metrics.jsonl row as timm's (train_metrics, eval_metrics) for update_summary."""
    train = {k: metrics[k] for k in ("loss", "base", "kd", "img_per_s") if k in metrics}
    evals = {}
    for key, prefix in (("val", ""), ("val_ema", "ema_")):
        val = metrics.get(key)
        if not val:
            continue
        if not prefix:  # timm's own column names, for tools that know only those
            evals.update(top1=val["avg_top1"], top5=val["avg_top5"])
        evals.update({f"{prefix}{k}": v for k, v in val.items() if k != "n"})
    return train, evals


def _row(metrics: dict) -> dict:
    """The row update_summary writes for these metrics (same names, same order)."""
    train, evals = summary_columns(metrics)
    row = {"epoch": metrics["epoch"], **{f"train_{k}": v for k, v in train.items()},
           **{f"eval_{k}": v for k, v in evals.items()}}
    if metrics.get("lr") is not None:
        row["lr"] = metrics["lr"]
    return row


def append_summary(run: str, metrics: dict) -> None:
    """One row of RUN/summary.csv, written by timm's own update_summary (header when the file is new).

    A resumed run may change its columns (--val is a runtime option: added or dropped on --resume).
    Appending under the old header would misalign the table, so then the file is rewritten from
    metrics.jsonl (which already holds this epoch) under the union of the columns, blanks where an
    epoch has no value."""
    import csv

    from timm.utils import update_summary

    path = os.path.join(run, "summary.csv")
    header = None
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
    if header is None or header == list(_row(metrics)):
        train, evals = summary_columns(metrics)
        update_summary(metrics["epoch"], train, evals, path, lr=metrics.get("lr"))
        return
    rows = [_row(m) for m in read_epochs(run)]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


class RunError(UserError, ValueError):
    """A run directory that cannot be plotted: one line, exit code 2."""


def read_epochs(run: str) -> list[dict]:
    """RUN/metrics.jsonl as a list of rows (a resumed run's repeated epochs: the last one wins)."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        raise RunError(f"{run} has no metrics.jsonl; pass run directories of `cli.py train`")
    rows = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise RunError(f"{path} line {n} is not JSON; the file is damaged") from None
            rows[row["epoch"]] = row
    if not rows:
        raise RunError(f"{path} holds no epoch yet; plot it after the first epoch ends")
    return [rows[e] for e in sorted(rows)]


def plot_runs(runs: list[tuple[str, list[dict]]], path: str, title: str = "", heads=HEADS) -> None:
    """Training loss and validation top-1 per epoch, several runs on one figure: one colour per run
    (named in the legend below the plots), one line style per head (averaged solid, class dashed,
    distillation dotted). A one-head model's three heads are the same numbers: drawn once, solid.
    Epochs are numbered from 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_top1) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    run_lines, styles_used = [], set()
    for i, (name, epochs) in enumerate(runs):
        colour = f"C{i % 10}"
        xs = [e["epoch"] + 1 for e in epochs]
        line, = ax_loss.plot(xs, [e["loss"] for e in epochs], color=colour, marker="o", markersize=3, label=name)
        run_lines.append(line)
        with_val = [e for e in epochs if e.get("val")]
        if not with_val:
            continue
        vx = [e["epoch"] + 1 for e in with_val]
        curves = {head: [e["val"][f"{head}_top1"] for e in with_val] for head in heads}
        one_head = all(curves[h] == curves[heads[0]] for h in heads)  # e.g. a ConvNet: cls == dist == avg
        for head in heads[:1] if one_head else heads:
            styles_used.add(head)
            ax_top1.plot(vx, curves[head], color=colour, linestyle=HEAD_STYLE[head],
                         marker="o" if head == heads[0] else None, markersize=3)
    for ax in (ax_loss, ax_top1):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax_loss.set_ylabel("training loss")
    ax_top1.set_ylabel("validation top-1 (%)")
    if styles_used:
        ax_top1.legend(handles=[Line2D([], [], color="0.3", linestyle=HEAD_STYLE[h], label=f"{HEAD_NAME[h]} head"
                                       + ("s" if h == "avg" else "")) for h in heads if h in styles_used],
                       fontsize=7, loc="best")
    else:
        ax_top1.text(0.5, 0.5, "no validation (train without --val)", ha="center", va="center",
                     transform=ax_top1.transAxes, fontsize=9)
    ncol = min(len(runs), 3)
    legend_rows = -(-len(runs) // ncol)
    fig.legend(handles=run_lines, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05 + 0.045 * legend_rows, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def run_names(runs: list[str]) -> list[str]:
    """Short legend names: the directory's name, or its path where two names would clash."""
    names = [os.path.basename(os.path.normpath(r)) for r in runs]
    return [n if names.count(n) == 1 else os.path.normpath(r) for n, r in zip(names, runs, strict=True)]


def plot_run_dirs(runs: list[str], out: str, title: str = "") -> None:
    plot_runs(list(zip(run_names(runs), [read_epochs(r) for r in runs], strict=True)), out, title)
