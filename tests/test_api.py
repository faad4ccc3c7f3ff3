"""The public Python API: vt.train, vt.build_trainer with a user's own module and Datasets,
vt.load(...).predict, and typed errors that write nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import TINY, run_subprocess
from torch import nn

import visiontrain as vt

SCRIPT = Path(__file__).parent / "helpers" / "own_model_script.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _script(
    *args: str, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or ENV,
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def _numbers(path: Path) -> list[dict]:
    """metrics.jsonl without the fields that measure time."""
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        for key in ("time", "samples_per_s"):
            rec.pop(key, None)
        out.append(rec)
    return out


@pytest.mark.slow
def test_own_module_and_dataset_survive_sigterm_and_resume_bit_identical(tmp_path):
    whole = _script(tmp_path, "whole", "train")
    assert whole.returncode == 0, whole.stderr
    # Update 5 of 27 sits inside epoch 1 (9 updates per epoch), mid-epoch.
    stopped = _script(tmp_path, "cut", "train", env={**ENV, "VT_TEST_SIGTERM_AT": "5"})
    assert stopped.returncode == 143, stopped.stderr
    assert "stopped by signal" in stopped.stderr
    assert (tmp_path / "cut" / "checkpoints" / "last.pt").is_file()
    resumed = _script(tmp_path, "cut", "train", "run.resume=auto")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("last.pt", "best.pt"):
        a = _weights(tmp_path / "whole" / "checkpoints" / name)
        b = _weights(tmp_path / "cut" / "checkpoints" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    s1 = json.loads(whole.stdout.splitlines()[-1])["summary"]
    s2 = json.loads(resumed.stdout.splitlines()[-1])["summary"]
    assert s1["metrics"] == s2["metrics"]
    # The user's module was recorded as such, and the run's report-free files are whole.
    assert s1["best_epoch"] == s2["best_epoch"]


@pytest.mark.slow
def test_own_module_under_torchrun_matches_a_one_process_evaluation(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node=2",
        str(SCRIPT),
        str(tmp_path),
        "ddp",
        "train",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])["summary"]
    assert summary["world_size"] == 2
    one = _script(tmp_path, "ddp", "eval")
    assert one.returncode == 0, one.stderr
    single = json.loads(one.stdout.strip().splitlines()[-1])
    val = summary["metrics"]["val"]
    assert single["samples"] == val["samples"] == 41
    for key in ("loss", "accuracy", "macro_f1", "average_precision"):
        assert single[key] == pytest.approx(val[key], abs=1e-6), key
    for name, row in val["per_class"].items():
        for metric, value in row.items():
            assert single["per_class"][name][metric] == pytest.approx(value, abs=1e-6)


def test_vt_train_writes_the_numbers_of_visiontrain_train(tmp_path):
    args = [*TINY, f"run.dir={tmp_path}"]
    proc = run_subprocess("train", *args, "run.name=cli", env=ENV)
    assert proc.returncode == 0, proc.stderr
    # data= as a dict is the config section (the Datasets go there as a DatasetSource).
    result = vt.train(None, *args, run={"name": "api"}, data={"batch_size": 16})
    assert result.run_dir == tmp_path / "api"
    assert result.best_checkpoint == tmp_path / "api" / "checkpoints" / "best.pt"
    assert (
        result.summary["metrics"]
        == json.loads((tmp_path / "api" / "summary.json").read_text())["metrics"]
    )
    cli_records = _numbers(tmp_path / "cli" / "metrics.jsonl")
    api_records = _numbers(tmp_path / "api" / "metrics.jsonl")
    assert cli_records == api_records and len(cli_records) > 3


def test_load_predict_equals_visiontrain_predict_for_checkpoint_and_onnx(tmp_path):
    result = vt.train(None, *TINY, run={"dir": str(tmp_path), "name": "p"})
    folder = tmp_path / "imgs"
    folder.mkdir()
    from torchvision.io import write_png

    g = torch.Generator().manual_seed(3)
    for i in range(5):
        write_png(
            torch.randint(0, 255, (3, 20, 24), dtype=torch.uint8, generator=g),
            str(folder / f"{i}.png"),
        )
    images = sorted(folder.glob("*.png"))
    exported = run_subprocess(
        "export", result.run_dir, "--format", "onnx", "--latency-runs", "0", env=ENV
    )
    assert exported.returncode == 0, exported.stderr
    onnx = result.run_dir / "export" / "model.onnx"
    for target in (result.best_checkpoint, onnx):
        proc = run_subprocess("predict", target, *images, "--format", "json", env=ENV)
        assert proc.returncode == 0, proc.stderr
        expected = json.loads(proc.stdout)
        got = vt.load(target).predict([str(p) for p in images])
        assert got == expected
    # In-memory images give the same predictions as their files.
    from torchvision.io import decode_image

    tensors = [decode_image(str(p)) for p in images]
    rows = vt.load(result.best_checkpoint).predict(tensors)
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in expected]
    assert rows[0]["index"] == 0


class _Shapes(torch.utils.data.Dataset):
    def __init__(self, image=None, target=0, n=8):
        self.image = image if image is not None else torch.zeros(3, 16, 16, dtype=torch.uint8)
        self.target, self.n = target, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.image, self.target


def _net(outputs: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, outputs))


def test_bad_input_raises_typed_errors_and_writes_nothing(tmp_path):
    run = {"dir": str(tmp_path)}
    with pytest.raises(vt.ConfigError, match=r"optim\.lr"):
        vt.train(None, "optim.lrr=0.1", run=run)
    with pytest.raises(vt.ConfigError, match=r"`train.epoch` — did you mean `train.epochs`"):
        vt.train(None, train={"epoch": 2}, run=run)
    with pytest.raises(vt.DataError, match=r"torch.float32 image.*uint8"):
        vt.data.from_datasets(_Shapes(image=torch.rand(3, 16, 16)), _Shapes(), classes=["a", "b"])
    with pytest.raises(vt.DataError, match=r"val Dataset sample 0 yields a target of type str"):
        vt.data.from_datasets(_Shapes(), _Shapes(target="a"), classes=["a", "b"])
    with pytest.raises(vt.DataError, match=r"yields class 5"):
        vt.data.from_datasets(_Shapes(target=5), _Shapes(), classes=["a", "b"])
    data = vt.data.from_datasets(_Shapes(), _Shapes(), classes=["a", "b"])
    with pytest.raises(vt.ConfigError, match=r"returns outputs of shape \(2, 3\).*2 classes"):
        vt.build_trainer({"run": run}, model=_net(3), data=data).fit()
    with pytest.raises(vt.ConfigError, match=r"model.width"):
        vt.build_trainer({"run": run, "model": {"width": 8}}, model=_net(2), data=data).fit()
    mask = torch.zeros(16, 16, dtype=torch.int64)
    seg = vt.data.from_datasets(
        _Shapes(target=mask), _Shapes(target=mask), classes=["bg", "fg"], task="segmentation"
    )

    class DictOut(nn.Module):  # a torchvision segmenter's habit
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return {"out": self.conv(x)}

    with pytest.raises(vt.ConfigError, match=r"returns a dict.*\['out'\]"):
        vt.build_trainer({"run": run, "task": "segmentation"}, model=DictOut(), data=seg).fit()
    with pytest.raises(vt.ConfigError, match=r"tune= configures"):
        vt.train(None, tune={"trials": 3}, run=run)
    with pytest.raises(vt.ConfigError, match=r"subclass of vt.Callback"):
        vt.build_trainer({"run": run}, callbacks=[object()])
    assert list(tmp_path.iterdir()) == []


def test_public_names_are_documented():
    for name in vt.__all__:
        if name.startswith("__") or name == "data":
            continue
        obj = getattr(vt, name)
        assert (obj.__doc__ or "").strip(), f"vt.{name} has no docstring"
    assert vt.data.from_datasets.__doc__ and "Example" in vt.data.from_datasets.__doc__


def test_docstring_examples_run():
    import doctest

    import visiontrain.api
    import visiontrain.data.user

    for module in (visiontrain.api, visiontrain.data.user):
        failures, _ = doctest.testmod(module, extraglobs={"vt": vt}, optionflags=doctest.ELLIPSIS)
        assert failures == 0, module.__name__


def test_own_objects_get_the_report_and_python_evaluation(cli, tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from own_model_script import TinyNet, data
    finally:
        sys.path.remove(str(SCRIPT.parent))
    cfg = {
        "train": {"epochs": 1, "progress": "none"},
        "data": {"batch_size": 8},
        "run": {"dir": str(tmp_path), "name": "own"},
    }
    torch.manual_seed(0)
    result = vt.build_trainer(cfg, model=TinyNet(), data=data()).fit()
    # The report draws per-image figures from the user's module and Datasets.
    assert (result.run_dir / "report.html").is_file()
    assert (result.run_dir / "plots" / "worst_images.png").is_file()
    assert result.summary["threshold"]["rule"]  # a binary task calibrates its threshold
    val = vt.evaluate(result.run_dir, "val", model=TinyNet(), data=data())
    for key in ("loss", "accuracy", "macro_f1"):
        assert val[key] == pytest.approx(result.metrics["val"][key], abs=1e-6), key
    with pytest.raises(vt.CheckpointError, match=r"model=TinyNet\(\.\.\.\)"):
        vt.evaluate(result.run_dir, "val", data=data())
    r = cli("eval", result.run_dir)
    assert r.code == 2 and "model=TinyNet(...)" in r.err
