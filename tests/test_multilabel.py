"""task=multilabel: sources, losses (ASL), metrics against scikit-learn, per-class thresholds
through eval / predict / ONNX, two-process evaluation, temperature scaling, end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    hamming_loss,
    precision_recall_fscore_support,
)

from conftest import TINY_ANY
from test_det_seg_data import coco_tree, write_json
from test_distributed import HELPERS, finish, torchrun
from visiontrain.config import LossConfig, build_config
from visiontrain.data import build_data
from visiontrain.data.imagefolder import read_label_sets_csv
from visiontrain.data.synthetic import DEFECT_TYPES
from visiontrain.errors import ConfigError, DataError
from visiontrain.losses import LossContext, asymmetric_loss, build_loss, list_losses
from visiontrain.tasks import build_task
from visiontrain.tasks.thresholds import choose_threshold

ML = ["task=multilabel", "data.defect_classes=multilabel", *TINY_ANY]


def _cfg(*overrides: str):
    return build_config({}, [*ML, *overrides])


def _task(*overrides: str):
    cfg = _cfg(*overrides)
    bundle = build_data(cfg.data, cfg.task)
    return build_task(cfg, bundle, torch.device("cpu")), bundle


# --------------------------------------------------------------------------- sources


def test_defects_multilabel_rows_are_label_sets_and_cached():
    cfg = _cfg()
    bundle = build_data(cfg.data, "multilabel")
    assert bundle.class_names == list(DEFECT_TYPES)
    labels = bundle.train.labels
    assert labels.shape == (96, 3) and labels.dtype == np.float32
    assert set(np.unique(labels)) <= {0.0, 1.0}
    per_image = labels.sum(axis=1)
    assert (per_image == 0).any() and (per_image >= 2).any()  # ok images and co-occurrence
    # The images are the regression data's; an image shows at most as many types as defects.
    reg = build_data(build_config({}, [*TINY_ANY, "task=regression"]).data, "regression")
    assert torch.equal(reg.train.images, bundle.train.images)
    counts = reg.train.labels[:, 1]
    assert ((per_image > 0) == (counts > 0)).all() and (per_image <= counts).all()
    again = build_data(cfg.data, "multilabel")
    assert np.array_equal(again.train.labels, labels)


def test_defects_label_modes_are_refused_for_the_other_task():
    with pytest.raises(ConfigError, match="task=multilabel"):
        build_data(
            build_config({}, [*TINY_ANY, "data.defect_classes=multilabel"]).data, "classification"
        )
    with pytest.raises(ConfigError, match="defect_classes=multilabel"):
        build_data(_cfg("data.defect_classes=types").data, "multilabel")


def _png(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)).save(path)


def test_labels_csv_parses_sets_header_and_empty_sets(tmp_path):
    for name in ("a.png", "sub/b.png", "c.png"):
        _png(tmp_path / name)
    csv = tmp_path / "labels.csv"
    csv.write_text("filename,labels\na.png,dog cat\nsub/b.png,\nc.png, cat  \n\n")
    files, rows, names = read_label_sets_csv(csv)
    assert names == ["cat", "dog"]  # every label train uses, sorted
    assert [f.name for f in files] == ["a.png", "b.png", "c.png"]
    assert rows.tolist() == [[1, 1], [0, 0], [1, 0]]
    # Val/test rows are read against train's classes.
    _, rows, names = read_label_sets_csv(csv, ["dog", "cat", "bird"])
    assert rows.tolist() == [[1, 1, 0], [0, 0, 0], [0, 1, 0]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.png,cat\n\na.png,dog\n", r"labels\.csv line 2 is empty"),
        ("a.png,cat\nmissing.png,dog\n", r"labels\.csv line 2: image .*missing\.png"),
        ("a.png,cat\na.png\n", r"line 2: 1 columns, expected 2.*`a\.jpg,`"),
        ("a.png,cat;dog\n", r"line 1: labels 'cat;dog' hold ';'"),
        ("../a.png,cat\n", r"line 1: file name '\.\./a\.png' points outside"),
    ],
)
def test_labels_csv_errors_name_file_and_line(tmp_path, text, message):
    _png(tmp_path / "a.png")  # outside the CSV's folder
    _png(tmp_path / "d" / "a.png")
    csv = tmp_path / "d" / "labels.csv"
    csv.write_text(text)
    with pytest.raises(DataError, match=message):
        read_label_sets_csv(csv)


def test_imagefolder_multilabel_splits_and_unknown_val_label(tmp_path):
    root = tmp_path / "shots"
    for i in range(6):
        _png(root / "train" / f"{i}.png", i)
    _png(root / "val" / "v.png")
    (root / "train" / "labels.csv").write_text(
        "0.png,cat\n1.png,dog cat\n2.png,\n3.png,dog\n4.png,cat\n5.png,bird\n"
    )
    (root / "val" / "labels.csv").write_text("v.png,dog bird\n")
    args = [*TINY_ANY, "task=multilabel", "data.name=imagefolder", f"data.root={root}"]
    args = [
        a for a in args if not a.startswith(("data.train_size", "data.val_size", "data.test_size"))
    ]
    bundle = build_data(build_config({}, args).data, "multilabel")
    assert bundle.class_names == ["bird", "cat", "dog"] and bundle.in_channels == 3
    assert len(bundle.train) == 6 and bundle.val.labels.tolist() == [[1, 0, 1]]
    assert bundle.train.load(1)[1].tolist() == [0, 1, 1]
    (root / "val" / "labels.csv").write_text("v.png,dog\nv.png,fish\n")
    with pytest.raises(DataError, match=r"val.labels\.csv line 2: label 'fish' is not a class"):
        build_data(build_config({}, args).data, "multilabel")


def test_coco_gives_image_level_labels(tmp_path):
    root, data = coco_tree(tmp_path)
    write_json(root, {**data, "images": data["images"][:2]}, "train")
    write_json(root, {**data, "images": data["images"][2:], "annotations": []}, "val")
    cfg = build_config({}, ["task=multilabel", "data.name=coco", f"data.root={root}"])
    bundle = build_data(cfg.data, "multilabel")
    assert bundle.class_names == ["cat", "dog", "zebra"] and bundle.image_size == 224
    # Image 10: zebra, cat, and a crowd dog (present too); image 11: dog (some boxes dropped).
    assert bundle.train.labels.tolist() == [[1, 1, 1], [0, 1, 0]]
    assert bundle.val.labels.tolist() == [[0, 0, 0], [0, 0, 0]]
    image, target = bundle.train.load(0)
    # Prepared as for classification: shorter side to the working size (the crop follows).
    assert image.shape == (3, 224, 298) and target.tolist() == [1, 1, 1]


# ---------------------------------------------------------------------------- losses


def test_multilabel_losses_and_default():
    assert list_losses("multilabel") == ["asl", "bce_with_logits", "focal"]
    assert _cfg().loss.name == "bce_with_logits" and _cfg().train.monitor == "val/map"
    with pytest.raises(ConfigError, match="asl_gamma_neg"):
        build_loss(
            LossConfig(name="bce_with_logits", asl_gamma_neg=2.0), LossContext("multilabel", 3)
        )
    with pytest.raises(ConfigError, match="does not apply to task classification"):
        build_loss(LossConfig(name="asl"), LossContext("classification", 3))


def test_bce_balanced_pos_weight_counts_negatives_per_image():
    counts = torch.tensor([10, 40, 5])
    loss = build_loss(
        LossConfig(name="bce_with_logits", pos_weight="balanced"),
        LossContext("multilabel", 3, counts, num_samples=50),
    )
    assert loss.info["pos_weight"] == [4.0, 0.25, 9.0]  # (N - n_c) / n_c with N images


def _asl_reference(x, y, gamma_neg, gamma_pos, clip):
    """The authors' AsymmetricLoss (github.com/Alibaba-MIIL/ASL), mean instead of sum."""
    xs_pos = torch.sigmoid(x)
    xs_neg = 1 - xs_pos
    if clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    loss = y * torch.log(xs_pos.clamp(min=1e-8)) + (1 - y) * torch.log(xs_neg.clamp(min=1e-8))
    pt = xs_pos * y + xs_neg * (1 - y)
    loss = loss * torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
    return -loss.mean()


