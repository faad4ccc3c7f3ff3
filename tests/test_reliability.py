"""NaN policies, disk-full saves, checkpoint hashes, and loader workers that die or hang."""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY
from visiontrain.data.sources import ArraySplit
from visiontrain.engine import checkpoint as ckpt_module
from visiontrain.engine.checkpoint import load_checkpoint, save_checkpoint
from visiontrain.errors import CheckpointError
from visiontrain.tasks.classification import ClassificationTask

# One update per batch of 16 over 96 images: 6 updates an epoch.
RUN = [*TINY, "train.epochs=2", "train.log_every=1"]


@pytest.fixture
def nan_at(monkeypatch):
    """Make the training loss NaN at the given calls of ClassificationTask.loss (1-based)."""
    calls = {"n": 0}

    def install(bad: set[int] | int) -> dict[str, int]:
        original = ClassificationTask.loss

        def loss(self, output, target):
            calls["n"] += 1
            out = original(self, output, target)
            hit = calls["n"] in bad if isinstance(bad, set) else calls["n"] >= bad
            if hit:
                out = {**out, "loss": out["loss"] * float("nan")}
            return out

        monkeypatch.setattr(ClassificationTask, "loss", loss)
        return calls

    return install


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_raise_stops_with_the_step_and_the_causes(cli, tmp_path, nan_at):
    nan_at({4})
    r = cli("train", *RUN, f"run.dir={tmp_path}", "run.name=r")
    assert r.code == 1
    assert "training loss became nan" in r.err and "up to step 4" in r.err
    assert "learning rate too high" in r.err and "train.on_nan=skip" in r.err
    assert "Traceback" not in r.err
    assert not (tmp_path / "r" / "checkpoints" / "last.pt").exists()  # NaN weights never saved


def test_skip_drops_the_update_and_the_schedule_counts_only_real_updates(cli, tmp_path, nan_at):
    nan_at({4})
    r = cli("train", *RUN, "train.on_nan=skip", f"run.dir={tmp_path}", "run.name=s",
            "train.progress=plain")  # fmt: skip
    assert r.code == 0, r.err
    assert "non-finite loss or gradients; update skipped (1 in a row" in r.out
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["nan"]["skipped_updates"] == 1 and summary["nan"]["rollbacks"] == 0
    assert summary["global_step"] == 2 * 6 - 1
    state = load_checkpoint(tmp_path / "s" / "checkpoints" / "last.pt")
    assert state["scheduler"]["last_epoch"] == state["counters"]["global_step"] == 11
    assert sum(x["skipped_updates"] for x in records(tmp_path / "s", "train_step")) == 1
    assert all(x["loss"] == x["loss"] for x in records(tmp_path / "s", "train_step"))  # no NaN


def test_rollback_reloads_lowers_the_lr_and_passes_over_the_batch(cli, tmp_path, nan_at):
    # Call 9 is epoch 2's third batch; last.pt then holds the end of epoch 1 (step 6).
    nan_at({9})
    r = cli("train", *RUN, "train.on_nan=rollback", "schedule.name=none", "optim.lr=0.01",
            f"run.dir={tmp_path}", "run.name=rb", "train.progress=plain")  # fmt: skip
    assert r.code == 0, r.err
    assert "rollback 1/3: reloaded" in r.out and "(step 6)" in r.out
    rb = records(tmp_path / "rb", "rollback")
    assert len(rb) == 1 and rb[0]["lr"] == pytest.approx(0.005)
    steps = records(tmp_path / "rb", "train_step")
    assert steps[-1]["lr"] == pytest.approx(0.005)
    summary = json.loads((tmp_path / "rb" / "summary.json").read_text())
    assert summary["nan"] == {
        "policy": "rollback",
        "skipped_updates": 1,
        "rollbacks": 1,
        "batches_passed_over": 1,
        "amp_skipped_steps": 0,
    }
    # The passed-over batch leaves epoch 2 one update short.
    assert summary["global_step"] == 6 + 5


