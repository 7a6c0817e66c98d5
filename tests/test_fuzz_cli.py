"""Property-based fuzzing of every subcommand's options and every recipe key (hypothesis).

The property, for valid, boundary and junk values alike: the command ends with exit 0 or with one
line ``error: ...`` and exit 2 (never a traceback), a refused command leaves no store behind, and a
recipe that is accepted round-trips through the store's JSON and renders finite views. Where an
option's range is known the test is also an oracle: a value out of range must be refused, and a
run whose values are all in range must be accepted.

Fast by construction: commands run in-process (click's CliRunner, standalone mode: an exception
that escapes is a traceback), on tiny sources made here. The expensive commands (precompute,
train, verify) are stopped where the work would begin, by replacing the first expensive call
with one that raises ``ReachedWork``: everything before it (parsing, checks, recipe, source
index, store checks, and for train the student, optimizer and scheduler) runs for real. A few
valid examples then run for real, end to end.

CI profile: derandomized (the same inputs on every run), no deadline, a fixed number of
examples per test (see EXAMPLES); ``HYPOTHESIS_PROFILE=dev`` draws fresh, more inputs.
"""

import json
import math
import os

import numpy as np
import pytest
import torch
from cli_support import escaped, invoke
from conftest import make_image, write_wds
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from pipeline.recipes import MAX_REPEATS, Recipe, RecipeError, create_recipe
from pipeline.views import ViewRenderer

settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                 HealthCheck.filter_too_much])
settings.register_profile("dev", parent=settings.get_profile("ci"), derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# Examples per test in CI; the report prints their sum (tests/test_fuzz_cli.py::EXAMPLES).
EXAMPLES = {"precompute": 300, "recipe": 400, "train": 150, "verify": 100, "inspect": 100, "demo": 30, "real": 4}
TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
MODEL = "deit_tiny_distilled_patch16_224"


class ReachedWork(Exception):
    """Raised where a command's expensive work would begin: every check before it passed."""


def reached_work(*_a, **_k):
    raise ReachedWork


# ---- values: valid, boundary, junk -----------------------------------------------------------
JUNK = st.sampled_from(["", " ", "x", "1.5.2", "--", "1e", "0x10", "None", "[]", "1,2", "⅓", "--help", "true"])
INTS = st.one_of(st.integers(-3, 40), st.sampled_from([2**31, 2**63 - 1, 2**63, -2**63, 10**30]))
FLOATS = st.one_of(st.floats(-2, 2), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, -0.0, 1.0, 1e-300, 5e-324, 1e300, math.nan, math.inf, -math.inf]))


def text_of(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def option_value(kind: str):
    """(text given on the command line, the number it means or None for junk)."""
    numbers = INTS if kind == "int" else st.one_of(FLOATS, INTS)
    return st.one_of(numbers.map(lambda v: (text_of(v), v)), JUNK.map(lambda j: (j, None)))


def in_range(value, lo, hi, lo_open=False, hi_open=False, kind="int") -> bool:
    if value is None or (kind == "int" and not isinstance(value, int)):
        return False
    v = float(value) if kind == "float" else value
    if kind == "float" and not math.isfinite(v):
        return False
    return (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))


def ranged(kind, lo, hi=None, lo_open=False, hi_open=False):
    return lambda v: in_range(v, lo, hi, lo_open, hi_open, kind)


def fuzz_options(table: dict):
    """A few options of `table` (name -> (kind, in_range or None)) with drawn values."""
    names = sorted(table)
    return st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True).flatmap(
        lambda chosen: st.tuples(*[st.tuples(st.just(n), option_value(table[n][0])) for n in chosen]))


def flags_of(drawn) -> list[str]:
    out = []
    for name, (text, _) in drawn:
        out += [f"{name}={text}"]  # --opt=VALUE: a value starting with '-' stays a value
    return out


def judge(drawn, table) -> bool | None:
    """True if every drawn value is in range, False if one is not, None if an option has no oracle."""
    verdicts = []
    for name, (_, value) in drawn:
        check = table[name][1]
        verdicts.append(None if check is None else check(value))
    if False in verdicts:
        return False
    return None if None in verdicts else True