def test_asl_is_bce_at_zero_and_the_paper_formula_otherwise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=g) * 3
    y = (torch.rand(32, 5, generator=g) < 0.3).float()
    bce = F.binary_cross_entropy_with_logits(x, y)
    assert torch.allclose(asymmetric_loss(x, y, 0.0, 0.0, 0.0), bce, atol=1e-6)
    for params in [(4.0, 0.0, 0.05), (2.0, 1.0, 0.1), (1.0, 0.5, 0.0)]:
        want = _asl_reference(x, y, *params)
        assert torch.allclose(asymmetric_loss(x, y, *params), want, atol=1e-6), params
    # A negative below the margin costs nothing and gets no gradient; a hard one does.
    logits = torch.tensor([[-5.0, 3.0]], requires_grad=True)
    loss = asymmetric_loss(logits, torch.zeros(1, 2), 4.0, 0.0, 0.05)
    loss.backward()
    assert logits.grad[0, 0] == 0 and logits.grad[0, 1] > 0
    # Saturated logits stay finite (log-sigmoid, no log of 0).
    big = torch.tensor([[80.0, -80.0]], requires_grad=True)
    out = asymmetric_loss(big, torch.tensor([[0.0, 1.0]]), 4.0, 1.0, 0.0)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(big.grad).all()
    built = build_loss(LossConfig(name="asl"), LossContext("multilabel", 5))
    assert built.activation == "sigmoid"
    assert built.info == {"asl_gamma_neg": 4.0, "asl_gamma_pos": 0.0, "asl_clip": 0.05}
    assert torch.allclose(built(x, y), _asl_reference(x, y, 4.0, 0.0, 0.05), atol=1e-6)


