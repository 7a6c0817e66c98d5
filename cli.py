#!/usr/bin/env python3
"""deit-lockstep: train DeiT students from precomputed teacher labels, replaying views in lockstep.

    python cli.py precompute --data SRC --out STORE --teacher MODEL ...   # stage one: the teacher, once
    python cli.py train --data SRC --labels STORE --out RUN ...           # stage two: the student
    python cli.py inspect STORE / python cli.py verify STORE --data SRC   # look at and trust the labels
    python cli.py demo                                                    # the whole thing on Fashion-MNIST

This file only parses, calls and reports; the work lives in pipeline/, storage/ and student/.
"""

from __future__ import annotations

import json
import sys

import click


class UsageError(ValueError):
    """A bad option combination caught before any work: exit code 2."""


def _input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input: printed as one line, exit code 2, no traceback."""
    from pipeline.recipes import RecipeError
    from pipeline.sources import SourceError
    from pipeline.teacher import TeacherError
    from storage import StoreError

    errors = [UsageError, RecipeError, SourceError, TeacherError, StoreError, FileNotFoundError,
              PermissionError, json.JSONDecodeError]
    try:
        from student.errors import TrainError
        errors.append(TrainError)
    except ImportError:
        pass
    return tuple(errors)


def run_reporting_errors(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except _input_errors() as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:  # disk full, unwritable output...: a runtime failure, still one line
        click.echo(f"error: {e.strerror or e} ({getattr(e, 'filename', '') or ''}); nothing partial was "
                   "marked complete, rerun the same command to resume", err=True)
        sys.exit(1)


def _json_option(value: str | None, flag: str) -> dict:
    if not value:
        return {}
    try:
        out = json.loads(value)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not JSON ({e.msg}); e.g. '{{\"depth\": 2}}'", param_hint=flag) from None
    if not isinstance(out, dict):
        raise click.BadParameter("must be a JSON object", param_hint=flag)
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main():
    """Offline DeiT distillation: precompute the teacher once, train students in lockstep."""


# ---- stage one -----------------------------------------------------------------------------
@main.command()
@click.option("--data", required=True, help="ImageFolder directory or WebDataset shards (dir, glob, {a..b}).")
@click.option("--out", required=True, help="Label store to create or resume.")
@click.option("--teacher", required=True, help="timm model name or name.tag (e.g. regnety_160.deit_in1k).")
@click.option("--teacher-weights", default=None, help="Local .pth/.pt/.safetensors weights for the teacher.")
@click.option("--views", default=300, show_default=True, type=int, help="Views per sample (epoch e uses e mod V).")
@click.option("--topk", default=10, show_default=True, type=int, help="Soft labels: keep the teacher's top-k.")
@click.option("--hard", is_flag=True, help="Store only the teacher's argmax.")
@click.option("--recipe", default="deit", show_default=True, help="Augmentation preset: deit or crop-flip.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--input-size", default=None, type=int, help="View size in pixels [recipe: 224].")
@click.option("--shard-size", default=1024, show_default=True, type=int, help="ImageFolder virtual shard size.")
@click.option("--views-per-unit", default=10, show_default=True, type=int, help="Views per work unit.")
@click.option("--batch-size", default=256, show_default=True, type=int)
@click.option("--workers", default=8, show_default=True, type=int, help="DataLoader workers rendering views.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--format", "backend", default="zarr", show_default=True, type=click.Choice(["zarr", "wds"]))
@click.option("--model-kwargs", default=None, help="JSON passed to timm.create_model for the teacher.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the teacher (CUDA).")
@click.option("--rank", default=None, type=int, help="This process's rank (else RANK or SLURM_PROCID).")
@click.option("--world-size", default=None, type=int, help="Fleet size (else WORLD_SIZE or SLURM_NTASKS).")
@click.option("--overwrite", is_flag=True, help="Delete an existing store at --out first.")
def precompute(**kw):
    """Run the teacher over every view and store its labels (resumable; a fleet under torchrun)."""
    from pipeline.precompute import PrecomputeConfig, run_precompute

    kw["model_kwargs"] = _json_option(kw["model_kwargs"], "--model-kwargs")
    kw["compile"] = kw.pop("compile_")
    kw["overrides"] = list(kw["overrides"])
    summary = run_reporting_errors(lambda: run_precompute(PrecomputeConfig(**kw)))
    if summary is not None and summary.rank == 0:
        click.echo(summary.report())


if __name__ == "__main__":
    main()