def outcome(res) -> str:
    """'work' (reached the expensive part), 'ok' (exit 0) or 'refused' (one line, exit 2); else fail."""
    exc = escaped(res)
    event(f"outcome: {'work' if isinstance(exc, ReachedWork) else res.exit_code}")
    if isinstance(exc, ReachedWork):
        return "work"
    assert exc is None, f"traceback: {type(exc).__name__}: {exc}"
    assert "Traceback" not in res.output
    if res.exit_code == 0:
        return "ok"
    lines = [ln for ln in res.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    assert res.exit_code == 2 and lines and lines[-1].startswith("error: "), (res.exit_code, res.stderr[-500:])
    assert sum(ln.startswith("error:") for ln in lines) == 1, res.stderr[-500:]
    return "refused"


# ---- tiny sources and a store ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pipeline.stage1.precompute import PrecomputeConfig, run_precompute

    root = tmp_path_factory.mktemp("fuzz")
    data = write_wds(root / "wds", n=8, per_shard=8)
    torch.manual_seed(0)
    import timm

    weights = str(root / "teacher.pth")
    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), weights)
    store = str(root / "store")
    run_precompute(PrecomputeConfig(data=data, out=store, teacher="resnet10t", teacher_weights=weights,
                                    model_kwargs={"num_classes": 3}, views=1, views_per_unit=1, topk=3,
                                    input_size=32, batch_size=8, workers=0, overrides=["repeats=1"],
                                    progress=False))
    return {"root": root, "data": data, "weights": weights, "store": store}


def fresh(tiny, name: str) -> str:
    """A path that does not exist yet (hypothesis calls the test many times with one tmp dir)."""
    fresh.n = getattr(fresh, "n", 0) + 1
    return str(tiny["root"] / f"{name}{fresh.n}")


# ---- precompute ------------------------------------------------------------------------------
PRECOMPUTE = {
    "--views": ("int", ranged("int", 1, 10**6)), "--topk": ("int", ranged("int", 1, 3)),  # the source has 3 classes
    "--seed": ("int", ranged("int", 0, 2**63 - 1)), "--input-size": ("int", ranged("int", 8, 4096)),
    "--repeats": ("int", ranged("int", 1, MAX_REPEATS)), "--shard-size": ("int", ranged("int", 1)),
    "--views-per-unit": ("int", ranged("int", 1)), "--batch-size": ("int", ranged("int", 1)),
    "--workers": ("int", ranged("int", 0, 1024)), "--rank": ("int", None), "--world-size": ("int", None),
    "--tau": ("float", ranged("float", 0, lo_open=True)),
    "--lease-ttl": ("float", ranged("float", 0, lo_open=True)),
}


def precompute_args(tiny, out, *extra, input_size: bool = True):
    return ["precompute", "--data", tiny["data"], "--out", out, "--teacher", "resnet10t", "--teacher-weights",
            tiny["weights"], "--model-kwargs", '{"num_classes": 3}', "--views", "1", "--views-per-unit", "1",
            "--topk", "3", *(["--input-size", "32"] if input_size else []), "--batch-size", "8", "--workers", "0",
            *extra]


@settings(max_examples=EXAMPLES["precompute"])
@given(drawn=fuzz_options(PRECOMPUTE))
def test_precompute_options(tiny, monkeypatch, drawn):
    monkeypatch.setattr("pipeline.stage1.precompute.create_teacher", reached_work)
    out = fresh(tiny, "p")
    got = outcome(invoke(*precompute_args(tiny, out, *flags_of(drawn))))
    assert got in ("work", "refused")
    assert not os.path.exists(out), "a refused or stopped precompute created its store"
    expect = judge(drawn, PRECOMPUTE)
    if expect is not None:
        assert (got == "work") == expect, (drawn, got)


# ---- recipe keys, through --set ---------------------------------------------------------------
def recipe_value(key: str, default):
    """Values for one recipe key: typed numbers, pairs/triples, names, timm strings, and junk."""
    if key == "interpolation":
        return st.sampled_from(["bicubic", "bilinear", "nearest", "lanczos", "random", "foo", "", "BICUBIC"])
    if key == "auto_augment":
        return st.one_of(st.sampled_from(["rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "rand-n0", "rand-n15",
                                          "rand-n16", "rand-m30-mmax30", "rand-mstd200", "rand-p0.5", "none",
                                          "off", "", "garbage", "rand-x1", "rand-m9-tweights", "augmix-m5",
                                          "original", "rand-m-1", "rand-n99"]), JUNK)
    if isinstance(default, list):
        parts = st.lists(FLOATS.map(text_of), min_size=len(default) - 1, max_size=len(default) + 1)
        return st.one_of(parts.map(",".join), parts.map(lambda p: "[" + ",".join(p) + "]"), JUNK)
    kind = "int" if isinstance(default, int) else "float"
    likely = st.integers(1, 4).map(str) if kind == "int" else st.floats(0, 1).map(text_of)  # mostly in range
    return st.one_of(likely, option_value(kind).map(lambda tv: tv[0]))


RECIPE_KEYS = [k for k in create_recipe("deit").to_dict() if k != "name"]


