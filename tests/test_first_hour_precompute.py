"""Issue 24, precompute's side: a new user never gets a useless store silently.

A teacher without weights is refused (unless asked for on purpose); a teacher that is one of our train
checkpoints sets the view size; the run says what it is about to do before it starts; --join processes
report who did what and end their bar where the store is; a layout that differs from the store's is named
as such (train and precompute agree on what --shards auto means for a store); --tau's help says what a
tau costs.
"""

import re

import pytest
import torch
from cli_support import invoke, one_line_error
from conftest import CLASSES, encode, make_image, write_wds

import pipeline.stage1.index_once as index_once
import pipeline.stage1.labelling as lab
from pipeline.sources import write_wds_shards
from pipeline.stage1.precompute import PrecomputeConfig, run_precompute
from pipeline.stage1.teacher import TeacherError
from storage import open_store
from student.data import open_train_data
from student.errors import TrainError

TEACHER = "test_resnet"  # timm's tiny test ConvNet: fast on CPU at any size
SMALL = ["--views", "2", "--views-per-unit", "1", "--topk", "3", "--batch-size", "8", "--workers", "0",
         "--device", "cpu"]


@pytest.fixture
def data(tmp_path):
    """16 samples in 2 tars, classes interleaved (not class-skewed: --shards auto keeps the tars)."""
    return write_wds(tmp_path / "wds", n=16, per_shard=8)


def _model():
    import timm

    torch.manual_seed(0)
    return timm.create_model(TEACHER, num_classes=len(CLASSES))


