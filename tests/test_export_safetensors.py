"""``visiontrain export --format safetensors``: the eval weights, model.json, predict on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import visiontrain as vt
from conftest import TINY
from test_export import _predict_rows, _train
from visiontrain.engine.checkpoint import eval_weights, load_checkpoint
from visiontrain.engine.restore import load_trained


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return got.keys() == want.keys() and all(
        got[k].dtype == w.dtype and got[k].shape == w.shape and torch.equal(_bits(got[k]), _bits(w))
        for k, w in want.items()
    )


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("st_cls"), TINY)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("st_ema"), [*TINY, "train.ema=true"])


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("st_images")
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(20, 24), (40, 30)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(folder / f"im{i}.png")
    return folder


def _export(cli, run: Path, out: Path, *extra: str):
    return cli("export", run, "--format", "safetensors", "--out", out, *extra)


def test_export_writes_safetensors_and_model_json(cli, cls_run, tmp_path):
    res = _export(cli, cls_run, tmp_path)
    assert res.code == 0, res.err
    artifact = tmp_path / "model.safetensors"
    assert res.run_dir == artifact  # the last line is the file, as for pt2/onnx
    assert "check (safetensors load_file, bitwise)" in res.out and ": OK" in res.out
    meta = json.loads((tmp_path / "model.json").read_text())
    entry = meta["artifacts"]["model.safetensors"]
    assert entry["format"] == "safetensors" and entry["weights"] == "model"
    assert entry["check"]["bitwise_equal"] is True and "batch" not in entry
    assert meta["task"] == "classification" and meta["class_names"] == ["ok", "defect"]
    assert meta["preprocessing"]["image_size"] == 16
    state = load_checkpoint(cls_run / "checkpoints" / "best.pt")
    assert meta["config"] == state["config"]
    with safe_open(str(artifact), "pt") as fh:
        header = fh.metadata()
    assert header["model"] == "simple_cnn" and header["run"] == cls_run.name
    assert header["task"] == "classification" and json.loads(header["config"]) == state["config"]


def test_file_equals_the_checkpoints_eval_weights_bitwise(cli, cls_run, tmp_path):
    assert _export(cli, cls_run, tmp_path).code == 0
    got = load_file(str(tmp_path / "model.safetensors"))
    state = load_checkpoint(cls_run / "checkpoints" / "best.pt")
    assert _bitwise_equal(got, eval_weights(state))
    # The plain state_dict keys of the rebuilt module: no DDP/compile prefix.
    assert got.keys() == load_trained(cls_run).model.state_dict().keys()


def test_an_ema_run_exports_the_ema_weights(cli, ema_run, tmp_path):
    res = _export(cli, ema_run, tmp_path)
    assert res.code == 0, res.err
    assert "EMA weights" in res.out
    got = load_file(str(tmp_path / "model.safetensors"))
    state = load_checkpoint(ema_run / "checkpoints" / "best.pt")
    assert _bitwise_equal(got, state["ema"]["module"])
    assert not _bitwise_equal(got, state["model"])
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["artifacts"]["model.safetensors"]["weights"] == "ema"


@pytest.mark.parametrize(
    "option", [["--dynamic-batch"], ["--tolerance", "1e-3"], ["--latency-runs", "5"]]
)
def test_an_option_without_meaning_for_safetensors_exits_2(cli, cls_run, tmp_path, option):
    res = _export(cli, cls_run, tmp_path, *option)
    assert res.code == 2
    assert option[0] in res.err and "safetensors" in res.err
    assert "Traceback" not in res.err and len(res.err.strip().splitlines()) == 1
    assert not (tmp_path / "model.safetensors").exists()


def test_predict_from_the_weights_equals_the_run(cli, ema_run, images, tmp_path):
    out = tmp_path / "export"
    assert _export(cli, ema_run, out).code == 0
    want = _predict_rows(cli, ema_run, images, tmp_path / "a")
    # The file, its model.json and the folder (one artifact in it) all load the same.
    for target in (out / "model.safetensors", out / "model.json", out):
        got = _predict_rows(cli, target, images, tmp_path / "b")
        assert [r["prediction"] for r in got] == [r["prediction"] for r in want]
        for a, b in zip(got, want, strict=True):
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-6)
    predictor = vt.load(out / "model.safetensors")
    assert predictor.model is not None and not predictor.model.training


def test_a_folder_of_several_artifacts_needs_the_file_named(cli, cls_run, images, tmp_path):
    assert _export(cli, cls_run, tmp_path).code == 0
    meta_path = tmp_path / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["artifacts"]["model.onnx"] = {"format": "onnx", "batch": 1, "sha256": "x"}
    meta_path.write_text(json.dumps(meta))
    res = cli("predict", tmp_path, images)
    assert res.code == 2 and "pass the artifact file" in res.err


def test_verify_finds_a_changed_weight_and_refuses_a_truncated_file(cli, cls_run, tmp_path):
    assert _export(cli, cls_run, tmp_path).code == 0
    artifact = tmp_path / "model.safetensors"
    assert cli("export", cls_run, "--verify", artifact).code == 0
    weights = load_file(str(artifact))
    key = next(k for k, t in weights.items() if t.is_floating_point() and t.numel())
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] += 1.0
    save_file(weights, str(artifact))
    res = cli("export", cls_run, "--verify", artifact)
    assert res.code == 1 and "FAILED" in res.out and key in res.out
    artifact.write_bytes(artifact.read_bytes()[:100])
    res = cli("export", cls_run, "--verify", artifact)
    assert res.code == 2 and "truncated" in res.err