@st.composite
def recipe_overrides(draw):
    base = create_recipe("deit").to_dict()
    keys = draw(st.lists(st.sampled_from(RECIPE_KEYS), min_size=1, max_size=4, unique=True))
    over = [f"{k}={draw(recipe_value(k, base[k]))}" for k in keys]
    if "input_size" not in keys and draw(st.booleans()):  # mostly 32 px views: keeps rendering cheap
        over.append("input_size=32")
    return over


@settings(max_examples=EXAMPLES["recipe"])
@given(preset=st.sampled_from(["deit", "crop-flip"]), overrides=recipe_overrides())
def test_recipe_values_through_precompute(tiny, monkeypatch, preset, overrides):
    monkeypatch.setattr("pipeline.stage1.precompute.create_teacher", reached_work)
    out = fresh(tiny, "r")
    flags = [a for o in overrides for a in ("--set", o)]
    got = outcome(invoke(*precompute_args(tiny, out, "--recipe", preset, *flags, input_size=False)))
    assert got in ("work", "refused") and not os.path.exists(out)
    try:
        recipe = create_recipe(preset, overrides)
    except RecipeError:
        assert got == "refused"
        return
    assert got == "work", overrides
    # what the store would hold reads back as the same recipe, as strict JSON
    stored = json.loads(json.dumps(recipe.to_dict(), allow_nan=False))
    assert Recipe.from_dict(stored) == recipe
    # and its views render: one mixing pair of a small image, finite, the recipe's size
    if recipe.input_size <= 512:
        renderer = ViewRenderer(recipe)
        img_a, img_b = make_image(0, 1), make_image(1, 2)
        for sv in renderer.plan(0, 0, 0, 2)[:1]:
            for x in renderer.render_pair(0, sv, img_a, img_b):
                assert x.shape == (3, recipe.input_size, recipe.input_size) and torch.isfinite(x).all()


@settings(max_examples=EXAMPLES["real"])
@given(preset=st.sampled_from(["deit", "crop-flip"]), overrides=recipe_overrides())
def test_accepted_recipes_make_stores_that_later_runs_read_back(tiny, preset, overrides):
    """A few accepted recipes, for real: the store is made, the same command resumes it (nothing
    refused as "made with other settings"), and train reads back the same recipe and probe views."""
    from student.data import open_train_data

    overrides = [*overrides, "input_size=32"]  # the last one wins: small views
    try:
        recipe = create_recipe(preset, overrides)
    except RecipeError:
        assume(False)
    out = fresh(tiny, "real")
    args = precompute_args(tiny, out, "--recipe", preset, *[a for o in overrides for a in ("--set", o)],
                           input_size=False)
    assert outcome(invoke(*args)) == "ok"
    again = invoke(*args)
    assert outcome(again) == "ok" and "labelled 0 units (0 views)" in again.output
    assert "1 unit was already complete" in again.output
    assert open_train_data(tiny["data"], labels=out).recipe == recipe  # probes re-render identically too


# ---- train -------------------------------------------------------------------------------------
TRAIN = {
    "--alpha": ("float", ranged("float", 0, 1)), "--tau": ("float", ranged("float", 0, None, lo_open=True)),
    "--epochs": ("int", ranged("int", 1, 10**6)), "--lr": ("float", ranged("float", 0, None, lo_open=True)),
    "--min-lr": ("float", ranged("float", 0)), "--warmup-lr": ("float", ranged("float", 0)),
    "--warmup-epochs": ("int", ranged("int", 0, 10**6)), "--weight-decay": ("float", ranged("float", 0)),
    "--drop-path": ("float", ranged("float", 0, 1, hi_open=True)),
    "--clip-grad": ("float", ranged("float", 0, None, lo_open=True)),
    "--model-ema-decay": ("float", ranged("float", 0, 1)), "--eval-batch-size": ("int", ranged("int", 1)),
    "--workers": ("int", ranged("int", 0, 1024)), "--log-every": ("int", ranged("int", 1)),
    "--max-steps-per-epoch": ("int", ranged("int", 1)), "--stop-after-epochs": ("int", ranged("int", 1, 10**6)),
    "--shard-size": ("int", ranged("int", 1)),
    "--batch-size": ("int", ranged("int", 1, 8)),  # the source has 8 samples: a larger global batch is refused
    # with --labels these must match the store (input 32, repeats 1, seed 0): no oracle, the property only
    "--seed": ("int", None), "--input-size": ("int", None), "--repeats": ("int", None),
}


def train_args(tiny, out, *extra):
    return ["train", "--data", tiny["data"], "--labels", tiny["store"], "--out", out, "--model", MODEL,
            "--model-kwargs", json.dumps(TINY), "--epochs", "1", "--batch-size", "4", "--workers", "0",
            "--distillation", "soft", *extra]


