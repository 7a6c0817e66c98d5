#!/usr/bin/env python3
"""deit-lockstep: train DeiT students from precomputed teacher labels, replaying views in lockstep.

    python cli.py precompute --data SRC --out STORE --teacher MODEL ...   # stage one: the teacher, once
    python cli.py train --data SRC --labels STORE --out RUN ...           # stage two: the student
    python cli.py inspect STORE / python cli.py verify STORE --data SRC   # look at and trust the labels
    python cli.py export RUN --out model.safetensors / python cli.py plot RUN ...   # use and look at runs
    python cli.py demo                                                    # the whole thing on Fashion-MNIST

This file only parses, calls and reports; the work lives in pipeline/, storage/ and student/.
"""

from __future__ import annotations

import json
import os
import shlex
import sys

import click

from pipeline.options import (
    INTERRUPTED,
    SEED,
    OneLineGroup,
    at_least,
    check_device,
    config_file_option,
    config_from,
    config_options,
    non_negative,
    positive,
)
from pipeline.stage1.config import PrecomputeConfig  # no torch: the options are these configs' fields
from student.config import TrainConfig


def _input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input: printed as one line, exit code 2, no traceback. Every error of ours
    that a user can fix is a ``storage.errors.UserError``; the rest are the builtins a bad path raises."""
    from storage.errors import UserError

    return (UserError, FileNotFoundError, PermissionError, json.JSONDecodeError)


RESUME_HINT = "nothing partial was marked complete, rerun the same command to resume"
READ_ONLY_HINT = "the store was only read, nothing in it changed; fix the path or free space and run it again"
NOTHING_WRITTEN_HINT = "its inputs were only read and no output was left half-written; fix the path or free space"


def run_reporting_errors(fn, *args, os_error_hint: str = RESUME_HINT, on_interrupt=None, **kwargs):
    """Call fn; bad input is one line and exit 2, an OSError one line and exit 1. Ctrl-C, when the command
    says what survives it (``on_interrupt()``: the lines to print), prints them and exits 130 as shells
    expect; otherwise it reaches OneLineGroup ("error: interrupted", 130)."""
    try:
        return fn(*args, **kwargs)
    except _input_errors() as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:  # disk full, unwritable output...: a runtime failure, still one line
        where = getattr(e, "filename", "") or ""
        click.echo(f"error: {' '.join(str(e.strerror or e).split())}{f' ({where})' if where else ''}; "
                   f"{os_error_hint}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        if on_interrupt is None:
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets the signal; one says it
            click.echo(f"\ninterrupted: {on_interrupt()}", err=True)
        sys.exit(INTERRUPTED)


# Options that take a value, as the command line spells them: rerun_command drops a value with its option.
_VALUE_OPTIONS = {"--out", "--output", "--experiment", "--finetune"}


def rerun_command(drop: set[str] = frozenset(), add: tuple[str, ...] = ()) -> str:
    """This command line as the user would type it again, without the options in ``drop`` (and their
    values; ``--resume``'s optional one too), with ``add`` at the end."""
    argv, kept, i = sys.argv[1:], [], 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        i += 1
        if name not in drop:
            kept.append(token)
        elif "=" not in token and (name in _VALUE_OPTIONS or name == "--resume") and i < len(argv) \
                and (name != "--resume" or not argv[i].startswith("-")):
            i += 1  # the dropped option's value
    prog = sys.argv[0]
    launcher = ["torchrun", "...", prog] if "TORCHELASTIC_RUN_ID" in os.environ else (
        ["python", prog] if prog.endswith(".py") else [os.path.basename(prog)])
    return shlex.join([*launcher, *kept, *add])


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main():
    """Offline DeiT distillation: precompute the teacher once, train students in lockstep."""


# ---- stage one -----------------------------------------------------------------------------
# Options that are not PrecomputeConfig/TrainConfig fields: the command turns them into fields.
REPEATS = click.option("--repeats", default=None, type=at_least(1),
                       help="Repeated augmentation: each sample R times per view, differently augmented "
                            "[recipe: 3; 1: off]; the recipe's `repeats` (--set repeats=R).")
OUTPUT = click.option("--output", default=None, metavar="DIR", help="timm's spelling: the run is DIR/EXPERIMENT.")
EXPERIMENT = click.option("--experiment", default=None, metavar="NAME",
                          help="timm's spelling: with --output, the run's name [a timestamp and the model].")


@main.command()
@config_options(PrecomputeConfig, after={"input_size": [REPEATS]})  # the rest: PrecomputeConfig's fields
@config_file_option
def precompute(**kw):
    """Run the teacher over every view and store its labels (resumable; a fleet under torchrun)."""
    from pipeline.stage1.precompute import run_precompute

    repeats = [f"repeats={kw['repeats']}"] if kw["repeats"] is not None else []  # the recipe's, after --set's
    cfg = config_from(PrecomputeConfig, kw, overrides=[*kw["overrides"], *repeats])
    summary = run_reporting_errors(lambda: run_precompute(cfg), on_interrupt=lambda: (
        f"the units already finished are kept in {kw['out']}; rerun the same command to resume: "
        f"{rerun_command(drop={'--overwrite'})}"))
    if summary is not None and summary.rank == 0:
        click.echo(summary.report())


# ---- look at and trust the labels -----------------------------------------------------------
def _report_inspect_errors(fn):
    """run_reporting_errors for commands that only read a store: an OSError changed nothing in it."""
    return run_reporting_errors(fn, os_error_hint=READ_ONLY_HINT)


@main.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--sample", default=None, metavar="KEY_OR_INDEX", help="Show one sample's views: params and labels.")
@click.option("--view", "views", multiple=True, type=at_least(0),
              help="View(s) of --sample or of --render's sheet (repeatable).")
@click.option("--data", default=None, help="The source given to precompute (else the root the store recorded).")
@click.option("--render", default=None, metavar="OUT.png",
              help="Write a contact sheet of replayed views (of --sample, else of --view or the first view).")
@click.option("--count", default=16, show_default=True, type=at_least(1), help="Tiles on the contact sheet.")
@click.option("--export", default=None, metavar="OUT.parquet",
              help="Write one row per stored view (outside the store; with --render, both are written).")
@click.option("--sample-blocks", default=32, show_default=True, type=at_least(1),
              help="Summary: random (view, shard) blocks read for the label statistics.")
def inspect(store, as_json, sample, views, data, render, count, export, sample_blocks):
    """Summarise a label store, show one sample, render a contact sheet, or export a table."""
    _check_inspect_options(sample, views, render, export, as_json)

    def go():
        from storage import open_store
        from storage.outputs import check_output_path

        for out, kind, option in ((render, "image", "--render"), (export, "parquet", "--export")):
            if out:  # before opening anything: an output never lands on an input or inside a store
                check_output_path(out, kind, option=option, inputs=(store, data))
        reader = open_store(store)
        if render:
            from pipeline.tools.render import render_sheet

            sheet = render_sheet(reader, render, data, sample=sample, views=views, count=count)
            click.echo(f"wrote {sheet.path}: {sheet.tiles} views, {sheet.size[0]}x{sheet.size[1]} px")
        if export:
            from pipeline.tools.export import export_parquet

            rows = export_parquet(reader, export)
            click.echo(f"wrote {export}: {rows} rows (one per stored view)")
        if render or export:
            return
        if sample is not None:
            from pipeline.tools.sample import describe_sample, format_sample

            report = describe_sample(reader, sample, views=views, data=data)
            click.echo(json.dumps(_plain(report), indent=1) if as_json else format_sample(report))
        else:
            from pipeline.tools.summary import format_summary, summarize

            summary = summarize(reader, max_blocks=sample_blocks)
            click.echo(json.dumps(summary.to_json(), indent=1) if as_json else format_summary(summary))

    _report_inspect_errors(go)


def _check_inspect_options(sample, views, render, export, as_json) -> None:
    """Options that would be ignored in the mode chosen: say so rather than drop them silently."""
    if views and sample is None and not render:
        raise click.UsageError("--view picks the views of --sample KEY (or of --render's sheet); "
                               "add --sample KEY, or drop --view for the store's summary")
    if export and (sample is not None or views) and not render:
        raise click.UsageError("--export writes every stored view; --sample/--view choose what --render or the "
                               "sample report shows: drop them, or add --render OUT.png")
    if as_json and (render or export):
        raise click.UsageError("--json prints the summary or a --sample report; --render/--export write files: "
                               "run them separately")


def _plain(obj):
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


@main.command()
@click.argument("store")
@click.option("--data", required=True, help="The source given to precompute.")
@click.option("--teacher-weights", default=None, help="The teacher's weights file (else the path the store recorded).")
@click.option("--n", "n", default=64, show_default=True, type=at_least(0), help="Random stored views to recompute.")
@click.option("--full", is_flag=True, help="Also check every chunk's checksum, shape and values.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Which random views are recomputed.")
@click.option("--device", default="auto", show_default=True, callback=check_device, help="auto, cpu, cuda, cuda:N.")
@click.option("--batch-size", default=32, show_default=True, type=at_least(1))
@click.option("--atol", default=None, type=non_negative(),
              help="Log-prob tolerance beyond fp16 rounding [1e-3; 5e-2 on CUDA].")
@click.option("--tau", "taus", multiple=True, type=positive(), metavar="T",
              help="Also report how far the soft targets rebuilt at temperature T are from the teacher's full "
                   "softmax(z/T) on the recomputed views (total variation, KL); repeatable.")
@config_file_option
def verify(store, data, teacher_weights, n, full, seed, device, batch_size, atol, taus):
    """Recompute random stored views, check probes (and chunks): PASS, or FAIL naming every bad unit."""

    def go():
        from pipeline.tools.verify import verify_store

        return verify_store(store, data, teacher_weights=teacher_weights, n=n, full=full, seed=seed,
                            device=device, batch_size=batch_size, atol=atol, taus=taus)

    from pipeline.devices import resolve_device

    device = str(resolve_device(device))
    report = _report_inspect_errors(go)
    from pipeline.tools.verify import format_report

    click.echo(format_report(report))
    sys.exit(0 if report.passed else 1)


# ---- stage two -----------------------------------------------------------------------------
@main.command()
@config_options(TrainConfig, after={"out": [OUTPUT, EXPERIMENT]})  # the rest: TrainConfig's fields
@config_file_option
def train(**kw):
    """Train a student from stored teacher labels, replaying the stored views (DDP under torchrun)."""
    from student.train import train as run_train

    kw["out"], kw["resume"] = run_folder(kw.pop("out"), kw.pop("output"), kw.pop("experiment"), kw["resume"],
                                         kw["model"])
    if kw["finetune"]:  # DeiT's fine-tuning recipe for every option left at its default
        from student.finetune import with_finetune_defaults

        source = click.get_current_context().get_parameter_source
        kw = with_finetune_defaults(kw, {k for k in kw if source(k) != click.core.ParameterSource.DEFAULT})
    cfg = config_from(TrainConfig, kw)
    summary = run_reporting_errors(lambda: run_train(cfg),
                                   on_interrupt=lambda: train_interrupted(kw["out"]))
    if summary is not None and summary.rank == 0:
        click.echo(summary.report())


def run_folder(out: str | None, output: str | None, experiment: str | None, resume: str | None,
               model: str) -> tuple[str, bool | str]:
    """The run directory and TrainConfig.resume from --out, timm's --output/--experiment and --resume
    [CHECKPOINT]: (RUN, False) for a new run, (RUN, True) for RUN's own checkpoint, (RUN, path) for another."""
    if out is not None and (output is not None or experiment is not None):
        raise click.UsageError("pass --out RUN, or timm's --output DIR --experiment NAME, not both")
    if output is not None or experiment is not None:  # timm: output/train/<timestamp>-<model> by default
        import datetime

        name = experiment or f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{model}"
        out = os.path.join(output or os.path.join("output", "train"), name)
    if not resume:
        if out is None:
            raise click.UsageError("missing the run directory: pass --out RUN (or --output DIR --experiment NAME)")
        return out, resume is not None
    from student.resume import CHECKPOINT

    path = os.path.join(resume, CHECKPOINT) if os.path.isdir(resume) else resume
    return (out if out is not None else os.path.dirname(path) or "."), path


def train_interrupted(out: str) -> str:
    """What Ctrl-C left of a training run, and the command that continues it."""
    from student.resume import CHECKPOINT, last_saved_epoch

    ckpt = os.path.join(out, CHECKPOINT)
    if not os.path.exists(ckpt):
        return f"no epoch finished, nothing was saved in {out}; rerun the same command to start again"
    epoch = last_saved_epoch(out)
    after = f" (after epoch {epoch})" if epoch is not None else ""
    # --finetune only starts a run (the checkpoint keeps it); --overwrite would delete what is kept
    resume = rerun_command(drop={"--overwrite", "--resume", "--out", "--output", "--experiment", "--finetune"},
                           add=("--out", out, "--resume"))
    return f"the last checkpoint, {ckpt}{after}, is kept; resume with: {resume}"


@main.command()
@click.argument("run")
@click.option("--out", required=True, metavar="MODEL.safetensors", help="Weights file to write (outside the run).")
@click.option("--ema/--no-ema", default=True, show_default=True,
              help="The EMA weights when the run kept them; --no-ema: the raw weights (train's final line reports "
                   "the raw weights' top-1; export prints both when the run was validated).")
@click.option("--config", "config_path", default=None, metavar="CONFIG.json",
              help="timm config to write [config.json beside --out]. Neither file may be an input or inside a run.")
def export(run, out, ema, config_path):
    """A run's student as safetensors plus timm's config.json: timm.create_model loads it alone."""
    from student.export import export_run

    done = run_reporting_errors(lambda: export_run(run, out, ema=ema, config_path=config_path),
                                os_error_hint=NOTHING_WRITTEN_HINT)
    click.echo(done.report())


@main.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", default="curves.png", show_default=True, metavar="OUT.png",
              help="Figure to write: .png, .pdf or .svg, outside the run folders.")
