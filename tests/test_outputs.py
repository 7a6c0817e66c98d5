"""No output destroys an input (storage.outputs.check_output_path, --overwrite on what is not a store),
and the tools that look at stores and runs (inspect, verify, export, plot) say plainly what they did."""

import json
import os
import stat

import numpy as np
import pytest
from cli_support import invoke, one_line_error
from conftest import write_wds
from test_export import run  # noqa: F401 - the trained run fixture (hard distillation, EMA, --val)
from test_loader import make_store, make_teacher_weights
from test_storage_support import tiny_spec

from storage import StoreError, create_store, open_store
from storage.outputs import check_output_path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """24 samples in 3 wds tars, a random resnet10t teacher; a top-3 store and a hard-label store (2 views
    each, repeated augmentation on: a sample is in only some views)."""
    root = tmp_path_factory.mktemp("outputs")
    data = write_wds(root / "wds", n=24, per_shard=8)
    weights = make_teacher_weights(root / "teacher.pth")
    return {"root": root, "data": data, "weights": weights, "topk": make_store(data, root / "topk", weights),
            "hard": make_store(data, root / "hard", weights, hard=True)}


def snapshot(folder) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), folder)] = fh.read()
    return out


# ---- 1. export never writes over the checkpoint ----------------------------------------------------------
def test_export_refuses_a_config_on_the_checkpoint_or_on_the_weights(run, tmp_path):  # noqa: F811
    ckpt = os.path.join(run["run"], "checkpoint.pth")
    before = snapshot(run["run"])
    out = tmp_path / "m.safetensors"
    one_line_error(invoke("export", run["run"], "--out", out, "--config", ckpt), "--config", "is the input",
                   "checkpoint.pth")
    one_line_error(invoke("export", run["run"], "--out", out, "--config", out), "--config", "the same file")
    one_line_error(invoke("export", run["run"], "--out", out, "--config", tmp_path / "c.txt"), "--config", ".json")
    one_line_error(invoke("export", run["run"], "--out", os.path.join(run["run"], "m.safetensors")),
                   "inside the run folder")
    assert snapshot(run["run"]) == before and not os.path.exists(out)
    assert not list(tmp_path.iterdir())


# ---- 2. inspect --export never writes into the store -----------------------------------------------------
def test_inspect_export_refuses_a_path_inside_the_store(stores, tmp_path):
    store = stores["topk"]
    before = snapshot(store)
    one_line_error(invoke("inspect", store, "--export", os.path.join(store, "manifest.parquet")),
                   "inside the label store")
    one_line_error(invoke("inspect", store, "--export", tmp_path / "t.pth"), "--export", ".parquet")
    assert snapshot(store) == before
    assert invoke("inspect", store).exit_code == 0


# ---- 3. --overwrite deletes label stores only ------------------------------------------------------------
@pytest.mark.parametrize("backend", ["zarr", "wds"])
@pytest.mark.parametrize("where", ["meta", "units"])
def test_overwrite_refuses_a_folder_that_only_looks_like_a_half_made_store(tmp_path, backend, where):
    folder = tmp_path / "work"
    (folder / "meta").mkdir(parents=True)
    (folder / "units").mkdir()
    (folder / where / "thesis.tex").write_text("years of work")
    with pytest.raises(StoreError, match=f"refused.*'{where}/thesis.tex'") as e:
        create_store(folder, tiny_spec(), backend=backend, overwrite=True)
    assert "\n" not in str(e.value)
    assert (folder / where / "thesis.tex").read_text() == "years of work"
    with pytest.raises(StoreError) as e:  # without --overwrite: not called a half-made store, no --overwrite hint
        create_store(folder, tiny_spec(), backend=backend)
    assert "half-made" not in str(e.value) and "--overwrite" not in str(e.value), str(e.value)
    assert f"'{where}/thesis.tex'" in str(e.value)
    assert (folder / where / "thesis.tex").read_text() == "years of work"


