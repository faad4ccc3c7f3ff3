"""DDP through torchrun on the CPU (Gloo): exact evaluation, repeatability, N→M resume, SIGTERM."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from visiontrain.data.loaders import EpochBatchSampler
from visiontrain.engine.checkpoint import load_checkpoint
from visiontrain.engine.distributed import Dist, interleave

HELPERS = Path(__file__).parent / "helpers"
# 41 validation and 39 test images: not divisible by 2, so a padding sampler would count
# one image twice.
DDP_TINY = [
    "data.image_size=16",
    "data.train_size=96",
    "data.val_size=41",
    "data.test_size=39",
    "data.batch_size=16",
    "data.defect_rate=0.25",
    "model.width=4",
    "model.depth=2",
    "train.progress=plain",
    "train.log_every=1",
]


def torchrun(*args: str, nproc: int = 2, timeout: float = 240, **kw) -> subprocess.Popen:
    """Start ``torchrun --standalone --nproc_per_node=nproc`` with ``args``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *args,
    ]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def ddp_train(run_dir: Path, name: str, *extra: str, nproc: int = 2) -> tuple[int, str]:
    proc = torchrun(
        "-m", "visiontrain", "train", *DDP_TINY, f"run.dir={run_dir}", f"run.name={name}",
        *extra, nproc=nproc,
    )  # fmt: skip
    return finish(proc)


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def assert_metrics_equal(a: dict, b: dict, rel: float = 1e-6) -> None:
    """Counts and rates exactly equal; float sums (loss) equal to summation order."""
    assert a["samples"] == b["samples"]
    for key in ("accuracy", "macro_f1"):
        assert a[key] == b[key], key
    assert a["per_class"] == b["per_class"]
    for key in ("loss", "average_precision"):
        assert math.isclose(a[key], b[key], rel_tol=rel, abs_tol=1e-9), (key, a[key], b[key])


# ---------------------------------------------------------------------- unit level


def test_interleave_restores_the_order_of_a_stride_shard():
    items = list(range(11))
    parts = [items[r::3] for r in range(3)]
    assert interleave(parts) == items
    # A shard that lost a sample (skipped as unreadable) is concatenated: nothing is lost.
    assert sorted(interleave([[0, 2], [1], [5, 8]])) == [0, 1, 2, 5, 8]


def test_one_process_dist_is_a_no_op():
    d = Dist()
    t = torch.tensor([1.0, 2.0])
    assert d.sum_(t) is t and d.gather([1, 2]) == [1, 2] and d.gather_rows(t) is t
    assert d.any(True) and not d.any(False) and d.broadcast("x") == "x"
    assert d.run_on_main(lambda: 7) == 7


@pytest.mark.parametrize("n", [40, 41, 13])
def test_evaluation_shards_cover_every_sample_once(n):
    shards = [list(EpochBatchSampler(n, 4, False, False, 0, r, 3)) for r in range(3)]
    seen = [i for shard in shards for batch in shard for _, i in batch]
    assert sorted(seen) == list(range(n))


@pytest.mark.parametrize("n", [96, 97, 13])
def test_training_shards_have_equal_length_and_share_one_order(n):
    samplers = [EpochBatchSampler(n, 4, True, False, 5, r, 2, pad=True) for r in range(2)]
    lengths = {len(s) for s in samplers}
    assert len(lengths) == 1 and all(len(list(s)) == len(s) for s in samplers)
    seen = {i for s in samplers for batch in s for _, i in batch}
    assert seen == set(range(n))
    first = [i for s in samplers for batch in s for _, i in batch]
    for s in samplers:
        s.set_epoch(1)  # DistributedSampler.set_epoch: a new shuffle, the same on all ranks
    assert first != [i for s in samplers for batch in s for _, i in batch]