@pytest.fixture(scope="module")
def bare_teacher(tmp_path_factory):
    """A bare state_dict of a 3-class teacher (no recipe: it labels at its architecture's default size)."""
    path = tmp_path_factory.mktemp("bare") / "teacher.pth"
    torch.save(_model().state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def train_checkpoint_32(tmp_path_factory):
    """A `cli.py train` checkpoint of a 3-class teacher trained on 32 px views (its config records them)."""
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    torch.save({"model": _model().state_dict(), "ema": None, "epoch": 1,
                "config": {"recipe": None, "overrides": [], "input_size": 32, "labels": None},
                "identity": {"source": "x", "store": None}}, path)
    return str(path)


def precompute(data, out, weights, *extra):
    return invoke("precompute", "--data", data, "--out", out, "--teacher", TEACHER, "--teacher-weights", weights,
                  *SMALL, *extra)


def banner(res) -> str:
    """The start banner: stderr from its first line up to the progress bar."""
    err = res.stderr
    return re.split(r"[\r\n]+precompute:", err[err.index("precompute: teacher "):], maxsplit=1)[0]


# ---- 1. a teacher without weights -------------------------------------------------------------------
@pytest.mark.parametrize("extra", [[], ["--model-kwargs", '{"num_classes": 3}']],
                         ids=["bare-name", "following-the-class-count-hint"])
def test_a_teacher_without_weights_is_refused_in_one_line(tmp_path, data, extra):
    """Before: a bare name said "has 1000 classes ... (or set num_classes in --model-kwargs)", and following
    that hint built a whole store from a random teacher, exit 0."""
    out = tmp_path / "store"
    res = invoke("precompute", "--data", data, "--out", out, "--teacher", "resnet10t", *extra, *SMALL,
                 "--input-size", "32")
    one_line_error(res, "teacher resnet10t has no weights", "--teacher-weights FILE", "resnet10t.c3_in1k",
                   "--random-teacher")
    assert not out.exists(), "nothing written"


def test_the_refusal_reads_no_source_and_builds_or_fetches_nothing(tmp_path, data, monkeypatch):
    """It comes first: a new store's indexing reads the whole source, and building may reach the hub."""
    import huggingface_hub
    import timm

    def must_not_run(*a, **kw):
        raise AssertionError("reached past the refusal")

    monkeypatch.setattr(index_once, "index_source", must_not_run)
    monkeypatch.setattr(timm, "create_model", must_not_run)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", must_not_run)
    with pytest.raises(TeacherError, match="--random-teacher"):
        run_precompute(PrecomputeConfig(data=data, out=str(tmp_path / "s"), teacher="resnet10t",
                                        model_kwargs={"num_classes": 3}, progress=False))


def test_a_random_teacher_is_an_explicit_opt_in_that_the_banner_repeats(tmp_path, data):
    res = invoke("precompute", "--data", data, "--out", tmp_path / "s", "--teacher", TEACHER, "--random-teacher",
                 "--model-kwargs", '{"num_classes": 3}', "--input-size", "32", *SMALL)
    assert res.exit_code == 0, res.output
    assert "RANDOM weights (--random-teacher): its labels are noise" in banner(res)


# ---- 2. the view size of a teacher trained by `cli.py train` --------------------------------------------
def test_a_train_checkpoint_teacher_sets_the_view_size(tmp_path, data, train_checkpoint_32):
    """Before: views rendered at the recipe's 224 px and resized back to the teacher's 32 px; only
    `inspect` showed it, and every student of the store trained at 224."""
    res = precompute(data, tmp_path / "s", train_checkpoint_32)
    assert res.exit_code == 0, res.output
    assert open_store(tmp_path / "s").spec.recipe["input_size"] == 32
    text = banner(res)
    assert "2 per sample at 32 px (from the teacher checkpoint's recipe)" in text and "resized" not in text, text

    given = precompute(data, tmp_path / "s48", train_checkpoint_32, "--input-size", "48")
    assert given.exit_code == 0, given.output
    assert open_store(tmp_path / "s48").spec.recipe["input_size"] == 48, "an explicit --input-size wins"
    assert "at 48 px (from --input-size); the teacher sees them resized to 32 px" in banner(given)


# ---- 3. the start banner ------------------------------------------------------------------------
def test_the_banner_names_every_choice_and_a_resumed_stores_progress(tmp_path, data, bare_teacher):
    out = tmp_path / "store"
    half = precompute(data, out, bare_teacher, "--input-size", "32", "--rank", "1", "--world-size", "2",
                      "--no-claim")
    assert half.exit_code == 0, half.output
    assert "precompute: teacher" not in half.stderr, "rank 1 of a fleet prints no banner (rank 0 does)"
    res = precompute(data, out, bare_teacher, "--input-size", "32")
    assert res.exit_code == 0, res.output
    text = banner(res)
    for fragment in (
        f"precompute: teacher {TEACHER} (", "M parameters, 3 classes, model_kwargs {'num_classes': 3}), weights ",
        "(sha256 ",
        f"source   {data}: wds, 16 samples, 3 classes, 2 shards as-is (the files as they are)",
        "views    2 per sample at 32 px (from --input-size); the teacher sees them resized to 160 px; "
        "4 units of up to 1 views of one shard; top-3 log-probs; recipe deit, seed 0",
        f"store    {out} (zarr): resumed, 2/4 units already complete, 2 to do",
        "run      device cpu, 0 workers, batch size 8, one process",
    ):
        assert fragment in text, (fragment, text)


def _class_sorted_wds(root, per_class=8):
    """3 tars of 8 samples, each holding one class (how some exports come)."""
    samples = [(f"s{c}{i:03d}", encode(make_image(c, i)), "png", c) for c in range(3) for i in range(per_class)]
    write_wds_shards(samples, str(root), per_shard=per_class, class_names=list(CLASSES))
    return str(root)


def test_the_banner_says_when_tars_are_re_cut_and_when_as_is_tars_are_class_skewed(tmp_path, bare_teacher):
    """Before: only `inspect` reported class-skewed shards, after the teacher had labelled them."""
    src = _class_sorted_wds(tmp_path / "sorted")
    kept = precompute(src, tmp_path / "as-is", bare_teacher, "--input-size", "32", "--views", "1", "--shards", "as-is")
    assert kept.exit_code == 0, kept.output
    assert "3 shards as-is (the files as they are); CLASS-SKEWED: 1.0 classes per shard" in banner(kept)
    assert "--shards shuffle re-cuts them" in banner(kept)
    cut = precompute(src, tmp_path / "auto", bare_teacher, "--input-size", "32", "--views", "1", "--shard-size", "8")
    assert cut.exit_code == 0, cut.output
    assert "re-cut from 3 files into 3 virtual shards of 8 (--shards auto: the files are class-skewed)" in banner(cut)


# ---- 4. --join: who did what, and a bar that ends where the store is --------------------------------------
def test_a_join_process_reports_units_others_finished_and_ends_its_bar_there(tmp_path, data, bare_teacher,
                                                                            monkeypatch, capsys):
    """Before: the bar stopped at the views this process labelled (60-78% in a real fleet) and the end line
    said "2 units done, 0 already complete" with no word of the other half."""
    out = str(tmp_path / "store")
    common = dict(data=data, out=out, teacher=TEACHER, teacher_weights=bare_teacher, views=4, views_per_unit=2,
                  topk=3, input_size=32, batch_size=8, workers=0, device="cpu")
    label, other = lab._label, {}

    def label_while_another_process_works(*a, **kw):
        if not other:  # once, as this process labels its first batch: another finishes half the store
            other["started"] = True  # (its own batches come through here too)
            other["summary"] = run_precompute(PrecomputeConfig(**common, rank=1, world_size=2, claim=False,
                                                               progress=False))
        return label(*a, **kw)

    monkeypatch.setattr(lab, "_label", label_while_another_process_works)
    summary = run_precompute(PrecomputeConfig(**common, join=True))
    assert other["summary"].units_done == 2 and summary.units_done == 2 and summary.units_complete == 4
    assert summary.units_by_others == 2
    report = summary.report()
    assert "this process (worker " in report and "labelled 2 units (32 views)" in report, report
    assert "2 units were labelled by other processes meanwhile" in report, report
    assert "store: 4/4 units complete, the store is complete" in report, report
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "64/64" in bar and "100%" in bar, bar


def test_the_end_line_says_what_is_left(tmp_path, data, bare_teacher):
    res = precompute(data, tmp_path / "s", bare_teacher, "--input-size", "32", "--rank", "0", "--world-size", "2",
                     "--no-claim")
    assert res.exit_code == 0, res.output
    assert "this process (rank 0 of 2) labelled 2 units (16 views)" in res.stdout, res.stdout
    assert "store: 2/4 units complete, 2 units left: rerun the same command to finish them" in res.stdout


# ---- 5. the store's shard layout ------------------------------------------------------------------
@pytest.fixture
def as_is_store(tmp_path, data, bare_teacher):
    res = precompute(data, tmp_path / "store", bare_teacher, "--input-size", "32", "--views", "1")
    assert res.exit_code == 0, res.output
    assert open_store(tmp_path / "store").spec.shard_sizes == (8, 8), "auto kept the two tars"
    return str(tmp_path / "store")


def test_train_names_the_layout_not_another_source(tmp_path, data, as_is_store):
    """Before: "--data ... is not the source the store ... was made from ...; point --data at that source"."""
    with pytest.raises(TrainError) as e:
        open_train_data(data, labels=as_is_store, shards="shuffle")
    msg = str(e.value)
    assert "was made with --shards as-is, not --shards shuffle; pass --shards as-is or auto" in msg, msg
    assert "not the source" not in msg and "point --data" not in msg, msg
    one_line_error(invoke("train", "--data", data, "--labels", as_is_store, "--out", tmp_path / "run",
                          "--shards", "shuffle", "--device", "cpu"),
                   "made with --shards as-is", "pass --shards as-is or auto")


def test_precompute_takes_auto_as_the_stores_layout_like_train(tmp_path, data, bare_teacher):
    """Before: resuming a --shards shuffle store with the default auto indexed the tars as-is and refused the
    store as another source; train already read auto as the store's layout."""
    out = tmp_path / "store"
    made = precompute(data, out, bare_teacher, "--input-size", "32", "--views", "1", "--shards", "shuffle",
                      "--shard-size", "4")
    assert made.exit_code == 0, made.output
    again = precompute(data, out, bare_teacher, "--input-size", "32", "--views", "1", "--shard-size", "4")
    assert again.exit_code == 0, again.output
    assert "re-cut from 2 files into 4 virtual shards of 4 (--shards auto: the store's layout)" in banner(again)
    assert "store: 4/4 units complete, the store is complete" in again.stdout
    assert open_train_data(data, labels=str(out)).manifest.layout == "shuffle"
    one_line_error(precompute(data, out, bare_teacher, "--input-size", "32", "--views", "1", "--shards", "as-is"),
                   "was made with --shards shuffle, not --shards as-is", "pass --shards shuffle or auto",
                   "--overwrite")


# ---- 6. what a tau costs -------------------------------------------------------------------------
def test_the_tau_help_states_the_uncompressed_cost_the_store_really_has(tmp_path, data, bare_teacher):
    """Before: "2 bytes/view each" while the README said 1.6: one is the float16 the store keeps, the other
    what blosc makes of it (benchmarks/tau_bytes.py: 1.75 at T 1 and 0.99 at T 3 in zarr on 2,560 Lite0
    views; the README's 1.6 at T 3 on real photo crops); the help now says which is which."""
    import click

    from cli import precompute as command

    help_text = " ".join(command.get_help(click.Context(command)).split())
    m = re.search(r"--tau T .*?(\d+) bytes/view uncompressed, about ([\d.]+)-([\d.]+) as stored", help_text)
    assert m, help_text
    res = precompute(data, tmp_path / "s", bare_teacher, "--input-size", "32", "--views", "1", "--tau", "3")
    assert res.exit_code == 0, res.output
    tail = open_store(tmp_path / "s").read(0, 0).tail_lse
    assert tail.shape == (8, 1) and tail.dtype.itemsize == int(m.group(1)), "one float16 per view and tau"
    assert float(m.group(2)) < float(m.group(3)) < int(m.group(1)), "compression saves a little, as measured"