def test_overwrite_onto_a_fifo_store_json_does_not_hang(tmp_path):
    """A FIFO in store.json's place: --overwrite judges the folder without blocking on it (a hang would
    outlive a thread, so it runs in a child process with a timeout)."""
    import subprocess
    import sys

    folder = tmp_path / "work"
    (folder / "units").mkdir(parents=True)
    os.mkfifo(folder / "store.json")
    code = ("import sys; from storage import create_store; sys.path.insert(0, 'tests')\n"
            "from test_storage_support import tiny_spec\n"
            "try:\n    create_store(sys.argv[1], tiny_spec(), overwrite=True)\n"
            "except Exception as e:\n    print(type(e).__name__, e)")
    p = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0 and not p.stdout, (p.stdout, p.stderr)
    # holding only names the store format lists, it is a half-made store: rebuilt, its store.json now a file
    assert (folder / "store.json").is_file()


def test_overwrite_still_rebuilds_a_store_and_a_half_made_one(tmp_path):
    store = tmp_path / "s"
    w = create_store(store, tiny_spec(seed=0))
    w.set_meta("note", {"a": 1})
    assert open_store(create_store(store, tiny_spec(seed=1), overwrite=True).path).spec.seed == 1
    (store / "store.json").unlink()  # a half-made store: meta/, units/, labels.zarr/ with its chunks
    assert create_store(store, tiny_spec(seed=2), overwrite=True).spec.seed == 2


# ---- 4. the shared rule ----------------------------------------------------------------------------------
def test_check_output_path_refuses_inputs_stores_runs_directories_and_wrong_extensions(stores, tmp_path):
    from storage.outputs import OutputError

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    (tmp_path / "in").mkdir()
    cases = [
        ((tmp_path / "a.json", "json", [tmp_path / "a.json"]), "the input"),
        ((tmp_path / "in" / "x.parquet", "parquet", [tmp_path / "in"]), "inside the input folder"),
        ((os.path.join(stores["topk"], "meta", "x.parquet"), "parquet", []), "inside the label store"),
        ((tmp_path / "run" / "c.png", "figure", []), "inside the run folder"),
        ((tmp_path, "figure", []), "is a directory"),
        ((tmp_path / "noext", "figure", []), "e.g. --out"),
        ((tmp_path / "m.pth", "safetensors", []), ".safetensors"),
    ]
    for (path, kind, inputs), words in cases:
        with pytest.raises(OutputError, match=words):
            check_output_path(str(path), kind, inputs=[str(p) for p in inputs])
    check_output_path(str(tmp_path / "fine.svg"), "figure", inputs=[str(tmp_path / "run")])