def test_focal_is_sigmoid_for_multilabel():
    loss = build_loss(LossConfig(name="focal", focal_gamma=0.0), LossContext("multilabel", 3))
    x, y = torch.randn(8, 3), (torch.rand(8, 3) < 0.5).float()
    assert loss.activation == "sigmoid"
    assert torch.allclose(loss(x, y), F.binary_cross_entropy_with_logits(x, y), atol=1e-6)


# --------------------------------------------------------------------------- metrics


def test_metrics_equal_scikit_learn():
    task, _ = _task()
    g = torch.Generator().manual_seed(3)
    n, c = 150, 3
    y = (torch.rand(n, c, generator=g) < torch.tensor([0.2, 0.5, 0.35])).float()
    # Informative, with ties (rounded logits) so both libraries break them alike.
    logits = (torch.randn(n, c, generator=g) + 1.5 * (2 * y - 1)).mul(4).round().div(4)
    thresholds = [0.35, 0.5, 0.7]
    task.load_state_dict({"thresholds": thresholds})
    task.reset_metrics()
    for i in range(0, n, 64):  # several batches, the last one short
        task.update_metrics(logits[i : i + 64], y[i : i + 64])
    m = task.compute_metrics()
    probs = torch.sigmoid(logits).numpy()
    truth = y.numpy().astype(int)
    pred = (probs >= np.array(thresholds)).astype(int)
    assert m["samples"] == n
    assert m["map"] == pytest.approx(
        average_precision_score(truth, probs, average="macro"), abs=1e-6
    )
    assert m["micro_f1"] == pytest.approx(f1_score(truth, pred, average="micro"), abs=1e-6)
    assert m["macro_f1"] == pytest.approx(f1_score(truth, pred, average="macro"), abs=1e-6)
    assert m["hamming_loss"] == pytest.approx(hamming_loss(truth, pred), abs=1e-6)
    assert m["subset_accuracy"] == pytest.approx(accuracy_score(truth, pred), abs=1e-6)
    p, r, f, s = precision_recall_fscore_support(truth, pred, average=None, zero_division=0)
    ap = average_precision_score(truth, probs, average=None)
    for k, name in enumerate(DEFECT_TYPES):
        row = m["per_class"][name]
        assert row["precision"] == pytest.approx(p[k], abs=1e-6)
        assert row["recall"] == pytest.approx(r[k], abs=1e-6)
        assert row["f1"] == pytest.approx(f[k], abs=1e-6)
        assert row["ap"] == pytest.approx(ap[k], abs=1e-6)
        assert row["support"] == s[k] and row["threshold"] == thresholds[k]
    assert m["cooccurrence"] == (truth.T @ truth).tolist()
    assert m["loss"] == pytest.approx(
        float(F.binary_cross_entropy_with_logits(logits, y)), rel=1e-5
    )
    # A class without a positive image has no AP; map averages the others.
    task.reset_metrics()
    task.update_metrics(logits, torch.cat([y[:, :2], torch.zeros(n, 1)], dim=1))
    m = task.compute_metrics()
    assert math.isnan(m["per_class"]["crack"]["ap"])
    assert m["map"] == pytest.approx(average_precision_score(truth[:, :2], probs[:, :2]), abs=1e-6)