@click.option("--title", default="", help="Figure title.")
def plot(runs, out, title):
    """Training loss and validation top-1 (averaged, class and distillation heads) per epoch of RUN(s)."""
    from student.curves import plot_run_dirs

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        click.echo("error: plot needs matplotlib: pip install 'deit-lockstep[demo]' (or pip install matplotlib)",
                   err=True)
        sys.exit(2)
    run_reporting_errors(plot_run_dirs, list(runs), out, title, os_error_hint=NOTHING_WRITTEN_HINT)
    click.echo(f"wrote {out}: {len(runs)} run(s)")


# ---- the whole thing on real data ----------------------------------------------------------
@main.command()
@click.option("--quick", is_flag=True, help="A smaller run (under 3 minutes on 2 CPU cores).")
@click.option("--out", default="demo-out", show_default=True, help="Directory for shards, runs, store, plot.")
@click.option("--device", default="auto", show_default=True, callback=check_device,
              help="auto, cpu, cuda (a GPU runs a larger demo).")
def demo(quick, out, device):
    """Fashion-MNIST end to end: shards, ConvNet teacher, precompute, DeiT students with and without distillation."""
    from demo import run_demo

    run_reporting_errors(run_demo, out=out, quick=quick, device=device)


if __name__ == "__main__":
    main()
