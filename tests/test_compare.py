"""`visiontrain compare`: side-by-side metrics of finished runs with deltas vs the first."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from conftest import TINY
from visiontrain.cli import main
from visiontrain.errors import UserError
from visiontrain.tools.compare import RunSummary, build_comparison, render_markdown, render_tables

CLASSES = ["ok", "defect"]
PER_CLASS_METRICS = ["precision", "recall", "f1", "support"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two finished tiny runs (plain and class-balanced loss), trained once per module."""
    root = tmp_path_factory.mktemp("compare_runs")
    dirs = []
    for extra in ([], ["loss.class_weights=balanced"]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["train", *TINY, f"run.dir={root}", *extra])
        assert code == 0, out.getvalue()
        dirs.append(Path(out.getvalue().strip().splitlines()[-1]))
    assert dirs[0] != dirs[1]
    return dirs[0], dirs[1]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_json_lists_every_class_with_exact_values_and_deltas(cli, runs) -> None:
    a, b = runs
    # The second run given as its summary.json file, the first as a directory.
    r = cli("compare", a, b / "summary.json", "--format", "json")
    assert r.code == 0, r.err
    cmp = json.loads(r.out)
    assert cmp["split"] == "test"
    assert [run["name"] for run in cmp["runs"]] == [a.name, b.name]
    assert [Path(run["path"]) for run in cmp["runs"]] == [a, b]

    metrics = [summary(a)["metrics"]["test"], summary(b)["metrics"]["test"]]
    assert {"loss", "accuracy", "macro_f1"} <= set(cmp["headline"])
    assert list(cmp["headline"])[:3] == ["loss", "accuracy", "macro_f1"]
    assert "samples" not in cmp["headline"]
    for name, row in cmp["headline"].items():
        assert row["values"] == [m[name] for m in metrics]
        assert row["deltas"] == [None, row["values"][1] - row["values"][0]]

    assert list(cmp["per_class"]) == CLASSES
    for cls in CLASSES:
        assert list(cmp["per_class"][cls]) == PER_CLASS_METRICS
        for name, row in cmp["per_class"][cls].items():
            assert row["values"] == [m["per_class"][cls][name] for m in metrics]
            assert row["deltas"] == [None, row["values"][1] - row["values"][0]]
    assert cmp["per_class"]["ok"]["support"]["deltas"] == [None, 0]
    assert cmp["per_target"] == {}


def test_val_split_and_single_run(cli, runs) -> None:
    a, _ = runs
    r = cli("compare", a, "--split", "val", "--format", "json")
    assert r.code == 0, r.err
    cmp = json.loads(r.out)
    val = summary(a)["metrics"]["val"]
    assert cmp["headline"]["loss"] == {"values": [val["loss"]], "deltas": [None]}


def test_markdown_has_a_row_per_class_and_metric(cli, runs) -> None:
    a, b = runs
    r = cli("compare", a, b, "--format", "markdown")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert "### headline (test)" in lines
    assert "### per class (test)" in lines
    assert f"| metric | {a.name} | {b.name} |" in lines
    loss = summary(a)["metrics"]["test"]["loss"]
    assert any(line.startswith(f"| loss | {loss:.4f} | ") for line in lines)
    for cls in CLASSES:
        for metric in PER_CLASS_METRICS:
            rows = [line for line in lines if line.startswith(f"| {cls} | {metric} | ")]
            assert len(rows) == 1, (cls, metric, r.out)
    support = summary(a)["metrics"]["test"]["per_class"]["ok"]["support"]
    assert f"| ok | support | {support} | {support} (+0) |" in lines


def test_table_output_names_runs_and_classes(cli, runs) -> None:
    a, b = runs
    r = cli("compare", a, b)
    assert r.code == 0, r.err
    for text in ("headline (test)", "per class (test)", "macro_f1", *CLASSES):
        assert text in r.out
    assert "(+0)" in r.out  # support delta


def test_same_directory_name_is_disambiguated_by_parent(cli, runs, tmp_path) -> None:
    a, _ = runs
    for parent in ("x", "y"):
        (tmp_path / parent / "run").mkdir(parents=True)
        shutil.copy(a / "summary.json", tmp_path / parent / "run")
    r = cli("compare", tmp_path / "x" / "run", tmp_path / "y" / "run", "--format", "json")
    assert r.code == 0, r.err
    assert [run["name"] for run in json.loads(r.out)["runs"]] == ["x/run", "y/run"]


def test_errors_exit_2_with_a_message(cli, runs, tmp_path) -> None:
    a, _ = runs

    missing = tmp_path / "nope"
    r = cli("compare", a, missing)
    assert r.code == 2
    assert r.err.startswith("error: ") and "does not exist" in r.err
    assert "Traceback" not in r.err

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    r = cli("compare", a, unfinished)
    assert r.code == 2
    assert "has no summary.json" in r.err and "visiontrain eval" in r.err

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "summary.json").write_text('{"metrics": {"test": ')
    r = cli("compare", a, corrupt)
    assert r.code == 2
    assert str(corrupt / "summary.json") in r.err and "not valid JSON" in r.err

    no_test = tmp_path / "no_test"
    no_test.mkdir()
    s = summary(a)
    del s["metrics"]["test"]
    (no_test / "summary.json").write_text(json.dumps(s))
    r = cli("compare", a, no_test)
    assert r.code == 2
    assert "no_test" in r.err and "no test metrics" in r.err and "--split val" in r.err
    assert "Traceback" not in r.err