@settings(max_examples=EXAMPLES["train"])
@given(drawn=fuzz_options(TRAIN))
def test_train_options(tiny, monkeypatch, drawn):
    monkeypatch.setattr("student.train.Run", reached_work)  # after the student, optimizer, scheduler, EMA
    out = fresh(tiny, "t")
    got = outcome(invoke(*train_args(tiny, out, *flags_of(drawn))))
    assert got in ("work", "refused") and not os.path.exists(os.path.join(out, "checkpoint.pth"))
    expect = judge(drawn, TRAIN)
    if expect is not None:
        assert (got == "work") == expect, (drawn, got)


@settings(max_examples=EXAMPLES["real"])
@given(lr=st.floats(1e-6, 1e-2), clip=st.one_of(st.none(), st.floats(1e-3, 10)), alpha=st.floats(0, 1),
       tau=st.floats(0.1, 10), drop=st.floats(0, 0.99), decay=st.floats(0, 1))
def test_train_valid_values_train_for_real(tiny, lr, clip, alpha, tau, drop, decay):
    """A few valid draws run one real step: exit 0 and a finite loss in summary.json."""
    out = fresh(tiny, "real")
    flags = ["--lr", repr(lr), "--alpha", repr(alpha), "--tau", repr(tau), "--drop-path", repr(drop),
             "--model-ema-decay", repr(decay), "--max-steps-per-epoch", "1", "--warmup-epochs", "0"]
    flags += ["--clip-grad", repr(clip)] if clip is not None else []
    assert outcome(invoke(*train_args(tiny, out, *flags))) == "ok"
    with open(os.path.join(out, "summary.json")) as f:
        assert np.isfinite(json.load(f)["first_step_loss"])


# ---- verify, inspect, demo ---------------------------------------------------------------------
VERIFY = {"--n": ("int", ranged("int", 0)), "--seed": ("int", ranged("int", 0, 2**63 - 1)),
          "--batch-size": ("int", ranged("int", 1)), "--atol": ("float", ranged("float", 0)),
          "--tau": ("float", ranged("float", 0, lo_open=True))}


@settings(max_examples=EXAMPLES["verify"])
@given(drawn=fuzz_options(VERIFY), device=st.sampled_from([None, "cpu", "auto", "bogus", "cuda:99", "", "meta"]))
def test_verify_options(tiny, monkeypatch, drawn, device):
    monkeypatch.setattr("pipeline.tools.verify._teacher_for", reached_work)
    extra = [] if device is None else [f"--device={device}"]
    got = outcome(invoke("verify", tiny["store"], "--data", tiny["data"], *flags_of(drawn), *extra))
    device_ok = device in (None, "cpu", "auto")
    expect = judge(drawn, VERIFY)
    if expect is not None:
        assert (got == "work") == (expect and device_ok), (drawn, device, got)


INSPECT = {"--view": ("int", ranged("int", 0, 0)),  # the store has one view
           "--count": ("int", ranged("int", 1)), "--sample-blocks": ("int", ranged("int", 1))}


@settings(max_examples=EXAMPLES["inspect"])
@given(drawn=fuzz_options(INSPECT),
       action=st.sampled_from([[], ["--json"], ["--sample", "s00003"], ["--sample", "3"], ["--sample", "nope"],
                               ["--sample", "-1"], ["--render", "SHEET.png"], ["--render", "SHEET.xyz"],
                               ["--render", "SHEET"], ["--export", "T.parquet"], ["--sample", "s00001", "--json"]]))
def test_inspect_options(tiny, drawn, action):
    """inspect runs for real (it is cheap): exit 0 or one line; a refused render or export writes nothing."""
    target = fresh(tiny, "i")
    action = [a.replace("SHEET", target).replace("T.parquet", target + ".parquet") for a in action]
    got = outcome(invoke("inspect", tiny["store"], *flags_of(drawn), *action))
    assert got in ("ok", "refused")
    if got == "refused":
        assert not any(os.path.exists(p) for p in (target + ".png", target + ".xyz", target, target + ".parquet"))
    if judge(drawn, INSPECT) is False and any(a in action for a in ("--sample", "--render")):
        assert got == "refused"  # a bad --view/--count where they are used (the summary ignores them)


@settings(max_examples=EXAMPLES["demo"])
@given(device=st.one_of(st.sampled_from(["auto", "cpu", "cuda", "cuda:0", "bogus", "", "cpu:0", "mps"]), JUNK))
def test_demo_device(monkeypatch, device):
    monkeypatch.setattr("demo.run_demo", reached_work)
    got = outcome(invoke("demo", f"--device={device}"))
    cpu_like = device in ("auto", "cpu", "cpu:0") or (device.startswith("cuda") and torch.cuda.is_available())
    assert got == ("work" if cpu_like else "refused"), (device, got)