def test_tools_refuse_torchrun(cli, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = cli("doctor")
    assert r.code == 2 and "runs in one process" in r.err


# ---------------------------------------------------------------------- torchrun


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    code, log = ddp_train(root, "a", "train.epochs=2")
    assert code == 0, log
    assert "DDP: 2 processes (gloo)" in log
    return root / "a"


def test_ddp_writes_one_run_from_rank_zero(ddp_run):
    s = summary(ddp_run)
    assert s["world_size"] == 2
    assert s["metrics"]["val"]["samples"] == 41 and s["metrics"]["test"]["samples"] == 39
    assert sorted(p.name for p in (ddp_run / "checkpoints").iterdir()) == [
        "best.pt", "epoch-0001.pt", "epoch-0002.pt", "last.pt",
    ]  # fmt: skip
    records = [json.loads(x) for x in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    # 96 images over 2 ranks of 16: 3 updates an epoch, each logged once (not twice).
    steps = [r["step"] for r in records if r["kind"] == "train_step"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint(ddp_run / "checkpoints" / "last.pt")["world_size"] == 2


def test_ddp_validation_equals_on_ranks_and_single_process(ddp_run, tmp_path, cli):
    best = ddp_run / "checkpoints" / "best.pt"
    code, log = finish(torchrun(str(HELPERS / "ddp_eval_probe.py"), str(best), str(tmp_path)))
    assert code == 0, log
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0 == rank1  # every rank holds the same numbers: same decisions
    single = cli("eval", ddp_run, "--split", "val", "--format", "json")
    assert single.code == 0, single.err
    one = json.loads(single.out)
    assert rank0["samples"] == one["samples"] == 41
    assert_metrics_equal(rank0, one)
    # The run's own record of its best validation equals both.
    assert_metrics_equal(summary(ddp_run)["metrics"]["val"], one)


def test_two_identical_ddp_runs_give_identical_metrics(ddp_run, tmp_path):
    code, log = ddp_train(tmp_path, "b", "train.epochs=2")
    assert code == 0, log
    a, b = summary(ddp_run)["metrics"], summary(tmp_path / "b")["metrics"]
    assert a == b


def test_a_two_process_checkpoint_resumes_in_one_process(ddp_run, tmp_path, cli):
    copy = tmp_path / "c"
    shutil.copytree(ddp_run, copy)
    r = cli(
        "train", *DDP_TINY, "train.progress=none", "train.epochs=3",
        f"run.resume={copy / 'checkpoints' / 'epoch-0002.pt'}",
    )  # fmt: skip
    assert r.code == 0, r.err
    s = summary(copy)
    assert s["world_size"] == 1 and s["epochs_run"] == 3
    # Two DDP epochs of 3 updates, then one epoch of 96 / 16 = 6 updates alone.
    assert s["global_step"] == 3 + 3 + 6


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def sigterm_rank_one(proc: subprocess.Popen, run: Path, steps: int) -> tuple[int, str]:
    """Once ``run`` logged ``steps`` train steps, SIGTERM torchrun's rank 1 alone; finish.

    Rank 0 must learn of the signal from rank 1 and save for both.
    """
    deadline = time.monotonic() + 120
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count('"train_step"') >= steps:
            break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("the run did not start training: " + finish(proc)[1][-2000:])
    workers = {_rank_of(pid): pid for pid in _children(proc.pid)}
    assert 1 in workers, workers
    os.kill(workers[1], signal.SIGTERM)
    return finish(proc)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers in /proc")
def test_sigterm_on_one_rank_stops_both_and_resume_auto_continues(tmp_path):
    run = tmp_path / "s"
    proc = torchrun(
        "-m", "visiontrain", "train", *DDP_TINY, "train.epochs=12", f"run.dir={tmp_path}",
        "run.name=s",
    )  # fmt: skip
    code, log = sigterm_rank_one(proc, run, steps=8)
    assert code != 0
    assert log.count("stopped by signal") == 2, log[-3000:]
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    stopped_at = state["counters"]["global_step"]
    assert 0 < stopped_at < 12 * 3
    code, log = ddp_train(tmp_path, "s", "train.epochs=12", "run.resume=auto")
    assert code == 0, log[-3000:]
    assert f"step {stopped_at})" in log
    s = summary(run)
    assert s["global_step"] == 12 * 3 and s["epochs_run"] == 12