def test_no_run_is_an_argparse_error(cli) -> None:
    with pytest.raises(SystemExit) as exc:
        cli("compare")
    assert exc.value.code == 2


def _run(name: str, metrics: dict, **extra) -> RunSummary:
    return RunSummary(name=name, path=Path(name), summary={"metrics": {"test": metrics}, **extra})


def test_build_comparison_missing_class_and_per_target() -> None:
    pc = {"precision": 0.5, "recall": 0.25, "f1": 0.125, "support": 4}
    base = _run(
        "base",
        {
            "loss": 1.0,
            "accuracy": 0.5,
            "samples": 8,
            "is_best": True,  # booleans are not metrics
            "confusion_matrix": [[1, 2], [3, 4]],
            "zeta": 3,
            "per_class": {"a": pc, "b": pc},
        },
        class_names=["a", "b"],
    )
    other = _run(
        "other",
        {
            "accuracy": 0.75,
            "macro_f1": 0.5,
            "per_class": {"c": {**pc, "support": 6}, "a": {**pc, "f1": 0.5, "support": 5}},
        },
        class_names=["c", "a"],
    )
    cmp = build_comparison([base, other], "test")
    assert cmp["runs"] == [{"name": "base", "path": "base"}, {"name": "other", "path": "other"}]
    assert list(cmp["headline"]) == ["loss", "accuracy", "macro_f1", "zeta"]
    assert cmp["headline"]["loss"] == {"values": [1.0, None], "deltas": [None, None]}
    assert cmp["headline"]["accuracy"] == {"values": [0.5, 0.75], "deltas": [None, 0.25]}
    assert cmp["headline"]["macro_f1"] == {"values": [None, 0.5], "deltas": [None, None]}

    # First run's class order, then classes only later runs have.
    assert list(cmp["per_class"]) == ["a", "b", "c"]
    assert cmp["per_class"]["a"]["f1"] == {"values": [0.125, 0.5], "deltas": [None, 0.375]}
    assert cmp["per_class"]["a"]["support"] == {"values": [4, 5], "deltas": [None, 1]}
    assert cmp["per_class"]["b"]["recall"] == {"values": [0.25, None], "deltas": [None, None]}
    assert cmp["per_class"]["c"]["support"] == {"values": [None, 6], "deltas": [None, None]}
    assert cmp["per_target"] == {}

    md = render_markdown(cmp)
    assert "| b | recall | 0.2500 | — |" in md
    assert "| c | support | — | 6 |" in md
    assert "| a | support | 4 | 5 (+1) |" in md
    assert "| accuracy | 0.5000 | 0.7500 (+0.2500) |" in md
    assert [t.title for t in render_tables(cmp)] == ["headline (test)", "per class (test)"]

    # Regression: per-target MAE/RMSE/R² with deltas; a target missing in a run.
    reg_a = _run(
        "reg_a",
        {
            "loss": 0.5,
            "r2": 0.5,
            "mae": 0.25,
            "rmse": 0.5,
            "per_target": {"x": {"mae": 0.25, "rmse": 0.5, "r2": 0.5}, "y": {"mae": 1.0}},
        },
    )
    reg_b = _run(
        "reg_b",
        {"loss": 0.25, "mae": 0.125, "per_target": {"x": {"r2": 0.75, "mae": 0.5, "rmse": 0.25}}},
    )
    cmp = build_comparison([reg_a, reg_b], "test")
    assert list(cmp["headline"]) == ["loss", "mae", "rmse", "r2"]
    assert cmp["headline"]["mae"]["deltas"] == [None, -0.125]
    assert cmp["per_class"] == {}
    assert list(cmp["per_target"]) == ["x", "y"]
    assert list(cmp["per_target"]["x"]) == ["mae", "rmse", "r2"]
    assert cmp["per_target"]["x"]["r2"] == {"values": [0.5, 0.75], "deltas": [None, 0.25]}
    assert cmp["per_target"]["y"] == {"mae": {"values": [1.0, None], "deltas": [None, None]}}
    md = render_markdown(cmp)
    assert "### per target (test)" in md
    assert "| x | rmse | 0.5000 | 0.2500 (-0.2500) |" in md
    assert [t.title for t in render_tables(cmp)][-1] == "per target (test)"


def test_build_comparison_missing_split_suggests_the_other() -> None:
    run = RunSummary("r", Path("r"), {"metrics": {"val": {"loss": 1.0}}})
    with pytest.raises(UserError, match=r"run r \(r\) has no test metrics.*--split val"):
        build_comparison([run], "test")


def test_runs_of_different_tasks_are_refused_and_other_test_sets_warned() -> None:
    cls = _run("cls", {"loss": 1.0, "samples": 570})
    cls.summary["task"] = "classification"
    reg = _run("reg", {"loss": 2.0, "samples": 570})
    reg.summary["task"] = "regression"
    with pytest.raises(UserError, match=r"different tasks: cls \(classification\), reg"):
        build_comparison([cls, reg], "test")
    small = _run("small", {"loss": 0.5, "samples": 95})
    small.summary["task"] = "classification"
    cmp = build_comparison([cls, small], "test")
    assert "different sizes (cls 570, small 95 images)" in cmp["warnings"][0]
    assert build_comparison([cls, cls], "test")["warnings"] == []
