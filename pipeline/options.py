"""Command-line value checks shared by every subcommand: ranges, finite numbers, devices.

A numeric option is checked by click when the command line is parsed, before any source is
indexed, any model built or any store created, so a bad value never costs work and never
leaves anything behind. Recipe values are checked in ``recipes.py`` (one place for every way a
recipe is made). ``OneLineGroup`` prints every usage error as one line, ``error: ...``, exit 2.

``opt`` is an option written as a config dataclass field's metadata; ``config_options`` makes the
click options of a command from those fields, and ``config_file_option`` adds ``--config FILE``.
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


def workers_opt() -> dict:
    """``-j/--workers`` (timm's spelling), defaulting to this machine's CPUs (the field's default_factory)."""
    return opt("DataLoader workers rendering views.", flags=("-j", "--workers"), type=IntIn(min=0, max=MAX_WORKERS),
               show_default=f"{default_workers()}: this machine's CPUs, at most {WORKERS_CAP}")


def batch_size_opt(help: str | None = None) -> dict:
    """``-b/--batch-size`` (timm's spelling)."""
    return opt(help, flags=("-b", "--batch-size"), type=IntIn(min=1))


SHARD_LAYOUTS = ("auto", "as-is", "shuffle")  # pipeline.sources.SHARD_LAYOUTS (checked equal by a test)


def shards_opt() -> dict:
    """--shards: how a source is cut into shards; precompute and train must agree."""
    return opt("Shard layout: shuffle re-cuts the source into seeded virtual shards of --shard-size (read by seeks); "
               "as-is keeps the tar or parquet files (an ImageFolder: folder order); auto re-cuts files that hold far "
               "fewer classes than random ones (an ImageFolder: shuffle).", type=click.Choice(SHARD_LAYOUTS))


def shard_size_opt() -> dict:
    return opt("Virtual shard size (ImageFolder, re-cut WebDataset or parquet).", type=IntIn(min=1))


def device_opt(help: str = "auto, cpu, cuda, cuda:N.") -> dict:
    return opt(help, callback=check_device)


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


def model_kwargs_opt(what: str) -> dict:
    """``--model-kwargs``: JSON or timm's key=value words, for timm.create_model of ``what``."""
    return opt(f"Passed to timm.create_model for the {what}: key=value words as timm takes them "
               "(depth=2 embed_dim=64) or a JSON object; repeatable, later keys win.",
               cls=GreedyOption, multiple=True, metavar="KEY=VALUE... | JSON",
               callback=lambda ctx, param, value: parse_model_kwargs(value))


# ---- one definition per option: a config dataclass's fields are its command's options ---------------
# A field carries its option in its metadata (``field(default=..., metadata=opt(...))``): help, type (the
# range, checked once, by click, whether the value came from the command line or from --config FILE),
# flags, metavar. The default is the field's own; ``config_options`` turns the fields into click options,
# so a default, a range or a help text is written once, in the config module, and cli.py only wires.
OPTION = "deit_lockstep.option"
NO_DEFAULT = object()  # the field's default, unless the command line needs its own "not given" (see opt)


def opt(help: str | None = None, *, flags: tuple[str, ...] = (), default=NO_DEFAULT, **click_kwargs) -> dict:
    """Field metadata making the field a command-line option. ``flags``: its spellings (else --field-name);
    ``default``: only where the command line's "not given" differs from the field's default (train's
    --out, which --output/--experiment may replace; --resume, whose flag form means True); the rest goes to
    click.option as is (type, metavar, show_default, callback, cls, multiple, is_flag...)."""
    return {OPTION: {"help": help, "flags": tuple(flags), "default": default, **click_kwargs}}


def option_fields(cls) -> list:
    """The fields of config dataclass ``cls`` that are options (a field without ``opt`` metadata, such as
    ``progress``, is set only by code)."""
    import dataclasses

    return [f for f in dataclasses.fields(cls) if OPTION in f.metadata]


def click_option_args(f) -> tuple[list[str], dict]:
    """The declarations and keyword arguments of click.option for option field ``f``."""
    import dataclasses

    spec = dict(f.metadata[OPTION])
    flags, default = spec.pop("flags") or ("--" + f.name.replace("_", "-"),), spec.pop("default")
    if default is NO_DEFAULT:
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory in (list, dict):  # a repeatable option (or --model-kwargs): none given
            default = None
        elif f.default_factory is not dataclasses.MISSING:  # click calls it too (e.g. default_workers)
            default = f.default_factory
        else:  # required, from the command line or from --config FILE
            spec.setdefault("required", True)
            default = None
    on_off = "/" in flags[-1]  # --ema/--no-ema
    if isinstance(default, bool) and not on_off:
        spec.setdefault("is_flag", True)
    spec.setdefault("show_default", default is not None and not spec.get("multiple")
                    and (on_off or not spec.get("is_flag")))
    if not spec.get("required"):  # click 8.3: an explicit default, even None, satisfies required=True
        spec["default"] = default
    return [*flags, f.name], spec


def config_options(cls, after: dict | None = None):
    """A decorator adding one click option per option field of ``cls``, in field order; ``after`` maps a
    field name to the command's own option decorators (not fields) listed right after that field's."""
    def decorate(command):
        for f in reversed(option_fields(cls)):  # click lists the last decorator first
            for extra in reversed((after or {}).get(f.name, ())):
                command = extra(command)
            decls, kwargs = click_option_args(f)
            command = click.option(*decls, **kwargs)(command)
        return command
    return decorate


def check_values(cfg) -> None:
    """Every option field of ``cfg`` through its option's type: for a config made in code, the same range
    the command line is parsed with (written once, in the field's metadata). One line, exit 2 in cli.py."""
    for f in option_fields(type(cfg)):
        kind, value = f.metadata[OPTION].get("type"), getattr(cfg, f.name)
        if kind is None or value is None:
            continue
        param = click.Option(click_option_args(f)[0])  # for the flag in the message
        for item in value if isinstance(value, list) else [value]:
            try:
                kind.convert(item, param, None)
            except click.BadParameter as e:
                raise OptionValueError(" ".join(e.format_message().split())) from None


def config_from(cls, kw: dict, **extra):
    """``cls`` from a command's parsed options: the option fields' values (a repeatable option's tuple
    as the field's list), plus ``extra`` fields that the command computed itself."""
    values = {f.name: list(kw[f.name]) if isinstance(kw[f.name], tuple) else kw[f.name] for f in option_fields(cls)}
    return cls(**{**values, **extra})


# ---- --config FILE: any option's value from a YAML or JSON file, the command line wins (as timm's --config) ----
def config_file_option(command):
    """``--config FILE``: its keys (option names, dash or underscore, or the config field's name) become the
    command's defaults (click's default_map), so the command line wins and a required option may come
    from the file. Every value is checked here, by the option's own type and callback, so a bad one is
    one line naming the key and the file."""
    return click.option("--config", "config_file", default=None, metavar="FILE", is_eager=True, expose_value=False,
                        type=click.Path(exists=True, dir_okay=False), callback=_apply_config_file,
                        help="YAML or JSON file of option values, keyed by option name (views: 30, "
                             "model-kwargs: {depth: 2}); the command line wins.")(command)


def read_config_file(path: str) -> dict:
    """The mapping in a YAML or JSON file (JSON is YAML too; an empty file is {})."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise OptionValueError(f"--config {path} is neither YAML nor JSON ({' '.join(str(e).split())[:120]}); "
                               "write one `option: value` per line") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OptionValueError(f"--config {path} holds a {type(data).__name__}, not a mapping of option names "
                               "to values (views: 30)")
    return data


def _apply_config_file(ctx, param, path):
    if path is None:
        return None
    options = {}
    for p in ctx.command.params:
        if isinstance(p, click.Option) and p is not param and p.name != "help":
            for name in (p.name, *(o.lstrip("-") for o in p.opts if o.startswith("--"))):
                options[name.replace("-", "_")] = p
    found = {}
    for key, value in read_config_file(path).items():
        p = options.get(str(key).replace("-", "_"))
        if p is None:
            raise OptionValueError(f"--config {path}: {key!r} is not an option of `{ctx.command_path}` "
                                   f"(see --help); keys are option names such as {_some_keys(options)}")
        if p.name in found:
            raise OptionValueError(f"--config {path}: {key!r} sets {_flag(p)} a second time ({found[p.name]!r}): "
                                   "keep one of them")
        found[p.name] = key
        raw = _config_value(p, value, key, path)
        try:  # the option's own type and callback: the one place its range is checked
            p.process_value(ctx, raw)
        except click.BadParameter as e:
            raise OptionValueError(f"--config {path}: {key}: {' '.join(e.format_message().split())}") from None
        ctx.default_map = {**(ctx.default_map or {}), p.name: raw}
    return path


def _flag(p) -> str:
    return max(p.opts, key=len)


def _some_keys(options: dict) -> str:
    return ", ".join(sorted({_flag(p).lstrip("-") for p in options.values()})[:4]) + "..."


def _config_value(p, value, key, path):
    """A file's value as the command line would give it, refusing what the command line could not
    spell: a list for a single value, 2.5 for an integer, "yes" for a flag."""
    def bad(expected: str):
        raise OptionValueError(f"--config {path}: {key}: expected {expected}, got {value!r}")

    if p.multiple:
        if isinstance(p, GreedyOption) and isinstance(value, dict):  # --model-kwargs: {depth: 2}
            return (json.dumps(value),)
        items = value if isinstance(value, list) else [value]
        return tuple(_scalar(p, v, bad) for v in items)
    if isinstance(value, (list, dict)):
        bad(f"one value for {_flag(p)}")
    return _scalar(p, value, bad)


def _scalar(p, value, bad):
    if p.is_flag or p.is_bool_flag:
        return value if isinstance(value, bool) else bad("true or false")
    kind = p.type
    if isinstance(kind, click.types.IntParamType):
        return value if isinstance(value, int) and not isinstance(value, bool) else bad("an integer")
    if isinstance(kind, click.types.FloatParamType):
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else bad("a number")
    return value if isinstance(value, str) else bad("a string (quote it)")
