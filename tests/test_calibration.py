"""Calibration: ECE/MCE/Brier by hand, temperature scaling fixes an over-confident model,
and the temperature travels with the checkpoint and inside exported artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, TINY_ANY
from visiontrain.engine.checkpoint import load_checkpoint
from visiontrain.tasks.calibration import CalibrationStats, fit_temperature
from visiontrain.tasks.classification import predictions


def _ece_by_hand(probs: np.ndarray, target: np.ndarray, bins: int = 15) -> tuple[float, float]:
    conf, pred = probs.max(1), probs.argmax(1)
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    ece, mce = 0.0, 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            gap = abs((pred[m] == target[m]).mean() - conf[m].mean())
            ece += gap * m.mean()
            mce = max(mce, gap)
    return ece, mce


def test_ece_mce_brier_equal_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(500, 4, generator=g) * 2, dim=1)
    target = torch.randint(0, 4, (500,), generator=g)
    stats = CalibrationStats(torch.device("cpu"))
    for chunk in range(5):  # batch by batch, as an evaluation adds them
        stats.update(
            probs[chunk * 100 : (chunk + 1) * 100], target[chunk * 100 : (chunk + 1) * 100]
        )
    got = stats.compute()
    ece, mce = _ece_by_hand(probs.numpy(), target.numpy())
    assert got["ece"] == pytest.approx(ece) and got["mce"] == pytest.approx(mce)
    brier = ((probs - F.one_hot(target, 4)) ** 2).sum(1).mean()
    assert got["brier"] == pytest.approx(float(brier))
    assert sum(got["reliability"]["count"]) == 500


def test_temperature_undoes_overconfidence_and_keeps_decisions():
    g = torch.Generator().manual_seed(1)
    true_logits = torch.randn(2000, 5, generator=g)
    target = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=g).squeeze(1)
    overconfident = true_logits * 4.0  # calibrated logits, sharpened 4x
    fit = fit_temperature(overconfident, target, "softmax")
    t = fit.temperature
    assert t == pytest.approx(4.0, rel=0.15) and fit.note is None

    def ece(logits):
        stats = CalibrationStats(torch.device("cpu"))
        stats.update(torch.softmax(logits, 1), target)
        return stats.compute()["ece"]

    assert ece(overconfident / t) < 0.5 * ece(overconfident)
    assert torch.equal((overconfident / t).argmax(1), overconfident.argmax(1))


def test_prediction_rows_apply_the_temperature():
    logits = [torch.tensor([2.0, 0.0, -2.0])]
    plain = predictions(logits, {"activation": "softmax"}, ["a", "b", "c"], 3)[0]
    soft = predictions(logits, {"activation": "softmax", "temperature": 4.0}, ["a", "b", "c"], 3)[0]
    assert plain["prediction"] == soft["prediction"] == "a"
    assert soft["probability"] < plain["probability"]
    assert soft["probability"] == pytest.approx(float(torch.softmax(logits[0] / 4, 0)[0]), abs=1e-6)


OVERFIT = [
    *TINY, "data.defect_classes=types", "data.defect_rate=0.5", "train.epochs=6",
    "data.augment=none", "optim.lr=0.01", "model.width=8",
]  # fmt: skip


def test_calibrated_run_stores_the_temperature_and_exports_it(cli, tmp_path):
    res = cli("train", *OVERFIT, "train.calibrate=temperature", "train.progress=plain",
              f"run.dir={tmp_path}", "run.name=c")  # fmt: skip
    assert res.code == 0, res.err
    assert "fitted on val: ECE" in res.out
    run = tmp_path / "c"
    summary = json.loads((run / "summary.json").read_text())
    cal = summary["calibration"]
    assert cal["val_nll_after"] <= cal["val_nll_before"] + 1e-9
    assert {"ece", "mce", "brier"} <= set(summary["metrics"]["test"])
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["task_state"]["temperature"] == pytest.approx(cal["temperature"])
    # eval restores it: the val ECE is the calibrated one.
    res = cli("eval", run, "--split", "val", "--format", "json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["ece"] == pytest.approx(cal["val_ece_after"], abs=1e-6)
    # predict from the run and from an ONNX artifact (temperature inside) agree.
    images = tmp_path / "imgs"
    images.mkdir()
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(images / f"{i}.png")
    rows = {}
    assert cli("export", run, "--format", "onnx", "--out", tmp_path / "onnx").code == 0
    for name, target in (("run", run), ("onnx", tmp_path / "onnx" / "model.onnx")):
        res = cli("predict", target, images, "--format", "json")
        assert res.code == 0, res.err
        rows[name] = json.loads(res.out)
    for a, b in zip(rows["run"], rows["onnx"], strict=True):
        assert a["prediction"] == b["prediction"]
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)


def test_calibration_is_refused_without_class_probabilities(cli, tmp_path):
    args = ["task=regression", "data.name=shapes", "train.calibrate=temperature"]
    res = cli("train", *TINY_ANY, *args, f"run.dir={tmp_path}")
    assert res.code == 2 and "has none to calibrate" in res.err


def test_a_perfectly_separated_val_set_keeps_unit_temperature_and_says_why():
    """NLL keeps falling as T -> 0 when every val image is right: no T calibrates that."""
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0]] * 20)
    target = torch.tensor([0, 1] * 20)
    fit = fit_temperature(logits, target, "softmax")
    assert fit.temperature == 1.0
    assert "every val image is classified right" in fit.note and "T = 1 is kept" in fit.note
    # One mistake among them: a finite optimum, used.
    wrong = torch.cat([logits, torch.tensor([[4.0, 0.0]])]), torch.cat([target, torch.tensor([1])])
    fit = fit_temperature(*wrong, "softmax")
    assert fit.note is None and np.exp(-3.0) < fit.temperature < np.exp(3.0)