# ---- 5. plot ---------------------------------------------------------------------------------------------
def fake_run(folder, kd: float, distillation: str | None, epochs: int = 3):
    """A run folder as train writes it: metrics.jsonl (and summary.json when given a distillation mode)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for e in range(epochs):
            val = {f"{h}_{k}": 10.0 * (e + 1) for h in ("cls", "dist", "avg") for k in ("top1", "top5")}
            f.write(json.dumps({"epoch": e, "loss": 2.0 - e / 10 + kd, "base": 2.0 - e / 10, "kd": kd, "val": val})
                    + "\n")
    if distillation:
        with open(os.path.join(folder, "summary.json"), "w") as f:
            json.dump({"distillation": distillation}, f)
    return str(folder)


def test_plot_bad_outputs_and_damaged_metrics_are_one_line(tmp_path):
    good = fake_run(tmp_path / "good", 0.0, "none")
    for out, words in ((tmp_path / "x.pth", "must end in .png, .pdf or .svg"), (tmp_path / "noext", "noext.png"),
                       (tmp_path, "is a directory")):
        line = one_line_error(invoke("plot", good, "--out", out), str(out), words)
        assert "resume" not in line
    assert not (tmp_path / "noext").exists() and not (tmp_path / "noext.png").exists()
    assert not (tmp_path / "x.pth").exists()
    for junk in ("[1, 2]", '{"epoch": "one", "loss": 1.0}', '{"epoch": 0}', '{"epoch": 0, "loss": 1, "val": 3}'):
        bad = tmp_path / "bad"
        bad.mkdir(exist_ok=True)
        (bad / "metrics.jsonl").write_text(junk + "\n")
        one_line_error(invoke("plot", str(bad), "--out", tmp_path / "c.png"), "metrics.jsonl line 1")
    assert not (tmp_path / "c.png").exists()


def _figure_of(monkeypatch, runs, tmp_path):
    """Run `cli.py plot` and return the matplotlib figure it saved."""
    import matplotlib.figure

    saved = []
    real = matplotlib.figure.Figure.savefig

    def keep(fig, *a, **kw):
        saved.append(fig)
        return real(fig, *a, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    res = invoke("plot", *runs, "--out", tmp_path / "curves.png")
    assert res.exit_code == 0, res.output
    return saved[0]


def test_plot_numbers_epochs_as_train_and_tells_objectives_apart(tmp_path, monkeypatch):
    hard = fake_run(tmp_path / "hard", 0.5, "hard")
    none = fake_run(tmp_path / "none", 0.0, "none")
    fig = _figure_of(monkeypatch, [hard, none], tmp_path)
    ax_loss, ax_top1 = fig.axes[:2]
    assert [list(line.get_xdata()) for line in ax_loss.get_lines()] == [[0, 1, 2]] * 2  # as metrics.jsonl says
    assert list(ax_top1.get_lines()[0].get_xdata()) == [0, 1, 2]
    # different objectives: their shared term (cross-entropy with the ground truth), said on the axis
    assert [list(line.get_ydata()) for line in ax_loss.get_lines()] == [[2.0, 1.9, 1.8]] * 2
    assert "ground truth" in ax_loss.get_ylabel()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["hard (hard distillation)", "none (no distillation)"]
    # one objective: the training loss itself, named on the axis
    fig = _figure_of(monkeypatch, [hard], tmp_path)
    assert list(fig.axes[0].get_lines()[0].get_ydata()) == [2.5, 2.4, 2.3]
    assert "hard distillation" in fig.axes[0].get_ylabel()


# ---- 6. inspect says what it shows and what it ignores ---------------------------------------------------
def _sample_in_one_view_only(store):
    from pipeline.recipes import Recipe
    from pipeline.tools.lookup import slots_of, stored_manifest
    from pipeline.views import ViewRenderer

    reader = open_store(store)
    spec, manifest = reader.spec, stored_manifest(reader)
    renderer = ViewRenderer(Recipe.from_dict(spec.recipe))
    for shard, n in enumerate(spec.shard_sizes):
        for pos in range(n):
            present = [v for v in (0, 1) if slots_of(renderer, spec.seed, v, shard, n, pos)]
            if len(present) == 1:
                return manifest.keys(shard)[pos], present[0]
    raise AssertionError("every sample is in both views or none")


def test_inspect_sample_says_which_asked_views_do_not_hold_it(stores):
    key, present = _sample_in_one_view_only(stores["topk"])
    absent = 1 - present
    res = invoke("inspect", stores["topk"], "--sample", key, "--view", 0, "--view", 1)
    assert res.exit_code == 0, res.output
    assert f"view {present} (slot" in res.output
    assert f"view {absent}: sample {key} is not in this view" in res.output and "repeats=3" in res.output


def test_inspect_refuses_options_it_would_ignore_and_runs_render_and_export_together(stores, tmp_path):
    one_line_error(invoke("inspect", stores["topk"], "--view", 1), "--view", "--sample")
    sheet, table = tmp_path / "s.png", tmp_path / "t.parquet"
    res = invoke("inspect", stores["topk"], "--render", sheet, "--export", table)
    assert res.exit_code == 0, res.output
    assert sheet.exists() and table.exists()
    assert f"wrote {sheet}" in res.output and f"wrote {table}" in res.output


def test_inspect_json_counts_the_source_files_and_shows_no_rate_on_a_finished_store(stores):
    d = json.loads(invoke("inspect", stores["topk"], "--json").output)
    assert (d["source_kind"], d["source_files"]) == ("wds", 3)
    assert d["fleet"]["units_pending"] == 0
    assert d["fleet"]["views_per_s"] is None and d["fleet"]["eta_s"] is None


def test_contact_sheet_labels_the_teacher_and_never_cuts_a_caption(stores):
    from pipeline.tools.render import CAPTION_LINES, Tile, collect_tiles, draw_sheet

    tiles = collect_tiles(open_store(stores["topk"]), None, count=2)
    assert all(line.startswith("teacher ") for t in tiles for line in t.caption[3:])
    long = "+ 0.35 a-very-long-class-name-indeed (cutmix)"
    tile = Tile(0, 0, 0, np.zeros((32, 32, 3), np.uint8), ["v0", long] + [""] * (CAPTION_LINES - 2))
    narrow = draw_sheet([Tile(0, 0, 0, tile.pixels, ["v0"])])
    wide = draw_sheet([tile])
    assert wide.size[0] > narrow.size[0]  # the cell grew to hold the caption instead of cutting it


def test_verify_on_a_hard_label_store_claims_no_log_prob_difference(stores):
    res = invoke("verify", stores["hard"], "--data", stores["data"], "--n", 4)
    assert res.exit_code == 0, res.output
    assert "log-prob" not in res.output and "argmax alone is compared" in res.output


# ---- 8 and 9. export: shareable files, which weights and what they scored ---------------------------------
def test_export_files_have_a_plain_mode_and_the_report_says_which_weights_scored_what(run, tmp_path):  # noqa: F811
    old = os.umask(0o022)
    try:
        res = invoke("export", run["run"], "--out", tmp_path / "m" / "model.safetensors")
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    modes = {name: stat.S_IMODE(os.stat(tmp_path / "m" / name).st_mode) for name in ("model.safetensors",
                                                                                     "config.json")}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644}
    final = json.load(open(os.path.join(run["run"], "summary.json")))["final"]
    ema, raw = final["val_ema"]["avg_top1"], final["val"]["avg_top1"]
    assert "weights: the EMA of the weights, the default" in res.output and "--no-ema" in res.output
    assert f"EMA {ema:.2f}% (exported), raw {raw:.2f}%" in res.output
    res = invoke("export", run["run"], "--out", tmp_path / "r" / "model.safetensors", "--no-ema")
    assert "weights: the raw weights, as --no-ema asks" in res.output
    assert f"EMA {ema:.2f}%, raw {raw:.2f}% (exported)" in res.output


# ---- 10. verify's advice is true and said once -----------------------------------------------------------
def test_verify_names_a_damaged_unit_once_and_says_precompute_heals_it(stores, tmp_path):
    import shutil

    store = str(tmp_path / "damaged")
    shutil.copytree(stores["topk"], store)
    record = json.load(open(os.path.join(store, "units", "000001_0001.json")))
    chunk = os.path.join(store, record["chunks"]["values"]["key"])
    data = bytearray(open(chunk, "rb").read())
    data[len(data) // 2] ^= 0x40
    open(chunk, "wb").write(bytes(data))
    res = invoke("verify", store, "--data", stores["data"], "--n", 48, "--full")
    assert res.exit_code == 1, res.output
    assert "check()" not in res.output and "delete units/" not in res.output, res.output
    assert res.output.count("rerun the same precompute command") == 1
    assert sum("shard=1, view_block=1" in line for line in res.output.splitlines()[:-1]) == 1, res.output


def test_verify_tau_1_says_the_tail_mass_is_exact():
    """At tau 1 the stored top-k log-probabilities give the tail mass exactly (storage/soft.py): nothing to
    store, so no advice to store it; at any other tau without a stored tail, the approximation is named."""
    from pipeline.tools.verify import SoftReport

    def line(tau):
        return SoftReport(tau, 3, 10, False, 4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1).line()

    assert "exact tail mass" in line(1.0) and "UNIFORM" not in line(1.0) and "precompute --tau" not in line(1.0)
    assert "UNIFORM tail approximation" in line(2.0) and "precompute --tau 2 stores it" in line(2.0)


def test_a_bucket_store_is_never_inside_a_local_source(tmp_path, monkeypatch):
    """--out s3://... beside --data . : realpath would make the URL ./s3:/b/x, a path inside the source."""
    from pipeline.sources import SourceError, check_outside_source

    monkeypatch.chdir(tmp_path)
    check_outside_source(".", "s3://bucket/stores/x")
    check_outside_source(str(tmp_path), "gs://bucket/x")
    with pytest.raises(SourceError, match="inside the source"):
        check_outside_source(".", "s3:/bucket/x")  # one slash: a local folder named s3:, inside the source
