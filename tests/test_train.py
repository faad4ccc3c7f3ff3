"""End to end: the run-directory contract of a shortened default run."""

import json

import numpy as np
import pytest
import torch
import yaml

from conftest import TINY
from visiontrain.config import build_config
from visiontrain.data import build_data
from visiontrain.engine.checkpoint import load_checkpoint
from visiontrain.engine.restore import load_trained


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from visiontrain.cli import main

    root = tmp_path_factory.mktemp("runs")
    code = main(
        [
            "train",
            *TINY,
            "train.epochs=2",
            "train.log_every=2",
            f"run.dir={root}",
            "run.name=contract",
        ]
    )
    assert code == 0
    return root / "contract"


def test_run_directory_contract(tiny_run):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "env.json", "tb"):
        assert (tiny_run / name).exists(), name
    for name in ("last.pt", "best.pt"):
        assert (tiny_run / "checkpoints" / name).is_file()
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert cfg["data"]["image_size"] == 16 and cfg["train"]["epochs"] == 2
    # The config inside the checkpoint is the resolved config.
    state = load_checkpoint(tiny_run / "checkpoints" / "last.pt")
    assert state["config"] == cfg
    env = json.loads((tiny_run / "env.json").read_text())
    assert env["packages"]["torch"].startswith("2.11")


def test_metrics_records_carry_step_epoch_split_and_hparams(tiny_run):
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "val", "test"}
    for r in records:
        assert {"step", "epoch", "split", "time", "hparams"} <= r.keys()
        assert r["hparams"]["lr"] == pytest.approx(1e-3)
    train = [r for r in records if r.get("kind") == "train_step"]
    assert all({"loss", "lr", "grad_norm", "samples_per_s"} <= r.keys() for r in train)
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in train)
    val = [r for r in records if r["split"] == "val"]
    assert [r["epoch"] for r in val if r["kind"] == "eval"] == [1, 2]  # counted from 1
    # train.threshold=auto: the tuned threshold's val metrics come last, as `calibrated`.
    assert [r["kind"] for r in val][-1] == "calibrated"
    assert all({"loss", "accuracy", "macro_f1", "per_class"} <= r.keys() for r in val)


def test_summary_matches_scikit_learn_on_the_same_predictions(tiny_run):
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    summary = json.loads((tiny_run / "summary.json").read_text())
    test = summary["metrics"]["test"]
    loaded = load_trained(tiny_run)  # best.pt
    cfg = build_config(overrides=TINY)
    bundle = build_data(cfg.data)
    x = loaded.normalizer(bundle.test.images)
    with torch.inference_mode():
        probs = torch.softmax(loaded.model(x), dim=1)
    # The decision uses the threshold chosen on val (train.threshold=auto, best F1).
    threshold = summary["threshold"]["threshold"]
    assert test["threshold"] == threshold and summary["threshold"]["rule"] == "best_f1"
    pred = (probs[:, 1] >= threshold).long().numpy()
    y = bundle.test.labels
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=[0, 1], zero_division=0)
    for i, name in enumerate(["ok", "defect"]):
        row = test["per_class"][name]
        assert row["precision"] == pytest.approx(p[i], abs=1e-6)
        assert row["recall"] == pytest.approx(r[i], abs=1e-6)
        assert row["f1"] == pytest.approx(f[i], abs=1e-6)
        assert row["support"] == s[i]
    assert test["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-6)
    assert test["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-6)
    assert summary["best_epoch"] in (1, 2)
    assert summary["monitor"] == "val/loss"
    assert np.asarray(test["confusion_matrix"]).sum() == len(y)


def test_tensorboard_scalars_read_back(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tiny_run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "val/loss",
        "val/accuracy",
        "val/recall/defect",
        "test/macro_f1",
    } <= tags
    jsonl = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    val_losses = [r["loss"] for r in jsonl if r["split"] == "val"]
    tb_losses = [e.value for e in acc.Scalars("val/loss")]
    assert tb_losses == pytest.approx(val_losses, rel=1e-6)
    assert "config" in "".join(acc.Tags()["tensors"])
    # The LR in force is logged at every optimizer update, not only at log intervals.
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert [e.step for e in acc.Scalars("train/lr")] == list(range(1, summary["global_step"] + 1))


def test_tensorboard_writes_each_updates_lr_at_log_intervals(tmp_path):
    from types import SimpleNamespace

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from visiontrain.tracking.tensorboard import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path, purge_step=None)
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(train=SimpleNamespace(log_every=4)),
        global_step=0,
        last_lr=0.0,
        last_lrs=None,
        at_epoch_end=False,
    )

    def update(step: int, groups: dict[str, float] | None = None) -> None:
        trainer.global_step, trainer.last_lr, trainer.last_lrs = step, step / 100, groups
        logger.on_update(trainer)

    def written() -> dict[str, list[tuple[int, float]]]:
        logger.writer.flush()
        acc = EventAccumulator(str(tmp_path))
        acc.Reload()
        return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}

    for step in (1, 2, 3):
        update(step)
    assert written() == {}  # buffered until the log interval
    update(4, {"head": 0.5})
    lrs = written()
    assert [s for s, _ in lrs["train/lr"]] == [1, 2, 3, 4]
    assert [v for _, v in lrs["train/lr"]] == pytest.approx([0.01, 0.02, 0.03, 0.04])
    assert lrs["train/lr/head"] == [(4, 0.5)]
    update(5)
    logger.close()  # an interrupted run: what is buffered is written too
    assert [s for s, _ in written()["train/lr"]] == [1, 2, 3, 4, 5]


