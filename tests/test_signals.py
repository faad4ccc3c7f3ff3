"""Stopping: SIGTERM saves and exits 143, SIGKILL leaves a loadable checkpoint, and a
crafted checkpoint never runs code."""

import os
import pickle
import signal
import subprocess
import sys
import time

import torch

from conftest import TINY, run_subprocess
from test_resume import EXACT, assert_same_weights
from visiontrain.engine.checkpoint import load_checkpoint

LONG = [*EXACT, "data.train_size=320", "train.epochs=3", "train.log_every=1"]


def _start(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "visiontrain", "train", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path, proc, timeout=120.0, min_lines=0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and (min_lines == 0 or len(path.read_text().splitlines()) >= min_lines):
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {path}")


def test_sigterm_saves_exits_143_and_resume_is_exact(tmp_path):
    proc = _start(*LONG, f"run.dir={tmp_path}", "run.name=t")
    # Stop in the middle of the second epoch (20 updates per epoch).
    _wait_for(tmp_path / "t" / "metrics.jsonl", proc, min_lines=27)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "run.resume=auto" in err
    state = load_checkpoint(tmp_path / "t" / "checkpoints" / "last.pt")
    assert 0 < state["counters"]["batch_in_epoch"] < 20 or state["counters"]["epochs_done"] > 0
    done = run_subprocess("train", *LONG, f"run.dir={tmp_path}", "run.name=t", "run.resume=auto")
    assert done.returncode == 0, done.stderr
    ref = run_subprocess("train", *LONG, f"run.dir={tmp_path}", "run.name=ref")
    assert ref.returncode == 0, ref.stderr
    assert_same_weights(
        load_checkpoint(tmp_path / "t" / "checkpoints" / "last.pt")["model"],
        load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt")["model"],
    )


def test_sigkill_leaves_a_checkpoint_that_loads(tmp_path):
    proc = _start(*LONG, "run.save_every_steps=1", f"run.dir={tmp_path}", "run.name=k")
    ckpt = tmp_path / "k" / "checkpoints" / "last.pt"
    _wait_for(ckpt, proc)
    time.sleep(0.7)  # let it write several more checkpoints, then kill at a random moment
    proc.kill()
    proc.communicate(timeout=60)
    state = load_checkpoint(ckpt)
    assert state["counters"]["global_step"] >= 1
    res = run_subprocess("train", *LONG, f"run.dir={tmp_path}", "run.name=k", "run.resume=auto")
    assert res.returncode == 0, res.stderr


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_checkpoint_is_refused_and_never_runs(cli, tmp_path):
    marker = tmp_path / "pwned"
    ckpt_dir = tmp_path / "runs" / "evil" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    # Legacy (plain pickle) and zip (torch.save) files, both carrying the payload.
    for writer in ("pickle", "torch"):
        path = ckpt_dir / "last.pt"
        with open(path, "wb") as fh:
            if writer == "pickle":
                pickle.dump({"model": _Payload(marker)}, fh)
            else:
                torch.save({"model": _Payload(marker)}, fh)
        res = cli(
            "train", *TINY, f"run.dir={tmp_path / 'runs'}", "run.name=evil", "run.resume=auto"
        )
        assert res.code == 2
        assert "refused" in res.err and str(path) in res.err
        assert "Traceback" not in res.err
        assert not marker.exists()


def test_truncated_and_foreign_checkpoints_exit_2(cli, tmp_path):
    good = tmp_path / "runs"
    assert cli("train", *TINY, f"run.dir={good}", "run.name=g").code == 0
    ckpt = good / "g" / "checkpoints" / "last.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    res = cli("train", *TINY, "train.epochs=2", f"run.dir={good}", "run.name=g", "run.resume=auto")
    assert res.code == 2 and "truncated" in res.err and str(ckpt) in res.err
    torch.save({"weights": torch.zeros(3)}, ckpt)
    res = cli("eval", ckpt)
    assert res.code == 2 and "not a visiontrain checkpoint" in res.err
