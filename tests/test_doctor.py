"""``visiontrain doctor``: every planted fault is found; a clean setup has no error."""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from torch import nn

from conftest import TINY, TINY_ANY
from visiontrain.config import Config, build_config
from visiontrain.engine.parts import Parts, build_parts
from visiontrain.errors import DataError
from visiontrain.models import register_model
from visiontrain.tools import doctor
from visiontrain.tools.doctor import Finding, run_doctor


class _DeepMLP(nn.Module):
    """50 Linear+ReLU layers with Xavier init: activations shrink ~1/sqrt(2) per layer."""

    def __init__(self, num_classes: int, in_chans: int, depth: int = 50, hidden: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(4), nn.Flatten()]
        width = in_chans * 16
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _TrainsInEval(nn.Module):
    """A planted fault: forward switches the model back to train mode (BatchNorm updates)."""

    def __init__(self, num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.train()
        h = torch.relu(self.bn(self.conv(x)))
        return self.head(h.mean(dim=(2, 3)))


@register_model("doctor_test_deep_mlp")
def _deep_mlp(num_classes: int, in_chans: int, **_: object) -> nn.Module:
    return _DeepMLP(num_classes, in_chans)


@register_model("doctor_test_trains_in_eval")
def _trains_in_eval(num_classes: int, in_chans: int, **_: object) -> nn.Module:
    return _TrainsInEval(num_classes, in_chans)


def _cfg(*extra: str) -> Config:
    return build_config({}, [*TINY, *extra])


def _run(cfg: Config, checks: list[str], parts: Parts | None = None) -> list[Finding]:
    return run_doctor(cfg, Console(quiet=True), checks=checks, parts=parts)


def _levels(findings: list[Finding]) -> dict[str, str]:
    return {f.name: f.level for f in findings}


def test_clean_tiny_setup_has_no_errors_and_leaves_the_model_alone() -> None:
    cfg = _cfg()
    parts = build_parts(cfg)
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    findings = _run(cfg, doctor.list_checks(), parts)
    # Warnings allowed here: data.loader_speed (a 1k-parameter model computes a step faster
    # than num_workers=0 augments a batch, so waiting dominates).
    errors = [f for f in findings if f.level == "error"]
    assert not errors, errors
    names = {f.name for f in findings}
    assert {"data.class_balance", "train.overfit_one_batch", "eval.mode"} <= names
    assert {"precision.bf16", "precision.fp16"} <= names
    after = parts.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert parts.model.training


def test_imbalance_1_to_50_warns_with_the_remedies() -> None:
    cfg = _cfg("data.defect_rate=0.02", "data.train_size=510")
    (f,) = _run(cfg, ["data.class_balance"])
    assert f.level == "warning"
    assert f.evidence["train_imbalance_ratio"] > 10
    assert "loss.class_weights=effective" in f.fix and "data.sampler=weighted" in f.fix


def test_image_shared_by_train_and_val_is_a_leakage_error() -> None:
    cfg = _cfg()
    parts = build_parts(cfg)
    train, val = parts.bundle.train, parts.bundle.val
    val_load = val.load

    def leaky(index: int):
        image, target = val_load(index)
        return (train.load(3)[0], target) if index == 7 else (image, target)

    val.load = leaky  # instance attribute: shadows the method for this split only
    findings = _run(cfg, ["data.duplicates"], parts)
    errors = [f for f in findings if f.level == "error"]
    assert len(errors) == 1
    assert errors[0].evidence["cross_split_duplicate_images"] == {"train/val": 1}
    example = errors[0].evidence["examples"][0]
    assert train.describe(3) in example and val.describe(7) in example


def test_unreadable_file_and_out_of_range_label_are_errors() -> None:
    cfg = _cfg()
    parts = build_parts(cfg)
    train = parts.bundle.train
    load = train.load

    def broken(index: int):
        if index == 5:
            raise DataError(f"cannot decode {train.describe(index)}")
        return load(index)

    train.load = broken
    train.labels = train.labels.copy()
    train.labels[2] = parts.bundle.num_classes  # one past the last class
    findings = _run(cfg, ["data.readable"], parts)
    assert [f.level for f in findings] == ["error", "error"]
    assert findings[0].evidence["unreadable"]["train"] == 1
    assert findings[1].evidence["out_of_range"] == {"train": 1}


def test_imagefolder_copy_across_splits_and_small_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for cls in ("a", "b"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    # The same file in train and val: leakage that only pixel hashing sees (names differ).
    shutil.copy(tmp_path / "train" / "a" / "0.png", tmp_path / "val" / "a" / "copy.png")
    base = [x for x in TINY_ANY if not x.startswith("data.")]
    cfg = build_config(
        {},
        [*base, "data.name=imagefolder", f"data.root={tmp_path}", "data.image_size=32"],
    )
    findings = _run(cfg, ["data.duplicates", "data.image_sizes"])
    levels = _levels(findings)
    assert levels == {"data.duplicates": "error", "data.image_sizes": "warning"}
    assert "copy.png" in findings[0].evidence["examples"][0]
    assert findings[1].evidence["shorter_side_median"] == 8


def test_deep_xavier_relu_mlp_has_vanishing_activations() -> None:
    cfg = _cfg("model.name=doctor_test_deep_mlp")
    findings = _run(cfg, ["model.init"])
    vanish = [f for f in findings if "vanish" in f.message]
    assert vanish and vanish[0].level == "warning"
    assert vanish[0].evidence["activation_std"]["min_relative"] < 1e-3
    assert vanish[0].evidence["parameters"] > 50 * 32 * 32


def test_labels_not_tied_to_images_fail_the_one_batch_overfit() -> None:
    cfg = _cfg()
    parts = build_parts(cfg)
    train = parts.bundle.train
    load = train.load
    rng = random.Random(0)
    classes = parts.bundle.num_classes
    # A label drawn afresh on every read: not a function of the image.
    train.load = lambda index: (load(index)[0], rng.randrange(classes))
    (f,) = _run(cfg, ["train.overfit_one_batch"], parts)
    assert f.level == "error"
    assert "labels misaligned" in f.fix
    assert f.evidence["loss_last"] > 0.1 * f.evidence["loss_start"]


def test_lr_of_10_is_flagged_by_the_range_test() -> None:
    (f,) = _run(_cfg("optim.lr=10"), ["train.learning_rate"])
    assert f.level in ("warning", "error")
    assert f.evidence["suggestion"] < 10
    assert "optim.lr=" in f.fix


def test_model_that_trains_during_eval_is_an_error() -> None:
    (f,) = _run(_cfg("model.name=doctor_test_trains_in_eval"), ["eval.mode"])
    assert f.level == "error"
    assert f.evidence["modules_in_train_mode_after_forward"]
    assert any("running_mean" in b for b in f.evidence["buffers_changed"])


def test_slow_loader_warns_with_wait_and_compute_times() -> None:
    cfg = _cfg("data.batch_size=4")
    parts = build_parts(cfg)
    train = parts.bundle.train
    load = train.load

    def slow(index: int):
        time.sleep(0.05)
        return load(index)

    train.load = slow
    (f,) = _run(cfg, ["data.loader_speed"], parts)
    assert f.level == "warning"
    assert f.evidence["wait_ms_per_batch"] > f.evidence["compute_ms_per_batch"]
    assert "data.num_workers" in f.fix


def test_a_check_that_raises_becomes_an_error_and_the_rest_still_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(_ctx: doctor.DoctorContext) -> list[Finding]:
        raise RuntimeError("planted")

    with doctor._CHECKS.override("data.readable", broken):
        findings = _run(_cfg(), ["data.class_balance", "data.readable", "data.image_sizes"])
    levels = _levels(findings)
    assert levels["data.readable"] == "error"
    assert "RuntimeError: planted" in findings[1].message
    assert levels["data.class_balance"] == "ok" and "data.image_sizes" in levels


def test_cli_writes_doctor_json_and_exit_codes(cli, tmp_path) -> None:
    res = cli("doctor", *TINY, f"run.dir={tmp_path}", "run.name=clean")
    assert res.code == 0, res.err
    assert res.run_dir == tmp_path / "clean"
    report = json.loads((res.run_dir / "doctor.json").read_text())
    assert report["counts"]["error"] == 0
    assert {f["name"] for f in report["findings"]} >= set(doctor.list_checks()) - {"precision"}
    assert "train.overfit_one_batch" in res.out

    bad = cli(
        "doctor",
        *TINY,
        "model.name=doctor_test_trains_in_eval",
        f"run.dir={tmp_path}",
        "--check",
        "eval.mode",
    )
    assert bad.code == 1
    assert json.loads((bad.run_dir / "doctor.json").read_text())["counts"]["error"] == 1

    unknown = cli("doctor", *TINY, f"run.dir={tmp_path}", "--check", "eval.mod")
    assert unknown.code == 2 and "eval.mode" in unknown.err


def test_flips_on_digits_warn_and_on_defects_do_not() -> None:
    """Mirrored digits lose their class (a model trained without flips says so)."""
    digits = build_config(
        {}, ["data.name=digits", "data.image_size=16", "data.augment=light", "optim.lr=0.003"]
    )
    (finding,) = _run(digits, ["data.flip_symmetry"])
    assert finding.level == "warning", finding
    assert finding.evidence["accuracy_mirrored"] < finding.evidence["accuracy_original"] - 0.1
    assert "data.augment=none" in finding.fix
    (finding,) = _run(_cfg("data.augment=none"), ["data.flip_symmetry"])
    assert finding.level == "ok" and "does not flip" in finding.message