def test_a_loss_that_stays_nan_ends_after_the_allowed_rollbacks(cli, tmp_path, nan_at):
    nan_at(8)  # every call from the 8th on
    r = cli("train", *RUN, "train.on_nan=skip", "train.max_nan_skips=2", "train.max_rollbacks=1",
            f"run.dir={tmp_path}", "run.name=x", "train.progress=plain")  # fmt: skip
    assert r.code == 1
    assert "after 1 rollbacks (train.max_rollbacks=1)" in r.err
    assert "gradient clipping" in r.err and "Traceback" not in r.err
    last = load_checkpoint(tmp_path / "x" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_fp16_steps_skipped_by_the_grad_scaler_do_not_advance_the_schedule(
    cli, tmp_path, monkeypatch
):
    # A loss scale of 2**20 overflows fp16 activations' gradients until GradScaler halves
    # it enough: its first steps are skipped.
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(real, init_scale=2.0**20))
    r = cli("train", *RUN, "train.precision=fp16", f"run.dir={tmp_path}", "run.name=h")
    assert r.code == 0, r.err
    state = load_checkpoint(tmp_path / "h" / "checkpoints" / "last.pt")
    skipped = state["nan"]["amp_skipped"]
    assert skipped > 0
    assert state["counters"]["global_step"] == 12 - skipped
    assert state["scheduler"]["last_epoch"] == state["counters"]["global_step"]


# ------------------------------------------------------------------- checkpoints


def _tiny_state() -> dict:
    return {"model": {"w": torch.arange(4.0)}, "config": {"task": "classification"}}


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _tiny_state())
    before = path.read_bytes()

    def no_space(target, writer):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_module, "atomic_write", no_space)
    from visiontrain.errors import RunError

    with pytest.raises(RunError, match=r"disk full while writing checkpoint .* still holds"):
        save_checkpoint(path, {**_tiny_state(), "model": {"w": torch.zeros(4)}})
    assert path.read_bytes() == before
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.arange(4.0))


def test_enospc_mid_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _tiny_state())
    real_save = torch.save

    def half_then_full(obj, fh, *a, **kw):
        fh.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_full)
    from visiontrain.errors import RunError

    with pytest.raises(RunError):
        save_checkpoint(path, _tiny_state())
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    load_checkpoint(path)


def test_enospc_during_training_ends_with_exit_1(cli, tmp_path, monkeypatch):
    real = ckpt_module.atomic_write
    saves = {"n": 0}

    def fails_on_second(path, writer):
        saves["n"] += 1
        # Epoch 1 writes best.pt once (last.pt is a hard link to it): the second write is
        # epoch 2's (its best.pt or its last.pt).
        if saves["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, writer)

    monkeypatch.setattr(ckpt_module, "atomic_write", fails_on_second)
    r = cli("train", *RUN, "run.keep_last=0", f"run.dir={tmp_path}", "run.name=d")
    assert r.code == 1
    assert "disk full while writing checkpoint" in r.err and "Traceback" not in r.err
    last = load_checkpoint(tmp_path / "d" / "checkpoints" / "last.pt")
    assert last["counters"]["epochs_done"] == 1


def test_a_modified_checkpoint_fails_its_hash(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, _tiny_state())
    state = torch.load(path, weights_only=True)
    state["model"]["w"][0] = 99.0  # e.g. a bit flip in storage, or an edited file
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="fails its content hash"):
        load_checkpoint(path)
    del state["content_sha256"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="no content hash"):
        load_checkpoint(path)


# ------------------------------------------------------------------- loader workers


def _worker_sabotage(monkeypatch, action: str, at_index: int = 5) -> None:
    """Make the loader worker that loads sample ``at_index`` die or hang (fork inherits)."""
    original = ArraySplit.load

    def load(self, index):
        if index == at_index and torch.utils.data.get_worker_info() is not None:
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)
        return original(self, index)

    monkeypatch.setattr(ArraySplit, "load", load)


@pytest.mark.parametrize("action", ["kill", "hang"])
def test_a_dead_or_stuck_worker_ends_the_run_with_a_message(cli, tmp_path, monkeypatch, action):
    _worker_sabotage(monkeypatch, action)
    start = time.monotonic()
    r = cli("train", *RUN, "data.num_workers=2", "data.timeout=5", "data.persistent_workers=false",
            f"run.dir={tmp_path}", "run.name=w")  # fmt: skip
    took = time.monotonic() - start
    assert r.code == 1, r.err
    expected = "died" if action == "kill" else "sent no batch for 5 s (data.timeout)"
    assert expected in r.err and "Traceback" not in r.err
    assert "resume with run.resume=auto" in r.err
    assert took < 60  # never a hang: well within the test's own timeout
    # Saved between two updates: the checkpoint loads.
    if "Saved" in r.err:
        load_checkpoint(tmp_path / "w" / "checkpoints" / "last.pt")
