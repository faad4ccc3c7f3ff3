"""Bad input exits 2 with a message that names the key or file, and leaves no run behind."""

import pytest
from PIL import Image

from conftest import TINY, TINY_ANY


def _no_run_written(root):
    return not root.exists() or not any(root.rglob("*"))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lrr=0.1", "unknown key `optim.lrr` — did you mean `optim.lr`?"),
        ("train.epochs=many", "`train.epochs` = 'many'"),
        ("optim.lr=-0.1", "`optim.lr` = -0.1"),
        ("data.name=imagenett", "unknown data source"),
        ("model.name=resnet_18", "unknown model"),
        ("loss.name=focall", "unknown loss"),
        ("optim.name=adamx", "unknown optimizer"),
        ("schedule.name=cosin", "unknown schedule"),
        ("train.monitor=val/acc", "train.monitor=val/acc is not a validation metric"),
        ("optim.momentum=0.9", "`optim.momentum` set, but optimizer adamw does not use it"),
        ("model.drop_path=0.1", "simple_cnn has none"),
        ("loss.class_weights=[1,2,3]", "has 3 values but the task has 2 classes"),
        ("data.root=/tmp", "`data.root` set, but data source defects does not use it"),
        ("loss.name=focal loss.focal_alpha=[1,2,3]", "`loss.focal_alpha` has 3"),
        ("task=regression loss.class_weights=balanced", "task regression has none"),
        ("task=regression data.sampler=weighted", "task regression has no classes"),
        ("task=regression loss.name=focal", "does not apply to task regression"),
        ("data.defect_classes=types train.threshold=best_f1", "applies to binary"),
        ("data.epoch_samples=100", "data.sampler=weighted"),
        ("loss.effective_beta=0.9", "only applies with loss.class_weights=effective"),
        ("task=regresion", "did you mean `regression`"),
        ("data.name=digits task=regression", "has no targets for task regression"),
        ("tune.trials=20", "configure `visiontrain tune`; train does not read them"),
    ],
)
def test_bad_config_exits_2(cli, tmp_path, override, expected):
    res = cli("train", *TINY, *override.split(), f"run.dir={tmp_path / 'runs'}")
    assert res.code == 2
    assert expected in res.err
    assert "Traceback" not in res.err
    assert _no_run_written(tmp_path / "runs")


def test_missing_data_root(cli, tmp_path):
    res = cli(
        "train",
        *TINY_ANY,
        "data.name=imagefolder",
        f"data.root={tmp_path / 'nope'}",
        f"run.dir={tmp_path / 'runs'}",
    )
    assert res.code == 2 and "has no train/ folder" in res.err and "nope" in res.err
    assert _no_run_written(tmp_path / "runs")


def _folder(root, classes=("cat", "dog"), n=6):
    for c in classes:
        (root / "train" / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (20, 20), (i * 30, 100, 50)).save(root / "train" / c / f"{i}.png")


def test_empty_class_folder(cli, tmp_path):
    _folder(tmp_path / "data")
    (tmp_path / "data" / "train" / "bird").mkdir()
    res = cli(
        "train",
        *TINY_ANY,
        "data.name=imagefolder",
        f"data.root={tmp_path / 'data'}",
        f"run.dir={tmp_path / 'runs'}",
    )
    assert res.code == 2 and "bird" in res.err and "holds no images" in res.err
    assert _no_run_written(tmp_path / "runs")


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_exits_2_naming_the_file(cli, tmp_path, workers):
    _folder(tmp_path / "data")
    bad = tmp_path / "data" / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    res = cli(
        "train",
        *TINY_ANY,
        "data.name=imagefolder",
        f"data.root={tmp_path / 'data'}",
        f"data.num_workers={workers}",
        "data.val_split=0.3",
        f"run.dir={tmp_path / 'runs'}",
    )
    assert res.code == 2
    assert str(bad) in res.err and "data.on_error=skip" in res.err
    assert "Traceback" not in res.err
    assert not list((tmp_path / "runs").rglob("summary.json"))


def test_corrupt_image_skipped_and_counted(cli, tmp_path):
    import json

    _folder(tmp_path / "data")
    bad = tmp_path / "data" / "train" / "dog" / "broken.png"
    bad.write_bytes(b"")
    res = cli(
        "train",
        *TINY_ANY,
        "data.name=imagefolder",
        f"data.root={tmp_path / 'data'}",
        "data.on_error=skip",
        "data.val_split=0.3",
        f"run.dir={tmp_path / 'runs'}",
    )
    assert res.code == 0, res.err
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert summary["skipped_files"]["count"] == 1
    assert summary["skipped_files"]["files"] == [str(bad)]


def test_unknown_verb_and_no_verb(cli):
    assert cli().code == 2
    with pytest.raises(SystemExit) as info:
        cli("frobnicate")
    assert info.value.code == 2
