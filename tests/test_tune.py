"""``visiontrain tune``: a study end to end, resume, a killed worker, two workers, --from."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from conftest import TINY
from visiontrain.config import build_config
from visiontrain.data import build_data

SPACE = (
    "tune.space={optim.lr: {log_uniform: [1e-4, 1e-1]}, "
    "loss.name: {choice: [cross_entropy, focal]}}"
)
# tune sets train.epochs and train.progress for every trial and refuses them on its line.
TUNE_TINY = [o for o in TINY if not o.startswith(("train.epochs=", "train.progress="))]
# The score is macro F1: val/loss would compare focal and cross-entropy values.
BASE = [*TUNE_TINY, SPACE, "tune.sampler=random", "tune.pruner=asha", "train.monitor=val/macro_f1"]


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "trials.csv").open() as fh:
        return list(csv.DictReader(fh))


def _study(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name=folder.name, storage=f"sqlite:///{folder / 'study.db'}")


def test_study_end_to_end_and_train_from_best(cli, tmp_path):
    res = cli("tune", *BASE, "tune.epochs=2", "tune.trials=4", f"run.dir={tmp_path}")
    assert res.code == 0, res.err
    folder = res.run_dir
    assert folder == tmp_path / "tune-classification-defects"
    rows = _rows(folder)
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3]
    assert sorted(p.name for p in folder.glob("trial-*")) == [f"trial-{n:04d}" for n in range(4)]
    best = json.loads((folder / "best.json").read_text())
    complete = [float(r["score"]) for r in rows if r["state"] == "complete"]
    assert best["monitor"] == "val/macro_f1" and best["score"] == pytest.approx(max(complete))
    assert set(best["overrides"]) == {"optim.lr", "loss.name"}
    for name in ("tune_history.png", "tune_params.png"):
        assert (folder / name).stat().st_size > 0
    # Every trial recorded its budget: tune.epochs and the data fraction.
    trial_cfg = yaml.safe_load((folder / f"trial-{best['trial']:04d}" / "config.yaml").read_text())
    assert trial_cfg["train"]["epochs"] == 2 and trial_cfg["data"]["train_fraction"] == 1.0
    assert trial_cfg["optim"]["lr"] == pytest.approx(best["overrides"]["optim.lr"])

    # The winner at full budget: overrides applied, command-line key=value still win.
    res = cli(
        "train",
        "--from",
        folder / "best.json",
        *TINY,
        "optim.weight_decay=0.0",
        f"run.dir={tmp_path}",
        "run.name=winner",
    )
    assert res.code == 0, res.err
    cfg = yaml.safe_load((tmp_path / "winner" / "config.yaml").read_text())
    assert cfg["optim"]["lr"] == pytest.approx(best["overrides"]["optim.lr"])
    assert cfg["loss"]["name"] == best["overrides"]["loss.name"]
    assert cfg["optim"]["weight_decay"] == 0.0
    assert cfg["train"]["epochs"] == 1 and cfg["data"]["train_fraction"] is None


def test_rerun_continues_the_study(cli, tmp_path):
    args = [*BASE, "tune.epochs=1", "tune.pruner=none", f"run.dir={tmp_path}"]
    assert cli("tune", *args, "tune.trials=2").code == 0
    res = cli("tune", *args, "tune.trials=4")
    assert res.code == 0, res.err
    assert "2 of 4 trials done" in res.out
    rows = _rows(res.run_dir)
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3]
    assert all(r["state"] == "complete" for r in rows)
    # Trials are seeded by number: the resumed ones did not re-draw the first ones' values.
    assert len({r["optim.lr"] for r in rows}) == 4


def test_killed_worker_trial_is_failed_and_the_study_completes(cli, tmp_path, monkeypatch):
    args = [*BASE, "tune.epochs=1", "tune.pruner=none", "tune.trials=3", f"run.dir={tmp_path}"]
    # Trials slow enough to be caught mid-trial: a larger training set.
    slow = [*args, "data.train_size=2000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "visiontrain", "tune", *slow],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    folder = tmp_path / "tune-classification-defects"
    deadline = time.monotonic() + 120
    while not (folder / "trial-0000" / "config.yaml").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _study(folder).trials[0].state == optuna.trial.TrialState.RUNNING

    import visiontrain.tools.tune as tune

    # The dead worker's heartbeat goes stale after the grace period (short for the test).
    monkeypatch.setattr(tune, "HEARTBEAT_GRACE_S", 1)
    monkeypatch.setattr(tune, "HEARTBEAT_INTERVAL_S", 1)
    monkeypatch.setattr(tune, "POLL_S", 0.2)
    time.sleep(1.5)
    res = cli("tune", *slow)
    assert res.code == 0, res.err
    states = {t.number: t.state for t in _study(folder).trials}
    assert states[0] == optuna.trial.TrialState.FAIL
    assert sum(s == optuna.trial.TrialState.COMPLETE for s in states.values()) == 3
    assert [r["state"] for r in _rows(folder)] == ["fail", "complete", "complete", "complete"]


def test_two_workers_share_one_study(tmp_path):
    args = [*BASE, "tune.epochs=1", "tune.pruner=none", "tune.trials=4", f"run.dir={tmp_path}"]
    cmd = [sys.executable, "-m", "visiontrain", "tune", *args]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in "ab"]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    folder = tmp_path / "tune-classification-defects"
    trials = _study(folder).trials
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4
    assert len({t.number for t in trials}) == len(trials)
    dirs = sorted(p.name for p in folder.glob("trial-*"))
    assert dirs == sorted(f"trial-{t.number:04d}" for t in done)


def test_train_fraction_is_a_fixed_stratified_subset():
    over = ["data.train_size=400", "data.defect_rate=0.2", "data.image_size=16"]
    full = build_data(build_config(None, over).data)
    cfg = build_config(None, [*over, "data.train_fraction=0.25"]).data
    part, again = build_data(cfg), build_data(cfg)
    assert len(part.train) == pytest.approx(0.25 * len(full.train), abs=2)
    share = np.bincount(part.train.labels) / len(part.train)
    assert share == pytest.approx(np.bincount(full.train.labels) / len(full.train), abs=0.02)
    assert np.array_equal(part.train.indices, again.train.indices)
    assert len(part.val) == len(full.val)


@pytest.mark.parametrize(
    ("items", "needle"),
    [
        (["tune.space={optim.lrr: {log_uniform: [1e-4, 1e-1]}}"], "did you mean `optim.lr`"),
        (["tune.space={optim.lr: {normal: [1e-4, 1e-1]}}"], "write one of"),
        (["tune.space={optim.lr: {uniform: [0.1, 0.01]}}"], "lo must be below hi"),
        (["tune.space={optim.lr: {log_uniform: [0, 0.1]}}"], "positive bounds"),
        (["tune.space={optim.lr: {uniform: [0.1, 20]}}"], "refuses"),
        (["tune.space={train.epochs: {int: [1, 4]}}"], "cannot be searched"),
        (["tune.space={loss.name: {choice: [cross_entropy, nosuchloss]}}"], "nosuchloss"),
        ([], "tune.space is empty"),
    ],
)
def test_bad_tune_input_exits_2(cli, tmp_path, items, needle):
    res = cli("tune", *TUNE_TINY, *items, f"run.dir={tmp_path}")
    assert res.code == 2 and needle in res.err, res.err
    assert not list(tmp_path.glob("*/trial-*"))


def test_bad_from_file_exits_2(cli, tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"score": 1.0}))
    for path, needle in (
        (tmp_path / "missing.json", "no such file"),
        (bad_json, "not a JSON file"),
        (empty, "no `overrides`"),
    ):
        res = cli("train", "--from", path, *TINY, f"run.dir={tmp_path}")
        assert res.code == 2 and needle in res.err, res.err
