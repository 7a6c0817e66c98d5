"""Command-line value checks shared by every subcommand: ranges, finite numbers, devices.

A numeric option is checked by click when the command line is parsed, before any source is
indexed, any model built or any store created, so a bad value never costs work and never
leaves anything behind. Recipe values are checked in ``recipes.py`` (one place for every way a
recipe is made). ``OneLineGroup`` prints every usage error as one line, ``error: ...``, exit 2.
"""

from __future__ import annotations

import ast
import json
import math
import os
import sys

import click

from storage.errors import UserError


class OptionValueError(UserError, click.BadParameter):
    """A value out of its option's range, said the project's way: ``--views must be >= 1, got 0``."""

    def format_message(self) -> str:
        return self.message


def _bounds(r) -> str:
    def num(x):
        return f"{x:g}" if isinstance(x, float) else str(x)

    parts = []
    if r.min is not None:
        parts.append(f"{'>' if r.min_open else '>='} {num(r.min)}")
    if r.max is not None:
        parts.append(f"{'<' if r.max_open else '<='} {num(r.max)}")
    return " and ".join(parts)


def _name(param) -> str:
    return max(param.opts, key=len) if param is not None and param.opts else "the value"


def _check_range(r, rv, value, param):
    lo_bad = r.min is not None and (rv <= r.min if r.min_open else rv < r.min)
    hi_bad = r.max is not None and (rv >= r.max if r.max_open else rv > r.max)
    if lo_bad or hi_bad:
        raise OptionValueError(f"{_name(param)} must be {_bounds(r)}, got {value}", param=param)
    return rv


class FiniteFloat(click.FloatRange):
    """A float in a range, and finite: click's FloatRange lets nan through every bound."""

    name = "float"

    def convert(self, value, param, ctx):
        rv = click.types.FloatParamType.convert(self, value, param, ctx)
        if not math.isfinite(rv):
            raise OptionValueError(f"{_name(param)} must be a finite number {_bounds(self)}, got {value}",
                                   param=param)
        return _check_range(self, rv, value, param)


def positive(hi: float | None = None) -> FiniteFloat:
    """x > 0 (and <= hi)."""
    return FiniteFloat(min=0.0, min_open=True, max=hi)


def non_negative(hi: float | None = None) -> FiniteFloat:
    return FiniteFloat(min=0.0, max=hi)


def unit_interval(hi_open: bool = False) -> FiniteFloat:
    """A probability or fraction: [0, 1] (or [0, 1))."""
    return FiniteFloat(min=0.0, max=1.0, max_open=hi_open)


class IntIn(click.IntRange):
    name = "integer"  # click's own says "'x' is not a valid integer range."

    def convert(self, value, param, ctx):
        rv = click.types.IntParamType.convert(self, value, param, ctx)
        return _check_range(self, rv, value, param)


def at_least(n: int, hi: int | None = None) -> IntIn:
    return IntIn(min=n, max=hi)


# Upper bounds where a larger value is a typo that would hang or overflow rather than run:
# epochs and views (DeiT: 300) make per-epoch tables and timm's scheduler overflows past 2**63;
# each DataLoader worker is a process.
MAX_EPOCHS = 1_000_000
MAX_WORKERS = 1024


