"""Soft labels at a temperature other than 1: the stored tempered tail (precompute --tau), its rebuild,
verify --tau, train's note, and the uniform-tail fallback. Both backends.

The teacher's full logits are computed in the tests, so "exact" is checked against the real
softmax(z / tau), not against the rebuild's own formula.
"""

import json

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from conftest import write_wds
from test_inspect import BACKENDS
from test_storage_support import tiny_spec, unit_data, write_all

from cli import main
from pipeline.stage1.precompute import PrecomputeConfig, PrecomputeError, run_precompute
from storage import (
    StoreError,
    StoreMismatch,
    create_store,
    open_store,
    soft_targets,
    tail_logsumexp,
    target_error,
    topk_logprobs,
)
from storage.soft import recorded_soft_error
from student.train import TrainConfig, train

FP16 = 2.0**-11  # float16 relative rounding


def _logits(n=64, c=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 3 + torch.randn(n, 1, generator=g)


# ---- the rebuild -----------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.5, 2.0, 3.0, 4.0])
def test_stored_tail_makes_tempered_topk_and_tail_mass_exact(tau):
    logits, k, c = _logits(), 10, 100
    values, ids = topk_logprobs(logits, k)
    lse = torch.from_numpy(tail_logsumexp(logits, ids, [tau])[:, 0])
    t = soft_targets(values, ids, c, tau=tau, tail_lse=lse)
    p = torch.softmax(logits.double() / tau, dim=1)  # the teacher's full tempered distribution
    top, ptop = t.gather(1, ids).double(), p.gather(1, ids)
    # each top-k weight equals the teacher's up to float16 rounding of the stored numbers: rounding l by
    # |l| * 2^-11 moves exp(l / tau) by |l| / tau * 2^-11 relative, and the normaliser by at most the largest
    # such move among its terms (top-k values and the tail log-sum-exp)
    v = values.double().abs()
    bound = FP16 * (v / tau + v.amax(1, keepdim=True) / tau + lse.double().abs()[:, None])
    assert ((top - ptop).abs() / ptop <= bound).all()
    # and the tail's total mass to float16 precision (2^-10), which the uniform-tail guess misses by far more
    assert (top.sum(1) - ptop.sum(1)).abs().max() < 2 * FP16
    old = soft_targets(values, ids, c, tau=tau).gather(1, ids).double().sum(1)
    assert (old - ptop.sum(1)).abs().max() > 0.05
    # the split inside the tail is uniform: every tail class gets the same share
    tail = t.scatter(1, ids, float("nan"))
    spread = tail.nan_to_num(float("-inf")).amax(1) - tail.nan_to_num(float("inf")).amin(1)
    assert (spread <= 1e-7).all()


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_k_equals_c_is_exact_with_or_without_stored_tail(tau):
    logits = _logits(c=20)
    values, ids = topk_logprobs(logits, 20)
    lse = tail_logsumexp(logits, ids, [tau])[:, 0]
    assert np.isneginf(lse).all()  # no tail
    for tail in (None, torch.from_numpy(lse)):
        t = soft_targets(values, ids, 20, tau=tau, tail_lse=tail)
        tv, kl = target_error(logits, t, tau)
        assert tv.max() < 2e-3 and kl.max() < 1e-5


def test_target_error_is_zero_for_the_teacher_and_grows_as_k_shrinks():
    logits, tau = _logits(), 3.0
    tv, kl = target_error(logits, torch.softmax(logits / tau, 1), tau)
    assert tv.max() < 1e-6 and kl.max() < 1e-6
    means = []
    for k in (100, 50, 10, 3):
        v, i = topk_logprobs(logits, k)
        lse = torch.from_numpy(tail_logsumexp(logits, i, [tau])[:, 0])
        means.append(target_error(logits, soft_targets(v, i, 100, tau=tau, tail_lse=lse), tau)[0].mean())
    assert means[0] < 2e-3 and all(a < b for a, b in zip(means, means[1:], strict=False))


# ---- the store -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_tail_lse_round_trips_in_both_backends(tmp_path, backend):
    spec = tiny_spec(taus=(3, 1.0, 3.0))
    assert spec.taus == (1.0, 3.0) and spec.tau_index(3) == 1 and spec.tau_index(2) is None
    w = create_store(tmp_path / "s", spec, backend=backend)
    write_all(w)
    r = open_store(tmp_path / "s", expect=spec)
    assert r.spec.taus == (1.0, 3.0) and r.check() == []
    for view in range(spec.views):
        for shard in range(spec.num_shards):
            d = unit_data(spec, shard, spec.block_of(view))
            i = view - spec.block_views(spec.block_of(view)).start
            want = d["tail_lse"][i].copy()
            want[d["valid"][i] != 1] = 0
            got = r.read(view, shard).tail_lse
            assert got.dtype == np.float16 and got.tobytes() == want.tobytes()
    flat = r.read_view_flat(0)
    assert flat.tail_lse.shape == (sum(spec.shard_sizes), 2)
    assert r.read(0, 0).values is not None and open_store(tmp_path / "s").read_slot(0, 0, 1).tail_lse.shape == (1, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_without_taus_has_no_tail_and_refuses_one(tmp_path, backend):
    spec = tiny_spec()
    w = create_store(tmp_path / "s", spec, backend=backend)
    d = unit_data(spec, 0, 0)
    with pytest.raises(StoreError, match="keeps no taus"):
        w.write_unit(0, 0, **d, tail_lse=np.zeros((*d["valid"].shape, 1), np.float16))
    write_all(w)
    assert open_store(tmp_path / "s").read(0, 0).tail_lse is None


def test_bad_tail_inputs_and_taus_are_refused(tmp_path):
    with pytest.raises(StoreError, match="topk mode"):
        tiny_spec("hard", taus=(3.0,))
    with pytest.raises(StoreError, match="> 0"):
        tiny_spec(taus=(0.0,))
    spec = tiny_spec(taus=(3.0,))
    w = create_store(tmp_path / "s", spec)
    d = unit_data(spec, 0, 0)
    with pytest.raises(StoreError, match="tail_lse must be float16"):
        w.write_unit(0, 0, **{**d, "tail_lse": None})
    bad = d["tail_lse"].copy()
    bad[0, 1, 0] = np.nan
    with pytest.raises(StoreError, match="NaN"):
        w.write_unit(0, 0, **{**d, "tail_lse": bad})
    with pytest.raises(StoreMismatch, match=r"taus=\[3\.0\], you asked for taus=\[1\.0, 3\.0\]"):
        create_store(tmp_path / "s", tiny_spec(taus=(1.0, 3.0)))


# ---- precompute, verify, train ---------------------------------------------------------------
CLASSES10 = [f"c{i}" for i in range(10)]


@pytest.fixture(scope="module")
def tau_stores(tmp_path_factory):
    """A 10-class source (20 images), a random resnet10t teacher with a spread-out head, and stores of
    80 views each: top-10 (= every class), top-2 with the tail kept at tau 3 (both backends), top-2 without."""
    root = tmp_path_factory.mktemp("soft_tau")
    data = write_wds(root / "wds", n=20, per_shard=8, classes=CLASSES10)
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10)
    with torch.no_grad():
        model.fc.weight.mul_(20)  # a random head gives near-uniform outputs; a teacher is more decided
    weights = str(root / "teacher.pth")
    torch.save(model.state_dict(), weights)
    common = dict(data=data, teacher="resnet10t", teacher_weights=weights, model_kwargs={"num_classes": 10},
                  views=4, views_per_unit=2, input_size=32, batch_size=16, workers=0, overrides=["repeats=1"],
                  progress=False)
    out = {"data": data, "weights": weights, "common": common}
    stores = {"k10": dict(topk=10), "k2_tau3_zarr": dict(topk=2, taus=[3.0]),
              "k2_tau3_wds": dict(topk=2, taus=[3.0], backend="wds"), "k2_plain": dict(topk=2)}
    for name, kw in stores.items():
        out[name] = str(root / name)
        out[f"{name}_summary"] = run_precompute(PrecomputeConfig(out=out[name], **kw, **common))
    return out


def verify(*args):
    return CliRunner().invoke(main, ["verify", *[str(a) for a in args]])


def _soft_line(output: str, tau: str) -> str:
    (line,) = [s for s in output.splitlines() if s.startswith(f"soft tau {tau} ")]
    return line


def _figure(line: str, name: str) -> float:
    return float(line.split(name, 1)[1].split()[0].rstrip(";"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_tau_reports_zero_at_k_equals_c_and_more_at_small_k(tau_stores, backend):
    res = verify(tau_stores["k10"], "--data", tau_stores["data"], "--n", 24, "--tau", 3, "--tau", 1)
    assert res.exit_code == 0 and res.output.splitlines()[-1] == "PASS", res.output
    for tau in ("3", "1"):  # top-10 of 10 classes: the rebuild is the teacher's softmax
        line = _soft_line(res.output, tau)
        assert "24 views, top-10 of 10 classes (no tail)" in line
        assert _figure(line, "total variation mean") < 2e-3 and _figure(line, "KL(teacher||rebuilt) mean") < 1e-4
    res = verify(tau_stores[f"k2_tau3_{backend}"], "--data", tau_stores["data"], "--n", 24, "--tau", 3)
    assert res.exit_code == 0 and res.output.splitlines()[-1] == "PASS", res.output
    line = _soft_line(res.output, "3")
    assert "top-2 + stored tail mass (split uniformly)" in line and _figure(line, "total variation mean") > 0.01


def test_verify_tau_without_stored_tail_says_it_falls_back(tau_stores):
    res = verify(tau_stores["k2_plain"], "--data", tau_stores["data"], "--n", 24, "--tau", 3)
    assert res.exit_code == 0, res.output
    line = _soft_line(res.output, "3")
    assert "UNIFORM tail approximation" in line and "precompute --tau 3 stores it" in line
    stored = _soft_line(verify(tau_stores["k2_tau3_zarr"], "--data", tau_stores["data"], "--n", 24,
                               "--tau", 3).output, "3")
    # the same views and labels: the stored tail is never worse than the uniform guess, here strictly better
    assert _figure(stored, "total variation mean") < _figure(line, "total variation mean")


def test_precompute_records_the_error_it_measured(tau_stores):
    meta = open_store(tau_stores["k2_tau3_zarr"]).meta
    err = recorded_soft_error(meta, 3.0)
    assert err["views"] == 80 and 0 < err["stored"]["tv_mean"] <= err["stored"]["tv_max"] <= 1
    assert err["stored"]["tv_mean"] < err["uniform"]["tv_mean"]
    assert recorded_soft_error(meta, 2.0) is None
    assert recorded_soft_error(open_store(tau_stores["k2_plain"]).meta, 3) is None
    # the two backends hold the same labels, so precompute measured the same figures
    assert recorded_soft_error(open_store(tau_stores["k2_tau3_wds"]).meta, 3.0) == err
    # and its report says so, once per tau; a store without --tau reports nothing of the kind
    (line,) = [s for s in tau_stores["k2_tau3_zarr_summary"].report().splitlines() if s.startswith("soft targets")]
    assert line.startswith("soft targets at tau 3 (top-k + stored tail mass, tail split uniform), 80 views")
    assert f"mean {err['stored']['tv_mean']:.4f}" in line
    assert "soft targets" not in tau_stores["k2_plain_summary"].report()
    res = CliRunner().invoke(main, ["inspect", tau_stores["k2_tau3_wds"]])
    assert res.exit_code == 0 and "top-2 log-probabilities + tempered tail mass at tau 3, 10 classes" in res.output


def test_resumed_precompute_with_other_taus_is_refused_in_one_line(tau_stores):
    cfg = PrecomputeConfig(out=tau_stores["k2_tau3_zarr"], topk=2, taus=[1.0, 3.0], **tau_stores["common"])
    with pytest.raises(StoreMismatch, match=r"made with taus=\[3\.0\], you asked for taus=\[1\.0, 3\.0\]"):
        run_precompute(cfg)
    res = CliRunner().invoke(main, ["precompute", "--data", tau_stores["data"], "--out", tau_stores["k2_plain"],
                                    "--teacher", "resnet10t", "--teacher-weights", tau_stores["weights"],
                                    "--model-kwargs", json.dumps({"num_classes": 10}), "--views", 4,
                                    "--views-per-unit", 2, "--topk", 2, "--input-size", 32, "--repeats", 1,
                                    "--workers", 0, "--tau", 3])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "taus=[]" in res.output, res.output
    with pytest.raises(PrecomputeError, match="--tau"):
        run_precompute(PrecomputeConfig(out="unused", hard=True, taus=[3.0], **tau_stores["common"]))


TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def _train(tau_stores, store, out, tau, capsys):
    cfg = TrainConfig(data=tau_stores["data"], labels=store, out=str(out), model="deit_tiny_distilled_patch16_224",
                      model_kwargs=TINY, distillation="soft", tau=tau, epochs=1, max_steps_per_epoch=1,
                      batch_size=4, workers=0, ema=False, warmup_epochs=0, progress=False)
    summary = train(cfg)
    return summary.soft_targets, capsys.readouterr().err


def test_train_prints_the_measured_error_or_says_how_to_measure_it(tau_stores, tmp_path, capsys):
    note, err = _train(tau_stores, tau_stores["k2_tau3_zarr"], tmp_path / "a", 3.0, capsys)
    measured = recorded_soft_error(open_store(tau_stores["k2_tau3_zarr"]).meta, 3.0)["stored"]["tv_mean"]
    assert f"mean {measured:.4f}" in note and "precompute measured on 80 views" in note
    assert err.count(note) == 1  # printed once
    note, err = _train(tau_stores, tau_stores["k2_plain"], tmp_path / "b", 3.0, capsys)
    assert "UNIFORM-tail approximation" in note and "cli.py verify" in note and "--tau 3" in note
    assert err.count(note) == 1
    note, _ = _train(tau_stores, tau_stores["k10"], tmp_path / "c", 3.0, capsys)  # k = C: exact, nothing to say
    assert note is None


def test_train_uses_the_stored_tail_at_its_tau(tau_stores, monkeypatch, tmp_path, capsys):
    """The loss sees the rebuild with the stored tail (exact tail mass), not the uniform guess."""
    import student.losses as losses

    seen = []
    real = losses.TeacherLabels.from_topk.__func__

    def spy(cls, values, ids, num_classes, tau=1.0, tail_lse=None):
        seen.append(tail_lse)
        return real(cls, values, ids, num_classes, tau=tau, tail_lse=tail_lse)

    monkeypatch.setattr(losses.TeacherLabels, "from_topk", classmethod(spy))
    _train(tau_stores, tau_stores["k2_tau3_zarr"], tmp_path / "a", 3.0, capsys)
    assert seen and seen[-1] is not None and seen[-1].shape == (4,) and torch.isfinite(seen[-1].float()).all()
    _train(tau_stores, tau_stores["k2_tau3_zarr"], tmp_path / "b", 2.0, capsys)  # a tau the store lacks: fallback
    assert seen[-1] is None
