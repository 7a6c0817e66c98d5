"""One definition per option: PrecomputeConfig's and TrainConfig's fields are the options of
`precompute` and `train` (defaults, types, ranges, help written once), and --config FILE (YAML or
JSON) fills any of them, the command line winning."""

import dataclasses
import json
import re

import click
import pytest
from cli_support import invoke, one_line_error
from click.testing import CliRunner

import cli
import pipeline.stage1.precompute as precompute_module
import student.train as train_module
from pipeline import sources
from pipeline.options import NO_DEFAULT, OPTION, SHARD_LAYOUTS, default_workers, option_fields
from pipeline.stage1.config import PrecomputeConfig
from student import losses
from student.config import KD_REDUCTIONS, MODES, TrainConfig

# The options a command has beyond its config's fields (it turns them into fields itself), and the
# fields set by code only.
COMMANDS = {"precompute": (PrecomputeConfig, {"repeats", "config_file"}),
            "train": (TrainConfig, {"output", "experiment", "config_file"})}
CODE_ONLY = {"progress"}


def options(command: str) -> list[click.Option]:
    return [p for p in cli.main.commands[command].params if p.name != "help"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_field_is_exactly_one_option_and_back(command):
    cls, extra = COMMANDS[command]
    names = [p.name for p in options(command)]
    assert len(names) == len(set(names)), names
    fields = {f.name for f in dataclasses.fields(cls)}
    assert {f.name for f in option_fields(cls)} == fields - CODE_ONLY
    assert set(names) == fields - CODE_ONLY | extra
    assert not any(OPTION in f.metadata for f in dataclasses.fields(cls) if f.name in CODE_ONLY)


def field_default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def shown_default(p: click.Option, ctx) -> str | None:
    """What `--help` prints as p's default, or None."""
    found = re.search(r"\[default: ([^;\]]+)[;\]]", " ".join(p.get_help_record(ctx)[1].split()))
    return found and found.group(1)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_the_dataclass_defaults(command):
    cls, _ = COMMANDS[command]
    res = CliRunner().invoke(cli.main, [command, "--help"])
    assert res.exit_code == 0, res.output
    ctx = click.Context(cli.main.commands[command])
    by_name = {p.name: p for p in options(command)}
    shown = 0
    for f in option_fields(cls):
        p, default = by_name[f.name], field_default(f)
        assert p.help, f.name
        text = shown_default(p, ctx)
        if f.name == "workers":  # a callable default: this machine's CPUs, said in words
            assert p.default is default_workers and text.startswith(f"({default_workers()}: this machine's CPUs")
        elif p.is_bool_flag and p.secondary_opts:  # --ema/--no-ema: the help names the one in force
            assert p.default is default and text == (p.opts if default else p.secondary_opts)[0][2:]
            shown += 1
        elif p.show_default is True:
            assert p.default == default and text == str(default), (f.name, default, text)
            shown += 1
        elif f.metadata[OPTION]["default"] is not NO_DEFAULT:  # train's --out (or --output) and --resume [CKPT]
            assert command == "train" and f.name in ("out", "resume")
            assert p.default is None and default in (dataclasses.MISSING, False)
        else:  # required, a flag (False), a repeatable option, or None (the help says what None means)
            assert p.required == (default is dataclasses.MISSING), f.name
            assert default in (dataclasses.MISSING, None, False, [], {}), (f.name, default)
            assert p.required or p.default in (None, False) and (text is None or default is None), f.name
    assert shown >= 10


def test_one_tuple_of_modes_shard_layouts():
    assert losses.MODES is MODES and losses.KD_REDUCTIONS is KD_REDUCTIONS
    assert train_module.TrainConfig is TrainConfig and precompute_module.PrecomputeConfig is PrecomputeConfig
    assert tuple(sources.SHARD_LAYOUTS) == SHARD_LAYOUTS


@pytest.fixture
def captured(monkeypatch):
    """The config each command would run with (the run itself replaced: it returns None)."""
    got = {}
    monkeypatch.setattr(precompute_module, "run_precompute", lambda cfg: got.setdefault("cfg", cfg) and None)
    monkeypatch.setattr(train_module, "train", lambda cfg: got.setdefault("cfg", cfg) and None)
    return got


def write(path, text):
    path.write_text(text)
    return str(path)


def test_yaml_config_fills_precompute_options_and_the_command_line_wins(tmp_path, captured):
    path = write(tmp_path / "p.yaml", "data: SRC\nout: STORE\nteacher: resnet10t\nviews: 7\ntopk: 3\n"
                                      "tau: [1.5, 3]\nset: [mixup=0.5]\nformat: zarr\nclaim: false\n"
                                      "model-kwargs: {num_classes: 4}\nshard_size: 16\nrepeats: 2\nworkers: 0\n")
    res = invoke("precompute", "--config", path, "--views", "9", "--out", "OTHER")
    assert res.exit_code == 0, res.output
    cfg = captured["cfg"]
    assert (cfg.data, cfg.out, cfg.teacher, cfg.views, cfg.topk) == ("SRC", "OTHER", "resnet10t", 9, 3)
    assert cfg.taus == [1.5, 3.0] and cfg.overrides == ["mixup=0.5", "repeats=2"] and cfg.claim is False
    assert cfg.model_kwargs == {"num_classes": 4} and cfg.shard_size == 16 and cfg.workers == 0
    assert (cfg.batch_size, cfg.recipe, cfg.lease_ttl) == (256, "deit", 120.0)  # the rest: the field defaults


def test_json_config_fills_train_options_and_the_command_line_wins(tmp_path, captured):
    path = write(tmp_path / "t.json", json.dumps({
        "data": "SRC", "out": str(tmp_path / "run"), "labels": "STORE", "distillation": "soft", "tau": 3,
        "alpha": 0.1, "ema": False, "model_kwargs": ["depth=2", '{"embed_dim": 64}'], "epochs": 4,
        "lr": 1e-3, "set": ["mixup=0"], "workers": 0}))
    res = invoke("train", "--config", path, "--epochs", "5", "--ema", "--model-kwargs", "depth=3")
    assert res.exit_code == 0, res.output
    cfg = captured["cfg"]
    assert (cfg.data, cfg.labels, cfg.distillation, cfg.tau, cfg.alpha, cfg.lr) == ("SRC", "STORE", "soft", 3.0,
                                                                                     0.1, 1e-3)
    assert cfg.epochs == 5 and cfg.ema is True and cfg.model_kwargs == {"depth": 3}  # the command line's
    assert cfg.out == str(tmp_path / "run") and cfg.resume is False and cfg.overrides == ["mixup=0"]
    assert cfg.batch_size == 64 and cfg.kd_reduction == "batchmean"


def test_a_config_value_counts_as_set_for_finetune_defaults(tmp_path, captured):
    path = write(tmp_path / "t.yaml", "epochs: 12\n")
    res = invoke("train", "--config", path, "--data", "SRC", "--out", tmp_path / "r", "--finetune", "CKPT",
                 "--workers", "0")
    assert res.exit_code == 0, res.output
    cfg = captured["cfg"]
    assert cfg.epochs == 12 and cfg.weight_decay == 1e-8  # the file's value kept; the others: DeiT's fine-tune


@pytest.mark.parametrize("text,fragments", [
    ("bogus: 1\n", ["'bogus' is not an option of", "precompute` (see --help)"]),
    ("config: other.yaml\n", ["'config' is not an option"]),
    ("views: 0\n", ["views: --views must be >= 1"]),
    ("views: 2.5\n", ["views: expected an integer, got 2.5"]),
    ("views: [1, 2]\n", ["views: expected one value for --views"]),
    ("hard: 'yes'\n", ["hard: expected true or false"]),
    ("tau: [1, -1]\n", ["tau: --tau must be > 0, got -1"]),
    ("teacher: 3\n", ["teacher: expected a string (quote it), got 3"]),
    ("format: floppy\n", ["format:", "floppy"]),
    ("batch_size: 8\nbatch-size: 9\n", ["'batch-size' sets --batch-size a second time ('batch_size')"]),
    ("- views\n", ["holds a list, not a mapping"]),
    ("views: [\n", ["is neither YAML nor JSON"]),
])
def test_a_bad_config_is_one_line_naming_the_key_and_the_file(tmp_path, captured, text, fragments):
    path = write(tmp_path / "bad.yaml", text)
    teacher = () if "teacher" in text else ("--teacher", "t")
    res = invoke("precompute", "--config", path, "--data", "SRC", "--out", "STORE", *teacher)
    one_line_error(res, f"--config {path}", *fragments)
    assert "cfg" not in captured


def test_required_options_may_come_from_the_file_only(tmp_path, captured):
    res = invoke("precompute", "--config", write(tmp_path / "p.json", '{"data": "SRC", "out": "S"}'))
    one_line_error(res, "--teacher")  # still required: the file did not give it
    res = invoke("train", "--config", write(tmp_path / "e.yaml", ""), "--out", tmp_path / "r")
    one_line_error(res, "--data")


def test_verify_takes_a_config_too(tmp_path):
    path = write(tmp_path / "v.yaml", "n: -1\n")
    res = invoke("verify", "STORE", "--config", path, "--data", "SRC")
    one_line_error(res, f"--config {path}: n: --n must be >= 0")
    path = write(tmp_path / "w.yaml", "data: SRC\nfull: true\n")
    one_line_error(invoke("verify", str(tmp_path / "nowhere"), "--config", path), "nowhere")  # --data came from it