def check_device(ctx, param, value: str | None) -> str | None:
    """auto, cpu, cuda or cuda:N, and a CUDA device only where one is visible: refused at parse time,
    not as torch's traceback from the first tensor moved there."""
    if value is None or value == "auto":
        return value
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise click.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda or cuda:N", ctx, param) from None
    if dev.type == "cpu":
        return value
    if dev.type != "cuda":
        raise click.BadParameter(f"{value!r}: this tool runs on auto, cpu, cuda or cuda:N", ctx, param)
    if not torch.cuda.is_available():
        raise click.BadParameter(f"{value!r}, but no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                                 "use --device cpu (or auto)", ctx, param)
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise click.BadParameter(f"{value!r}, but only {count} CUDA device(s) are visible (cuda:0 to "
                                 f"cuda:{count - 1}); pick one of them", ctx, param)
    return value


INTERRUPTED = 130  # the exit status shells give a process stopped by Ctrl-C (128 + SIGINT)


class OneLineGroup(click.Group):
    """click's usage errors as one line, ``error: ...`` with exit code 2 (no usage block)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            hint = ""
            plain_usage = not isinstance(e, click.BadParameter) or isinstance(e, click.MissingParameter)
            if isinstance(e, click.UsageError) and plain_usage and e.ctx is not None:
                hint = f" (see `{e.ctx.command_path} --help`)"
            click.echo(f"error: {' '.join(e.format_message().split())}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:  # Ctrl-C (click turns KeyboardInterrupt into Abort) or an aborted prompt
            click.echo("error: interrupted", err=True)
            sys.exit(INTERRUPTED)
        sys.exit(rv if isinstance(rv, int) else 0)


# Seeds key numpy's Philox generators and are stored in the store's JSON: a non-negative 63-bit int.
SEED = IntIn(min=0, max=2**63 - 1)


# ---- options shared by precompute and train, spelled as timm spells them ------------------------
WORKERS_CAP = 8  # beyond this the loader rarely renders faster, and each worker is a process with its own memory


def default_workers() -> int:
    """DataLoader workers for this machine: the CPUs this process may use, at most WORKERS_CAP. More
    workers than CPUs only make torch warn ("suggested max number of worker") and thrash."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity mask
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, WORKERS_CAP))


def workers_option(command):
    """``-j/--workers`` (timm's spelling), defaulting to this machine's CPUs."""
    return click.option("-j", "--workers", default=default_workers, type=IntIn(min=0, max=MAX_WORKERS),
                        show_default=f"{default_workers()}: this machine's CPUs, at most {WORKERS_CAP}",
                        help="DataLoader workers rendering views.")(command)


def batch_size_option(default: int, help: str | None = None):
    """``-b/--batch-size`` (timm's spelling)."""
    return click.option("-b", "--batch-size", default=default, show_default=True, type=IntIn(min=1), help=help)


def parse_model_kwargs(tokens, flag: str = "--model-kwargs") -> dict:
    """``--model-kwargs`` values: JSON objects (``'{"depth": 2}'``) and timm's ``key=value`` pairs, merged in
    order (a later key wins). A value is read as timm's ParseKwargs reads it (a Python literal: 2, 0.1, True,
    (4, 4)), else kept as the string (``act_layer=gelu``)."""
    out = {}
    for token in tokens:
        text = token.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise OptionValueError(f"{flag}: {text[:40]!r} is not JSON ({e.msg}); e.g. '{{\"depth\": 2}}' "
                                       "or depth=2") from None
            if not isinstance(value, dict):
                raise OptionValueError(f"{flag}: {text[:40]!r} must be a JSON object, e.g. '{{\"depth\": 2}}'")
            out.update(value)
            continue
        key, eq, value = text.partition("=")
        if not eq or not key.isidentifier():
            raise OptionValueError(f"{flag}: {text[:40]!r} is neither key=value nor a JSON object; "
                                   "e.g. depth=2 embed_dim=64, or '{\"depth\": 2}'")
        out[key] = _literal(value)
    return out


def _literal(text: str):
    """timm's ParseKwargs: ast.literal_eval, falling back to the plain string (no quoting on the command line)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


class GreedyOption(click.Option):
    """An option that takes every following word up to the next option, as argparse's nargs='*' does
    (timm: ``--model-kwargs depth=2 embed_dim=64``). Only for commands without positional arguments."""

    def add_to_parser(self, parser, ctx):
        super().add_to_parser(parser, ctx)
        for name in self.opts:
            option = parser._long_opt.get(name) or parser._short_opt.get(name)  # click's parser: no public hook
            option.process = self._eat_following(option.process)

    @staticmethod
    def _eat_following(process):
        def eat(value, state):
            process(value, state)
            while state.rargs and not state.rargs[0].startswith("-"):
                process(state.rargs.pop(0), state)
        return eat


def model_kwargs_option(what: str):
    """``--model-kwargs``: JSON or timm's key=value words, for timm.create_model of ``what``."""
    return click.option("--model-kwargs", "model_kwargs", cls=GreedyOption, multiple=True,
                        metavar="KEY=VALUE... | JSON",
                        callback=lambda ctx, param, value: parse_model_kwargs(value),
                        help=f"Passed to timm.create_model for the {what}: key=value words as timm takes them "
                             "(depth=2 embed_dim=64) or a JSON object; repeatable, later keys win.")