def test_calibrate_chooses_each_class_threshold_on_val():
    task, _ = _task("train.threshold=best_f1")
    g = torch.Generator().manual_seed(1)
    y = (torch.rand(200, 3, generator=g) < 0.4).float()
    logits = torch.randn(200, 3, generator=g) + torch.tensor([0.5, 1.5, 3.0]) * (2 * y - 1)
    task.reset_metrics()
    task.update_metrics(logits, y)
    task.compute_metrics()
    info = task.calibrate()
    probs = torch.sigmoid(logits)
    want = [choose_threshold(probs[:, k], y[:, k].long(), "best_f1").threshold for k in range(3)]
    assert task.state_dict()["thresholds"] == want
    assert list(info["thresholds"].values()) == want and len(set(want)) == 3
    assert task.threshold_info["rule"] == "best_f1"
    assert set(task.threshold_info["per_class"]["crack"]) >= {"threshold", "val_f1", "pr_curve"}


def test_temperature_scaling_recovers_a_known_temperature():
    task, _ = _task("train.calibrate=temperature", "train.threshold=precision>=0.8")
    g = torch.Generator().manual_seed(2)
    true_logits = torch.randn(4000, 3, generator=g) * 2
    y = (torch.rand(4000, 3, generator=g) < torch.sigmoid(true_logits)).float()
    task.reset_metrics()
    task.update_metrics(true_logits * 3, y)  # over-confident by a factor 3
    before = task.compute_metrics()["ece"]
    info = task.calibrate()
    assert info["temperature"] == pytest.approx(3.0, rel=0.1)
    after = task.compute_metrics()
    assert (
        after["ece"] < before
        and task.calibration_info["val_nll_after"] < task.calibration_info["val_nll_before"]
    )
    # Thresholds are chosen on the calibrated probabilities.
    probs = torch.sigmoid(true_logits * 3 / task.temperature)
    want = choose_threshold(probs[:, 0], y[:, 0].long(), "precision>=0.8").threshold
    assert task.thresholds[0] == want
    assert task.state_dict()["temperature"] == task.temperature


# ------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory) -> Path:
    from visiontrain.cli import main

    root = tmp_path_factory.mktemp("ml")
    # 41 val images: not divisible by 2, so a padding sampler would count one twice.
    args = [*ML, "data.val_size=41", "train.epochs=3", "train.threshold=best_f1"]
    assert main(["train", *args, f"run.dir={root}", "run.name=a", "run.report=true"]) == 0
    return root / "a"


def test_train_on_defects_multilabel_end_to_end(ml_run):
    s = json.loads((ml_run / "summary.json").read_text())
    assert s["task"] == "multilabel" and s["loss"]["name"] == "bce_with_logits"
    assert (s["monitor"], s["monitor_mode"]) == ("val/map", "max")
    val = s["metrics"]["val"]
    for key in ("map", "micro_f1", "macro_f1", "subset_accuracy", "hamming_loss", "ece"):
        assert isinstance(val[key], float), key
    assert set(val["per_class"]) == set(DEFECT_TYPES)
    assert set(val["per_class"]["spot"]) == {
        "precision",
        "recall",
        "f1",
        "ap",
        "support",
        "threshold",
    }
    chosen = [s["threshold"]["per_class"][c]["threshold"] for c in DEFECT_TYPES]
    assert [val["per_class"][c]["threshold"] for c in DEFECT_TYPES] == [round(t, 6) for t in chosen]
    assert s["metrics"]["test"]["samples"] == 40
    plots = {p.name for p in (ml_run / "plots").iterdir()}
    assert {"pr_curves.png", "label_cooccurrence.png", "per_class_precision_recall.png"} <= plots


def _png_grey(path: Path, image: torch.Tensor) -> None:
    Image.fromarray(image[0].numpy()).save(path)


