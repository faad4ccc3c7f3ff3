"""Image regression end to end: defects damage targets and image folders with labels.csv."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from conftest import TINY_ANY
from visiontrain.config import build_config
from visiontrain.data import build_data
from visiontrain.data.synthetic import generate_defects
from visiontrain.tasks import build_task

REG = [*TINY_ANY, "task=regression"]


def test_generator_targets_are_area_and_count():
    _, labels, targets = generate_defects(60, 24, 0.5, 1, False, max_defects=3)
    assert targets.shape == (60, 2)
    ok = labels == 0
    assert np.all(targets[ok] == 0)
    assert set(np.unique(targets[~ok, 1])) <= {1.0, 2.0, 3.0}
    assert np.all(targets[~ok, 0] > 0) and np.all(targets[:, 0] <= 100)
    # One defect per image reproduces the classification data exactly.
    a = generate_defects(30, 24, 0.2, 5, False)
    b = generate_defects(30, 24, 0.2, 5, False, max_defects=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_metrics_match_sklearn():
    cfg = build_config({}, [*REG])
    bundle = build_data(cfg.data, cfg.task)
    task = build_task(cfg, bundle, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    y = torch.rand(50, 2, generator=g) * torch.tensor([10.0, 3.0])
    pred = y + torch.randn(50, 2, generator=g)
    task.reset_metrics()
    for chunk in range(0, 50, 16):  # several batches, a short last one
        out = (pred[chunk : chunk + 16] - task.mean) / task.std  # the model's standardised output
        task.update_metrics(out, y[chunk : chunk + 16])
    m = task.compute_metrics()
    yn, pn = y.numpy(), pred.numpy()
    assert m["mae"] == pytest.approx(mean_absolute_error(yn, pn), rel=1e-5)
    assert m["r2"] == pytest.approx(r2_score(yn, pn), rel=1e-5)
    for i, name in enumerate(bundle.target_names):
        row = m["per_target"][name]
        assert row["rmse"] == pytest.approx(mean_squared_error(yn[:, i], pn[:, i]) ** 0.5, rel=1e-5)
        assert row["r2"] == pytest.approx(r2_score(yn[:, i], pn[:, i]), rel=1e-5)
    assert m["samples"] == 50


def test_defects_regression_end_to_end(cli, tmp_path):
    res = cli(
        "train",
        *REG,
        "train.epochs=4",
        "data.train_size=192",
        "train.monitor=val/mae/area_pct",
        f"run.dir={tmp_path}",
    )
    assert res.code == 0, res.err
    run = res.run_dir
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train_epoch"]
    assert losses[-1] < losses[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["target_names"] == ["area_pct", "count"]
    assert summary["monitor_mode"] == "min"
    for split in ("val", "test"):
        m = summary["metrics"][split]
        assert {"mae", "rmse", "r2", "per_target"} <= m.keys()
        assert set(m["per_target"]) == {"area_pct", "count"}
    assert "area_pct" in res.out and "rmse" in res.out
    # predict gives values in the targets' units, from the saved scaling.
    img = (generate_defects(1, 16, 1.0, 3, False, 3)[0][0, :, :, 0]).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "one.png")
    out = cli("predict", run, tmp_path / "one.png", "--format", "json")
    assert out.code == 0, out.err
    row = json.loads(out.out)[0]
    assert set(row) == {"file", "area_pct", "count"}
    ev = cli("eval", run, "--format", "json")
    assert json.loads(ev.out)["mae"] == pytest.approx(summary["metrics"]["test"]["mae"], rel=1e-5)


def _regression_folder(root, per_split=True, n=24):
    g = np.random.default_rng(0)
    splits = {"train": n, "val": 8, "test": 8} if per_split else {"": n}
    for split, count in splits.items():
        folder = root / split if split else root
        (folder / "img").mkdir(parents=True)
        lines = ["filename,brightness,contrast"]
        for i in range(count):
            level = g.uniform(20, 230)
            arr = np.clip(g.normal(level, 10, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / "img" / f"{i}.png")
            lines.append(f"img/{i}.png,{level:.3f},{arr.std():.3f}")
        (folder / "labels.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("per_split", [True, False])
def test_imagefolder_labels_csv(cli, tmp_path, per_split):
    _regression_folder(tmp_path / "data", per_split)
    res = cli(
        "train",
        "task=regression",
        "data.name=imagefolder",
        f"data.root={tmp_path / 'data'}",
        "data.image_size=16",
        "data.batch_size=8",
        "model.width=4",
        "model.depth=2",
        "train.epochs=2",
        "train.progress=none",
        f"run.dir={tmp_path / 'runs'}",
    )
    assert res.code == 0, res.err
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert summary["target_names"] == ["brightness", "contrast"]
    assert ("test" in summary["metrics"]) == per_split


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ("../outside.png,1,2", "points outside"),
        ("/etc/passwd,1,2", "points outside"),
        ("img/missing.png,1,2", "does not exist"),
        ("img/0.png,one,2", "are not all numbers"),
        ("img/0.png,1", "2 columns, expected 3"),
        ("img/0.png,nan,2", "must be finite"),
    ],
)
def test_bad_labels_csv_exits_2_naming_file_and_line(cli, tmp_path, row, expected):
    _regression_folder(tmp_path / "data", per_split=False, n=6)
    csv = tmp_path / "data" / "labels.csv"
    csv.write_text(csv.read_text() + row + "\n")
    (tmp_path / "outside.png").write_bytes((tmp_path / "data" / "img" / "0.png").read_bytes())
    res = cli(
        "train",
        "task=regression",
        "data.name=imagefolder",
        f"data.root={tmp_path / 'data'}",
        f"run.dir={tmp_path / 'runs'}",
    )
    assert res.code == 2
    assert f"{csv} line 8" in res.err and expected in res.err
    assert "Traceback" not in res.err
    assert not (tmp_path / "runs").exists()