def test_last_printed_line_is_the_run_directory(cli, tmp_path):
    res = cli("train", *TINY, f"run.dir={tmp_path}")
    assert res.code == 0
    assert res.run_dir.parent == tmp_path
    assert (res.run_dir / "summary.json").is_file()


def test_same_seed_writes_same_numbers(cli, tmp_path):
    def numbers(run_dir):
        out = []
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            out.append({k: v for k, v in r.items() if k not in ("time", "samples_per_s")})
        return out

    a = cli("train", *TINY, f"run.dir={tmp_path}", "run.name=a")
    b = cli("train", *TINY, f"run.dir={tmp_path}", "run.name=b")
    assert a.code == b.code == 0
    assert numbers(a.run_dir) == numbers(b.run_dir)


def test_existing_run_is_not_overwritten(cli, tmp_path):
    assert cli("train", *TINY, f"run.dir={tmp_path}", "run.name=x").code == 0
    before = (tmp_path / "x" / "summary.json").read_bytes()
    res = cli("train", *TINY, f"run.dir={tmp_path}", "run.name=x")
    assert res.code == 2 and "already holds a run" in res.err
    assert (tmp_path / "x" / "summary.json").read_bytes() == before


def test_eval_and_predict_verbs(cli, tiny_run, tmp_path):
    res = cli("eval", tiny_run, "--format", "json")
    assert res.code == 0
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert json.loads(res.out)["accuracy"] == pytest.approx(summary["metrics"]["test"]["accuracy"])
    from PIL import Image

    cfg = build_config(overrides=TINY)
    bundle = build_data(cfg.data)
    img = bundle.test.images[0, 0].numpy()
    Image.fromarray(img).save(tmp_path / "one.png")
    res = cli("predict", tiny_run, tmp_path / "one.png", "--format", "json")
    assert res.code == 0
    rows = json.loads(res.out)
    assert rows[0]["prediction"] in ("ok", "defect")
    assert 0.0 <= rows[0]["probability"] <= 1.0


def test_check_validates_without_writing(cli, tmp_path):
    res = cli("train", *TINY, f"run.dir={tmp_path}", "--check")
    assert res.code == 0 and "config OK" in res.out
    assert not any(tmp_path.iterdir())
