"""run.async_save: the same files as a synchronous save, failures surfaced, SIGTERM waits."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import torch

from conftest import run_subprocess
from test_resume import EXACT, assert_same_weights
from test_signals import LONG, _start, _wait_for
from visiontrain.engine import callbacks as callbacks_module
from visiontrain.engine.async_save import AsyncWriter, snapshot
from visiontrain.engine.checkpoint import load_checkpoint
from visiontrain.errors import RunError

STEPS = [*EXACT, "train.epochs=2", "run.save_every_steps=3", "run.keep_last=1"]


def test_snapshot_is_a_copy_training_cannot_change():
    live = {"w": torch.ones(3), "opt": [{"m": torch.zeros(2)}], "step": 4, "name": "x"}
    copy = snapshot(live)
    live["w"].add_(1)
    live["opt"][0]["m"].add_(5)
    live["opt"].append("more")
    assert torch.equal(copy["w"], torch.ones(3)) and torch.equal(
        copy["opt"][0]["m"], torch.zeros(2)
    )
    assert len(copy["opt"]) == 1 and copy["step"] == 4 and copy["name"] == "x"


def test_one_write_in_flight_a_second_waits_for_it():
    writer = AsyncWriter()
    order: list[str] = []
    gate = threading.Event()

    def slow() -> None:
        gate.wait(5)
        order.append("first")

    writer.submit("a", slow)
    assert writer.busy
    threading.Timer(0.2, gate.set).start()
    writer.submit("b", lambda: order.append("second"))  # blocks until the first is done
    assert order[0] == "first"
    writer.wait()
    assert order == ["first", "second"] and not writer.busy


def test_a_failed_write_is_raised_once_at_the_next_poll_naming_the_file():
    def fail() -> None:
        raise OSError(30, "Read-only file system")

    writer = AsyncWriter()
    writer.submit("last.pt", fail)
    while writer.busy:  # let it fail
        time.sleep(0.01)
    with pytest.raises(RunError, match=r"last\.pt in the background failed.*Read-only.*untouched"):
        writer.poll()
    writer.poll()  # reported once


def test_async_files_equal_synchronous_ones(cli, tmp_path):
    sync = cli("train", *STEPS, f"run.dir={tmp_path}", "run.name=sync")
    asyn = cli("train", *STEPS, "run.async_save=true", f"run.dir={tmp_path}", "run.name=async")
    assert sync.code == 0 and asyn.code == 0, asyn.err
    for name in ("last.pt", "best.pt", "epoch-0002.pt"):
        a = load_checkpoint(tmp_path / "sync" / "checkpoints" / name)
        b = load_checkpoint(tmp_path / "async" / "checkpoints" / name)
        assert_same_weights(a["model"], b["model"])
        assert a["counters"] == b["counters"]
        assert_same_weights(
            a["optimizer"]["state"][0], b["optimizer"]["state"][0]
        )  # Adam's moments of the first parameter
    # keep_last=1 pruned the first epoch's file in both.
    assert not (tmp_path / "async" / "checkpoints" / "epoch-0001.pt").exists()


def test_a_failing_background_write_ends_the_run_and_keeps_the_previous_file(tmp_path, monkeypatch):
    import visiontrain as vt

    real = callbacks_module.save_checkpoint
    calls = {"n": 0}

    def failing_after_first(path, state):
        calls["n"] += 1
        if calls["n"] > 1:
            time.sleep(0.05)  # fail on the writer thread, after training went on
            raise OSError(30, "Read-only file system", str(path))
        real(path, state)

    monkeypatch.setattr(callbacks_module, "save_checkpoint", failing_after_first)
    overrides = [*STEPS, f"run.dir={tmp_path}", "run.name=ro", "run.async_save=true"]
    with pytest.raises(RunError, match=r"in the background failed.*Read-only file system"):
        vt.train(None, *overrides)
    # The first save (step 3) is whole and loads; nothing half-written replaced it.
    state = load_checkpoint(tmp_path / "ro" / "checkpoints" / "last.pt")
    assert state["counters"]["global_step"] == 3
    assert not list((tmp_path / "ro" / "checkpoints").glob("*.tmp*"))


def test_sigterm_while_a_save_is_in_flight_waits_for_it(tmp_path):
    # A save every step keeps the writer busy; the signal's save must still be on disk,
    # whole, when the process exits. (Resume exactness from that file is the synchronous
    # test's, test_signals.py: async files equal synchronous ones, above.)
    args = [*LONG, "run.async_save=true", "run.save_every_steps=1", f"run.dir={tmp_path}"]
    proc = _start(*args, "run.name=t")
    _wait_for(tmp_path / "t" / "metrics.jsonl", proc, min_lines=27)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    state = load_checkpoint(tmp_path / "t" / "checkpoints" / "last.pt")
    step = state["counters"]["global_step"]
    assert f"step {step};" in err  # the file on disk is the one the message names
    assert not list((tmp_path / "t" / "checkpoints").glob("*.tmp*"))
    done = run_subprocess("train", *args, "run.name=t", "run.resume=auto")
    assert done.returncode == 0, done.stderr
