"""SIGKILL at 20 random moments, resume each time: the final weights equal an uninterrupted
run's bit for bit, and a loadable checkpoint is always there. Plus memory stability and
time-based checkpoints."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from conftest import TINY
from test_resume import assert_same_weights
from visiontrain.api import assemble, fit_and_summarise
from visiontrain.config import load_config
from visiontrain.engine.callbacks import Callback
from visiontrain.engine.checkpoint import load_checkpoint

# Deterministic, random augmentation, dropout, a checkpoint after every update: every
# moment of the run is either a step or a checkpoint write, so kills land in both.
KILLED = [
    *TINY,
    "train.deterministic=true",
    "data.augment=light",
    "model.dropout=0.2",
    "schedule.name=step",
    "schedule.step_size=1",
    "schedule.gamma=0.7",
    "train.log_every=1",
    "train.epochs=12",
    "data.train_size=160",
    "run.save_every_steps=1",
    "run.keep_last=1",
]
KILLS = 20


def _records(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_twenty_sigkills_then_resume_give_bit_exact_weights(cli, tmp_path):
    ref = cli("train", *KILLED, f"run.dir={tmp_path}", "run.name=ref")
    assert ref.code == 0, ref.err
    run = tmp_path / "k"
    last = run / "checkpoints" / "last.pt"
    rng = random.Random(0)
    kills = 0
    attempts = 0
    while kills < KILLS:
        attempts += 1
        assert attempts < 3 * KILLS, "the run keeps finishing before it can be killed"
        proc = subprocess.Popen(
            [sys.executable, "-m", "visiontrain", "train", *KILLED, f"run.dir={tmp_path}",
             "run.name=k", "run.resume=auto"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        # Wait for this process to log a step (past its imports), then a random moment.
        seen = _records(run / "metrics.jsonl")
        deadline = time.monotonic() + 120
        while _records(run / "metrics.jsonl") <= seen and proc.poll() is None:
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
        # A step (each writes last.pt) takes tens of ms: a short window keeps each
        # process to a few steps, so twenty kills land before the run completes.
        time.sleep(rng.uniform(0.0, 0.15))
        if proc.poll() is not None:  # finished (or failed) before the kill
            _, err = proc.communicate()
            assert proc.returncode == 0, err.decode()
            break
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        kills += 1
        # Never without a loadable checkpoint once the first one exists.
        assert last.is_file()
        load_checkpoint(last)
    assert kills == KILLS, f"only {kills} kills landed in {attempts} attempts"
    done = subprocess.run(
        [sys.executable, "-m", "visiontrain", "train", *KILLED, f"run.dir={tmp_path}",
         "run.name=k", "run.resume=auto"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_same_weights(
        load_checkpoint(last)["model"],
        load_checkpoint(tmp_path / "ref/checkpoints/last.pt")["model"],
    )
    a = json.loads((run / "summary.json").read_text())["metrics"]
    b = json.loads((tmp_path / "ref" / "summary.json").read_text())["metrics"]
    assert a == b


class _Rss(Callback):
    name = "rss"

    def __init__(self) -> None:
        self.by_epoch: dict[int, int] = {}

    def on_epoch_end(self, trainer) -> None:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        self.by_epoch[trainer.epoch + 1] = pages * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads /proc/self/statm")
def test_resident_memory_is_flat_from_epoch_2_to_20(tmp_path):
    cfg = load_config(None, [*TINY, "train.epochs=20", f"run.dir={tmp_path}", "run.keep_last=1"])
    trainer = assemble(cfg, Console(quiet=True))
    probe = _Rss()
    trainer.callbacks.append(probe)
    fit_and_summarise(trainer, time.perf_counter())
    growth = probe.by_epoch[20] / probe.by_epoch[2] - 1
    assert growth < 0.05, {k: v // 2**20 for k, v in probe.by_epoch.items()}


def test_save_every_minutes_writes_mid_epoch(cli, tmp_path, monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr("visiontrain.engine.callbacks.time.monotonic", lambda: clock["t"])
    saved = []
    from visiontrain.engine import callbacks

    real = callbacks.Checkpointer.save_last

    def counting(self, trainer):
        saved.append((trainer.epoch, trainer.batch_in_epoch))
        return real(self, trainer)

    monkeypatch.setattr(callbacks.Checkpointer, "save_last", counting)

    original = callbacks.Checkpointer.on_update

    def tick(self, trainer):
        clock["t"] += 25.0  # every update "takes" 25 s: a 1-minute period saves every 3rd
        original(self, trainer)

    monkeypatch.setattr(callbacks.Checkpointer, "on_update", tick)
    r = cli("train", *TINY, "run.save_every_minutes=1", f"run.dir={tmp_path}")
    assert r.code == 0, r.err
    # 6 updates of 25 s: the minute is up after update 3 (75 s); after update 6 it is up
    # again, but that is the epoch's end, whose own save covers it.
    assert saved == [(0, 3)]
