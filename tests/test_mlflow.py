"""MLflow logger: params, per-step metrics, artifacts, resume, stores, and its refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import TINY
from visiontrain.config import build_config
from visiontrain.tracking.mlflow import config_params, record_metrics, tracking_target

MlflowClient = pytest.importorskip("mlflow.tracking").MlflowClient

MLFLOW = [*TINY, "train.log_every=2", "run.loggers=[jsonl,mlflow]"]


def only_run(uri: str, experiment: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment} in {uri}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def train_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r["step"] for r in records if r.get("kind") == "train_step"]


def test_default_store_params_metrics_and_artifacts(cli, tmp_path):
    res = cli("train", *MLFLOW, f"run.dir={tmp_path}", "run.name=first")
    assert res.code == 0, res.err
    run_dir = res.run_dir
    assert not (run_dir / "tb").exists()  # tensorboard not in run.loggers
    uri, _ = tracking_target(build_config(overrides=[f"run.dir={tmp_path}"]))
    assert (tmp_path / "mlflow.db").is_file()
    client, run = only_run(uri, "visiontrain-classification-defects")
    assert run.info.run_name == "first"
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["optim.lr"] == "0.001"
    assert params["run.loggers"] == '["jsonl", "mlflow"]'
    assert params["train.early_stopping.patience"] == "null"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == train_steps(run_dir) == [2, 4, 6]
    for key in ("train/lr", "train/grad_norm", "train/samples_per_s", "val/loss", "test/loss"):
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")] == [6]
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "checkpoints"} <= top
    ckpts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert ckpts == {"checkpoints/best.pt"}
    summary_copy = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    summary = json.loads(Path(summary_copy).read_text())
    assert summary["global_step"] == 6
    # The artifacts sit next to the database, not in the working directory.
    assert run.info.artifact_uri.startswith(str(tmp_path / "mlartifacts"))


def test_resume_continues_the_same_mlflow_run_on_sqlite_uri(cli, tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    common = [*MLFLOW, f"run.dir={tmp_path}", "run.name=r", f"run.mlflow_uri={uri}"]
    common.append("run.mlflow_experiment=exp one")
    assert cli("train", *common).code == 0
    _, first = only_run(uri, "exp one")
    res = cli("train", *common, "train.epochs=2", "run.resume=auto")
    assert res.code == 0, res.err
    assert "resuming from" in res.out
    client, run = only_run(uri, "exp one")
    assert run.info.run_id == first.info.run_id
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == train_steps(res.run_dir) == [2, 4, 6, 8, 10, 12]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [6, 12]


def test_file_store_when_mlflow_allows_it(cli, tmp_path, monkeypatch):
    uri = (tmp_path / "mlruns").as_uri()
    args = [*MLFLOW, f"run.dir={tmp_path}", "run.name=f", f"run.mlflow_uri={uri}"]
    # MLflow 3 refuses its folder store unless asked to allow it: a clear exit 2 up front.
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    refused = cli("train", *args)
    assert refused.code == 2
    assert "MLFLOW_ALLOW_FILE_STORE" in refused.err + refused.out
    assert not (tmp_path / "f").exists()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    res = cli("train", *args)
    assert res.code == 0, res.err
    client, run = only_run(uri, "visiontrain-classification-defects")
    assert "checkpoints" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_check_writes_no_store_and_missing_mlflow_is_a_config_error(cli, tmp_path, monkeypatch):
    res = cli("train", "--check", *MLFLOW, f"run.dir={tmp_path}")
    assert res.code == 0, res.err
    assert not (tmp_path / "mlflow.db").exists()
    # None in sys.modules makes `import mlflow` raise ImportError, as when not installed.
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.setitem(sys.modules, name, None)
    refused = cli("train", "--check", *MLFLOW, f"run.dir={tmp_path}")
    assert refused.code == 2
    assert "pip install 'visiontrain[mlflow]'" in refused.err + refused.out
    assert list(tmp_path.iterdir()) == []


def test_jsonl_only_writes_neither_tensorboard_nor_mlflow(cli, tmp_path):
    res = cli("train", *TINY, f"run.dir={tmp_path}", "run.loggers=[jsonl]")
    assert res.code == 0, res.err
    assert (res.run_dir / "metrics.jsonl").is_file()
    assert not (res.run_dir / "tb").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_params_are_dotted_config_keys_cut_to_mlflow_limit():
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    long_name = "x" * (MAX_PARAM_VAL_LENGTH + 50)
    cfg = build_config(overrides=[f"run.name={long_name}", "loss.term_weights={a: 1.0}"])
    params = config_params(cfg)
    assert len(params["run.name"]) == MAX_PARAM_VAL_LENGTH
    assert params["train.early_stopping.min_delta"] == "0.0"
    assert params["loss.term_weights"] == '{"a": 1.0}'  # a mapping value is one setting
    assert "tune.space" in params
    assert not any(key.startswith("train.early_stopping") and key.count(".") == 1 for key in params)


def test_record_metrics_names_and_skips():
    step = {
        "step": 4,
        "epoch": 0,
        "split": "train",
        "kind": "train_step",
        "loss": 0.5,
        "loss_box": 0.1,
        "lr": 1e-3,
        "grad_norm": None,
        "samples_per_s": 100.0,
        "time": 1.0,
        "hparams": {"lr": 1e-3},
    }
    assert record_metrics(step) == {
        "train/loss": 0.5,
        "train/loss_box": 0.1,
        "train/lr": 1e-3,
        "train/samples_per_s": 100.0,
    }
    ev = {
        "step": 6,
        "split": "test",
        "kind": "eval",
        "accuracy": 1,
        "samples": 40,
        "per_class": {"ok": {"f1": 1.0}},
        "improved": True,
    }
    assert record_metrics(ev) == {"test/accuracy": 1.0}
    epoch = {"step": 6, "split": "train", "kind": "train_epoch", "loss": 0.4, "samples": 96}
    assert record_metrics(epoch) == {"train/epoch_loss": 0.4}
