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
from storage.outputs import check_output_path

from .results import METRICS_FILE, SUMMARY_FILE

OBJECTIVES = {"none": "no distillation", "hard": "hard distillation", "soft": "soft distillation"}
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
    """RUN/metrics.jsonl as a list of rows (a resumed run's repeated epochs: the last one wins). Every row
    is checked for what the plot reads, so a damaged file is one line naming its line, not a traceback."""
    path = os.path.join(run, METRICS_FILE)
    if not os.path.isfile(path):
        raise RunError(f"{run} has no {METRICS_FILE}; pass run directories of `cli.py train`")
    rows = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise RunError(f"{path} line {n} is not JSON; the file is damaged") from None
            why = _row_problem(row)
            if why:
                raise RunError(f"{path} line {n} {why}; the file is damaged or not written by `cli.py train`")
            rows[row["epoch"]] = row
    if not rows:
        raise RunError(f"{path} holds no epoch yet; plot it after the first epoch ends")
    return [rows[e] for e in sorted(rows)]


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _row_problem(row) -> str | None:
    """What in a metrics.jsonl row the plot cannot use, or None."""
    if not isinstance(row, dict):
        return f"is a JSON {type(row).__name__}, not an epoch's object"
    epoch = row.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        return f"has epoch {epoch!r}, not a count from 0"
    for key in ("loss", "base", "kd"):
        if key in row and not _is_number(row[key]) or key == "loss" and key not in row:
            return f"has {key} {row.get(key)!r}, not a number"
    for key in ("val", "val_ema"):
        val = row.get(key)
        if val is None:
            continue
        bad = [h for h in HEADS if not isinstance(val, dict) or not _is_number(val.get(f"{h}_top1"))]
        if bad:
            return f"has no numeric {key}.{bad[0]}_top1"
    return None


def objective_of(run: str, epochs: list[dict]) -> str:
    """What a run's training loss measures: its distillation mode from RUN/summary.json (written when a run
    ends), else whether its rows hold a distillation term at all."""
    try:
        with open(os.path.join(run, SUMMARY_FILE)) as f:
            mode = json.load(f)["distillation"]
        if mode in OBJECTIVES:
            return OBJECTIVES[mode]
    except (OSError, ValueError, TypeError, KeyError):
        pass  # a run still training, or an unreadable summary: the rows say enough
    return _objective_from_rows(epochs)


def _objective_from_rows(epochs: list[dict]) -> str:
    return OBJECTIVES["none"] if all(not e.get("kd") for e in epochs) else "with distillation"


def plot_runs(runs: list[tuple[str, list[dict]]], path: str, title: str = "", heads=HEADS,
              objectives: list[str] | None = None, fmt: str | None = None) -> None:
    """Training loss and validation top-1 per epoch, several runs on one figure: one colour per run
    (named in the legend below the plots, with its loss objective), one line style per head (averaged
    solid, class dashed, distillation dotted). A one-head model's three heads are the same numbers: drawn
    once, solid. Epochs are numbered as metrics.jsonl and train's progress bar number them, from 0.

    Losses of different objectives (with and without distillation, hard or soft) are different sums, not
    comparable on one axis: then the left panel draws each run's cross-entropy with the ground truth (the
    ``base`` term every objective has) and says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    objectives = objectives or [_objective_from_rows(epochs) for _, epochs in runs]
    mixed = len(set(objectives)) > 1
    loss_key = "base" if mixed and all("base" in e for _, epochs in runs for e in epochs) else "loss"
    fig, (ax_loss, ax_top1) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    run_lines, styles_used = [], set()
    for i, ((name, epochs), objective) in enumerate(zip(runs, objectives, strict=True)):
        colour = f"C{i % 10}"
        xs = [e["epoch"] for e in epochs]
        line, = ax_loss.plot(xs, [e[loss_key] for e in epochs], color=colour, marker="o", markersize=3,
                             label=f"{name} ({objective})")
        run_lines.append(line)
        with_val = [e for e in epochs if e.get("val")]
        if not with_val:
            continue
        vx = [e["epoch"] for e in with_val]
        curves = {head: [e["val"][f"{head}_top1"] for e in with_val] for head in heads}
        one_head = all(curves[h] == curves[heads[0]] for h in heads)  # e.g. a ConvNet: cls == dist == avg
        for head in heads[:1] if one_head else heads:
            styles_used.add(head)
            ax_top1.plot(vx, curves[head], color=colour, linestyle=HEAD_STYLE[head],
                         marker="o" if head == heads[0] else None, markersize=3)
    for ax in (ax_loss, ax_top1):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (from 0, as train prints it)")
        ax.grid(alpha=0.3)
    if loss_key == "base":
        ax_loss.set_ylabel("cross-entropy with the ground truth", fontsize=9)
        ax_loss.set_title("the runs' objectives differ: their shared term", fontsize=8)
    elif mixed:  # old rows without the base term: the totals, told apart in the legend
        ax_loss.set_ylabel("training loss (objectives differ, see legend)", fontsize=9)
    else:
        ax_loss.set_ylabel(f"training loss ({objectives[0]})", fontsize=9)
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
    fig.savefig(path, format=fmt)
    plt.close(fig)


def run_names(runs: list[str]) -> list[str]:
    """Short legend names: the directory's name, or its path where two names would clash."""
    names = [os.path.basename(os.path.normpath(r)) for r in runs]
    return [n if names.count(n) == 1 else os.path.normpath(r) for n, r in zip(names, runs, strict=True)]


def plot_run_dirs(runs: list[str], out: str, title: str = "") -> None:
    """`cli.py plot`: the figure of these run directories at out (a .png, .pdf or .svg outside every run)."""
    epochs = [read_epochs(r) for r in runs]  # a folder that is no run is named first: the likelier slip
    check_output_path(out, "figure", inputs=runs)
    objectives = [objective_of(r, e) for r, e in zip(runs, epochs, strict=True)]
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.{os.getpid()}.tmp")
    try:  # written beside and renamed: a failed plot leaves no half figure under the name
        plot_runs(list(zip(run_names(runs), epochs, strict=True)), tmp, title, objectives=objectives,
                  fmt=os.path.splitext(out)[1][1:].lower())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
