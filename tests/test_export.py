"""``visiontrain export``: pt2 and ONNX artifacts, the fresh-process check, predict on them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY
from visiontrain.cli import main
from visiontrain.export.artifact import load_runner

SEG = [
    "task=segmentation",
    "data.name=shapes",
    "data.image_size=32",
    "data.train_size=8",
    "data.val_size=4",
    "data.test_size=4",
    "data.batch_size=4",
    "model.name=unet",
    "model.encoder=resnet18",
    "train.epochs=1",
    "train.progress=none",
]
DET = [
    "task=detection",
    "data.name=shapes",
    "data.image_size=64",
    "data.train_size=8",
    "data.val_size=4",
    "data.test_size=4",
    "data.batch_size=4",
    "model.name=fcos_tiny",
    "model.width=8",
    "train.epochs=1",
    "train.progress=none",
]
# No latency table in most tests: it is timing, not behaviour.
QUIET = ["--latency-runs", "0"]


def _train(root: Path, args: list[str]) -> Path:
    assert main(["train", *args, f"run.dir={root}"]) == 0
    (run,) = root.iterdir()
    return run


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("cls"), TINY)


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("seg"), SEG)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Odd-sized files, so that centre crop and letterbox both have work to do."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(20, 24), (40, 30), (17, 17)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(folder / f"im{i}.png")
    return folder


def _predict_rows(cli, target: Path, images: Path, out: Path) -> list[dict]:
    res = cli("predict", target, images, "--format", "json", "--out", out)
    assert res.code == 0, res.err
    # Segmentation prints where the masks went before the JSON.
    return json.loads(res.out[res.out.index("[") :])


@pytest.fixture(scope="module")
def cls_export(cls_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A static-batch pt2 and a dynamic-batch onnx of the classifier, in one folder."""
    out = tmp_path_factory.mktemp("cls_export")
    assert main(["export", str(cls_run), "--format", "pt2", "--out", str(out), *QUIET]) == 0
    args = ["--format", "onnx", "--dynamic-batch", "--out", str(out), *QUIET]
    assert main(["export", str(cls_run), *args]) == 0
    return out


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "export"))