@pytest.mark.slow
def test_eval_predict_and_onnx_apply_the_same_thresholds(cli, ml_run, tmp_path):
    ckpt = torch.load(ml_run / "checkpoints" / "best.pt", weights_only=True)
    thresholds = ckpt["task_state"]["thresholds"]
    assert len(thresholds) == 3 and thresholds != [0.5, 0.5, 0.5]
    ev = cli("eval", ml_run, "--split", "val", "--format", "json")
    assert ev.code == 0, ev.err
    metrics = json.loads(ev.out)
    # The val images as files, predicted from the run and from its ONNX export.
    bundle = build_data(build_config({}, [*ML, "data.val_size=41"]).data, "multilabel")
    folder = tmp_path / "val"
    folder.mkdir()
    truth = []
    for i in range(len(bundle.val)):
        image, target = bundle.val.load(i)
        _png_grey(folder / f"{i:03d}.png", image)
        truth.append(target)
    out = tmp_path / "export"
    res = cli(
        "export", ml_run, "--format", "onnx", "--dynamic-batch", "--out", out, "--latency-runs", "0"
    )
    assert res.code == 0, res.err
    meta = json.loads((out / "model.json").read_text())
    assert meta["task"] == "multilabel" and meta["task_state"]["thresholds"] == thresholds

    def rows(target: Path) -> list[dict]:
        r = cli("predict", target, folder, "--format", "json")
        assert r.code == 0, r.err
        return json.loads(r.out)

    run_rows, onnx_rows = rows(ml_run), rows(out / "model.onnx")
    assert [r["labels"] for r in onnx_rows] == [r["labels"] for r in run_rows]
    for a, b in zip(onnx_rows, run_rows, strict=True):
        for c in DEFECT_TYPES:
            assert a["probabilities"][c] == pytest.approx(b["probabilities"][c], abs=1e-5)
    # The label sets predict prints score exactly what eval reported.
    pred = np.array([[c in r["labels"] for c in DEFECT_TYPES] for r in run_rows], dtype=int)
    true = np.stack(truth).astype(int)
    p, r, _, _ = precision_recall_fscore_support(true, pred, average=None, zero_division=0)
    for k, c in enumerate(DEFECT_TYPES):
        assert metrics["per_class"][c]["precision"] == pytest.approx(p[k], abs=1e-6)
        assert metrics["per_class"][c]["recall"] == pytest.approx(r[k], abs=1e-6)
    assert metrics["subset_accuracy"] == pytest.approx(accuracy_score(true, pred), abs=1e-6)
    # And they are the thresholds applied to the printed probabilities.
    for row in run_rows:
        got = [row["probabilities"][c] >= t for c, t in zip(DEFECT_TYPES, thresholds, strict=True)]
        margin = min(
            abs(row["probabilities"][c] - t) for c, t in zip(DEFECT_TYPES, thresholds, strict=True)
        )
        if margin > 1e-6:  # the printed probabilities are rounded to 6 places
            assert got == [c in row["labels"] for c in DEFECT_TYPES]


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process(cli, ml_run, tmp_path):
    best = ml_run / "checkpoints" / "best.pt"
    code, log = finish(torchrun(str(HELPERS / "ddp_eval_probe.py"), str(best), str(tmp_path)))
    assert code == 0, log
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0 == rank1
    single = cli("eval", ml_run, "--split", "val", "--format", "json")
    assert single.code == 0, single.err
    one = json.loads(single.out)
    assert rank0["samples"] == one["samples"] == 41
    for key in ("map", "micro_f1", "macro_f1", "subset_accuracy", "hamming_loss", "ece"):
        assert rank0[key] == one[key], key
    assert rank0["per_class"] == one["per_class"] and rank0["cooccurrence"] == one["cooccurrence"]
    assert rank0["loss"] == pytest.approx(one["loss"], rel=1e-6)


class _Sets(torch.utils.data.Dataset):
    """Images whose label set is which quadrants are bright."""

    def __init__(self, n: int = 24, target=None) -> None:
        self.n, self.target = n, target

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        bits = [(i >> k) & 1 for k in range(2)]
        image = torch.zeros(1, 8, 8, dtype=torch.uint8)
        image[:, :4, :4] = 200 * bits[0]
        image[:, 4:, 4:] = 200 * bits[1]
        return image, self.target if self.target is not None else torch.tensor(bits).float()


def test_python_datasets_train_multilabel(tmp_path):
    import visiontrain as vt

    with pytest.raises(DataError, match="one value in"):
        vt.data.from_datasets(_Sets(target=3), _Sets(), classes=["a", "b"], task="multilabel")
    data = vt.data.from_datasets(_Sets(), _Sets(8), classes=["a", "b"], task="multilabel")
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    cfg = {
        "task": "multilabel",
        "train": {"epochs": 1, "progress": "none"},
        "data": {"batch_size": 8},
        "run": {"dir": str(tmp_path), "report": False},
    }
    s = vt.build_trainer(cfg, model=net, data=data).fit().summary
    assert s["train_label_counts"] == [12, 12] and s["metrics"]["val"]["samples"] == 8
