"""Class imbalance: weights and sampling in force, decision thresholds chosen on val."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from conftest import TINY
from visiontrain.data.loaders import EpochBatchSampler, sample_weights
from visiontrain.engine.checkpoint import load_checkpoint
from visiontrain.tasks.thresholds import average_precision, choose_threshold


def _scores(seed=0, n=400):
    """Overlapping positive/negative score distributions (a realistic, imperfect model)."""
    g = np.random.default_rng(seed)
    targets = (g.random(n) < 0.2).astype(np.int64)
    scores = np.clip(g.normal(0.35 + 0.3 * targets, 0.15), 0, 1)
    return torch.tensor(scores, dtype=torch.float32), torch.tensor(targets)


def test_best_f1_threshold_maximises_f1_over_every_candidate():
    scores, targets = _scores()
    choice = choose_threshold(scores, targets, "best_f1")
    # Brute force: F1 of "score >= t" for every distinct score as t.
    best = max(
        f1_score(targets.numpy(), (scores >= t).numpy().astype(int)) for t in scores.unique()
    )
    assert choice.f1 == pytest.approx(best, abs=1e-9)
    assert choice.f1 == pytest.approx(
        f1_score(targets.numpy(), (scores >= choice.threshold).numpy().astype(int))
    )


def test_best_f1_on_a_constructed_score_set():
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])
    targets = torch.tensor([0, 0, 1, 0, 1, 1, 0, 1])
    # t=0.6 → P 3/4 R 3/4 F1 .75; t=0.3 → P 4/6 R 1 F1 .8 (the best); t=0.9 → F1 .4.
    choice = choose_threshold(scores, targets, "best_f1")
    assert choice.threshold == pytest.approx(0.3)
    assert (choice.precision, choice.recall, choice.f1) == pytest.approx((4 / 6, 1.0, 0.8))


@pytest.mark.parametrize("level", [0.5, 0.8, 0.9, 0.99])
def test_recall_target_keeps_the_highest_threshold_reaching_it(level):
    scores, targets = _scores(1)
    choice = choose_threshold(scores, targets, f"recall>={level}")
    assert choice.recall >= level
    # Any higher candidate threshold would fall below the target recall.
    higher = scores[scores > choice.threshold].unique()
    for t in higher:
        pred = scores >= t
        recall = float((pred & (targets == 1)).sum() / (targets == 1).sum())
        assert recall < level


def test_precision_target_and_fixed_threshold():
    scores, targets = _scores(2)
    choice = choose_threshold(scores, targets, "precision>=0.8")
    assert choice.precision >= 0.8
    fixed = choose_threshold(scores, targets, 0.42)
    assert fixed.threshold == 0.42


def test_average_precision_matches_sklearn():
    scores, targets = _scores(3)
    assert average_precision(scores, targets) == pytest.approx(
        average_precision_score(targets.numpy(), scores.numpy()), abs=1e-6
    )


def test_weighted_sampler_draws_classes_evenly_and_resumes():
    labels = np.array([0] * 950 + [1] * 50)
    w = sample_weights(labels, 2)
    s = EpochBatchSampler(1000, 100, True, False, seed=7, weights=w, num_samples=4000)
    assert len(s) == 40
    s.set_epoch(3)
    drawn = np.array([i for batch in s for _, i in batch])
    assert len(drawn) == 4000
    share = (labels[drawn] == 1).mean()
    assert 0.45 < share < 0.55  # 50/50 in expectation, versus 5% under random sampling
    # Same epoch, same draws; a resume at batch 10 continues the same sequence.
    s.set_epoch(3, start_batch=10)
    again = np.array([i for batch in s for _, i in batch])
    assert np.array_equal(again, drawn[1000:])
    s.set_epoch(4)
    assert not np.array_equal(np.array([i for b in s for _, i in b]), drawn)


@pytest.fixture(scope="module")
def threshold_run(tmp_path_factory):
    from visiontrain.cli import main

    root = tmp_path_factory.mktemp("runs")
    args = [
        "train",
        *TINY,
        "train.epochs=2",
        "train.threshold=best_f1",
        "loss.class_weights=effective",
        "loss.effective_beta=0.99",
        "data.sampler=weighted",
        "data.epoch_samples=128",
        f"run.dir={root}",
        "run.name=thr",
    ]
    assert main(args) == 0
    return root / "thr"


def test_weights_and_sampler_in_force_reach_summary(threshold_run):
    summary = json.loads((threshold_run / "summary.json").read_text())
    counts = summary["train_class_counts"]
    beta = 0.99
    eff = [(1 - beta) / (1 - beta**n) for n in counts]
    expected = [w * len(eff) / sum(eff) for w in eff]
    assert summary["class_weights"] == pytest.approx(expected, rel=1e-5)
    assert summary["sampler"]["name"] == "weighted"
    assert summary["sampler"]["epoch_samples"] == 128
    assert summary["sampler"]["class_probability"] == pytest.approx([0.5, 0.5])
    records = [json.loads(x) for x in (threshold_run / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in records if r.get("kind") == "train_epoch"]
    assert all(r["samples"] == 128 for r in epoch)  # 8 batches of 16 drawn per epoch


def test_threshold_chosen_on_val_applied_to_test_and_saved(threshold_run):
    summary = json.loads((threshold_run / "summary.json").read_text())
    info = summary["threshold"]
    assert info["rule"] == "best_f1"
    t = info["threshold"]
    assert summary["metrics"]["val"]["threshold"] == t
    assert summary["metrics"]["test"]["threshold"] == t
    assert info["val_f1"] == pytest.approx(summary["metrics"]["val"]["per_class"]["defect"]["f1"])
    curve = info["pr_curve"]
    assert len(curve["precision"]) == len(curve["recall"]) == len(curve["thresholds"]) > 1
    state = load_checkpoint(threshold_run / "checkpoints" / "best.pt")
    assert state["task_state"]["threshold"] == t


def test_predict_applies_the_saved_threshold(threshold_run, tmp_path, cli):
    from PIL import Image

    from visiontrain.engine.restore import load_trained
    from visiontrain.predict import predict_outputs

    g = np.random.default_rng(0)
    paths = []
    for i in range(12):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(g.integers(0, 255, (16, 16), dtype=np.uint8)).save(p)
        paths.append(p)
    loaded = load_trained(threshold_run)
    p1 = torch.softmax(torch.stack(predict_outputs(loaded, paths)), dim=1)[:, 1]
    t = loaded.state["task_state"]["threshold"]
    res = cli("predict", threshold_run, tmp_path, "--format", "json")
    assert res.code == 0
    rows = {r["file"]: r["prediction"] for r in json.loads(res.out)}
    for path, score in zip(paths, p1, strict=True):
        assert rows[str(path)] == ("defect" if score >= t else "ok")
    # The saved threshold decides, not argmax: move it and the predictions follow.
    state = load_checkpoint(threshold_run / "checkpoints" / "best.pt")
    from visiontrain.engine.checkpoint import save_checkpoint

    for new_t in (float(p1.min()) - 1e-6, float(p1.max()) + 1e-6):
        state["task_state"]["threshold"] = new_t
        save_checkpoint(tmp_path / "moved.pt", state)
        res = cli("predict", tmp_path / "moved.pt", tmp_path, "--format", "json")
        want = "defect" if new_t < float(p1.min()) else "ok"
        assert {r["prediction"] for r in json.loads(res.out)} == {want}


def test_eval_uses_the_saved_threshold(threshold_run, cli):
    summary = json.loads((threshold_run / "summary.json").read_text())
    res = cli("eval", threshold_run, "--format", "json")
    assert res.code == 0
    metrics = json.loads(res.out)
    assert metrics["threshold"] == summary["threshold"]["threshold"]
    assert metrics["per_class"] == summary["metrics"]["test"]["per_class"]
