"""Run reports: report.html with embedded figures and plots/*.png for every task,
`visiontrain report`, `compare --html`, and the page as a headless browser renders it."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from conftest import TINY, TINY_ANY
from test_dense import DET, SEG
from visiontrain.report import write_report

CURVES = {"loss", "monitor", "lr", "grad_norm", "throughput"}
EXPECTED = {
    "classification": CURVES
    | {"confusion_matrix", "per_class_precision_recall", "pr_curve", "worst_images"},
    "regression": CURVES | {"per_target_r2", "predicted_vs_true"},
    "detection": CURVES | {"loss_terms", "per_class_ap", "detections"},
    "segmentation": CURVES | {"per_class_iou", "masks"},
}
TRAIN_ARGS = {
    "classification": [*TINY, "train.epochs=2", "train.log_every=2"],
    "regression": ["task=regression", *TINY_ANY, "train.epochs=2", "train.log_every=2"],
    "detection": [*DET, "train.epochs=2", "data.train_size=16"],
    "segmentation": [*SEG, "train.epochs=2", "data.train_size=16", "data.val_size=4"],
}
DATA_URI = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny finished run per task, trained once for the module."""
    from visiontrain.cli import main

    root = tmp_path_factory.mktemp("report_runs")
    out = {}
    for task, args in TRAIN_ARGS.items():
        buf = io.StringIO()
        from contextlib import redirect_stdout

        with redirect_stdout(buf):
            code = main(["train", *args, f"run.dir={root}", f"run.name={task}"])
        assert code == 0, buf.getvalue()
        out[task] = root / task
    return out


def embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in DATA_URI.findall(html)]


@pytest.mark.parametrize("task", list(EXPECTED))
def test_report_has_every_plot_embedded(runs, task) -> None:
    run = runs[task]
    path = write_report(run)
    assert path == run / "report.html"
    written = {p.stem for p in (run / "plots").glob("*.png")}
    assert written >= EXPECTED[task], EXPECTED[task] - written
    html = path.read_text(encoding="utf-8")
    # Every plot file is in the page, byte for byte, as a data URI.
    pngs = embedded_pngs(html)
    assert len(pngs) == len(written)
    assert {(run / "plots" / f"{n}.png").read_bytes() for n in written} == set(pngs)
    for png in pngs:
        assert Image.open(io.BytesIO(png)).size[0] > 100
    # Self-contained: nothing is fetched from anywhere.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)
    assert "<link" not in html and "<script src" not in html
    # Header and tables.
    assert f"Run report: {task}" in html and f"<dd>{task}</dd>" in html
    assert "best checkpoint" in html and re.search(r"best epoch \d: ", html)
    assert "Per target" in html if task == "regression" else "Per class" in html


def test_text_is_escaped(runs, tmp_path) -> None:
    run = tmp_path / "<b>run & co</b>"
    shutil.copytree(runs["classification"], run)
    html = write_report(run).read_text(encoding="utf-8")
    assert "<b>run & co</b>" not in html
    assert "&lt;b&gt;run &amp; co&lt;/b&gt;" in html


def test_report_cli_rebuilds(cli, runs, tmp_path) -> None:
    run = tmp_path / "copy"
    shutil.copytree(runs["classification"], run)
    (run / "plots" / "stale.png").write_bytes(b"old")
    (run / "report.html").unlink()
    res = cli("report", run)
    assert res.code == 0, res.err
    assert "report written to" in res.out
    assert (run / "report.html").is_file()
    assert not (run / "plots" / "stale.png").exists()  # a rebuild leaves no stale figure


def test_interrupted_run_gets_curves_and_notes(cli, runs, tmp_path) -> None:
    run = tmp_path / "interrupted"
    shutil.copytree(runs["classification"], run)
    (run / "summary.json").unlink()
    (run / "checkpoints" / "best.pt").unlink()
    res = cli("report", run)
    assert res.code == 0, res.err
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "summary.json is missing" in html and "best.pt does not exist" in html
    written = {p.stem for p in (run / "plots").glob("*.png")}
    # Curves from metrics.jsonl, and the tables from the best epoch's eval record.
    assert written >= CURVES | {"confusion_matrix", "per_class_precision_recall"}
    assert "worst_images" not in written


def test_missing_run_or_files_exit_2(cli, tmp_path) -> None:
    res = cli("report", tmp_path / "nope")
    assert res.code == 2 and "does not exist" in res.err and "Traceback" not in res.err
    empty = tmp_path / "empty"
    empty.mkdir()
    res = cli("report", empty)
    assert res.code == 2
    assert "metrics.jsonl" in res.err and "summary.json" in res.err
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "summary.json").write_text("{not json")
    res = cli("report", damaged)
    assert res.code == 2 and "summary.json" in res.err and "Traceback" not in res.err


def test_missing_data_is_a_note_not_an_error(runs, tmp_path) -> None:
    run = tmp_path / "moved"
    shutil.copytree(runs["segmentation"], run)
    (run / "checkpoints" / "best.pt").write_bytes(b"truncated")
    html = write_report(run).read_text(encoding="utf-8")
    assert "no per-image figures" in html
    assert (run / "plots" / "per_class_iou.png").is_file()


def test_compare_html_holds_both_runs(cli, runs, tmp_path) -> None:
    a, b = runs["classification"], tmp_path / "second"
    shutil.copytree(a, b)
    out = tmp_path / "cmp.html"
    res = cli("compare", a, b, "--html", out, "--format", "markdown")
    assert res.code == 0, res.err
    assert res.out.startswith("Baseline:")  # stdout is still the markdown
    html = out.read_text(encoding="utf-8")
    assert a.name in html and b.name in html and str(b) in html
    assert "headline (test)" in html and "per class (test)" in html
    assert len(embedded_pngs(html)) == 1  # val loss; the monitor is val/loss too
    assert not re.search(r"""src\s*=\s*["']?(https?:|//)""", html)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_headless_chromium_renders_the_report(runs, tmp_path) -> None:
    page = write_report(runs["detection"])
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--hide-scrollbars",
    ]
    shot = tmp_path / "shot.png"
    subprocess.run(
        [CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    image = Image.open(shot).convert("L")
    assert image.size == (1200, 1600)
    low, high = image.getextrema()
    assert high - low > 100  # not a blank page
    assert len(image.resize((120, 160)).getcolors(maxcolors=256) or []) > 20
    # The page's own script counts images that failed to decode once it has loaded.
    dom = subprocess.run(
        [CHROMIUM, *flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    body = re.search(r"<body[^>]*>", dom)
    assert body is not None, dom[:500]
    total = re.search(r'data-images="(\d+)"', body.group(0))
    broken = re.search(r'data-broken-images="(\d+)"', body.group(0))
    assert total and broken, body.group(0)
    assert int(total.group(1)) == len(list((page.parent / "plots").glob("*.png")))
    assert int(broken.group(1)) == 0