def test_model_json_describes_both_artifacts(cls_export):
    meta = json.loads((cls_export / "model.json").read_text())
    assert meta["task"] == "classification" and meta["class_names"] == ["ok", "defect"]
    assert meta["task_state"]["threshold"] is not None
    assert meta["input"]["dtype"] == "uint8" and meta["preprocessing"]["fit"] == "center_crop"
    assert set(meta["artifacts"]) == {"model.pt2", "model.onnx"}
    assert meta["artifacts"]["model.pt2"]["batch"] == 1
    assert meta["artifacts"]["model.onnx"]["batch"] == "dynamic"
    assert all(e["check"]["max_abs_diff"] <= 1e-4 for e in meta["artifacts"].values())


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_predict_with_the_artifact_equals_the_checkpoint(
    cli, cls_run, cls_export, images, tmp_path, fmt
):
    want = _predict_rows(cli, cls_run, images, tmp_path / "a")
    got = _predict_rows(cli, cls_export / f"model.{fmt}", images, tmp_path / "b")
    assert [r["prediction"] for r in got] == [r["prediction"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_segmentation_export_predicts_the_same_masks(cli, seg_run, images, tmp_path, fmt):
    out = tmp_path / "export"
    res = cli("export", seg_run, "--format", fmt, "--out", out, *QUIET)
    assert res.code == 0, res.err
    assert "check (fresh process" in res.out and ": OK" in res.out
    meta = json.loads((out / "model.json").read_text())
    assert meta["preprocessing"]["fit"] == "fit_square" and meta["class_names"][0] == "background"
    want = _predict_rows(cli, seg_run, images, tmp_path / "a")
    got = _predict_rows(cli, out / f"model.{fmt}", images, tmp_path / "b")
    for a, b in zip(got, want, strict=True):
        mask_a = np.array(Image.open(a["mask"]))
        mask_b = np.array(Image.open(b["mask"]))
        assert mask_a.shape == mask_b.shape
        # Pixels whose two best logits tie within float error may flip; nothing else.
        assert (mask_a != mask_b).mean() < 0.01


def test_dynamic_batch_runs_at_batch_1_and_3_in_the_default_folder(cli, cls_run, cls_export):
    res = cli("export", cls_run, "--format", "pt2", "--dynamic-batch", "--latency-runs", "1")
    assert res.code == 0, res.err
    assert "check (fresh process" in res.out and ": OK" in res.out
    assert "eager ms" in res.out and "pt2 ms" in res.out  # the latency table
    assert (cls_run / "export" / "model.json").is_file()
    for artifact in (cls_run / "export" / "model.pt2", cls_export / "model.onnx"):
        run = load_runner(artifact)
        for n in (1, 3):
            x = torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8)
            assert run(x).shape == (n, 2)


def _tamper_onnx(path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    array = numpy_helper.to_array(init).copy()
    array += 0.5
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, str(path))


def _tamper_pt2(path: Path) -> None:
    program = torch.export.load(str(path))
    name = max(program.state_dict, key=lambda k: program.state_dict[k].numel())
    with torch.no_grad():
        program.state_dict[name].add_(0.5)
    torch.export.save(program, str(path))


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_a_changed_weight_fails_the_check_with_exit_1(cli, cls_run, cls_export, tmp_path, fmt):
    artifact = _copy(cls_export, tmp_path) / f"model.{fmt}"
    (_tamper_pt2 if fmt == "pt2" else _tamper_onnx)(artifact)
    res = cli("export", cls_run, "--verify", artifact, *QUIET)
    assert res.code == 1
    assert "FAILED" in res.out and "does not reproduce the eager model" in res.err


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_a_truncated_artifact_is_refused_with_exit_2(
    cli, cls_run, cls_export, images, tmp_path, fmt
):
    artifact = _copy(cls_export, tmp_path) / f"model.{fmt}"
    artifact.write_bytes(artifact.read_bytes()[: artifact.stat().st_size // 2])
    res = cli("export", cls_run, "--verify", artifact, *QUIET)
    assert res.code == 2 and "truncated" in res.err and str(artifact) in res.err
    res = cli("predict", artifact, images)
    assert res.code == 2 and "truncated" in res.err


def test_predict_without_model_json_exits_2(cli, cls_export, images, tmp_path):
    out = cls_export
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(out / "model.onnx", lone / "model.onnx")
    res = cli("predict", lone / "model.onnx", images)
    assert res.code == 2 and "model.json" in res.err and "is missing" in res.err


# --------------------------------------------------------------------------- detection


@pytest.fixture(scope="module")
def det_low_threshold():
    """FCOS keeps scores above 0.2; after one epoch none is, so nothing would be compared.

    Every score counts instead (top 10 per image), for the eager model and, through the
    value recorded in model.json, for the artifact's post-processing alike.
    """
    import visiontrain.models.dense as dense

    built = dense._detector_kwargs
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            dense,
            "_detector_kwargs",
            lambda *a: {**built(*a), "score_thresh": 0.0, "detections_per_img": 10},
        )
        yield


@pytest.fixture(scope="module")
def det_run(tmp_path_factory: pytest.TempPathFactory, det_low_threshold) -> Path:
    return _train(tmp_path_factory.mktemp("det"), DET)


@pytest.fixture(scope="module")
def det_export(det_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A batch-1 pt2 and a dynamic-batch onnx of the FCOS network, in one folder."""
    out = tmp_path_factory.mktemp("det_export")
    assert main(["export", str(det_run), "--format", "pt2", "--out", str(out), *QUIET]) == 0
    args = ["--format", "onnx", "--dynamic-batch", "--out", str(out), *QUIET]
    assert main(["export", str(det_run), *args]) == 0
    return out


def test_detection_model_json_holds_the_post_processing(det_export):
    meta = json.loads((det_export / "model.json").read_text())
    det = meta["detection"]
    assert meta["task"] == "detection" and det["architecture"] == "fcos"
    assert det["outputs"] == ["cls_logits", "bbox_regression", "bbox_ctrness"]
    assert det["score_thresh"] == 0.0 and det["label_offset"] == 1
    anchors = torch.load(det_export / "anchors.pt", weights_only=True)
    assert list(anchors.shape) == det["anchors"]["shape"]
    assert anchors.shape[0] == sum(det["num_anchors_per_level"])
    for entry in meta["artifacts"].values():
        # The check compared post-processed detections, not just the raw head outputs.
        assert entry["check"]["boxes"] > 0 and entry["check"]["box_diff"] <= 1e-3


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_detection_artifact_predicts_the_checkpoints_boxes(
    cli, det_run, det_export, images, tmp_path, fmt
):
    threshold = ["--score-threshold", "0"]
    res = cli("predict", det_run, images, "--format", "json", *threshold)
    assert res.code == 0, res.err
    want = json.loads(res.out)
    res = cli("predict", det_export / f"model.{fmt}", images, "--format", "json", *threshold)
    assert res.code == 0, res.err
    got = json.loads(res.out)
    assert sum(len(r["detections"]) for r in want) > 0
    for a, b in zip(got, want, strict=True):
        assert [d["class"] for d in a["detections"]] == [d["class"] for d in b["detections"]]
        for da, db in zip(a["detections"], b["detections"], strict=True):
            assert da["box"] == pytest.approx(db["box"], abs=1e-3)
            assert da["score"] == pytest.approx(db["score"], abs=1e-4)


def test_detection_postprocess_is_public(det_export):
    from visiontrain.export.artifact import detection_postprocess, exported_outputs, load_exported

    x = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    run = load_runner(det_export / "model.onnx")
    dets = detection_postprocess(run(x), det_export / "model.json")
    want = exported_outputs(load_exported(det_export / "model.onnx"), x)
    assert len(dets) == 3
    for a, b in zip(dets, want, strict=True):
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["boxes"], b["boxes"])


def test_detection_changed_weight_fails_the_check(cli, det_run, det_export, tmp_path):
    artifact = _copy(det_export, tmp_path) / "model.pt2"
    _tamper_pt2(artifact)
    res = cli("export", det_run, "--verify", artifact, *QUIET)
    assert res.code == 1
    assert "FAILED" in res.out and "does not reproduce the eager model" in res.err


def test_detection_changed_anchors_are_refused(cli, det_export, images, tmp_path):
    folder = _copy(det_export, tmp_path)
    anchors = torch.load(folder / "anchors.pt", weights_only=True)
    torch.save(anchors + 1, folder / "anchors.pt")
    res = cli("predict", folder / "model.pt2", images)
    assert res.code == 2 and "anchors.pt does not match the sha256" in res.err


def test_two_stage_detection_is_refused_with_the_reason(cli, tmp_path):
    args = [a if a != "model.name=fcos_tiny" else "model.name=fasterrcnn_tiny" for a in DET]
    run = _train(tmp_path / "runs", [*args, "data.image_size=32", "data.train_size=4"])
    res = cli("export", run, "--format", "pt2", *QUIET)
    assert res.code == 2 and "FasterRCNN does not export" in res.err
    assert "NMS" in res.err and "fcos_tiny" in res.err and "backbone" in res.err
